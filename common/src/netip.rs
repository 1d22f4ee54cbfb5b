//! Go's `netip.Addr` binary encoding, as Talos's payloads and the discovery
//! service's `client_ip` carry addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// `netip.Addr.MarshalBinary`: 4 bytes for IPv4, 16 for IPv6 (IPv4-mapped
/// addresses stay 16 bytes).
pub fn addr_to_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// The inverse of [`addr_to_bytes`] for what Go may send: more than 16 bytes is
/// IPv6 with a zone name, which `IpAddr` cannot hold and a peer on another host
/// could not use, so the zone is dropped. Empty (no address) and any other length
/// give `None`.
pub fn addr_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| Ipv4Addr::from(b).into()),
        16.. => <[u8; 16]>::try_from(&bytes[..16])
            .ok()
            .map(|b| Ipv6Addr::from(b).into()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_go_netip() {
        let v4: IpAddr = "10.5.0.2".parse().unwrap();
        assert_eq!(addr_to_bytes(v4), [10, 5, 0, 2]);
        let mapped: IpAddr = "::ffff:10.5.0.2".parse().unwrap();
        assert_eq!(addr_to_bytes(mapped).len(), 16, "mapped stays IPv6");
        for ip in [v4, mapped, "2001:db8::1".parse().unwrap()] {
            assert_eq!(addr_from_bytes(&addr_to_bytes(ip)), Some(ip));
        }
    }

    #[test]
    fn decodes_what_go_may_send() {
        let mut zoned = addr_to_bytes("fe80::1".parse().unwrap());
        zoned.extend_from_slice(b"eth0");
        assert_eq!(addr_from_bytes(&zoned), Some("fe80::1".parse().unwrap()));
        assert_eq!(addr_from_bytes(&[]), None);
        assert_eq!(addr_from_bytes(&[1, 2, 3]), None);
        assert_eq!(addr_from_bytes(&[0; 5]), None);
    }
}
