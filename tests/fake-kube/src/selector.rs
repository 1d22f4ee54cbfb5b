//! Label and field selectors (`labelSelector`, `fieldSelector` query parameters).
//!
//! Label selectors support the full set-based grammar (`k`, `!k`, `k=v`, `k==v`, `k!=v`,
//! `k in (a,b)`, `k notin (a,b)`, `k>n`, `k<n`). Field selectors support the fields the real
//! server supports for Nodes — `metadata.name` and `spec.unschedulable` — with `=`, `==`, `!=`;
//! any other field is rejected with the real server's `field label not supported: <field>`.

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum LabelOp {
    Exists,
    NotExists,
    Eq(String),
    NotEq(String),
    In(Vec<String>),
    NotIn(Vec<String>),
    Gt(i64),
    Lt(i64),
}

#[derive(Debug, Clone, PartialEq)]
struct LabelReq {
    key: String,
    op: LabelOp,
}

#[derive(Debug, Clone, PartialEq)]
struct FieldReq {
    field: String,
    value: String,
    equal: bool,
}

/// A parsed pair of selectors; the empty filter matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Filter {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Filter {
    pub(crate) fn parse(label: Option<&str>, field: Option<&str>) -> Result<Filter, String> {
        let mut f = Filter::default();
        if let Some(s) = label {
            for part in split_top_level(s) {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                f.labels.push(parse_label_req(part)?);
            }
        }
        if let Some(s) = field {
            for part in s.split(',') {
                let part = part.trim();
                if part.is_empty() {
                    continue;
                }
                f.fields.push(parse_field_req(part)?);
            }
        }
        Ok(f)
    }

    /// True when no selector was given (the real server then reports `remainingItemCount`).
    pub(crate) fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    /// The name a `metadata.name=<x>` field selector pins, as the Node authorizer reads it.
    pub(crate) fn pinned_name(&self) -> Option<&str> {
        self.fields
            .iter()
            .find(|r| r.field == "metadata.name" && r.equal)
            .map(|r| r.value.as_str())
    }

    pub(crate) fn matches(&self, node: &Value) -> bool {
        let labels = node.pointer("/metadata/labels").and_then(Value::as_object);
        let label = |k: &str| labels.and_then(|m| m.get(k)).and_then(Value::as_str);
        for r in &self.labels {
            let v = label(&r.key);
            let ok = match &r.op {
                LabelOp::Exists => v.is_some(),
                LabelOp::NotExists => v.is_none(),
                LabelOp::Eq(x) => v == Some(x.as_str()),
                LabelOp::NotEq(x) => v != Some(x.as_str()),
                LabelOp::In(xs) => v.is_some_and(|v| xs.iter().any(|x| x == v)),
                LabelOp::NotIn(xs) => !v.is_some_and(|v| xs.iter().any(|x| x == v)),
                LabelOp::Gt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v > *n),
                LabelOp::Lt(n) => v
                    .and_then(|v| v.parse::<i64>().ok())
                    .is_some_and(|v| v < *n),
            };
            if !ok {
                return false;
            }
        }
        for r in &self.fields {
            let actual = match r.field.as_str() {
                "metadata.name" => node
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                _ => node
                    .pointer("/spec/unschedulable")
                    .and_then(Value::as_bool)
                    .unwrap_or(false)
                    .to_string(),
            };
            if (actual == r.value) != r.equal {
                return false;
            }
        }
        true
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn parse_label_req(part: &str) -> Result<LabelReq, String> {
    let err = |why: &str| format!("unable to parse requirement: {why}: {part:?}");
    if let Some(rest) = part.strip_prefix('!') {
        let key = rest.trim();
        check_key(key).map_err(|e| err(&e))?;
        return Ok(LabelReq {
            key: key.into(),
            op: LabelOp::NotExists,
        });
    }
    let key_end = part
        .find(|c: char| c.is_whitespace() || "=!<>(".contains(c))
        .unwrap_or(part.len());
    let key = &part[..key_end];
    check_key(key).map_err(|e| err(&e))?;
    let rest = part[key_end..].trim_start();
    let op = if rest.is_empty() {
        LabelOp::Exists
    } else if let Some(v) = rest.strip_prefix("==") {
        LabelOp::Eq(value(v).map_err(|e| err(&e))?)
    } else if let Some(v) = rest.strip_prefix("!=") {
        LabelOp::NotEq(value(v).map_err(|e| err(&e))?)
    } else if let Some(v) = rest.strip_prefix('=') {
        LabelOp::Eq(value(v).map_err(|e| err(&e))?)
    } else if let Some(v) = rest.strip_prefix('>') {
        LabelOp::Gt(
            v.trim()
                .parse()
                .map_err(|_| err("for 'Gt', 'Lt' operators, the value must be an integer"))?,
        )
    } else if let Some(v) = rest.strip_prefix('<') {
        LabelOp::Lt(
            v.trim()
                .parse()
                .map_err(|_| err("for 'Gt', 'Lt' operators, the value must be an integer"))?,
        )
    } else if let Some(v) = rest.strip_prefix("notin") {
        LabelOp::NotIn(set(v).map_err(|e| err(&e))?)
    } else if let Some(v) = rest.strip_prefix("in") {
        LabelOp::In(set(v).map_err(|e| err(&e))?)
    } else {
        return Err(err("found unexpected operator"));
    };
    Ok(LabelReq {
        key: key.into(),
        op,
    })
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("key is empty".into());
    }
    crate::validate::qualified_name(key)
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    crate::validate::label_value(v)?;
    Ok(v.to_string())
}

fn set(v: &str) -> Result<Vec<String>, String> {
    let v = v.trim();
    let inner = v
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| "expected a parenthesised set of values".to_string())?;
    let values: Result<Vec<String>, String> = inner.split(',').map(value).collect();
    let values = values?;
    if values.is_empty() || (values.len() == 1 && values[0].is_empty() && inner.trim().is_empty()) {
        return Err("for 'in', 'notin' operators, values set can't be empty".into());
    }
    Ok(values)
}

fn parse_field_req(part: &str) -> Result<FieldReq, String> {
    let (field, value, equal) = if let Some((f, v)) = part.split_once("!=") {
        (f, v, false)
    } else if let Some((f, v)) = part.split_once("==") {
        (f, v, true)
    } else if let Some((f, v)) = part.split_once('=') {
        (f, v, true)
    } else {
        return Err(format!(
            "invalid selector: '{part}'; can't understand '{part}'"
        ));
    };
    let field = field.trim();
    match field {
        "metadata.name" | "spec.unschedulable" => Ok(FieldReq {
            field: field.into(),
            value: value.trim().into(),
            equal,
        }),
        other => Err(format!("field label not supported: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(labels: Value) -> Value {
        json!({"metadata": {"name": "n1", "labels": labels}, "spec": {}})
    }

    #[test]
    fn label_selectors() {
        let n = node(json!({"a": "1", "role": "cp", "num": "5"}));
        let m = |s: &str| Filter::parse(Some(s), None).unwrap().matches(&n);
        assert!(m("a=1"));
        assert!(m("a==1,role"));
        assert!(!m("a!=1"));
        assert!(m("!missing"));
        assert!(!m("!a"));
        assert!(m("role in (cp, worker)"));
        assert!(!m("role notin (cp)"));
        assert!(m("num>4,num<6"));
        assert!(m(""));
        assert!(Filter::parse(Some("a in"), None).is_err());
        assert!(Filter::parse(Some("bad key=1"), None).is_err());
    }

    #[test]
    fn field_selectors() {
        let n = node(json!({}));
        let m = |s: &str| Filter::parse(None, Some(s)).unwrap().matches(&n);
        assert!(m("metadata.name=n1"));
        assert!(!m("metadata.name!=n1"));
        assert!(m("spec.unschedulable=false"));
        let e = Filter::parse(None, Some("status.phase=Running")).unwrap_err();
        assert_eq!(e, "field label not supported: status.phase");
        assert_eq!(
            Filter::parse(None, Some("metadata.name=n1"))
                .unwrap()
                .pinned_name(),
            Some("n1")
        );
    }
}
