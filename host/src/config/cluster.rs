//! The cluster identity: `cluster.id` and the key derived from `cluster.secret`.
//!
//! Apart because the secret needs care the other settings do not: its value is
//! never echoed back, in errors or in Debug output.

use std::sync::Arc;

use super::{ConfigError, err};
use crate::crypto::ClusterKey;

/// Cluster ID and the key from its secret (which never appears in Debug output).
#[derive(Clone, Debug)]
pub struct ClusterIdentity {
    /// Opaque: sent and hashed exactly as written.
    pub id: String,
    pub key: Arc<ClusterKey>,
}

/// The identity when both halves are set, none when neither is.
pub(super) fn validate_cluster(
    id: Option<String>,
    secret: Option<String>,
) -> Result<Option<ClusterIdentity>, ConfigError> {
    match (id, secret) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(err(
            "cluster.secret",
            "missing: cluster.id and cluster.secret are set together",
        )),
        (None, Some(_)) => Err(err(
            "cluster.id",
            "missing: cluster.id and cluster.secret are set together",
        )),
        (Some(id), Some(_)) if id.is_empty() => Err(err("cluster.id", "must not be empty")),
        (Some(id), Some(secret)) => {
            // The secret's value is never echoed back, even in errors.
            let key = ClusterKey::from_secret(&secret)
                .map_err(|e| err("cluster.secret", format!("{e} (value redacted)")))?;
            Ok(Some(ClusterIdentity {
                id,
                key: Arc::new(key),
            }))
        }
    }
}
