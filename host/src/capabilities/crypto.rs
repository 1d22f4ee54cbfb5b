//! The `cluster-crypto` capability: sealing and opening with the cluster key on a
//! plugin's behalf. The key stays here; a plugin only ever sees sealed bytes and
//! what they open to. Payloads a plugin asks to seal are validated like anything
//! it publishes.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::crypto::ClusterKey;
use crate::payload;
use crate::runtime::validate;
use crate::specs::AffiliateSpec;

/// The cluster identity as the crypto capability holds it.
#[derive(Clone, Debug, Default)]
pub struct ClusterCrypto {
    /// Opaque: handed out exactly as configured.
    pub cluster_id: Option<String>,
    pub key: Option<Arc<ClusterKey>>,
}

impl ClusterCrypto {
    fn key(&self) -> Result<&ClusterKey, String> {
        self.key
            .as_deref()
            .ok_or_else(|| "no cluster identity is configured (cluster.id, cluster.secret)".into())
    }

    pub fn cluster_id(&self) -> Option<String> {
        self.cluster_id.clone()
    }

    pub fn seal(&self, plaintext: &[u8]) -> Result<Vec<u8>, String> {
        Ok(self.key()?.seal(plaintext))
    }

    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, String> {
        self.key()?.open(sealed).map_err(|e| e.to_string())
    }

    /// Seals the affiliate's Sidero protobuf encoding, after checking it as a
    /// published one would be.
    pub fn seal_affiliate(&self, affiliate: AffiliateSpec) -> Result<Vec<u8>, String> {
        let key = self.key()?;
        let spec = validate::affiliate(affiliate)?;
        Ok(key.seal(&payload::encode(&spec)))
    }

    pub fn open_affiliate(&self, sealed: &[u8]) -> Result<AffiliateSpec, String> {
        let plain = self.key()?.open(sealed).map_err(|e| e.to_string())?;
        payload::decode(&plain).map_err(|e| e.to_string())
    }

    pub fn seal_endpoint(&self, endpoint: SocketAddr) -> Result<Vec<u8>, String> {
        Ok(self.key()?.seal_endpoint(endpoint))
    }

    pub fn open_endpoint(&self, sealed: &[u8]) -> Result<SocketAddr, String> {
        self.key()?.open_endpoint(sealed).map_err(|e| e.to_string())
    }
}
