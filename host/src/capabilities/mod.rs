//! What each plugin may do beyond the basic host interface, in one place.
//!
//! An operator grants capabilities per plugin in the config (`plugins.<name>.grants`);
//! [`Grants`] is built from that once, and a [`Granter`] checks every use at the
//! boundary. Host functions ask the granter; they never re-derive policy. A
//! capability that was not granted is not even reachable: the cluster key, for
//! one, lives inside the crypto grant.
//!
//! A plugin may declare the capabilities it cannot work without (a custom section
//! that the SDK writes, see [`needs`]); a plugin that needs what it was not granted
//! is refused at start, naming the plugin and the capability. A plugin that merely
//! calls an ungranted capability gets an error naming it, and the daemon logs once
//! which plugin asked for what.

pub mod crypto;
pub mod files;
pub mod grpc;
pub mod kube;
pub mod needs;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Mutex;

pub use crypto::ClusterCrypto;
pub use files::FileGrant;
pub use grpc::GrpcGrant;
pub use kube::KubeGrant;

/// A capability an operator can grant a plugin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Capability {
    /// Read-only directories (`grants.files`).
    Files,
    /// Sealing and opening with the cluster key (`grants.crypto`): the
    /// `cluster-crypto` WIT interface.
    ClusterCrypto,
    /// gRPC to the registry's endpoints and `grants.endpoints`: the `grpc` WIT
    /// interface.
    Grpc,
    /// Kubernetes Nodes with granted credentials (`grants.kubeconfig`, or the
    /// pod's service account for the `kubernetes` registry): `kube-nodes`.
    KubeNodes,
}

impl Capability {
    pub const ALL: [Capability; 4] = [
        Capability::Files,
        Capability::ClusterCrypto,
        Capability::Grpc,
        Capability::KubeNodes,
    ];

    /// The name plugins declare and errors print.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Files => "files",
            Capability::ClusterCrypto => "cluster-crypto",
            Capability::Grpc => "grpc",
            Capability::KubeNodes => "kube-nodes",
        }
    }

    /// The config field that grants it.
    pub fn grant_field(self) -> &'static str {
        match self {
            Capability::Files => "grants.files",
            Capability::ClusterCrypto => "grants.crypto",
            Capability::Grpc => "grants.endpoints",
            Capability::KubeNodes => "grants.kubeconfig",
        }
    }

    pub fn parse(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the operator granted one plugin.
#[derive(Clone, Debug, Default)]
pub struct Grants {
    /// Directories the plugin may read, and where it sees them.
    pub files: Vec<FileGrant>,
    /// The cluster identity, when `cluster-crypto` is granted and configured.
    pub crypto: Option<ClusterCrypto>,
    /// The gRPC endpoints it may call.
    pub grpc: GrpcGrant,
    /// Kubernetes Nodes, with these credentials.
    pub kube: Option<KubeGrant>,
}

impl Grants {
    /// Nothing at all: what a plugin gets while it only describes itself.
    pub fn none() -> Grants {
        Grants::default()
    }

    pub fn allows(&self, capability: Capability) -> bool {
        match capability {
            Capability::Files => !self.files.is_empty(),
            Capability::ClusterCrypto => self.crypto.is_some(),
            Capability::Grpc => !self.grpc.is_empty(),
            Capability::KubeNodes => self.kube.is_some(),
        }
    }

    /// Refuses a plugin that declares it needs a capability it was not granted.
    pub fn check_needs(&self, plugin: &str, needs: &[Capability]) -> Result<(), String> {
        match needs.iter().find(|c| !self.allows(**c)) {
            None => Ok(()),
            Some(missing) => Err(format!(
                "plugins.{}: the plugin needs the {} capability, which is not granted \
                 (set plugins.{0}.{})",
                plugin,
                missing,
                missing.grant_field()
            )),
        }
    }
}

/// The grants of one plugin, checked at every use; shared by its incarnations so
/// a denial is logged once per plugin, not once per restart.
pub struct Granter {
    plugin: String,
    grants: Grants,
    denied: Mutex<BTreeSet<Capability>>,
}

impl Granter {
    pub fn new(plugin: &str, grants: Grants) -> Granter {
        Granter {
            plugin: plugin.to_string(),
            grants,
            denied: Mutex::new(BTreeSet::new()),
        }
    }

    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// The crypto capability, or the error the plugin gets.
    pub fn crypto(&self) -> Result<&ClusterCrypto, String> {
        self.grants
            .crypto
            .as_ref()
            .ok_or_else(|| self.deny(Capability::ClusterCrypto))
    }

    /// The gRPC capability, or the error the plugin gets.
    pub fn grpc(&self) -> Result<&GrpcGrant, String> {
        match self.grants.grpc.is_empty() {
            true => Err(self.deny(Capability::Grpc)),
            false => Ok(&self.grants.grpc),
        }
    }

    /// The Kubernetes capability, or the error the plugin gets.
    pub fn kube(&self) -> Result<&KubeGrant, String> {
        self.grants
            .kube
            .as_ref()
            .ok_or_else(|| self.deny(Capability::KubeNodes))
    }

    /// The error for a use of an ungranted capability; the first one per
    /// capability is logged.
    fn deny(&self, capability: Capability) -> String {
        let first = self
            .denied
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(capability);
        if first {
            tracing::warn!(
                plugin = %self.plugin,
                capability = capability.name(),
                "plugin called a capability it was not granted (grant it with plugins.{}.{})",
                self.plugin,
                capability.grant_field(),
            );
        }
        denied_message(&self.plugin, capability)
    }
}

/// An error and its causes on one line, skipping causes its text already holds.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

fn denied_message(plugin: &str, capability: Capability) -> String {
    format!(
        "capability {capability} is not granted to plugin {plugin} (plugins.{plugin}.{})",
        capability.grant_field()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ungranted_capability_is_an_error_naming_it() {
        let granter = Granter::new("static", Grants::none());
        let error = granter.crypto().unwrap_err();
        assert_eq!(
            error,
            "capability cluster-crypto is not granted to plugin static (plugins.static.grants.crypto)"
        );
        // Denials are remembered, so only the first is logged.
        granter.crypto().unwrap_err();
        assert_eq!(granter.denied.lock().unwrap().len(), 1);
    }

    #[test]
    fn declared_needs_must_be_granted() {
        let grants = Grants::none();
        assert_eq!(grants.check_needs("svc", &[]), Ok(()));
        let error = grants
            .check_needs("svc", &[Capability::ClusterCrypto])
            .unwrap_err();
        assert_eq!(
            error,
            "plugins.svc: the plugin needs the cluster-crypto capability, which is not granted \
             (set plugins.svc.grants.crypto)"
        );
    }

    #[test]
    fn capability_names_round_trip() {
        for c in Capability::ALL {
            assert_eq!(Capability::parse(c.name()), Some(c));
        }
        assert_eq!(Capability::parse("sockets"), None);
    }
}
