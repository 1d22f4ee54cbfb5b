//! The daemon's local API (gRPC over a unix socket) that the CLI talks to.

pub mod client;
pub mod server;

/// Generated from `proto/discoveryd/v1/local.proto`.
pub mod proto {
    tonic::include_proto!("discoveryd.v1");
}

use crate::store::{ChangeKind, Resource};

pub fn resource_to_proto(resource: &Resource) -> proto::Resource {
    proto::Resource {
        metadata: Some(proto::Metadata {
            namespace: resource.namespace.as_str().to_string(),
            r#type: resource.kind().type_name().to_string(),
            id: resource.id.clone(),
            version: resource.version,
        }),
        spec_json: resource.spec.to_json().to_string(),
    }
}

pub fn change_kind_to_proto(kind: ChangeKind) -> proto::watch_event::Kind {
    match kind {
        ChangeKind::Created => proto::watch_event::Kind::Created,
        ChangeKind::Updated => proto::watch_event::Kind::Updated,
        ChangeKind::Destroyed => proto::watch_event::Kind::Destroyed,
    }
}
