//! Plugin output is untrusted: every affiliate crossing the boundary is checked
//! (sizes, counts, addresses, keys) before it becomes a raw affiliate. Works on
//! our own types, whatever WIT version the plugin was built against.

use std::collections::HashSet;
use std::net::IpAddr;

use crate::limits;
use crate::specs::{AffiliateSpec, KubeSpanSpec, check_node_address};

/// Why the host refused one entry of a publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejection {
    /// Position of the entry in the published list.
    pub index: u32,
    pub node_id: String,
    pub reason: String,
}

/// What a publish comes to.
#[derive(Debug, Default)]
pub struct Published {
    pub accepted: Vec<AffiliateSpec>,
    pub rejected: Vec<Rejection>,
    /// The host memory the accepted entries take ([`footprint`]).
    pub bytes: usize,
}

/// Splits a published list into valid specs and rejections. Each entry comes with
/// the node ID the plugin gave it and its conversion into our types (which fails
/// for values our types cannot hold, such as a /40 IPv4 prefix). Entries for this
/// node's own ID are dropped silently: the local affiliate is the host's own.
/// Accepted entries may take at most `room` bytes of host memory.
pub fn publish(
    entries: impl IntoIterator<Item = (String, Result<AffiliateSpec, String>)>,
    total: usize,
    local_node_id: &str,
    room: usize,
) -> Published {
    let mut out = Published {
        accepted: Vec::with_capacity(total.min(limits::PUBLISH_MAX)),
        ..Published::default()
    };
    let mut seen = HashSet::with_capacity(out.accepted.capacity());
    for (index, (node_id, converted)) in entries.into_iter().enumerate() {
        let reject = |reason: String| Rejection {
            index: index as u32,
            node_id: truncate(&node_id, limits::NODE_ID_MAX + 1),
            reason,
        };
        if index == limits::PUBLISH_MAX {
            // One rejection for the whole overflow, not one per entry: the answer
            // must not grow with whatever a plugin sends.
            out.rejected.push(reject(format!(
                "more than {} affiliates in one publish: this entry and the {} after it were ignored",
                limits::PUBLISH_MAX,
                total.saturating_sub(index + 1)
            )));
            break;
        }
        if node_id == local_node_id {
            continue;
        }
        match converted.and_then(affiliate) {
            Ok(spec) if !seen.insert(spec.node_id.clone()) => out
                .rejected
                .push(reject("duplicate node-id in this publish".into())),
            Ok(spec) if out.bytes + footprint(&spec) > room => {
                out.rejected.push(reject(format!(
                    "the plugin's memory limit counts what the host stores for it, and this \
                     entry does not fit: it and the {} after it were ignored",
                    total.saturating_sub(index + 1)
                )));
                break;
            }
            Ok(spec) => {
                out.bytes += footprint(&spec);
                out.accepted.push(spec);
            }
            Err(reason) => out.rejected.push(reject(reason)),
        }
    }
    out
}

/// Checks one affiliate; the error says which field is wrong.
pub fn affiliate(a: AffiliateSpec) -> Result<AffiliateSpec, String> {
    if a.node_id.is_empty() || a.node_id.len() > limits::NODE_ID_MAX {
        return Err(format!("node-id must be 1..={} bytes", limits::NODE_ID_MAX));
    }
    if !a.node_id.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
        return Err("node-id may hold only printable ASCII other than '/'".into());
    }
    check_text("hostname", &a.hostname, limits::NAME_MAX)?;
    check_text("nodename", &a.nodename, limits::NAME_MAX)?;
    check_text(
        "operating-system",
        &a.operating_system,
        limits::OPERATING_SYSTEM_MAX,
    )?;
    check_count("addresses", a.addresses.len(), limits::ADDRESSES_MAX)?;
    for ip in &a.addresses {
        routable("addresses", *ip)?;
    }
    if let Some(kubespan) = &a.kubespan {
        check_kubespan(kubespan)?;
    }
    if a.control_plane.is_some_and(|cp| cp.port == 0) {
        return Err("control-plane.api-server-port must not be 0".into());
    }
    Ok(a)
}

fn check_kubespan(k: &KubeSpanSpec) -> Result<(), String> {
    if !k.public_key.is_empty() && !limits::is_wireguard_key(&k.public_key) {
        return Err("kubespan.public-key is not a base64 WireGuard key".into());
    }
    check_count(
        "kubespan.additional-addresses",
        k.additional_addresses.len(),
        limits::ADDRESSES_MAX,
    )?;
    check_count(
        "kubespan.exclude-advertised-networks",
        k.exclude_advertised_networks.len(),
        limits::ADDRESSES_MAX,
    )?;
    check_count(
        "kubespan.endpoints",
        k.endpoints.len(),
        limits::ENDPOINTS_MAX,
    )?;
    if let Some(address) = k.address {
        routable("kubespan.address", address)?;
    }
    for endpoint in &k.endpoints {
        if endpoint.port() == 0 {
            return Err("kubespan.endpoints: port 0".to_string());
        }
        routable("kubespan.endpoints", endpoint.ip())?;
    }
    Ok(())
}

fn routable(field: &str, ip: IpAddr) -> Result<IpAddr, String> {
    check_node_address(ip).map_err(|e| format!("{field}: {e}"))
}

fn check_text(field: &str, text: &str, max: usize) -> Result<(), String> {
    if text.len() > max {
        return Err(format!("{field} is longer than {max} bytes"));
    }
    if text.chars().any(char::is_control) {
        return Err(format!("{field} contains control characters"));
    }
    Ok(())
}

fn check_count(field: &str, count: usize, max: usize) -> Result<(), String> {
    if count > max {
        return Err(format!("{field}: {count} entries, at most {max}"));
    }
    Ok(())
}

fn truncate(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Roughly what the host keeps for one stored affiliate: its text, its lists, and
/// the store's bookkeeping. Charged against the publishing plugin's memory cap.
pub fn footprint(spec: &AffiliateSpec) -> usize {
    /// Resource ID, version, map node and `Arc`s around one stored spec.
    const STORED_OVERHEAD: usize = 256;
    let text = spec.node_id.len() * 2 // the spec and the resource ID
        + spec.hostname.len()
        + spec.nodename.len()
        + spec.operating_system.len();
    let addresses = spec.addresses.len() * size_of::<IpAddr>();
    let kubespan = spec.kubespan.as_ref().map_or(0, |k| {
        size_of::<KubeSpanSpec>()
            + k.public_key.len()
            + (k.additional_addresses.len() + k.exclude_advertised_networks.len())
                * size_of::<crate::specs::IpPrefix>()
            + k.endpoints.len() * size_of::<std::net::SocketAddr>()
    });
    STORED_OVERHEAD + size_of::<AffiliateSpec>() + text + addresses + kubespan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(node_id: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            hostname: "h".into(),
            nodename: "n".into(),
            operating_system: "Talos (v1.12.0)".into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        }
    }

    fn entries(list: Vec<AffiliateSpec>) -> Vec<(String, Result<AffiliateSpec, String>)> {
        list.into_iter()
            .map(|s| (s.node_id.clone(), Ok(s)))
            .collect()
    }

    #[test]
    fn an_overflowing_publish_gets_one_rejection_for_the_excess() {
        let list: Vec<_> = (0..limits::PUBLISH_MAX + 500)
            .map(|i| spec(&format!("n{i}")))
            .collect();
        let total = list.len();
        let Published {
            accepted, rejected, ..
        } = publish(entries(list), total, "self", usize::MAX);
        assert_eq!(accepted.len(), limits::PUBLISH_MAX);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].index as usize, limits::PUBLISH_MAX);
        assert!(
            rejected[0]
                .reason
                .ends_with("this entry and the 499 after it were ignored"),
            "{}",
            rejected[0].reason
        );
    }

    #[test]
    fn bad_entries_are_rejected_with_a_reason_and_the_rest_kept() {
        let mut multicast = spec("m");
        multicast.addresses = vec!["224.0.0.1".parse().unwrap()];
        let mut slash = spec("a/b");
        slash.hostname = "x".into();
        let mut long = spec("long");
        long.hostname = "h".repeat(300);
        let mut control = spec("ctl");
        control.nodename = "bad\nname".into();
        let mut key = spec("key");
        key.kubespan = Some(KubeSpanSpec {
            public_key: "nope".into(),
            ..Default::default()
        });
        let mut list = entries(vec![spec("good"), multicast, slash, long, control, key]);
        // What a conversion that failed hands over.
        list.push((
            "prefix".into(),
            Err("kubespan.additional-addresses: 10.0.0.0/40 is not a prefix".into()),
        ));
        list.extend(entries(vec![spec("good"), spec("self"), spec("")]));
        let total = list.len();
        let Published {
            accepted, rejected, ..
        } = publish(list, total, "self", usize::MAX);
        assert_eq!(accepted.len(), 1);
        assert_eq!(accepted[0].node_id, "good");
        let reasons: Vec<(u32, &str)> = rejected
            .iter()
            .map(|r| (r.index, r.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                (1, "addresses: 224.0.0.1 is not a node address"),
                (2, "node-id may hold only printable ASCII other than '/'"),
                (3, "hostname is longer than 253 bytes"),
                (4, "nodename contains control characters"),
                (5, "kubespan.public-key is not a base64 WireGuard key"),
                (
                    6,
                    "kubespan.additional-addresses: 10.0.0.0/40 is not a prefix"
                ),
                (7, "duplicate node-id in this publish"),
                (9, "node-id must be 1..=256 bytes"),
            ]
        );
    }

    #[test]
    fn rejections_cut_long_node_ids() {
        let long = "x".repeat(10_000);
        let published = publish([(long, Err("bad".to_string()))], 1, "self", usize::MAX);
        assert_eq!(published.rejected[0].node_id.len(), limits::NODE_ID_MAX + 1);
    }

    #[test]
    fn what_does_not_fit_the_memory_limit_is_refused_in_one_rejection() {
        let list: Vec<_> = (0..100).map(|i| spec(&format!("n{i}"))).collect();
        let each = footprint(&list[0]);
        let published = publish(entries(list), 100, "self", each * 10 + each / 2);
        assert_eq!(published.accepted.len(), 10);
        assert_eq!(published.bytes, each * 10);
        assert_eq!(published.rejected.len(), 1);
        assert_eq!(published.rejected[0].index, 10);
        assert!(
            published.rejected[0]
                .reason
                .ends_with("it and the 89 after it were ignored"),
            "{:?}",
            published.rejected
        );
    }

    #[test]
    fn the_footprint_grows_with_the_data() {
        let small = footprint(&spec("a"));
        let mut big = spec("a");
        big.addresses = vec!["10.0.0.1".parse().unwrap(); 64];
        big.operating_system = "o".repeat(200);
        assert!(footprint(&big) > small + 64 * 16 + 200);
    }
}
