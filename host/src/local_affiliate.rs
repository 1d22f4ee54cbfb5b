//! This node's own affiliate: what it publishes through every registry.
//!
//! It is built from the config and the system (hostname, OS, interface
//! addresses), stored as `cluster/<node-id>`, and handed to plugins. Addresses
//! are re-read periodically so a new or lost address reaches the peers.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::affiliate::{AffiliateSpec, ControlPlaneSpec, KubeSpanSpec};
use crate::config::NodeConfig;
use crate::interfaces;
use crate::limits;
use crate::store::{Kind, Namespace, Spec, Store};

/// The WireGuard port Talos advertises for KubeSpan.
const KUBESPAN_PORT: u16 = 51820;

/// Facts about this machine that the config does not fix.
#[derive(Clone, Debug)]
pub struct System {
    pub hostname: String,
    /// `<name> (<version>)`, like `Talos (v1.12.0)`.
    pub operating_system: String,
    pub addresses: Vec<IpAddr>,
}

impl System {
    /// Reads the hostname, `/etc/os-release` and the interfaces.
    pub fn read() -> System {
        let hostname = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_default();
        let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
        System {
            hostname,
            operating_system: operating_system(&os_release),
            addresses: interfaces::detect_addresses().unwrap_or_else(|e| {
                tracing::warn!("cannot read interface addresses: {e}");
                Vec::new()
            }),
        }
    }
}

/// `NAME (VERSION_ID)` from os-release text, falling back to `Linux`.
pub fn operating_system(os_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix('=')?;
            Some(value.trim().trim_matches('"').to_string())
        })
    };
    let name = field("NAME").unwrap_or_else(|| "Linux".into());
    match field("VERSION_ID") {
        Some(version) => format!("{name} ({version})"),
        None => name,
    }
}

/// The local affiliate for this config and system (a pure function).
pub fn build(node: &NodeConfig, node_id: &str, system: &System) -> AffiliateSpec {
    let hostname = node
        .hostname
        .clone()
        .unwrap_or_else(|| system.hostname.clone());
    let addresses = node
        .addresses
        .clone()
        .unwrap_or_else(|| system.addresses.clone());
    let kubespan = node.kubespan.as_ref().map(|k| {
        // Without fixed endpoints, advertise WireGuard on every address, as Talos does.
        let endpoints = if k.endpoints.is_empty() {
            addresses
                .iter()
                .filter(|ip| Some(**ip) != k.address)
                .map(|ip| SocketAddr::new(*ip, KUBESPAN_PORT))
                .take(limits::ENDPOINTS_MAX)
                .collect()
        } else {
            k.endpoints.clone()
        };
        KubeSpanSpec {
            public_key: k.public_key.clone(),
            address: k.address,
            additional_addresses: k.additional_addresses.clone(),
            endpoints,
            exclude_advertised_networks: k.exclude_advertised_networks.clone(),
        }
    });
    AffiliateSpec {
        node_id: node_id.to_string(),
        addresses,
        nodename: node.nodename.clone().unwrap_or_else(|| hostname.clone()),
        hostname,
        operating_system: system.operating_system.clone(),
        machine_type: node.machine_type,
        kubespan,
        control_plane: node.api_server_port.map(|port| ControlPlaneSpec { port }),
    }
}

/// Keeps `cluster/<node-id>` and the plugins' view of the local affiliate up to
/// date until shutdown. With discovery disabled there is no local affiliate.
pub async fn run(
    node: NodeConfig,
    node_id: String,
    discovery_enabled: bool,
    store: Arc<Store>,
    local: watch::Sender<Option<AffiliateSpec>>,
    shutdown: CancellationToken,
) {
    if !discovery_enabled {
        publish(&store, &node_id, &local, None);
        return shutdown.cancelled().await;
    }
    loop {
        publish(
            &store,
            &node_id,
            &local,
            Some(build(&node, &node_id, &System::read())),
        );
        tokio::select! {
            _ = tokio::time::sleep(limits::ADDRESS_POLL_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Stores the local affiliate and tells the plugins, only when it changed.
pub fn publish(
    store: &Store,
    node_id: &str,
    local: &watch::Sender<Option<AffiliateSpec>>,
    spec: Option<AffiliateSpec>,
) {
    match &spec {
        Some(spec) => store.put(Namespace::Cluster, node_id, Spec::Affiliate(spec.clone())),
        None => store.remove(Namespace::Cluster, Kind::Affiliate, node_id),
    };
    local.send_if_modified(|current| {
        let changed = *current != spec;
        if changed {
            *current = spec;
        }
        changed
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affiliate::MachineType;
    use crate::config::KubeSpanConfig;

    fn node() -> NodeConfig {
        NodeConfig {
            state_dir: "/tmp".into(),
            hostname: None,
            nodename: None,
            machine_type: MachineType::Worker,
            addresses: None,
            kubespan: None,
            api_server_port: None,
        }
    }

    fn system() -> System {
        System {
            hostname: "node-1.example".into(),
            operating_system: "Debian GNU/Linux (12)".into(),
            addresses: vec!["10.0.0.5".parse().unwrap(), "2001:db8::5".parse().unwrap()],
        }
    }

    #[test]
    fn defaults_come_from_the_system() {
        let spec = build(&node(), "id1", &system());
        assert_eq!(spec.node_id, "id1");
        assert_eq!(spec.hostname, "node-1.example");
        assert_eq!(
            spec.nodename, "node-1.example",
            "nodename defaults to the hostname"
        );
        assert_eq!(spec.addresses, system().addresses);
        assert_eq!(spec.machine_type, MachineType::Worker);
        assert!(spec.kubespan.is_none() && spec.control_plane.is_none());
    }

    #[test]
    fn config_fixes_names_addresses_kubespan_and_control_plane() {
        let mut node = node();
        node.nodename = Some("cp-1".into());
        node.machine_type = MachineType::Controlplane;
        node.api_server_port = Some(6445);
        node.addresses = Some(vec!["192.168.3.4".parse().unwrap()]);
        node.kubespan = Some(KubeSpanConfig {
            public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
            address: Some("fd50::1".parse().unwrap()),
            additional_addresses: vec![],
            endpoints: vec![],
            exclude_advertised_networks: vec!["0.0.0.0/0".parse().unwrap()],
        });
        let spec = build(&node, "id1", &system());
        assert_eq!(spec.nodename, "cp-1");
        assert_eq!(spec.addresses, ["192.168.3.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(spec.control_plane, Some(ControlPlaneSpec { port: 6445 }));
        let kubespan = spec.kubespan.unwrap();
        assert_eq!(
            kubespan.endpoints,
            ["192.168.3.4:51820".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn os_string_is_name_and_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n";
        assert_eq!(operating_system(debian), "Debian GNU/Linux (12)");
        assert_eq!(
            operating_system("NAME=Talos\nVERSION_ID=v1.12.0\n"),
            "Talos (v1.12.0)"
        );
        assert_eq!(operating_system(""), "Linux");
    }

    #[test]
    fn publishing_only_wakes_plugins_on_change() {
        let store = Store::new();
        let (tx, mut rx) = watch::channel(None);
        let spec = build(&node(), "id1", &system());
        publish(&store, "id1", &tx, Some(spec.clone()));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        publish(&store, "id1", &tx, Some(spec));
        assert!(!rx.has_changed().unwrap());
        publish(&store, "id1", &tx, None);
        assert!(rx.has_changed().unwrap());
        assert!(
            store
                .get(Namespace::Cluster, Kind::Affiliate, "id1")
                .is_none()
        );
    }
}
