//! Runs the real `discoveryd` binary for end-to-end tests: a daemon in a temp
//! dir with real plugins compiled to wasm, and CLI calls against its socket.
//! Waits are event-driven (log lines, watch streams) and always bounded.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_discoveryd");
pub const SECRET: &str = "kCQsKr4B28VUl7qw1sVkTDNF9fFH++ViIuKsss+C6kc=";

/// A plugin built by `scripts/setup`.
pub fn plugin(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup (scripts/test does) to build the plugins",
        path.display()
    );
    path
}

/// Lines of a child's output, readable with a timeout.
pub struct Lines {
    rx: Receiver<String>,
    /// Everything seen so far, for failure messages.
    pub seen: Arc<Mutex<Vec<String>>>,
}

impl Lines {
    pub fn spawn(reader: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                log.lock().unwrap().push(line.clone());
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Lines { rx, seen }
    }

    /// Reads lines until `done` accepts one; panics after `timeout`.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) if done(&line) => return line,
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "timed out after {timeout:?} waiting for {what}; output:\n{}",
                        self.dump()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!(
                        "output ended while waiting for {what}; output:\n{}",
                        self.dump()
                    )
                }
            }
        }
    }

    /// Like [`Self::wait_for`], but a line already read (say, by an earlier wait that
    /// read past it) counts too.
    pub fn wait_logged(
        &self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&str) -> bool,
    ) -> String {
        // A line read after this scan is still in the channel: nothing falls between.
        let earlier = self.seen.lock().unwrap().iter().find(|l| done(l)).cloned();
        earlier.unwrap_or_else(|| self.wait_for(what, timeout, done))
    }

    pub fn dump(&self) -> String {
        self.seen.lock().unwrap().join("\n")
    }
}

/// A running daemon; stopped with SIGTERM on drop.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    child: Child,
    pub log: Lines,
}

impl Daemon {
    /// Writes `config` (YAML; `{dir}` stands for the temp dir) and starts the
    /// daemon, returning once it reports that it runs.
    pub fn start(config: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Daemon::start_in(dir, config)
    }

    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Daemon {
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, config.replace("{dir}", dir.path().to_str().unwrap())).unwrap();
        let mut child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Lines::spawn(child.stderr.take().unwrap());
        let daemon = Daemon {
            dir,
            config: path,
            child,
            log,
        };
        daemon
            .log
            .wait_for("the daemon to start", Duration::from_secs(60), |l| {
                l.contains("discoveryd running")
            });
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("state/discoveryd.sock")
    }

    /// Runs `discoveryd <args> --socket <socket>` to completion; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "discoveryd {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts a long-running CLI command (`-w`), returning its stdout lines.
    pub fn cli_stream(&self, args: &[&str]) -> (Child, Lines) {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--socket")
            .arg(self.socket())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Lines::spawn(child.stdout.take().unwrap());
        (child, lines)
    }

    /// Sends SIGTERM and waits (bounded) for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not stop on SIGTERM; log:\n{}", self.log.dump());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the daemon and hands back its directory, for a restart in it.
    pub fn shutdown(mut self) -> (std::process::ExitStatus, tempfile::TempDir) {
        let status = self.stop();
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (status, dir)
    }

    /// SIGKILL: no clean-up, as a crash or power loss.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Follows `get members -w` until the members are exactly `expected`
    /// (sorted), or panics after `timeout`; returns how long it took.
    pub fn wait_members(&self, expected: &[&str], timeout: Duration) -> Duration {
        let started = Instant::now();
        let (mut watcher, events) = self.cli_stream(&["get", "members", "-o", "json", "-w"]);
        let mut members = std::collections::BTreeSet::new();
        let want: std::collections::BTreeSet<String> =
            expected.iter().map(|s| s.to_string()).collect();
        events.wait_for(&format!("members {expected:?}"), timeout, |line| {
            let event = json(line);
            let id = event["metadata"]["id"].as_str().unwrap().to_string();
            if event["event"] == "destroyed" {
                members.remove(&id);
            } else {
                members.insert(id);
            }
            // The watch starts with the current members, one line each and no
            // end marker: a partial start may look right, so check the whole list.
            members == want && ids(&self.cli(&["get", "members", "-o", "json"])) == expected
        });
        let _ = watcher.kill();
        let _ = watcher.wait();
        started.elapsed()
    }

    /// The daemon's resident memory (VmRSS) in KiB.
    pub fn resident_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The discovery service binary, built beside `discoveryd` (`cargo test
/// --workspace` and `cargo build` build both).
pub fn service_binary() -> PathBuf {
    let path = Path::new(BIN).with_file_name("discovery-service");
    assert!(
        path.is_file(),
        "{} is missing: build it with `cargo build -p discovery-service` (scripts/test does)",
        path.display()
    );
    path
}

/// Our discovery service, the real binary, listening on loopback; stopped on drop.
pub struct Service {
    child: Child,
    pub addr: std::net::SocketAddr,
    pub log: Lines,
}

impl Service {
    /// Starts it on a port the system picks, with `args` added (snapshots off
    /// unless `args` says otherwise).
    pub fn start(args: &[&str]) -> Service {
        Service::start_on("127.0.0.1:0", args)
    }

    /// Starts it on `addr` (to restart one on the port it had).
    pub fn start_on(addr: &str, args: &[&str]) -> Service {
        let mut command = Command::new(service_binary());
        command.args(["--addr", addr, "--landing-addr", "", "--metrics-addr", ""]);
        if !args.iter().any(|a| a.starts_with("--snapshot")) {
            command.arg("--snapshots-enabled=false");
        }
        let mut child = command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The server logs JSON lines; tracing writes them to stdout.
        let log = Lines::spawn(child.stdout.take().unwrap());
        let _stderr = Lines::spawn(child.stderr.take().unwrap());
        let line = log.wait_for("the service to listen", Duration::from_secs(30), |l| {
            l.contains("\"listening\"") && l.contains("\"grpc\"")
        });
        let logged = json(&line);
        let addr = logged["address"]
            .as_str()
            .or_else(|| logged["fields"]["address"].as_str())
            .unwrap_or_else(|| panic!("no address in {line}"))
            .parse()
            .unwrap();
        Service { child, addr, log }
    }

    /// `http://127.0.0.1:<port>`
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// SIGTERM, and a bounded wait for the exit (a final snapshot is saved).
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        wait_exit(&mut self.child, Duration::from_secs(20));
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) for a child to exit.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "a child did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A process's CPU time so far (user + system), from `/proc/<pid>/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as u64;
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// Parses one JSON line.
pub fn json(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// `discoveryd get` arguments for the raw affiliates as JSON lines.
pub const RAW_AFFILIATES: &[&str] = &[
    "get",
    "affiliates",
    "--namespace",
    "cluster-raw",
    "-o",
    "json",
];

/// The resource IDs in a `get -o json` output, in order.
pub fn ids(text: &str) -> Vec<String> {
    json_lines(text)
        .iter()
        .map(|r| r["metadata"]["id"].as_str().unwrap().to_string())
        .collect()
}

/// Parses a JSON-lines output.
pub fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().filter(|l| !l.is_empty()).map(json).collect()
}
