//! TLS with certificates reloaded when their files change (§4.12).
//!
//! The certificate lives behind a resolver consulted on every handshake, so a renewed
//! certificate (cert-manager, ACME) is picked up without a restart and without
//! dropping established connections. A broken renewal keeps the previous pair.

use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

/// Loads a PEM certificate chain and private key.
pub fn load(cert_path: &Path, key_path: &Path) -> anyhow::Result<CertifiedKey> {
    let certs = rustls_pemfile::certs(&mut BufReader::new(
        fs::File::open(cert_path).with_context(|| format!("open {}", cert_path.display()))?,
    ))
    .collect::<Result<Vec<_>, _>>()
    .with_context(|| format!("parse {}", cert_path.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "no certificate in {}",
        cert_path.display()
    );
    let key = rustls_pemfile::private_key(&mut BufReader::new(
        fs::File::open(key_path).with_context(|| format!("open {}", key_path.display()))?,
    ))
    .with_context(|| format!("parse {}", key_path.display()))?
    .with_context(|| format!("no private key in {}", key_path.display()))?;
    // Also checks that the key belongs to the certificate: a renewal caught between its
    // two file writes must not replace a working pair with a mismatched one.
    CertifiedKey::from_der(certs, key, &rustls::crypto::ring::default_provider())
        .context("certificate and private key do not form a usable pair")
}

/// What identifies a version of a file cheaply.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(p: &Path) -> Stamp {
    let m = fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len()))
}

#[derive(Debug)]
pub struct ReloadingCert {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamps: RwLock<(Stamp, Stamp)>,
}

impl ReloadingCert {
    /// Loads the pair now; failure here aborts startup (`failed to load certificate`).
    pub fn new(
        cert_path: impl Into<PathBuf>,
        key_path: impl Into<PathBuf>,
    ) -> anyhow::Result<Arc<Self>> {
        let (cert_path, key_path) = (cert_path.into(), key_path.into());
        let stamps = (stamp(&cert_path), stamp(&key_path));
        let ck = load(&cert_path, &key_path).context("failed to load certificate")?;
        Ok(Arc::new(Self {
            cert_path,
            key_path,
            current: RwLock::new(Arc::new(ck)),
            stamps: RwLock::new(stamps),
        }))
    }

    /// Reloads if either file changed; returns whether a new pair is in use.
    pub fn reload_if_changed(&self) -> bool {
        let now = (stamp(&self.cert_path), stamp(&self.key_path));
        if *self.stamps.read().unwrap_or_else(|e| e.into_inner()) == now {
            return false;
        }
        *self.stamps.write().unwrap_or_else(|e| e.into_inner()) = now;
        match load(&self.cert_path, &self.key_path) {
            Ok(ck) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ck);
                tracing::info!(path = %self.cert_path.display(), "reloaded certificate");
                true
            }
            Err(e) => {
                // Often a half-written renewal; the next change retries.
                tracing::warn!(error = %format!("{e:#}"), "failed to reload certificate, keeping the previous one");
                false
            }
        }
    }

    /// Polls the files until shutdown.
    pub async fn watch(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(every.max(Duration::from_millis(1)));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// TLS 1.2+ with ALPN h2 (gRPC) and http/1.1 (browsers on the site pages).
pub fn server_config(resolver: Arc<ReloadingCert>) -> anyhow::Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let (cert, key) = (dir.join("tls.crt"), dir.join("tls.key"));
        fs::write(&cert, ck.cert.pem()).unwrap();
        fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        (cert, key, ck.cert.der().to_vec())
    }

    fn current_der(r: &ReloadingCert) -> Vec<u8> {
        r.current.read().unwrap().cert[0].to_vec()
    }

    #[test]
    fn a_broken_renewal_keeps_the_previous_pair_and_a_good_one_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, first) = write_pair(dir.path());
        let r = ReloadingCert::new(&cert, &key).unwrap();
        assert!(!r.reload_if_changed(), "nothing changed");

        fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").unwrap();
        assert!(!r.reload_if_changed());
        assert_eq!(current_der(&r), first);

        // Half of a renewal: a new certificate next to the old key.
        let other = tempfile::tempdir().unwrap();
        let (new_cert, _, _) = write_pair(other.path());
        fs::copy(&new_cert, &cert).unwrap();
        assert!(!r.reload_if_changed());
        assert_eq!(current_der(&r), first);

        let (_, _, second) = write_pair(dir.path());
        assert!(r.reload_if_changed());
        assert_eq!(current_der(&r), second);
    }
}
