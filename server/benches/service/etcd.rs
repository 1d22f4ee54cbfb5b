//! The etcd state backend (`--state-backend etcd`) side by side with the memory backend
//! and with etcd itself, in one run against one etcd member started here (Debian's
//! `etcd`, loopback ports, data in the work directory, `--log-level error`, killed at
//! the end). Each sub-measurement writes under its own etcd prefix, so their data never
//! mix. All servers are the real binary, each in its own process (`procs.rs`).
//!
//! - Throughput: AffiliateUpdate calls/s and latency, 64 in flight, over the requests
//!   of `throughput.rs` (1000 clusters × 16 affiliates, 1 KiB data, 2 endpoints, TTL
//!   30 min), against the memory backend, one replica on etcd, and three replicas on
//!   etcd sharing one prefix (one connection to each; task `t` of the 64 calls replica
//!   `t % 3`, so 22 + 21 + 21 in flight). The baseline is etcd itself doing one put per
//!   call, with a lease granted up front, of exactly the key and value a replica writes
//!   for that request's affiliate (its 1 KiB data plus a 10-byte header), over one
//!   connection of the library's `EtcdClient`, the client the replicas use; beside it,
//!   informational, the same put as the only operation of a transaction (what a
//!   replica sends is a transaction, and etcd 3.4 serves a leased put far faster that
//!   way than as a plain Put). All five share one load generator
//!   (`client::closed_loop_of`, the loop of every throughput bench) and take turns
//!   in short rounds, the order rotating, as in `throughput.rs`. Each replica and the
//!   memory backend first get their whole pool once, so the rounds update existing
//!   affiliates (for a replica: one transaction with the affiliate's put, plus its
//!   endpoints' puts when its 5 s lease bucket moved on) rather than create them;
//!   etcd's own puts need no such pass (etcd creates and overwrites a key alike). CPU
//!   per call is utime + stime over exactly a contender's rounds, of its replicas and
//!   of the etcd member. Target: one replica's calls/s ≥ 1.0× etcd's own put rate; the
//!   rest is informational.
//! - Fan-out: `fanout.rs`'s method (1000 watchers of one cluster, each on its own
//!   connection, a writer on another; a round is one AffiliateUpdate carrying its
//!   sequence number, timed until the 1000th watcher got it), on the memory backend
//!   and on one replica on etcd, rounds alternating. Target: etcd p99 ≤ 2× memory's.
//! - Memory: 10,000 affiliates (100 clusters × 100, shaped as above) loaded through the
//!   gRPC API, 64 in flight, into the memory backend and into one replica on etcd; VmRSS
//!   of each server process after the load. Target: the replica's ≤ 1.0× the memory
//!   backend's. Informational: both idle before the load, a second replica started
//!   after it (its mirror reads the 10,000 from etcd at start), the etcd member's own
//!   RSS (it holds every earlier sub-measurement's data and history too), and RssAnon
//!   after the load (the heap alone: the replica's binary touches more code pages, the
//!   etcd client's, which are file-backed and shared), and what the load added to each
//!   (loaded minus idle: the data's own cost, without the etcd client's fixed one).
//!   A replica holds no affiliate data (etcd is the copy), so a List reads it from
//!   etcd: 200 Lists of a 100-affiliate cluster, one at a time, alternating, give the
//!   latency that costs.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use discovery_service::etcd::keys::{AffiliateValue, Layout};
use discovery_service::etcd::proto::etcdserverpb::{
    PutRequest, RangeRequest, RequestOp, TxnRequest, request_op,
};
use discovery_service::etcd::{EtcdClient, EtcdOptions, clock};
use discovery_service::proto::server::{AffiliateUpdateRequest, ListRequest};
use futures::future::BoxFuture;

use crate::client::{self, CALL_TIMEOUT, Client, Run, Until};
use crate::fanout::{self, Fleet};
use crate::ports::free_port;
use crate::procs::{self, PROCESS_WAIT, ServerProcess, anon_rss_of, cpu_of, rss_of};
use crate::report::{Figure, Target};

const MIB: f64 = 1024.0 * 1024.0;

/// The etcd prefix of each sub-measurement.
const PREFIX_PUT: &str = "/bench/put/";
const PREFIX_TXN: &str = "/bench/txn/";
const PREFIX_ONE: &str = "/bench/throughput-1/";
const PREFIX_THREE: &str = "/bench/throughput-3/";
const PREFIX_FANOUT: &str = "/bench/fanout/";
const PREFIX_RSS: &str = "/bench/rss/";

pub async fn run(dir: &Path) -> Vec<Figure> {
    let member = Member::start(dir);
    member.wait_ready().await;
    eprintln!("etcd member pid {} at {}", member.pid(), member.endpoint);
    // `DISCOVERY_BENCH_ETCD=throughput,fanout,memory` picks sub-measurements.
    let parts =
        std::env::var("DISCOVERY_BENCH_ETCD").unwrap_or_else(|_| "throughput,fanout,memory".into());
    let want = |p: &str| parts.split(',').any(|x| x.trim() == p);
    let mut figures = Vec::new();
    if want("throughput") {
        figures.extend(throughput(dir, &member).await);
    }
    if want("fanout") {
        figures.extend(fanout(dir, &member).await);
    }
    if want("memory") {
        figures.extend(memory(dir, &member).await);
    }
    drop(member);
    figures
}

// ---------------------------------------------------------------------------------
// The etcd member.

/// One etcd member on loopback; killed when dropped (or when this process dies).
struct Member {
    child: Child,
    endpoint: String,
}

/// A loopback port nothing listens on right now.
impl Member {
    /// The flags of `tests/common/etcd.rs`, for a single member.
    fn start(dir: &Path) -> Self {
        let endpoint = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let data = dir.join("etcd-data");
        let log = fs::File::create(dir.join("etcd.log")).expect("create etcd log");
        let mut cmd = Command::new("etcd");
        cmd.args([
            "--name",
            "bench",
            "--data-dir",
            data.to_str().unwrap(),
            "--listen-client-urls",
            &endpoint,
            "--advertise-client-urls",
            &endpoint,
            "--listen-peer-urls",
            &peer,
            "--initial-advertise-peer-urls",
            &peer,
            "--initial-cluster",
            &format!("bench={peer}"),
            "--initial-cluster-state",
            "new",
            "--logger",
            "zap",
            "--log-level",
            "error",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
        // The member dies with this process even if the bench panics or is killed (the
        // spawning thread is the main thread, which lives as long as the process).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .expect("spawn etcd (Debian's etcd-server, as `scripts/test` installs)");
        Self { child, endpoint }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn client(&self) -> EtcdClient {
        EtcdClient::new(&EtcdOptions {
            endpoints: vec![self.endpoint.clone()],
            ..Default::default()
        })
        .unwrap()
    }

    /// Waits (bounded) until a linearizable read succeeds.
    async fn wait_ready(&self) {
        let client = self.client();
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            let req = RangeRequest {
                key: b"ready"[..].into(),
                ..Default::default()
            };
            match tokio::time::timeout(CALL_TIMEOUT, client.range(req)).await {
                Ok(Ok(_)) => return,
                _ if Instant::now() > deadline => panic!("etcd did not become ready"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------
// Throughput.

const IN_FLIGHT: usize = 64;
const ROUNDS: usize = 8;
const ROUND: Duration = Duration::from_secs(1);
const WARM_UP: Duration = Duration::from_secs(2);

/// One call of a contender: `(task, request index)` → succeeded.
type Call = Arc<dyn Fn(usize, usize) -> BoxFuture<'static, bool> + Send + Sync>;

/// AffiliateUpdate of request `i % pool.len()`, task `t` over connection `t % n`.
fn update_calls(clients: Vec<Client>, pool: Arc<Vec<AffiliateUpdateRequest>>) -> Call {
    Arc::new(move |task, i| {
        let mut c = clients[task % clients.len()].clone();
        let req = pool[i % pool.len()].clone();
        Box::pin(async move { c.affiliate_update(req).await.is_ok() })
    })
}

/// A plain etcd put of request `i % pool.len()`.
fn put_calls(etcd: EtcdClient, pool: Arc<Vec<PutRequest>>) -> Call {
    Arc::new(move |_, i| {
        let etcd = etcd.clone();
        let req = pool[i % pool.len()].clone();
        Box::pin(async move { etcd.put(req).await.is_ok() })
    })
}

/// The same put as [`put_calls`], as the only operation of an unconditional etcd
/// transaction (the request a replica sends is a transaction).
fn txn_calls(etcd: EtcdClient, pool: Arc<Vec<PutRequest>>) -> Call {
    Arc::new(move |_, i| {
        let etcd = etcd.clone();
        let req = TxnRequest {
            compare: Vec::new(),
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(
                    pool[i % pool.len()].clone(),
                )),
            }],
            failure: Vec::new(),
        };
        Box::pin(async move { etcd.txn(req).await.is_ok() })
    })
}

/// For each update, the put of its affiliate's key and value as a replica encodes
/// them (under `prefix`), with `lease`.
fn put_pool(updates: &[AffiliateUpdateRequest], prefix: &str, lease: i64) -> Vec<PutRequest> {
    let layout = Layout::new(prefix);
    let expiry_ms = clock::now_ms() + 30 * 60 * 1000;
    updates
        .iter()
        .map(|u| PutRequest {
            key: layout.affiliate(&u.cluster_id, &u.affiliate_id).into(),
            value: AffiliateValue {
                data_set: true,
                expiry_ms,
                data: u.affiliate_data.clone().unwrap_or_default(),
            }
            .encode()
            .into(),
            lease,
            ..Default::default()
        })
        .collect()
}

struct Contender<'a> {
    /// The server processes it calls (none for etcd's own writes).
    servers: Vec<&'a ServerProcess>,
    etcd_pid: String,
    call: Call,
    /// Pool size to send once before the warm-up; 0 for none.
    preload: usize,
    run: Run,
    server_cpu: Duration,
    etcd_cpu: Duration,
}

impl<'a> Contender<'a> {
    fn new(servers: Vec<&'a ServerProcess>, etcd: &Member, call: Call, preload: usize) -> Self {
        Self {
            servers,
            etcd_pid: etcd.pid().to_string(),
            call,
            preload,
            run: Run::default(),
            server_cpu: Duration::ZERO,
            etcd_cpu: Duration::ZERO,
        }
    }

    fn servers_cpu(&self) -> Duration {
        self.servers.iter().map(|s| s.cpu()).sum()
    }

    async fn round(&mut self, until: Until) {
        let (s0, e0) = (self.servers_cpu(), cpu_of(&self.etcd_pid));
        let call = self.call.clone();
        let run = client::closed_loop_of(IN_FLIGHT, until, move |t, i| call(t, i)).await;
        let (s1, e1) = (self.servers_cpu(), cpu_of(&self.etcd_pid));
        self.run.absorb(run);
        self.server_cpu += s1 - s0;
        self.etcd_cpu += e1 - e0;
    }

    /// The preload and the warm-up, then forgets them.
    async fn warm_up(&mut self) {
        if self.preload > 0 {
            self.round(Until::Sent(self.preload)).await;
        }
        self.round(Until::Elapsed(WARM_UP)).await;
        assert_eq!(self.run.errors, 0, "calls failed while warming up");
        self.run = Run::default();
        self.server_cpu = Duration::ZERO;
        self.etcd_cpu = Duration::ZERO;
    }

    fn rate(&self) -> f64 {
        self.run.calls as f64 / self.run.elapsed.as_secs_f64()
    }

    fn per_call_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.run.calls.max(1) as f64
    }

    fn latency_us(&mut self, q: f64) -> f64 {
        f64::from(client::quantile(&mut self.run.latencies, q))
    }
}

async fn throughput(dir: &Path, member: &Member) -> Vec<Figure> {
    let memory = procs::real_server(dir, "etcd-throughput-memory.log", None);
    let one = procs::etcd_server(dir, "etcd-throughput-1.log", &member.endpoint, PREFIX_ONE);
    let three: Vec<ServerProcess> = (0..3)
        .map(|i| {
            let log = format!("etcd-throughput-3-{i}.log");
            procs::etcd_server(dir, &log, &member.endpoint, PREFIX_THREE)
        })
        .collect();
    let pool = Arc::new(client::updates(1000, 16));
    let etcd = member.client();
    let lease = tokio::time::timeout(CALL_TIMEOUT, etcd.lease_grant(2 * 3600))
        .await
        .expect("lease grant timed out")
        .expect("lease grant")
        .id;
    let puts = Arc::new(put_pool(&pool, PREFIX_PUT, lease));
    let txns = Arc::new(put_pool(&pool, PREFIX_TXN, lease));
    let mut to_three = Vec::new();
    for s in &three {
        to_three.push(client::connect(s.addr).await);
    }
    let to_one = vec![client::connect(one.addr).await];
    let to_memory = vec![client::connect(memory.addr).await];
    let n = pool.len();
    let mut contenders = vec![
        Contender::new(Vec::new(), member, put_calls(etcd.clone(), puts), 0),
        Contender::new(Vec::new(), member, txn_calls(etcd, txns), 0),
        Contender::new(vec![&one], member, update_calls(to_one, pool.clone()), n),
        Contender::new(
            three.iter().collect(),
            member,
            update_calls(to_three, pool.clone()),
            n,
        ),
        Contender::new(vec![&memory], member, update_calls(to_memory, pool), n),
    ];
    for c in &mut contenders {
        c.warm_up().await;
    }
    let k = contenders.len();
    for r in 0..ROUNDS {
        for i in 0..k {
            contenders[(r + i) % k].round(Until::Elapsed(ROUND)).await;
        }
    }
    let errors: Vec<u64> = contenders.iter().map(|c| c.run.errors).collect();
    assert!(
        errors.iter().all(|&e| e == 0),
        "calls failed (put, txn, 1 replica, 3 replicas, memory): {errors:?}"
    );
    let [mut put, mut txn, mut one, mut three, mut memory]: [Contender; 5] =
        contenders.try_into().ok().unwrap();

    let mut figures = vec![
        Figure::new(
            "etcd 1 replica: AffiliateUpdate vs etcd put",
            "calls/s",
            one.rate(),
        )
        .baseline(put.rate())
        .target(Target::RatioAtLeast(1.0)),
        Figure::new("  etcd 1 replica vs etcd txn(put)", "calls/s", one.rate())
            .baseline(txn.rate()),
        Figure::new("  etcd txn(put) vs etcd put", "calls/s", txn.rate()).baseline(put.rate()),
        Figure::new("  etcd 3 replicas vs etcd put", "calls/s", three.rate()).baseline(put.rate()),
        Figure::new("  memory backend vs etcd put", "calls/s", memory.rate()).baseline(put.rate()),
    ];
    let put_p50 = put.latency_us(0.5);
    let put_p99 = put.latency_us(0.99);
    figures.push(
        Figure::new(
            "  p50 latency, etcd 1 replica vs put",
            "µs",
            one.latency_us(0.5),
        )
        .baseline(put_p50),
    );
    for (name, c) in [
        ("  p99 latency, etcd 1 replica vs put", &mut one),
        ("  p99 latency, etcd txn(put) vs put", &mut txn),
        ("  p99 latency, etcd 3 replicas vs put", &mut three),
        ("  p99 latency, memory backend vs put", &mut memory),
    ] {
        figures.push(Figure::new(name, "µs", c.latency_us(0.99)).baseline(put_p99));
    }
    let put_etcd_cpu = put.per_call_us(put.etcd_cpu);
    for (name, c) in [
        ("  etcd CPU per call, 1 replica vs put", &one),
        ("  etcd CPU per call, txn(put) vs put", &txn),
        ("  etcd CPU per call, 3 replicas vs put", &three),
    ] {
        figures.push(Figure::new(name, "µs", c.per_call_us(c.etcd_cpu)).baseline(put_etcd_cpu));
    }
    let memory_cpu = memory.per_call_us(memory.server_cpu);
    for (name, c) in [
        ("  server CPU per call, 1 replica vs memory", &one),
        ("  server CPU per call, 3 replicas vs memory", &three),
    ] {
        figures.push(Figure::new(name, "µs", c.per_call_us(c.server_cpu)).baseline(memory_cpu));
    }
    figures
}

// ---------------------------------------------------------------------------------
// Fan-out: `fanout.rs`'s fleet and method.

async fn fanout(dir: &Path, member: &Member) -> Vec<Figure> {
    let memory = procs::real_server(dir, "etcd-fanout-memory.log", None);
    let replica = procs::etcd_server(dir, "etcd-fanout-1.log", &member.endpoint, PREFIX_FANOUT);
    let mut base = Fleet::connect(memory.addr).await;
    let mut ours = Fleet::connect(replica.addr).await;
    let (mut b, mut o) = (Vec::new(), Vec::new());
    for seq in 0..(fanout::WARM_UP_ROUNDS + fanout::ROUNDS) as u64 {
        let (bt, ot) = if seq % 2 == 0 {
            (base.round(seq).await, ours.round(seq).await)
        } else {
            let ot = ours.round(seq).await;
            (base.round(seq).await, ot)
        };
        if seq >= fanout::WARM_UP_ROUNDS as u64 {
            b.push(bt);
            o.push(ot);
        }
    }
    for f in [&base, &ours] {
        assert_eq!(f.wrong(), 0, "unexpected messages");
    }
    let ms = |us: u32| f64::from(us) / 1000.0;
    vec![
        Figure::new(
            "Watch fan-out to 1000 p99, etcd vs memory",
            "ms",
            ms(client::quantile(&mut o, 0.99)),
        )
        .baseline(ms(client::quantile(&mut b, 0.99)))
        .target(Target::RatioAtMost(2.0)),
        Figure::new(
            "  fan-out p50, etcd vs memory",
            "ms",
            ms(client::quantile(&mut o, 0.5)),
        )
        .baseline(ms(client::quantile(&mut b, 0.5))),
    ]
}

// ---------------------------------------------------------------------------------
// Resident memory.

/// 100 affiliates per cluster, at two scales: 10k (100 clusters) and the 100k
/// (1000 clusters) the footprint test and the issue use.
const RSS_CLUSTERS: [usize; 2] = [100, 1000];
const RSS_PER_CLUSTER: usize = 100;

async fn memory(dir: &Path, member: &Member) -> Vec<Figure> {
    let mut figures = Vec::new();
    for clusters in RSS_CLUSTERS {
        figures.extend(memory_at(dir, member, clusters).await);
    }
    figures
}

/// Lists timed per scale, alternating between the two servers.
const LIST_ROUNDS: usize = 200;

/// One List's latency, µs; every affiliate of the cluster must be there.
async fn timed_list(c: &mut Client, cluster: &str) -> u32 {
    let start = Instant::now();
    let req = ListRequest {
        cluster_id: cluster.to_owned(),
    };
    let listed = tokio::time::timeout(CALL_TIMEOUT, c.list(req))
        .await
        .expect("list timed out")
        .expect("list")
        .into_inner();
    assert_eq!(listed.affiliates.len(), RSS_PER_CLUSTER);
    assert!(listed.affiliates.iter().all(|a| !a.data.is_empty()));
    start.elapsed().as_micros().try_into().unwrap_or(u32::MAX)
}

/// Loads the same affiliates into a fresh memory-backend server and a fresh replica on
/// etcd, and compares them once both are idle, their clients still connected.
async fn memory_at(dir: &Path, member: &Member, clusters: usize) -> Vec<Figure> {
    let n = clusters * RSS_PER_CLUSTER;
    let prefix = format!("{PREFIX_RSS}{n}/");
    let memory = procs::real_server(dir, &format!("etcd-rss-{n}-memory.log"), None);
    let replica = procs::etcd_server(
        dir,
        &format!("etcd-rss-{n}-1.log"),
        &member.endpoint,
        &prefix,
    );
    let (memory_idle, _) = memory.rss();
    let (replica_idle, _) = replica.rss();
    let pool = Arc::new(client::updates(clusters, RSS_PER_CLUSTER));
    let mut rates = Vec::new();
    // Both keep their client connected until measured, as servers in use do.
    let mut connected = Vec::new();
    for s in [&memory, &replica] {
        let c = client::connect(s.addr).await;
        let run = client::closed_loop(&c, pool.clone(), IN_FLIGHT, Duration::ZERO, true).await;
        assert_eq!((run.calls, run.errors), (pool.len() as u64, 0));
        rates.push(run.calls as f64 / run.elapsed.as_secs_f64());
        connected.push(c);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (memory_rss, _) = memory.rss();
    let (replica_rss, _) = replica.rss();
    let (memory_anon, replica_anon) = (anon_rss_of(memory.pid()), anon_rss_of(replica.pid()));
    // What the replica's smaller size costs: a List (like a Watch's snapshot) reads
    // the cluster's data from etcd. Alternating, one List at a time.
    let (mut list_memory, mut list_replica) = (Vec::new(), Vec::new());
    for i in 0..LIST_ROUNDS {
        let cluster = client::cluster_id(i % clusters);
        list_memory.push(timed_list(&mut connected[0], &cluster).await);
        list_replica.push(timed_list(&mut connected[1], &cluster).await);
    }
    drop(connected);

    // A replica started after the load reads the affiliates from etcd.
    let late = procs::etcd_server(
        dir,
        &format!("etcd-rss-{n}-2.log"),
        &member.endpoint,
        &prefix,
    );
    let mut c = client::connect(late.addr).await;
    let listed = tokio::time::timeout(
        CALL_TIMEOUT,
        c.list(ListRequest {
            cluster_id: client::cluster_id(0),
        }),
    )
    .await
    .expect("list timed out")
    .expect("list")
    .into_inner()
    .affiliates
    .len();
    assert_eq!(listed, RSS_PER_CLUSTER, "the late replica's mirror");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (late_rss, _) = late.rss();
    let (etcd_rss, _) = rss_of(member.pid());

    let k = n / 1000;
    let mib = |b: u64| b as f64 / MIB;
    let ms = |us: u32| f64::from(us) / 1000.0;
    vec![
        Figure::new(
            &format!("RSS with {k}k affiliates, etcd vs memory"),
            "MiB",
            mib(replica_rss),
        )
        .baseline(mib(memory_rss))
        .target(Target::RatioAtMost(1.0)),
        Figure::new("  RSS idle, etcd vs memory", "MiB", mib(replica_idle))
            .baseline(mib(memory_idle)),
        Figure::new(
            &format!("  RSS the {k}k added (loaded - idle)"),
            "MiB",
            mib(replica_rss.saturating_sub(replica_idle)),
        )
        .baseline(mib(memory_rss.saturating_sub(memory_idle))),
        Figure::new(
            &format!("  RssAnon (heap, no code pages) with {k}k"),
            "MiB",
            mib(replica_anon),
        )
        .baseline(mib(memory_anon)),
        Figure::new(
            "  RSS, replica started after the load",
            "MiB",
            mib(late_rss),
        )
        .baseline(mib(memory_rss)),
        Figure::new(
            &format!("  List of {RSS_PER_CLUSTER} affiliates p50, etcd vs memory"),
            "ms",
            ms(client::quantile(&mut list_replica, 0.5)),
        )
        .baseline(ms(client::quantile(&mut list_memory, 0.5))),
        Figure::new(
            &format!("  List of {RSS_PER_CLUSTER} affiliates p99, etcd vs memory"),
            "ms",
            ms(client::quantile(&mut list_replica, 0.99)),
        )
        .baseline(ms(client::quantile(&mut list_memory, 0.99))),
        Figure::new("  etcd member RSS (all phases' data)", "MiB", mib(etcd_rss)),
        Figure::new(
            &format!("  loading {k}k via gRPC, etcd vs memory"),
            "calls/s",
            rates[1],
        )
        .baseline(rates[0]),
    ]
}
