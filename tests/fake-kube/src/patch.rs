//! PATCH bodies: JSON merge patch (RFC 7386), strategic merge patch (the subset that maps use),
//! and JSON patch (RFC 6902); then the checks the fake makes on the patched Node.
//!
//! What a patch may change: `metadata.labels` and `metadata.annotations`. Changes to `status`
//! are dropped silently, as the real server does on the main `nodes` resource (the Node
//! strategy copies the old status over). `metadata.resourceVersion` and `metadata.uid` in a
//! patch act as preconditions (409 on mismatch), as in the real server. A change to anything
//! else (`spec`, other metadata) is refused with 422 `Invalid` and a message naming the fake:
//! the real server would apply it, the fake does not model those fields.

use serde_json::{Map, Value};

use crate::status::{self, ApiError, FieldError};

/// The patch flavours the fake accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json` (RFC 7386).
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/json-patch+json` (RFC 6902).
    Json,
}

impl PatchType {
    /// Maps a `Content-Type` header (parameters such as `charset` ignored) to a patch type.
    pub(crate) fn from_content_type(content_type: &str) -> Result<PatchType, ApiError> {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match media.as_str() {
            "application/merge-patch+json" => Ok(PatchType::Merge),
            "application/strategic-merge-patch+json" => Ok(PatchType::Strategic),
            "application/json-patch+json" => Ok(PatchType::Json),
            _ => Err(status::unsupported_media_type(&media)),
        }
    }
}

/// RFC 7386 `MergePatch(target, patch)`.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        other => *target = other.clone(),
    }
}

/// Strategic merge patch for maps: like a merge patch, plus the `$patch: replace|delete|merge`
/// directive inside a map. Lists and the list directives (`$setElementOrder/…`,
/// `$deleteFromPrimitiveList/…`, `$retainKeys`) are refused: the fake does not implement
/// merge keys.
fn strategic_merge(target: &mut Value, patch: &Value, path: &str) -> Result<(), String> {
    let Value::Object(p) = patch else {
        return Err(format!(
            "{path}: fake-kube-apiserver implements strategic merge patches of maps only"
        ));
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut replaced = p.clone();
            replaced.remove("$patch");
            *target = Value::Object(Map::new());
            return strategic_merge(target, &Value::Object(replaced), path);
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("{path}: unknown patch type: {other}")),
    }
    let t = target.as_object_mut().expect("object");
    for (k, v) in p {
        if k == "$patch" {
            continue;
        }
        if k.starts_with('$') {
            return Err(format!(
                "{path}.{k}: fake-kube-apiserver does not implement this strategic merge directive"
            ));
        }
        let child = format!("{path}.{k}");
        match v {
            Value::Null => {
                t.remove(k);
            }
            Value::Object(_) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, v, &child)?;
                if slot.is_null() {
                    t.remove(k);
                }
            }
            Value::Array(_) => {
                return Err(format!(
                    "{child}: fake-kube-apiserver does not implement lists in strategic merge patches"
                ));
            }
            scalar => {
                t.insert(k.clone(), scalar.clone());
            }
        }
    }
    Ok(())
}

fn unprocessable(name: &str, field: &str, message: String) -> ApiError {
    status::invalid(
        "",
        "Node",
        name,
        &[FieldError {
            reason: "FieldValueForbidden",
            field: field.to_string(),
            message,
        }],
    )
}

/// Applies `body` to `current` and checks the outcome. Returns the Node to store (its
/// `resourceVersion` still the current one; the caller bumps it if anything changed).
pub(crate) fn apply(
    kind: PatchType,
    current: &Value,
    body: &[u8],
    name: &str,
) -> Result<Value, ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| status::bad_request(&format!("error decoding patch: {e}")))?;
    let mut result = current.clone();
    match kind {
        PatchType::Merge => {
            if !patch.is_object() {
                return Err(status::bad_request(
                    "error decoding patch: a merge patch for a Node must be a JSON object",
                ));
            }
            merge_patch(&mut result, &patch);
        }
        PatchType::Strategic => {
            strategic_merge(&mut result, &patch, "")
                .map_err(|e| unprocessable(name, "patch", format!("Forbidden: {e}")))?;
        }
        PatchType::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch)
                .map_err(|e| status::bad_request(&format!("error decoding patch: {e}")))?;
            json_patch::patch(&mut result, &ops).map_err(|e| {
                status::invalid(
                    "",
                    "Node",
                    name,
                    &[FieldError {
                        reason: "FieldValueInvalid",
                        field: "patch".into(),
                        message: format!("Invalid value: {e}"),
                    }],
                )
            })?;
        }
    }
    check(current, result, name)
}

fn check(current: &Value, mut result: Value, name: &str) -> Result<Value, ApiError> {
    let Some(obj) = result.as_object_mut() else {
        return Err(status::bad_request(
            "error decoding patched object: not a JSON object",
        ));
    };
    // The status of the main resource is not writable: the real server keeps the old one.
    match current.get("status") {
        Some(s) => {
            obj.insert("status".into(), s.clone());
        }
        None => {
            obj.remove("status");
        }
    }
    let meta_new = obj.get("metadata").and_then(Value::as_object).cloned();
    let meta_old = current
        .get("metadata")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let meta_new = meta_new.unwrap_or_default();
    // Name, then preconditions.
    let new_name = meta_new.get("name").and_then(Value::as_str).unwrap_or("");
    if new_name != name {
        return Err(status::bad_request(&format!(
            "the name of the object ({new_name}) does not match the name on the URL ({name})"
        )));
    }
    let old_uid = meta_old.get("uid").and_then(Value::as_str).unwrap_or("");
    if let Some(uid) = meta_new.get("uid").and_then(Value::as_str)
        && uid != old_uid
    {
        return Err(status::conflict(
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
            ),
        ));
    }
    let old_rv = meta_old.get("resourceVersion").cloned();
    if let Some(rv) = meta_new.get("resourceVersion").and_then(Value::as_str)
        && Some(rv) != old_rv.as_ref().and_then(Value::as_str)
    {
        return Err(status::conflict(
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    // Labels and annotations decode as map[string]string.
    for field in ["labels", "annotations"] {
        match meta_new.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                if let Some((_, v)) = m.iter().find(|(_, v)| !v.is_string()) {
                    return Err(status::bad_request(&format!(
                        "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type string",
                        json_kind(v)
                    )));
                }
            }
            Some(v) => {
                return Err(status::bad_request(&format!(
                    "json: cannot unmarshal {} into Go struct field ObjectMeta.metadata.{field} of type map[string]string",
                    json_kind(v)
                )));
            }
        }
    }
    // Everything else must be unchanged.
    let unsupported = |field: &str| {
        unprocessable(
            name,
            field,
            "Forbidden: fake-kube-apiserver implements patches of metadata.labels and metadata.annotations only".into(),
        )
    };
    let mut keys: Vec<&String> = meta_old.keys().chain(meta_new.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if matches!(k.as_str(), "labels" | "annotations" | "resourceVersion") {
            continue;
        }
        if meta_old.get(k) != meta_new.get(k) {
            return Err(unsupported(&format!("metadata.{k}")));
        }
    }
    let cur = current.as_object().cloned().unwrap_or_default();
    let mut top: Vec<&String> = cur.keys().chain(obj.keys()).collect();
    top.sort();
    top.dedup();
    for k in top {
        if k == "metadata" {
            continue;
        }
        if cur.get(k) != obj.get(k) {
            return Err(unsupported(k));
        }
    }
    // Keep the stored resourceVersion; the caller assigns a new one if anything changed.
    let mut meta = meta_new;
    match old_rv {
        Some(rv) => {
            meta.insert("resourceVersion".into(), rv);
        }
        None => {
            meta.remove("resourceVersion");
        }
    }
    obj.insert("metadata".into(), Value::Object(meta));
    crate::node::normalise_metadata(&mut result);
    let errors = crate::validate::node_metadata(&result);
    if !errors.is_empty() {
        return Err(status::invalid("", "Node", name, &errors));
    }
    // Keep the metadata key order of the stored object (labels/annotations where they were).
    Ok(reorder_like(current, result))
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Rebuilds `metadata` in the canonical key order the fake serves.
fn reorder_like(_current: &Value, mut result: Value) -> Value {
    const ORDER: [&str; 6] = [
        "name",
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "labels",
        "annotations",
    ];
    if let Some(m) = result.get_mut("metadata").and_then(Value::as_object_mut) {
        let mut out = Map::new();
        for k in ORDER {
            if let Some(v) = m.remove(k) {
                out.insert(k.into(), v);
            }
        }
        for (k, v) in std::mem::take(m) {
            out.insert(k, v);
        }
        *m = out;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::NodeBuilder;
    use serde_json::json;

    fn node() -> Value {
        NodeBuilder::new("n1")
            .annotation("keep", "1")
            .annotation("drop", "2")
            .label("l", "v")
            .internal_ip("10.0.0.1")
            .to_json("uid-1", 7, "2026-01-01T00:00:00Z")
    }

    #[test]
    fn rfc7386_examples() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
        let mut t = json!({"a": [1]});
        merge_patch(&mut t, &json!({"a": [2, 3]}));
        assert_eq!(t, json!({"a": [2, 3]}));
    }

    #[test]
    fn annotations_set_and_delete() {
        for kind in [PatchType::Merge, PatchType::Strategic] {
            let out = apply(
                kind,
                &node(),
                br#"{"metadata":{"annotations":{"new":"x","drop":null}}}"#,
                "n1",
            )
            .unwrap();
            assert_eq!(
                out.pointer("/metadata/annotations").unwrap(),
                &json!({"keep": "1", "new": "x"})
            );
            assert_eq!(out.pointer("/metadata/resourceVersion").unwrap(), "7");
        }
    }

    #[test]
    fn deleting_every_annotation_drops_the_map() {
        let out = apply(
            PatchType::Merge,
            &node(),
            br#"{"metadata":{"annotations":{"keep":null,"drop":null}}}"#,
            "n1",
        )
        .unwrap();
        assert!(out.pointer("/metadata/annotations").is_none());
    }

    #[test]
    fn strategic_replace_directive() {
        let out = apply(
            PatchType::Strategic,
            &node(),
            br#"{"metadata":{"annotations":{"$patch":"replace","only":"1"}}}"#,
            "n1",
        )
        .unwrap();
        assert_eq!(
            out.pointer("/metadata/annotations").unwrap(),
            &json!({"only": "1"})
        );
    }

    #[test]
    fn json_patch_ops() {
        let out = apply(
            PatchType::Json,
            &node(),
            br#"[{"op":"add","path":"/metadata/annotations/a~1b","value":"c"},{"op":"remove","path":"/metadata/annotations/drop"}]"#,
            "n1",
        )
        .unwrap();
        assert_eq!(
            out.pointer("/metadata/annotations").unwrap(),
            &json!({"keep": "1", "a/b": "c"})
        );
    }

    #[test]
    fn preconditions_and_refusals() {
        let e = apply(
            PatchType::Merge,
            &node(),
            br#"{"metadata":{"resourceVersion":"3","annotations":{"a":"b"}}}"#,
            "n1",
        )
        .unwrap_err();
        assert_eq!(e.code.as_u16(), 409);
        assert!(
            apply(
                PatchType::Merge,
                &node(),
                br#"{"metadata":{"resourceVersion":"7","annotations":{"a":"b"}}}"#,
                "n1"
            )
            .is_ok()
        );
        let e = apply(
            PatchType::Merge,
            &node(),
            br#"{"spec":{"unschedulable":true}}"#,
            "n1",
        )
        .unwrap_err();
        assert_eq!(e.code.as_u16(), 422);
        let e = apply(
            PatchType::Merge,
            &node(),
            br#"{"metadata":{"annotations":{"n":1}}}"#,
            "n1",
        )
        .unwrap_err();
        assert_eq!(e.code.as_u16(), 400);
        let e = apply(
            PatchType::Merge,
            &node(),
            br#"{"metadata":{"labels":{"bad key":"v"}}}"#,
            "n1",
        )
        .unwrap_err();
        assert_eq!(e.code.as_u16(), 422);
        // Status changes are ignored, as on the real main resource.
        let out = apply(
            PatchType::Merge,
            &node(),
            br#"{"status":{"addresses":[]}}"#,
            "n1",
        )
        .unwrap();
        assert_eq!(out, node());
        let e = PatchType::from_content_type("application/apply-patch+yaml").unwrap_err();
        assert_eq!(e.code.as_u16(), 415);
        assert_eq!(
            PatchType::from_content_type("application/merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Merge
        );
    }
}
