//! Snapshots through the server: round trip across restarts, the upstream format,
//! legacy absolute expirations, size limit, corrupt files, periodic saves (§4.11).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::*;
use discovery_service::limits::MAX_CLUSTER_SNAPSHOT_SIZE;
use discovery_service::metrics::Metrics;
use discovery_service::proto::storage::{
    AffiliateSnapshot, ClusterSnapshot, EndpointSnapshot, StateSnapshot,
};
use discovery_service::snapshot::decode::{self, DecodeError};
use discovery_service::state::State;
use prost::Message;

fn snap_config(path: &Path) -> discovery_service::Config {
    let mut c = config();
    c.snapshots_enabled = true;
    c.snapshot_path = path.to_path_buf();
    c
}

type View = BTreeMap<(String, String), (Bytes, Vec<Bytes>)>;

async fn view(server: &discovery_service::Server, clusters: &[&str]) -> View {
    let mut c = client(server).await;
    let mut out = BTreeMap::new();
    for cl in clusters {
        for a in list(&mut c, cl).await {
            out.insert((cl.to_string(), a.id), (a.data, a.endpoints));
        }
    }
    out
}

#[tokio::test]
async fn state_survives_a_graceful_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/state.binpb");
    let server = start(snap_config(&path)).await;
    let mut c = client(&server).await;
    let clusters = ["c1", "c2", "c3"];
    for (i, cl) in clusters.iter().enumerate() {
        for j in 0..=i * 3 {
            c.affiliate_update(update(
                cl,
                &format!("af{j}"),
                &format!("data{i}{j}"),
                &["e1", "e2"],
                600,
            ))
            .await
            .unwrap();
        }
        // Data-less affiliates are kept too.
        c.affiliate_update(update(cl, "endpoints-only", "", &["x"], 600))
            .await
            .unwrap();
    }
    let before = view(&server, &clusters).await;
    server.shutdown().await.expect("final save succeeds");

    let restarted = start(snap_config(&path)).await;
    assert_eq!(view(&restarted, &clusters).await, before);
    restarted.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_upstream_file_loads() {
    let golden = upstream_snapshot();
    let decoded = StateSnapshot::decode(golden.as_slice()).unwrap();
    assert_eq!(
        decoded.clusters[0].affiliates[0].endpoints[0]
            .ttl
            .unwrap()
            .seconds,
        60
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    std::fs::write(&path, &golden).unwrap();
    let server = start(snap_config(&path)).await;
    let v = view(&server, &["c1"]).await;
    assert_eq!(v[&("c1".into(), "a1".into())], (b("d"), vec![b("e")]));
    server.shutdown().await.unwrap();
    // And what we write back decodes to the same content with relative TTLs.
    let back = StateSnapshot::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    let a = &back.clusters[0].affiliates[0];
    assert!((118..=120).contains(&a.ttl.unwrap().seconds), "{:?}", a.ttl);
    assert!(a.expiration.is_none());
}

fn ts(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap();
    prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

#[tokio::test]
async fn legacy_absolute_expirations_import_as_ttls() {
    let now = SystemTime::now();
    let live = ts(now + Duration::from_secs(300));
    let dead = ts(now - Duration::from_secs(60));
    let file = StateSnapshot {
        clusters: vec![ClusterSnapshot {
            id: "legacy".into(),
            affiliates: vec![
                AffiliateSnapshot {
                    id: "live".into(),
                    expiration: Some(live),
                    data: b("d"),
                    endpoints: vec![
                        EndpointSnapshot {
                            expiration: Some(live),
                            data: b("ok"),
                            ttl: None,
                        },
                        EndpointSnapshot {
                            expiration: Some(dead),
                            data: b("gone"),
                            ttl: None,
                        },
                    ],
                    ttl: None,
                },
                AffiliateSnapshot {
                    id: "dead".into(),
                    expiration: Some(dead),
                    data: b("d"),
                    endpoints: vec![],
                    ttl: None,
                },
            ],
        }],
    };
    let state = State::new();
    let t0 = Instant::now();
    let (stats, r) = decode::import(&state, &mut file.encode_to_vec().as_slice(), t0, now);
    r.unwrap();
    assert_eq!(
        (stats.clusters, stats.affiliates, stats.endpoints),
        (1, 1, 1)
    );
    let list = state.list("legacy");
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].endpoints, vec![b("ok")]);
    // The absolute expiry became a TTL of about five minutes from the load.
    let mut out = Vec::new();
    discovery_service::snapshot::encode::export(&state, t0, &mut out).unwrap();
    let back = StateSnapshot::decode(out.as_slice()).unwrap();
    let ttl = back.clusters[0].affiliates[0].ttl.unwrap().seconds;
    assert!((298..=300).contains(&ttl), "{ttl}");
}

/// A cluster at every limit, with upstream's generous sizes (endpoints as large as data,
/// 12-byte durations): this is how the size limit was derived.
fn maximal_cluster(affiliates: usize) -> ClusterSnapshot {
    let ttl = Some(prost_types::Duration {
        seconds: 1 << 34,
        nanos: 999_999_999,
    });
    let blob = Bytes::from(vec![0xaa; 2048]);
    let endpoints: Vec<EndpointSnapshot> = (0..64)
        .map(|_| EndpointSnapshot {
            expiration: None,
            data: blob.clone(),
            ttl,
        })
        .collect();
    ClusterSnapshot {
        id: "c".repeat(256),
        affiliates: (0..affiliates)
            .map(|i| AffiliateSnapshot {
                id: format!("{i:0>256}"),
                expiration: None,
                data: blob.clone(),
                endpoints: endpoints.clone(),
                ttl,
            })
            .collect(),
    }
}

#[test]
fn maximal_cluster_is_exactly_the_limit_and_one_more_affiliate_is_rejected() {
    let max = maximal_cluster(1024);
    assert_eq!(max.encoded_len() as u64, MAX_CLUSTER_SNAPSHOT_SIZE);
    let mut record = vec![0x0a];
    max.encode_length_delimited(&mut record).unwrap();
    let state = State::new();
    let (stats, r) = decode::import(
        &state,
        &mut record.as_slice(),
        Instant::now(),
        SystemTime::now(),
    );
    r.unwrap();
    assert_eq!(stats.clusters, 1);
    drop(record);

    let over = maximal_cluster(1025);
    let mut record = vec![0x0a];
    over.encode_length_delimited(&mut record).unwrap();
    let (_, r) = decode::import(
        &State::new(),
        &mut record.as_slice(),
        Instant::now(),
        SystemTime::now(),
    );
    assert!(
        matches!(r, Err(DecodeError::ClusterSnapshotTooLarge(_))),
        "{r:?}"
    );
}

#[tokio::test]
async fn corrupt_file_keeps_what_decoded_is_moved_aside_and_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let mut bytes = upstream_snapshot();
    bytes.extend_from_slice(&[0x0a, 0x40, 0x01, 0x02]); // a second record cut short
    std::fs::write(&path, &bytes).unwrap();

    let server = start(snap_config(&path)).await;
    assert_eq!(
        view(&server, &["c1"]).await.len(),
        1,
        "the clusters before the damage are kept"
    );
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state.binpb.corrupt-"))
        .collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert_eq!(std::fs::read(dir.path().join(&moved[0])).unwrap(), bytes);
    server.shutdown().await.unwrap();
    // The next save is a clean file again.
    let s = StateSnapshot::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    assert_eq!(s.clusters.len(), 1);

    // Garbage that is not even a record: nothing loads, the server still starts.
    std::fs::write(&path, b"\xff\xff\xff").unwrap();
    let server = start(snap_config(&path)).await;
    assert_eq!(server.state.cluster_count(), 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn saves_run_per_interval_and_once_more_on_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let mut cfg = snap_config(&path);
    cfg.snapshot_interval = Duration::from_millis(50);
    let server = start(cfg).await;
    assert!(!path.exists(), "no save at start");
    let saves = |m: &Metrics| {
        m.sample("discovery_storage_operations_total{operation=\"save\",status=\"success\"}")
            .unwrap_or(0.0)
    };
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "af", "d", &[], 600))
        .await
        .unwrap();
    until("two periodic saves", || saves(&server.metrics) >= 2.0).await;
    let on_disk = StateSnapshot::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    assert_eq!(on_disk.clusters[0].affiliates[0].id, "af");
    let metrics = server.metrics.clone();
    let before = saves(&metrics);
    server.shutdown().await.unwrap();
    let after = saves(&metrics);
    assert!(after > before, "the final save ran");
}

#[tokio::test]
async fn an_emptied_state_saves_an_empty_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let server = start(snap_config(&path)).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "af", "d", &[], 600))
        .await
        .unwrap();
    server.save_now().await.unwrap();
    assert!(!std::fs::read(&path).unwrap().is_empty());
    c.affiliate_delete(discovery_service::proto::server::AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "af".into(),
    })
    .await
    .unwrap();
    server.shutdown().await.unwrap();
    // Q3: the deleted affiliate must not come back after a restart.
    let restarted = start(snap_config(&path)).await;
    assert!(view(&restarted, &["c"]).await.is_empty());
    restarted.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_failed_final_save_fails_the_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    // The snapshot's directory is a regular file: every save fails.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let server = start(snap_config(&blocker.join("state.binpb"))).await;
    let metrics = server.metrics.clone();
    let err = server.shutdown().await.unwrap_err();
    assert!(
        format!("{err:#}").contains("final snapshot failed"),
        "{err:#}"
    );
    assert!(
        metrics
            .render()
            .contains("discovery_storage_operations_total{operation=\"save\",status=\"error\"} 1")
    );
}

/// A snapshot no service could have written: import applies the rules every update
/// obeys (validators, endpoint dedup, the 64 and 1024 limits) and counts what it drops.
fn crafted_snapshot() -> StateSnapshot {
    let ttl = Some(prost_types::Duration {
        seconds: 600,
        nanos: 0,
    });
    let aff = |id: String, data: Bytes, endpoints: Vec<Bytes>| AffiliateSnapshot {
        id,
        expiration: None,
        data,
        endpoints: endpoints
            .into_iter()
            .map(|data| EndpointSnapshot {
                expiration: None,
                data,
                ttl,
            })
            .collect(),
        ttl,
    };
    let mut endpoints = vec![b("e1"), b("e2"), b("e1"), Bytes::from(vec![1; 33])];
    endpoints.extend((0..70).map(|i| b(&format!("x{i}"))));
    let mut affiliates = vec![
        aff(String::new(), b("d"), vec![]),
        aff("a".repeat(257), b("d"), vec![]),
        aff("big-data".into(), Bytes::from(vec![0; 2049]), vec![]),
        aff("eps".into(), b("d"), endpoints),
    ];
    affiliates.extend((0..1030).map(|i| aff(format!("f{i}"), b("d"), vec![b("e")])));
    let junk = |id: String| ClusterSnapshot {
        id,
        affiliates: vec![aff("a".into(), b("d"), vec![])],
    };
    StateSnapshot {
        clusters: vec![
            junk(String::new()),
            junk("c".repeat(257)),
            ClusterSnapshot {
                id: "ok".into(),
                affiliates,
            },
            junk("c".repeat(256)),
        ],
    }
}

#[tokio::test]
async fn import_reapplies_the_state_rules() {
    let bytes = crafted_snapshot().encode_to_vec();
    let (stats, r) = decode::import(
        &State::new(),
        &mut bytes.as_slice(),
        Instant::now(),
        SystemTime::now(),
    );
    r.unwrap();
    assert_eq!(
        stats.dropped,
        discovery_service::snapshot::Dropped {
            invalid_clusters: 2,
            invalid_affiliates: 3,
            affiliates_over_limit: 7,
            invalid_endpoints: 1,
            duplicate_endpoints: 1,
            endpoints_over_limit: 8,
        }
    );
    assert_eq!(
        (stats.clusters, stats.affiliates, stats.endpoints),
        (2, 1025, 64 + 1023)
    );
    assert_eq!(stats.size_bytes, bytes.len() as u64);

    // Through the server: what it serves obeys the limits, as if built by updates.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    std::fs::write(&path, &bytes).unwrap();
    let server = start(snap_config(&path)).await;
    assert_eq!(server.state.cluster_count(), 2);
    let v = view(&server, &["ok"]).await;
    assert_eq!(v.len(), 1024);
    let mut want = vec![b("e1"), b("e2")];
    want.extend((0..62).map(|i| b(&format!("x{i}"))));
    assert_eq!(v[&("ok".into(), "eps".into())].1, want);
    assert!(v.contains_key(&("ok".into(), "f1022".into())));
    assert!(!v.contains_key(&("ok".into(), "f1023".into())));
    let mut c = client(&server).await;
    let err = c
        .affiliate_update(update("ok", "one-more", "d", &[], 60))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "too many affiliates in the cluster");
    let err = c
        .affiliate_update(update("ok", "eps", "", &["new"], 60))
        .await
        .unwrap_err();
    assert_eq!(err.message(), "too many endpoints in the affiliate");
    server.shutdown().await.unwrap();
}
