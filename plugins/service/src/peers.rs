//! The other nodes as the discovery services report them, and one view of them
//! across services: Talos lets two services that report one node overwrite each
//! other in map order (Q16); here services are taken in sorted name order, the
//! first one's affiliate is the node's, and the endpoints are the union of all.

use std::collections::BTreeMap;

use discovery_sdk::{Affiliate, Endpoint};

/// What one service says about one other node.
#[derive(Clone, Debug, PartialEq)]
pub struct Peer {
    pub affiliate: Affiliate,
    /// Its KubeSpan endpoints, in the server's order.
    pub endpoints: Vec<Endpoint>,
}

/// The nodes to publish, from each service's peers (by the server's affiliate
/// ID) in sorted service-name order. Nodes are keyed by the node ID inside the
/// sealed data (reference Q22), as Talos keys them.
pub fn merge<'a>(views: impl IntoIterator<Item = &'a BTreeMap<String, Peer>>) -> Vec<Affiliate> {
    let mut nodes: BTreeMap<&str, (Affiliate, Vec<Endpoint>)> = BTreeMap::new();
    for view in views {
        for peer in view.values() {
            let (_, endpoints) = nodes
                .entry(peer.affiliate.node_id.as_str())
                .or_insert_with(|| (peer.affiliate.clone(), Vec::new()));
            for endpoint in &peer.endpoints {
                if !endpoints.contains(endpoint) {
                    endpoints.push(*endpoint);
                }
            }
        }
    }
    nodes
        .into_values()
        .map(|(mut affiliate, endpoints)| {
            // Talos fills KubeSpan endpoints only for a node that has KubeSpan.
            if let Some(kubespan) = &mut affiliate.kubespan {
                kubespan.endpoints = endpoints;
            }
            affiliate
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use discovery_sdk::{Kubespan, MachineType};

    use super::*;

    fn peer(node_id: &str, hostname: &str, endpoints: &[&str]) -> Peer {
        Peer {
            affiliate: Affiliate {
                node_id: node_id.into(),
                hostname: hostname.into(),
                nodename: hostname.into(),
                machine_type: MachineType::Worker,
                operating_system: String::new(),
                addresses: vec![],
                kubespan: Some(Kubespan {
                    public_key: String::new(),
                    address: None,
                    additional_addresses: vec![],
                    endpoints: vec![],
                    exclude_advertised_networks: vec![],
                }),
                control_plane: None,
            },
            endpoints: endpoints.iter().map(|e| e.parse().unwrap()).collect(),
        }
    }

    #[test]
    fn the_first_service_wins_and_endpoints_are_united() {
        let a = BTreeMap::from([
            ("n1".to_string(), peer("n1", "from-a", &["10.0.0.1:51820"])),
            ("n2".to_string(), peer("n2", "only-a", &[])),
        ]);
        let b = BTreeMap::from([(
            "n1".to_string(),
            peer("n1", "from-b", &["10.0.0.2:51820", "10.0.0.1:51820"]),
        )]);
        let merged = merge([&a, &b]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].hostname, "from-a");
        let endpoints: Vec<String> = merged[0]
            .kubespan
            .as_ref()
            .unwrap()
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(endpoints, ["10.0.0.1:51820", "10.0.0.2:51820"]);
        assert_eq!(merged[1].hostname, "only-a");
    }

    #[test]
    fn nodes_are_keyed_by_the_sealed_node_id() {
        // The server's affiliate ID differs from the node ID inside (Q22).
        let a = BTreeMap::from([("server-id".to_string(), peer("n1", "h", &[]))]);
        assert_eq!(merge([&a])[0].node_id, "n1");
    }
}
