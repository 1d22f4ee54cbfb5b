//! `discoveryd run`: wires identity, store, local affiliate, plugins, merge and the
//! local API together, and takes them down in order on SIGTERM or SIGINT.
//!
//! Everything that can be wrong with the config (including a plugin that does not
//! compile, does not match our API or clashes with another's prefix) fails here,
//! before any plugin runs or the socket opens.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::affiliate::{AffiliateSpec, IdentitySpec};
use crate::api::server::{self as api_server, LocalApi};
use crate::config::Config;
use crate::crypto::ClusterKey;
use crate::identity;
use crate::limits;
use crate::local_affiliate::{self, System};
use crate::reconcile;
use crate::runtime::{self, PluginContext, PluginEngine, PluginStatuses, RunState};
use crate::store::{Namespace, Spec, Store};

pub async fn run(config: Config) -> Result<()> {
    let state_dir = &config.node.state_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state dir {}", state_dir.display()))?;
    let (node_id, origin) = identity::load_or_create(state_dir)?;
    tracing::info!(node_id = %node_id, created = origin == identity::Origin::Created, "node identity established");

    let store = Store::new();
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
        &store,
        &node_id,
        &local_tx,
        config
            .discovery_enabled
            .then(|| local_affiliate::build(&config.node, &node_id, &System::read())),
    );

    let statuses = Arc::new(PluginStatuses::default());
    let shared = SharedContext {
        store: store.clone(),
        local: local_rx.clone(),
        node_id: node_id.clone(),
        cluster_id: config.cluster.as_ref().map(|c| c.id.clone()),
        key: match &config.cluster {
            Some(cluster) => Some(Arc::new(ClusterKey::from_bytes(&cluster.key)?)),
            None => None,
        },
        statuses: statuses.clone(),
        shutdown: shutdown.clone(),
    };
    let engine = Arc::new(PluginEngine::new(&state_dir.join(limits::CACHE_DIR_NAME))?);
    let prepared = prepare_plugins(&config, &engine, &shared).await?;
    let listener = api_server::bind(&config.socket_path()).await?;

    let mut tasks = JoinSet::new();
    tasks.spawn(local_affiliate::run(
        config.node.clone(),
        node_id.clone(),
        config.discovery_enabled,
        store.clone(),
        local_tx,
        shutdown.clone(),
    ));
    tasks.spawn(reconcile::run(
        store.clone(),
        node_id.clone(),
        local_rx,
        shutdown.clone(),
    ));
    for plugin in prepared {
        let ctx = shared.context(&plugin.config.name, &plugin.prefix);
        tasks.spawn(runtime::supervise(engine.clone(), plugin, ctx));
    }
    let api = LocalApi {
        store: store.clone(),
        statuses,
        shutdown: shutdown.clone(),
    };
    let socket = config.socket_path();
    let api_task = tokio::spawn(api_server::serve(listener, api));
    tracing::info!(socket = %socket.display(), plugins = tasks.len() - 2, "discoveryd running");

    wait_for_signal().await?;
    tracing::info!("stopping");
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    if let Ok(Err(e)) = api_task.await {
        tracing::warn!("local API ended with an error: {e:#}");
    }
    let _ = std::fs::remove_file(&socket);
    tracing::info!("stopped");
    Ok(())
}

/// What every plugin context shares.
struct SharedContext {
    store: Arc<Store>,
    local: watch::Receiver<Option<AffiliateSpec>>,
    node_id: String,
    cluster_id: Option<String>,
    key: Option<Arc<ClusterKey>>,
    statuses: Arc<PluginStatuses>,
    shutdown: CancellationToken,
}

impl SharedContext {
    fn context(&self, name: &str, prefix: &str) -> Arc<PluginContext> {
        Arc::new(PluginContext {
            name: name.to_string(),
            prefix: prefix.to_string(),
            store: self.store.clone(),
            local: self.local.clone(),
            local_node_id: self.node_id.clone(),
            cluster_id: self.cluster_id.clone(),
            key: self.key.clone(),
            statuses: self.statuses.clone(),
            shutdown: self.shutdown.clone(),
        })
    }
}

/// Loads every enabled plugin and learns its prefix; registers the disabled ones
/// so `discoveryd plugins` lists them too.
async fn prepare_plugins(
    config: &Config,
    engine: &PluginEngine,
    shared: &SharedContext,
) -> Result<Vec<runtime::PreparedPlugin>> {
    let mut prepared = Vec::new();
    let mut prefixes: BTreeMap<String, String> = BTreeMap::new();
    for plugin in config.enabled_plugins() {
        // The probe context has no prefix, so nothing can be published through it.
        let probe = shared.context(&plugin.name, "");
        let ready = runtime::prepare(engine, plugin, probe)
            .await
            .with_context(|| format!("plugins.{}: {}", plugin.name, plugin.path.display()))?;
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

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
