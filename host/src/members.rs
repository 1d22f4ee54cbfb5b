//! Affiliates → members, keyed by nodename (reference §9.7), and the control-plane
//! endpoints derived from them.
//!
//! Upstream lets two affiliates with one nodename overwrite each other in random
//! order; here the pick is deterministic (Q15) and the losers are returned, so the
//! caller can warn about them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use crate::specs::{AffiliateSpec, MemberSpec};

/// The members, and every nodename that more than one node ID claimed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Members {
    pub members: BTreeMap<String, MemberSpec>,
    pub duplicates: Vec<DuplicateNodename>,
}

/// Several node IDs claim one nodename, typically a node reinstalled with a new
/// identity while its old affiliate has not expired yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DuplicateNodename {
    pub nodename: String,
    /// The node ID that became the member.
    pub kept: String,
    /// The others, best first.
    pub dropped: Vec<String>,
}

/// Turns every affiliate with a nodename (merged ones and the local one) into a
/// member; KubeSpan data is not part of a member.
///
/// For a nodename claimed more than once the winner is, in order: the local node
/// (`local_node_id`), the node seen by more registries (`sources`, e.g. from
/// `merge::source_counts`), the smallest node ID.
pub fn members<'a>(
    affiliates: impl IntoIterator<Item = &'a AffiliateSpec>,
    local_node_id: &str,
    sources: impl Fn(&str) -> usize,
) -> Members {
    let mut by_name: BTreeMap<&str, Vec<&AffiliateSpec>> = BTreeMap::new();
    for spec in affiliates {
        if !spec.nodename.is_empty() {
            by_name.entry(&spec.nodename).or_default().push(spec);
        }
    }

    let mut result = Members::default();
    for (nodename, mut claims) in by_name {
        // Stable: identical keys (one node ID given twice) keep the caller's order.
        claims.sort_by_cached_key(|spec| {
            (
                spec.node_id != local_node_id,
                std::cmp::Reverse(sources(&spec.node_id)),
                spec.node_id.as_str(),
            )
        });
        let kept = claims[0];
        if claims.len() > 1 {
            result.duplicates.push(DuplicateNodename {
                nodename: nodename.to_owned(),
                kept: kept.node_id.clone(),
                dropped: claims[1..].iter().map(|s| s.node_id.clone()).collect(),
            });
        }
        result.members.insert(nodename.to_owned(), member(kept));
    }
    result
}

/// The addresses of `init` and `controlplane` members, IPv4 before IPv6 and then in
/// numeric order, without the duplicates upstream keeps (Q17).
pub fn control_plane_endpoints<'a>(
    members: impl IntoIterator<Item = &'a MemberSpec>,
) -> Vec<IpAddr> {
    let mut addresses: Vec<IpAddr> = members
        .into_iter()
        .filter(|m| m.machine_type.is_control_plane())
        .flat_map(|m| m.addresses.iter().copied())
        .collect();
    // `IpAddr`'s order is exactly that: every V4 before every V6, then by value.
    addresses.sort_unstable();
    addresses.dedup();
    addresses
}

fn member(spec: &AffiliateSpec) -> MemberSpec {
    MemberSpec {
        node_id: spec.node_id.clone(),
        addresses: spec.addresses.clone(),
        hostname: spec.hostname.clone(),
        machine_type: spec.machine_type,
        operating_system: spec.operating_system.clone(),
        control_plane: spec.control_plane,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::specs::{ControlPlaneSpec, KubeSpanSpec, MachineType};

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn affiliate(node_id: &str, nodename: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            nodename: nodename.into(),
            hostname: format!("{nodename}.example"),
            ..Default::default()
        }
    }

    fn no_sources(_: &str) -> usize {
        0
    }

    #[test]
    fn affiliates_with_a_nodename_become_members() {
        let full = AffiliateSpec {
            node_id: "id1".into(),
            addresses: ips(&["10.0.0.1"]),
            hostname: "cp1.example".into(),
            nodename: "cp1".into(),
            operating_system: "Talos (v1.12.0)".into(),
            machine_type: MachineType::Controlplane,
            kubespan: Some(KubeSpanSpec {
                public_key: "key".into(),
                ..Default::default()
            }),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
        };
        let nameless = affiliate("id2", "");
        let result = members([&full, &nameless], "local", no_sources);
        assert_eq!(result.members.len(), 1);
        assert_eq!(
            result.members["cp1"],
            MemberSpec {
                node_id: "id1".into(),
                addresses: ips(&["10.0.0.1"]),
                hostname: "cp1.example".into(),
                machine_type: MachineType::Controlplane,
                operating_system: "Talos (v1.12.0)".into(),
                control_plane: Some(ControlPlaneSpec { port: 6443 }),
            }
        );
        assert!(result.duplicates.is_empty());
    }

    #[test]
    fn the_local_affiliate_wins_a_duplicate_nodename() {
        let old = affiliate("aaa-old", "n1");
        let local = affiliate("zzz-local", "n1");
        // The old identity is seen by more registries and sorts first, yet loses.
        let result = members([&old, &local], "zzz-local", |id| {
            if id == "aaa-old" { 3 } else { 0 }
        });
        assert_eq!(result.members["n1"].node_id, "zzz-local");
        assert_eq!(
            result.duplicates,
            vec![DuplicateNodename {
                nodename: "n1".into(),
                kept: "zzz-local".into(),
                dropped: vec!["aaa-old".into()],
            }]
        );
    }

    #[test]
    fn more_registries_win_next() {
        let counts = HashMap::from([("aaa".to_owned(), 1), ("bbb".to_owned(), 2)]);
        let a = affiliate("aaa", "n1");
        let b = affiliate("bbb", "n1");
        for order in [[&a, &b], [&b, &a]] {
            let result = members(order, "local", |id| counts.get(id).copied().unwrap_or(0));
            assert_eq!(result.members["n1"].node_id, "bbb");
            assert_eq!(result.duplicates[0].dropped, ["aaa"]);
        }
    }

    #[test]
    fn the_smallest_node_id_wins_last() {
        let a = affiliate("aaa", "n1");
        let b = affiliate("bbb", "n1");
        let c = affiliate("ccc", "n1");
        let other = affiliate("ddd", "n2");
        for order in [[&c, &a, &b, &other], [&other, &b, &c, &a]] {
            let result = members(order, "local", |_| 2);
            assert_eq!(result.members["n1"].node_id, "aaa");
            assert_eq!(result.members["n2"].node_id, "ddd");
            assert_eq!(
                result.duplicates,
                vec![DuplicateNodename {
                    nodename: "n1".into(),
                    kept: "aaa".into(),
                    dropped: vec!["bbb".into(), "ccc".into()],
                }]
            );
        }
    }

    /// Talos's endpoint test (§11), plus a worker that must not count and an
    /// address two members share.
    #[test]
    fn control_plane_endpoints_are_sorted_and_unique() {
        let member = |machine_type, addresses: &[&str]| MemberSpec {
            machine_type,
            addresses: ips(addresses),
            ..Default::default()
        };
        let list = [
            member(
                MachineType::Controlplane,
                &["fd50:8d60:4238:6302:f857:23ff:fe21:d1e1", "172.20.0.3"],
            ),
            member(
                MachineType::Worker,
                &["172.20.0.4", "fd50:8d60:4238:6302:f857:23ff:fe21:d1e2"],
            ),
            member(
                MachineType::Init,
                &["172.20.0.2", "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0"],
            ),
            member(MachineType::Controlplane, &["172.20.0.3"]),
            member(MachineType::Unknown, &["172.20.0.1"]),
        ];
        assert_eq!(
            control_plane_endpoints(&list),
            ips(&[
                "172.20.0.2",
                "172.20.0.3",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0",
                "fd50:8d60:4238:6302:f857:23ff:fe21:d1e1",
            ])
        );
        // Numeric, not textual: 10.0.0.9 before 10.0.0.10, and any v4 before v6.
        let list = [member(
            MachineType::Controlplane,
            &["::1", "10.0.0.10", "10.0.0.9"],
        )];
        assert_eq!(
            control_plane_endpoints(&list),
            ips(&["10.0.0.9", "10.0.0.10", "::1"])
        );
    }
}
