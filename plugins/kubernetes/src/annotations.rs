//! Talos's Kubernetes registry format (reference §9.5, §9.6): a node's affiliate
//! as eight annotations on its Node, and the reverse, from a Node's annotations,
//! labels and status. Pure functions, checked against Talos's test vectors.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use discovery_sdk::kube::Node;
use discovery_sdk::{
    Affiliate, ControlPlane, Endpoint, IpAddress, IpPrefix, Kubespan, MachineType,
};

pub const NODE_ID: &str = "cluster.talos.dev/node-id";
pub const SELF_IPS: &str = "networking.talos.dev/self-ips";
pub const API_SERVER_PORT: &str = "networking.talos.dev/api-server-port";
pub const KUBESPAN_IP: &str = "networking.talos.dev/kubespan-ip";
pub const KUBESPAN_PUBLIC_KEY: &str = "networking.talos.dev/kubespan-public-key";
pub const ASSIGNED_PREFIXES: &str = "networking.talos.dev/assigned-prefixes";
pub const KUBESPAN_ENDPOINTS: &str = "networking.talos.dev/kubespan-endpoints";
pub const EXCLUDE_ADVERTISED: &str = "networking.talos.dev/kubespan-exclude-advertised-networks";

/// The annotations this registry owns on a Node.
pub const KEYS: [&str; 8] = [
    NODE_ID,
    SELF_IPS,
    API_SERVER_PORT,
    KUBESPAN_IP,
    KUBESPAN_PUBLIC_KEY,
    ASSIGNED_PREFIXES,
    KUBESPAN_ENDPOINTS,
    EXCLUDE_ADVERTISED,
];

const LABEL_CONTROL_PLANE: &str = "node-role.kubernetes.io/control-plane";
const LABEL_MASTER: &str = "node-role.kubernetes.io/master";

/// Talos's `AnnotationsFromAffiliate`: every key, an empty value where the
/// affiliate has nothing (an empty value means "delete the key").
pub fn from_affiliate(a: &Affiliate) -> BTreeMap<&'static str, String> {
    let join = |items: Vec<String>| items.join(",");
    let kubespan = a.kubespan.as_ref();
    BTreeMap::from([
        (NODE_ID, a.node_id.clone()),
        (
            SELF_IPS,
            join(a.addresses.iter().map(ToString::to_string).collect()),
        ),
        (
            API_SERVER_PORT,
            a.control_plane
                .map(|cp| cp.api_server_port.to_string())
                .unwrap_or_default(),
        ),
        (
            KUBESPAN_IP,
            kubespan
                .and_then(|k| k.address)
                .map(|ip| ip.to_string())
                .unwrap_or_default(),
        ),
        (
            KUBESPAN_PUBLIC_KEY,
            kubespan.map(|k| k.public_key.clone()).unwrap_or_default(),
        ),
        (
            ASSIGNED_PREFIXES,
            join(kubespan.map_or(vec![], |k| {
                k.additional_addresses
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })),
        ),
        (
            KUBESPAN_ENDPOINTS,
            join(kubespan.map_or(vec![], |k| {
                k.endpoints.iter().map(ToString::to_string).collect()
            })),
        ),
        (
            EXCLUDE_ADVERTISED,
            join(kubespan.map_or(vec![], |k| {
                k.exclude_advertised_networks
                    .iter()
                    .map(ToString::to_string)
                    .collect()
            })),
        ),
    ])
}

/// The patch that makes `current` annotations carry `desired`, touching only
/// this registry's keys (`None` deletes); empty when nothing would change.
pub fn changes(
    current: &[(String, String)],
    desired: &BTreeMap<&'static str, String>,
) -> Vec<(String, Option<String>)> {
    let now = |key: &str| {
        current
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    };
    desired
        .iter()
        .filter_map(|(key, value)| match (now(key), value.is_empty()) {
            (None, true) => None,
            (Some(_), true) => Some((key.to_string(), None)),
            (Some(v), false) if v == value => None,
            _ => Some((key.to_string(), Some(value.clone()))),
        })
        .collect()
}

/// Talos's `AffiliateFromNode`: `None` for a Node without a node ID. Items that do
/// not parse are dropped and named in the second value, so the caller can log
/// them.
pub fn to_affiliate(node: &Node) -> Option<(Affiliate, Vec<String>)> {
    let node_id = node.annotation(NODE_ID)?.to_string();
    let mut dropped = Vec::new();
    let value = |key: &str| node.annotation(key).unwrap_or_default();
    let addresses: Vec<IpAddress> = parse_list(SELF_IPS, value(SELF_IPS), &mut dropped)
        .into_iter()
        .map(|ip: IpAddr| ip.into())
        .collect();
    let hostname = node
        .addresses
        .iter()
        .find(|(kind, _)| kind == "Hostname")
        .map(|(_, address)| address.clone())
        .unwrap_or_default();
    let machine_type =
        if node.label(LABEL_CONTROL_PLANE).is_some() || node.label(LABEL_MASTER).is_some() {
            MachineType::Controlplane
        } else {
            MachineType::Worker
        };
    let has_kubespan = [
        KUBESPAN_PUBLIC_KEY,
        KUBESPAN_IP,
        ASSIGNED_PREFIXES,
        KUBESPAN_ENDPOINTS,
        EXCLUDE_ADVERTISED,
    ]
    .iter()
    .any(|key| node.annotation(key).is_some_and(|v| !v.is_empty()));
    let kubespan = has_kubespan.then(|| {
        let address = node.annotation(KUBESPAN_IP).and_then(|v| {
            let parsed = v.parse::<IpAddr>().ok();
            if parsed.is_none() && !v.is_empty() {
                dropped.push(format!("{KUBESPAN_IP}: {v:?}"));
            }
            parsed
        });
        let additional_addresses: Vec<IpPrefix> =
            parse_list(ASSIGNED_PREFIXES, value(ASSIGNED_PREFIXES), &mut dropped);
        let endpoints: Vec<Endpoint> =
            parse_list(KUBESPAN_ENDPOINTS, value(KUBESPAN_ENDPOINTS), &mut dropped)
                .into_iter()
                .map(|e: SocketAddr| Endpoint {
                    address: e.ip().into(),
                    port: e.port(),
                })
                .collect();
        let exclude_advertised_networks: Vec<IpPrefix> =
            parse_list(EXCLUDE_ADVERTISED, value(EXCLUDE_ADVERTISED), &mut dropped);
        Kubespan {
            public_key: node
                .annotation(KUBESPAN_PUBLIC_KEY)
                .unwrap_or_default()
                .to_string(),
            address: address.map(Into::into),
            additional_addresses,
            endpoints,
            exclude_advertised_networks,
        }
    });
    let control_plane = node
        .annotation(API_SERVER_PORT)
        .and_then(|v| v.parse::<u16>().ok())
        .map(|api_server_port| ControlPlane { api_server_port });
    let affiliate = Affiliate {
        node_id,
        hostname,
        nodename: node.name.clone(),
        machine_type,
        operating_system: node.os_image.clone(),
        addresses,
        kubespan,
        control_plane,
    };
    Some((affiliate, dropped))
}

/// A comma-separated annotation value, each item parsed; items that do not parse
/// are named in `dropped`.
fn parse_list<T: std::str::FromStr>(key: &str, value: &str, dropped: &mut Vec<String>) -> Vec<T> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .filter_map(|item| {
            let parsed = item.parse().ok();
            if parsed.is_none() {
                dropped.push(format!("{key}: {item:?}"));
            }
            parsed
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "29QQTc97U5ZyFTIX33Dp9NqtwxqQI8QI13scCLzffrZ";
    const KEY: &str = "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=";
    const KS_IP: &str = "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0";

    fn affiliate() -> Affiliate {
        Affiliate {
            node_id: String::new(),
            hostname: String::new(),
            nodename: String::new(),
            machine_type: MachineType::Unknown,
            operating_system: String::new(),
            addresses: vec![],
            kubespan: None,
            control_plane: None,
        }
    }

    fn expected(pairs: &[(&'static str, &str)]) -> BTreeMap<&'static str, String> {
        let mut map: BTreeMap<&'static str, String> =
            KEYS.iter().map(|k| (*k, String::new())).collect();
        for (k, v) in pairs {
            map.insert(*k, v.to_string());
        }
        map
    }

    /// Talos's `TestAnnotationsFromAffiliate` (with the newer eighth key,
    /// exclude-advertised-networks, empty in each case).
    #[test]
    fn annotations_from_affiliate_talos_vectors() {
        assert_eq!(from_affiliate(&affiliate()), expected(&[]), "zero");
        let mixed = Affiliate {
            node_id: ID.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            machine_type: MachineType::Controlplane,
            addresses: vec!["10.0.0.2".parse().unwrap(), "192.168.3.4".parse().unwrap()],
            kubespan: Some(Kubespan {
                public_key: KEY.into(),
                address: Some(KS_IP.parse().unwrap()),
                additional_addresses: vec!["10.244.3.1/24".parse().unwrap()],
                endpoints: vec![
                    "10.0.0.2:51820".parse().unwrap(),
                    "192.168.3.4:51820".parse().unwrap(),
                ],
                exclude_advertised_networks: vec![],
            }),
            ..affiliate()
        };
        assert_eq!(
            from_affiliate(&mixed),
            expected(&[
                (NODE_ID, ID),
                (ASSIGNED_PREFIXES, "10.244.3.1/24"),
                (KUBESPAN_ENDPOINTS, "10.0.0.2:51820,192.168.3.4:51820"),
                (KUBESPAN_IP, KS_IP),
                (KUBESPAN_PUBLIC_KEY, KEY),
                (SELF_IPS, "10.0.0.2,192.168.3.4"),
            ]),
            "mixed"
        );
        let controlplane = Affiliate {
            node_id: ID.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            machine_type: MachineType::Controlplane,
            addresses: vec!["10.0.0.2".parse().unwrap(), "192.168.3.4".parse().unwrap()],
            control_plane: Some(ControlPlane {
                api_server_port: 443,
            }),
            ..affiliate()
        };
        assert_eq!(
            from_affiliate(&controlplane),
            expected(&[
                (NODE_ID, ID),
                (API_SERVER_PORT, "443"),
                (SELF_IPS, "10.0.0.2,192.168.3.4"),
            ]),
            "controlplane"
        );
    }

    fn node(name: &str, annotations: &[(&str, &str)], control_plane: bool) -> Node {
        Node {
            name: name.into(),
            resource_version: "1".into(),
            labels: if control_plane {
                vec![(LABEL_CONTROL_PLANE.into(), String::new())]
            } else {
                vec![]
            },
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            addresses: vec![("Hostname".into(), "foo.com".into())],
            os_image: "Talos (v1.0.0)".into(),
        }
    }

    /// Talos's `TestAffiliateFromNode`: no annotations, discovered, controlplane.
    #[test]
    fn affiliate_from_node_talos_vectors() {
        assert_eq!(
            to_affiliate(&node("worker-1", &[], false)),
            None,
            "no annotations"
        );
        let (discovered, dropped) = to_affiliate(&node(
            "bar",
            &[
                (NODE_ID, ID),
                (ASSIGNED_PREFIXES, "10.244.3.1/24"),
                (KUBESPAN_ENDPOINTS, "10.0.0.2:51820,192.168.3.4:51820"),
                (KUBESPAN_IP, KS_IP),
                (KUBESPAN_PUBLIC_KEY, KEY),
                (SELF_IPS, "10.0.0.2,192.168.3.4"),
            ],
            true,
        ))
        .unwrap();
        assert!(dropped.is_empty());
        assert_eq!(
            discovered,
            Affiliate {
                node_id: ID.into(),
                hostname: "foo.com".into(),
                nodename: "bar".into(),
                machine_type: MachineType::Controlplane,
                operating_system: "Talos (v1.0.0)".into(),
                addresses: vec!["10.0.0.2".parse().unwrap(), "192.168.3.4".parse().unwrap()],
                kubespan: Some(Kubespan {
                    public_key: KEY.into(),
                    address: Some(KS_IP.parse().unwrap()),
                    additional_addresses: vec!["10.244.3.1/24".parse().unwrap()],
                    endpoints: vec![
                        "10.0.0.2:51820".parse().unwrap(),
                        "192.168.3.4:51820".parse().unwrap()
                    ],
                    exclude_advertised_networks: vec![],
                }),
                control_plane: None,
            },
            "discovered"
        );
        let (controlplane, _) = to_affiliate(&node(
            "bar",
            &[
                (NODE_ID, ID),
                (API_SERVER_PORT, "6443"),
                (SELF_IPS, "10.0.0.2,192.168.3.4"),
            ],
            true,
        ))
        .unwrap();
        assert_eq!(
            controlplane.control_plane,
            Some(ControlPlane {
                api_server_port: 6443
            })
        );
        assert_eq!(controlplane.kubespan, None);
        assert_eq!(controlplane.machine_type, MachineType::Controlplane);
    }

    #[test]
    fn bad_items_are_dropped_and_named() {
        let (affiliate, dropped) = to_affiliate(&node(
            "w",
            &[
                (NODE_ID, "x"),
                (SELF_IPS, "10.0.0.1,bogus, ,fd00::1"),
                (KUBESPAN_ENDPOINTS, "1.2.3.4:5,nope"),
            ],
            false,
        ))
        .unwrap();
        assert_eq!(affiliate.addresses.len(), 2);
        assert_eq!(affiliate.machine_type, MachineType::Worker);
        assert_eq!(affiliate.kubespan.unwrap().endpoints.len(), 1);
        assert_eq!(
            dropped,
            [
                format!("{SELF_IPS}: \"bogus\""),
                format!("{KUBESPAN_ENDPOINTS}: \"nope\""),
            ]
        );
    }

    #[test]
    fn patches_touch_only_what_differs() {
        let desired = expected(&[(NODE_ID, "a"), (SELF_IPS, "10.0.0.1")]);
        let current = vec![
            (NODE_ID.to_string(), "a".to_string()),
            (KUBESPAN_IP.to_string(), "fd00::1".to_string()),
            ("other/annotation".to_string(), "kept".to_string()),
        ];
        assert_eq!(
            changes(&current, &desired),
            [
                (KUBESPAN_IP.to_string(), None),
                (SELF_IPS.to_string(), Some("10.0.0.1".to_string())),
            ]
        );
        let applied = vec![
            (NODE_ID.to_string(), "a".to_string()),
            (SELF_IPS.to_string(), "10.0.0.1".to_string()),
        ];
        assert!(changes(&applied, &desired).is_empty(), "nothing to send");
    }
}
