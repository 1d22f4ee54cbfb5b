//! The apimachinery validation of label and annotation keys and values, with its wording.

use serde_json::Value;

use crate::status::FieldError;

const NAME_FMT_MSG: &str = "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
const QUALIFIED_FMT_MSG: &str = "a qualified name must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]') with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')";
const SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";
const LABEL_VALUE_MSG: &str = "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')";

/// Total size limit of `metadata.annotations` (keys plus values).
const ANNOTATIONS_MAX_BYTES: usize = 256 * 1024;

fn is_name_part(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
                && (b[b.len() - 1].is_ascii_lowercase() || b[b.len() - 1].is_ascii_digit())
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        })
}

/// `IsQualifiedName`: `[prefix/]name`.
pub(crate) fn qualified_name(key: &str) -> Result<(), String> {
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                return Err("prefix part must be non-empty".into());
            }
            if !is_dns1123_subdomain(prefix) {
                return Err(format!("prefix part {SUBDOMAIN_MSG}"));
            }
            name
        }
        _ => return Err(QUALIFIED_FMT_MSG.into()),
    };
    if name.is_empty() {
        return Err("name part must be non-empty".into());
    }
    if name.len() > 63 {
        return Err("name part must be no more than 63 characters".into());
    }
    if !is_name_part(name) {
        return Err(NAME_FMT_MSG.into());
    }
    Ok(())
}

/// `IsValidLabelValue`.
pub(crate) fn label_value(v: &str) -> Result<(), String> {
    if v.len() > 63 {
        return Err("must be no more than 63 characters".into());
    }
    if !v.is_empty() && !is_name_part(v) {
        return Err(LABEL_VALUE_MSG.into());
    }
    Ok(())
}

fn quote(v: &str) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Validates `metadata.labels` and `metadata.annotations` of a Node about to be stored.
/// Non-string values are rejected by the caller while decoding, before this runs.
pub(crate) fn node_metadata(node: &Value) -> Vec<FieldError> {
    let mut errors = Vec::new();
    if let Some(labels) = crate::node::string_map(node, "labels") {
        for (k, v) in labels {
            if let Err(e) = qualified_name(k) {
                errors.push(FieldError {
                    reason: "FieldValueInvalid",
                    field: "metadata.labels".into(),
                    message: format!("Invalid value: {}: {e}", quote(k)),
                });
            }
            let v = v.as_str().unwrap_or_default();
            if let Err(e) = label_value(v) {
                errors.push(FieldError {
                    reason: "FieldValueInvalid",
                    field: "metadata.labels".into(),
                    message: format!("Invalid value: {}: {e}", quote(v)),
                });
            }
        }
    }
    if let Some(annotations) = crate::node::string_map(node, "annotations") {
        let mut total = 0;
        for (k, v) in annotations {
            if let Err(e) = qualified_name(&k.to_lowercase()) {
                errors.push(FieldError {
                    reason: "FieldValueInvalid",
                    field: "metadata.annotations".into(),
                    message: format!("Invalid value: {}: {e}", quote(k)),
                });
            }
            total += k.len() + v.as_str().map(str::len).unwrap_or(0);
        }
        if total > ANNOTATIONS_MAX_BYTES {
            errors.push(FieldError {
                reason: "FieldValueTooLong",
                field: "metadata.annotations".into(),
                message: format!("Too long: may not be more than {ANNOTATIONS_MAX_BYTES} bytes"),
            });
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(qualified_name("cluster.talos.dev/node-id").is_ok());
        assert!(qualified_name("node-role.kubernetes.io/control-plane").is_ok());
        assert!(qualified_name("Plain_Name.1").is_ok());
        assert!(qualified_name("Bad.Prefix/x").is_err());
        assert!(qualified_name("a/b/c").is_err());
        assert!(qualified_name("-x").is_err());
        assert!(qualified_name(&"x".repeat(64)).is_err());
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_3").is_ok());
        assert!(label_value("10.0.0.1,10.0.0.2").is_err());
    }
}
