//! The whole file: a list of affiliates, or a map with an `affiliates` list.

use std::collections::HashSet;

use discovery_sdk::Affiliate;
use serde_norway::Value;

use crate::entry::FileAffiliate;

/// The valid entries of a file and a description of each skipped one.
#[derive(Debug, Default)]
pub struct Parsed {
    pub affiliates: Vec<Affiliate>,
    /// How each of `affiliates` is named in the file, as in `entry 2 (nodeId "abc")`.
    pub names: Vec<String>,
    pub skipped: Vec<String>,
}

impl Parsed {
    /// Drops the entry for this node, if listed: the daemon publishes this node
    /// itself, and one file may well be shared by every node.
    pub fn remove_node(&mut self, node_id: &str) {
        if let Some(i) = self.affiliates.iter().position(|a| a.node_id == node_id) {
            self.affiliates.remove(i);
            self.names.remove(i);
        }
    }

    /// Keeps the first `max` entries and reports the rest as skipped.
    pub fn truncate(&mut self, max: usize) {
        if self.affiliates.len() > max {
            let first = &self.names[max];
            let more = self.affiliates.len() - max - 1;
            self.skipped.push(format!(
                "{first} and {more} entries after it: more than {max} affiliates in one file"
            ));
            self.affiliates.truncate(max);
            self.names.truncate(max);
        }
    }
}

/// Parses YAML or JSON (JSON is YAML). An error means the file as a whole is
/// unusable; a bad entry only lands in `skipped`.
pub fn parse(contents: &[u8]) -> Result<Parsed, String> {
    let document: Value =
        serde_norway::from_slice(contents).map_err(|e| format!("not valid YAML or JSON: {e}"))?;
    let entries = match document {
        Value::Null => Vec::new(),
        Value::Sequence(entries) => entries,
        Value::Mapping(mut map) => match map.remove("affiliates") {
            Some(Value::Sequence(entries)) if map.is_empty() => entries,
            Some(Value::Null) if map.is_empty() => Vec::new(),
            _ => return Err("expected a list of affiliates or {affiliates: [...]}".into()),
        },
        _ => return Err("expected a list of affiliates or {affiliates: [...]}".into()),
    };
    let mut parsed = Parsed::default();
    let mut seen = HashSet::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let name = entry_name(index, &entry);
        let result = serde_norway::from_value::<FileAffiliate>(entry)
            .map_err(|e| e.to_string())
            .and_then(FileAffiliate::into_affiliate);
        match result {
            Ok(affiliate) if !seen.insert(affiliate.node_id.clone()) => {
                parsed.skipped.push(format!("{name}: duplicate nodeId"));
            }
            Ok(affiliate) => {
                parsed.affiliates.push(affiliate);
                parsed.names.push(name);
            }
            Err(e) => parsed.skipped.push(format!("{name}: {e}")),
        }
    }
    Ok(parsed)
}

/// `entry 2 (nodeId "abc")`, or just `entry 2` when it has no usable nodeId.
fn entry_name(index: usize, entry: &Value) -> String {
    match entry.get("nodeId").and_then(Value::as_str) {
        Some(id) => format!("entry {index} (nodeId {id:?})"),
        None => format!("entry {index}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use discovery_sdk::MachineType;

    #[test]
    fn reads_a_yaml_list_with_talos_keys() {
        let yaml = br#"
- nodeId: 7x1SuC8Ege5BGXdAfTEff5iQnlWZLfv9h1LGMxA2pYkC
  hostname: worker-1.example
  nodename: worker-1
  machineType: worker
  operatingSystem: Talos (v1.12.0)
  addresses: [10.0.0.2, "2001:db8::2"]
  kubespan:
    publicKey: PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=
    address: fd50:8d60:4238:6302:f857:23ff:fe21:d1e0
    additionalAddresses: [10.244.3.0/24]
    endpoints: ["10.0.0.2:51820", "[2001:db8::2]:51820"]
    excludeAdvertisedNetworks: [0.0.0.0/0]
  controlPlane: {port: 6443}
"#;
        let parsed = parse(yaml).unwrap();
        assert!(parsed.skipped.is_empty(), "{:?}", parsed.skipped);
        let a = &parsed.affiliates[0];
        assert_eq!(a.nodename, "worker-1");
        assert_eq!(a.machine_type, MachineType::Worker);
        assert_eq!(a.addresses.len(), 2);
        let ks = a.kubespan.as_ref().unwrap();
        assert_eq!(ks.endpoints[1].to_string(), "[2001:db8::2]:51820");
        assert_eq!(a.control_plane.unwrap().api_server_port, 6443);
    }

    #[test]
    fn reads_json_with_an_affiliates_key() {
        let json = br#"{"affiliates": [{"nodeId": "a", "nodename": "n1"}]}"#;
        let parsed = parse(json).unwrap();
        assert_eq!(parsed.affiliates.len(), 1);
        assert_eq!(parsed.affiliates[0].machine_type, MachineType::Unknown);
    }

    #[test]
    fn drops_this_node_and_entries_past_the_limit() {
        let yaml: String = (0..5)
            .map(|i| format!("- {{nodeId: n{i}, nodename: n{i}}}\n"))
            .collect();
        let mut parsed = parse(yaml.as_bytes()).unwrap();
        parsed.remove_node("n1");
        parsed.truncate(2);
        let ids: Vec<&str> = parsed
            .affiliates
            .iter()
            .map(|a| a.node_id.as_str())
            .collect();
        assert_eq!(ids, ["n0", "n2"]);
        assert_eq!(
            parsed.names,
            [r#"entry 0 (nodeId "n0")"#, r#"entry 2 (nodeId "n2")"#]
        );
        assert_eq!(
            parsed.skipped,
            [r#"entry 3 (nodeId "n3") and 1 entries after it: more than 2 affiliates in one file"#]
        );
    }

    #[test]
    fn skips_bad_entries_and_names_them() {
        let yaml = br#"
- {nodeId: good, nodename: n1}
- {nodeId: badip, addresses: [10.0.0.300]}
- {nodeId: typo, adresses: [10.0.0.1]}
- {hostname: no-id}
- {nodeId: good, nodename: again}
- {nodeId: weird, machineType: boss}
"#;
        let parsed = parse(yaml).unwrap();
        assert_eq!(parsed.affiliates.len(), 1);
        let skipped = parsed.skipped.join("\n");
        assert!(
            skipped.contains(
                r#"entry 1 (nodeId "badip"): addresses: invalid IP address "10.0.0.300""#
            ),
            "{skipped}"
        );
        assert!(
            skipped.contains(r#"entry 2 (nodeId "typo"): unknown field `adresses`"#),
            "{skipped}"
        );
        assert!(
            skipped.contains("entry 3: missing field `nodeId`"),
            "{skipped}"
        );
        assert!(
            skipped.contains(r#"entry 4 (nodeId "good"): duplicate nodeId"#),
            "{skipped}"
        );
        assert!(
            skipped.contains(r#"machineType "boss" is not one of"#),
            "{skipped}"
        );
    }

    #[test]
    fn an_unparsable_file_is_an_error_not_an_empty_list() {
        assert!(parse(b"- {nodeId: [unclosed").is_err());
        assert!(parse(b"42").is_err());
        assert!(parse(b"").unwrap().affiliates.is_empty());
    }
}
