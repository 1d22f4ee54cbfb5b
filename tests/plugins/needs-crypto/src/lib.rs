//! Declares that it cannot work without `cluster-crypto`, so the daemon refuses
//! to start it without the grant. With the grant it publishes nothing and waits.

use discovery_sdk::{Registry, export_registry};

struct NeedsCrypto;

impl Registry for NeedsCrypto {
    const PREFIX: &'static str = "needs-crypto";

    fn new(_config: &str) -> Result<Self, String> {
        Ok(NeedsCrypto)
    }
}

export_registry!(NeedsCrypto, needs = ["cluster-crypto"]);
