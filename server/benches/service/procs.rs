//! Server processes: the real binary (on the memory or the etcd backend) and the no-op
//! baseline (this bench binary re-executed), each in its own process so
//! `/proc/<pid>/stat` gives its CPU time alone, with no bookkeeping inside the server
//! under test.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// `USER_HZ`: the unit of utime/stime in `/proc/<pid>/stat` (fixed at 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;

/// Upper bound for a server to start, load a snapshot, or stop.
pub const PROCESS_WAIT: Duration = Duration::from_secs(30);

/// A child server whose stdout (JSON logs) goes to a file, as under a container runtime.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    log: PathBuf,
}

/// Parsed JSON log lines of a server, in order.
pub fn log_lines(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl ServerProcess {
    /// Starts `cmd` with stdout to `log` and waits for its `listening` line (the real
    /// binary's, or the same shape from the no-op).
    pub fn start(name: &'static str, mut cmd: Command, log: PathBuf) -> Self {
        let out = fs::File::create(&log).expect("create log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let mut p = Self {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            log,
        };
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            let found = log_lines(&p.log).into_iter().find_map(|v| {
                (v["message"] == "listening" && v["server"] == "grpc")
                    .then(|| v["address"].as_str()?.parse().ok())
                    .flatten()
            });
            if let Some(addr) = found {
                p.addr = addr;
                return p;
            }
            if let Ok(Some(status)) = p.child.try_wait() {
                panic!("{name} exited during start: {status}");
            }
            assert!(Instant::now() < deadline, "{name} did not start in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        log_lines(&self.log)
    }

    /// Bytes written to stdout (the log file) so far.
    pub fn log_len(&self) -> u64 {
        fs::metadata(&self.log).map(|m| m.len()).unwrap_or(0)
    }

    /// The log file's bytes in `range` (offsets from [`Self::log_len`]).
    pub fn log_bytes(&self, range: std::ops::Range<u64>) -> Vec<u8> {
        let all = fs::read(&self.log).unwrap_or_default();
        let end = (range.end as usize).min(all.len());
        all[(range.start as usize).min(end)..end].to_vec()
    }

    /// User + system CPU time of the whole process so far (all threads, live or gone).
    pub fn cpu(&self) -> Duration {
        cpu_of(&self.pid().to_string())
    }

    /// (VmRSS, VmHWM) in bytes.
    pub fn rss(&self) -> (u64, u64) {
        rss_of(self.pid())
    }

    /// SIGTERM and wait (bounded) for the graceful exit; its log lines if it exited
    /// successfully.
    pub fn terminate(mut self) -> Option<Vec<serde_json::Value>> {
        let _ = kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + PROCESS_WAIT;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.success().then(|| self.log_lines()),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => return None, // Drop kills it.
            }
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// (VmRSS, VmHWM) of process `pid` in bytes, from `/proc/<pid>/status`.
pub fn rss_of(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// RssAnon of `/proc/<pid>/status`: the private, anonymous part of the RSS (the heap),
/// without the binary's file-backed code pages.
pub fn anon_rss_of(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// utime + stime of `/proc/<pid>/stat` (`pid` may be `self`).
pub fn cpu_of(pid: &str) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may contain spaces; fields after it are fixed: the 12th and
    // 13th after the closing parenthesis are utime and stime.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 1000 / TICKS_PER_SECOND)
}

/// The real `discovery-service` binary on an ephemeral loopback port, landing and
/// metrics listeners off, the per-IP limiter raised out of the way (every bench call
/// comes from 127.0.0.1; the limiter still runs on every call), default logging.
pub fn real_server(dir: &Path, log_name: &str, snapshot: Option<&Path>) -> ServerProcess {
    server_binary(
        Path::new(env!("CARGO_BIN_EXE_discovery-service")),
        dir,
        log_name,
        snapshot,
        &[],
    )
}

/// The real binary as [`real_server`] starts it, but on the etcd backend
/// (`--state-backend etcd`) at `endpoint` under `prefix`; it is listening once its
/// mirror has read everything under the prefix.
pub fn etcd_server(dir: &Path, log_name: &str, endpoint: &str, prefix: &str) -> ServerProcess {
    server_binary(
        Path::new(env!("CARGO_BIN_EXE_discovery-service")),
        dir,
        log_name,
        None,
        &[
            "--state-backend=etcd".to_owned(),
            format!("--etcd-endpoints={endpoint}"),
            format!("--etcd-prefix={prefix}"),
        ],
    )
}

/// Another build of `discovery-service` (`DISCOVERY_BENCH_BEFORE`), started as
/// [`real_server`] starts this one.
pub fn before_server(binary: &Path, dir: &Path) -> ServerProcess {
    server_binary(binary, dir, "before.log", None, &[])
}

fn server_binary(
    binary: &Path,
    dir: &Path,
    log_name: &str,
    snapshot: Option<&Path>,
    extra: &[String],
) -> ServerProcess {
    let mut cmd = Command::new(binary);
    cmd.args([
        "--addr=127.0.0.1:0",
        "--landing-addr=",
        "--metrics-addr=",
        "--rate-limit-per-second=1000000000",
        "--rate-limit-burst=1000000000",
    ]);
    match snapshot {
        Some(path) => {
            cmd.arg(format!("--snapshot-path={}", path.display()));
            cmd.arg("--snapshot-interval=24h");
        }
        None => {
            cmd.arg("--snapshots-enabled=false");
        }
    }
    cmd.args(extra);
    cmd.env_remove("RUST_LOG").env_remove("MODE");
    ServerProcess::start("discovery-service", cmd, dir.join(log_name))
}

/// The no-op baseline: this bench binary re-executed in no-op server mode.
pub fn noop_server(dir: &Path) -> ServerProcess {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.arg(crate::noop::FLAG);
    ServerProcess::start("no-op", cmd, dir.join("noop.log"))
}

/// Parses a `Debug`-formatted `Duration` as logged by the server (`"251.3ms"`).
pub fn parse_debug_duration(s: &str) -> Option<Duration> {
    let units = [("ns", 1e-9), ("µs", 1e-6), ("ms", 1e-3), ("s", 1.0)];
    units.iter().find_map(|(u, scale)| {
        let n: f64 = s.strip_suffix(u)?.parse().ok()?;
        Some(Duration::from_secs_f64(n * scale))
    })
}
