//! Site pages and metrics (§4.13).

mod common;

use common::etcd::Backend;
use common::*;

async fn landing_inspect_and_stats(backend: Backend) {
    let server = start(backend.config("landing_inspect_and_stats")).await;
    let landing = server.landing_addr.unwrap();
    let mut c = client(&server).await;
    c.affiliate_update(update("c/1", "af<1>", "\u{1}\u{2}", &["\u{ab}"], 60))
        .await
        .unwrap();

    let (status, ct, body) = http_get(landing, "/").await;
    assert_eq!((status, ct.as_str()), (200, "text/html; charset=utf-8"));
    assert!(body.contains("Discovery Service"));

    let (status, _, body) = http_get(landing, "/inspect?clusterID=c%2F1").await;
    assert_eq!(status, 200);
    assert!(body.contains("0102"), "data as lowercase hex: {body}");
    assert!(body.contains("c2ab"), "endpoint as lowercase hex: {body}");
    assert!(body.contains("af&lt;1&gt;"), "ids are escaped: {body}");

    let (status, _, body) = http_get(landing, "/inspect?clusterID=nobody").await;
    assert_eq!(status, 200);
    assert!(body.contains("No Affiliate data found"));
    assert!(
        server.state.cluster("nobody").is_none(),
        "Q26: inspecting creates nothing"
    );

    let (status, _, body) = http_get(landing, "/inspect?clusterID=%zz").await;
    assert_eq!((status, body.as_str()), (500, "Oops, try again"));

    let (status, headers, body) = http_get_headers(landing, "/stats").await;
    assert_eq!(
        (
            status,
            headers["content-type"].to_str().unwrap(),
            body.as_str()
        ),
        (200, "application/json", r#"{"affiliates":1}"#)
    );
    assert_eq!(headers["access-control-allow-origin"], "*");
    // Cached for an hour (§4.13, §10): a new affiliate does not show yet.
    assert_eq!(
        discovery_service::limits::STATS_CACHE_TTL,
        std::time::Duration::from_secs(3600)
    );
    c.affiliate_update(update("c/1", "af2", "d", &[], 60))
        .await
        .unwrap();
    let (status, headers, body) = http_get_headers(landing, "/stats").await;
    assert_eq!((status, body.as_str()), (200, r#"{"affiliates":1}"#));
    assert_eq!(headers["access-control-allow-origin"], "*");

    let (status, _, _) = http_get(landing, "/nope").await;
    assert_eq!(status, 404);

    // The main port also serves the pages to non-gRPC requests (the same cache).
    let (status, headers, body) = http_get_headers(server.grpc_addr, "/stats").await;
    assert_eq!((status, body.as_str()), (200, r#"{"affiliates":1}"#));
    assert_eq!(headers["access-control-allow-origin"], "*");
    server.shutdown().await.unwrap();
}

async fn inspect_can_be_disabled(backend: Backend) {
    let mut cfg = backend.config("inspect_can_be_disabled");
    cfg.disable_inspect = true;
    let server = start(cfg).await;
    let (status, _, _) = http_get(server.landing_addr.unwrap(), "/inspect?clusterID=c").await;
    assert_eq!(status, 404);
    server.shutdown().await.unwrap();
}

/// With snapshots (memory backend) the storage metrics describe the last save; on etcd,
/// which is the durable copy, there are no snapshots and so no storage metrics.
async fn metrics_have_the_reference_names(backend: Backend) {
    let mut cfg = backend.config("metrics_have_the_reference_names");
    let snapshots = matches!(backend, Backend::Memory);
    cfg.snapshots_enabled = snapshots;
    let dir = tempfile::tempdir().unwrap();
    cfg.snapshot_path = dir.path().join("s.binpb");
    let server = start(cfg).await;
    let mut c = client(&server).await;
    c.hello(hello("c", "v1.12.3")).await.unwrap();
    c.affiliate_update(update("c", "af", "d", &["e"], 60))
        .await
        .unwrap();
    if snapshots {
        server.save_now().await.unwrap();
    }
    let (status, ct, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain"));
    if snapshots {
        assert_storage_metrics(&body, &dir.path().join("s.binpb"));
    } else {
        assert!(!body.contains("discovery_storage_"), "{body}");
    }
    for needle in [
        "discovery_server_hello_requests_total{client_version=\"v1.12\"} 1",
        "discovery_server_hello_requests_total{client_version=\"unknown\"} 0",
        "discovery_state_clusters 1",
        "discovery_state_affiliates 1",
        "discovery_state_endpoints 1",
        "discovery_state_subscriptions 0",
        "discovery_state_gc_runs_total",
        "discovery_state_gc_clusters_total",
        "discovery_state_gc_affiliates_total",
        "grpc_server_started_total{grpc_method=\"Hello\",grpc_service=\"sidero.discovery.server.Cluster\",grpc_type=\"unary\"} 1",
        "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"AffiliateUpdate\",grpc_service=\"sidero.discovery.server.Cluster\",grpc_type=\"unary\"} 1",
        "grpc_server_handled_total{grpc_code=\"Aborted\",grpc_method=\"Watch\",grpc_service=\"sidero.discovery.server.Cluster\",grpc_type=\"server_stream\"} 0",
        "grpc_server_msg_received_total",
        "grpc_server_msg_sent_total",
        "grpc_server_handling_seconds_bucket{grpc_method=\"List\",grpc_service=\"sidero.discovery.server.Cluster\",grpc_type=\"unary\",le=\"2.5\"} 0",
        "process_resident_memory_bytes",
    ] {
        assert!(body.contains(needle), "missing {needle} in\n{body}");
    }
    server.shutdown().await.unwrap();

    // Without snapshots there are no storage metrics.
    let server = start(backend.config("metrics_have_the_reference_names")).await;
    let (_, _, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert!(!body.contains("discovery_storage_"));
    server.shutdown().await.unwrap();
}

/// The storage metrics after one save of one cluster, one affiliate and one endpoint
/// to `file`, and after the failed load at start (there was no file yet).
fn assert_storage_metrics(body: &str, file: &std::path::Path) {
    let file_size = std::fs::metadata(file).unwrap().len();
    // What the last save wrote.
    let save_metric = |name: &str| {
        let prefix = format!("{name}{{operation=\"save\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("missing {prefix} in\n{body}"))
            .parse::<f64>()
            .unwrap()
    };
    assert_eq!(
        save_metric("discovery_storage_last_operation_clusters"),
        1.0
    );
    assert_eq!(
        save_metric("discovery_storage_last_operation_affiliates"),
        1.0
    );
    assert_eq!(
        save_metric("discovery_storage_last_operation_endpoints"),
        1.0
    );
    assert_eq!(
        save_metric("discovery_storage_last_snapshot_size_bytes"),
        file_size as f64
    );
    let duration = save_metric("discovery_storage_last_operation_duration_seconds");
    assert!(duration > 0.0 && duration < 10.0, "{duration}");
    assert!(
        body.contains(
            "discovery_storage_operations_total{operation=\"save\",status=\"success\"} 1"
        )
    );
    assert!(
        body.contains("discovery_storage_operations_total{operation=\"load\",status=\"error\"} 1"),
        "{body}"
    );
}

both_backends!(
    landing_inspect_and_stats,
    inspect_can_be_disabled,
    metrics_have_the_reference_names,
);
