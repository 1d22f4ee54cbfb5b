//! Exercises `cluster-crypto` through the host and publishes the results as one
//! peer, so a test can check them against its own AES with the same secret:
//! - hostname: the cluster ID the host reports;
//! - nodename: the hex of the sealed endpoint 192.168.3.4:51820 (deterministic);
//! - operating-system: `ok` if sealing and opening the local affiliate, raw bytes
//!   and the endpoint all round-trip, else what failed.

use discovery_sdk::crypto::{
    cluster_id, open, open_affiliate, open_endpoint, seal, seal_affiliate, seal_endpoint,
};
use discovery_sdk::{Affiliate, Endpoint, MachineType, Registry, export_registry, publish};

struct CryptoProbe;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check(local: &Affiliate, endpoint: Endpoint) -> Result<String, String> {
    let sealed = seal_affiliate(local)?;
    if open_affiliate(&sealed)? != *local {
        return Err("affiliate did not round-trip".into());
    }
    if open(&seal(b"hello")?)? != b"hello" {
        return Err("bytes did not round-trip".into());
    }
    let blob = seal_endpoint(endpoint)?;
    if seal_endpoint(endpoint)? != blob || open_endpoint(&blob)? != endpoint {
        return Err("endpoint sealing is not deterministic or does not round-trip".into());
    }
    if open(b"too short").is_ok() {
        return Err("short data opened".into());
    }
    Ok(hex(&blob))
}

impl Registry for CryptoProbe {
    const PREFIX: &'static str = "probe";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(CryptoProbe)
    }

    fn on_local_change(&mut self, local: Option<Affiliate>) -> Result<(), String> {
        let local = local.ok_or("no local affiliate")?;
        let endpoint: Endpoint = "192.168.3.4:51820".parse().map_err(|e| format!("{e}"))?;
        let (blob, verdict) = match check(&local, endpoint) {
            Ok(blob) => (blob, "ok".to_string()),
            Err(e) => (String::new(), e),
        };
        publish(&[Affiliate {
            node_id: "probe-peer".into(),
            hostname: cluster_id().unwrap_or_default(),
            nodename: blob,
            machine_type: MachineType::Worker,
            operating_system: verdict,
            addresses: vec![],
            kubespan: None,
            control_plane: None,
        }]);
        Ok(())
    }
}

export_registry!(CryptoProbe);
