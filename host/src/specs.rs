//! The resource specs the daemon keeps, with Talos's field names (`talosctl get
//! affiliates -o yaml` prints the same keys).

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

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

/// A node's role and an address prefix, with Talos's text forms.
pub use discovery_common::{IpPrefix, MachineType};

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

/// Talos's `AddressStatuses.net.talos.dev` `cluster/service`: the public address a
/// discovery service reports for this node, as a host prefix (`203.0.113.7/32`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddressStatusSpec {
    pub address: IpPrefix,
}

impl AddressStatusSpec {
    pub fn host(ip: IpAddr) -> AddressStatusSpec {
        let bits = if ip.is_ipv4() { 32 } else { 128 };
        AddressStatusSpec {
            address: IpPrefix { addr: ip, bits },
        }
    }
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
}
