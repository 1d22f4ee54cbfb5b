//! Per-IP throttling through the real stack (§4.9).

mod common;

use std::time::Duration;

use common::etcd::Backend;
use common::*;
use discovery_service::proto::server::HelloRequest;
use discovery_service::proto::server::cluster_client::ClusterClient;
use tonic::transport::Channel;
use tonic::{Code, Request};

const EXHAUSTED: &str = "rate limit exceeds request timeout";

fn hello_with_deadline(deadline: Option<Duration>) -> Request<HelloRequest> {
    let mut r = Request::new(hello("c", "v1.0.0"));
    if let Some(d) = deadline {
        r.set_timeout(d);
    }
    r
}

/// `n` Hellos sharing one deadline, like upstream's test (one context for the loop).
/// The deadline is a little under a second so the verdict does not hinge on transport
/// latency: the 61st needs nearly a full second of refill at 1 rps.
async fn burst(c: &mut ClusterClient<Channel>, n: usize) -> Vec<Result<(), tonic::Status>> {
    let deadline = std::time::Instant::now() + Duration::from_millis(950);
    let mut out = Vec::new();
    for _ in 0..n {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        out.push(c.hello(hello_with_deadline(Some(left))).await.map(|_| ()));
    }
    out
}

async fn sixty_pass_then_the_deadline_bounded_wait_fails(backend: Backend) {
    // Upstream's test: 1 rps, burst 60, 1 s deadline.
    let mut cfg = backend.config("sixty_pass_then_the_deadline_bounded_wait_fails");
    cfg.rate_limit_per_second = 1.0;
    cfg.rate_limit_burst = 60;
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let results = burst(&mut c, 61).await;
    assert!(results[..60].iter().all(Result::is_ok));
    assert_refused(results[60].clone(), Code::ResourceExhausted, EXHAUSTED);

    // Throttled requests are logged but not counted in grpc_server_* metrics.
    let started = server
        .metrics
        .grpc_started
        .with_label_values(&["unary", "sidero.discovery.server.Cluster", "Hello"])
        .get();
    assert_eq!(started, 60);

    // Without a deadline the request waits for its token instead of failing.
    let t = std::time::Instant::now();
    within("throttled hello", c.hello(hello_with_deadline(None)))
        .await
        .unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(500),
        "it was throttled, not rejected"
    );

    // Another client IP has its own bucket.
    let mut v6 = backend.config("sixty_pass_then_the_deadline_bounded_wait_fails");
    v6.addr = "[::1]:0".into();
    v6.rate_limit_per_second = 1.0;
    v6.rate_limit_burst = 1;
    if let Ok(s6) = try_start(v6).await {
        let mut c6 = client(&s6).await;
        c6.hello(hello_with_deadline(Some(Duration::from_millis(100))))
            .await
            .unwrap();
        s6.shutdown().await.unwrap();
    }
    server.shutdown().await.unwrap();
}

async fn default_rate_allows_fifteen_per_second_after_the_burst(backend: Backend) {
    let mut cfg = backend.config("default_rate_allows_fifteen_per_second_after_the_burst");
    cfg.rate_limit_per_second = 15.0;
    cfg.rate_limit_burst = 60;
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let results = burst(&mut c, 60).await;
    assert!(results.iter().all(Result::is_ok));
    // The 61st waits about 1/15 s, well within its 1 s deadline.
    let t = std::time::Instant::now();
    c.hello(hello_with_deadline(Some(Duration::from_secs(1))))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_millis(900));
    // The bucket is empty again: a token is 1/15 s away, so a 20 ms deadline fails at
    // once on the server, before the client's own deadline.
    assert_refused(
        c.hello(hello_with_deadline(Some(Duration::from_millis(20))))
            .await,
        Code::ResourceExhausted,
        EXHAUSTED,
    );
    server.shutdown().await.unwrap();
}

async fn a_watch_costs_one_token_when_it_starts_and_none_per_message(backend: Backend) {
    // Burst 1 and a refill far away: the watch takes the only token.
    let mut cfg = backend.config("a_watch_costs_one_token_when_it_starts_and_none_per_message");
    cfg.rate_limit_per_second = 0.01;
    cfg.rate_limit_burst = 1;
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());

    assert_refused(
        c.hello(hello_with_deadline(Some(Duration::from_millis(200))))
            .await,
        Code::ResourceExhausted,
        EXHAUSTED,
    );

    // Another stream start is charged too.
    let mut req = Request::new(watch_req("c"));
    req.set_timeout(Duration::from_millis(200));
    assert_refused(c.watch(req).await, Code::ResourceExhausted, EXHAUSTED);

    // Messages on the open stream are not: they keep flowing with the bucket empty.
    let exp = std::time::Instant::now() + Duration::from_secs(60);
    for i in 0..5 {
        let data = format!("d{i}");
        let u = discovery_service::state::Update {
            affiliate_id: "af",
            data: data.as_bytes(),
            endpoints: &[],
        };
        server.state.update("c", &u, exp).unwrap();
        let m = next(&mut w).await.unwrap().unwrap();
        assert_eq!(m.affiliates[0].data, b(&data));
    }
    server.shutdown().await.unwrap();
}

both_backends!(
    sixty_pass_then_the_deadline_bounded_wait_fails,
    default_rate_allows_fifteen_per_second_after_the_burst,
    a_watch_costs_one_token_when_it_starts_and_none_per_message,
);
