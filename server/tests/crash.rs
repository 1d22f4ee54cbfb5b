//! Tests through the real binary: SIGTERM and SIGINT save everything, SIGKILL loses at
//! most what came after the last snapshot, and the file on disk is never torn; every RPC
//! logs one structured JSON line, sampled as upstream's logger samples (failures never).

mod common;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};

use common::*;
use discovery_service::proto::server::Affiliate;
use discovery_service::proto::storage::StateSnapshot;
use futures::StreamExt;
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

    /// The exit status, bounded.
    async fn exit(&mut self) -> ExitStatus {
        within("exit", self.child.wait()).await.unwrap()
    }

    /// Waits (bounded) for a successful exit.
    async fn exit_ok(&mut self) {
        let status = self.exit().await;
        assert!(status.success(), "{status:?}");
    }

    /// SIGTERM, then a successful exit.
    async fn terminate(&mut self) {
        self.signal(Signal::SIGTERM);
        self.exit_ok().await;
    }
}

/// Every line the process writes until it exits.
async fn rest_of_logs(p: &mut Proc) -> Vec<Value> {
    within("end of logs", async {
        let mut lines = Vec::new();
        while let Some(v) = p.logs.recv().await {
            lines.push(v);
        }
        lines
    })
    .await
}

/// The IDs of listed affiliates, each checked to carry the data it was given.
fn ids(affiliates: &[Affiliate]) -> BTreeSet<String> {
    affiliates
        .iter()
        .map(|a| {
            assert_eq!(
                a.data,
                b(&format!("data-{}", a.id)),
                "restored data is intact"
            );
            a.id.clone()
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
    p.exit_ok().await;

    let mut p = Proc::spawn(&path, "1h").await;
    let mut c = client_at(p.addr).await;
    for (cl, set) in &want {
        let l = list(&mut c, cl).await;
        assert_eq!(&ids(&l), set);
        if *cl == "c1" {
            assert!(l.iter().all(|a| a.endpoints == vec![b("e1"), b("e2")]));
        }
    }
    p.terminate().await;
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
        assert!(!p.exit().await.success());
        let acked = within("writer", writer).await.unwrap();
        next_id += acked.len() + 1;

        // Whatever is on disk is a complete snapshot.
        let bytes = std::fs::read(&path).unwrap();
        let snap = StateSnapshot::decode(bytes.as_slice()).expect("the snapshot is never torn");
        let on_disk: usize = snap.clusters.iter().map(|c| c.affiliates.len()).sum();
        assert!(on_disk as u64 >= last_saved, "{on_disk} < {last_saved}");

        // A restart loads it cleanly (wait_log fails on a load warning) and serves it.
        let mut p = Proc::spawn(&path, "1h").await;
        let restored = ids(&list(&mut client_at(p.addr).await, "b").await);
        assert_eq!(restored.len(), on_disk);
        assert!(restored.len() as u64 >= last_saved);
        p.terminate().await;
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
    assert_eq!(p.exit().await.code(), Some(1));
}

#[tokio::test]
async fn sigint_shuts_down_gracefully_and_writes_the_final_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.binpb");
    let mut p = Proc::spawn(&path, "1h").await;
    let mut c = client_at(p.addr).await;
    let mut w = c.watch(watch_req("int")).await.unwrap().into_inner();
    assert!(next(&mut w).await.unwrap().unwrap().affiliates.is_empty());
    c.affiliate_update(update("int", "af", "data-af", &["e"], 1800))
        .await
        .unwrap();
    assert_eq!(next(&mut w).await.unwrap().unwrap().affiliates[0].id, "af");
    p.signal(Signal::SIGINT);
    p.wait_log(|v| v["message"] == "shutting down" && v["signal"] == "SIGINT")
        .await;
    // The watch stream ends with OK, not an error.
    assert!(next(&mut w).await.unwrap().is_none());
    let saved = p.wait_log(|v| v["message"] == "state saved").await;
    assert_eq!(saved["affiliates"], 1);
    p.exit_ok().await;
    let snap = StateSnapshot::decode(std::fs::read(&path).unwrap().as_slice()).unwrap();
    assert_eq!(snap.clusters[0].id, "int");
    assert_eq!(snap.clusters[0].affiliates[0].id, "af");
}

#[tokio::test]
async fn every_rpc_logs_one_structured_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(&dir.path().join("state.binpb"), "1h").await;
    let mut c = client_at(p.addr).await;
    c.hello(hello("log-c", "v1.12.0")).await.unwrap();
    let mut bad = update("log-c", "log-af", "", &[], 60);
    bad.affiliate_data = Some(bytes::Bytes::from(vec![0; 2049]));
    let err = c.affiliate_update(bad).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    p.terminate().await;

    let calls: Vec<Value> = rest_of_logs(&mut p)
        .await
        .into_iter()
        .filter(|v| v.get("code").is_some())
        .collect();
    assert_eq!(calls.len(), 2, "one line per call: {calls:?}");
    let fields = |v: &Value| -> BTreeSet<String> {
        let mut keys: BTreeSet<String> = v.as_object().unwrap().keys().cloned().collect();
        for common in ["timestamp", "target"] {
            keys.remove(common);
        }
        keys
    };
    let set =
        |names: &[&str]| -> BTreeSet<String> { names.iter().map(|s| s.to_string()).collect() };

    // Success: info, the full method name, and no error.
    let ok = &calls[0];
    assert_eq!(
        fields(ok),
        set(&[
            "level",
            "message",
            "grpc.method",
            "duration",
            "code",
            "peer.address",
            "cluster_id",
            "client_version"
        ]),
        "{ok}"
    );
    assert_eq!(ok["level"], "INFO");
    assert_eq!(ok["message"], "/sidero.discovery.server.Cluster/Hello");
    assert_eq!(ok["grpc.method"], ok["message"]);
    assert_eq!(ok["code"], "OK");
    assert_eq!(ok["peer.address"], "127.0.0.1");
    assert_eq!(ok["cluster_id"], "log-c");
    assert_eq!(ok["client_version"], "v1.12.0");
    assert!(!ok["duration"].as_str().unwrap().is_empty());

    // Failure: error level, with the code and the message as `error`.
    let failed = &calls[1];
    assert_eq!(
        fields(failed),
        set(&[
            "level",
            "message",
            "grpc.method",
            "duration",
            "code",
            "error",
            "peer.address",
            "cluster_id",
            "affiliate_id"
        ]),
        "{failed}"
    );
    assert_eq!(failed["level"], "ERROR");
    assert_eq!(
        failed["message"],
        "/sidero.discovery.server.Cluster/AffiliateUpdate"
    );
    assert_eq!(failed["grpc.method"], failed["message"]);
    assert_eq!(failed["code"], "InvalidArgument");
    assert_eq!(failed["error"], "affiliate data is too big");
    assert_eq!(failed["peer.address"], "127.0.0.1");
    assert_eq!(failed["cluster_id"], "log-c");
    assert_eq!(failed["affiliate_id"], "log-af");
    assert!(!failed["duration"].as_str().unwrap().is_empty());
}

#[tokio::test]
async fn repeated_rpc_lines_are_sampled_and_failures_never_are() {
    const HELLOS: usize = 1000;
    const FAILURES: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(&dir.path().join("state.binpb"), "1h").await;
    let c = client_at(p.addr).await;
    // 64 in flight, so the burst takes a fraction of the one-second window.
    let calls = futures::stream::iter(0..HELLOS + FAILURES).map(|i| {
        let mut c = c.clone();
        async move {
            if i < HELLOS {
                c.hello(hello("burst", "v1.12.0")).await.map(|_| ())
            } else {
                let mut bad = update("burst", &format!("af-{i}"), "", &[], 60);
                bad.affiliate_data = Some(bytes::Bytes::from(vec![0; 2049]));
                c.affiliate_update(bad).await.map(|_| ())
            }
        }
    });
    let results: Vec<_> = within("burst", calls.buffer_unordered(64).collect()).await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), HELLOS);
    p.terminate().await;

    let lines = rest_of_logs(&mut p).await;
    let count = |level: &str, method: &str| {
        lines
            .iter()
            .filter(|v| {
                v["level"] == level
                    && v["message"] == format!("/sidero.discovery.server.Cluster/{method}")
            })
            .count()
    };
    // The first 100 of a second, then 1 in 100: 109 if the burst fits in one second.
    // Keeping half would take the burst over five seconds.
    let hellos = count("INFO", "Hello");
    assert!((100..=HELLOS / 2).contains(&hellos), "{hellos} Hello lines");
    // Every failure has its ERROR line, with its affiliate.
    assert_eq!(count("ERROR", "AffiliateUpdate"), FAILURES);
    let failed: BTreeSet<&str> = lines
        .iter()
        .filter(|v| v["level"] == "ERROR")
        .filter_map(|v| v["affiliate_id"].as_str())
        .collect();
    assert_eq!(failed.len(), FAILURES);
    // The rest of the process's lines are still there.
    for message in ["shutting down", "state saved", "stopped"] {
        assert!(lines.iter().any(|v| v["message"] == message), "{message}");
    }
}
