//! Crash tests through the real binary: SIGTERM saves everything, SIGKILL loses at most
//! what came after the last snapshot, and the file on disk is never torn.

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use common::*;
use discovery_service::proto::server::ListRequest;
use discovery_service::proto::storage::StateSnapshot;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use prost::Message;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

struct Proc {
    child: Child,
    logs: mpsc::UnboundedReceiver<Value>,
    addr: SocketAddr,
}

impl Proc {
    async fn spawn(snapshot: &Path, interval: &str) -> Proc {
        let mut child = Command::new(env!("CARGO_BIN_EXE_discovery-service"))
            .args(["-addr", "127.0.0.1:0", "-landing-addr=", "-metrics-addr="])
            .arg("-snapshot-path")
            .arg(snapshot)
            .args(["-snapshot-interval", interval, "-gc-interval", "1h"])
            .args([
                "--rate-limit-per-second",
                "1000000",
                "--rate-limit-burst",
                "1000000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, logs) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let mut p = Proc {
            child,
            logs,
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let listening = p
            .wait_log(|v| v["message"] == "listening" && v["server"] == "grpc")
            .await;
        p.addr = listening["address"].as_str().unwrap().parse().unwrap();
        p
    }

    /// The next log line matching `pred`; panics on a load failure seen on the way.
    async fn wait_log(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        within("log line", async {
            loop {
                let v = self.logs.recv().await.expect("process still logging");
                // A file that cannot be opened (first start, or a test's unusable path)
                // is expected; a file that fails to decode never is.
                let missing = v["error"]
                    .as_str()
                    .is_some_and(|e| e.starts_with("failed to open snapshot"));
                assert!(
                    v["message"] != "failed to load state from storage" || missing,
                    "{v}"
                );
                if pred(&v) {
                    return v;
                }
            }
        })
        .await
    }

    fn signal(&self, s: Signal) {
        kill(Pid::from_raw(self.child.id().unwrap() as i32), s).unwrap();
    }
}

async fn ids(addr: SocketAddr, cluster: &str) -> BTreeSet<String> {
    let mut c = client_at(addr).await;
    c.list(ListRequest {
        cluster_id: cluster.into(),
    })
    .await
    .unwrap()
    .into_inner()
    .affiliates
    .into_iter()
    .map(|a| {
        assert_eq!(
            a.data,
            b(&format!("data-{}", a.id)),
            "restored data is intact"
        );
        a.id
    })
    .collect()
}

#[tokio::test]
async fn sigterm_then_restart_restores_every_affiliate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let mut p = Proc::spawn(&path, "1h").await;
    let mut c = client_at(p.addr).await;
    let mut want = Vec::new();
    for cl in ["c1", "c2", "c3"] {
        let mut set = BTreeSet::new();
        for i in 0..10 {
            let id = format!("{cl}-af{i}");
            c.affiliate_update(update(cl, &id, &format!("data-{id}"), &["e1", "e2"], 1800))
                .await
                .unwrap();
            set.insert(id);
        }
        want.push((cl, set));
    }
    p.signal(Signal::SIGTERM);
    let saved = p.wait_log(|v| v["message"] == "state saved").await;
    assert_eq!(saved["affiliates"], 30);
    let status = within("exit", p.child.wait()).await.unwrap();
    assert!(status.success(), "{status:?}");

    let mut p = Proc::spawn(&path, "1h").await;
    for (cl, set) in &want {
        assert_eq!(&ids(p.addr, cl).await, set);
    }
    let mut c = client_at(p.addr).await;
    let l = c
        .list(ListRequest {
            cluster_id: "c1".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .affiliates;
    assert!(l.iter().all(|a| a.endpoints == vec![b("e1"), b("e2")]));
    p.signal(Signal::SIGTERM);
    assert!(within("exit", p.child.wait()).await.unwrap().success());
}

#[tokio::test]
async fn sigkill_restores_the_last_snapshot_and_never_tears_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let data = "x".repeat(1000);
    let mut next_id = 0usize;
    for round in 0..3 {
        let mut p = Proc::spawn(&path, "20ms").await;
        // Write continuously while snapshots run, so the kill lands at an arbitrary point
        // of a save.
        let addr = p.addr;
        let data = data.clone();
        let start_id = next_id;
        let writer = tokio::spawn(async move {
            let mut c = client_at(addr).await;
            let mut acked = Vec::new();
            let mut id = start_id;
            loop {
                let name = format!("af{id}");
                let mut req = update("b", &name, &format!("data-{name}"), &[], 1800);
                req.affiliate_endpoints = vec![b(&data[..32])];
                if c.affiliate_update(req).await.is_err() {
                    return acked;
                }
                acked.push(name);
                id += 1;
            }
        });
        // Let a few saves complete (each a different number of records), then kill.
        let mut last_saved = 0;
        for _ in 0..(2 + round) {
            let v = p.wait_log(|v| v["message"] == "state saved").await;
            last_saved = v["affiliates"].as_u64().unwrap();
        }
        p.signal(Signal::SIGKILL);
        let status = within("exit", p.child.wait()).await.unwrap();
        assert!(!status.success());
        let acked = within("writer", writer).await.unwrap();
        next_id += acked.len() + 1;

        // Whatever is on disk is a complete snapshot.
        let bytes = std::fs::read(&path).unwrap();
        let snap = StateSnapshot::decode(bytes.as_slice()).expect("the snapshot is never torn");
        let on_disk: usize = snap.clusters.iter().map(|c| c.affiliates.len()).sum();
        assert!(on_disk as u64 >= last_saved, "{on_disk} < {last_saved}");

        // A restart loads it cleanly (wait_log fails on a load warning) and serves it.
        let mut p = Proc::spawn(&path, "1h").await;
        let restored = ids(p.addr, "b").await;
        assert_eq!(restored.len(), on_disk);
        assert!(restored.len() as u64 >= last_saved);
        p.signal(Signal::SIGTERM);
        assert!(within("exit", p.child.wait()).await.unwrap().success());
        let _ = p.logs.try_recv();
    }
}

#[tokio::test]
async fn a_failed_final_save_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").unwrap();
    let mut p = Proc::spawn(&blocker.join("state.binpb"), "1h").await;
    p.signal(Signal::SIGTERM);
    p.wait_log(|v| v["message"] == "failed to save state").await;
    let status = within("exit", p.child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(1));
}
