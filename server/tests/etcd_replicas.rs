//! Replicas sharing their state on a real etcd (Debian's `etcd-server`, started by the
//! test on loopback): convergence across replicas, a replica killed under load, etcd
//! members lost with and without quorum, TTLs as leases across replica restarts, and a
//! replica that fell behind etcd's compaction.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::etcd::{Etcd, compact_history};
use common::slow_proxy::SlowProxy;
use common::*;
use discovery_service::proto::server::WatchResponse;
use discovery_service::proto::server::cluster_client::ClusterClient;
use tonic::Code;
use tonic::transport::Channel;

/// Applies watch messages to a membership view, as a client does.
fn apply(view: &mut BTreeMap<String, Vec<u8>>, m: WatchResponse) {
    for a in m.affiliates {
        if m.deleted {
            view.remove(&a.id);
        } else {
            view.insert(a.id, a.data.to_vec());
        }
    }
}

/// Reads a watch until its view equals `want`, bounded.
async fn watch_until(
    what: &str,
    stream: &mut tonic::Streaming<WatchResponse>,
    view: &mut BTreeMap<String, Vec<u8>>,
    want: &BTreeMap<String, Vec<u8>>,
) {
    within(what, async {
        while view != want {
            let m = stream.message().await.unwrap().expect("the stream goes on");
            apply(view, m);
        }
    })
    .await
}

#[tokio::test]
async fn clients_spread_over_three_replicas_on_three_members_converge() {
    let etcd = Etcd::start(3).await;
    let mut replicas = Vec::new();
    for _ in 0..3 {
        replicas.push(start(etcd.config("/converge/")).await);
    }
    let mut clients = Vec::new();
    for r in &replicas {
        clients.push(client(r).await);
    }
    // A watcher on every replica, opened before anything is written.
    let mut watches = Vec::new();
    for c in &mut clients {
        let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
        assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());
        watches.push((w, BTreeMap::new()));
    }
    // 30 nodes, each talking to its own replica, some updating twice.
    let mut want = BTreeMap::new();
    for i in 0..30 {
        let c = &mut clients[i % 3];
        let id = format!("node{i}");
        c.affiliate_update(update("c", &id, "first", &[&format!("ep{i}")], 60))
            .await
            .unwrap();
        if i % 2 == 0 {
            // Another replica updates the same affiliate: one affiliate, latest data.
            clients[(i + 1) % 3]
                .affiliate_update(update("c", &id, "second", &["shared"], 60))
                .await
                .unwrap();
            want.insert(id, b"second".to_vec());
        } else {
            want.insert(id, b"first".to_vec());
        }
    }
    for (i, (w, view)) in watches.iter_mut().enumerate() {
        watch_until(&format!("watcher on replica {i}"), w, view, &want).await;
    }
    // Every replica lists the same membership, endpoints merged across replicas.
    for c in &mut clients {
        let l = list(c, "c").await;
        let got: BTreeMap<String, Vec<u8>> =
            l.iter().map(|a| (a.id.clone(), a.data.to_vec())).collect();
        assert_eq!(got, want);
        let node0 = l.iter().find(|a| a.id == "node0").unwrap();
        assert_eq!(node0.endpoints, vec![b("ep0"), b("shared")]);
    }
    for r in replicas {
        r.shutdown().await.unwrap();
    }
}

/// A replica as its own process, so it can be SIGKILLed like a lost machine.
struct Process {
    child: Child,
    addr: std::net::SocketAddr,
    /// Its log lines, as they are written.
    logs: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
}

impl Process {
    /// Starts the binary on an ephemeral port and learns the port from its
    /// "listening" log line.
    async fn start(etcd: &Etcd, prefix: &str) -> Self {
        Self::start_logging(etcd, prefix, "info").await
    }

    /// As [`Self::start`], logging what `filter` (`RUST_LOG` syntax) selects.
    async fn start_logging(etcd: &Etcd, prefix: &str, filter: &str) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_discovery-service"))
            .args([
                "--addr=127.0.0.1:0".to_string(),
                "--landing-addr=".into(),
                "--metrics-addr=".into(),
                "--state-backend=etcd".into(),
                format!("--etcd-endpoints={}", etcd.endpoints().join(",")),
                format!("--etcd-prefix={prefix}"),
                "--rate-limit-per-second=1000000000".into(),
                "--rate-limit-burst=1000000".into(),
            ])
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (log_tx, logs) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut tx = Some(tx);
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                if v["message"] == "listening"
                    && v["server"] == "grpc"
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(v["address"].as_str().unwrap_or_default().to_owned());
                }
                let _ = log_tx.send(v);
            }
        });
        let addr = within("replica listening", rx)
            .await
            .expect("the replica logs where it listens")
            .parse()
            .unwrap();
        Self { child, addr, logs }
    }

    /// Waits (bounded) until it logs `message`.
    async fn logged(&mut self, message: &str) {
        within(message, async {
            while let Some(v) = self.logs.recv().await {
                if v["message"] == message {
                    return;
                }
            }
            panic!("the replica ended without logging {message:?}");
        })
        .await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_replica_killed_mid_load_loses_no_acknowledged_update() {
    let etcd = Etcd::start(3).await;
    let mut doomed = Process::start(&etcd, "/kill/").await;
    let survivor = Process::start(&etcd, "/kill/").await;
    let mut on_doomed = client_at(doomed.addr).await;
    let mut w = on_doomed.watch(watch_req("c")).await.unwrap().into_inner();
    next(&mut w).await.unwrap().unwrap();

    // Writers update their node with increasing versions; what was acknowledged is
    // recorded. Each switches replica when its own is gone, as Talos's client does.
    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<(String, u32)>();
    let (doomed_addr, survivor_addr) = (doomed.addr, survivor.addr);
    let mut writers = Vec::new();
    for n in 0..4 {
        let acked = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            let id = format!("node{n}");
            let mut c = client_at(doomed_addr).await;
            let mut switched = false;
            for v in 0..400u32 {
                match c
                    .affiliate_update(update("c", &id, &format!("v{v:05}"), &[], 60))
                    .await
                {
                    Ok(_) => {
                        acked.send((id.clone(), v)).unwrap();
                    }
                    Err(_) if !switched => {
                        switched = true;
                        c = client_at(survivor_addr).await;
                    }
                    Err(s) => panic!("the surviving replica refused: {s:?}"),
                }
            }
        }));
    }
    drop(acked_tx);
    // Kill once the load is well under way.
    let mut acked: BTreeMap<String, u32> = BTreeMap::new();
    while acked.values().map(|v| *v as usize).sum::<usize>() < 200 {
        let (id, v) = within("acknowledged updates", acked_rx.recv())
            .await
            .unwrap();
        acked.insert(id, v);
    }
    doomed.kill();
    // The watcher's stream breaks; it reconnects to the survivor and gets a snapshot.
    let broke = within("watch breaks", async {
        loop {
            match w.message().await {
                Ok(Some(_)) => continue,
                end => return end,
            }
        }
    })
    .await;
    assert!(
        broke.is_err(),
        "the stream ends with an error, not OK: {broke:?}"
    );
    for wr in writers {
        within("writers", wr).await.unwrap();
    }
    while let Some((id, v)) = acked_rx.recv().await {
        acked.insert(id, v);
    }
    let mut on_survivor = client_at(survivor.addr).await;
    let mut w = on_survivor
        .watch(watch_req("c"))
        .await
        .unwrap()
        .into_inner();
    let snapshot = next(&mut w).await.unwrap().unwrap();
    assert!(!snapshot.deleted);
    let stored: BTreeMap<String, u32> = snapshot
        .affiliates
        .iter()
        .map(|a| {
            (
                a.id.clone(),
                String::from_utf8_lossy(&a.data)[1..].parse().unwrap(),
            )
        })
        .collect();
    for (id, v) in &acked {
        assert!(
            stored[id] >= *v,
            "{id}: acknowledged v{v}, stored v{}",
            stored[id]
        );
    }
    assert_eq!(stored.len(), 4);
    assert!(
        acked.values().all(|v| *v == 399),
        "every writer finished: {acked:?}"
    );
}

/// Watch messages as (id, data) pairs, read until `n` have arrived, bounded.
async fn changes(w: &mut tonic::Streaming<WatchResponse>, n: usize) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let m = next(w).await.unwrap().expect("the stream goes on");
        assert!(!m.deleted, "nothing was deleted: {m:?}");
        for a in m.affiliates {
            seen.push((a.id, String::from_utf8_lossy(&a.data).into_owned()));
        }
    }
    seen
}

/// Once its etcd watch has carried more than it keeps buffered and gone quiet, a
/// replica opens a new watch to give the buffer back; its watchers still get every
/// change exactly once, in order, across the switch.
#[tokio::test]
async fn a_reopened_etcd_watch_skips_and_repeats_nothing() {
    let etcd = Etcd::start(1).await;
    let mut replica =
        Process::start_logging(&etcd, "/reopen/", "info,discovery_service::etcd=debug").await;
    let mut c = client_at(replica.addr).await;
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    let snapshot = next(&mut w).await.unwrap().unwrap();
    assert!(snapshot.affiliates.is_empty());

    // About 100 KiB of changes, more than the 64 KiB kept.
    let big = "x".repeat(1000);
    let mut want = Vec::new();
    for i in 0..100 {
        let (id, data) = (format!("n{i:03}"), format!("{big}{i}"));
        c.affiliate_update(update("c", &id, &data, &[], 60))
            .await
            .unwrap();
        want.push((id, data));
    }
    replica
        .logged("reopening the etcd watch to free its receive buffer")
        .await;
    for v in 0..20 {
        let data = format!("after{v}");
        c.affiliate_update(update("c", "n000", &data, &[], 60))
            .await
            .unwrap();
        want.push(("n000".into(), data));
    }
    // One last change: had anything been repeated, it would arrive before this.
    c.affiliate_update(update("c", "last", "end", &[], 60))
        .await
        .unwrap();
    want.push(("last".into(), "end".into()));
    assert_eq!(changes(&mut w, want.len()).await, want);
}

/// A member that commits an update but answers after the replica gave up on it (slow,
/// or cut off on the way back): the replica sends the transaction again to another
/// member, whose condition fails because the first attempt landed. The replica finds
/// its own write in its mirror and acknowledges it rather than writing it again, so
/// watchers hear of it once.
#[tokio::test]
async fn an_update_answered_too_late_is_not_written_twice() {
    let etcd = Etcd::start(1).await;
    let member = etcd.endpoints()[0].clone();
    let proxy = SlowProxy::start(&member, Duration::from_secs(3)).await;
    let mut config = etcd.config("/late-answer/");
    // The slow way first: every call starts there.
    config.etcd_endpoints = vec![proxy.url.clone(), member];
    let server = start(config).await;
    let mut c = client(&server).await;
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());
    c.affiliate_update(update("c", "n1", "v1", &[], 60))
        .await
        .unwrap();
    assert_eq!(changes(&mut w, 1).await, [("n1".into(), "v1".into())]);

    proxy.set_slow(true);
    c.affiliate_update(update("c", "n1", "v2", &[], 60))
        .await
        .unwrap();
    proxy.set_slow(false);
    c.affiliate_update(update("c", "n1", "v3", &[], 60))
        .await
        .unwrap();
    assert_eq!(
        changes(&mut w, 2).await,
        [("n1".into(), "v2".into()), ("n1".into(), "v3".into())]
    );
}

/// As above, but another replica writes the same affiliate while the first one's
/// answer is held back: when the first replica sends its update again and the condition
/// fails, its mirror already holds the other write, so it cannot tell from there that
/// its own landed. It finds it in etcd's history of the affiliate key (a version with
/// exactly its value, and its endpoints at that revision), and acknowledges without
/// writing again, which would have told watchers a third time and undone the other
/// replica's later write.
#[tokio::test]
async fn an_update_answered_too_late_is_not_written_again_after_a_later_write() {
    let etcd = Etcd::start(1).await;
    let member = etcd.endpoints()[0].clone();
    let proxy = SlowProxy::start(&member, Duration::from_secs(3)).await;
    let mut config = etcd.config("/late-answer-2/");
    config.etcd_endpoints = vec![proxy.url.clone(), member];
    let slow = start(config).await;
    let direct = start(etcd.config("/late-answer-2/")).await;
    let mut c_slow = client(&slow).await;
    let mut c_direct = client(&direct).await;
    let mut w = c_direct.watch(watch_req("c")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());
    c_slow
        .affiliate_update(update("c", "n1", "v1", &["e1"], 60))
        .await
        .unwrap();
    assert_eq!(changes(&mut w, 1).await, [("n1".into(), "v1".into())]);

    proxy.set_slow(true);
    let held = tokio::spawn(async move {
        c_slow
            .affiliate_update(update("c", "n1", "v2", &["e2"], 60))
            .await
    });
    // It landed (its answer is held back for 3 s, past the 2 s attempt timeout)...
    assert_eq!(changes(&mut w, 1).await, [("n1".into(), "v2".into())]);
    // ... and another replica writes the affiliate before the retry.
    c_direct
        .affiliate_update(update("c", "n1", "later", &[], 60))
        .await
        .unwrap();
    within("the held update", held).await.unwrap().unwrap();
    proxy.set_slow(false);
    c_direct
        .affiliate_update(update("c", "end", "end", &[], 60))
        .await
        .unwrap();
    assert_eq!(
        changes(&mut w, 2).await,
        [("n1".into(), "later".into()), ("end".into(), "end".into())]
    );
    let listed = list(&mut c_direct, "c").await;
    let n1 = listed.iter().find(|a| a.id == "n1").unwrap();
    assert_eq!(&n1.data[..], b"later");
}

/// etcd answers slowly, so 40 concurrent updates of one cluster queue behind the
/// first and are batched into one transaction: one revision with 40 changes, which
/// every replica applies at once. A watcher of that cluster gets all 40, although its
/// buffer holds 32: it could not read in the middle of them, so it is not behind and
/// its stream goes on (it used to be aborted, and every Talos node of the cluster
/// reconnected and sent its update again, making the next burst).
#[tokio::test]
async fn a_watcher_gets_a_batch_larger_than_its_buffer_whole() {
    use discovery_service::etcd::proto::etcdserverpb::RangeRequest;
    use discovery_service::etcd::proto::etcdserverpb::kv_client::KvClient;

    let etcd = Etcd::start(1).await;
    let member = etcd.endpoints()[0].clone();
    // Held back well under the 2 s attempt timeout: slow, not failing.
    let proxy = SlowProxy::start(&member, Duration::from_millis(500)).await;
    let mut config = etcd.config("/burst/");
    config.etcd_endpoints = vec![proxy.url.clone()];
    // Every expiry in one bucket (a day's), so no lease grant splits the updates.
    config.etcd_lease_bucket = Duration::from_secs(86_400);
    let replica = start(config).await;
    let mut c = client(&replica).await;
    let ids: Vec<String> = (0..40).map(|i| format!("n{i:02}")).collect();
    for id in &ids {
        within(
            "create",
            c.affiliate_update(update("c", id, "v1", &[], 300)),
        )
        .await
        .unwrap();
    }
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 40);

    proxy.set_slow(true);
    let updates = ids.iter().map(|id| {
        let mut c = c.clone();
        async move { c.affiliate_update(update("c", id, "v2", &[], 300)).await }
    });
    for r in within("40 updates", futures::future::join_all(updates)).await {
        r.unwrap();
    }
    proxy.set_slow(false);

    // The premise: most of them went in one revision.
    let channel = etcd.channel(0).await;
    let kvs = within(
        "range",
        KvClient::new(channel).range(RangeRequest {
            key: bytes::Bytes::from_static(b"/burst/"),
            range_end: bytes::Bytes::from_static(b"/burst0"),
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .kvs;
    let mut per_revision: BTreeMap<i64, usize> = BTreeMap::new();
    for kv in kvs
        .iter()
        .filter(|kv| kv.key.windows(3).any(|w| w == b"/a/"))
    {
        *per_revision.entry(kv.mod_revision).or_default() += 1;
    }
    let largest = per_revision.values().max().copied().unwrap_or(0);
    assert!(largest > 32, "one batch should hold most: {per_revision:?}");

    let got = changes(&mut w, 40).await;
    let want: BTreeSet<(String, String)> = ids.iter().map(|id| (id.clone(), "v2".into())).collect();
    assert_eq!(got.into_iter().collect::<BTreeSet<_>>(), want);
    // And the stream goes on.
    within(
        "one more",
        c.affiliate_update(update("c", "n00", "v3", &[], 300)),
    )
    .await
    .unwrap();
    assert_eq!(changes(&mut w, 1).await, [("n00".into(), "v3".into())]);
    replica.shutdown().await.unwrap();
}

/// 200 Lists at once on one replica: each must answer with everything acknowledged
/// before it began, anywhere, which takes a write to etcd (a marker the replica then
/// waits to see); they share those writes instead of making 200.
#[tokio::test]
async fn concurrent_lists_share_their_writes_to_etcd() {
    use discovery_service::proto::server::ListRequest;

    let etcd = Etcd::start(1).await;
    let replica = start(etcd.config("/shared-marks/")).await;
    let mut c = client(&replica).await;
    c.affiliate_update(update("c", "n", "d", &[], 300))
        .await
        .unwrap();
    let before = etcd.revision().await;
    let lists = (0..200).map(|_| {
        let mut c = c.clone();
        async move {
            c.list(ListRequest {
                cluster_id: "c".into(),
            })
            .await
        }
    });
    for r in within("200 lists", futures::future::join_all(lists)).await {
        assert_eq!(r.unwrap().into_inner().affiliates.len(), 1);
    }
    let writes = etcd.revision().await - before;
    assert!(writes <= 20, "{writes} etcd writes for 200 lists");
    replica.shutdown().await.unwrap();
}

/// Retries an update (bounded) while etcd members come back: until then each attempt
/// must fail with UNAVAILABLE. The replica's client reconnects at its own pace, with
/// nothing to await from outside, hence the pause between attempts.
async fn update_once_etcd_answers(c: &mut ClusterClient<Channel>, id: &str, what: &str) {
    within(what, async {
        while let Err(s) = try_update(c, id, "d").await {
            assert_eq!(s.code(), Code::Unavailable, "{s:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
}

async fn try_update(
    c: &mut ClusterClient<Channel>,
    id: &str,
    data: &str,
) -> Result<(), tonic::Status> {
    c.affiliate_update(update("c", id, data, &[], 300))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn losing_one_etcd_member_is_invisible_and_losing_two_is_unavailable_until_they_return() {
    let mut etcd = Etcd::start(3).await;
    let replica = start(etcd.config("/quorum/")).await;
    let mut c = client(&replica).await;
    try_update(&mut c, "before", "d").await.unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 1);

    // One member down, quorum kept: every call succeeds and the watch keeps going.
    etcd.kill(0);
    for i in 0..20 {
        try_update(&mut c, &format!("one-down-{i}"), "d")
            .await
            .unwrap();
        assert_eq!(
            next(&mut w).await.unwrap().unwrap().affiliates[0].id,
            format!("one-down-{i}")
        );
    }
    assert_eq!(list(&mut c, "c").await.len(), 21);

    // Two down: no quorum. Calls fail with UNAVAILABLE (bounded), nothing changes.
    etcd.kill(1);
    let refused = within(
        "update without quorum",
        try_update(&mut c, "no-quorum", "d"),
    )
    .await;
    assert_eq!(refused.unwrap_err().code(), Code::Unavailable);
    let listed = within("list without quorum", c.list(list_req("c"))).await;
    assert_eq!(listed.unwrap_err().code(), Code::Unavailable);

    // They come back: service resumes, on the same connection, with nothing lost.
    etcd.restart(0);
    etcd.restart(1);
    etcd.wait_ready().await;
    update_once_etcd_answers(&mut c, "after", "update after quorum returns").await;
    // Everything acknowledged is there. The refused update may be there too: a
    // member that had lost its quorum may still have logged it, and the members that
    // returned commit it; UNAVAILABLE means "not acknowledged", as for any timeout.
    let ids: BTreeSet<String> = list(&mut c, "c").await.into_iter().map(|a| a.id).collect();
    let mut acknowledged: BTreeSet<String> = (0..20).map(|i| format!("one-down-{i}")).collect();
    acknowledged.extend(["before".to_string(), "after".to_string()]);
    assert!(ids.is_superset(&acknowledged), "{ids:?}");
    assert!(ids.len() <= acknowledged.len() + 1 && (ids.len() == 22 || ids.contains("no-quorum")));
    replica.shutdown().await.unwrap();
}

/// A member that stops answering without closing its connections (a hung process, a
/// stalled disk) while the replica's calls and its etcd watch are on it: the calls
/// move to another member after one attempt, and so does the watch once it has
/// delivered nothing while a later revision is known to be committed. Updates keep
/// being acknowledged within Talos's 10 s, and watchers keep hearing of them.
#[tokio::test]
async fn a_frozen_member_holding_the_watch_is_left_within_one_rpc() {
    let mut etcd = Etcd::start(3).await;
    // Member 0 is first in the list: the replica's calls and watch start there.
    let replica = start(etcd.config("/frozen/")).await;
    let mut c = client(&replica).await;
    try_update(&mut c, "before", "d").await.unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 1);

    etcd.freeze(0);
    let started = std::time::Instant::now();
    let acknowledged = tokio::time::timeout(
        Duration::from_secs(10),
        try_update(&mut c, "while-frozen", "d"),
    )
    .await;
    assert!(
        matches!(acknowledged, Ok(Ok(()))),
        "update with member 0 frozen: {acknowledged:?} after {:?}",
        started.elapsed()
    );
    assert_eq!(
        next(&mut w).await.unwrap().unwrap().affiliates[0].id,
        "while-frozen"
    );
    // Later calls go straight to a member that answers.
    for i in 0..5 {
        within(
            "update on the next member",
            try_update(&mut c, &format!("after-{i}"), "d"),
        )
        .await
        .unwrap();
        assert_eq!(
            next(&mut w).await.unwrap().unwrap().affiliates[0].id,
            format!("after-{i}")
        );
    }
    assert_eq!(list(&mut c, "c").await.len(), 7);
    etcd.thaw(0);
    replica.shutdown().await.unwrap();
}

/// An etcd whose database reached its quota refuses every write until an operator
/// frees space: updates fail with UNAVAILABLE saying why (the service is down, the
/// request is not at fault), not with INTERNAL.
#[tokio::test]
async fn an_etcd_out_of_space_makes_updates_unavailable_and_says_why() {
    let etcd = Etcd::start_flags(&["--quota-backend-bytes", "1048576"]).await;
    let replica = start(etcd.config("/full/")).await;
    let mut c = client(&replica).await;
    let data = "d".repeat(2000);
    let mut refused = None;
    for i in 0..5000 {
        // Spread over clusters: the 1024-affiliate limit must not come first.
        let req = update(&format!("c{}", i / 1000), &format!("a{i}"), &data, &[], 300);
        if let Err(s) = within("update", c.affiliate_update(req)).await {
            refused = Some(s);
            break;
        }
    }
    let refused = refused.expect("a 1 MiB etcd fills up");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("database space exceeded"),
        "{refused:?}"
    );
    replica.shutdown().await.unwrap();
}

/// A lease the replica holds for a bucket ends early (revoked by an operator, or
/// granted by a member whose lease state was lost): etcd refuses the next write that
/// uses it with "lease not found". The replica forgets that bucket's lease, grants a
/// fresh one and the update goes through.
#[tokio::test]
async fn a_lease_revoked_behind_the_replicas_back_is_replaced() {
    use discovery_service::etcd::proto::etcdserverpb::lease_client::LeaseClient;
    use discovery_service::etcd::proto::etcdserverpb::{LeaseLeasesRequest, LeaseRevokeRequest};

    let etcd = Etcd::start(1).await;
    let mut cfg = etcd.config("/revoked/");
    // Both updates' expiries in one bucket (a day's), whenever the test runs.
    cfg.etcd_lease_bucket = Duration::from_secs(86_400);
    let replica = start(cfg).await;
    let mut c = client(&replica).await;
    try_update(&mut c, "first", "d").await.unwrap();
    let channel = etcd.channel(0).await;
    let mut leases = LeaseClient::new(channel);
    let held = within("lease list", leases.lease_leases(LeaseLeasesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(held.len(), 1, "one bucket, one lease: {held:?}");
    within(
        "lease revoke",
        leases.lease_revoke(LeaseRevokeRequest { id: held[0].id }),
    )
    .await
    .unwrap();
    // Same TTL, same bucket: the replica still has the revoked lease for it.
    within("update after the revoke", try_update(&mut c, "second", "d"))
        .await
        .unwrap();
    let ids: Vec<String> = list(&mut c, "c").await.into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["second"], "the revoke deleted the first one's keys");
    let now = within("lease list", leases.lease_leases(LeaseLeasesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .leases;
    assert_eq!(now.len(), 1, "a fresh lease replaced it: {now:?}");
    assert_ne!(now[0].id, held[0].id);
    replica.shutdown().await.unwrap();
}

/// Another program writes under the replica's prefix: an affiliate's key then holds a
/// value this server never writes. The copy takes it for no affiliate, as a full read
/// of etcd would: watchers are told the affiliate is gone, and the cluster's List and
/// Watch go on serving the rest. Updates of that affiliate, with data or without, are
/// refused at once, saying why, instead of catching up with etcd again and again until
/// their deadline, and overwriting what they cannot read. Once the value is deleted,
/// the affiliate can be written again.
#[tokio::test]
async fn an_affiliate_value_another_program_wrote_is_refused_saying_why() {
    use discovery_service::etcd::keys::Layout;
    use discovery_service::etcd::proto::etcdserverpb::kv_client::KvClient;
    use discovery_service::etcd::proto::etcdserverpb::{DeleteRangeRequest, PutRequest};

    let etcd = Etcd::start(1).await;
    let replica = start(etcd.config("/foreign/")).await;
    let mut c = client(&replica).await;
    try_update(&mut c, "a", "d").await.unwrap();
    try_update(&mut c, "b", "d").await.unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    let snapshot = next(&mut w).await.unwrap().expect("a snapshot");
    assert_eq!(snapshot.affiliates.len(), 2);
    let key = Layout::new("/foreign/").affiliate("c", "a");
    let req = PutRequest {
        key: key.clone().into(),
        value: b"not ours".to_vec().into(),
        ..Default::default()
    };
    etcd.client().put(req).await.unwrap();
    let gone = next(&mut w).await.unwrap().expect("the stream goes on");
    assert!(gone.deleted, "{gone:?}");
    assert_eq!(gone.affiliates[0].id, "a");
    let ids: Vec<String> = list(&mut c, "c").await.into_iter().map(|a| a.id).collect();
    assert_eq!(ids, ["b"]);
    for (what, data) in [("a refresh", ""), ("an update with data", "again")] {
        let attempt = c.affiliate_update(update("c", "a", data, &["e"], 300));
        let refused = within(what, attempt).await.unwrap_err();
        assert_eq!(refused.code(), Code::Internal, "{what}: {refused:?}");
        assert!(refused.message().contains("did not write"), "{refused:?}");
    }
    let req = DeleteRangeRequest {
        key: key.into(),
        ..Default::default()
    };
    let mut kv = KvClient::new(etcd.channel(0).await);
    within("the delete", kv.delete_range(req)).await.unwrap();
    within(
        "an update once it is gone",
        try_update(&mut c, "a", "again"),
    )
    .await
    .unwrap();
    let back = next(&mut w).await.unwrap().expect("the stream goes on");
    assert_eq!((back.deleted, back.affiliates[0].id.as_str()), (false, "a"));
    assert_eq!(back.affiliates[0].data, b"again".as_slice());
    replica.shutdown().await.unwrap();
}

/// A member that never answers: a loopback listener that accepts connections and
/// keeps them open, silent. Its URL, and the task holding it (abort it at the end).
async fn silent_member() -> (String, tokio::task::JoinHandle<()>) {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", silent.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            open.push(conn);
        }
    });
    (url, held)
}

/// The first member never answers (a loopback listener that accepts and stays
/// silent), so a lease grant reaches the second member one attempt timeout late. The
/// lease must still end with its bucket: its TTL is counted from when the grant was
/// sent, not from when the writer asked (that made every key of the bucket outlive it
/// by the wasted attempt).
#[tokio::test]
async fn a_lease_granted_after_a_failed_attempt_still_ends_with_its_bucket() {
    use discovery_service::etcd::leases::Leases;
    use discovery_service::etcd::proto::etcdserverpb::LeaseTimeToLiveRequest;
    use discovery_service::etcd::proto::etcdserverpb::lease_client::LeaseClient;
    use discovery_service::etcd::{EtcdClient, EtcdOptions, clock};

    let etcd = Etcd::start(1).await;
    let (silent_url, held) = silent_member().await;
    let client = EtcdClient::new(&EtcdOptions {
        endpoints: vec![silent_url, etcd.endpoints()[0].clone()],
        ..Default::default()
    })
    .unwrap();
    let leases = Leases::new(Duration::from_secs(5));
    let asked = clock::now_ms();
    let expiry = asked + 60_000;
    let id = within("lease", leases.for_expiry(&client, expiry, asked))
        .await
        .unwrap();
    let returned = clock::now_ms();
    assert!(
        returned - asked >= 2_000,
        "the silent member was tried first"
    );
    let end_ms = leases.bucket_end(expiry) * 1000;

    let channel = etcd.channel(0).await;
    let granted = within(
        "lease ttl",
        LeaseClient::new(channel).lease_time_to_live(LeaseTimeToLiveRequest { id, keys: false }),
    )
    .await
    .unwrap()
    .into_inner()
    .granted_ttl;
    // The attempt that answered was sent once the silent member's 2 s attempt had
    // timed out: counted from then and rounded up to the second, the TTL is under
    // what is left of the bucket 2 s after `asked`, plus 1 s. Counted from `asked`, it
    // would be at least what was left then. (Not measured against `returned`: on a
    // loaded machine the grant itself can take over a second.)
    let left_after_timeout_ms = end_ms - (asked + 2_000);
    assert!(
        granted * 1000 < left_after_timeout_ms + 1_000,
        "a lease of {granted} s, asked for at {asked}, outlives its bucket ending at {end_ms}"
    );
    held.abort();
}

/// A lease grant that is slow (its first member never answers, so it waits one attempt
/// timeout) holds up only the writers of its own bucket: a writer whose bucket already
/// has its lease goes on at once, and two writers of the new bucket share one grant.
/// (The lease map's lock was held across the grant, so every writer waited for it.)
#[tokio::test]
async fn a_slow_lease_grant_holds_up_only_the_writers_of_its_own_bucket() {
    use discovery_service::etcd::leases::Leases;
    use discovery_service::etcd::{EtcdClient, EtcdOptions, clock};
    use std::pin::pin;

    let etcd = Etcd::start(1).await;
    let (silent_url, held) = silent_member().await;
    let client = |endpoints: Vec<String>| {
        EtcdClient::new(&EtcdOptions {
            endpoints,
            ..Default::default()
        })
        .unwrap()
    };
    let slow = client(vec![silent_url, etcd.endpoints()[0].clone()]);
    let fast = client(vec![etcd.endpoints()[0].clone()]);
    let leases = Leases::new(Duration::from_secs(5));
    let now = clock::now_ms();
    let (soon, later) = (now + 60_000, now + 120_000);
    let lease = within("a first lease", leases.for_expiry(&fast, soon, now))
        .await
        .unwrap();

    let mut first = pin!(leases.for_expiry(&slow, later, now));
    let mut second = pin!(leases.for_expiry(&slow, later, now));
    assert!(
        futures::poll!(&mut first).is_pending(),
        "granting on the silent member"
    );
    assert!(
        futures::poll!(&mut second).is_pending(),
        "waiting for that grant"
    );
    let again = within(
        "the lease of a bucket that has one, while another bucket's grant waits",
        leases.for_expiry(&fast, soon, now),
    )
    .await
    .unwrap();
    assert_eq!(again, lease);
    let (a, b) = within("the slow grant", futures::future::join(first, second)).await;
    assert_eq!(a.unwrap(), b.unwrap(), "one grant for the new bucket");
    assert_eq!(fast.lease_count().await.unwrap(), 2);
    held.abort();
}

/// etcd compacts while a replica starts, between two pages of its full read, so the
/// revision it reads at is gone: it reads again at the latest revision and starts with
/// everything, rather than failing to start.
#[tokio::test]
async fn a_compaction_during_the_first_full_read_is_read_through() {
    let etcd = Etcd::start(1).await;
    let member = etcd.endpoints()[0].clone();
    let writer = start(etcd.config("/compact-start/")).await;
    let mut c = client(&writer).await;
    // More keys than one page of the full read (2,000).
    const N: usize = 2100;
    for i in 0..N {
        let req = update(&format!("c{}", i / 1000), &format!("a{i}"), "d", &[], 300);
        within("update", c.affiliate_update(req)).await.unwrap();
    }
    // Answers held back 1.5 s (under the 2 s attempt timeout): the first page stays in
    // the proxy while the test compacts.
    let proxy = SlowProxy::start(&member, Duration::from_millis(1500)).await;
    proxy.set_slow(true);
    let mut cfg = etcd.config("/compact-start/");
    cfg.etcd_endpoints = vec![proxy.url.clone()];
    let starting = tokio::spawn(try_start(cfg));
    // The first page (2,000 keys of about 80 bytes) has left etcd.
    until("etcd answers the first page", || {
        proxy.delayed_bytes() > 100_000
    })
    .await;
    try_update(&mut c, "later", "d").await.unwrap();
    compact_history(&[member]).await;
    proxy.set_slow(false);
    let replica = within("the replica starts", starting)
        .await
        .unwrap()
        .expect("the replica starts despite the compaction");
    let mut r = client(&replica).await;
    let mut listed = 0;
    for cluster in ["c0", "c1", "c2", "c"] {
        listed += list(&mut r, cluster).await.len();
    }
    assert_eq!(listed, N + 1);
    assert_eq!(
        metric(&replica, "discovery_etcd_full_read_restarts_total").await,
        1,
        "the compaction came between the pages"
    );
    replica.shutdown().await.unwrap();
    writer.shutdown().await.unwrap();
}

#[tokio::test]
async fn ttls_are_shared_leases_and_expire_across_replica_restarts() {
    let etcd = Etcd::start(1).await;
    let mut cfg = etcd.config("/ttl/");
    cfg.etcd_lease_bucket = Duration::from_secs(1);
    let first = start(cfg.clone()).await;
    let mut c = client(&first).await;
    let leases_before = etcd.client().lease_count().await.unwrap();
    for i in 0..200 {
        c.affiliate_update(update("c", &format!("n{i}"), "d", &["e"], 3))
            .await
            .unwrap();
    }
    let used = etcd.client().lease_count().await.unwrap() - leases_before;
    // 200 affiliates and 200 endpoints written within a few seconds: a lease per
    // one-second bucket, not per key.
    assert!(used <= 6, "{used} leases for 200 affiliates");
    first.shutdown().await.unwrap();

    // A new replica finds them in etcd, then sees them expire with nobody left to
    // run a GC: etcd's leases do it. Deletions spread over several watch responses
    // can overrun a watcher's buffer; the watcher then resubscribes as Talos's client
    // does, and its view converges.
    let second = start(cfg).await;
    let mut c = client(&second).await;
    assert_eq!(list(&mut c, "c").await.len(), 200);
    within("every affiliate expires", async {
        loop {
            let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
            let mut view = BTreeMap::new();
            apply(&mut view, w.message().await.unwrap().unwrap());
            while !view.is_empty() {
                match w.message().await {
                    Ok(Some(m)) => apply(&mut view, m),
                    Err(s) if s.code() == Code::Aborted => break,
                    other => panic!("{other:?}"),
                }
            }
            if view.is_empty() {
                return;
            }
        }
    })
    .await;
    assert!(list(&mut c, "c").await.is_empty());
    second.shutdown().await.unwrap();
}

/// A lease can outlive its keys' expiry: etcd restarts every lease's full TTL when its
/// leader changes (unless lease checkpointing is on and persisted, which etcd 3.4
/// cannot do). The keys are written here as such a reset leaves them, under a lease of
/// ten minutes but with expiries a minute past: an expired affiliate with its endpoint,
/// and a live one with one expired endpoint. The GC pass deletes what expired, as the
/// memory backend's would, and watchers and Lists hear it; what is live stays.
#[tokio::test]
async fn keys_whose_lease_outlived_their_expiry_are_deleted_by_gc() {
    use discovery_service::etcd::clock;
    use discovery_service::etcd::keys::{AffiliateValue, EndpointValue, Layout};
    use discovery_service::etcd::proto::etcdserverpb::kv_client::KvClient;
    use discovery_service::etcd::proto::etcdserverpb::lease_client::LeaseClient;
    use discovery_service::etcd::proto::etcdserverpb::{
        LeaseGrantRequest, PutRequest, RangeRequest, RequestOp, TxnRequest, request_op,
    };

    let etcd = Etcd::start(1).await;
    let prefix = "/overdue/";
    let mut cfg = etcd.config(prefix);
    cfg.gc_interval = Duration::from_millis(50);
    let replica = start(cfg).await;
    let mut c = client(&replica).await;
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());

    let channel = etcd.channel(0).await;
    let lease = within(
        "lease",
        LeaseClient::new(channel.clone()).lease_grant(LeaseGrantRequest { ttl: 600, id: 0 }),
    )
    .await
    .unwrap()
    .into_inner()
    .id;
    let l = Layout::new(prefix);
    let (past, future) = (clock::now_ms() - 60_000, clock::now_ms() + 600_000);
    let affiliate = |id: &str, expiry_ms: i64| {
        let v = AffiliateValue {
            data_set: true,
            expiry_ms,
            data: bytes::Bytes::from_static(b"d"),
        };
        (l.affiliate("c", id), v.encode())
    };
    let endpoint = |id: &str, blob: &str, ordinal: u16, expiry_ms: i64| {
        let v = EndpointValue { ordinal, expiry_ms };
        (l.endpoint("c", id, blob.as_bytes()), v.encode())
    };
    let keys = [
        affiliate("gone", past),
        endpoint("gone", "x", 0, past),
        affiliate("alive", future),
        endpoint("alive", "old", 0, past),
        endpoint("alive", "new", 1, future),
    ];
    let puts = keys.iter().map(|(key, value)| RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.clone().into(),
            value: value.clone().into(),
            lease,
            ..Default::default()
        })),
    });
    let mut kv = KvClient::new(channel);
    let txn = TxnRequest {
        success: puts.collect(),
        ..Default::default()
    };
    within("put", kv.txn(txn)).await.unwrap();

    // The watcher hears both appear, then what expired go.
    let mut heard: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    let expected = BTreeMap::from([("alive".to_owned(), vec![b"new".to_vec()])]);
    let mut appeared = false;
    within("the watcher hears the overdue go", async {
        while !(appeared && heard == expected) {
            let m = next(&mut w).await.unwrap().expect("the stream goes on");
            for a in m.affiliates {
                if m.deleted {
                    heard.remove(&a.id);
                } else {
                    heard.insert(a.id, a.endpoints.iter().map(|e| e.to_vec()).collect());
                }
            }
            appeared |= heard.len() == 2;
        }
    })
    .await;
    let listed = list(&mut c, "c").await;
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].id.as_str(), listed[0].endpoints.len()),
        ("alive", 1)
    );
    let (start_key, end_key) = l.all();
    let left = within(
        "range",
        kv.range(RangeRequest {
            key: start_key.into(),
            range_end: end_key.into(),
            keys_only: true,
            ..Default::default()
        }),
    )
    .await
    .unwrap()
    .into_inner()
    .kvs;
    // Of the keys written above (the prefix also holds the replica's own markers).
    let mut left: Vec<_> = left.into_iter().map(|kv| kv.key.to_vec()).collect();
    left.retain(|k| keys.iter().any(|(key, _)| key == k));
    let mut live = vec![keys[2].0.clone(), keys[4].0.clone()];
    live.sort();
    assert_eq!(left, live, "etcd holds only what is live");
    replica.shutdown().await.unwrap();
}

/// A cluster's guard key (every creation is conditional on its revision) lives as long
/// as the cluster has affiliates, whatever their leases, and goes once it is empty. It
/// used to carry the lease of the affiliate that last created one, so it could expire
/// under a live cluster: "no guard" came back, and a creation planned before another
/// replica's then passed its check and made 1,025 affiliates.
#[tokio::test]
async fn a_clusters_guard_lives_while_it_has_affiliates_and_goes_when_it_is_empty() {
    use discovery_service::etcd::keys::Layout;
    use discovery_service::etcd::proto::etcdserverpb::kv_client::KvClient;
    use discovery_service::etcd::proto::etcdserverpb::watch_client::WatchClient;
    use discovery_service::etcd::proto::etcdserverpb::{
        RangeRequest, WatchCreateRequest, WatchRequest as EtcdWatch, watch_request,
    };
    use discovery_service::etcd::proto::mvccpb::event::EventType;
    use futures::StreamExt;

    let etcd = Etcd::start(1).await;
    let mut cfg = etcd.config("/guard/");
    cfg.etcd_lease_bucket = Duration::from_secs(1);
    cfg.gc_interval = Duration::from_millis(50);
    let replica = start(cfg).await;
    let mut c = client(&replica).await;
    let guard = bytes::Bytes::from(Layout::new("/guard/").guard("c"));
    let channel = etcd.channel(0).await;
    let mut kv = KvClient::new(channel.clone());
    let mut guard_count = async || {
        within(
            "range",
            kv.range(RangeRequest {
                key: guard.clone(),
                count_only: true,
                ..Default::default()
            }),
        )
        .await
        .unwrap()
        .into_inner()
        .count
    };

    // The long-lived affiliate first, then one whose lease ends in about 2 s.
    c.affiliate_update(update("c", "long", "d", &[], 300))
        .await
        .unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 1);
    c.affiliate_update(update("c", "short", "d", &[], 1))
        .await
        .unwrap();
    assert_eq!(changes(&mut w, 1).await, [("short".into(), "d".into())]);
    let gone = next(&mut w).await.unwrap().expect("the stream goes on");
    assert!(gone.deleted && gone.affiliates[0].id == "short", "{gone:?}");
    assert_eq!(guard_count().await, 1, "the guard outlives the short lease");

    // Empty: the guard goes at the next GC pass.
    let watch_guard = EtcdWatch {
        request_union: Some(watch_request::RequestUnion::CreateRequest(
            WatchCreateRequest {
                key: guard.clone(),
                ..Default::default()
            },
        )),
    };
    let requests = futures::stream::iter([watch_guard]).chain(futures::stream::pending());
    let mut events = within("etcd watch", WatchClient::new(channel).watch(requests))
        .await
        .unwrap()
        .into_inner();
    let created = within("etcd watch created", events.message())
        .await
        .unwrap()
        .expect("etcd answers the watch");
    assert!(created.created, "{created:?}");
    c.affiliate_delete(discovery_service::proto::server::AffiliateDeleteRequest {
        cluster_id: "c".into(),
        affiliate_id: "long".into(),
    })
    .await
    .unwrap();
    within("the guard's deletion", async {
        loop {
            let m = events.message().await.unwrap().expect("etcd watch goes on");
            if m.events
                .iter()
                .any(|e| e.r#type == EventType::Delete as i32)
            {
                return;
            }
        }
    })
    .await;
    assert_eq!(guard_count().await, 0);
    replica.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_replica_behind_compaction_restarts_its_watchers_with_a_fresh_snapshot() {
    let mut etcd = Etcd::start(3).await;
    let endpoints = etcd.endpoints();
    // The lagging replica reaches etcd through member 0 only; the other through 1 and 2.
    let mut lag_cfg = etcd.config("/compact/");
    lag_cfg.etcd_endpoints = vec![endpoints[0].clone()];
    let mut other_cfg = etcd.config("/compact/");
    other_cfg.etcd_endpoints = endpoints[1..].to_vec();
    let lagging = start(lag_cfg).await;
    let other = start(other_cfg).await;
    let mut c_lag = client(&lagging).await;
    let mut c_other = client(&other).await;
    try_update(&mut c_other, "old", "d").await.unwrap();
    let mut w = c_lag.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 1);

    // Member 0 goes away: the lagging replica's watch cannot follow. Meanwhile the
    // cluster moves on and compacts the history the replica would need.
    etcd.kill(0);
    for i in 0..10 {
        try_update(&mut c_other, &format!("new{i}"), "d")
            .await
            .unwrap();
    }
    c_other
        .affiliate_delete(discovery_service::proto::server::AffiliateDeleteRequest {
            cluster_id: "c".into(),
            affiliate_id: "old".into(),
        })
        .await
        .unwrap();
    compact_history(&endpoints[1..]).await;
    etcd.restart(0);

    // The watcher is ended (it cannot be told what it missed) and a new one gets the
    // state as it is now: "old" deleted, the ten new ones there.
    let ended = within("the lagging watch ends", async {
        loop {
            match w.message().await {
                Ok(Some(_)) => continue,
                end => return end,
            }
        }
    })
    .await;
    assert_refused(ended, Code::Aborted, "subscription canceled: lost update");
    let mut w = c_lag.watch(watch_req("c")).await.unwrap().into_inner();
    let ids: BTreeSet<String> = next(&mut w)
        .await
        .unwrap()
        .unwrap()
        .affiliates
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(ids, (0..10).map(|i| format!("new{i}")).collect());
    assert_eq!(metric(&lagging, "discovery_etcd_resyncs_total").await, 1);
    lagging.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
}

/// A series of the server's `/metrics`.
async fn metric(server: &discovery_service::Server, series: &str) -> i64 {
    let (_, _, body) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {body}"))
}

/// A replica whose prefix is quiet (etcd shared with other users, who keep writing
/// elsewhere) marks the quiet stretch, so its watch position stays recent. When its
/// watch then breaks after etcd compacted that stretch, it resumes: its watchers are
/// not restarted and nothing is read again.
#[tokio::test]
async fn a_quiet_replica_resumes_its_watch_after_a_compaction_without_restarting_watchers() {
    use discovery_service::etcd::proto::etcdserverpb::PutRequest;

    let mut etcd = Etcd::start(1).await;
    let mut cfg = etcd.config("/quiet/");
    cfg.etcd_quiet_mark = Duration::from_millis(200);
    let replica = start(cfg).await;
    let mut c = client(&replica).await;
    try_update(&mut c, "a", "d").await.unwrap();
    let mut w = c.watch(watch_req("c")).await.unwrap().into_inner();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates.len(), 1);

    let others = etcd.client();
    let mut last = 0;
    for i in 0..20 {
        let put = PutRequest {
            key: format!("/elsewhere/{i}").into_bytes().into(),
            value: b"x"[..].into(),
            ..Default::default()
        };
        last = others.put(put).await.unwrap().header.unwrap().revision;
    }
    // The metrics are scraped, not pushed: poll them (bounded).
    within("the replica marks the quiet stretch", async {
        while metric(&replica, "discovery_etcd_applied_revision").await <= last {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Everything up to the others' last write is compacted; then the watch breaks.
    others.compact(last).await.unwrap();
    etcd.kill(0);
    etcd.restart(0);
    etcd.wait_ready().await;

    update_once_etcd_answers(&mut c, "b", "an update once the member is back").await;
    // The same watch goes on: no restart, and the change arrives.
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates[0].id, "b");
    assert_eq!(metric(&replica, "discovery_etcd_resyncs_total").await, 0);
    assert!(metric(&replica, "discovery_etcd_watch_resumes_total").await >= 1);
    replica.shutdown().await.unwrap();
}

#[tokio::test]
async fn two_replicas_never_overrun_the_limits_together() {
    let etcd = Etcd::start(1).await;
    let a = start(etcd.config("/limits/")).await;
    let b = start(etcd.config("/limits/")).await;
    let mut ca = client(&a).await;
    for i in 0..1000 {
        ca.affiliate_update(update("full", &format!("old{i}"), "", &[], 60))
            .await
            .unwrap();
    }
    // 100 new affiliates race for the last 24 places, half through each replica, and
    // two writers per replica race to add endpoints to one affiliate.
    ca.affiliate_update(update("full", "old0", "", &["e0"], 60))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let addr = if i % 2 == 0 { a.grpc_addr } else { b.grpc_addr };
        tasks.push(tokio::spawn(async move {
            let mut c = client_at(addr).await;
            c.affiliate_update(update("full", &format!("new{i}"), "d", &[], 60))
                .await
                .map(|_| ())
        }));
    }
    for w in 0..4 {
        let addr = if w % 2 == 0 { a.grpc_addr } else { b.grpc_addr };
        tasks.push(tokio::spawn(async move {
            let mut c = client_at(addr).await;
            for e in 0..40 {
                let ep = format!("w{w}e{e}");
                c.affiliate_update(update("full", "old0", "", &[&ep], 60))
                    .await?;
            }
            Ok(())
        }));
    }
    let mut refused = Vec::new();
    for t in tasks {
        let r = within("racing updates", t).await.unwrap();
        if let Err(s) = &r {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
        }
        refused.push(r.is_err());
    }
    let mut cb = client(&b).await;
    let l = list(&mut cb, "full").await;
    assert_eq!(l.len(), 1024, "exactly full");
    assert_eq!(l.iter().filter(|x| x.id.starts_with("new")).count(), 24);
    let old0 = l.iter().find(|x| x.id == "old0").unwrap();
    assert_eq!(old0.endpoints.len(), 64, "exactly the endpoint limit");
    // 76 affiliates refused; 160 endpoints for 63 places: at least 3 of the 4
    // endpoint writers were refused.
    assert_eq!(refused[..100].iter().filter(|r| **r).count(), 76);
    assert!(refused[100..].iter().filter(|r| **r).count() >= 3);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn every_replica_serves_the_pages_and_metrics_of_the_shared_state() {
    let etcd = Etcd::start(1).await;
    let mut cfg = etcd.config("/pages/");
    // Snapshots are on by default upstream; with etcd they are off whatever the flag.
    cfg.snapshots_enabled = true;
    cfg.snapshot_path = "/nonexistent/never-written.binpb".into();
    let a = start(cfg.clone()).await;
    let b = start(cfg).await;
    let mut ca = client(&a).await;
    ca.affiliate_update(update("c/1", "af<1>", "\u{1}\u{2}", &["\u{ab}"], 60))
        .await
        .unwrap();
    // A List through the other replica returns once it has caught up with etcd.
    let mut cb = client(&b).await;
    assert_eq!(list(&mut cb, "c/1").await.len(), 1);
    let revision = etcd.revision().await;
    for r in [&a, &b] {
        let landing = r.landing_addr.unwrap();
        let (status, _, body) = http_get(landing, "/inspect?clusterID=c%2F1").await;
        assert_eq!(status, 200);
        assert!(
            body.contains("0102") && body.contains("c2ab") && body.contains("af&lt;1&gt;"),
            "{body}"
        );
        let (_, _, body) = http_get(landing, "/stats").await;
        assert_eq!(body, r#"{"affiliates":1}"#);
        let (_, _, body) = http_get(r.metrics_addr.unwrap(), "/metrics").await;
        assert!(
            body.lines().any(|l| l == "discovery_state_affiliates 1"),
            "{body}"
        );
        assert!(
            body.lines().any(|l| l == "discovery_state_endpoints 1"),
            "{body}"
        );
        assert!(
            !body.contains("discovery_storage_"),
            "no snapshot metrics with etcd"
        );
        assert!(metric(r, "discovery_etcd_applied_revision").await > 0);
        assert_eq!(metric(r, "discovery_etcd_data_misses_total").await, 0);
    }
    // The pages show what each replica holds, without catching up with etcd first:
    // loading them, which anyone may, writes nothing to etcd.
    assert_eq!(etcd.revision().await, revision);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_replica_that_cannot_reach_etcd_does_not_start_and_says_where_it_looked() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cfg = config();
    cfg.state_backend = discovery_service::config::StateBackend::Etcd;
    cfg.etcd_endpoints = vec![format!("http://{closed}")];
    let err = try_start(cfg).await.expect_err("no etcd, no start");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("cannot read the state from etcd") && msg.contains(&closed.to_string()),
        "{msg}"
    );

    for (endpoints, ca, cert, key, want) in [
        (
            vec![],
            None,
            None,
            None::<&str>,
            "--etcd-endpoints is empty",
        ),
        (
            vec!["etcd:2379"],
            None,
            None,
            None,
            "is not an http:// or https:// URL",
        ),
        (
            vec!["https://127.0.0.1:1"],
            None,
            None,
            None,
            "give --etcd-ca",
        ),
        (
            vec!["http://127.0.0.1:1"],
            Some("/nonexistent/ca.pem"),
            None,
            None,
            "--etcd-ca: cannot read /nonexistent/ca.pem",
        ),
        (
            vec!["https://127.0.0.1:1"],
            None,
            Some("/c.pem"),
            None,
            "--etcd-cert and --etcd-key go together",
        ),
    ] {
        let mut cfg = config();
        cfg.state_backend = discovery_service::config::StateBackend::Etcd;
        cfg.etcd_endpoints = endpoints.into_iter().map(String::from).collect();
        cfg.etcd_ca = ca.map(Into::into);
        cfg.etcd_cert = cert.map(Into::into);
        cfg.etcd_key = key.map(Into::into);
        let err = try_start(cfg).await.expect_err(want);
        assert!(
            format!("{err:#}").contains(want),
            "{err:#} should say {want}"
        );
    }
}

#[tokio::test]
async fn etcd_over_tls_with_a_client_certificate() {
    let etcd = Etcd::start_tls().await;
    let replica = start(etcd.config("/tls/")).await;
    let mut c = client(&replica).await;
    c.affiliate_update(update("c", "af", "d", &["e"], 60))
        .await
        .unwrap();
    assert_eq!(list(&mut c, "c").await.len(), 1);
    replica.shutdown().await.unwrap();

    // The member requires a client certificate: without one, no start, and the
    // error says where it looked.
    let mut cfg = etcd.config("/tls/");
    cfg.etcd_cert = None;
    cfg.etcd_key = None;
    let err = format!(
        "{:#}",
        try_start(cfg).await.expect_err("no client certificate")
    );
    assert!(
        err.contains("cannot read the state from etcd") && err.contains(&etcd.endpoints()[0]),
        "{err}"
    );
    // A CA that did not sign the member's certificate is refused too.
    let other = tempfile::tempdir().unwrap();
    let wrong = common::etcd::TlsFiles::create(other.path());
    let mut cfg = etcd.config("/tls/");
    cfg.etcd_ca = Some(wrong.ca);
    assert!(try_start(cfg).await.is_err());
}

/// A replica's mirror holds no data (etcd is the copy): a snapshot's or a List's data
/// is read from etcd as of the revision the mirror saw each affiliate at. Here one
/// affiliate's key is written again after the views were taken: the latest version is
/// not what the mirror saw, so the data comes from the revision the mirror had
/// reached, never from the later write. That revision may be far later than the one
/// the views were written at, which etcd may have compacted since: the read is at the
/// mirror's revision, which it has not. Only if etcd compacted that one too (the
/// mirror behind compaction) does the read say so (OUT_OF_RANGE: the replica then
/// catches up and takes its views again), rather than return data of another version.
#[tokio::test]
async fn snapshot_data_is_read_as_of_the_revisions_the_mirror_saw() {
    use discovery_service::etcd::client::CallError;
    use discovery_service::etcd::data;
    use discovery_service::etcd::keys::{AffiliateValue, Layout};
    use discovery_service::etcd::proto::etcdserverpb::PutRequest;
    use discovery_service::state::AffiliateView;

    let etcd = Etcd::start(1).await;
    let client = etcd.client();
    let layout = Layout::new("fill/");
    let put = |cluster: &str, id: &str, data: &str| {
        let value = AffiliateValue {
            data_set: true,
            expiry_ms: i64::MAX / 2,
            data: bytes::Bytes::copy_from_slice(data.as_bytes()),
        };
        let req = PutRequest {
            key: layout.affiliate(cluster, id).into(),
            value: value.encode().into(),
            ..Default::default()
        };
        let client = client.clone();
        async move { client.put(req).await.unwrap().header.unwrap().revision }
    };
    let r1 = put("c", "a", "a-first").await;
    let r2 = put("c", "b", "b-first").await;
    let r3 = put("another", "x", "x").await;
    let r4 = put("c", "a", "a-second").await;
    let view = |id: &str| AffiliateView {
        id: id.into(),
        data: bytes::Bytes::new(),
        endpoints: Vec::new(),
    };
    // Fills views the mirror took once it had applied `seen`: each id with its data.
    let fill = |views: Vec<(AffiliateView, i64)>, seen: i64| {
        let (client, layout) = (client.clone(), layout.clone());
        async move {
            let views = data::fill(&client, &layout, "c", views, seen).await?;
            let mut v: Vec<_> = views
                .into_iter()
                .map(|v| (v.id, String::from_utf8_lossy(&v.data).into_owned()))
                .collect();
            v.sort();
            Ok::<_, CallError>(v)
        }
    };
    let s = |v: &str| v.to_owned();
    let first = [(s("a"), s("a-first")), (s("b"), s("b-first"))];
    // Taken before the second write of `a`, when the mirror had applied r2.
    let before = || vec![(view("a"), r1), (view("b"), r2)];
    assert_eq!(fill(before(), r2).await.unwrap(), first);
    // Taken after it: the latest versions.
    let after = vec![(view("a"), r4), (view("b"), r2)];
    assert_eq!(
        fill(after, r4).await.unwrap(),
        [(s("a"), s("a-second")), (s("b"), s("b-first"))]
    );
    // The views' revisions compacted away, not the mirror's.
    client.compact(r3).await.unwrap();
    assert_eq!(fill(before(), r3).await.unwrap(), first);
    // The mirror's revision compacted away too.
    match fill(before(), r2).await {
        Err(CallError::Rejected(status)) => assert_eq!(status.code(), Code::OutOfRange),
        other => panic!("{other:?}"),
    }
}
