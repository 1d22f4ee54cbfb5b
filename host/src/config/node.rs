//! This node's settings (`node`): state directory, names, machine type, fixed
//! addresses, the control plane's API server port and KubeSpan, with the
//! parsers for the address, endpoint and prefix lists they use.
//!
//! Apart because these become the affiliate this node publishes itself, checked
//! against the same limits as the affiliates plugins publish (`NAME_MAX`,
//! `ADDRESSES_MAX`, `ENDPOINTS_MAX`, node addresses only).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use super::file::{RawControlPlane, RawKubeSpan, RawNode};
use super::{ConfigError, err, resolve_state_dir};
use crate::limits;
use crate::specs::{IpPrefix, MachineType, check_node_address};

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub state_dir: PathBuf,
    /// Overrides the system hostname.
    pub hostname: Option<String>,
    /// Defaults to the hostname.
    pub nodename: Option<String>,
    pub machine_type: MachineType,
    /// Fixed addresses; `None` detects them from the interfaces.
    pub addresses: Option<Vec<IpAddr>>,
    pub kubespan: Option<KubeSpanConfig>,
    pub api_server_port: Option<u16>,
}

#[derive(Debug, Clone)]
pub struct KubeSpanConfig {
    pub public_key: String,
    pub address: Option<IpAddr>,
    pub additional_addresses: Vec<IpPrefix>,
    pub endpoints: Vec<SocketAddr>,
    pub exclude_advertised_networks: Vec<IpPrefix>,
}

impl RawNode {
    pub(super) fn validate(self, base: &Path) -> Result<NodeConfig, ConfigError> {
        let state_dir = resolve_state_dir(self.state_dir, base);
        if let Some(name) = &self.hostname {
            check_name("node.hostname", name)?;
        }
        if let Some(name) = &self.nodename {
            check_name("node.nodename", name)?;
        }
        let machine_type = match self.machine_type.as_deref() {
            None => MachineType::Worker,
            Some(text @ ("init" | "controlplane" | "worker")) => MachineType::parse_talos(text),
            Some(other) => {
                return Err(err(
                    "node.machineType",
                    format!("{other:?} is not one of init, controlplane, worker"),
                ));
            }
        };
        let addresses = self
            .addresses
            .map(|list| {
                parse_list(
                    "node.addresses",
                    &list,
                    limits::ADDRESSES_MAX,
                    parse_node_ip,
                )
            })
            .transpose()?;
        let api_server_port = match self.control_plane {
            None => None,
            Some(_) if !machine_type.is_control_plane() => {
                return Err(err(
                    "node.controlPlane",
                    format!(
                        "only init and controlplane nodes run an API server, this node is {machine_type}"
                    ),
                ));
            }
            Some(RawControlPlane { api_server_port: 0 }) => {
                return Err(err("node.controlPlane.apiServerPort", "must not be 0"));
            }
            Some(cp) => Some(cp.api_server_port),
        };
        let kubespan = self.kubespan.map(RawKubeSpan::validate).transpose()?;
        Ok(NodeConfig {
            state_dir,
            hostname: self.hostname,
            nodename: self.nodename,
            machine_type,
            addresses,
            kubespan,
            api_server_port,
        })
    }
}

impl RawKubeSpan {
    fn validate(self) -> Result<KubeSpanConfig, ConfigError> {
        if !limits::is_wireguard_key(&self.public_key) {
            return Err(err(
                "node.kubespan.publicKey",
                format!(
                    "{:?} is not a base64 WireGuard key (32 bytes)",
                    self.public_key
                ),
            ));
        }
        let address = self
            .address
            .map(|a| parse_node_ip("node.kubespan.address", &a))
            .transpose()?;
        Ok(KubeSpanConfig {
            public_key: self.public_key,
            address,
            additional_addresses: parse_list(
                "node.kubespan.additionalAddresses",
                &self.additional_addresses,
                limits::ADDRESSES_MAX,
                parse_prefix,
            )?,
            endpoints: parse_list(
                "node.kubespan.endpoints",
                &self.endpoints,
                limits::ENDPOINTS_MAX,
                parse_endpoint,
            )?,
            exclude_advertised_networks: parse_list(
                "node.kubespan.excludeAdvertisedNetworks",
                &self.exclude_advertised_networks,
                limits::ADDRESSES_MAX,
                parse_prefix,
            )?,
        })
    }
}

fn check_name(path: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > limits::NAME_MAX || name.chars().any(char::is_control) {
        return Err(err(
            path,
            format!(
                "{name:?} must be 1..={} printable characters",
                limits::NAME_MAX
            ),
        ));
    }
    Ok(())
}

fn parse_node_ip(path: &str, text: &str) -> Result<IpAddr, ConfigError> {
    let ip: IpAddr = text
        .parse()
        .map_err(|_| err(path, format!("{text:?} is not an IP address")))?;
    check_node_address(ip).map_err(|e| err(path, e))
}

fn parse_endpoint(path: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    let endpoint: SocketAddr = text
        .parse()
        .map_err(|_| err(path, format!("{text:?} is not an ip:port endpoint")))?;
    if endpoint.port() == 0 {
        return Err(err(path, format!("{text:?} has port 0")));
    }
    check_node_address(endpoint.ip()).map_err(|e| err(path, e))?;
    Ok(endpoint)
}

fn parse_prefix(path: &str, text: &str) -> Result<IpPrefix, ConfigError> {
    text.parse().map_err(|e: String| err(path, e))
}

fn parse_list<T>(
    path: &str,
    items: &[String],
    max: usize,
    parse: impl Fn(&str, &str) -> Result<T, ConfigError>,
) -> Result<Vec<T>, ConfigError> {
    if items.len() > max {
        return Err(err(path, format!("{} entries, at most {max}", items.len())));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, text)| parse(&format!("{path}[{i}]"), text))
        .collect()
}
