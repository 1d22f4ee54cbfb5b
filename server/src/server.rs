//! Wiring: load the snapshot, open the listeners, run the background loops, shut down
//! in order (§4.11, §4.12).
//!
//! Start-up order matters: the snapshot is loaded before any port opens, so no client
//! can see a state without it. Shutdown order matters too: listeners stop and watch
//! streams end first, then the loops, then the final save sees the last update.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::backend::Backend;
use crate::config::{Config, StateBackend};
use crate::etcd::EtcdState;
use crate::grpc::observe::Observer;
use crate::grpc::peer::Trust;
use crate::grpc::{ClusterService, Options};
use crate::http::landing::Landing;
use crate::http::serve::{self, Handler};
use crate::limits::{FINAL_SAVE_TIMEOUT, IP_RATE_GARBAGE_COLLECTION_PERIOD, TLS_RELOAD_POLL};
use crate::metrics::Metrics;
use crate::proto::server::cluster_server::ClusterServer;
use crate::ratelimit::{IpRateLimiter, Rate};
use crate::snapshot::storage::Storage;
use crate::state::State;
use crate::tls::{self, ReloadingCert};

/// A running service. Dropping it does not stop it; call [`Server::shutdown`].
#[derive(Debug)]
pub struct Server {
    /// Where gRPC is served.
    pub grpc_addr: SocketAddr,
    /// Where the site pages are served, if enabled.
    pub landing_addr: Option<SocketAddr>,
    /// Where `/metrics` is served, if enabled.
    pub metrics_addr: Option<SocketAddr>,
    /// The live state (tests and benchmarks inspect it); with etcd, this replica's
    /// mirror.
    pub state: State,
    pub metrics: Arc<Metrics>,
    storage: Option<Arc<Storage>>,
    /// Stops the listeners and ends watch streams.
    serving: CancellationToken,
    /// Stops the background loops once serving has stopped.
    background: CancellationToken,
    servers: Vec<JoinHandle<()>>,
    loops: Vec<JoinHandle<()>>,
}

/// GC once now, then every `interval`, logging each pass. With etcd, leases expire
/// affiliates and endpoints; GC deletes only what a lease kept past its expiry, the
/// guard keys of empty clusters in etcd, and the mirror's empty, unwatched clusters.
async fn gc_loop(
    backend: Backend,
    metrics: Arc<Metrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(interval.max(Duration::from_millis(1)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let r = match &backend {
            Backend::Memory(state) => state.collect(Instant::now()),
            Backend::Etcd(etcd) => {
                let (affiliates, endpoints) = tokio::select! {
                    _ = stop.cancelled() => return,
                    overdue = async {
                        let overdue = etcd.expire_overdue().await;
                        etcd.retire_guards().await;
                        overdue
                    } => overdue,
                };
                if affiliates + endpoints > 0 {
                    tracing::warn!(
                        affiliates,
                        endpoints,
                        "deleted keys whose etcd leases outlived their expiry; etcd restarts every lease's \
                         TTL when its leader changes unless it runs with lease checkpointing"
                    );
                }
                etcd.state().retire_empty()
            }
        };
        metrics.gc_runs.inc();
        metrics.gc_clusters.inc_by(r.removed_clusters as u64);
        metrics.gc_affiliates.inc_by(r.removed_affiliates as u64);
        macro_rules! gc_log {
            ($level:ident) => {
                tracing::$level!(
                    removed_clusters = r.removed_clusters,
                    removed_affiliates = r.removed_affiliates,
                    current_clusters = r.clusters,
                    current_affiliates = r.affiliates,
                    current_endpoints = r.endpoints,
                    current_subscriptions = r.subscriptions,
                    "garbage collection run"
                )
            };
        }
        if r.removed_clusters > 0 || r.removed_affiliates > 0 {
            gc_log!(info);
        } else {
            gc_log!(debug);
        }
    }
}

async fn limiter_gc_loop(limiter: Arc<IpRateLimiter>, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(IP_RATE_GARBAGE_COLLECTION_PERIOD);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => limiter.collect(Instant::now()),
        }
    }
}

/// Binds `addr`, or nothing when it is empty (the listener is disabled).
async fn bind_optional(addr: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    if addr.is_empty() {
        return Ok(None);
    }
    let listener = serve::bind(addr)
        .await
        .with_context(|| format!("failed to listen on {addr}"))?;
    Ok(Some(listener))
}

impl Server {
    /// Loads the snapshot, binds every listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let state = State::new();
        let on_etcd = config.state_backend == StateBackend::Etcd;
        // etcd is the durable copy: no snapshot files beside it.
        let snapshots = config.snapshots_enabled && !on_etcd;
        if on_etcd && config.snapshots_enabled {
            tracing::info!("snapshots are off with --state-backend etcd: etcd holds the state");
        }
        let metrics = Arc::new(Metrics::new(state.clone(), snapshots));
        let serving = CancellationToken::new();
        let background = CancellationToken::new();
        // If start-up fails after this, the loops already started stop.
        let stop_on_error = background.clone().drop_guard();
        let mut loops = Vec::new();

        let backend = if on_etcd {
            let (etcd, mirror) = EtcdState::start(
                &config.etcd_options(),
                &config.etcd_prefix,
                state.clone(),
                background.clone(),
            )
            .await?;
            loops.push(mirror);
            metrics.register_etcd(etcd.clone());
            Backend::Etcd(etcd)
        } else {
            Backend::Memory(state.clone())
        };

        let storage = if snapshots {
            let storage = Arc::new(Storage::new(
                &config.snapshot_path,
                state.clone(),
                metrics.clone(),
            ));
            let s = storage.clone();
            tokio::task::spawn_blocking(move || s.load())
                .await
                .context("snapshot load task")?;
            Some(storage)
        } else {
            None
        };

        let tls = if config.tls_enabled() {
            let cert = ReloadingCert::new(&config.certificate_path, &config.key_path)?;
            let acceptor = TlsAcceptor::from(tls::server_config(cert.clone())?);
            loops.push(tokio::spawn(
                cert.watch(TLS_RELOAD_POLL, background.clone()),
            ));
            Some(acceptor)
        } else {
            None
        };

        let grpc_listener = serve::bind(&config.addr)
            .await
            .with_context(|| format!("failed to listen on {}", config.addr))?;
        let landing_listener = bind_optional(&config.landing_addr).await?;
        let metrics_listener = bind_optional(&config.metrics_addr).await?;

        let limiter = Arc::new(IpRateLimiter::new(Rate {
            per_second: config.rate_limit_per_second,
            burst: config.rate_limit_burst,
        }));
        let observer = Arc::new(Observer {
            metrics: metrics.clone(),
            limiter: limiter.clone(),
            trust: Trust {
                x_real_ip: config.trust_x_real_ip,
                first_x_forwarded_for: config.trust_first_x_forwarded_for,
            },
        });
        let options = Options {
            redirect_endpoint: Some(config.redirect_endpoint.clone()).filter(|e| !e.is_empty()),
            disable_client_ip_reporting: config.disable_client_ip_reporting,
        };
        let service = ClusterService::new(backend.clone(), observer, options, serving.clone());
        let landing = Arc::new(Landing::new(backend.clone(), !config.disable_inspect));

        let grpc_addr = grpc_listener.local_addr()?;
        let landing_addr = landing_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;
        let metrics_addr = metrics_listener
            .as_ref()
            .map(|l| l.local_addr())
            .transpose()?;

        let mut servers = Vec::new();
        let mut spawn = |name: &'static str,
                         l: tokio::net::TcpListener,
                         tls: Option<TlsAcceptor>,
                         h: Handler| {
            tracing::info!(server = name, address = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(), "listening");
            servers.push(tokio::spawn(serve::serve(name, l, tls, h, serving.clone())));
        };
        spawn(
            "grpc",
            grpc_listener,
            tls,
            crate::http::main_handler(ClusterServer::new(service), landing.clone()),
        );
        if let Some(l) = landing_listener {
            spawn("landing", l, None, crate::http::landing_handler(landing));
        }
        if let Some(l) = metrics_listener {
            spawn(
                "metrics",
                l,
                None,
                crate::http::metrics_handler(metrics.clone()),
            );
        }

        loops.push(tokio::spawn(gc_loop(
            backend.clone(),
            metrics.clone(),
            config.gc_interval,
            background.clone(),
        )));
        loops.push(tokio::spawn(limiter_gc_loop(limiter, background.clone())));
        if let Some(s) = &storage {
            loops.push(tokio::spawn(
                s.clone().run(config.snapshot_interval, background.clone()),
            ));
        }

        stop_on_error.disarm();
        Ok(Self {
            grpc_addr,
            landing_addr,
            metrics_addr,
            state,
            metrics,
            storage,
            serving,
            background,
            servers,
            loops,
        })
    }

    /// Saves a snapshot now (tests; the periodic loop does this in production).
    pub async fn save_now(&self) -> anyhow::Result<()> {
        let Some(s) = self.storage.clone() else {
            anyhow::bail!("snapshots are disabled");
        };
        tokio::task::spawn_blocking(move || s.save()).await??;
        Ok(())
    }

    /// Graceful shutdown: listeners close, watch streams end with OK, connections get
    /// their grace period, loops stop, then the final snapshot is written. An error
    /// means the final save failed, and the process should exit non-zero.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.serving.cancel();
        for s in self.servers {
            let _ = s.await;
        }
        self.background.cancel();
        for l in self.loops {
            let _ = l.await;
        }
        let Some(storage) = self.storage else {
            return Ok(());
        };
        let save = tokio::task::spawn_blocking(move || storage.save());
        match tokio::time::timeout(FINAL_SAVE_TIMEOUT, save).await {
            Ok(Ok(Ok(_))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow::Error::new(e).context("final snapshot failed")),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context("final snapshot task failed")),
            Err(_) => anyhow::bail!("final snapshot timed out"),
        }
    }
}
