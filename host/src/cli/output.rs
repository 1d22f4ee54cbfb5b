//! Prints resources as talosctl does: a table, YAML documents, or JSON objects.

use std::io::Write;

use anyhow::Result;
use serde_json::{Value, json};

use crate::api::proto::{self, Resource, watch_event};
use crate::store::{Kind, Namespace};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Yaml,
    Json,
}

/// A resource as `-o json` and `-o yaml` print it: `metadata` and `spec` as
/// talosctl prints them (raw affiliates add `firstSeen` and `lastSeen` to the
/// metadata), and for merged affiliates `sources` beside them, leaving Talos's
/// spec keys alone.
pub fn resource_value(resource: &Resource) -> Value {
    let metadata = resource.metadata.clone().unwrap_or_default();
    let spec: Value = serde_json::from_str(&resource.spec_json).unwrap_or(Value::Null);
    let merged_affiliate = is_merged_affiliate(&metadata);
    let mut metadata_value = json!({
        "namespace": metadata.namespace,
        "type": metadata.r#type,
        "id": metadata.id,
        "version": metadata.version,
    });
    if !metadata.first_seen.is_empty() {
        metadata_value["firstSeen"] = metadata.first_seen.into();
        metadata_value["lastSeen"] = metadata.last_seen.into();
    }
    let mut value = json!({"metadata": metadata_value, "spec": spec});
    if merged_affiliate {
        value["sources"] = resource.sources.iter().map(source_value).collect();
    }
    value
}

fn source_value(source: &proto::Source) -> Value {
    let mut value = json!({"registry": source.registry});
    if !source.first_seen.is_empty() {
        value["firstSeen"] = source.first_seen.clone().into();
        value["lastSeen"] = source.last_seen.clone().into();
    }
    value
}

fn is_merged_affiliate(metadata: &proto::Metadata) -> bool {
    metadata.namespace == Namespace::Cluster.as_str()
        && metadata.r#type == Kind::Affiliate.type_name()
}

/// Where a table cell comes from.
#[derive(Clone, Copy)]
enum Column {
    /// A key of the spec.
    Spec(&'static str),
    /// The registries that report the node (ours, after talosctl's columns).
    SeenBy,
}

/// The table columns after ID and VERSION: talosctl's per type, then ours.
fn columns(kind: Kind) -> &'static [(&'static str, Column)] {
    use Column::{SeenBy, Spec};
    match kind {
        Kind::Identity => &[("ID", Spec("nodeId"))],
        Kind::Affiliate => &[
            ("HOSTNAME", Spec("hostname")),
            ("MACHINE TYPE", Spec("machineType")),
            ("ADDRESSES", Spec("addresses")),
            ("SEEN BY", SeenBy),
        ],
        Kind::Member => &[
            ("HOSTNAME", Spec("hostname")),
            ("MACHINE TYPE", Spec("machineType")),
            ("OS", Spec("operatingSystem")),
            ("ADDRESSES", Spec("addresses")),
        ],
        Kind::AddressStatus => &[("ADDRESS", Spec("address"))],
    }
}

/// The registries of a merged affiliate (`local` for this node), or a raw
/// affiliate's own registry, comma-joined.
fn seen_by(resource: &Resource, metadata: &proto::Metadata) -> String {
    if metadata.namespace == Namespace::ClusterRaw.as_str() {
        return metadata
            .id
            .split_once('/')
            .map_or(String::new(), |(prefix, _)| prefix.to_string());
    }
    let registries: Vec<&str> = resource
        .sources
        .iter()
        .map(|s| s.registry.as_str())
        .collect();
    registries.join(",")
}

fn cell(spec: &Value, key: &str) -> String {
    match spec.get(key) {
        Some(Value::String(s)) => s.clone(),
        // Lists print as JSON, like talosctl's `["10.0.0.1","fd00::1"]`.
        Some(Value::Array(items)) => Value::Array(items.clone()).to_string(),
        Some(Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

/// Rows of cells, aligned into columns separated by three spaces.
fn write_aligned(out: &mut impl Write, rows: &[Vec<String>]) -> Result<()> {
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..width)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(|c| c.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}   ", w = widths[i]));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn table_row(resource: &Resource, kind: Kind) -> Vec<String> {
    let metadata = resource.metadata.clone().unwrap_or_default();
    let spec: Value = serde_json::from_str(&resource.spec_json).unwrap_or(Value::Null);
    let mut row = vec![metadata.id.clone(), metadata.version.to_string()];
    row.extend(columns(kind).iter().map(|(_, column)| match column {
        Column::Spec(key) => cell(&spec, key),
        Column::SeenBy => seen_by(resource, &metadata),
    }));
    row
}

fn header(kind: Kind) -> Vec<String> {
    let mut row = vec!["ID".to_string(), "VERSION".to_string()];
    row.extend(columns(kind).iter().map(|(title, _)| title.to_string()));
    row
}

/// Prints a list of resources of one type.
pub fn print_list(
    out: &mut impl Write,
    kind: Kind,
    format: Format,
    resources: &[Resource],
) -> Result<()> {
    match format {
        Format::Table => {
            let mut rows = vec![header(kind)];
            rows.extend(resources.iter().map(|r| table_row(r, kind)));
            write_aligned(out, &rows)
        }
        Format::Json => {
            for r in resources {
                writeln!(out, "{}", resource_value(r))?;
            }
            Ok(())
        }
        Format::Yaml => {
            for (i, r) in resources.iter().enumerate() {
                if i > 0 {
                    writeln!(out, "---")?;
                }
                write!(out, "{}", serde_norway::to_string(&resource_value(r))?)?;
            }
            Ok(())
        }
    }
}

fn event_name(kind: watch_event::Kind) -> &'static str {
    match kind {
        watch_event::Kind::Created => "created",
        watch_event::Kind::Updated => "updated",
        watch_event::Kind::Destroyed => "destroyed",
    }
}

/// Prints one watch event; tables mark rows `+` created, `*` updated, `-` destroyed.
/// Events arrive one at a time, so table columns are not aligned across rows.
pub fn print_event(
    out: &mut impl Write,
    kind: Kind,
    format: Format,
    event: watch_event::Kind,
    resource: &Resource,
    first: bool,
) -> Result<()> {
    match format {
        Format::Table => {
            let marker = match event {
                watch_event::Kind::Created => "+",
                watch_event::Kind::Updated => "*",
                watch_event::Kind::Destroyed => "-",
            };
            if first {
                let mut head = vec![" ".to_string()];
                head.extend(header(kind));
                writeln!(out, "{}", head.join("   "))?;
            }
            let mut row = vec![marker.to_string()];
            row.extend(table_row(resource, kind));
            writeln!(out, "{}", row.join("   "))?;
        }
        Format::Json => {
            let mut value = resource_value(resource);
            value["event"] = event_name(event).into();
            writeln!(out, "{value}")?;
        }
        Format::Yaml => {
            if !first {
                writeln!(out, "---")?;
            }
            let mut value = resource_value(resource);
            value["event"] = event_name(event).into();
            write!(out, "{}", serde_norway::to_string(&value)?)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// A table, or one JSON object (YAML list item) per plugin.
pub fn print_plugins(
    out: &mut impl Write,
    format: Format,
    plugins: &[proto::Plugin],
) -> Result<()> {
    match format {
        Format::Table => {
            writeln!(
                out,
                "{:<20} {:<10} {:<21} {:>8} {:>9} {:>9}   LAST ERROR / STATUS",
                "NAME", "PREFIX", "STATE", "RESTARTS", "THROTTLED", "PUBLISHED"
            )?;
            for p in plugins {
                let mut note = if p.last_error.is_empty() {
                    p.message.clone()
                } else {
                    p.last_error.clone()
                };
                if !p.public_address.is_empty() {
                    note = format!("[public {}] {note}", p.public_address);
                }
                let state = match p.withdrawn {
                    true => format!("{}, withdrawn", p.state),
                    false => p.state.clone(),
                };
                writeln!(
                    out,
                    "{:<20} {:<10} {:<21} {:>8} {:>9} {:>9}   {}",
                    p.name, p.prefix, state, p.restarts, p.throttled, p.published, note
                )?;
            }
        }
        Format::Json | Format::Yaml => {
            let values: Vec<serde_json::Value> = plugins
                .iter()
                .map(|p| {
                    json!({
                        "name": p.name, "prefix": p.prefix, "state": p.state,
                        "restarts": p.restarts, "lastError": p.last_error,
                        "healthy": p.healthy, "message": p.message, "published": p.published,
                        "throttled": p.throttled, "withdrawn": p.withdrawn,
                        "publicAddress": p.public_address,
                    })
                })
                .collect();
            if format == Format::Json {
                for v in values {
                    writeln!(out, "{v}")?;
                }
            } else {
                write!(out, "{}", serde_norway::to_string(&values)?)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::proto::Metadata;

    fn member(id: &str, version: u64, spec: Value) -> Resource {
        Resource {
            metadata: Some(Metadata {
                namespace: "cluster".into(),
                r#type: Kind::Member.type_name().into(),
                id: id.into(),
                version,
                ..Default::default()
            }),
            spec_json: spec.to_string(),
            sources: Vec::new(),
        }
    }

    #[test]
    fn tables_look_like_talosctl() {
        let resources = [
            member(
                "talos-default-controlplane-1",
                2,
                json!({"nodeId": "x", "hostname": "talos-default-controlplane-1", "machineType": "controlplane",
                       "operatingSystem": "Talos (v1.3.0)", "addresses": ["172.20.0.2", "fd83::1"]}),
            ),
            member(
                "w1",
                1,
                json!({"nodeId": "y", "hostname": "w1", "machineType": "worker", "operatingSystem": "Talos (v1.3.0)", "addresses": []}),
            ),
        ];
        let mut out = Vec::new();
        print_list(&mut out, Kind::Member, Format::Table, &resources).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "ID                             VERSION   HOSTNAME                       MACHINE TYPE   OS               ADDRESSES\n\
             talos-default-controlplane-1   2         talos-default-controlplane-1   controlplane   Talos (v1.3.0)   [\"172.20.0.2\",\"fd83::1\"]\n\
             w1                             1         w1                             worker         Talos (v1.3.0)   []\n"
        );
    }

    #[test]
    fn json_is_one_object_per_resource_with_metadata_and_spec() {
        let mut out = Vec::new();
        let resources = [
            member("a", 3, json!({"nodeId": "x"})),
            member("b", 1, json!({"nodeId": "y"})),
        ];
        print_list(&mut out, Kind::Member, Format::Json, &resources).unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[0],
            json!({"metadata": {"namespace": "cluster", "type": "Members.cluster.talos.dev", "id": "a", "version": 3},
                   "spec": {"nodeId": "x"}})
        );
    }

    fn affiliate(namespace: &str, id: &str, sources: &[(&str, &str, &str)]) -> Resource {
        let raw = namespace == "cluster-raw";
        Resource {
            metadata: Some(Metadata {
                namespace: namespace.into(),
                r#type: Kind::Affiliate.type_name().into(),
                id: id.into(),
                version: 1,
                first_seen: if raw { "2026-12-01T10:20:30Z".into() } else { String::new() },
                last_seen: if raw { "2026-12-01T10:25:00Z".into() } else { String::new() },
            }),
            spec_json: json!({"nodeId": "new-id", "hostname": "w1", "machineType": "worker", "addresses": ["10.0.0.1"]})
                .to_string(),
            sources: sources
                .iter()
                .map(|(registry, first_seen, last_seen)| proto::Source {
                    registry: registry.to_string(),
                    first_seen: first_seen.to_string(),
                    last_seen: last_seen.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn affiliates_show_their_sources_beside_the_spec() {
        let merged = affiliate(
            "cluster",
            "new-id",
            &[
                ("k8s", "2026-12-01T10:20:30Z", "2026-12-01T10:25:00Z"),
                ("service", "2026-12-01T10:21:00Z", "2026-12-01T10:25:01Z"),
            ],
        );
        let local = affiliate("cluster", "self-id", &[("local", "", "")]);
        let raw = affiliate("cluster-raw", "service/new-id", &[]);
        let mut out = Vec::new();
        print_list(
            &mut out,
            Kind::Affiliate,
            Format::Json,
            &[merged.clone(), local.clone()],
        )
        .unwrap();
        let lines: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines[0]["sources"],
            json!([
                {"registry": "k8s", "firstSeen": "2026-12-01T10:20:30Z", "lastSeen": "2026-12-01T10:25:00Z"},
                {"registry": "service", "firstSeen": "2026-12-01T10:21:00Z", "lastSeen": "2026-12-01T10:25:01Z"},
            ])
        );
        let keys: Vec<&String> = lines[0].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["metadata", "spec", "sources"]);
        assert_eq!(
            lines[0]["metadata"],
            json!({"namespace": "cluster", "type": "Affiliates.cluster.talos.dev", "id": "new-id", "version": 1})
        );
        assert_eq!(lines[1]["sources"], json!([{"registry": "local"}]));

        let value = resource_value(&raw);
        assert_eq!(value["metadata"]["firstSeen"], "2026-12-01T10:20:30Z");
        assert_eq!(value["metadata"]["lastSeen"], "2026-12-01T10:25:00Z");
        assert!(
            value.get("sources").is_none(),
            "a raw affiliate is its own source"
        );

        let mut out = Vec::new();
        print_list(&mut out, Kind::Affiliate, Format::Table, &[merged, local]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID        VERSION   HOSTNAME   MACHINE TYPE   ADDRESSES      SEEN BY\n\
             new-id    1         w1         worker         [\"10.0.0.1\"]   k8s,service\n\
             self-id   1         w1         worker         [\"10.0.0.1\"]   local\n"
        );
        let mut out = Vec::new();
        print_list(&mut out, Kind::Affiliate, Format::Table, &[raw]).unwrap();
        assert!(String::from_utf8(out).unwrap().ends_with(
            "service/new-id   1         w1         worker         [\"10.0.0.1\"]   service\n"
        ));
    }

    #[test]
    fn yaml_documents_are_separated() {
        let mut out = Vec::new();
        let resources = [
            member("a", 1, json!({"nodeId": "x"})),
            member("b", 1, json!({"nodeId": "y"})),
        ];
        print_list(&mut out, Kind::Member, Format::Yaml, &resources).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("metadata:\n  namespace: cluster\n"), "{text}");
        assert!(text.contains("spec:\n  nodeId: x\n---\n"), "{text}");
    }
}
