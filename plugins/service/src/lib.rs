//! The `service` registry: this node publishes its sealed affiliate to
//! Sidero-compatible discovery services and watches everyone else's, as Talos's
//! discovery client does (reference §7, §8, §9.4), with the fixes of §12.
//!
//! Config (the daemon fills in `endpoints` from `cluster.discovery.registries
//! .service` or the `DiscoveryServiceConfig` documents):
//!
//! ```json
//! {"endpoints": [{"name": "default", "endpoint": "https://discovery.talos.dev/"}],
//!  "ttlSeconds": 1800}
//! ```
//!
//! One client per service ([`client`]); what they see is merged per node in
//! sorted service-name order ([`peers`]) and published as `service/<node-id>`.
//! Sealing goes through the host (`cluster-crypto`): the key never enters here.

pub mod client;
pub mod messages;
pub mod peers;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use discovery_sdk::crypto::{cluster_id, seal_affiliate, seal_endpoint};
use discovery_sdk::{
    Affiliate, Registry, daemon_version, export_registry, leaving, publish, set_public_address,
    set_status, wait_ready, warn,
};
use serde::Deserialize;

use client::{Client, Identity, LocalData};

/// Talos's TTL for its affiliate; the service keeps it at most this long.
const DEFAULT_TTL: Duration = Duration::from_secs(30 * 60);
/// How long leaving may spend deleting this node from the services.
const LEAVE_TIME: Duration = Duration::from_millis(2500);
/// An endpoint blob the service takes (Sidero's limit, Q20).
const ENDPOINT_BLOB_MAX: usize = discovery_common::sidero_limits::AFFILIATE_ENDPOINT_MAX;

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    endpoints: Vec<ServiceEndpoint>,
    ttl_seconds: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceEndpoint {
    name: String,
    endpoint: String,
}

impl Config {
    fn parse(json: &str) -> Result<Config, String> {
        let config: Config = serde_json::from_str(json).map_err(|e| e.to_string())?;
        if config.endpoints.is_empty() {
            return Err("endpoints: at least one discovery service is needed".into());
        }
        let max = discovery_common::sidero_limits::TTL_MAX.as_secs();
        if let Some(ttl) = config.ttl_seconds
            && !(1..=max).contains(&ttl)
        {
            return Err(format!("ttlSeconds: {ttl} is outside 1..={max}"));
        }
        Ok(config)
    }
}

struct Service {
    ttl: Duration,
    /// Sorted by name: merged views and the public IP follow that order.
    clients: Vec<Client>,
    me: Option<Identity>,
    /// The local affiliate last sealed, and what it sealed to.
    local: Option<(Affiliate, LocalData)>,
    published: Option<Vec<Affiliate>>,
    public_ip: Option<IpAddr>,
    status: String,
}

impl Registry for Service {
    const PREFIX: &'static str = "service";

    fn check_config(config: &str) -> Result<(), String> {
        Config::parse(config).map(|_| ())
    }

    fn new(config: &str) -> Result<Self, String> {
        let config = Config::parse(config)?;
        let ttl = config.ttl_seconds.map_or(DEFAULT_TTL, Duration::from_secs);
        let mut clients: Vec<Client> = config
            .endpoints
            .iter()
            .map(|e| Client::new(&e.name, &e.endpoint, ttl))
            .collect();
        clients.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Service {
            ttl,
            clients,
            me: None,
            local: None,
            published: None,
            public_ip: None,
            status: String::new(),
        })
    }

    fn on_local_change(&mut self, local: Option<Affiliate>) -> Result<(), String> {
        let Some(local) = local else {
            self.local = None;
            return Ok(());
        };
        if self.me.is_none() {
            let cluster_id = cluster_id().ok_or(
                "no cluster ID: the service registry needs cluster.id and cluster.secret \
                 (and the crypto grant)",
            )?;
            self.me = Some(Identity {
                cluster_id,
                node_id: local.node_id.clone(),
                client_version: daemon_version(),
                ttl: self.ttl,
            });
        }
        if self.local.as_ref().is_some_and(|(sent, _)| *sent == local) {
            // Identical data is not sent again (only refreshed every TTL/2).
            return Ok(());
        }
        let data = seal_affiliate(&local)?;
        let endpoints = self.seal_endpoints(&local);
        self.local = Some((local, LocalData { data, endpoints }));
        let me = self.me.as_ref().ok_or("no identity")?;
        let local = self.local.as_ref().map(|(_, data)| data);
        for client in &mut self.clients {
            client.local_changed(me, local);
        }
        self.report();
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        // Nothing to do before this node's identity is known.
        self.me.as_ref()?;
        self.clients.iter().filter_map(Client::deadline).min()
    }

    fn on_deadline(&mut self) -> Result<(), String> {
        let Some(me) = &self.me else { return Ok(()) };
        let local = self.local.as_ref().map(|(_, data)| data);
        for client in &mut self.clients {
            client.on_deadline(me, local);
        }
        self.report();
        Ok(())
    }

    fn on_ready(&mut self, call: u32) -> Result<(), String> {
        let Some(me) = &self.me else { return Ok(()) };
        let local = self.local.as_ref().map(|(_, data)| data);
        let Some(client) = self.clients.iter_mut().find(|c| c.owns(call)) else {
            return Ok(());
        };
        let changed = client.on_ready(call, me, local);
        if changed.public_ip {
            self.report_public_ip();
        }
        if changed.peers {
            self.publish_peers();
        }
        self.report();
        Ok(())
    }

    fn on_shutdown(&mut self) {
        if leaving() {
            self.leave();
        }
    }
}

impl Service {
    /// This node's KubeSpan endpoints, sealed; any over the service's size limit
    /// (a zoned IPv6 address, say) is dropped with a warning rather than making
    /// the service refuse the whole update (Q20).
    fn seal_endpoints(&self, local: &Affiliate) -> Vec<Vec<u8>> {
        let Some(kubespan) = &local.kubespan else {
            return Vec::new();
        };
        let mut sealed = Vec::new();
        for endpoint in &kubespan.endpoints {
            match seal_endpoint(*endpoint) {
                Ok(blob) if blob.len() <= ENDPOINT_BLOB_MAX => sealed.push(blob),
                Ok(blob) => warn!(
                    "endpoint {endpoint} seals to {} bytes, over the service's {ENDPOINT_BLOB_MAX}: not sent",
                    blob.len()
                ),
                Err(e) => warn!("endpoint {endpoint}: {e}"),
            }
        }
        sealed
    }

    fn publish_peers(&mut self) {
        let merged = peers::merge(self.clients.iter().map(|c| &c.peers));
        if self.published.as_ref() == Some(&merged) {
            return;
        }
        let rejected = publish(&merged);
        if let Some(first) = rejected.first() {
            warn!(
                "{} peers refused by the daemon, first {:?}: {}",
                rejected.len(),
                first.node_id,
                first.reason
            );
        }
        self.published = Some(merged);
    }

    /// The public IP of the first service, in name order, that reports one; none
    /// when no service does (Q13).
    fn report_public_ip(&mut self) {
        let ip = self.clients.iter().find_map(|c| c.public_ip);
        if ip != self.public_ip {
            self.public_ip = ip;
            set_public_address(ip);
        }
    }

    /// Says how each service is doing in `discoveryd plugins`.
    fn report(&mut self) {
        let synced = self.clients.iter().filter(|c| c.is_synced()).count();
        let peers = self.published.as_ref().map_or(0, Vec::len);
        let mut status = format!(
            "{peers} peers; {synced}/{} services synced",
            self.clients.len()
        );
        for client in &self.clients {
            if let Some(error) = &client.last_error {
                status.push_str(&format!("; {}: {error}", client.name));
            }
        }
        let skipped: u64 = self.clients.iter().map(|c| c.skipped).sum();
        if skipped > 0 {
            status.push_str(&format!("; {skipped} entries skipped"));
        }
        if status != self.status {
            set_status(synced > 0, &status);
            self.status = status;
        }
    }

    /// Deletes this node from every service, until one delete per service
    /// succeeds or the time is up (Q12: not forever).
    fn leave(&mut self) {
        use discovery_sdk::grpc::{CallEvent, OK};
        let Some(me) = &self.me else { return };
        let deadline = Instant::now() + LEAVE_TIME;
        let mut pending = Vec::new();
        for (i, client) in self.clients.iter().enumerate() {
            match client.start_delete(me) {
                Some(call) => pending.push((i, call)),
                None => warn!("{}: not connected, cannot delete this node", client.name),
            }
        }
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(ready) = wait_ready(left).filter(|_| !left.is_zero()) else {
                break;
            };
            let Some(at) = pending.iter().position(|(_, call)| call.id() == ready) else {
                continue;
            };
            match pending[at].1.next() {
                Some(CallEvent::Finished(status)) if status.code == OK => {
                    pending.swap_remove(at);
                }
                Some(CallEvent::Finished(_)) => {
                    let i = pending[at].0;
                    match self.clients[i].start_delete(me) {
                        Some(call) => pending[at].1 = call,
                        None => {
                            pending.swap_remove(at);
                        }
                    }
                }
                _ => {}
            }
        }
        for (i, _) in pending {
            warn!(
                "{}: could not delete this node before stopping",
                self.clients[i].name
            );
        }
    }
}

export_registry!(Service, needs = ["cluster-crypto", "grpc"]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_its_mistakes() {
        assert!(Config::parse(r#"{"endpoints":[{"name":"a","endpoint":"https://x/"}]}"#).is_ok());
        for (json, want) in [
            (r#"{"endpoints":[]}"#, "endpoints: at least one"),
            ("null", "invalid type: null"),
            (
                r#"{"endpoints":[{"name":"a","endpoint":"x"}],"ttlSeconds":3600}"#,
                "ttlSeconds: 3600 is outside 1..=1800",
            ),
            (r#"{"endpoints":[],"tll":1}"#, "unknown field `tll`"),
        ] {
            let error = Config::parse(json).err().unwrap();
            assert!(error.contains(want), "{json}: {error}");
        }
    }
}
