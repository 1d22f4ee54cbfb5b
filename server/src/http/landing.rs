//! The site pages (§4.13): `/`, `/inspect?clusterID=` and `/stats`.
//!
//! Pages only read the state: unlike upstream, `/inspect` never creates a cluster (Q5,
//! Q26), and it can be turned off because it shows any cluster's ciphertext to anyone
//! who knows the cluster ID.

use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::Full;
use tokio::sync::Mutex;
use tonic::body::Body;

use crate::backend::Backend;
use crate::limits::STATS_CACHE_TTL;

const INDEX: &str = include_str!("index.html");

#[derive(Debug)]
pub struct Landing {
    backend: Backend,
    inspect_enabled: bool,
    /// Held while recomputing, so concurrent requests wait for one walk of the state.
    stats: Mutex<Option<(Instant, Bytes)>>,
}

pub fn response(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Body::new(Full::new(body.into())));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Go's `http.NotFound` page.
pub fn not_found() -> Response<Body> {
    response(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "404 page not found\n",
    )
}

fn unhex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A malformed query string (bad escape, semicolon, invalid UTF-8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("invalid query")]
pub struct BadQuery;

fn unescape(s: &str) -> Result<String, BadQuery> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hi = bytes.get(i + 1).copied().and_then(unhex).ok_or(BadQuery)?;
                let lo = bytes.get(i + 2).copied().and_then(unhex).ok_or(BadQuery)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| BadQuery)
}

/// Parses a query string like Go's `url.ParseQuery`: bad escapes and semicolons are
/// errors.
pub fn parse_query(q: &str) -> Result<Vec<(String, String)>, BadQuery> {
    let mut out = Vec::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        if part.contains(';') {
            return Err(BadQuery);
        }
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        out.push((unescape(k)?, unescape(v)?));
    }
    Ok(out)
}

fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&#34;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

impl Landing {
    pub fn new(backend: Backend, inspect_enabled: bool) -> Self {
        Self {
            backend,
            inspect_enabled,
            stats: Mutex::new(None),
        }
    }

    pub async fn handle(&self, path: &str, query: Option<&str>) -> Response<Body> {
        match path {
            "/" | "/index.html" => response(StatusCode::OK, "text/html; charset=utf-8", INDEX),
            "/inspect" if self.inspect_enabled => self.inspect(query.unwrap_or_default()).await,
            "/stats" => self.stats().await,
            _ => not_found(),
        }
    }

    async fn inspect(&self, query: &str) -> Response<Body> {
        let Ok(params) = parse_query(query) else {
            return response(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                "Oops, try again",
            );
        };
        let cluster_id = params
            .into_iter()
            .find(|(k, _)| k == "clusterID")
            .map(|(_, v)| v)
            .unwrap_or_default();
        // The etcd backend reads the data from etcd, which may be away.
        let mut affiliates = match self.backend.inspect(&cluster_id).await {
            Ok(affiliates) => affiliates,
            Err(status) => {
                return response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain; charset=utf-8",
                    status.message().to_owned(),
                );
            }
        };
        affiliates.sort_by(|a, b| a.id.cmp(&b.id));
        let mut html = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>Discovery Service: inspect</title></head><body>",
        );
        let _ = write!(html, "<h1>Cluster {}</h1>", escape_html(&cluster_id));
        if affiliates.is_empty() {
            html.push_str("<p>No Affiliate data found</p>");
        }
        for a in &affiliates {
            let _ = write!(
                html,
                "<h2>Affiliate {}</h2><p>Data: <code>{}</code></p><ul>",
                escape_html(&a.id),
                hex(&a.data)
            );
            for e in &a.endpoints {
                let _ = write!(html, "<li>Endpoint: <code>{}</code></li>", hex(e));
            }
            html.push_str("</ul>");
        }
        html.push_str("</body></html>");
        response(StatusCode::OK, "text/html; charset=utf-8", html)
    }

    async fn stats(&self) -> Response<Body> {
        let mut cache = self.stats.lock().await;
        let body = match &*cache {
            Some((at, body)) if at.elapsed() < STATS_CACHE_TTL => body.clone(),
            _ => {
                let body = Bytes::from(
                    serde_json::json!({ "affiliates": self.backend.state().counts().affiliates })
                        .to_string(),
                );
                *cache = Some((Instant::now(), body.clone()));
                body
            }
        };
        let mut r = response(StatusCode::OK, "application/json", body);
        r.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            http::HeaderValue::from_static("*"),
        );
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_like_query_parsing() {
        assert_eq!(
            parse_query("clusterID=a%2Fb+c&x=1").unwrap(),
            vec![
                ("clusterID".into(), "a/b c".into()),
                ("x".into(), "1".into())
            ]
        );
        assert!(parse_query("clusterID=%zz").is_err());
        assert!(parse_query("a=1;b=2").is_err());
        assert!(parse_query("").unwrap().is_empty());
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(escape_html("<script>\"'&"), "&lt;script&gt;&#34;&#39;&amp;");
    }
}
