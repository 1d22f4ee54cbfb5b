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
        Spec::Affiliate(spec) => Some((r.id.as_str(), spec, r.first_seen)),
        _ => None,
    });
    let sightings = members::sightings(raw_specs.clone().map(|(_, spec, first)| (spec, first)));
    let mut affiliates = merge::merge(raw_specs.map(|(id, spec, _)| (id, spec)));
    // The local affiliate is the host's own; a registry echoing it never wins.
    affiliates.remove(local_node_id);
    if let Some(local) = local {
        affiliates.insert(local_node_id.to_string(), local);
    }
    let members = members::members(affiliates.values(), local_node_id, |id| {
        sightings.get(id).copied().unwrap_or_default()
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

    /// A node reinstalled with a new identity: the old one lingers in two
    /// registries, the new one is first seen later in one. The newer identity
    /// becomes the member, and the duplicate is reported.
    #[test]
    fn a_reinstalled_node_replaces_its_lingering_old_identity() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{Duration, SystemTime};
        let now = Arc::new(AtomicU64::new(0));
        let clock = now.clone();
        let store = Arc::new(Store::with_clock(Box::new(move || {
            SystemTime::UNIX_EPOCH + Duration::from_secs(clock.load(Ordering::SeqCst))
        })));
        let k8s = crate::store::RawWriter::new(store.clone(), "k8s");
        let service = crate::store::RawWriter::new(store.clone(), "service");
        now.store(100, Ordering::SeqCst);
        k8s.publish(vec![spec("old", "node-x", &[])]);
        service.publish(vec![spec("old", "node-x", &[])]);
        let duplicates = reconcile(&store, "self", None);
        assert!(duplicates.is_empty());

        now.store(200, Ordering::SeqCst);
        service.publish(vec![
            spec("old", "node-x", &[]),
            spec("zzz-new", "node-x", &[]),
        ]);
        let duplicates = reconcile(&store, "self", None);
        assert_eq!(
            duplicates,
            vec![DuplicateNodename {
                nodename: "node-x".into(),
                kept: "zzz-new".into(),
                dropped: vec!["old".into()],
            }],
            "first seen most recently beats more registries and the smaller ID"
        );
        let member = store
            .get(Namespace::Cluster, Kind::Member, "node-x")
            .unwrap();
        let Spec::Member(member) = &*member.spec else {
            panic!()
        };
        assert_eq!(member.node_id, "zzz-new");
    }
}
