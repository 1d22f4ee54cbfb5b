//! The daemon's local API (gRPC over a unix socket) that the CLI talks to.

pub mod client;
pub mod server;

/// Generated from `proto/discoveryd/v1/local.proto`.
pub mod proto {
    tonic::include_proto!("discoveryd.v1");
}

use std::collections::HashMap;

use crate::store::{ChangeKind, Kind, Namespace, Resource, Spec, Store};
use crate::timestamp;

/// Which registries report each node: the `sources` of merged affiliates.
pub struct Sources {
    local_node_id: Option<String>,
    by_node: HashMap<String, Vec<proto::Source>>,
}

impl Sources {
    /// Whether resources of this type in this namespace carry sources.
    pub fn apply_to(namespace: Namespace, kind: Kind) -> bool {
        namespace == Namespace::Cluster && kind == Kind::Affiliate
    }

    /// The sources as the store holds them now: one pass over the raw affiliates.
    pub fn of(store: &Store) -> Sources {
        let local_node_id = store
            .get(Namespace::Cluster, Kind::Identity, "local")
            .and_then(|r| match &*r.spec {
                Spec::Identity(identity) => Some(identity.node_id.clone()),
                _ => None,
            });
        let mut by_node: HashMap<String, Vec<proto::Source>> = HashMap::new();
        // Sorted by resource ID, so each node's registries come in prefix order.
        for raw in store.list(Namespace::ClusterRaw, Kind::Affiliate) {
            let Spec::Affiliate(spec) = &*raw.spec else {
                continue;
            };
            let registry = raw
                .id
                .split_once('/')
                .map_or(&*raw.id, |(prefix, _)| prefix);
            by_node
                .entry(spec.node_id.clone())
                .or_default()
                .push(proto::Source {
                    registry: registry.to_string(),
                    first_seen: timestamp::format(raw.first_seen),
                    last_seen: timestamp::format(raw.last_seen),
                });
        }
        Sources {
            local_node_id,
            by_node,
        }
    }

    /// The sources of one node: `local` for this node's own affiliate, which no
    /// registry feeds (a registry echoing it is not its source).
    pub fn of_node(&self, node_id: &str) -> Vec<proto::Source> {
        if self.local_node_id.as_deref() == Some(node_id) {
            return vec![proto::Source {
                registry: "local".into(),
                ..Default::default()
            }];
        }
        self.by_node.get(node_id).cloned().unwrap_or_default()
    }
}

/// A resource for the API. Raw affiliates carry their own first/last-seen times;
/// merged affiliates carry `sources` (pass them; see `Sources::apply_to`).
pub fn resource_to_proto(resource: &Resource, sources: Option<&Sources>) -> proto::Resource {
    let raw = resource.namespace == Namespace::ClusterRaw;
    let seen = |time| match raw {
        true => timestamp::format(time),
        false => String::new(),
    };
    let sources = match sources {
        Some(sources) if Sources::apply_to(resource.namespace, resource.kind()) => {
            sources.of_node(&resource.id)
        }
        _ => Vec::new(),
    };
    proto::Resource {
        metadata: Some(proto::Metadata {
            namespace: resource.namespace.as_str().to_string(),
            r#type: resource.kind().type_name().to_string(),
            id: resource.id.clone(),
            version: resource.version,
            first_seen: seen(resource.first_seen),
            last_seen: seen(resource.last_seen),
        }),
        spec_json: resource.spec.to_json().to_string(),
        sources,
    }
}

pub fn change_kind_to_proto(kind: ChangeKind) -> proto::watch_event::Kind {
    match kind {
        ChangeKind::Created => proto::watch_event::Kind::Created,
        ChangeKind::Updated => proto::watch_event::Kind::Updated,
        ChangeKind::Destroyed => proto::watch_event::Kind::Destroyed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::specs::{AffiliateSpec, IdentitySpec};
    use crate::store::RawWriter;

    fn affiliate(node_id: &str) -> AffiliateSpec {
        AffiliateSpec {
            node_id: node_id.into(),
            nodename: format!("{node_id}-name"),
            ..Default::default()
        }
    }

    #[test]
    fn merged_affiliates_carry_their_registries_and_raw_ones_their_times() {
        let store = Store::new();
        let identity = Spec::Identity(IdentitySpec {
            node_id: "self-id".into(),
        });
        store.put(Namespace::Cluster, "local", identity);
        RawWriter::new(store.clone(), "static").publish(vec![affiliate("a"), affiliate("self-id")]);
        RawWriter::new(store.clone(), "k8s").publish(vec![affiliate("a")]);
        crate::reconcile::reconcile(&store, "self-id", Some(affiliate("self-id")));

        let sources = Sources::of(&store);
        let merged = store.get(Namespace::Cluster, Kind::Affiliate, "a").unwrap();
        let proto = resource_to_proto(&merged, Some(&sources));
        let registries: Vec<&str> = proto.sources.iter().map(|s| s.registry.as_str()).collect();
        assert_eq!(registries, ["k8s", "static"]);
        let raw = store
            .get(Namespace::ClusterRaw, Kind::Affiliate, "k8s/a")
            .unwrap();
        assert_eq!(
            proto.sources[0].first_seen,
            timestamp::format(raw.first_seen)
        );
        assert_eq!(proto.sources[0].last_seen, timestamp::format(raw.last_seen));
        let meta = proto.metadata.unwrap();
        assert!(
            meta.first_seen.is_empty(),
            "times of merged ones are per source"
        );

        // This node's own affiliate: `local`, even though a registry echoes it.
        let local = store
            .get(Namespace::Cluster, Kind::Affiliate, "self-id")
            .unwrap();
        let proto = resource_to_proto(&local, Some(&sources));
        assert_eq!(
            proto.sources,
            [proto::Source {
                registry: "local".into(),
                ..Default::default()
            }]
        );

        let proto = resource_to_proto(&raw, None);
        let meta = proto.metadata.unwrap();
        assert_eq!(meta.first_seen, timestamp::format(raw.first_seen));
        assert_eq!(meta.last_seen, timestamp::format(raw.last_seen));
        assert!(proto.sources.is_empty());
        // Members carry neither.
        let member = &store.list(Namespace::Cluster, Kind::Member)[0];
        let proto = resource_to_proto(member, Some(&sources));
        assert!(proto.sources.is_empty() && proto.metadata.unwrap().first_seen.is_empty());
    }
}
