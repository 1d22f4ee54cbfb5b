//! TLS serving and certificate reload (§4.12).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::etcd::Backend;
use common::*;
use discovery_service::proto::server::cluster_client::ClusterClient;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn self_signed() -> Pair {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Pair {
        cert_pem: ck.cert.pem(),
        key_pem: ck.key_pair.serialize_pem(),
        der: ck.cert.der().clone(),
    }
}

fn connector(trusted: &[CertificateDer<'static>]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in trusted {
        roots.add(c.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    TlsConnector::from(Arc::new(cfg))
}

/// The certificate the server presents on a fresh handshake.
async fn presented(
    addr: std::net::SocketAddr,
    trusted: &[CertificateDer<'static>],
) -> Option<CertificateDer<'static>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
    let tls = connector(trusted)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .ok()?;
    tls.get_ref()
        .1
        .peer_certificates()
        .map(|c| c[0].clone().into_owned())
}

async fn grpc_over_tls_and_reload_on_change(backend: Backend) {
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = self_signed();
    std::fs::write(&cert_path, &first.cert_pem).unwrap();
    std::fs::write(&key_path, &first.key_pem).unwrap();

    let mut cfg = backend.config("grpc_over_tls_and_reload_on_change");
    cfg.certificate_path = cert_path.display().to_string();
    cfg.key_path = key_path.display().to_string();
    let server = start(cfg).await;
    let addr = server.grpc_addr;

    let tls = connector(std::slice::from_ref(&first.der));
    let channel = Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let tls = tls.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(addr).await?;
                let s = tls
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(s))
            }
        }))
        .await
        .unwrap();
    let mut c = ClusterClient::new(channel);
    let r = c.hello(hello("c", "v1.0.0")).await.unwrap().into_inner();
    assert_eq!(hex::encode(&r.client_ip), "7f000001");

    // Replace the pair on disk; new handshakes must present the new certificate.
    let second = self_signed();
    std::fs::write(&key_path, &second.key_pem).unwrap();
    std::fs::write(&cert_path, &second.cert_pem).unwrap();
    let trusted = [first.der.clone(), second.der.clone()];
    within("certificate reload", async {
        loop {
            if presented(addr, &trusted).await.as_ref() == Some(&second.der) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The established connection keeps working.
    c.hello(hello("c", "v1.0.0")).await.unwrap();
    server.shutdown().await.unwrap();
}

async fn a_missing_certificate_aborts_start(backend: Backend) {
    let mut cfg = backend.config("a_missing_certificate_aborts_start");
    cfg.certificate_path = "/nonexistent/tls.crt".into();
    cfg.key_path = "/nonexistent/tls.key".into();
    let err = try_start(cfg).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("failed to load certificate"),
        "{err:#}"
    );
}

both_backends!(
    grpc_over_tls_and_reload_on_change,
    a_missing_certificate_aborts_start,
);
