//! An address prefix, written `10.244.0.0/16` as Talos (Go's `netip.Prefix`) does.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub bits: u8,
}

impl IpPrefix {
    /// Builds a prefix, refusing more bits than the address family has.
    pub fn new(addr: IpAddr, bits: u8) -> Option<IpPrefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (bits <= max).then_some(IpPrefix { addr, bits })
    }
}

impl fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.bits)
    }
}

impl FromStr for IpPrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("invalid IP prefix {s:?}");
        let (addr, bits) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let bits: u8 = bits.parse().map_err(|_| bad())?;
        IpPrefix::new(addr, bits).ok_or_else(bad)
    }
}

#[cfg(feature = "serde")]
impl serde::Serialize for IpPrefix {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

#[cfg(feature = "serde")]
impl<'de> serde::Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_print_like_talos() {
        for text in ["10.244.0.0/16", "fd00::/8", "0.0.0.0/0", "2001:db8::1/128"] {
            let prefix: IpPrefix = text.parse().unwrap();
            assert_eq!(prefix.to_string(), text);
        }
        for bad in ["10.0.0.0/33", "fd00::/129", "10.0.0.0", "x/8", "10.0.0.0/"] {
            assert_eq!(
                bad.parse::<IpPrefix>(),
                Err(format!("invalid IP prefix {bad:?}")),
                "{bad}"
            );
        }
    }
}
