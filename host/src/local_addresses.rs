//! This node's addresses, read from its network interfaces the way Talos picks
//! them: addresses of links that are up, without loopback, link-local, multicast
//! or unspecified ones, sorted and deduplicated.

use std::net::IpAddr;

use nix::ifaddrs::getifaddrs;
use nix::net::if_::InterfaceFlags;

/// The node's routable addresses, IPv4 first, then numerically.
pub fn detect_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut addresses: Vec<IpAddr> = getifaddrs()
        .map_err(std::io::Error::from)?
        .filter(|ifa| {
            ifa.flags.contains(InterfaceFlags::IFF_UP)
                && !ifa.flags.contains(InterfaceFlags::IFF_LOOPBACK)
        })
        .filter_map(|ifa| {
            let address = ifa.address?;
            if let Some(v4) = address.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                address.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .filter(|ip| is_node_address(*ip))
        .collect();
    addresses.sort();
    addresses.dedup();
    Ok(addresses)
}

/// Whether another node could reach us at `ip`.
pub fn is_node_address(ip: IpAddr) -> bool {
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    };
    !(ip.is_loopback() || ip.is_multicast() || ip.is_unspecified() || link_local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_addresses_peers_can_use() {
        for keep in ["10.0.0.1", "192.168.1.5", "2001:db8::1", "fd00::1"] {
            assert!(is_node_address(keep.parse().unwrap()), "{keep}");
        }
        for drop in [
            "127.0.0.1",
            "::1",
            "169.254.3.4",
            "fe80::1",
            "224.0.0.1",
            "ff02::1",
            "0.0.0.0",
            "::",
        ] {
            assert!(!is_node_address(drop.parse().unwrap()), "{drop}");
        }
    }

    #[test]
    fn detected_addresses_are_sorted_unique_and_routable() {
        let addresses = detect_addresses().unwrap();
        assert!(addresses.windows(2).all(|w| w[0] < w[1]), "{addresses:?}");
        assert!(
            addresses.iter().all(|ip| is_node_address(*ip)),
            "{addresses:?}"
        );
    }
}
