//! One affiliate as written in the file, with Talos's spec keys, and its checks.

use discovery_sdk::{
    Affiliate, ControlPlane, Endpoint, IpAddress, IpPrefix, Kubespan, MachineType,
};
use serde::Deserialize;

/// An affiliate in the file. Keys are Talos's (`talosctl get affiliates -o yaml`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileAffiliate {
    node_id: String,
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    nodename: String,
    #[serde(default)]
    machine_type: Option<String>,
    #[serde(default)]
    operating_system: String,
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    kubespan: Option<FileKubespan>,
    #[serde(default)]
    control_plane: Option<FileControlPlane>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FileKubespan {
    #[serde(default)]
    public_key: String,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    additional_addresses: Vec<String>,
    #[serde(default)]
    endpoints: Vec<String>,
    #[serde(default)]
    exclude_advertised_networks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileControlPlane {
    port: u16,
}

impl FileAffiliate {
    /// Converts to the plugin API type; the error names the field and value.
    pub fn into_affiliate(self) -> Result<Affiliate, String> {
        if self.node_id.is_empty() {
            return Err("nodeId is empty".into());
        }
        let machine_type = match self.machine_type.as_deref() {
            None => MachineType::Unknown,
            Some(text) => match MachineType::parse_talos(text) {
                MachineType::Unknown if text != "unknown" => {
                    return Err(format!(
                        "machineType {text:?} is not one of unknown, init, controlplane, worker"
                    ));
                }
                parsed => parsed,
            },
        };
        Ok(Affiliate {
            node_id: self.node_id,
            hostname: self.hostname,
            nodename: self.nodename,
            machine_type,
            operating_system: self.operating_system,
            addresses: parse_all::<IpAddress>("addresses", &self.addresses)?,
            kubespan: self.kubespan.map(FileKubespan::convert).transpose()?,
            control_plane: self.control_plane.map(|cp| ControlPlane {
                api_server_port: cp.port,
            }),
        })
    }
}

impl FileKubespan {
    fn convert(self) -> Result<Kubespan, String> {
        let address = match self.address.as_deref() {
            None | Some("") => None,
            Some(text) => Some(
                text.parse::<IpAddress>()
                    .map_err(|e| format!("kubespan.address: {e}"))?,
            ),
        };
        Ok(Kubespan {
            public_key: self.public_key,
            address,
            additional_addresses: parse_all::<IpPrefix>(
                "kubespan.additionalAddresses",
                &self.additional_addresses,
            )?,
            endpoints: parse_all::<Endpoint>("kubespan.endpoints", &self.endpoints)?,
            exclude_advertised_networks: parse_all::<IpPrefix>(
                "kubespan.excludeAdvertisedNetworks",
                &self.exclude_advertised_networks,
            )?,
        })
    }
}

fn parse_all<T>(field: &str, values: &[String]) -> Result<Vec<T>, String>
where
    T: std::str::FromStr<Err = discovery_sdk::ParseError>,
{
    values
        .iter()
        .map(|v| v.parse::<T>().map_err(|e| format!("{field}: {e}")))
        .collect()
}
