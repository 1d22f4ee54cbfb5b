//! `meta/v1` `Status` objects, shaped and worded as kube-apiserver sends them.
//!
//! Field order follows the Go struct (`kind`, `apiVersion`, `metadata`, `status`, `message`,
//! `reason`, `details`, `code`), which is how the real server serialises them.

use http::StatusCode;
use serde_json::{Map, Value, json};

/// An error answer: the HTTP status and the `Status` body.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub code: StatusCode,
    pub body: Value,
}

fn status(code: StatusCode, reason: &str, message: &str, details: Option<Value>) -> ApiError {
    let mut m = Map::new();
    m.insert("kind".into(), json!("Status"));
    m.insert("apiVersion".into(), json!("v1"));
    m.insert("metadata".into(), json!({}));
    m.insert("status".into(), json!("Failure"));
    m.insert("message".into(), json!(message));
    if !reason.is_empty() {
        m.insert("reason".into(), json!(reason));
    }
    if let Some(d) = details {
        m.insert("details".into(), d);
    }
    m.insert("code".into(), json!(code.as_u16()));
    ApiError {
        code,
        body: Value::Object(m),
    }
}

fn named(name: &str) -> Value {
    json!({"name": name, "kind": "nodes"})
}

/// `nodes "x" not found`.
pub(crate) fn node_not_found(name: &str) -> ApiError {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("nodes \"{name}\" not found"),
        Some(named(name)),
    )
}

/// The answer for a path no registered handler serves.
pub(crate) fn path_not_found() -> ApiError {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

/// 401, as the authentication filter sends it.
pub(crate) fn unauthorized() -> ApiError {
    status(
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
        "Unauthorized",
        None,
    )
}

/// 403 from the authorization filter: `nodes is forbidden: User "u" cannot list resource "nodes"
/// in API group "" at the cluster scope[: reason]` (with `nodes "n"` for a named request).
pub(crate) fn forbidden_authz(
    user: &str,
    verb: &str,
    name: Option<&str>,
    reason: &str,
) -> ApiError {
    let subject = match name {
        Some(n) => format!("nodes \"{n}\""),
        None => "nodes".to_string(),
    };
    let mut message = format!(
        "{subject} is forbidden: User \"{user}\" cannot {verb} resource \"nodes\" in API group \"\" at the cluster scope"
    );
    if !reason.is_empty() {
        message.push_str(": ");
        message.push_str(reason);
    }
    let details = match name {
        Some(n) => named(n),
        None => json!({"kind": "nodes"}),
    };
    status(StatusCode::FORBIDDEN, "Forbidden", &message, Some(details))
}

/// 403 from an admission plugin: `nodes "n" is forbidden: <detail>`.
pub(crate) fn forbidden_admission(name: &str, detail: &str) -> ApiError {
    status(
        StatusCode::FORBIDDEN,
        "Forbidden",
        &format!("nodes \"{name}\" is forbidden: {detail}"),
        Some(named(name)),
    )
}

/// 400 with a free-form message.
pub(crate) fn bad_request(message: &str) -> ApiError {
    status(StatusCode::BAD_REQUEST, "BadRequest", message, None)
}

/// 405 for a method the fake does not serve on a path it knows.
pub(crate) fn method_not_allowed(method: &str) -> ApiError {
    status(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        &format!(
            "fake-kube-apiserver does not implement {method} on this path (the real API server may)"
        ),
        Some(json!({})),
    )
}

/// 415 for a PATCH whose content type the fake does not accept.
pub(crate) fn unsupported_media_type(content_type: &str) -> ApiError {
    let message = if content_type == "application/apply-patch+yaml" {
        "fake-kube-apiserver does not implement server-side apply (application/apply-patch+yaml); accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json".to_string()
    } else {
        format!(
            "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json (got {content_type:?})"
        )
    };
    status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "UnsupportedMediaType",
        &message,
        Some(json!({})),
    )
}

/// 409 on an optimistic-concurrency (resourceVersion) or UID precondition failure.
pub(crate) fn conflict(name: &str, detail: &str) -> ApiError {
    status(
        StatusCode::CONFLICT,
        "Conflict",
        &format!("Operation cannot be fulfilled on nodes \"{name}\": {detail}"),
        Some(named(name)),
    )
}

/// One field error of a 422 `Invalid`.
pub(crate) struct FieldError {
    /// `FieldValueInvalid`, `FieldValueForbidden`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub field: String,
    /// The message without the field prefix, e.g. `Invalid value: "x": ...`.
    pub message: String,
}

/// 422 `<Kind> "<name>" is invalid: field: message[, field: message]`.
pub(crate) fn invalid(group: &str, kind: &str, name: &str, errors: &[FieldError]) -> ApiError {
    let joined: Vec<String> = errors
        .iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .collect();
    let list = if joined.len() == 1 {
        joined[0].clone()
    } else {
        format!("[{}]", joined.join(", "))
    };
    let qualified = if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    };
    let message = format!("{qualified} \"{name}\" is invalid: {list}");
    let causes: Vec<Value> = errors
        .iter()
        .map(|e| json!({"reason": e.reason, "message": e.message, "field": e.field}))
        .collect();
    let mut details = Map::new();
    details.insert("name".into(), json!(name));
    if !group.is_empty() {
        details.insert("group".into(), json!(group));
    }
    details.insert("kind".into(), json!(kind));
    details.insert("causes".into(), json!(causes));
    status(
        StatusCode::UNPROCESSABLE_ENTITY,
        "Invalid",
        &message,
        Some(Value::Object(details)),
    )
}

/// 410 for a watch from, or a list at, a compacted resourceVersion.
pub(crate) fn expired(message: &str) -> ApiError {
    status(StatusCode::GONE, "Expired", message, None)
}

/// 504 for a resourceVersion newer than the server has (the real server first waits up to 3 s
/// for its cache to catch up; the fake's state is always current, so it answers at once).
pub(crate) fn too_large_resource_version(requested: u64, current: u64) -> ApiError {
    status(
        StatusCode::GATEWAY_TIMEOUT,
        "Timeout",
        &format!("Too large resource version: {requested}, current: {current}"),
        Some(json!({
            "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
            "retryAfterSeconds": 1
        })),
    )
}

/// 413 for a request body over the real server's 3 MiB limit.
pub(crate) fn too_large_body() -> ApiError {
    status(
        StatusCode::PAYLOAD_TOO_LARGE,
        "RequestEntityTooLarge",
        "Request entity too large: limit is 3145728",
        None,
    )
}
