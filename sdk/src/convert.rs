//! Conversions between the WIT types and `std::net`, and the text forms Talos uses.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::{Endpoint, IpAddress, IpPrefix, MachineType};

/// A text value that is not an address, prefix or endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    what: &'static str,
    value: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}", self.what, self.value)
    }
}

impl std::error::Error for ParseError {}

fn invalid(what: &'static str, value: &str) -> ParseError {
    ParseError {
        what,
        value: value.to_string(),
    }
}

impl From<IpAddr> for IpAddress {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(v4) => {
                let [a, b, c, d] = v4.octets();
                IpAddress::Ipv4((a, b, c, d))
            }
            IpAddr::V6(v6) => {
                let [a, b, c, d, e, f, g, h] = v6.segments();
                IpAddress::Ipv6((a, b, c, d, e, f, g, h))
            }
        }
    }
}

impl From<IpAddress> for IpAddr {
    fn from(ip: IpAddress) -> Self {
        match ip {
            IpAddress::Ipv4((a, b, c, d)) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
                IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
            }
        }
    }
}

impl FromStr for IpAddress {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<IpAddr>()
            .map(Into::into)
            .map_err(|_| invalid("IP address", s))
    }
}

impl fmt::Display for IpAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        IpAddr::from(*self).fmt(f)
    }
}

impl FromStr for IpPrefix {
    type Err = ParseError;

    /// `10.244.0.0/16` or `fd00::/8`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let prefix: discovery_common::IpPrefix = s.parse().map_err(|_| invalid("IP prefix", s))?;
        Ok(IpPrefix {
            address: prefix.addr.into(),
            bits: prefix.bits,
        })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.address, self.bits)
    }
}

impl FromStr for Endpoint {
    type Err = ParseError;

    /// `10.0.0.2:51820` or `[2001:db8::1]:51820`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr: SocketAddr = s.parse().map_err(|_| invalid("endpoint", s))?;
        Ok(Endpoint {
            address: addr.ip().into(),
            port: addr.port(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.address.into(), self.port).fmt(f)
    }
}

impl MachineType {
    /// Talos's `ParseType`: empty and `join` mean worker; anything unknown is
    /// `unknown`.
    pub fn parse_talos(s: &str) -> MachineType {
        discovery_common::MachineType::parse_talos(s).into()
    }

    /// The text Talos shows: `unknown`, `init`, `controlplane` or `worker`.
    pub fn as_str(&self) -> &'static str {
        discovery_common::MachineType::from(*self).as_str()
    }
}

impl From<discovery_common::MachineType> for MachineType {
    fn from(t: discovery_common::MachineType) -> Self {
        use discovery_common::MachineType as Talos;
        match t {
            Talos::Unknown => MachineType::Unknown,
            Talos::Init => MachineType::Init,
            Talos::Controlplane => MachineType::Controlplane,
            Talos::Worker => MachineType::Worker,
        }
    }
}

impl From<MachineType> for discovery_common::MachineType {
    fn from(t: MachineType) -> Self {
        use discovery_common::MachineType as Talos;
        match t {
            MachineType::Unknown => Talos::Unknown,
            MachineType::Init => Talos::Init,
            MachineType::Controlplane => Talos::Controlplane,
            MachineType::Worker => Talos::Worker,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_text() {
        for text in ["10.0.0.1", "2001:db8::1", "::", "255.255.255.255"] {
            let ip: IpAddress = text.parse().unwrap();
            assert_eq!(ip.to_string(), text);
        }
        assert!("10.0.0.256".parse::<IpAddress>().is_err());
    }

    #[test]
    fn prefixes_and_endpoints_parse_talos_text() {
        let p: IpPrefix = "10.244.0.0/16".parse().unwrap();
        assert_eq!(p.bits, 16);
        assert_eq!(p.to_string(), "10.244.0.0/16");
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("::/129".parse::<IpPrefix>().is_err());
        let e: Endpoint = "[2001:db8::1]:51820".parse().unwrap();
        assert_eq!(e.port, 51820);
        assert_eq!(e.to_string(), "[2001:db8::1]:51820");
        assert_eq!(
            "invalid endpoint \"10.0.0.1\"",
            "10.0.0.1".parse::<Endpoint>().unwrap_err().to_string()
        );
    }

    #[test]
    fn machine_types_follow_talos_parse_type() {
        assert_eq!(MachineType::parse_talos(""), MachineType::Worker);
        assert_eq!(MachineType::parse_talos("join"), MachineType::Worker);
        assert_eq!(MachineType::parse_talos("init"), MachineType::Init);
        assert_eq!(
            MachineType::parse_talos("controlplane"),
            MachineType::Controlplane
        );
        assert_eq!(MachineType::parse_talos("boss"), MachineType::Unknown);
        assert_eq!(MachineType::Controlplane.as_str(), "controlplane");
    }
}
