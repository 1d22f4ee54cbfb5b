//! Affiliates → members, keyed by nodename (reference §9.7), and the control-plane
//! endpoints derived from them.
//!
//! Upstream lets two affiliates with one nodename overwrite each other in random
//! order; here the pick is deterministic (Q15, revised for reinstalled nodes) and
//! the losers are returned, so the caller can warn about them.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::SystemTime;

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

/// What the registries say about one node ID: the tie-breakers between nodes that
/// claim one nodename.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sighting {
    /// The earliest first-seen over its raw affiliates; `None` if no registry
    /// reports it.
    pub first_seen: Option<SystemTime>,
    /// How many registries report it.
    pub registries: usize,
}

/// The sighting of each node ID, from its raw affiliates and their first-seen.
pub fn sightings<'a>(
    raw: impl IntoIterator<Item = (&'a AffiliateSpec, SystemTime)>,
) -> HashMap<String, Sighting> {
    let mut by_node: HashMap<String, Sighting> = HashMap::new();
    for (spec, first_seen) in raw {
        let sighting = by_node.entry(spec.node_id.clone()).or_default();
        sighting.registries += 1;
        sighting.first_seen = Some(
            sighting
                .first_seen
                .map_or(first_seen, |t| t.min(first_seen)),
        );
    }
    by_node
}

/// Turns every affiliate with a nodename (merged ones and the local one) into a
/// member; KubeSpan data is not part of a member.
///
/// For a nodename claimed more than once the winner is, in order:
/// 1. the local node (`local_node_id`);
/// 2. the node *first seen most recently* (`sighting`, e.g. from `sightings`): a
///    node reinstalled with a new identity announces its old nodename while the
///    old identity lingers in the registries until it expires, and the newer
///    identity is the live one;
/// 3. the node seen by more registries;
/// 4. the smallest node ID.
///
/// A node no registry reports (`first_seen: None`) counts as seen longest ago.
pub fn members<'a>(
    affiliates: impl IntoIterator<Item = &'a AffiliateSpec>,
    local_node_id: &str,
    sighting: impl Fn(&str) -> Sighting,
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
            let seen = sighting(&spec.node_id);
            (
                spec.node_id != local_node_id,
                std::cmp::Reverse(seen.first_seen),
                std::cmp::Reverse(seen.registries),
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

    fn unseen(_: &str) -> Sighting {
        Sighting::default()
    }

    fn at(seconds: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(seconds)
    }

    fn seen(first_seen: u64, registries: usize) -> Sighting {
        Sighting {
            first_seen: Some(at(first_seen)),
            registries,
        }
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
        let result = members([&full, &nameless], "local", unseen);
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
        // The other identity is seen later, by more registries, and sorts first,
        // yet loses; the local one is reported by no registry at all.
        let result = members([&old, &local], "zzz-local", |id| {
            if id == "aaa-old" {
                seen(500, 3)
            } else {
                unseen(id)
            }
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

    /// The reinstalled node: its new identity was first seen after the old one,
    /// which lingers in more registries and has the smaller ID.
    #[test]
    fn the_identity_first_seen_most_recently_wins_next() {
        let sightings = HashMap::from([
            ("aaa-old".to_owned(), seen(100, 3)),
            ("zzz-new".to_owned(), seen(200, 1)),
            ("mmm-unseen".to_owned(), Sighting::default()),
        ]);
        let old = affiliate("aaa-old", "n1");
        let new = affiliate("zzz-new", "n1");
        let never = affiliate("mmm-unseen", "n1");
        for order in [[&old, &new, &never], [&never, &new, &old]] {
            let result = members(order, "local", |id| sightings[id]);
            assert_eq!(result.members["n1"].node_id, "zzz-new");
            assert_eq!(
                result.duplicates[0].dropped,
                ["aaa-old", "mmm-unseen"],
                "no sighting counts as the oldest"
            );
        }
    }

    #[test]
    fn more_registries_win_after_equal_first_seen() {
        let counts = HashMap::from([("aaa".to_owned(), 1), ("bbb".to_owned(), 2)]);
        let a = affiliate("aaa", "n1");
        let b = affiliate("bbb", "n1");
        for order in [[&a, &b], [&b, &a]] {
            let result = members(order, "local", |id| seen(100, counts[id]));
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
            let result = members(order, "local", |_| seen(100, 2));
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

    #[test]
    fn a_nodes_sighting_is_its_earliest_raw_affiliate_and_their_count() {
        let a = affiliate("a", "n1");
        let b = affiliate("b", "n2");
        let result = sightings([(&a, at(300)), (&b, at(50)), (&a, at(200))]);
        assert_eq!(result["a"], seen(200, 2));
        assert_eq!(result["b"], seen(50, 1));
        assert!(!result.contains_key("c"));
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
