//! Update, Delete, List, Watch through a real client (§4.4–§4.8, §4.14).

mod common;

use std::time::Duration;

use common::etcd::Backend;
use common::*;
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::proto::server::{
    Affiliate, AffiliateDeleteRequest, AffiliateUpdateRequest, WatchResponse,
};
use tonic::Code;
use tonic::transport::Channel;

fn aff(id: &str, data: &str, eps: &[&str]) -> Affiliate {
    Affiliate {
        id: id.into(),
        data: b(data),
        endpoints: eps.iter().map(|e| b(e)).collect(),
    }
}

async fn update_merge_delete_and_watch_sequence(backend: Backend) {
    let server = start(backend.config("update_merge_delete_and_watch_sequence")).await;
    let mut c = client(&server).await;

    c.affiliate_update(update("c", "af1", "data1", &["e1", "e2"], 60))
        .await
        .unwrap();
    c.affiliate_update(update("c", "af1", "", &["e3", "e2"], 60))
        .await
        .unwrap();
    let l = list(&mut c, "c").await;
    assert_eq!(l, vec![aff("af1", "data1", &["e1", "e2", "e3"])]);

    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "missing".into(),
    })
    .await
    .expect("deleting a missing affiliate is OK");

    let mut w = c.watch(watch_req("w")).await.unwrap().into_inner();
    c.affiliate_update(update("w", "af1", "data1", &[], 60))
        .await
        .unwrap();
    // The watch was opened before af1 existed: snapshot is empty, then af1 arrives.
    assert_eq!(
        next(&mut w).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![],
            deleted: false
        }
    );
    assert_eq!(
        next(&mut w).await.unwrap().unwrap().affiliates,
        vec![aff("af1", "data1", &[])]
    );

    let mut w2 = c.watch(watch_req("w")).await.unwrap().into_inner();
    assert_eq!(
        next(&mut w2).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![aff("af1", "data1", &[])],
            deleted: false
        }
    );
    c.affiliate_update(update("w", "af2", "data2", &["x"], 60))
        .await
        .unwrap();
    assert_eq!(
        next(&mut w2).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![aff("af2", "data2", &["x"])],
            deleted: false
        }
    );
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "w".into(),
        affiliate_id: "af1".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut w2).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![Affiliate {
                id: "af1".into(),
                ..Default::default()
            }],
            deleted: true
        }
    );
    server.shutdown().await.unwrap();
}

async fn list_and_delete_do_not_create_clusters(backend: Backend) {
    let server = start(backend.config("list_and_delete_do_not_create_clusters")).await;
    let mut c = client(&server).await;
    assert!(list(&mut c, "ghost").await.is_empty());
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "ghost".into(),
        affiliate_id: "a".into(),
    })
    .await
    .unwrap();
    assert_eq!(server.state.cluster_count(), 0);
    server.shutdown().await.unwrap();
}

async fn validation_table(backend: Backend) {
    let server = start(backend.config("validation_table")).await;
    let mut c = client(&server).await;
    let long = "x".repeat(257);
    let max = "x".repeat(256);
    let cases: Vec<(AffiliateUpdateRequest, &str)> = vec![
        (update("", "a", "d", &[], 60), "cluster ID can't be empty"),
        (update(&long, "a", "d", &[], 60), "cluster ID is too long"),
        (update("c", "", "d", &[], 60), "affiliate ID can't be empty"),
        (update("c", &long, "d", &[], 60), "affiliate ID is too long"),
        (
            update("c", "a", &"d".repeat(2049), &[], 60),
            "affiliate data is too big",
        ),
        (
            update("c", "a", "d", &[&"e".repeat(33)], 60),
            "affiliate endpoint is too big",
        ),
        (update("c", "a", "d", &[], 1801), "ttl is too large"),
    ];
    for (req, msg) in cases {
        assert_refused(c.affiliate_update(req).await, Code::InvalidArgument, msg);
    }
    // Limits themselves pass; TTL 0, negative and missing are accepted (Q24).
    c.affiliate_update(update(
        &max,
        &max,
        &"d".repeat(2048),
        &[&"e".repeat(32)],
        1800,
    ))
    .await
    .unwrap();
    c.affiliate_update(update("c", "zero", "d", &[], 0))
        .await
        .unwrap();
    c.affiliate_update(update("c", "neg", "d", &[], -5))
        .await
        .unwrap();
    let mut no_ttl = update("c", "none", "d", &[], 0);
    no_ttl.ttl = None;
    c.affiliate_update(no_ttl).await.unwrap();

    for (cid, msg) in [
        ("", "cluster ID can't be empty"),
        (long.as_str(), "cluster ID is too long"),
    ] {
        assert_refused(c.list(list_req(cid)).await, Code::InvalidArgument, msg);
        assert_refused(
            c.affiliate_delete(AffiliateDeleteRequest {
                cluster_id: cid.into(),
                affiliate_id: "a".into(),
            })
            .await,
            Code::InvalidArgument,
            msg,
        );
        // A bad Watch ID is the stream's status, seen no later than the first receive.
        let r = match c.watch(watch_req(cid)).await {
            Err(e) => Err(e),
            Ok(s) => next(&mut s.into_inner()).await,
        };
        assert_refused(r, Code::InvalidArgument, msg);
    }
    assert_refused(
        c.affiliate_delete(AffiliateDeleteRequest {
            cluster_id: "c".into(),
            affiliate_id: long.clone(),
        })
        .await,
        Code::InvalidArgument,
        "affiliate ID is too long",
    );
    server.shutdown().await.unwrap();
}

async fn cluster_and_endpoint_limits(backend: Backend) {
    let server = start(backend.config("cluster_and_endpoint_limits")).await;
    let mut c = client(&server).await;
    for i in 0..1024 {
        c.affiliate_update(update("full", &format!("af{i}"), "", &[], 60))
            .await
            .unwrap();
    }
    assert_refused(
        c.affiliate_update(update("full", "af1024", "d", &[], 60))
            .await,
        Code::ResourceExhausted,
        "too many affiliates in the cluster",
    );
    // Existing affiliates still update.
    c.affiliate_update(update("full", "af0", "d", &[], 60))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "full").await.len(), 1024);

    let eps: Vec<String> = (0..64).map(|i| format!("ep{i}")).collect();
    let eps: Vec<&str> = eps.iter().map(String::as_str).collect();
    c.affiliate_update(update("e", "af", "d", &eps, 60))
        .await
        .unwrap();
    assert_refused(
        c.affiliate_update(update("e", "af", "", &["ep0", "ep64"], 60))
            .await,
        Code::ResourceExhausted,
        "too many endpoints in the affiliate",
    );
    let l = list(&mut c, "e").await;
    assert_eq!(l[0].endpoints.len(), 64);
    assert_eq!(
        l[0].endpoints,
        eps.iter().map(|e| b(e)).collect::<Vec<_>>(),
        "insertion order kept"
    );
    server.shutdown().await.unwrap();
}

async fn ttl_expiry_of_endpoint_then_affiliate_is_announced(backend: Backend) {
    let mut cfg = backend.config("ttl_expiry_of_endpoint_then_affiliate_is_announced");
    cfg.gc_interval = Duration::from_millis(50);
    // With etcd, expiry is per lease bucket: 1 s apart, the endpoint and the affiliate
    // expire in different buckets, as they do one GC pass apart in memory.
    cfg.etcd_lease_bucket = Duration::from_secs(1);
    let server = start(cfg).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "af", "d", &["long"], 3))
        .await
        .unwrap();
    c.affiliate_update(update("c", "af", "", &["short"], 1))
        .await
        .unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(
        next(&mut w).await.unwrap().unwrap().affiliates,
        vec![aff("af", "d", &["long", "short"])]
    );
    // Q1: losing an endpoint is an update with what remains, not a deletion.
    assert_eq!(
        next(&mut w).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![aff("af", "d", &["long"])],
            deleted: false
        }
    );
    assert_eq!(
        next(&mut w).await.unwrap().unwrap(),
        WatchResponse {
            affiliates: vec![Affiliate {
                id: "af".into(),
                ..Default::default()
            }],
            deleted: true
        }
    );
    assert!(list(&mut c, "c").await.is_empty());
    server.shutdown().await.unwrap();
}

async fn slow_watcher_is_aborted_and_healthy_one_keeps_going(backend: Backend) {
    let server = start(backend.config("slow_watcher_is_aborted_and_healthy_one_keeps_going")).await;
    let mut c = client(&server).await;
    // A watcher on its own connection that stops reading: HTTP/2 flow control fills,
    // then the 32-slot buffer, and once the oldest of those has waited 200 ms the
    // server cuts it.
    let mut slow_client = client(&server).await;
    let mut slow = slow_client
        .watch(watch_req("c"))
        .await
        .unwrap()
        .into_inner();
    let mut healthy = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert!(
        next(&mut healthy)
            .await
            .unwrap()
            .unwrap()
            .affiliates
            .is_empty()
    );
    let data = "d".repeat(2048);
    let mut seen = 0;
    for i in 0..3000 {
        c.affiliate_update(update("c", "af", &data, &[], 60))
            .await
            .unwrap();
        // The healthy watcher keeps up.
        let m = next(&mut healthy).await.unwrap().unwrap();
        assert_eq!(m.affiliates[0].id, "af");
        seen += 1;
        if i % 100 == 99 && server.state.counts().subscriptions == 1 {
            break;
        }
    }
    assert_eq!(
        server.state.counts().subscriptions,
        1,
        "the slow watcher was dropped"
    );
    let end = within("slow watcher end", async {
        loop {
            match slow.message().await {
                Ok(Some(_)) => continue,
                end => return end,
            }
        }
    })
    .await;
    assert_refused(end, Code::Aborted, "subscription canceled: lost update");
    assert!(seen > 32);
    // The connection is still usable.
    list(&mut slow_client, "c").await;
    server.shutdown().await.unwrap();
}

async fn watched_empty_cluster_survives_gc_and_shutdown_ends_streams_ok(backend: Backend) {
    let mut cfg = backend.config("watched_empty_cluster_survives_gc_and_shutdown_ends_streams_ok");
    cfg.gc_interval = Duration::from_millis(20);
    let server = start(cfg).await;
    let mut c = client(&server).await;
    let mut w = c.watch(watch_req("quiet")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());
    // Let several GC passes run, observed through the metric rather than a sleep.
    let runs = server.metrics.gc_runs.clone();
    let start_runs = runs.get();
    until("gc passes", || runs.get() >= start_runs + 3).await;
    assert!(
        server.state.cluster("quiet").is_some(),
        "a watched cluster is not collected"
    );
    c.affiliate_update(update("quiet", "late", "d", &[], 60))
        .await
        .unwrap();
    assert_eq!(
        next(&mut w).await.unwrap().unwrap().affiliates[0].id,
        "late"
    );

    let shutdown = tokio::spawn(server.shutdown());
    assert_eq!(
        next(&mut w).await.unwrap(),
        None,
        "stream ends with OK on shutdown"
    );
    within("shutdown", shutdown).await.unwrap().unwrap();
}

async fn stored_endpoints(
    c: &mut ClusterClient<Channel>,
    cluster: &str,
    id: &str,
) -> Vec<bytes::Bytes> {
    list(c, cluster)
        .await
        .into_iter()
        .find(|a| a.id == id)
        .unwrap()
        .endpoints
}

/// A 4 MiB request can carry over a million tiny endpoints (3 bytes each on the wire).
/// They are deduplicated before the cluster lock is taken, and the contract's codes and
/// messages are those of a small request.
async fn a_million_endpoints_in_one_request_get_the_contract_status(backend: Backend) {
    use bytes::Bytes;
    // Just under the 4 MiB message limit.
    const N: usize = 1_390_000;
    let server =
        start(backend.config("a_million_endpoints_in_one_request_get_the_contract_status")).await;
    let mut c = client(&server).await;
    let value = |i: usize| Bytes::from(vec![(i * 7 % 64) as u8]);
    let distinct: Vec<Bytes> = (0..64).map(value).collect();
    let huge = |id: &str, extra: Option<Bytes>| {
        let mut req = update("huge", id, "d", &[], 60);
        req.affiliate_endpoints = (0..N).map(|i| distinct[i % 64].clone()).collect();
        req.affiliate_endpoints.extend(extra);
        req
    };

    // 64 distinct values, repeated: accepted, each stored once, first occurrences first.
    within("huge update", c.affiliate_update(huge("af", None)))
        .await
        .unwrap();
    assert_eq!(stored_endpoints(&mut c, "huge", "af").await, distinct);

    // One new value at the very end is the 65th: the whole request is rejected.
    let new = || Some(Bytes::from_static(b"new"));
    assert_refused(
        within("huge update", c.affiliate_update(huge("af", new()))).await,
        Code::ResourceExhausted,
        "too many endpoints in the affiliate",
    );
    assert_eq!(
        stored_endpoints(&mut c, "huge", "af").await,
        distinct,
        "nothing changed"
    );

    // A million distinct endpoints (2 bytes, 4 on the wire): rejected the same way.
    let mut req = update("huge", "af", "", &[], 60);
    req.affiliate_endpoints = (0..1_000_000u32)
        .map(|i| Bytes::copy_from_slice(&(i as u16).to_le_bytes()))
        .collect();
    assert_refused(
        within("huge update", c.affiliate_update(req)).await,
        Code::ResourceExhausted,
        "too many endpoints in the affiliate",
    );

    // In a full cluster a new affiliate is refused for that first, as before.
    for i in 1..1024 {
        c.affiliate_update(update("huge", &format!("f{i}"), "d", &[], 60))
            .await
            .unwrap();
    }
    assert_refused(
        within("huge update", c.affiliate_update(huge("one-more", new()))).await,
        Code::ResourceExhausted,
        "too many affiliates in the cluster",
    );
    server.shutdown().await.unwrap();
}

/// A node that left (deleted its affiliate) comes back after GC passes have run over
/// its now-empty cluster.
async fn an_affiliate_comes_back_after_gc_ran_over_its_empty_cluster(backend: Backend) {
    let mut cfg = backend.config("comes_back");
    cfg.gc_interval = Duration::from_millis(20);
    let server = start(cfg).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("c", "af", "d", &["e"], 60))
        .await
        .unwrap();
    c.affiliate_delete(AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "af".into(),
    })
    .await
    .unwrap();
    let runs = server.metrics.gc_runs.clone();
    let start_runs = runs.get();
    until("gc passes", || runs.get() >= start_runs + 3).await;
    within(
        "the update",
        c.affiliate_update(update("c", "af", "again", &["e"], 60)),
    )
    .await
    .unwrap();
    assert_eq!(list(&mut c, "c").await, vec![aff("af", "again", &["e"])]);
    server.shutdown().await.unwrap();
}

both_backends!(
    an_affiliate_comes_back_after_gc_ran_over_its_empty_cluster,
    update_merge_delete_and_watch_sequence,
    list_and_delete_do_not_create_clusters,
    validation_table,
    cluster_and_endpoint_limits,
    ttl_expiry_of_endpoint_then_affiliate_is_announced,
    slow_watcher_is_aborted_and_healthy_one_keeps_going,
    watched_empty_cluster_survives_gc_and_shutdown_ends_streams_ok,
    a_million_endpoints_in_one_request_get_the_contract_status,
);
