//! Raw affiliates (one per registry and node) → one merged affiliate per node,
//! with Talos's rules (reference §9.7) and one fix: the operating system merges like
//! the hostname (Q14).
//!
//! A pure function of its input, so the caller recomputes it on every change of the
//! raw store; it has to stay fast for clusters of thousands of nodes.

use std::collections::{BTreeMap, HashSet};
use std::hash::Hash;

use crate::specs::{AffiliateSpec, KubeSpanSpec, MachineType};

/// Up to this many comparisons a linear scan beats building a hash set.
const LINEAR_UNION_MAX: usize = 256;

/// Merges raw affiliates, given as `(resource id, spec)`, into one affiliate per
/// node ID.
///
/// Raw affiliates are taken in resource-ID order, so every `k8s/…` comes before
/// every `service/…` whatever order the store lists them in, then grouped by
/// `spec.node_id` (not by the ID's suffix): the first of a group is the base and the
/// others merge into it in order. Affiliates with an empty node ID are skipped, as
/// no resource can have an empty ID.
pub fn merge<'a>(
    raw: impl IntoIterator<Item = (&'a str, &'a AffiliateSpec)>,
) -> BTreeMap<String, AffiliateSpec> {
    let mut sorted: Vec<_> = raw
        .into_iter()
        .filter(|(_, spec)| !spec.node_id.is_empty())
        .collect();
    // Each node's views end up side by side, in resource-ID order. Stable, so equal
    // IDs (which a store never holds) keep the caller's order.
    sorted.sort_by(|(a_id, a), (b_id, b)| a.node_id.cmp(&b.node_id).then(a_id.cmp(b_id)));

    let mut merged: Vec<AffiliateSpec> = Vec::new();
    for (_, spec) in sorted {
        match merged.last_mut() {
            Some(base) if base.node_id == spec.node_id => merge_into(base, spec),
            _ => merged.push(spec.clone()),
        }
    }
    // Already in key order, so the map is built in one pass.
    merged
        .into_iter()
        .map(|spec| (spec.node_id.clone(), spec))
        .collect()
}

/// Merges `other` into `base`: non-empty scalars replace, lists are unioned in
/// order (`AffiliateSpec.Merge` in Talos, plus Q14).
pub fn merge_into(base: &mut AffiliateSpec, other: &AffiliateSpec) {
    union(&mut base.addresses, &other.addresses);
    replace_if_set(&mut base.hostname, &other.hostname);
    replace_if_set(&mut base.nodename, &other.nodename);
    replace_if_set(&mut base.operating_system, &other.operating_system);
    if other.machine_type != MachineType::Unknown {
        base.machine_type = other.machine_type;
    }
    if other.control_plane.is_some() {
        base.control_plane = other.control_plane;
    }
    if let Some(kubespan) = &other.kubespan {
        merge_kubespan(base.kubespan.get_or_insert_default(), kubespan);
    }
}

fn merge_kubespan(base: &mut KubeSpanSpec, other: &KubeSpanSpec) {
    replace_if_set(&mut base.public_key, &other.public_key);
    if other.address.is_some() {
        base.address = other.address;
    }
    union(&mut base.additional_addresses, &other.additional_addresses);
    union(&mut base.endpoints, &other.endpoints);
    union(
        &mut base.exclude_advertised_networks,
        &other.exclude_advertised_networks,
    );
}

fn replace_if_set(base: &mut String, other: &str) {
    if !other.is_empty() {
        base.clear();
        base.push_str(other);
    }
}

/// Appends the items of `other` not yet in `base`, keeping both orders (no sort).
/// Duplicates inside `other` are appended once; ones already inside `base` stay.
fn union<T: Copy + Eq + Hash>(base: &mut Vec<T>, other: &[T]) {
    if (base.len() + other.len()) * other.len() <= LINEAR_UNION_MAX {
        for item in other {
            if !base.contains(item) {
                base.push(*item);
            }
        }
    } else {
        let mut seen: HashSet<T> = base.iter().copied().collect();
        base.extend(other.iter().filter(|item| seen.insert(**item)));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};

    use super::*;
    use crate::specs::{ControlPlaneSpec, IpPrefix};

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn eps(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn prefixes(list: &[&str]) -> Vec<IpPrefix> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    const NODE: &str = "fJ8ex8zFsgdKp6BwCdhGRlfLFdM7DUYJx7ZcB7rZbGZ";
    const KEY: &str = "PLPNBddmTgHJhOw0vcifFtBk8dAwN9d1TJbRMOqDa0=";
    const KS_ADDR: &str = "fd50:8d60:4238:6302:f857:23ff:fe21:d1e0";

    /// `TestAffiliateSpec_Merge` "zero": merging two empty specs changes nothing.
    #[test]
    fn merge_zero() {
        let mut a = AffiliateSpec::default();
        merge_into(&mut a, &AffiliateSpec::default());
        assert_eq!(a, AffiliateSpec::default());
    }

    /// "merge kubespan": two full views of one node; lists are unioned in order.
    #[test]
    fn merge_kubespan_views() {
        let kubespan = |endpoints: &[&str]| KubeSpanSpec {
            public_key: KEY.into(),
            address: Some(KS_ADDR.parse().unwrap()),
            additional_addresses: prefixes(&["10.244.3.1/24"]),
            endpoints: eps(endpoints),
            exclude_advertised_networks: vec![],
        };
        let spec = |addresses: &[&str], endpoints: &[&str]| AffiliateSpec {
            node_id: NODE.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            machine_type: MachineType::Controlplane,
            addresses: ips(addresses),
            kubespan: Some(kubespan(endpoints)),
            ..Default::default()
        };
        let mut a = spec(&["10.0.0.2"], &["10.0.0.2:51820", "192.168.3.4:51820"]);
        let b = spec(
            &["10.0.0.2", "192.168.3.4"],
            &["192.168.3.4:51820", "10.0.0.2:51820", "10.0.0.3:51820"],
        );
        merge_into(&mut a, &b);
        assert_eq!(
            a,
            spec(
                &["10.0.0.2", "192.168.3.4"],
                &["10.0.0.2:51820", "192.168.3.4:51820", "10.0.0.3:51820"]
            )
        );
    }

    /// "merge mixed": a Kubernetes view (no KubeSpan data of its own) and a service
    /// view; empty and unknown values never overwrite.
    #[test]
    fn merge_mixed_views() {
        let mut k8s = AffiliateSpec {
            node_id: NODE.into(),
            hostname: "foo.com".into(),
            nodename: "bar".into(),
            operating_system: "Talos (v1.12.0)".into(),
            machine_type: MachineType::Controlplane,
            addresses: ips(&["192.168.3.4"]),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
            kubespan: Some(KubeSpanSpec {
                public_key: KEY.into(),
                endpoints: eps(&["192.168.3.4:51820"]),
                ..Default::default()
            }),
        };
        let service = AffiliateSpec {
            node_id: NODE.into(),
            hostname: String::new(),
            nodename: "bar-2".into(),
            operating_system: "Talos (v1.12.1)".into(),
            machine_type: MachineType::Unknown,
            addresses: ips(&["10.0.0.2", "192.168.3.4"]),
            control_plane: None,
            kubespan: Some(KubeSpanSpec {
                public_key: String::new(),
                address: Some(KS_ADDR.parse().unwrap()),
                additional_addresses: prefixes(&["10.244.3.1/24"]),
                endpoints: eps(&["10.0.0.2:51820", "192.168.3.4:51820"]),
                exclude_advertised_networks: prefixes(&["0.0.0.0/0", "::/0"]),
            }),
        };
        merge_into(&mut k8s, &service);
        assert_eq!(
            k8s,
            AffiliateSpec {
                node_id: NODE.into(),
                hostname: "foo.com".into(),
                nodename: "bar-2".into(),
                // Q14: a non-empty OS replaces, like the hostname.
                operating_system: "Talos (v1.12.1)".into(),
                machine_type: MachineType::Controlplane,
                addresses: ips(&["192.168.3.4", "10.0.0.2"]),
                control_plane: Some(ControlPlaneSpec { port: 6443 }),
                kubespan: Some(KubeSpanSpec {
                    public_key: KEY.into(),
                    address: Some(KS_ADDR.parse().unwrap()),
                    additional_addresses: prefixes(&["10.244.3.1/24"]),
                    // §9.7's example.
                    endpoints: eps(&["192.168.3.4:51820", "10.0.0.2:51820"]),
                    exclude_advertised_networks: prefixes(&["0.0.0.0/0", "::/0"]),
                }),
            }
        );

        // A view without KubeSpan leaves the base's alone; a view with KubeSpan
        // gives a base without one its data.
        let before = k8s.clone();
        merge_into(&mut k8s, &AffiliateSpec::default());
        assert_eq!(k8s, before);
        let mut bare = AffiliateSpec::default();
        merge_into(&mut bare, &before);
        assert_eq!(bare.kubespan, before.kubespan);
    }

    #[test]
    fn groups_by_node_id_in_resource_id_order() {
        let view = |node: &str, host: &str, os: &str| AffiliateSpec {
            node_id: node.into(),
            hostname: host.into(),
            operating_system: os.into(),
            ..Default::default()
        };
        let service_a = view("a", "from-service", "");
        let k8s_a = view("a", "from-k8s", "Talos (k8s)");
        // The resource ID's suffix doesn't matter, only spec.node_id.
        let odd_a = view("a", "", "Talos (static)");
        let service_b = view("b", "b-host", "");
        let no_id = view("", "ghost", "");

        // Listed in an order where service/ precedes k8s/: sorting must fix it.
        let merged = merge([
            ("service/a", &service_a),
            ("static/zzz", &odd_a),
            ("service/b", &service_b),
            ("k8s/a", &k8s_a),
            ("service/", &no_id),
        ]);
        assert_eq!(merged.keys().collect::<Vec<_>>(), ["a", "b"]);
        // k8s/a is the base, service/a then static/zzz merge in.
        assert_eq!(merged["a"].hostname, "from-service");
        assert_eq!(merged["a"].operating_system, "Talos (static)");
        assert_eq!(merged["b"], service_b);
    }

    #[test]
    fn long_unions_match_the_linear_rule() {
        let addr = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let mut base: Vec<IpAddr> = (0..300).map(addr).collect();
        // Overlaps the base, repeats itself, and brings 100 new ones.
        let other: Vec<IpAddr> = (200..400).chain(350..400).map(addr).collect();
        let mut linear = base.clone();
        for item in &other {
            if !linear.contains(item) {
                linear.push(*item);
            }
        }
        union(&mut base, &other);
        assert_eq!(base, linear);
        assert_eq!(base.len(), 400);
    }

    /// The budget: 5000 raw affiliates (about 1667 nodes seen by 3 registries)
    /// merge in 5 ms in a release build.
    #[test]
    fn merges_5000_raw_affiliates_from_3_registries() {
        let registries = ["k8s", "service", "static"];
        let raw: Vec<(String, AffiliateSpec)> = (0..5000u32)
            .map(|i| {
                let node = i / 3;
                let registry = registries[(i % 3) as usize];
                let spec = AffiliateSpec {
                    node_id: format!("node-{node:05}"),
                    hostname: format!("host-{node}"),
                    nodename: format!("node-{node}"),
                    operating_system: "Talos (v1.12.0)".into(),
                    machine_type: MachineType::Worker,
                    addresses: vec![
                        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + node)),
                        IpAddr::V4(Ipv4Addr::from(0xac10_0000 + i)),
                    ],
                    kubespan: Some(KubeSpanSpec {
                        public_key: format!("key-{node}"),
                        endpoints: vec![SocketAddr::new(
                            IpAddr::V4(Ipv4Addr::from(0xc0a8_0000 + i)),
                            51820,
                        )],
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                (format!("{registry}/node-{node:05}"), spec)
            })
            .collect();

        // Its speed is measured by `cargo bench -p discoveryd`, not here.
        let merged = merge(raw.iter().map(|(id, spec)| (id.as_str(), spec)));
        assert_eq!(merged.len(), 1667);
        let first = &merged["node-00000"];
        assert_eq!(first.addresses.len(), 4);
        assert_eq!(first.kubespan.as_ref().unwrap().endpoints.len(), 3);
    }
}
