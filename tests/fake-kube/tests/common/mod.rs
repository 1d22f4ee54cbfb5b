//! Shared setup for the integration tests: a `kube` client for a fake, and bounded waits.

#![allow(dead_code)]

use std::future::Future;
use std::time::Duration;

use fake_kube_apiserver::FakeApiServer;
use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};

/// Upper bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(20);

/// rustls needs a process-wide crypto provider before the first client.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A `kube` client built the way the daemon builds one: from a kubeconfig file.
pub async fn client(fake: &FakeApiServer) -> Client {
    install_crypto();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("kubeconfig");
    fake.write_kubeconfig(&path).expect("write kubeconfig");
    let kubeconfig = Kubeconfig::read_from(&path).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    Client::try_from(config).expect("client")
}

/// A client without kube's default retries of 429/503/504 (which retry a 504 for minutes).
pub async fn client_without_retry(fake: &FakeApiServer) -> Client {
    install_crypto();
    let kubeconfig = Kubeconfig::from_yaml(&fake.kubeconfig()).expect("parse kubeconfig");
    let mut config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("config from kubeconfig");
    config.default_retry = false;
    Client::try_from(config).expect("client")
}

/// A client with a token the fake does not accept.
pub async fn client_with_token(fake: &FakeApiServer, token: &str) -> Client {
    install_crypto();
    let text = fake.kubeconfig().replace(fake.token(), token);
    let kubeconfig = Kubeconfig::from_yaml(&text).expect("parse kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config from kubeconfig");
    Client::try_from(config).expect("client")
}

/// Awaits `fut`, failing the test if it takes longer than [`WAIT`].
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// The status of a `kube::Error::Api`, or a panic naming what came instead.
pub fn api_status(err: kube::Error) -> kube::core::Status {
    match err {
        kube::Error::Api(status) => *status,
        other => panic!("expected an API error, got {other:?}"),
    }
}
