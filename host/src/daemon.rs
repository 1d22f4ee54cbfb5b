//! `discoveryd run`: wires identity, store, local affiliate, plugins, merge and the
//! local API together, and takes them down in order on SIGTERM or SIGINT.
//!
//! Everything that can be wrong with the config (including a plugin that does not
//! compile, does not match our API or clashes with another's prefix) fails here,
//! before any plugin runs or the socket opens.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::{Result, anyhow, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::api::server::{self as api_server, LocalApi};
use crate::config::Config;
use crate::first_seen;
use crate::identity;
use crate::limits;
use crate::local_affiliate::{self, System};
use crate::public_addresses::PublicAddresses;
use crate::reconcile;
use crate::runtime::{self, PluginEngine, PluginStatuses, RunState, SharedContext, plugin_thread};
use crate::specs::IdentitySpec;
use crate::store::{Namespace, Spec, Store};

pub async fn run(config: Config) -> Result<()> {
    // First, so a stop request during start-up is handled, not fatal.
    let mut signals = Signals::install()?;
    // Whatever the daemon creates (identity, socket, compile cache) is private.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let state_dir = &config.node.state_dir;
    crate::private_dir::ensure(state_dir)?;
    let (node_id, origin) = identity::load_or_create(state_dir)?;
    tracing::info!(node_id = %node_id, created = origin == identity::Origin::Created, "node identity established");

    let store = Store::new();
    let first_seen = first_seen::restore(&store, state_dir);
    store.put(
        Namespace::Cluster,
        "local",
        Spec::Identity(IdentitySpec {
            node_id: node_id.clone(),
        }),
    );
    let shutdown = CancellationToken::new();
    // The first local affiliate exists before any plugin asks for it.
    let (local_tx, local_rx) = watch::channel(None);
    local_affiliate::publish(
        &local_tx,
        config
            .discovery_enabled
            .then(|| local_affiliate::build(&config.node, &node_id, &System::read(), &[])),
    );

    let statuses = Arc::new(PluginStatuses::default());
    let leaving = Arc::new(AtomicBool::new(false));
    let public_addresses = Arc::new(PublicAddresses::default());
    let shared = SharedContext {
        store: store.clone(),
        local: local_rx.clone(),
        node_id: node_id.clone(),
        statuses: statuses.clone(),
        shutdown: shutdown.clone(),
        leaving: leaving.clone(),
        public_addresses: public_addresses.clone(),
    };
    let engine = Arc::new(PluginEngine::new(&state_dir.join(limits::CACHE_DIR_NAME))?);
    let prepared = prepare_plugins(&config, &engine, &shared).await?;
    engine.prune_cache(prepared.iter().map(|p| p.loaded.cache_file.as_path()));
    let listener = api_server::bind(&config.socket_path()).await?;

    let mut tasks = JoinSet::new();
    tasks.spawn(local_affiliate::run(
        config.node.clone(),
        node_id.clone(),
        config.discovery_enabled,
        public_addresses.subscribe(),
        local_tx,
        shutdown.clone(),
    ));
    tasks.spawn(crate::public_addresses::run(
        store.clone(),
        public_addresses.subscribe(),
        shutdown.clone(),
    ));
    tasks.spawn(reconcile::run(
        store.clone(),
        node_id.clone(),
        local_rx,
        shutdown.clone(),
    ));
    tasks.spawn(first_seen::run(store.clone(), first_seen, shutdown.clone()));
    let mut plugin_threads = Vec::new();
    for plugin in prepared {
        let ctx = shared.context(&plugin.config, Some(&plugin.prefix));
        let (engine, name) = (engine.clone(), plugin.config.name.clone());
        plugin_threads.push(plugin_thread::spawn(&name, move || {
            runtime::supervise(engine, plugin, ctx)
        })?);
    }
    let stop = CancellationToken::new();
    let api = LocalApi {
        store: store.clone(),
        statuses,
        shutdown: shutdown.clone(),
        leaving,
        stop: stop.clone(),
    };
    let socket = config.socket_path();
    let mut api_task = tokio::spawn(api_server::serve(listener, api));
    tracing::info!(socket = %socket.display(), plugins = plugin_threads.len(), "discoveryd running");

    // Every task runs until shutdown; one that ends earlier is a failure.
    let outcome = tokio::select! {
        _ = signals.recv() => Ok(()),
        _ = stop.cancelled() => Ok(()),
        ended = tasks.join_next() => Err(anyhow!("an internal task ended unexpectedly: {ended:?}")),
        ended = &mut api_task => Err(match ended {
            Ok(Err(e)) => e.context("the local API failed"),
            other => anyhow!("the local API ended unexpectedly: {other:?}"),
        }),
    };
    match &outcome {
        Ok(()) => tracing::info!("stopping"),
        Err(e) => tracing::error!("stopping: {e:#}"),
    }
    shutdown.cancel();
    // Plugins get a bounded time to stop; one that does not is abandoned, so a
    // stop takes seconds whatever the plugins do.
    let deadline = tokio::time::Instant::now() + limits::PLUGIN_STOP_DEADLINE;
    for thread in plugin_threads {
        thread
            .join(deadline.saturating_duration_since(tokio::time::Instant::now()))
            .await;
    }
    while tasks.join_next().await.is_some() {}
    if !api_task.is_finished() {
        let _ = api_task.await;
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    outcome
}

/// Loads every enabled plugin and learns its prefix; registers the disabled ones
/// so `discoveryd plugins` lists them too.
async fn prepare_plugins(
    config: &Config,
    engine: &Arc<PluginEngine>,
    shared: &SharedContext,
) -> Result<Vec<runtime::PreparedPlugin>> {
    let mut prepared = Vec::new();
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    for plugin in config.enabled_plugins() {
        // The probe context has no prefix, so nothing can be published through it.
        let probe = shared.context(plugin, None);
        let ready = runtime::prepare(engine, plugin, probe).await?;
        if let Some(other) = prefixes.insert(ready.prefix.clone(), plugin.name.clone()) {
            bail!(
                "plugins.{}.prefix: {:?} is already the prefix of plugin {other:?}; give one of them another prefix",
                plugin.name,
                ready.prefix
            );
        }
        tracing::info!(plugin = %plugin.name, prefix = %ready.prefix, cached = ready.loaded.cached, "plugin loaded");
        shared.statuses.register(&plugin.name, &ready.prefix);
        prepared.push(ready);
    }
    for plugin in config.plugins.values() {
        if !(config.discovery_enabled && plugin.enabled) {
            shared
                .statuses
                .register(&plugin.name, plugin.prefix.as_deref().unwrap_or(""));
            shared
                .statuses
                .update(&plugin.name, |s| s.state = RunState::Disabled);
        }
    }
    Ok(prepared)
}

/// SIGTERM and SIGINT, caught from the moment they are installed.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}
