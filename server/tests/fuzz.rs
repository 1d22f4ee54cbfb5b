//! Property tests: arbitrary field values, arbitrary request bytes and arbitrary
//! snapshot files never panic the server, and every answer is a contract status.

mod common;

use std::sync::Once;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use common::etcd::Backend;
use common::*;
use discovery_service::limits::TTL_MAX;
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::proto::server::{Affiliate, AffiliateDeleteRequest, AffiliateUpdateRequest};
use discovery_service::snapshot::decode;
use discovery_service::state::State;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use tonic::Code;
use tonic::transport::Channel;

/// Counts panics anywhere in this test process. Handler panics are caught and turned
/// into Internal, so a status code alone cannot prove that nothing panicked.
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn runtime() -> tokio::runtime::Runtime {
    count_panics();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn text(max: usize) -> impl Strategy<Value = String> {
    prop_oneof![
        proptest::collection::vec(any::<char>(), 0..=max).prop_map(|v| v.into_iter().collect()),
        (0..=max).prop_map(|n| "x".repeat(n)),
        Just(String::new()),
    ]
}

fn blob(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..=max).prop_map(Bytes::from)
}

fn update_request() -> impl Strategy<Value = AffiliateUpdateRequest> {
    (
        text(300),
        text(300),
        proptest::option::of(blob(2100)),
        proptest::collection::vec(blob(40), 0..80),
        proptest::option::of((any::<i64>(), any::<i32>())),
    )
        .prop_map(
            |(cluster_id, affiliate_id, data, endpoints, ttl)| AffiliateUpdateRequest {
                cluster_id,
                affiliate_id,
                affiliate_data: data,
                affiliate_endpoints: endpoints,
                ttl: ttl.map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
            },
        )
}

/// One of a few IDs, so that requests meet the same clusters and affiliates again.
fn familiar_id(prefix: &'static str) -> impl Strategy<Value = String> {
    (0..FAMILIAR).prop_map(move |i| format!("{prefix}{i}"))
}

const FAMILIAR: u8 = 8;

fn is_familiar_cluster(id: &str) -> bool {
    (0..FAMILIAR).any(|i| id == format!("c{i}"))
}

/// Mostly valid updates to a few clusters and affiliates, with endpoints drawn from a
/// small pool (repeats, reorderings and the 64-endpoint limit are met), each at most
/// 32 bytes, and TTLs of 10 to 30 minutes: nothing they store expires during the test.
fn familiar_update() -> impl Strategy<Value = AffiliateUpdateRequest> {
    let endpoint = (0..100u8).prop_map(|i| Bytes::from(vec![i; usize::from(i % 32) + 1]));
    (
        familiar_id("c"),
        prop_oneof![familiar_id("a"), text(40)],
        proptest::option::of(blob(2048)),
        proptest::collection::vec(endpoint, 0..70),
        600..=TTL_MAX.as_secs() as i64,
    )
        .prop_map(|(cluster_id, affiliate_id, data, endpoints, seconds)| {
            AffiliateUpdateRequest {
                cluster_id,
                affiliate_id,
                affiliate_data: data,
                affiliate_endpoints: endpoints,
                ttl: Some(prost_types::Duration { seconds, nanos: 0 }),
            }
        })
}

#[test]
fn arbitrary_field_values_get_contract_answers_memory() {
    arbitrary_field_values_get_contract_answers(Backend::Memory);
}

/// On etcd, arbitrary ids, blobs and TTLs also become keys, values and leases; and a
/// replica started afterwards, which reads all of it back from etcd, lists every
/// cluster exactly as the replica that took the writes (and applied them from its
/// watch) does.
#[test]
fn arbitrary_field_values_get_contract_answers_etcd() {
    arbitrary_field_values_get_contract_answers(Backend::Etcd);
}

fn arbitrary_field_values_get_contract_answers(backend: Backend) {
    let rt = runtime();
    let config = backend.config("fuzz-fields");
    let server = rt.block_on(start(config.clone()));
    let c = rt.block_on(client(&server));
    let clusters = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut runner = TestRunner::new(PropConfig {
        cases: 300,
        ..PropConfig::default()
    });
    runner
        .run(
            &(
                prop_oneof![update_request(), familiar_update()],
                prop_oneof![text(300), familiar_id("a")],
            ),
            |(req, other_id)| {
                let mut c = c.clone();
                rt.block_on(async {
                    let cluster = req.cluster_id.clone();
                    match within("update", c.affiliate_update(req)).await {
                        // Only familiar clusters: the others may hold already expired
                        // affiliates, which each replica removes at its own time.
                        Ok(_) if is_familiar_cluster(&cluster) => {
                            clusters.lock().unwrap().insert(cluster.clone());
                        }
                        Ok(_) => {}
                        Err(s) => prop_assert!(
                            matches!(s.code(), Code::InvalidArgument | Code::ResourceExhausted),
                            "unexpected {s:?}"
                        ),
                    }
                    for r in [
                        within("list", c.list(list_req(&cluster))).await.map(|_| ()),
                        within(
                            "delete",
                            c.affiliate_delete(AffiliateDeleteRequest {
                                cluster_id: cluster,
                                affiliate_id: other_id.clone(),
                            }),
                        )
                        .await
                        .map(|_| ()),
                        within("hello", c.hello(hello(&other_id, "v1.0.0")))
                            .await
                            .map(|_| ()),
                    ] {
                        if let Err(s) = r {
                            prop_assert_eq!(s.code(), Code::InvalidArgument);
                        }
                    }
                    Ok(())
                })
            },
        )
        .unwrap();
    if matches!(backend, Backend::Etcd) {
        rt.block_on(async {
            let fresh = start(config).await;
            let (mut a, mut b) = (c.clone(), client(&fresh).await);
            let clusters = clusters.into_inner().unwrap();
            assert_eq!(
                clusters.len(),
                usize::from(FAMILIAR),
                "every familiar cluster"
            );
            let mut endpoints = 0;
            for cluster in clusters {
                let applied = listed(&mut a, &cluster).await;
                endpoints += applied.iter().map(|a| a.endpoints.len()).sum::<usize>();
                assert_eq!(
                    applied,
                    listed(&mut b, &cluster).await,
                    "cluster {cluster:?}: the mirror that applied the writes and a fresh read"
                );
            }
            assert!(endpoints > 0, "the clusters compared hold endpoints");
            fresh.shutdown().await.unwrap();
        });
    }
    rt.block_on(server.shutdown()).unwrap();
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "nothing panicked");
}

/// A cluster's affiliates as List returns them, in id order.
async fn listed(c: &mut ClusterClient<Channel>, cluster: &str) -> Vec<Affiliate> {
    let mut affiliates = within("list", c.list(list_req(cluster)))
        .await
        .expect("list")
        .into_inner()
        .affiliates;
    affiliates.sort_by(|a, b| a.id.cmp(&b.id));
    affiliates
}

/// Raw HTTP/2 requests with arbitrary bodies: framed garbage, bad lengths, compressed
/// flags, truncated frames. The server answers each and stays up.
#[test]
fn arbitrary_request_bytes_never_take_the_server_down_memory() {
    arbitrary_request_bytes_never_take_the_server_down(Backend::Memory);
}

#[test]
fn arbitrary_request_bytes_never_take_the_server_down_etcd() {
    arbitrary_request_bytes_never_take_the_server_down(Backend::Etcd);
}

fn arbitrary_request_bytes_never_take_the_server_down(backend: Backend) {
    let rt = runtime();
    let server = rt.block_on(start(backend.config("fuzz-bytes")));
    let addr = server.grpc_addr;
    let methods = [
        "Hello",
        "AffiliateUpdate",
        "AffiliateDelete",
        "List",
        "Watch",
    ];
    let body = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..600),
        // A well-formed frame header around arbitrary protobuf bytes.
        (
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..600)
        )
            .prop_map(|(compressed, payload)| {
                let mut v = vec![u8::from(compressed)];
                v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                v.extend(payload);
                v
            }),
        // A frame header claiming far more than is sent, or more than 4 MiB.
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(|(len, payload)| {
            let mut v = vec![0];
            v.extend_from_slice(&len.to_be_bytes());
            v.extend(payload);
            v
        }),
    ];
    let mut runner = TestRunner::new(PropConfig {
        cases: 200,
        ..PropConfig::default()
    });
    runner
        .run(&(0..methods.len(), body), |(m, body)| {
            rt.block_on(async {
                let tcp = within("connect", tokio::net::TcpStream::connect(addr))
                    .await
                    .unwrap();
                let (mut send, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    TokioIo::new(tcp),
                )
                .await
                .unwrap();
                tokio::spawn(conn);
                let req =
                    http::Request::post(format!("/sidero.discovery.server.Cluster/{}", methods[m]))
                        .header("content-type", "application/grpc")
                        .header("te", "trailers")
                        .body(http_body_util::Full::new(Bytes::from(body)))
                        .unwrap();
                let resp = within("response headers", send.send_request(req))
                    .await
                    .unwrap();
                prop_assert_eq!(resp.status(), http::StatusCode::OK);
                if methods[m] != "Watch" {
                    // Unary calls always finish with a gRPC status, in the headers
                    // (trailers-only) or in the trailers. Internal is how malformed
                    // frames and messages are answered (as grpc-go does); tonic says
                    // OutOfRange for a message over 4 MiB where grpc-go says
                    // ResourceExhausted.
                    let in_headers = resp.headers().get("grpc-status").cloned();
                    let collected = within("response body", resp.into_body().collect())
                        .await
                        .unwrap();
                    let status = in_headers
                        .or_else(|| {
                            collected
                                .trailers()
                                .and_then(|t| t.get("grpc-status").cloned())
                        })
                        .expect("a grpc-status");
                    let code = Code::from_bytes(status.as_bytes());
                    prop_assert!(
                        matches!(
                            code,
                            Code::Ok
                                | Code::InvalidArgument
                                | Code::ResourceExhausted
                                | Code::Internal
                                | Code::Unimplemented
                                | Code::OutOfRange
                        ),
                        "unexpected {:?}",
                        code
                    );
                }
                Ok(())
            })
        })
        .unwrap();
    // Still serving.
    rt.block_on(async {
        let mut c = client(&server).await;
        c.hello(hello("alive", "")).await.unwrap();
        server.shutdown().await.unwrap();
    });
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "nothing panicked");
}

proptest! {
    #![proptest_config(PropConfig { cases: 2000, ..PropConfig::default() })]

    /// Any file contents: the decoder returns, possibly with an error, and never panics.
    #[test]
    fn arbitrary_snapshot_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let state = State::new();
        let _ = decode::import(&state, &mut bytes.as_slice(), Instant::now(), SystemTime::now());
    }

    /// A valid record prefix followed by arbitrary bytes always keeps the valid cluster.
    #[test]
    fn valid_prefix_survives_any_suffix(suffix in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut bytes = upstream_snapshot();
        bytes.extend(suffix);
        let state = State::new();
        let (stats, _) = decode::import(&state, &mut bytes.as_slice(), Instant::now(), SystemTime::now());
        prop_assert!(stats.clusters >= 1);
        prop_assert_eq!(state.list("c1").len(), 1);
    }
}
