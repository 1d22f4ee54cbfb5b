//! The client's address: what Hello reports, the rate-limit key and the log field
//! (§4.10).
//!
//! Proxy headers are honoured only when configured (both off by default, Q7): without a
//! proxy that overwrites them, a client could pick its own reported IP and rate-limit
//! key.

use std::net::{IpAddr, SocketAddr};

use tonic::metadata::MetadataMap;

/// The transport peer of a connection, attached to every request by the acceptor.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub remote: SocketAddr,
}

/// Which client-supplied headers to trust.
#[derive(Debug, Clone, Copy, Default)]
pub struct Trust {
    pub x_real_ip: bool,
    pub first_x_forwarded_for: bool,
}

/// Dual-stack listeners see IPv4 clients as `::ffff:a.b.c.d`; they are IPv4 clients.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

fn header<'a>(md: &'a MetadataMap, name: &str) -> Option<&'a str> {
    md.get(name).and_then(|v| v.to_str().ok())
}

/// The client IP, or `None` if unknown (then it is neither reported nor limited).
pub fn client_ip(md: &MetadataMap, conn: Option<&ConnInfo>, trust: Trust) -> Option<IpAddr> {
    if trust.x_real_ip
        && let Some(ip) = header(md, "x-real-ip").and_then(|v| v.parse::<IpAddr>().ok())
    {
        return Some(canonical(ip));
    }
    if trust.first_x_forwarded_for
        && let Some(v) = header(md, "x-forwarded-for")
    {
        let first = v.split(',').next().unwrap_or_default().trim();
        if let Ok(ip) = first.parse::<IpAddr>() {
            return Some(canonical(ip));
        }
    }
    conn.map(|c| canonical(c.remote.ip()))
}

/// `client_ip` bytes of HelloResponse: 4 for IPv4, 16 for IPv6, empty if unknown.
pub fn ip_bytes(ip: Option<IpAddr>) -> Vec<u8> {
    ip.map(discovery_common::netip::addr_to_bytes)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &'static str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    const ALL: Trust = Trust {
        x_real_ip: true,
        first_x_forwarded_for: true,
    };

    #[test]
    fn headers_in_order_then_peer() {
        let conn = ConnInfo {
            remote: "127.0.0.1:5555".parse().unwrap(),
        };
        let ip = |m: &MetadataMap, t| client_ip(m, Some(&conn), t).map(|i| i.to_string());
        assert_eq!(
            ip(&md(&[("x-real-ip", "1.2.3.4")]), ALL).unwrap(),
            "1.2.3.4"
        );
        assert_eq!(
            ip(&md(&[("x-forwarded-for", "5.6.7.8,192.168.0.0.1")]), ALL).unwrap(),
            "5.6.7.8"
        );
        assert_eq!(
            ip(
                &md(&[
                    ("x-real-ip", "bogus"),
                    ("x-forwarded-for", " 5.6.7.8 , 1.1.1.1")
                ]),
                ALL
            )
            .unwrap(),
            "5.6.7.8"
        );
        assert_eq!(
            ip(&md(&[("x-real-ip", "1.2.3.4:80")]), ALL).unwrap(),
            "127.0.0.1"
        );
        assert_eq!(
            ip(&md(&[("x-real-ip", "1.2.3.4")]), Trust::default()).unwrap(),
            "127.0.0.1",
            "headers are ignored unless trusted"
        );
        assert_eq!(client_ip(&md(&[]), None, ALL), None);
    }

    #[test]
    fn mapped_ipv4_is_unmapped() {
        let conn = ConnInfo {
            remote: "[::ffff:10.0.0.1]:1".parse().unwrap(),
        };
        assert_eq!(
            ip_bytes(client_ip(&md(&[]), Some(&conn), ALL)),
            vec![10, 0, 0, 1]
        );
        let v6 = ConnInfo {
            remote: "[::1]:1".parse().unwrap(),
        };
        assert_eq!(ip_bytes(client_ip(&md(&[]), Some(&v6), ALL)).len(), 16);
    }
}
