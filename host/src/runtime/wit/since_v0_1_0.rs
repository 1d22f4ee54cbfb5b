//! `discovery:registry@0.1.x` (0.1.1 now; guests built against 0.1.0 link to it by
//! semver, since 0.1.1 only added imports): its generated bindings, the host side of its
//! imports (each a thin translation into the host API, `runtime/host_api.rs`, and the
//! capabilities), and conversions between its types and ours.
//!
//! Every import is async (it may wait, like `next-event`) and trappable (the host
//! can end a plugin that breaks the contract).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use wasmtime::Store;
use wasmtime::component::{HasSelf, Linker};

use super::RegistryInfo;
use crate::capabilities::grpc::CallEvent;
use crate::capabilities::kube::{KubeError, KubeEvent, KubeRequest, NodeView};
use crate::runtime::host_api::Event;
use crate::runtime::state::PluginState;
use crate::specs::{AffiliateSpec, ControlPlaneSpec, IpPrefix, KubeSpanSpec, MachineType};

wasmtime::component::bindgen!({
    path: "../wit",
    world: "registry-plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

use discovery::registry::{cluster_crypto, grpc, host, kube_nodes, types};

pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    RegistryPlugin::add_to_linker::<_, HasSelf<_>>(linker, |state| state)
}

pub async fn describe(
    plugin: &RegistryPlugin,
    store: &mut Store<PluginState>,
    config: &str,
) -> wasmtime::Result<Result<RegistryInfo, String>> {
    let info = plugin
        .discovery_registry_registry()
        .call_describe(store, config)
        .await?;
    Ok(info.map(|i| RegistryInfo { prefix: i.prefix }))
}

impl types::Host for PluginState {}

impl host::Host for PluginState {
    async fn log(&mut self, level: types::LogLevel, message: String) -> wasmtime::Result<()> {
        let level = match level {
            types::LogLevel::Trace => tracing::Level::TRACE,
            types::LogLevel::Debug => tracing::Level::DEBUG,
            types::LogLevel::Info => tracing::Level::INFO,
            types::LogLevel::Warn => tracing::Level::WARN,
            types::LogLevel::Error => tracing::Level::ERROR,
        };
        PluginState::log(self, level, &message);
        Ok(())
    }

    async fn local_affiliate(&mut self) -> wasmtime::Result<Option<types::Affiliate>> {
        Ok(PluginState::local_affiliate(self)
            .as_ref()
            .map(affiliate_to_wit))
    }

    async fn publish(
        &mut self,
        affiliates: Vec<types::Affiliate>,
    ) -> wasmtime::Result<Vec<host::Rejection>> {
        let total = affiliates.len();
        let entries = affiliates
            .into_iter()
            .map(|a| (a.node_id.clone(), affiliate_from_wit(a)));
        let rejected = PluginState::publish(self, entries, total)?;
        Ok(rejected
            .into_iter()
            .map(|r| host::Rejection {
                index: r.index,
                node_id: r.node_id,
                reason: r.reason,
            })
            .collect())
    }

    async fn set_status(&mut self, healthy: bool, message: String) -> wasmtime::Result<()> {
        PluginState::set_status(self, healthy, &message);
        Ok(())
    }

    async fn next_event(&mut self, timeout_ms: u32) -> wasmtime::Result<host::Event> {
        let timeout = std::time::Duration::from_millis(timeout_ms.into());
        Ok(match PluginState::next_event(self, timeout).await? {
            Event::Timeout => host::Event::Timeout,
            Event::LocalChanged => host::Event::LocalChanged,
            Event::Shutdown => host::Event::Shutdown,
            Event::Ready(handle) => host::Event::Ready(handle),
        })
    }

    async fn set_public_address(
        &mut self,
        address: Option<types::IpAddress>,
    ) -> wasmtime::Result<()> {
        PluginState::set_public_address(self, address.map(ip_from_wit));
        Ok(())
    }

    async fn leaving(&mut self) -> wasmtime::Result<bool> {
        Ok(PluginState::leaving(self))
    }

    async fn daemon_version(&mut self) -> wasmtime::Result<String> {
        Ok(PluginState::daemon_version(self))
    }
}

impl grpc::Host for PluginState {
    async fn open_channel(
        &mut self,
        endpoint: String,
        keepalive_ms: u32,
    ) -> wasmtime::Result<Result<u32, String>> {
        let keepalive = std::time::Duration::from_millis(keepalive_ms.into());
        Ok(self.grpc_open_channel(&endpoint, keepalive))
    }

    async fn start_unary(
        &mut self,
        channel: u32,
        method: String,
        request: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.grpc_start(channel, &method, request, timeout(timeout_ms), false))
    }

    async fn start_server_stream(
        &mut self,
        channel: u32,
        method: String,
        request: Vec<u8>,
        timeout_ms: u32,
    ) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.grpc_start(channel, &method, request, timeout(timeout_ms), true))
    }

    async fn next(&mut self, call: u32) -> wasmtime::Result<Option<grpc::CallEvent>> {
        Ok(self.call_next::<CallEvent>(call).map(|event| match event {
            CallEvent::Message(bytes) => grpc::CallEvent::Message(bytes.to_vec()),
            CallEvent::Finished { code, message } => {
                grpc::CallEvent::Finished(grpc::Status { code, message })
            }
        }))
    }

    async fn close_call(&mut self, call: u32) -> wasmtime::Result<()> {
        self.call_close(call);
        Ok(())
    }
}

impl kube_nodes::Host for PluginState {
    async fn start_list(&mut self) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.kube_start(KubeRequest::List))
    }

    async fn start_get(&mut self, name: String) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.kube_start(KubeRequest::Get(name)))
    }

    async fn start_patch_annotations(
        &mut self,
        name: String,
        changes: Vec<(String, Option<String>)>,
    ) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.kube_start(KubeRequest::PatchAnnotations(name, changes)))
    }

    async fn start_watch(&mut self) -> wasmtime::Result<Result<u32, String>> {
        Ok(self.kube_start(KubeRequest::Watch))
    }

    async fn next(&mut self, call: u32) -> wasmtime::Result<Option<kube_nodes::KubeEvent>> {
        let nodes = |list: Vec<NodeView>| list.into_iter().map(node_to_wit).collect();
        Ok(self.call_next::<KubeEvent>(call).map(|event| match event {
            KubeEvent::Nodes(list) => kube_nodes::KubeEvent::Nodes(nodes(list)),
            KubeEvent::Synced(list) => kube_nodes::KubeEvent::Synced(nodes(list)),
            KubeEvent::Applied(node) => kube_nodes::KubeEvent::Applied(node_to_wit(node)),
            KubeEvent::Deleted(node) => kube_nodes::KubeEvent::Deleted(node_to_wit(node)),
            KubeEvent::Failed(e) => kube_nodes::KubeEvent::Failed(kube_error_to_wit(e)),
            KubeEvent::Done(result) => {
                kube_nodes::KubeEvent::Done(result.map_err(kube_error_to_wit))
            }
        }))
    }

    async fn close_call(&mut self, call: u32) -> wasmtime::Result<()> {
        self.call_close(call);
        Ok(())
    }
}

fn node_to_wit(node: NodeView) -> kube_nodes::Node {
    kube_nodes::Node {
        name: node.name,
        resource_version: node.resource_version,
        labels: node.labels,
        annotations: node.annotations,
        addresses: node.addresses,
        os_image: node.os_image,
    }
}

fn kube_error_to_wit(e: KubeError) -> kube_nodes::KubeError {
    kube_nodes::KubeError {
        status: e.status,
        message: e.message,
    }
}

/// A call's timeout; 0 means none.
fn timeout(ms: u32) -> Option<std::time::Duration> {
    (ms > 0).then(|| std::time::Duration::from_millis(ms.into()))
}

impl cluster_crypto::Host for PluginState {
    async fn cluster_id(&mut self) -> wasmtime::Result<Option<String>> {
        // The ID is part of the capability: without the grant, there is none.
        Ok(self.ctx.granter.crypto().ok().and_then(|c| c.cluster_id()))
    }

    async fn seal(&mut self, plaintext: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        Ok(self.ctx.granter.crypto().and_then(|c| c.seal(&plaintext)))
    }

    async fn open(&mut self, sealed: Vec<u8>) -> wasmtime::Result<Result<Vec<u8>, String>> {
        Ok(self.ctx.granter.crypto().and_then(|c| c.open(&sealed)))
    }

    async fn seal_affiliate(
        &mut self,
        affiliate: types::Affiliate,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        Ok(self
            .ctx
            .granter
            .crypto()
            .and_then(|c| c.seal_affiliate(affiliate_from_wit(affiliate)?)))
    }

    async fn open_affiliate(
        &mut self,
        sealed: Vec<u8>,
    ) -> wasmtime::Result<Result<types::Affiliate, String>> {
        Ok(self
            .ctx
            .granter
            .crypto()
            .and_then(|c| c.open_affiliate(&sealed))
            .map(|spec| affiliate_to_wit(&spec)))
    }

    async fn seal_endpoint(
        &mut self,
        endpoint: types::Endpoint,
    ) -> wasmtime::Result<Result<Vec<u8>, String>> {
        Ok(self
            .ctx
            .granter
            .crypto()
            .and_then(|c| c.seal_endpoint(endpoint_from_wit(endpoint))))
    }

    async fn open_endpoint(
        &mut self,
        sealed: Vec<u8>,
    ) -> wasmtime::Result<Result<types::Endpoint, String>> {
        Ok(self
            .ctx
            .granter
            .crypto()
            .and_then(|c| c.open_endpoint(&sealed))
            .map(endpoint_to_wit))
    }
}

/// A plugin's affiliate in our types. Fails only for what our types cannot hold
/// (a prefix longer than its address); everything else is checked by
/// `validate`.
fn affiliate_from_wit(a: types::Affiliate) -> Result<AffiliateSpec, String> {
    let kubespan = match a.kubespan {
        None => None,
        Some(k) => Some(KubeSpanSpec {
            public_key: k.public_key,
            address: k.address.map(ip_from_wit),
            additional_addresses: prefixes_from_wit(
                "kubespan.additional-addresses",
                k.additional_addresses,
            )?,
            endpoints: k.endpoints.into_iter().map(endpoint_from_wit).collect(),
            exclude_advertised_networks: prefixes_from_wit(
                "kubespan.exclude-advertised-networks",
                k.exclude_advertised_networks,
            )?,
        }),
    };
    Ok(AffiliateSpec {
        node_id: a.node_id,
        addresses: a.addresses.into_iter().map(ip_from_wit).collect(),
        hostname: a.hostname,
        nodename: a.nodename,
        operating_system: a.operating_system,
        machine_type: machine_type_from_wit(a.machine_type),
        kubespan,
        control_plane: a.control_plane.map(|cp| ControlPlaneSpec {
            port: cp.api_server_port,
        }),
    })
}

fn prefixes_from_wit(field: &str, list: Vec<types::IpPrefix>) -> Result<Vec<IpPrefix>, String> {
    list.into_iter()
        .map(|p| {
            let addr = ip_from_wit(p.address);
            IpPrefix::new(addr, p.bits)
                .ok_or_else(|| format!("{field}: {addr}/{} is not a prefix", p.bits))
        })
        .collect()
}

fn ip_from_wit(ip: types::IpAddress) -> IpAddr {
    match ip {
        types::IpAddress::Ipv4((a, b, c, d)) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        types::IpAddress::Ipv6((a, b, c, d, e, f, g, h)) => {
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h))
        }
    }
}

fn ip_to_wit(ip: IpAddr) -> types::IpAddress {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            types::IpAddress::Ipv4((a, b, c, d))
        }
        IpAddr::V6(v6) => {
            let [a, b, c, d, e, f, g, h] = v6.segments();
            types::IpAddress::Ipv6((a, b, c, d, e, f, g, h))
        }
    }
}

fn endpoint_from_wit(e: types::Endpoint) -> SocketAddr {
    SocketAddr::new(ip_from_wit(e.address), e.port)
}

fn endpoint_to_wit(e: SocketAddr) -> types::Endpoint {
    types::Endpoint {
        address: ip_to_wit(e.ip()),
        port: e.port(),
    }
}

fn machine_type_from_wit(m: types::MachineType) -> MachineType {
    match m {
        types::MachineType::Unknown => MachineType::Unknown,
        types::MachineType::Init => MachineType::Init,
        types::MachineType::Controlplane => MachineType::Controlplane,
        types::MachineType::Worker => MachineType::Worker,
    }
}

fn machine_type_to_wit(m: MachineType) -> types::MachineType {
    match m {
        MachineType::Unknown => types::MachineType::Unknown,
        MachineType::Init => types::MachineType::Init,
        MachineType::Controlplane => types::MachineType::Controlplane,
        MachineType::Worker => types::MachineType::Worker,
    }
}

fn prefix_to_wit(p: &IpPrefix) -> types::IpPrefix {
    types::IpPrefix {
        address: ip_to_wit(p.addr),
        bits: p.bits,
    }
}

/// The host's spec as plugins see it.
fn affiliate_to_wit(spec: &AffiliateSpec) -> types::Affiliate {
    types::Affiliate {
        node_id: spec.node_id.clone(),
        hostname: spec.hostname.clone(),
        nodename: spec.nodename.clone(),
        machine_type: machine_type_to_wit(spec.machine_type),
        operating_system: spec.operating_system.clone(),
        addresses: spec.addresses.iter().copied().map(ip_to_wit).collect(),
        kubespan: spec.kubespan.as_ref().map(|k| types::Kubespan {
            public_key: k.public_key.clone(),
            address: k.address.map(ip_to_wit),
            additional_addresses: k.additional_addresses.iter().map(prefix_to_wit).collect(),
            endpoints: k.endpoints.iter().copied().map(endpoint_to_wit).collect(),
            exclude_advertised_networks: k
                .exclude_advertised_networks
                .iter()
                .map(prefix_to_wit)
                .collect(),
        }),
        control_plane: spec.control_plane.map(|cp| types::ControlPlane {
            api_server_port: cp.port,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::validate;

    #[test]
    fn round_trips_a_full_affiliate() {
        let spec = AffiliateSpec {
            node_id: "abc".into(),
            addresses: vec!["10.0.0.1".parse().unwrap(), "2001:db8::1".parse().unwrap()],
            hostname: "h".into(),
            nodename: "n".into(),
            operating_system: "os".into(),
            machine_type: MachineType::Controlplane,
            kubespan: Some(KubeSpanSpec {
                public_key: "PLPNBddmTgHJhtw0vxltq1ZBdPP9RNOEUd5JjJZzBRY=".into(),
                address: Some("fd50::1".parse().unwrap()),
                additional_addresses: vec!["10.244.0.0/24".parse().unwrap()],
                endpoints: vec!["[2001:db8::1]:51820".parse().unwrap()],
                exclude_advertised_networks: vec!["0.0.0.0/0".parse().unwrap()],
            }),
            control_plane: Some(ControlPlaneSpec { port: 6443 }),
        };
        let back = affiliate_from_wit(affiliate_to_wit(&spec)).unwrap();
        assert_eq!(validate::affiliate(back).unwrap(), spec);
    }

    #[test]
    fn prefixes_longer_than_their_address_cannot_be_converted() {
        let mut wit = affiliate_to_wit(&AffiliateSpec {
            node_id: "p".into(),
            ..Default::default()
        });
        wit.kubespan = Some(types::Kubespan {
            public_key: String::new(),
            address: None,
            additional_addresses: vec![types::IpPrefix {
                address: ip_to_wit("10.0.0.0".parse().unwrap()),
                bits: 40,
            }],
            endpoints: vec![],
            exclude_advertised_networks: vec![],
        });
        assert_eq!(
            affiliate_from_wit(wit).unwrap_err(),
            "kubespan.additional-addresses: 10.0.0.0/40 is not a prefix"
        );
    }
}
