//! The public addresses discovery services see this node at, as plugins report
//! them (`set-public-address`). Talos keeps the first one forever (Q13); here the
//! set is recomputed from what the plugins currently report, in plugin-name
//! order, and an address goes when no plugin reports it any more. The local
//! affiliate adds them to its KubeSpan endpoints.

use std::collections::BTreeMap;
use std::net::IpAddr;

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::specs::AddressStatusSpec;
use crate::store::{Kind, Namespace, Spec, Store};

pub struct PublicAddresses {
    by_plugin: watch::Sender<BTreeMap<String, IpAddr>>,
}

impl Default for PublicAddresses {
    fn default() -> Self {
        PublicAddresses {
            by_plugin: watch::channel(BTreeMap::new()).0,
        }
    }
}

impl PublicAddresses {
    /// Records what `plugin` reports now (none clears it); watchers wake only
    /// on a change.
    pub fn set(&self, plugin: &str, address: Option<IpAddr>) {
        self.by_plugin.send_if_modified(|map| match address {
            Some(address) => map.insert(plugin.to_string(), address) != Some(address),
            None => map.remove(plugin).is_some(),
        });
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, IpAddr>> {
        self.by_plugin.subscribe()
    }
}

/// The addresses in plugin-name order, without duplicates.
pub fn ordered(by_plugin: &BTreeMap<String, IpAddr>) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = Vec::new();
    for address in by_plugin.values() {
        if !out.contains(address) {
            out.push(*address);
        }
    }
    out
}

/// Mirrors the reported addresses into the store as `AddressStatuses` in the
/// `cluster` namespace, one per reporting plugin (`cluster/service` for the
/// service registry, as in Talos), until shutdown.
pub async fn run(
    store: Arc<Store>,
    mut by_plugin: watch::Receiver<BTreeMap<String, IpAddr>>,
    shutdown: CancellationToken,
) {
    loop {
        let desired: Vec<(String, Spec)> = by_plugin
            .borrow_and_update()
            .iter()
            .map(|(plugin, ip)| {
                (
                    plugin.clone(),
                    Spec::AddressStatus(AddressStatusSpec::host(*ip)),
                )
            })
            .collect();
        store.sync_where(Namespace::Cluster, Kind::AddressStatus, |_| true, desired);
        tokio::select! {
            changed = by_plugin.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_follow_what_plugins_report_now() {
        let public = PublicAddresses::default();
        let mut changes = public.subscribe();
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "198.51.100.2".parse().unwrap();
        public.set("service", Some(a));
        public.set("another", Some(b));
        assert!(changes.has_changed().unwrap());
        assert_eq!(ordered(&changes.borrow_and_update()), [b, a]);
        public.set("service", Some(a));
        assert!(
            !changes.has_changed().unwrap(),
            "the same report is no change"
        );
        public.set("another", Some(a));
        assert_eq!(ordered(&changes.borrow_and_update()), [a], "no duplicates");
        public.set("another", None);
        public.set("service", None);
        assert!(
            ordered(&changes.borrow_and_update()).is_empty(),
            "gone when nobody reports it"
        );
    }

    #[tokio::test]
    async fn the_store_shows_what_is_reported_now() {
        let store = Store::new();
        let public = PublicAddresses::default();
        let shutdown = CancellationToken::new();
        let (_, mut events) = store.watch(Namespace::Cluster, Kind::AddressStatus);
        let mirror = tokio::spawn(run(store.clone(), public.subscribe(), shutdown.clone()));
        public.set("service", Some("203.0.113.7".parse().unwrap()));
        let created = events.recv().await.unwrap();
        assert_eq!(created.resource.id, "service");
        assert_eq!(
            created.resource.spec.to_json(),
            serde_json::json!({"address": "203.0.113.7/32"})
        );
        public.set("service", None);
        let destroyed = events.recv().await.unwrap();
        assert_eq!(destroyed.kind, crate::store::ChangeKind::Destroyed);
        shutdown.cancel();
        mirror.await.unwrap();
    }
}
