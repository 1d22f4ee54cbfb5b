//! The resource specs the daemon keeps, with Talos's field names (`talosctl get
//! affiliates -o yaml` prints the same keys).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What one node says about itself: the local affiliate, a raw affiliate from one
/// registry, or the merge of several.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AffiliateSpec {
    pub node_id: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub nodename: String,
    #[serde(default)]
    pub operating_system: String,
    #[serde(default)]
    pub machine_type: MachineType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubespan: Option<KubeSpanSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneSpec>,
}

/// The KubeSpan (WireGuard mesh) part of an affiliate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KubeSpanSpec {
    #[serde(default)]
    pub public_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<IpAddr>,
    #[serde(default)]
    pub additional_addresses: Vec<IpPrefix>,
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    #[serde(default)]
    pub exclude_advertised_networks: Vec<IpPrefix>,
}

/// Present on control-plane nodes that run an API server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlPlaneSpec {
    /// The API server port.
    pub port: u16,
}

/// A node's role, as Talos names it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MachineType {
    #[default]
    Unknown,
    Init,
    Controlplane,
    Worker,
}

impl MachineType {
    /// Talos's `ParseType`: empty and `join` mean worker (kept for compatibility,
    /// reference Q19); anything unrecognised is `unknown`.
    pub fn parse_talos(s: &str) -> MachineType {
        match s {
            "init" => MachineType::Init,
            "controlplane" => MachineType::Controlplane,
            "" | "worker" | "join" => MachineType::Worker,
            _ => MachineType::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MachineType::Unknown => "unknown",
            MachineType::Init => "init",
            MachineType::Controlplane => "controlplane",
            MachineType::Worker => "worker",
        }
    }

    /// Whether this node runs the control plane (its addresses are control-plane
    /// endpoints).
    pub fn is_control_plane(self) -> bool {
        matches!(self, MachineType::Init | MachineType::Controlplane)
    }
}

impl fmt::Display for MachineType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An approved node, keyed by nodename.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MemberSpec {
    pub node_id: String,
    #[serde(default)]
    pub addresses: Vec<IpAddr>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub machine_type: MachineType,
    #[serde(default)]
    pub operating_system: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<ControlPlaneSpec>,
}

/// This node's identity (`Identities cluster/local`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdentitySpec {
    pub node_id: String,
}

/// Checks that a peer could reach a node at `ip`: not unspecified, multicast or
/// broadcast. Applied to configured and plugin-published addresses alike.
pub fn check_node_address(ip: IpAddr) -> Result<IpAddr, String> {
    let unusable = ip.is_unspecified()
        || ip.is_multicast()
        || matches!(ip, IpAddr::V4(v4) if v4.is_broadcast());
    if unusable {
        return Err(format!("{ip} is not a node address"));
    }
    Ok(ip)
}

/// An address prefix, written `10.244.0.0/16` as Talos does.
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

impl Serialize for IpPrefix {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_uses_talos_keys_and_omits_empty_optionals() {
        let spec = AffiliateSpec {
            node_id: "id1".into(),
            addresses: vec!["10.0.0.1".parse().unwrap()],
            hostname: "host1".into(),
            machine_type: MachineType::Controlplane,
            operating_system: "Talos (v1.12.0)".into(),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
            ..Default::default()
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "nodeId": "id1",
                "addresses": ["10.0.0.1"],
                "hostname": "host1",
                "operatingSystem": "Talos (v1.12.0)",
                "machineType": "controlplane",
                "controlPlane": {"port": 6443},
            })
        );
    }

    #[test]
    fn prefixes_parse_and_print_like_talos() {
        let p: IpPrefix = "fd00::/8".parse().unwrap();
        assert_eq!(p.to_string(), "fd00::/8");
        assert!("10.0.0.0/33".parse::<IpPrefix>().is_err());
        assert!("10.0.0.0".parse::<IpPrefix>().is_err());
    }
}
