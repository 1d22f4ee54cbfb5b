//! Keeps `cluster` in step with its inputs: raw affiliates (from the plugins) and
//! the local affiliate become merged affiliates, and those become members.
//!
//! It recomputes everything on each change; the store turns that into per-resource
//! updates, so unchanged resources keep their versions and wake nobody.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::members::{self, DuplicateNodename};
use crate::merge;
use crate::specs::AffiliateSpec;
use crate::store::{Kind, Namespace, Spec, Store};

/// Runs until shutdown, reconciling after every change of either input.
pub async fn run(
    store: Arc<Store>,
    local_node_id: String,
    mut local: watch::Receiver<Option<AffiliateSpec>>,
    shutdown: CancellationToken,
) {
    let mut raw = store.raw_changes();
    let mut warned = BTreeSet::new();
    loop {
        raw.borrow_and_update();
        let local_spec = local.borrow_and_update().clone();
        let duplicates = reconcile(&store, &local_node_id, local_spec);
        warn_new_duplicates(&mut warned, duplicates);
        tokio::select! {
            _ = raw.changed() => {}
            changed = local.changed() => if changed.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// One pass: writes merged affiliates and members; returns the nodenames that
/// several nodes claim.
pub fn reconcile(
    store: &Store,
    local_node_id: &str,
    local: Option<AffiliateSpec>,
) -> Vec<DuplicateNodename> {
    let raw = store.list(Namespace::ClusterRaw, Kind::Affiliate);
    let raw_specs = raw.iter().filter_map(|r| match &*r.spec {
        Spec::Affiliate(spec) => Some((r.id.as_str(), spec)),
        _ => None,
    });
    let sources = merge::source_counts(raw_specs.clone());
    let mut affiliates = merge::merge(raw_specs);
    // The local affiliate is the host's own; a registry echoing it never wins.
    affiliates.remove(local_node_id);
    if let Some(local) = local {
        affiliates.insert(local_node_id.to_string(), local);
    }
    let members = members::members(affiliates.values(), local_node_id, |id| {
        sources.get(id).copied().unwrap_or(0)
    });
    store.sync(
        Namespace::Cluster,
        Kind::Affiliate,
        "",
        affiliates
            .into_iter()
            .map(|(id, spec)| (id, Spec::Affiliate(spec))),
    );
    store.sync(
        Namespace::Cluster,
        Kind::Member,
        "",
        members
            .members
            .into_iter()
            .map(|(name, spec)| (name, Spec::Member(spec))),
    );
    members.duplicates
}

/// Logs each duplicate nodename once, not on every pass.
fn warn_new_duplicates(warned: &mut BTreeSet<String>, duplicates: Vec<DuplicateNodename>) {
    let current: BTreeSet<String> = duplicates.iter().map(|d| d.nodename.clone()).collect();
    for d in duplicates {
        if !warned.contains(&d.nodename) {
            tracing::warn!(
                nodename = %d.nodename, kept = %d.kept, dropped = ?d.dropped,
                "duplicate nodename: several nodes claim it; keeping one"
            );
        }
    }
    *warned = current;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::specs::MachineType;

    fn spec(node_id: &str, nodename: &str, addresses: &[&str]) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            nodename: nodename.into(),
            hostname: nodename.into(),
            machine_type: MachineType::Worker,
            addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_local_become_affiliates_and_members() {
        let store = Store::new();
        let raw = Namespace::ClusterRaw;
        store.put(
            raw,
            "k8s/n2",
            Spec::Affiliate(spec("n2", "node-2", &["10.0.0.2"])),
        );
        store.put(
            raw,
            "static/n2",
            Spec::Affiliate(spec("n2", "node-2", &["10.0.1.2"])),
        );
        store.put(
            raw,
            "static/n3",
            Spec::Affiliate(spec("n3", "", &["10.0.0.3"])),
        );
        store.put(
            raw,
            "static/n1",
            Spec::Affiliate(spec("n1", "impostor", &[])),
        );
        reconcile(&store, "n1", Some(spec("n1", "node-1", &["10.0.0.1"])));

        let affiliates = store.list(Namespace::Cluster, Kind::Affiliate);
        let ids: Vec<&str> = affiliates.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["n1", "n2", "n3"]);
        let Spec::Affiliate(n2) = &*affiliates[1].spec else {
            panic!()
        };
        assert_eq!(
            n2.addresses.len(),
            2,
            "both registries' addresses are merged"
        );
        let Spec::Affiliate(n1) = &*affiliates[0].spec else {
            panic!()
        };
        assert_eq!(
            n1.nodename, "node-1",
            "the local affiliate wins over an echo"
        );

        let members: Vec<String> = store
            .list(Namespace::Cluster, Kind::Member)
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(
            members,
            ["node-1", "node-2"],
            "n3 has no nodename, so it is no member"
        );
    }

    #[test]
    fn removed_raw_affiliates_disappear_and_unchanged_ones_keep_versions() {
        let store = Store::new();
        let raw = Namespace::ClusterRaw;
        store.put(raw, "static/a", Spec::Affiliate(spec("a", "node-a", &[])));
        store.put(raw, "static/b", Spec::Affiliate(spec("b", "node-b", &[])));
        reconcile(&store, "self", None);
        store.remove(raw, Kind::Affiliate, "static/b");
        reconcile(&store, "self", None);
        let members = store.list(Namespace::Cluster, Kind::Member);
        assert_eq!(members.len(), 1);
        assert_eq!(members[0].version, 1);
    }

    #[test]
    fn duplicate_nodenames_are_reported() {
        let store = Store::new();
        let raw = Namespace::ClusterRaw;
        store.put(
            raw,
            "static/old",
            Spec::Affiliate(spec("old", "node-x", &[])),
        );
        store.put(
            raw,
            "static/new",
            Spec::Affiliate(spec("new", "node-x", &[])),
        );
        store.put(raw, "k8s/new", Spec::Affiliate(spec("new", "node-x", &[])));
        let duplicates = reconcile(&store, "self", None);
        assert_eq!(duplicates.len(), 1);
        assert_eq!(duplicates[0].kept, "new", "seen by more registries");
    }
}
