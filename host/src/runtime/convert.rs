//! Plugin output is untrusted: every affiliate crossing the boundary is checked
//! (sizes, counts, addresses, keys) before it becomes a spec.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::bindings::{host::Rejection, types};
use crate::affiliate::{
    AffiliateSpec, ControlPlaneSpec, IpPrefix, KubeSpanSpec, MachineType, check_node_address,
};
use crate::limits;

/// Splits a published list into valid specs and rejections. Entries for this
/// node's own ID are dropped silently: the local affiliate is the host's own.
pub fn validate_all(
    affiliates: Vec<types::Affiliate>,
    local_node_id: &str,
) -> (Vec<AffiliateSpec>, Vec<Rejection>) {
    let total = affiliates.len();
    let mut accepted = Vec::with_capacity(total.min(limits::PUBLISH_MAX));
    let mut rejected = Vec::new();
    let mut seen = HashSet::with_capacity(accepted.capacity());
    for (index, affiliate) in affiliates.into_iter().enumerate() {
        let node_id = truncate(&affiliate.node_id, limits::NODE_ID_MAX + 1);
        let reject = |reason: String| Rejection {
            index: index as u32,
            node_id: node_id.clone(),
            reason,
        };
        if index == limits::PUBLISH_MAX {
            // One rejection for the whole overflow, not one per entry: the answer
            // must not grow with whatever a plugin sends.
            rejected.push(reject(format!(
                "more than {} affiliates in one publish: this entry and the {} after it were ignored",
                limits::PUBLISH_MAX,
                total - index - 1
            )));
            break;
        }
        if affiliate.node_id == local_node_id {
            continue;
        }
        match validate(affiliate) {
            Ok(spec) if !seen.insert(spec.node_id.clone()) => {
                rejected.push(reject("duplicate node-id in this publish".into()))
            }
            Ok(spec) => accepted.push(spec),
            Err(reason) => rejected.push(reject(reason)),
        }
    }
    (accepted, rejected)
}

/// Checks one affiliate and converts it; the error says which field is wrong.
pub fn validate(a: types::Affiliate) -> Result<AffiliateSpec, String> {
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
    let addresses = a
        .addresses
        .into_iter()
        .map(|ip| routable("addresses", ip_from_wit(ip)))
        .collect::<Result<Vec<_>, _>>()?;
    let kubespan = a.kubespan.map(validate_kubespan).transpose()?;
    let control_plane = match a.control_plane {
        Some(cp) if cp.api_server_port == 0 => {
            return Err("control-plane.api-server-port must not be 0".into());
        }
        Some(cp) => Some(ControlPlaneSpec {
            port: cp.api_server_port,
        }),
        None => None,
    };
    Ok(AffiliateSpec {
        node_id: a.node_id,
        addresses,
        hostname: a.hostname,
        nodename: a.nodename,
        operating_system: a.operating_system,
        machine_type: machine_type_from_wit(a.machine_type),
        kubespan,
        control_plane,
    })
}

fn validate_kubespan(k: types::Kubespan) -> Result<KubeSpanSpec, String> {
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
    let address = k
        .address
        .map(|ip| routable("kubespan.address", ip_from_wit(ip)))
        .transpose()?;
    let endpoints = k
        .endpoints
        .into_iter()
        .map(|e| {
            if e.port == 0 {
                return Err("kubespan.endpoints: port 0".to_string());
            }
            let ip = routable("kubespan.endpoints", ip_from_wit(e.address))?;
            Ok(SocketAddr::new(ip, e.port))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(KubeSpanSpec {
        public_key: k.public_key,
        address,
        additional_addresses: prefixes("kubespan.additional-addresses", k.additional_addresses)?,
        endpoints,
        exclude_advertised_networks: prefixes(
            "kubespan.exclude-advertised-networks",
            k.exclude_advertised_networks,
        )?,
    })
}

fn prefixes(field: &str, list: Vec<types::IpPrefix>) -> Result<Vec<IpPrefix>, String> {
    list.into_iter()
        .map(|p| {
            let addr = ip_from_wit(p.address);
            IpPrefix::new(addr, p.bits)
                .ok_or_else(|| format!("{field}: {addr}/{} is not a prefix", p.bits))
        })
        .collect()
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

pub fn ip_from_wit(ip: types::IpAddress) -> IpAddr {
    match ip {
        types::IpAddress::Ipv4((a, b, c, d)) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        types::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
        }
    }
}

pub fn ip_to_wit(ip: IpAddr) -> types::IpAddress {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            types::IpAddress::Ipv4((a, b, c, d))
        }
        IpAddr::V6(v6) => {
            let [a, b, c, d, e, f, g, h] = v6.segments();
            types::IpAddress::Ipv6((a, b, c, d, e, f, g, h))
        }
    }
}

pub fn endpoint_from_wit(e: types::Endpoint) -> SocketAddr {
    SocketAddr::new(ip_from_wit(e.address), e.port)
}

pub fn endpoint_to_wit(e: SocketAddr) -> types::Endpoint {
    types::Endpoint {
        address: ip_to_wit(e.ip()),
        port: e.port(),
    }
}

fn machine_type_from_wit(m: types::MachineType) -> MachineType {
    match m {
        types::MachineType::Unknown => MachineType::Unknown,
        types::MachineType::Init => MachineType::Init,
        types::MachineType::Controlplane => MachineType::Controlplane,
        types::MachineType::Worker => MachineType::Worker,
    }
}

fn machine_type_to_wit(m: MachineType) -> types::MachineType {
    match m {
        MachineType::Unknown => types::MachineType::Unknown,
        MachineType::Init => types::MachineType::Init,
        MachineType::Controlplane => types::MachineType::Controlplane,
        MachineType::Worker => types::MachineType::Worker,
    }
}

fn prefix_to_wit(p: &IpPrefix) -> types::IpPrefix {
    types::IpPrefix {
        address: ip_to_wit(p.addr),
        bits: p.bits,
    }
}

/// The host's spec as plugins see it.
pub fn to_wit(spec: &AffiliateSpec) -> types::Affiliate {
    types::Affiliate {
        node_id: spec.node_id.clone(),
        hostname: spec.hostname.clone(),
        nodename: spec.nodename.clone(),
        machine_type: machine_type_to_wit(spec.machine_type),
        operating_system: spec.operating_system.clone(),
        addresses: spec.addresses.iter().copied().map(ip_to_wit).collect(),
        kubespan: spec.kubespan.as_ref().map(|k| types::Kubespan {
            public_key: k.public_key.clone(),
            address: k.address.map(ip_to_wit),
            additional_addresses: k.additional_addresses.iter().map(prefix_to_wit).collect(),
            endpoints: k.endpoints.iter().copied().map(endpoint_to_wit).collect(),
            exclude_advertised_networks: k
                .exclude_advertised_networks
                .iter()
                .map(prefix_to_wit)
                .collect(),
        }),
        control_plane: spec.control_plane.map(|cp| types::ControlPlane {
            api_server_port: cp.port,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wit(node_id: &str) -> types::Affiliate {
        types::Affiliate {
            node_id: node_id.into(),
            hostname: "h".into(),
            nodename: "n".into(),
            machine_type: types::MachineType::Worker,
            operating_system: "Talos (v1.12.0)".into(),
            addresses: vec![ip_to_wit("10.0.0.1".parse().unwrap())],
            kubespan: None,
            control_plane: None,
        }
    }

    #[test]
    fn round_trips_a_full_affiliate() {
        let spec = AffiliateSpec {
            node_id: "abc".into(),
            addresses: vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            hostname: "h".into(),
            nodename: "n".into(),
            operating_system: "os".into(),
            machine_type: MachineType::Controlplane,
            kubespan: Some(KubeSpanSpec {
                public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
                address: Some("fd50::1".parse().unwrap()),
                additional_addresses: vec!["10.244.0.0/24".parse().unwrap()],
                endpoints: vec!["[2001:db8::1]:51820".parse().unwrap()],
                exclude_advertised_networks: vec!["0.0.0.0/0".parse().unwrap()],
            }),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
        };
        assert_eq!(validate(to_wit(&spec)).unwrap(), spec);
    }

    #[test]
    fn an_overflowing_publish_gets_one_rejection_for_the_excess() {
        let list: Vec<_> = (0..limits::PUBLISH_MAX + 500)
            .map(|i| wit(&format!("n{i}")))
            .collect();
        let (accepted, rejected) = validate_all(list, "self");
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
        let mut multicast = wit("m");
        multicast.addresses = vec![ip_to_wit("224.0.0.1".parse().unwrap())];
        let mut slash = wit("a/b");
        slash.hostname = "x".into();
        let mut long = wit("long");
        long.hostname = "h".repeat(300);
        let mut control = wit("ctl");
        control.nodename = "bad\nname".into();
        let mut key = wit("key");
        key.kubespan = Some(types::Kubespan {
            public_key: "nope".into(),
            address: None,
            additional_addresses: vec![],
            endpoints: vec![],
            exclude_advertised_networks: vec![],
        });
        let mut prefix = wit("prefix");
        prefix.kubespan = Some(types::Kubespan {
            public_key: String::new(),
            address: None,
            additional_addresses: vec![types::IpPrefix {
                address: ip_to_wit("10.0.0.0".parse().unwrap()),
                bits: 40,
            }],
            endpoints: vec![],
            exclude_advertised_networks: vec![],
        });
        let list = vec![
            wit("good"),
            multicast,
            slash,
            long,
            control,
            key,
            prefix,
            wit("good"),
            wit("self"),
            wit(""),
        ];
        let (accepted, rejected) = validate_all(list, "self");
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
}
