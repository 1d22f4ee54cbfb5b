//! Client simulations like upstream's (§4.14 "Real client"): nodes that behave like the
//! discovery client (Hello, publish themselves, push the endpoints they see for their
//! peers, watch and resync on Aborted) converge; a redirect moves them to another server.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::etcd::Backend;
use common::*;
use discovery_service::proto::server::cluster_client::ClusterClient;
use discovery_service::proto::server::{Affiliate, HelloResponse};
use tonic::Code;
use tonic::transport::Channel;

/// A node's view of its cluster, maintained from a watch stream the way the real
/// client does: each stream builds a fresh view from its first message (the snapshot),
/// and later ones patch it.
async fn watch_until(
    addr: SocketAddr,
    cluster: &str,
    mut done: impl FnMut(&HashMap<String, Affiliate>) -> bool,
) -> HashMap<String, Affiliate> {
    let mut c = client_at(addr).await;
    loop {
        let mut stream = c.watch(watch_req(cluster)).await.unwrap().into_inner();
        let mut view = HashMap::new();
        loop {
            match next(&mut stream).await {
                Ok(Some(m)) => {
                    for a in m.affiliates {
                        if m.deleted {
                            view.remove(&a.id);
                        } else {
                            view.insert(a.id.clone(), a);
                        }
                    }
                    if done(&view) {
                        return view;
                    }
                }
                // Too slow: reconnect for a fresh snapshot, as the real client does.
                Err(s) if s.code() == Code::Aborted => break,
                other => panic!("watch ended: {other:?}"),
            }
        }
    }
}

/// One node: publish own data and endpoint, then push what it "sees" of every peer (the
/// same internal endpoint again plus a public one), like KubeSpan's harvested endpoints.
async fn publish(addr: SocketAddr, cluster: String, i: usize, n: usize) {
    let mut c = client_at(addr).await;
    c.hello(hello(&cluster, "v1.12.0")).await.unwrap();
    let own = format!("10.0.0.{i}:51820");
    c.affiliate_update(update(
        &cluster,
        &format!("node{i}"),
        &format!("data{i}"),
        &[&own],
        10,
    ))
    .await
    .unwrap();
    for j in (0..n).filter(|&j| j != i) {
        let seen = format!("10.0.0.{j}:51820");
        let public = format!("1.2.3.{j}:51820");
        c.affiliate_update(update(
            &cluster,
            &format!("node{j}"),
            "",
            &[&seen, &public],
            10,
        ))
        .await
        .unwrap();
    }
}

fn converged(n: usize) -> impl FnMut(&HashMap<String, Affiliate>) -> bool {
    move |view| {
        view.len() == n
            && view
                .values()
                .all(|a| a.endpoints.len() == 2 && !a.data.is_empty())
    }
}

async fn five_fifteen_and_fifty_nodes_converge_within_five_seconds(backend: Backend) {
    let server = start(backend.config("converge")).await;
    let addr = server.grpc_addr;
    for n in [5usize, 15, 50] {
        let cluster = format!("sim{n}");
        let watchers: Vec<_> = (0..n)
            .map(|_| {
                let cluster = cluster.clone();
                tokio::spawn(async move { watch_until(addr, &cluster, converged(n)).await })
            })
            .collect();
        let publishers: Vec<_> = (0..n)
            .map(|i| tokio::spawn(publish(addr, cluster.clone(), i, n)))
            .collect();
        tokio::time::timeout(Duration::from_secs(5), async {
            for p in publishers {
                p.await.unwrap();
            }
            for w in watchers {
                let view = w.await.unwrap();
                // Exactly two deduplicated endpoints per peer, in insertion order.
                for (id, a) in view {
                    let j: usize = id.trim_start_matches("node").parse().unwrap();
                    assert_eq!(
                        a.endpoints,
                        vec![
                            b(&format!("10.0.0.{j}:51820")),
                            b(&format!("1.2.3.{j}:51820"))
                        ]
                    );
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} nodes did not converge within 5 s"));
    }
    server.shutdown().await.unwrap();
}

/// Hello from a client that keeps its configured endpoint across a server restart: the
/// first attempts after the restart may hit the dead connection, so it retries with a
/// short backoff, as the real client does (bounded here).
async fn hello_retrying(c: &mut ClusterClient<Channel>, cluster: &str) -> HelloResponse {
    within("hello after the restart", async {
        let mut attempts = 0;
        loop {
            match c.hello(hello(cluster, "v1.12.0")).await {
                Ok(r) => return r.into_inner(),
                Err(e) if attempts < 20 && e.code() == Code::Unavailable => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("hello failed: {e:?}"),
            }
        }
    })
    .await
}

/// The reference's scenario (§4.14 "Real client"): both clients register on server 1,
/// server 1 is restarted with a redirect to server 2, and the clients, re-Helloing to
/// their configured endpoint, follow the redirect and find each other on server 2.
#[tokio::test]
async fn restarting_server_one_with_a_redirect_moves_both_clients() {
    let second = start(config()).await;
    let first = start(config()).await;
    let first_addr = first.grpc_addr;

    // Both register on server 1 and see each other there.
    let mut clients = Vec::new();
    for i in 0..2 {
        let mut c = client_at(first_addr).await;
        let hello = hello_retrying(&mut c, "moving").await;
        assert!(hello.redirect.is_none());
        publish(first_addr, "moving".into(), i, 2).await;
        clients.push(c);
    }
    watch_until(first_addr, "moving", converged(2)).await;
    // Each client keeps a watch open on server 1, as the real one does.
    let mut streams = Vec::new();
    for c in &mut clients {
        let mut s = c.watch(watch_req("moving")).await.unwrap().into_inner();
        assert_eq!(next(&mut s).await.unwrap().unwrap().affiliates.len(), 2);
        streams.push(s);
    }

    // Restart server 1, same address, now redirecting to server 2.
    first.shutdown().await.unwrap();
    for s in &mut streams {
        // The shutdown ends the watch with OK: the client's cue to reconnect.
        assert!(next(s).await.unwrap().is_none());
    }
    let mut cfg = config();
    cfg.addr = first_addr.to_string();
    cfg.redirect_endpoint = second.grpc_addr.to_string();
    let first = start(cfg).await;
    assert_eq!(first.grpc_addr, first_addr);

    for (i, c) in clients.iter_mut().enumerate() {
        let hello = hello_retrying(c, "moving").await;
        // The client switches to the redirect for the rest of its lifetime.
        let home: SocketAddr = hello
            .redirect
            .expect("redirected")
            .endpoint
            .parse()
            .unwrap();
        assert_eq!(home, second.grpc_addr);
        publish(home, "moving".into(), i, 2).await;
    }
    let view = watch_until(second.grpc_addr, "moving", converged(2)).await;
    assert_eq!(view.len(), 2);
    assert!(
        first.state.cluster("moving").is_none(),
        "nothing was published on the restarted server 1"
    );
    first.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
}

/// A client with a 1 s TTL that stops refreshing vanishes from its peer's view.
async fn a_stopped_short_ttl_client_vanishes(backend: Backend) {
    let mut cfg = backend.config("short_ttl");
    cfg.gc_interval = Duration::from_millis(50);
    cfg.etcd_lease_bucket = Duration::from_secs(1);
    let server = start(cfg).await;
    let mut c = client(&server).await;
    c.affiliate_update(update("ttl", "short", "d", &["e"], 1))
        .await
        .unwrap();
    c.affiliate_update(update("ttl", "long", "d", &["e"], 60))
        .await
        .unwrap();
    let mut seen_both = false;
    let view = watch_until(server.grpc_addr, "ttl", |v| {
        seen_both |= v.len() == 2;
        seen_both && v.len() == 1
    })
    .await;
    assert!(view.contains_key("long"));
    server.shutdown().await.unwrap();
}

/// Both simulations on both backends (by hand: convergence needs a multi-thread
/// runtime, which `both_backends!` does not give).
mod memory {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_fifteen_and_fifty_nodes_converge_within_five_seconds() {
        super::five_fifteen_and_fifty_nodes_converge_within_five_seconds(Backend::Memory).await
    }

    #[tokio::test]
    async fn a_stopped_short_ttl_client_vanishes() {
        super::a_stopped_short_ttl_client_vanishes(Backend::Memory).await
    }
}

mod etcd {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn five_fifteen_and_fifty_nodes_converge_within_five_seconds() {
        super::five_fifteen_and_fifty_nodes_converge_within_five_seconds(Backend::Etcd).await
    }

    #[tokio::test]
    async fn a_stopped_short_ttl_client_vanishes() {
        super::a_stopped_short_ttl_client_vanishes(Backend::Etcd).await
    }
}
