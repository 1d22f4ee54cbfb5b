//! Real etcd for the tests: Debian's `etcd-server` (installed by `scripts/test`), one
//! or three members on loopback ports, data in a temporary directory. Members can be
//! killed and restarted to test what the service does without them.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use discovery_service::Config;
use discovery_service::config::StateBackend;
use discovery_service::etcd::proto::etcdserverpb::RangeRequest;
use discovery_service::etcd::{EtcdClient, EtcdOptions};

use super::ports::free_port;

struct Member {
    name: String,
    client: String,
    peer: String,
    data: PathBuf,
    child: Option<Child>,
}

/// An etcd cluster started by a test; its members die with it.
pub struct Etcd {
    members: Vec<Member>,
    initial_cluster: String,
    flags: Vec<String>,
    tls: Option<TlsFiles>,
    _dir: tempfile::TempDir,
}

/// Certificates for etcd over TLS: a CA, the member's pair (for 127.0.0.1) and a
/// client pair the member requires.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl TlsFiles {
    /// Writes a fresh CA and pairs signed by it into `dir`.
    pub fn create(dir: &std::path::Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issue = |name: &str, purpose: ExtendedKeyUsagePurpose| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
            p.extended_key_usages = vec![purpose];
            let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
            let (c, k) = (
                dir.join(format!("{name}.crt")),
                dir.join(format!("{name}.key")),
            );
            std::fs::write(&c, cert.pem()).unwrap();
            std::fs::write(&k, key.serialize_pem()).unwrap();
            (c, k)
        };
        let (server_cert, server_key) = issue("server", ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = issue("client", ExtendedKeyUsagePurpose::ClientAuth);
        let ca_path = dir.join("ca.crt");
        std::fs::write(&ca_path, ca_cert.pem()).unwrap();
        Self {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        }
    }
}

/// A loopback port nothing listens on right now.
fn etcd_binary() -> &'static str {
    static FOUND: OnceLock<()> = OnceLock::new();
    FOUND.get_or_init(|| {
        let ok = Command::new("etcd")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(
            ok,
            "etcd is not installed: `scripts/test` installs Debian's etcd-server"
        );
    });
    "etcd"
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers (bounded).
    pub async fn start(n: usize) -> Self {
        Self::start_with(n, false, &[]).await
    }

    /// One member serving clients over TLS only, requiring a client certificate.
    pub async fn start_tls() -> Self {
        Self::start_with(1, true, &[]).await
    }

    /// One member started with these extra `flags`.
    pub async fn start_flags(flags: &[&str]) -> Self {
        Self::start_with(1, false, flags).await
    }

    async fn start_with(n: usize, tls: bool, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let scheme = if tls { "https" } else { "http" };
        let tls = tls.then(|| TlsFiles::create(dir.path()));
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: format!("{scheme}://127.0.0.1:{}", free_port()),
                peer: format!("http://127.0.0.1:{}", free_port()),
                data: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Self {
            members,
            initial_cluster,
            flags: flags.iter().map(|f| f.to_string()).collect(),
            tls,
            _dir: dir,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_ready().await;
        etcd
    }

    fn spawn(&mut self, i: usize) {
        let m = &self.members[i];
        let mut cmd = Command::new(etcd_binary());
        cmd.args([
            "--name",
            &m.name,
            "--data-dir",
            m.data.to_str().unwrap(),
            "--listen-client-urls",
            &m.client,
            "--advertise-client-urls",
            &m.client,
            "--listen-peer-urls",
            &m.peer,
            "--initial-advertise-peer-urls",
            &m.peer,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "discovery-tests",
            // Loopback is fast: elect quickly so member loss costs little test time.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--logger",
            "zap",
            "--log-level",
            "error",
        ])
        .args(&self.flags)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        // The member dies with the test process, even if the test panics or is killed.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        self.members[i].child = Some(cmd.spawn().expect("etcd starts"));
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.clone()).collect()
    }

    /// A plain gRPC channel to member `i`, for calls the tests make to etcd itself.
    pub async fn channel(&self, i: usize) -> tonic::transport::Channel {
        let url = self.members[i].client.clone();
        super::within(
            "connect to etcd",
            tonic::transport::Channel::from_shared(url)
                .unwrap()
                .connect(),
        )
        .await
        .unwrap()
    }

    /// etcd's current revision.
    pub async fn revision(&self) -> i64 {
        revision(&self.client()).await
    }

    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    pub fn client(&self) -> EtcdClient {
        EtcdClient::new(&EtcdOptions {
            endpoints: self.endpoints(),
            ca: self.tls.as_ref().map(|t| t.ca.clone()),
            cert: self.tls.as_ref().map(|t| t.client_cert.clone()),
            key: self.tls.as_ref().map(|t| t.client_key.clone()),
            ..Default::default()
        })
        .unwrap()
    }

    /// Waits until a linearizable read succeeds (the cluster has a leader).
    pub async fn wait_ready(&self) {
        let client = self.client();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = client
                .range(RangeRequest {
                    key: b"ready"[..].into(),
                    ..Default::default()
                })
                .await;
            match r {
                Ok(_) => return,
                Err(e) if tokio::time::Instant::now() > deadline => {
                    panic!("etcd did not become ready: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// SIGKILLs member `i` (its data stays, so it can come back).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes member `i` (SIGSTOP): its connections stay open but nothing answers,
    /// as with a hung process or a stalled disk.
    pub fn freeze(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen member `i` run again (SIGCONT).
    pub fn thaw(&mut self, i: usize) {
        self.signal(i, nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&mut self, i: usize, signal: nix::sys::signal::Signal) {
        let child = self.members[i].child.as_ref().expect("member is running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the etcd member");
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none(), "member {i} is running");
        self.spawn(i);
    }

    /// A server config using this etcd under `prefix`.
    pub fn config(&self, prefix: &str) -> Config {
        let mut c = super::config();
        c.state_backend = StateBackend::Etcd;
        c.etcd_endpoints = self.endpoints();
        c.etcd_prefix = prefix.to_owned();
        if let Some(t) = &self.tls {
            c.etcd_ca = Some(t.ca.clone());
            c.etcd_cert = Some(t.client_cert.clone());
            c.etcd_key = Some(t.client_key.clone());
        }
        c
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One single-member etcd per test binary, shared by its tests (each uses its own
/// prefix). Started from a thread that lives as long as the process, because a
/// member's parent-death signal fires when the thread that spawned it ends.
pub fn shared() -> &'static [String] {
    static ENDPOINTS: OnceLock<Vec<String>> = OnceLock::new();
    ENDPOINTS.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let etcd = rt.block_on(Etcd::start(1));
            tx.send(etcd.endpoints()).unwrap();
            // Keep the member (and this thread) alive until the process exits.
            loop {
                std::thread::park();
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the shared etcd starts")
    })
}

/// Compacts etcd's history up to its current revision, through `endpoints`.
pub async fn compact_history(endpoints: &[String]) {
    let client = EtcdClient::new(&EtcdOptions {
        endpoints: endpoints.to_vec(),
        ..Default::default()
    })
    .unwrap();
    client.compact(revision(&client).await).await.unwrap();
}

/// etcd's current revision, as `client` reads it.
async fn revision(client: &EtcdClient) -> i64 {
    let req = RangeRequest {
        key: b"x"[..].into(),
        ..Default::default()
    };
    let r = super::within("a read of etcd's revision", client.range(req)).await;
    r.unwrap().header.unwrap().revision
}

/// Which backend a parametrised test runs on.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    Etcd,
}

impl Backend {
    /// The test config on this backend; `name` keeps each test's etcd keys apart.
    pub fn config(self, name: &str) -> Config {
        match self {
            Backend::Memory => super::config(),
            Backend::Etcd => {
                let mut c = super::config();
                c.state_backend = StateBackend::Etcd;
                c.etcd_endpoints = shared().to_vec();
                c.etcd_prefix = format!("/test/{name}/{}/", std::process::id());
                c
            }
        }
    }
}

/// Runs each named `async fn(Backend)` as two tests, `memory::name` and `etcd::name`:
/// the same conformance test against both backends.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::etcd::Backend::Memory).await
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::common::etcd::Backend::Etcd).await
                }
            )*
        }
    };
}
