//! Hello (§4.3, §4.14): client IP, proxy headers, reporting switch, redirect, metric.

mod common;

use common::etcd::Backend;
use common::*;
use discovery_service::proto::server::HelloRequest;
use tonic::{Code, Request};

fn with_header(req: HelloRequest, key: &'static str, value: &str) -> Request<HelloRequest> {
    let mut r = Request::new(req);
    r.metadata_mut().insert(key, value.parse().unwrap());
    r
}

async fn loopback_client_ip_and_no_redirect(backend: Backend) {
    let server = start(backend.config("loopback_client_ip_and_no_redirect")).await;
    let mut c = client(&server).await;
    let r = c
        .hello(hello("cluster", "v1.12.0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hex::encode(&r.client_ip), "7f000001");
    assert!(r.redirect.is_none());
    assert_eq!(
        server.state.cluster_count(),
        0,
        "Hello never creates cluster state"
    );
    server.shutdown().await.unwrap();
}

async fn ipv6_loopback_client_ip_is_16_bytes(backend: Backend) {
    let mut cfg = backend.config("ipv6_loopback_client_ip_is_16_bytes");
    cfg.addr = "[::1]:0".into();
    let Ok(server) = try_start(cfg).await else {
        eprintln!("no IPv6 loopback on this host; skipping");
        return;
    };
    let mut c = client(&server).await;
    let r = c
        .hello(hello("cluster", "v1.12.0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.client_ip.as_ref(), std::net::Ipv6Addr::LOCALHOST.octets());
    server.shutdown().await.unwrap();
}

async fn trusted_proxy_headers(backend: Backend) {
    let mut cfg = backend.config("trusted_proxy_headers");
    cfg.trust_x_real_ip = true;
    cfg.trust_first_x_forwarded_for = true;
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let r = c
        .hello(with_header(hello("c", "v1.0.0"), "x-real-ip", "1.2.3.4"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hex::encode(&r.client_ip), "01020304");
    let r = c
        .hello(with_header(
            hello("c", "v1.0.0"),
            "x-forwarded-for",
            "5.6.7.8,192.168.0.0.1",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(hex::encode(&r.client_ip), "05060708");
    server.shutdown().await.unwrap();
}

async fn proxy_headers_are_ignored_by_default(backend: Backend) {
    let server = start(backend.config("proxy_headers_are_ignored_by_default")).await;
    let mut c = client(&server).await;
    let r = c
        .hello(with_header(hello("c", "v1.0.0"), "x-real-ip", "1.2.3.4"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        hex::encode(&r.client_ip),
        "7f000001",
        "Q7: spoofing needs an explicit opt-in"
    );
    server.shutdown().await.unwrap();
}

async fn reporting_disabled_and_redirect(backend: Backend) {
    let mut cfg = backend.config("reporting_disabled_and_redirect");
    cfg.disable_client_ip_reporting = true;
    cfg.redirect_endpoint = "new.example.com:443".into();
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let r = c.hello(hello("c", "v1.0.0")).await.unwrap().into_inner();
    assert!(r.client_ip.is_empty());
    assert_eq!(r.redirect.unwrap().endpoint, "new.example.com:443");
    // The redirect is advisory: other RPCs keep working.
    c.affiliate_update(update("c", "af", "d", &[], 60))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "c").await.len(), 1);
    server.shutdown().await.unwrap();
}

async fn invalid_hello_is_counted_then_rejected(backend: Backend) {
    let server = start(backend.config("invalid_hello_is_counted_then_rejected")).await;
    let mut c = client(&server).await;
    assert_refused(
        c.hello(hello("", "v1.8.3-7-gf7d9f211")).await,
        Code::InvalidArgument,
        "cluster ID can't be empty",
    );
    assert_refused(
        c.hello(hello(&"x".repeat(257), "v1.2")).await,
        Code::InvalidArgument,
        "cluster ID is too long",
    );
    c.hello(hello("c", "v1.8.0")).await.unwrap();
    let m = server.metrics.hello_requests.clone();
    assert_eq!(m.with_label_values(&["v1.8-pre"]).get(), 1);
    assert_eq!(m.with_label_values(&["unknown"]).get(), 1);
    assert_eq!(m.with_label_values(&["v1.8"]).get(), 1);
    server.shutdown().await.unwrap();
}

/// Client versions are chosen by unauthenticated clients: past a cap of distinct
/// labels, new ones count as `unknown`, so the metric cannot grow without bound.
async fn distinct_client_version_labels_are_capped(backend: Backend) {
    let server = start(backend.config("distinct_client_version_labels_are_capped")).await;
    let mut c = client(&server).await;
    let max = discovery_service::limits::HELLO_VERSION_LABELS_MAX;
    for minor in 0..max + 20 {
        c.hello(hello("c", &format!("v1.{minor}.0"))).await.unwrap();
    }
    let m = server.metrics.hello_requests.clone();
    let series = server
        .metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("discovery_server_hello_requests_total{"))
        .count();
    assert_eq!(
        series, max,
        "one series per distinct label, unknown included"
    );
    // `unknown` took the first slot, so max - 1 versions got their own label.
    assert_eq!(m.with_label_values(&["v1.0"]).get(), 1);
    assert_eq!(m.with_label_values(&[&format!("v1.{}", max - 2)]).get(), 1);
    assert_eq!(m.with_label_values(&["unknown"]).get(), 21);
    server.shutdown().await.unwrap();
}

both_backends!(
    loopback_client_ip_and_no_redirect,
    ipv6_loopback_client_ip_is_16_bytes,
    trusted_proxy_headers,
    proxy_headers_are_ignored_by_default,
    reporting_disabled_and_redirect,
    invalid_hello_is_counted_then_rejected,
    distinct_client_version_labels_are_capped,
);
