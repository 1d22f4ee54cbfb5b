//! The listener and its connections, and the test-facing handle.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_rustls::TlsAcceptor;

use crate::api::{Ctx, handle};
use crate::node::{NodeBuilder, normalise_metadata};
use crate::store::{Observed, PatchRecord, RequestRecord, Shared, Store, WatchMsg};
use crate::{AuthMode, FakeOptions, Verb};

/// Open connections, by id, so tests can cut them.
#[derive(Default)]
struct Conns {
    next: AtomicU64,
    open: Mutex<HashMap<u64, AbortHandle>>,
}

impl Conns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AbortHandle>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running fake Kubernetes API server; see the crate documentation.
///
/// It runs on a runtime of its own (two worker threads), so it serves the same whether the
/// test is a plain `#[test]` or a `#[tokio::test]` of any flavour. Dropping the handle stops it.
pub struct FakeApiServer {
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    ctx: Arc<Ctx>,
    acceptor: TlsAcceptor,
    ca_pem: String,
    addr: SocketAddr,
    conns: Arc<Conns>,
    accept_task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for FakeApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApiServer")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    ctx: Arc<Ctx>,
    acceptor: TlsAcceptor,
    conns: Arc<Conns>,
) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // Out of descriptors or similar: back off briefly rather than spin.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // Checked and registered under the connections' lock: a connection accepted just
        // before refusing began is then either refused or registered before
        // `drop_connections` can drain the set, never missed by both.
        let mut open = conns.lock();
        if ctx.shared.read(|s| s.refuse_connections) {
            drop(open);
            reset(tcp);
            continue;
        }
        let id = conns.next.fetch_add(1, Ordering::Relaxed);
        let task = tokio::spawn(serve_connection(
            tcp,
            ctx.clone(),
            acceptor.clone(),
            conns.clone(),
            id,
        ));
        open.insert(id, task.abort_handle());
    }
}

/// Closes a just-accepted connection with a reset (SO_LINGER 0), as a refusing server would.
fn reset(tcp: TcpStream) {
    let _ = tcp.set_zero_linger();
    drop(tcp);
}

async fn serve_connection(
    tcp: TcpStream,
    ctx: Arc<Ctx>,
    acceptor: TlsAcceptor,
    conns: Arc<Conns>,
    id: u64,
) {
    let _ = tcp.set_nodelay(true);
    if let Ok(tls) = acceptor.accept(tcp).await {
        let service_ctx = ctx.clone();
        let service = service_fn(move |req| handle(service_ctx.clone(), id, req));
        let _ = http1::Builder::new()
            .serve_connection(TokioIo::new(tls), service)
            .await;
    }
    conns.lock().remove(&id);
}

impl FakeApiServer {
    /// Starts a fake on `127.0.0.1` (port from `options`, ephemeral by default).
    ///
    /// # Panics
    /// If the runtime, the certificates or the listener cannot be made; see
    /// [`FakeApiServer::try_start`].
    pub async fn start(options: FakeOptions) -> FakeApiServer {
        Self::try_start(options).expect("starting fake-kube-apiserver")
    }

    /// [`FakeApiServer::start`] for synchronous tests.
    pub fn start_blocking(options: FakeOptions) -> FakeApiServer {
        Self::try_start(options).expect("starting fake-kube-apiserver")
    }

    /// Starts a fake, reporting failure instead of panicking. Usable from sync and async code.
    pub fn try_start(options: FakeOptions) -> std::io::Result<FakeApiServer> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fake-kube-apiserver")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let pki = crate::tls::make()?;
        let listener = {
            let _enter = handle.enter();
            bind(SocketAddr::from((Ipv4Addr::LOCALHOST, options.port)))?
        };
        let addr = listener.local_addr()?;
        let token = options
            .token
            .clone()
            .unwrap_or_else(|| crate::util::uuid_v4().replace('-', ""));
        let ctx = Arc::new(Ctx {
            shared: Arc::new(Shared::new()),
            token,
            options,
            port: addr.port(),
        });
        let acceptor = TlsAcceptor::from(pki.server_config);
        let conns = Arc::new(Conns::default());
        let task = handle.spawn(accept_loop(
            listener,
            ctx.clone(),
            acceptor.clone(),
            conns.clone(),
        ));
        Ok(FakeApiServer {
            runtime: Some(runtime),
            handle,
            ctx,
            acceptor,
            ca_pem: pki.ca_pem,
            addr,
            conns,
            accept_task: Mutex::new(Some(task)),
        })
    }

    // ----- Where and how to connect -------------------------------------------------------

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The listening address (stays the same across [`FakeApiServer::restart`]).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// PEM of the CA that signed the server certificate (SANs `127.0.0.1`, `localhost`).
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The bearer token the fake accepts (every other credential gets 401).
    pub fn token(&self) -> &str {
        &self.ctx.token
    }

    /// A kubeconfig for the fake: cluster `fake-kube` with `certificate-authority-data`,
    /// user `fake-kube-user` with `token`, context `fake-kube` (current).
    pub fn kubeconfig(&self) -> String {
        crate::kubeconfig::render(&self.url(), &self.ca_pem, self.token())
    }

    /// Writes [`FakeApiServer::kubeconfig`] to `path` (mode 0600).
    pub fn write_kubeconfig(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)?;
        f.write_all(self.kubeconfig().as_bytes())
    }

    // ----- Nodes, as other actors change them ---------------------------------------------

    /// Adds a Node, or replaces the one of the same name (keeping its `uid` and
    /// `creationTimestamp`, as an update would). Watchers see ADDED or MODIFIED; replacing a
    /// Node with identical content is a no-op (no new resourceVersion), as in the real server.
    /// Returns the stored Node.
    ///
    /// # Panics
    /// If a label or annotation is one the real API would refuse.
    pub fn put_node(&self, node: NodeBuilder) -> Value {
        self.ctx.shared.write(|s| {
            let (uid, created) = match s.nodes.get(&node.name) {
                Some(old) => (
                    old.pointer("/metadata/uid")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                    old.pointer("/metadata/creationTimestamp")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string(),
                ),
                None => (crate::util::uuid_v4(), crate::util::rfc3339_now()),
            };
            let rv = s
                .nodes
                .get(&node.name)
                .map(crate::store::rv_of)
                .unwrap_or(0);
            let obj = node.to_json(&uid, rv, &created);
            let errors = crate::validate::node_metadata(&obj);
            assert!(
                errors.is_empty(),
                "put_node({}): the real API would refuse this Node: {}",
                node.name,
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
            if s.nodes.get(&node.name) == Some(&obj) {
                return obj;
            }
            s.commit(&node.name, Some(obj))
        })
    }

    /// Deletes a Node; watchers see DELETED (the object as last stored, with the deletion's
    /// resourceVersion). Returns that object, or `None` if there was no such Node.
    pub fn delete_node(&self, name: &str) -> Option<Value> {
        self.ctx.shared.write(|s| {
            if s.nodes.contains_key(name) {
                Some(s.commit(name, None))
            } else {
                None
            }
        })
    }

    /// Changes a stored Node in place, as some other writer (a kubelet, a controller) would.
    /// `name`, `uid` and `resourceVersion` are restored after `f`. No change, no new
    /// resourceVersion. Returns the stored Node, or `None` if there is no such Node.
    pub fn modify_node(&self, name: &str, f: impl FnOnce(&mut Value)) -> Option<Value> {
        self.ctx.shared.write(|s| {
            let current = s.nodes.get(name)?.clone();
            let mut next = current.clone();
            f(&mut next);
            for key in ["name", "uid", "resourceVersion"] {
                if let (Some(m), Some(v)) = (
                    next.get_mut("metadata").and_then(Value::as_object_mut),
                    current.pointer(&format!("/metadata/{key}")),
                ) {
                    m.insert(key.into(), v.clone());
                }
            }
            normalise_metadata(&mut next);
            if next == current {
                return Some(current);
            }
            Some(s.commit(name, Some(next)))
        })
    }

    /// Sets (`Some`) or removes (`None`) annotations on a Node, as another actor would.
    pub fn patch_annotations(&self, name: &str, changes: &[(&str, Option<&str>)]) -> Option<Value> {
        self.modify_node(name, |node| {
            let meta = node
                .get_mut("metadata")
                .and_then(Value::as_object_mut)
                .expect("metadata");
            let annotations = meta
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(map) = annotations.as_object_mut() {
                for (k, v) in changes {
                    match v {
                        Some(v) => {
                            map.insert((*k).to_string(), Value::String((*v).to_string()));
                        }
                        None => {
                            map.remove(*k);
                        }
                    }
                }
            }
        })
    }

    /// A stored Node, as GET would return it.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.ctx.shared.read(|s| s.nodes.get(name).cloned())
    }

    /// All stored Nodes, by name.
    pub fn nodes(&self) -> Vec<Value> {
        self.ctx
            .shared
            .read(|s| s.nodes.values().cloned().collect())
    }

    /// The current resourceVersion (the fake's etcd revision).
    pub fn resource_version(&self) -> u64 {
        self.ctx.shared.read(|s| s.rv)
    }

    // ----- What the fake has seen ---------------------------------------------------------

    /// Every PATCH received so far (content type, body, outcome), oldest first.
    pub fn patches(&self) -> Vec<PatchRecord> {
        self.ctx.shared.read(|s| s.patches.clone())
    }

    /// Every request answered so far, oldest first.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.ctx.shared.read(|s| s.requests.clone())
    }

    /// Forgets the recorded requests and patches.
    pub fn clear_records(&self) {
        self.ctx.shared.write(|s| {
            s.requests.clear();
            s.patches.clear();
        })
    }

    /// A snapshot of everything [`FakeApiServer::wait_for`] predicates can look at.
    pub fn observed(&self) -> Observed {
        self.ctx.shared.read(Store::observed)
    }

    /// Blocks the calling thread until `pred` holds (checked now and on every change the fake
    /// sees: a request, a patch, a watch opening or closing, a Node change), or `timeout`
    /// passes. `Err` carries the last observation. Do not call it on a current-thread runtime
    /// that must make progress for `pred` to hold; use [`FakeApiServer::wait_for_async`].
    pub fn wait_for(
        &self,
        timeout: Duration,
        pred: impl Fn(&Observed) -> bool,
    ) -> Result<Observed, Box<Observed>> {
        self.ctx
            .shared
            .wait_blocking(timeout, pred)
            .map_err(Box::new)
    }

    /// [`FakeApiServer::wait_for`] for async tests (needs a tokio runtime with time enabled).
    pub async fn wait_for_async(
        &self,
        timeout: Duration,
        pred: impl Fn(&Observed) -> bool,
    ) -> Result<Observed, Box<Observed>> {
        self.ctx
            .shared
            .wait_async(timeout, pred)
            .await
            .map_err(Box::new)
    }

    // ----- Faults -------------------------------------------------------------------------

    /// How requests with `verb` are authorized from now on (default [`AuthMode::Ok`]).
    pub fn set_auth(&self, verb: Verb, mode: AuthMode) {
        self.ctx.shared.write(|s| {
            s.auth.insert(verb, mode);
        })
    }

    /// [`FakeApiServer::set_auth`] for every verb.
    pub fn set_auth_all(&self, mode: AuthMode) {
        for verb in [Verb::List, Verb::Watch, Verb::Get, Verb::Patch] {
            self.set_auth(verb, mode.clone());
        }
    }

    /// Compacts the history: every resourceVersion before the current one is gone, so a watch
    /// resuming from one gets `410 Expired` (and so does a list at such an exact version, or a
    /// continue token from before). Returns the compaction revision (still resumable).
    pub fn compact(&self) -> u64 {
        self.ctx.shared.write(Store::compact)
    }

    /// Delays every request by `delay` before it is handled (`Duration::ZERO` to stop).
    pub fn set_delay(&self, delay: Duration) {
        self.ctx.shared.write(|s| s.delay = delay)
    }

    /// Sends a BOOKMARK at the current resourceVersion now to every open watch that allowed
    /// bookmarks (besides the periodic ones, every `bookmark_interval`). Returns how many.
    pub fn send_bookmarks(&self) -> usize {
        self.ctx.shared.write(|s| {
            let ids: Vec<u64> = s
                .watchers
                .iter()
                .filter(|(_, w)| w.bookmarks)
                .map(|(id, _)| *id)
                .collect();
            for id in &ids {
                s.bookmark(*id);
            }
            ids.len()
        })
    }

    /// Ends every open watch stream cleanly, as its timeout would. Returns how many.
    pub fn close_watches(&self) -> usize {
        self.ctx.shared.write(|s| {
            let n = s.watchers.len();
            for w in s.watchers.values() {
                let _ = w.tx.send(WatchMsg::End);
            }
            n
        })
    }

    /// Cuts every open connection (watch streams end without their final chunk, requests in
    /// flight get no answer). Returns how many connections were cut.
    pub fn drop_connections(&self) -> usize {
        let cut: Vec<(u64, AbortHandle)> = self.conns.lock().drain().collect();
        // An abort takes effect at the task's next poll; silence the watches on those
        // connections now so that no change made after this call reaches them.
        self.ctx.shared.write(|s| {
            for w in s.watchers.values_mut() {
                if cut.iter().any(|(id, _)| *id == w.conn) {
                    w.cut = true;
                }
            }
        });
        for (_, h) in &cut {
            h.abort();
        }
        cut.len()
    }

    /// While `true`, new TCP connections are accepted and reset at once.
    pub fn set_refuse_connections(&self, refuse: bool) {
        self.ctx.shared.write(|s| s.refuse_connections = refuse)
    }

    /// Stops listening and cuts every connection ("API server down": connections are refused).
    /// Nodes, history and settings are kept for [`FakeApiServer::restart`].
    pub fn stop(&self) {
        if let Some(task) = self
            .accept_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            task.abort();
        }
        self.drop_connections();
    }

    /// Listens again on the same address after [`FakeApiServer::stop`], with the same CA,
    /// certificate, token and state. A no-op while running.
    pub fn restart(&self) -> std::io::Result<()> {
        let mut slot = self.accept_task.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let listener = {
            let _enter = self.handle.enter();
            bind(self.addr)?
        };
        *slot = Some(self.handle.spawn(accept_loop(
            listener,
            self.ctx.clone(),
            self.acceptor.clone(),
            self.conns.clone(),
        )));
        Ok(())
    }

    /// Whether the fake is listening.
    pub fn is_running(&self) -> bool {
        self.accept_task
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
