//! This node's own affiliate: what it publishes through every registry.
//!
//! It is built from the config, the system (hostname, OS, interface addresses)
//! and the public addresses discovery services report, stored as
//! `cluster/<node-id>`, and handed to plugins. Addresses are re-read
//! periodically so a new or lost address reaches the peers.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::NodeConfig;
use crate::limits;
use crate::local_addresses;
use crate::public_addresses;
use crate::specs::{AffiliateSpec, ControlPlaneSpec, KubeSpanSpec};

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
        // os-release(5): /etc first, /usr/lib as the fallback.
        let os_release = std::fs::read_to_string("/etc/os-release")
            .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
            .unwrap_or_default();
        let kernel = nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default();
        System {
            hostname,
            operating_system: operating_system(&os_release, &kernel),
            addresses: local_addresses::detect_addresses()
                .map(|mut addresses| {
                    // Peers and the discovery service take a bounded list.
                    addresses.truncate(limits::ADDRESSES_MAX);
                    addresses
                })
                .unwrap_or_else(|e| {
                    tracing::warn!("cannot read interface addresses: {e}");
                    Vec::new()
                }),
        }
    }
}

/// `NAME (VERSION_ID)` from os-release text; without them `Linux` and the
/// kernel release, so the shape is always `<name> (<version>)`.
pub fn operating_system(os_release: &str, kernel_release: &str) -> String {
    let field = |key: &str| {
        os_release.lines().find_map(|line| {
            let value = line.trim().strip_prefix(key)?.strip_prefix('=')?.trim();
            let unquoted = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| value.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(value);
            (!unquoted.is_empty()).then(|| unquoted.to_string())
        })
    };
    let name = field("NAME").unwrap_or_else(|| "Linux".into());
    let version = field("VERSION_ID")
        .or_else(|| field("VERSION"))
        .unwrap_or_else(|| kernel_release.to_string());
    format!("{name} ({version})")
}

/// The local affiliate for this config and system (a pure function). As in
/// Talos, the public addresses discovery services see this node at join its
/// KubeSpan endpoints, on the WireGuard port.
pub fn build(
    node: &NodeConfig,
    node_id: &str,
    system: &System,
    public: &[IpAddr],
) -> AffiliateSpec {
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
        let mut endpoints: Vec<SocketAddr> = if k.endpoints.is_empty() {
            addresses
                .iter()
                .filter(|ip| Some(**ip) != k.address)
                .map(|ip| SocketAddr::new(*ip, KUBESPAN_PORT))
                .collect()
        } else {
            k.endpoints.clone()
        };
        for ip in public {
            if !endpoints.iter().any(|e| e.ip() == *ip) {
                endpoints.push(SocketAddr::new(*ip, KUBESPAN_PORT));
            }
        }
        endpoints.truncate(limits::ENDPOINTS_MAX);
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

/// Keeps the local affiliate up to date until shutdown, re-reading the system
/// periodically and at once when a public address changes. With discovery
/// disabled there is none. The reconcile loop stores it as `cluster/<node-id>`;
/// plugins read it from the same channel.
pub async fn run(
    node: NodeConfig,
    node_id: String,
    discovery_enabled: bool,
    mut public: watch::Receiver<BTreeMap<String, IpAddr>>,
    local: watch::Sender<Option<AffiliateSpec>>,
    shutdown: CancellationToken,
) {
    if !discovery_enabled {
        publish(&local, None);
        return shutdown.cancelled().await;
    }
    loop {
        let addresses = public_addresses::ordered(&public.borrow_and_update());
        publish(
            &local,
            Some(build(&node, &node_id, &System::read(), &addresses)),
        );
        tokio::select! {
            _ = tokio::time::sleep(limits::ADDRESS_POLL_INTERVAL) => {}
            Ok(()) = public.changed() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Hands out a new local affiliate, waking plugins and reconcile only if it changed.
pub fn publish(local: &watch::Sender<Option<AffiliateSpec>>, spec: Option<AffiliateSpec>) {
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
    use crate::config::KubeSpanConfig;
    use crate::specs::MachineType;

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
        let spec = build(&node(), "id1", &system(), &[]);
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
        let spec = build(&node, "id1", &system(), &[]);
        assert_eq!(spec.nodename, "cp-1");
        assert_eq!(spec.addresses, ["192.168.3.4".parse::<IpAddr>().unwrap()]);
        assert_eq!(spec.control_plane, Some(ControlPlaneSpec { port: 6445 }));
        let kubespan = spec.kubespan.unwrap();
        assert_eq!(
            kubespan.endpoints,
            ["192.168.3.4:51820".parse::<SocketAddr>().unwrap()]
        );

        // The public address a discovery service reports joins the endpoints,
        // once (Talos's "discovered public IPs not yet present").
        let public: [IpAddr; 2] = [
            "203.0.113.9".parse().unwrap(),
            "192.168.3.4".parse().unwrap(),
        ];
        let spec = build(&node, "id1", &system(), &public);
        let endpoints: Vec<String> = spec
            .kubespan
            .unwrap()
            .endpoints
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(endpoints, ["192.168.3.4:51820", "203.0.113.9:51820"]);
        let without_kubespan = build(&self::node(), "id1", &system(), &public);
        assert!(
            without_kubespan.kubespan.is_none(),
            "no KubeSpan, no endpoints"
        );
    }

    #[test]
    fn os_string_is_name_and_version() {
        let debian = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\n";
        assert_eq!(operating_system(debian, "6.1.0"), "Debian GNU/Linux (12)");
        assert_eq!(
            operating_system("NAME=Talos\nVERSION_ID=v1.12.0\n", ""),
            "Talos (v1.12.0)"
        );
        assert_eq!(
            operating_system("NAME='Arch Linux'\nVERSION=rolling\n", ""),
            "Arch Linux (rolling)"
        );
        assert_eq!(
            operating_system("", "6.1.0-13-amd64"),
            "Linux (6.1.0-13-amd64)"
        );
    }

    #[test]
    fn publishing_only_wakes_plugins_on_change() {
        let (tx, mut rx) = watch::channel(None);
        let spec = build(&node(), "id1", &system(), &[]);
        publish(&tx, Some(spec.clone()));
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        publish(&tx, Some(spec));
        assert!(!rx.has_changed().unwrap());
        publish(&tx, None);
        assert!(rx.has_changed().unwrap());
    }
}
