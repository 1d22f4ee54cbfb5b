//! Request handling: authentication, authorization modes, routing, and the Node verbs
//! (list, watch, get, patch) plus the discovery documents clients read first.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use futures::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::node::as_list_item;
use crate::patch::PatchType;
use crate::selector::Filter;
use crate::status::{self, ApiError, FieldError};
use crate::store::{
    PatchRecord, RequestRecord, Shared, WatchGuard, WatchMsg, Watcher, bookmark_line, event_line,
    translate,
};
use crate::{AuthMode, FakeOptions, Verb};

pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What every connection's handler shares.
pub(crate) struct Ctx {
    pub shared: Arc<Shared>,
    pub token: String,
    pub options: FakeOptions,
    pub port: u16,
}

const MAX_BODY: usize = 3 * 1024 * 1024;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

fn base_headers(builder: http::response::Builder, content_type: &str) -> http::response::Builder {
    builder
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CACHE_CONTROL, "no-cache, private")
        .header("Audit-Id", crate::util::uuid_v4())
}

fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("json");
    body.push(b'\n');
    base_headers(Response::builder().status(code), "application/json")
        .body(full(body))
        .expect("response")
}

fn error_response(e: ApiError) -> Response<Body> {
    let retry_after = e
        .body
        .pointer("/details/retryAfterSeconds")
        .and_then(Value::as_u64);
    let mut response = json_response(e.code, &e.body);
    // As the real server does for a Status with details.retryAfterSeconds.
    if let Some(secs) = retry_after {
        response.headers_mut().insert(
            header::RETRY_AFTER,
            http::HeaderValue::from_str(&secs.to_string()).expect("header"),
        );
    }
    response
}

/// Entry point for every request.
pub(crate) async fn handle(
    ctx: Arc<Ctx>,
    conn: u64,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let delay = ctx.shared.read(|s| s.delay);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let (verb, response) = route(&ctx, conn, req, &path, &query).await;
    let status = response.status().as_u16();
    ctx.shared.write(|s| {
        s.requests.push(RequestRecord {
            method,
            path,
            query,
            verb,
            status,
            user_agent,
        })
    });
    Ok(response)
}

fn authenticated(ctx: &Ctx, req: &Request<Incoming>) -> bool {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.splitn(2, ' ');
    let scheme = parts.next().unwrap_or("");
    let token = parts.next().unwrap_or("").trim();
    scheme.eq_ignore_ascii_case("bearer") && token == ctx.token
}

async fn route(
    ctx: &Arc<Ctx>,
    conn: u64,
    req: Request<Incoming>,
    path: &str,
    query: &str,
) -> (Option<Verb>, Response<Body>) {
    // Anonymous requests are refused everywhere, as with --anonymous-auth=false.
    if !authenticated(ctx, &req) {
        let verb = node_verb(req.method(), path, query);
        return (verb, error_response(status::unauthorized()));
    }
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = req.method().clone();
    match (segments.as_slice(), &method) {
        (["version"], &Method::GET) => (None, json_response(StatusCode::OK, &version(ctx))),
        (["healthz"] | ["livez"] | ["readyz"], &Method::GET) => (
            None,
            base_headers(Response::builder(), "text/plain; charset=utf-8")
                .body(full("ok"))
                .expect("response"),
        ),
        (["api"], &Method::GET) => (None, json_response(StatusCode::OK, &api_versions(ctx))),
        (["apis"], &Method::GET) => (
            None,
            json_response(
                StatusCode::OK,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            ),
        ),
        (["api", "v1"], &Method::GET) => (None, json_response(StatusCode::OK, &api_resources())),
        (["api", "v1", "nodes"], &Method::GET) => {
            let q = parse_query(query);
            match go_bool(q.get("watch")) {
                Ok(true) => (Some(Verb::Watch), watch(ctx, conn, &q)),
                Ok(false) => (
                    Some(Verb::List),
                    list(ctx, &q).unwrap_or_else(error_response),
                ),
                Err(e) => (Some(Verb::List), error_response(e)),
            }
        }
        (["api", "v1", "nodes"], m) => {
            (None, error_response(status::method_not_allowed(m.as_str())))
        }
        (["api", "v1", "nodes", name], &Method::GET) => {
            let q = parse_query(query);
            (
                Some(Verb::Get),
                get(ctx, name, &q).unwrap_or_else(error_response),
            )
        }
        (["api", "v1", "nodes", name], &Method::PATCH) => {
            let name = name.to_string();
            (Some(Verb::Patch), patch(ctx, req, &name, query).await)
        }
        (["api", "v1", "nodes", _], m) => {
            (None, error_response(status::method_not_allowed(m.as_str())))
        }
        _ => (None, error_response(status::path_not_found())),
    }
}

fn node_verb(method: &Method, path: &str, query: &str) -> Option<Verb> {
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    match (segments.as_slice(), method) {
        (["api", "v1", "nodes"], &Method::GET) => {
            if go_bool(parse_query(query).get("watch")).unwrap_or(false) {
                Some(Verb::Watch)
            } else {
                Some(Verb::List)
            }
        }
        (["api", "v1", "nodes", _], &Method::GET) => Some(Verb::Get),
        (["api", "v1", "nodes", _], &Method::PATCH) => Some(Verb::Patch),
        _ => None,
    }
}

fn version(ctx: &Ctx) -> Value {
    let (major, minor, patch) = ctx.options.kubernetes_version;
    json!({
        "major": major.to_string(),
        "minor": minor.to_string(),
        "gitVersion": format!("v{major}.{minor}.{patch}+fake-kube-apiserver"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "go1.23.0",
        "compiler": "gc",
        "platform": "linux/amd64"
    })
}

fn api_versions(ctx: &Ctx) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": format!("127.0.0.1:{}", ctx.port)}
        ]
    })
}

/// The core/v1 resource list, with Nodes only, and only the verbs the fake serves.
fn api_resources() -> Value {
    json!({
        "kind": "APIResourceList",
        "groupVersion": "v1",
        "resources": [{
            "name": "nodes",
            "singularName": "node",
            "namespaced": false,
            "kind": "Node",
            "verbs": ["get", "list", "patch", "watch"],
            "shortNames": ["no"]
        }]
    })
}

fn parse_query(query: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

/// Go's `strconv.ParseBool`, which the API server's query decoding uses.
fn go_bool(v: Option<&String>) -> Result<bool, ApiError> {
    match v.map(String::as_str) {
        None | Some("") => Ok(false),
        Some("1" | "t" | "T" | "true" | "TRUE" | "True") => Ok(true),
        Some("0" | "f" | "F" | "false" | "FALSE" | "False") => Ok(false),
        Some(other) => Err(status::bad_request(&format!(
            "strconv.ParseBool: parsing {other:?}: invalid syntax"
        ))),
    }
}

fn verb_str(v: Verb) -> &'static str {
    match v {
        Verb::List => "list",
        Verb::Watch => "watch",
        Verb::Get => "get",
        Verb::Patch => "patch",
    }
}

/// Applies the auth mode configured for `verb`. `name` is the Node named by the path, or by a
/// `metadata.name=` field selector on a list/watch (the authorizer sees it as the name).
fn authorize(ctx: &Ctx, verb: Verb, name: Option<&str>) -> Result<(), ApiError> {
    match ctx.shared.read(|s| s.auth(verb)) {
        AuthMode::Ok => Ok(()),
        AuthMode::Unauthorized => Err(status::unauthorized()),
        AuthMode::Forbidden { user } => {
            Err(status::forbidden_authz(&user, verb_str(verb), name, ""))
        }
        AuthMode::NodeCredential { node } => {
            let user = format!("system:node:{node}");
            match (verb, name) {
                (_, Some(n)) if n == node => Ok(()),
                // The Node authorizer lets any node patch; NodeRestriction admission refuses
                // other nodes' objects.
                (Verb::Patch, Some(n)) => Err(status::forbidden_admission(
                    n,
                    &format!("node \"{node}\" is not allowed to modify node \"{n}\""),
                )),
                (_, Some(n)) => Err(status::forbidden_authz(
                    &user,
                    verb_str(verb),
                    Some(n),
                    &format!("node '{node}' cannot read '{n}', only its own Node object"),
                )),
                (_, None) => Err(status::forbidden_authz(
                    &user,
                    verb_str(verb),
                    None,
                    &format!("node '{node}' cannot read all nodes, only its own Node object"),
                )),
            }
        }
    }
}

/// List/watch query options, checked as `ValidateListOptions` checks them.
struct ListOpts {
    watch: bool,
    rv: Option<String>,
    rvm: Option<String>,
    limit: i64,
    cont: Option<String>,
    timeout_seconds: Option<u64>,
    bookmarks: bool,
    send_initial_events: Option<bool>,
    filter: Filter,
}

fn non_empty(q: &HashMap<String, String>, key: &str) -> Option<String> {
    q.get(key).filter(|v| !v.is_empty()).cloned()
}

fn parse_list_opts(q: &HashMap<String, String>, watch: bool) -> Result<ListOpts, ApiError> {
    let filter = Filter::parse(
        q.get("labelSelector").map(String::as_str),
        q.get("fieldSelector").map(String::as_str),
    )
    .map_err(|e| status::bad_request(&e))?;
    let limit = match q.get("limit").filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => v
            .parse::<i64>()
            .map_err(|e| status::bad_request(&format!("invalid limit {v:?}: {e}")))?,
    };
    let timeout_seconds = match q.get("timeoutSeconds").filter(|v| !v.is_empty()) {
        None => None,
        Some(v) => Some(
            v.parse::<u64>()
                .map_err(|e| status::bad_request(&format!("invalid timeoutSeconds {v:?}: {e}")))?,
        ),
    };
    let send_initial_events = match q.get("sendInitialEvents") {
        None => None,
        v => Some(go_bool(v)?),
    };
    let opts = ListOpts {
        watch,
        rv: non_empty(q, "resourceVersion"),
        rvm: non_empty(q, "resourceVersionMatch"),
        limit,
        cont: non_empty(q, "continue"),
        timeout_seconds,
        bookmarks: go_bool(q.get("allowWatchBookmarks"))?,
        send_initial_events,
        filter,
    };
    let mut errs = Vec::new();
    let forbidden = |field: &str, msg: &str| FieldError {
        reason: "FieldValueForbidden",
        field: field.into(),
        message: format!("Forbidden: {msg}"),
    };
    if opts.send_initial_events.is_some() {
        if !opts.watch {
            errs.push(forbidden(
                "sendInitialEvents",
                "sendInitialEvents is forbidden for list",
            ));
        }
        if opts.rvm.as_deref() != Some("NotOlderThan") {
            errs.push(forbidden(
                "resourceVersionMatch",
                "sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
            ));
        }
        if !opts.bookmarks {
            errs.push(forbidden(
                "allowWatchBookmarks",
                "sendInitialEvents requires setting allowWatchBookmarks to true",
            ));
        }
    } else if opts.watch && opts.rvm.is_some() {
        errs.push(forbidden(
            "resourceVersionMatch",
            "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided",
        ));
    }
    match opts.rvm.as_deref() {
        None => {}
        Some(m @ ("NotOlderThan" | "Exact")) => {
            if opts.rv.is_none() {
                errs.push(forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden unless resourceVersion is provided",
                ));
            }
            if m == "Exact" && opts.rv.as_deref() == Some("0") {
                errs.push(forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
                ));
            }
            if opts.cont.is_some() {
                errs.push(forbidden(
                    "resourceVersionMatch",
                    "resourceVersionMatch is forbidden when continue is provided",
                ));
            }
        }
        Some(other) => errs.push(FieldError {
            reason: "FieldValueNotSupported",
            field: "resourceVersionMatch".into(),
            message: format!(
                "Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
            ),
        }),
    }
    if !errs.is_empty() {
        return Err(status::invalid("meta.k8s.io", "ListOptions", "", &errs));
    }
    Ok(opts)
}

fn parse_rv(rv: &str) -> Result<u64, ApiError> {
    rv.parse::<u64>()
        .map_err(|e| status::bad_request(&format!("invalid resource version: {e}")))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    v: String,
    rv: u64,
    start: String,
}

fn encode_continue(rv: u64, last: &str) -> String {
    let token = ContinueToken {
        v: "meta.k8s.io/v1".into(),
        rv,
        start: format!("{last}\u{0}"),
    };
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(serde_json::to_vec(&token).expect("json"))
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    let invalid = |why: String| status::bad_request(&format!("continue key is not valid: {why}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.trim_end_matches('='))
        .map_err(|e| invalid(e.to_string()))?;
    let t: ContinueToken = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if t.v != "meta.k8s.io/v1" {
        return Err(invalid(
            "incorrect encoded start resourceVersion (version meta.k8s.io/v1)".into(),
        ));
    }
    Ok(t)
}

fn list(ctx: &Ctx, q: &HashMap<String, String>) -> Result<Response<Body>, ApiError> {
    let opts = parse_list_opts(q, false)?;
    authorize(ctx, Verb::List, opts.filter.pinned_name())?;
    let body = ctx.shared.read(|s| -> Result<Value, ApiError> {
        let current = s.rv;
        let (at, start) = if let Some(cont) = &opts.cont {
            if opts.rv.as_deref().is_some_and(|rv| rv != "0") {
                return Err(status::bad_request(
                    "specifying resource version is not allowed when using continue",
                ));
            }
            let t = decode_continue(cont)?;
            if t.rv < s.compacted_rv {
                return Err(status::expired(
                    "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                ));
            }
            if t.rv > current {
                return Err(status::bad_request("continue key is not valid: resourceVersion is in the future"));
            }
            (t.rv, Some(t.start))
        } else {
            match opts.rv.as_deref() {
                None | Some("0") => (current, None),
                Some(rv) => {
                    let rv = parse_rv(rv)?;
                    if rv > current {
                        return Err(status::too_large_resource_version(rv, current));
                    }
                    let exact = opts.rvm.as_deref() == Some("Exact")
                        || (opts.rvm.is_none() && opts.limit > 0);
                    if exact {
                        if rv < s.compacted_rv {
                            return Err(status::expired(
                                "The resourceVersion for the provided list is too old.",
                            ));
                        }
                        (rv, None)
                    } else {
                        (current, None)
                    }
                }
            }
        };
        let snapshot = s.snapshot_at(at);
        let matching: Vec<&Value> = snapshot
            .iter()
            .filter(|(name, _)| start.as_deref().is_none_or(|st| name.as_str() >= st))
            .map(|(_, v)| v)
            .filter(|v| opts.filter.matches(v))
            .collect();
        let mut metadata = Map::new();
        metadata.insert("resourceVersion".into(), json!(at.to_string()));
        let page: Vec<&Value> = if opts.limit > 0 && matching.len() > opts.limit as usize {
            let page = &matching[..opts.limit as usize];
            let last = page
                .last()
                .and_then(|v| v.pointer("/metadata/name"))
                .and_then(Value::as_str)
                .unwrap_or("");
            metadata.insert("continue".into(), json!(encode_continue(at, last)));
            if opts.filter.is_empty() {
                metadata.insert(
                    "remainingItemCount".into(),
                    json!(matching.len() - opts.limit as usize),
                );
            }
            page.to_vec()
        } else {
            matching
        };
        let items: Vec<Value> = page.into_iter().map(as_list_item).collect();
        Ok(json!({
            "kind": "NodeList",
            "apiVersion": "v1",
            "metadata": Value::Object(metadata),
            "items": items,
        }))
    })?;
    Ok(json_response(StatusCode::OK, &body))
}

fn get(ctx: &Ctx, name: &str, q: &HashMap<String, String>) -> Result<Response<Body>, ApiError> {
    authorize(ctx, Verb::Get, Some(name))?;
    let rv = match non_empty(q, "resourceVersion") {
        None => None,
        Some(rv) => Some(parse_rv(&rv)?),
    };
    let node = ctx.shared.read(|s| -> Result<Value, ApiError> {
        if let Some(rv) = rv
            && rv > s.rv
        {
            return Err(status::too_large_resource_version(rv, s.rv));
        }
        s.nodes
            .get(name)
            .cloned()
            .ok_or_else(|| status::node_not_found(name))
    })?;
    Ok(json_response(StatusCode::OK, &node))
}

async fn patch(ctx: &Ctx, req: Request<Incoming>, name: &str, query: &str) -> Response<Body> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return error_response(status::too_large_body()),
    };
    let q = parse_query(query);
    let dry_run = q.get("dryRun").is_some_and(|v| v == "All");
    let outcome = patch_inner(ctx, name, &content_type, &body, dry_run);
    let response = match outcome {
        Ok(node) => json_response(StatusCode::OK, &node),
        Err(e) => error_response(e),
    };
    let status = response.status().as_u16();
    ctx.shared.write(|s| {
        s.patches.push(PatchRecord {
            name: name.to_string(),
            content_type,
            body: String::from_utf8_lossy(&body).into_owned(),
            status,
        })
    });
    response
}

fn patch_inner(
    ctx: &Ctx,
    name: &str,
    content_type: &str,
    body: &[u8],
    dry_run: bool,
) -> Result<Value, ApiError> {
    authorize(ctx, Verb::Patch, Some(name))?;
    let kind = PatchType::from_content_type(content_type)?;
    ctx.shared.write(|s| {
        let current = s
            .nodes
            .get(name)
            .cloned()
            .ok_or_else(|| status::node_not_found(name))?;
        let patched = crate::patch::apply(kind, &current, body, name)?;
        if patched == current || dry_run {
            // A no-op write does not bump the resourceVersion, as in the real server.
            return Ok(patched);
        }
        Ok(s.commit(name, Some(patched)))
    })
}

struct WatchStream {
    initial: std::collections::VecDeque<Bytes>,
    end_after_initial: bool,
    rx: Option<mpsc::UnboundedReceiver<WatchMsg>>,
    deadline: std::pin::Pin<Box<tokio::time::Sleep>>,
    bookmark_every: Option<tokio::time::Interval>,
    shared: Arc<Shared>,
    guard: Option<WatchGuard>,
}

fn watch(ctx: &Arc<Ctx>, conn: u64, q: &HashMap<String, String>) -> Response<Body> {
    match start_watch(ctx, conn, q) {
        Ok(stream) => {
            let body = futures::stream::unfold(stream, next_frame)
                .map(Ok::<_, Infallible>)
                .boxed();
            base_headers(
                Response::builder().status(StatusCode::OK),
                "application/json",
            )
            .body(StreamBody::new(body).boxed_unsync())
            .expect("response")
        }
        Err(e) => error_response(e),
    }
}

fn error_event(e: &ApiError) -> Bytes {
    event_line("ERROR", &e.body)
}

fn start_watch(
    ctx: &Arc<Ctx>,
    conn: u64,
    q: &HashMap<String, String>,
) -> Result<WatchStream, ApiError> {
    let opts = parse_list_opts(q, true)?;
    authorize(ctx, Verb::Watch, opts.filter.pinned_name())?;
    let start_rv = match opts.rv.as_deref() {
        None => None,
        Some(rv) => Some(parse_rv(rv)?),
    };
    let timeout = match opts.timeout_seconds {
        Some(s) if s > 0 => Duration::from_secs(s),
        _ => ctx.options.default_watch_timeout,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = ctx.shared.clone();
    let (initial, registered) = ctx.shared.write(|s| {
        s.watches_started += 1;
        let current = s.rv;
        let mut initial = Vec::new();
        let matching_now = |s: &crate::store::Store| -> Vec<Bytes> {
            s.nodes
                .values()
                .filter(|n| opts.filter.matches(n))
                .map(|n| event_line("ADDED", n))
                .collect()
        };
        if let Some(rv) = start_rv
            && rv > current
        {
            initial.push(error_event(&status::too_large_resource_version(
                rv, current,
            )));
            return (initial, None);
        }
        if opts.send_initial_events == Some(true) {
            initial.extend(matching_now(s));
            initial.push(bookmark_line(current, true));
        } else {
            match start_rv {
                None | Some(0) => initial.extend(matching_now(s)),
                Some(rv) => {
                    if rv < s.compacted_rv {
                        let e = status::expired(&format!(
                            "too old resource version: {rv} ({})",
                            s.compacted_rv
                        ));
                        initial.push(error_event(&e));
                        return (initial, None);
                    }
                    initial.extend(
                        s.history
                            .iter()
                            .filter(|e| e.rv > rv)
                            .filter_map(|e| translate(&opts.filter, e)),
                    );
                }
            }
        }
        let id = s.next_watcher;
        s.next_watcher += 1;
        s.watchers.insert(
            id,
            Watcher {
                tx,
                filter: opts.filter.clone(),
                bookmarks: opts.bookmarks,
                conn,
                cut: false,
            },
        );
        (initial, Some(id))
    });
    let bookmark_every = (opts.bookmarks && registered.is_some()).then(|| {
        let period = ctx.options.bookmark_interval;
        tokio::time::interval_at(tokio::time::Instant::now() + period, period)
    });
    Ok(WatchStream {
        initial: initial.into(),
        end_after_initial: registered.is_none(),
        rx: registered.map(|_| rx),
        deadline: Box::pin(tokio::time::sleep(timeout)),
        bookmark_every,
        guard: registered.map(|id| WatchGuard {
            shared: shared.clone(),
            id,
        }),
        shared,
    })
}

async fn next_frame(mut st: WatchStream) -> Option<(Frame<Bytes>, WatchStream)> {
    if let Some(line) = st.initial.pop_front() {
        return Some((Frame::data(line), st));
    }
    if st.end_after_initial {
        return None;
    }
    loop {
        let rx = st.rx.as_mut()?;
        let tick = async {
            match st.bookmark_every.as_mut() {
                Some(i) => {
                    i.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            biased;
            msg = rx.recv() => match msg {
                Some(WatchMsg::Line(line)) => return Some((Frame::data(line), st)),
                Some(WatchMsg::End) | None => return None,
            },
            _ = &mut st.deadline => return None,
            _ = tick => {
                if let Some(g) = &st.guard {
                    let id = g.id;
                    st.shared.write(|s| s.bookmark(id));
                }
            }
        }
    }
}
