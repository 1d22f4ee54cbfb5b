//! The one wasmtime engine of the daemon: its configuration, the epoch ticker
//! behind CPU deadlines, and the on-disk cache of compiled components.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine};

use super::api_version;
use super::state::PluginState;
use super::wit::PluginPre;
use crate::builtin_plugins;
use crate::capabilities::{self, Capability};
use crate::config::PluginSource;
use crate::limits;

/// A compiled plugin ready to be instantiated any number of times.
pub struct LoadedPlugin {
    pub pre: PluginPre,
    /// The capabilities it declares it cannot work without.
    pub needs: Vec<Capability>,
    /// Whether the compile cache had it.
    pub cached: bool,
    /// Its entry in the compile cache.
    pub cache_file: PathBuf,
}

pub struct PluginEngine {
    engine: Engine,
    linker: Linker<PluginState>,
    cache_dir: PathBuf,
}

impl PluginEngine {
    /// Builds the engine and starts its epoch ticker. Compiled components are
    /// cached in `cache_dir`, which must be private to this user: its files are
    /// loaded as native code.
    pub fn new(cache_dir: &Path) -> Result<PluginEngine> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        // No component-model async yet: synchronous WIT calls are cheaper.
        config.concurrency_support(false);
        let engine = Engine::new(&config)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        capabilities::files::add_to_linker(&mut linker)?;
        super::wit::add_to_linker(&mut linker)?;
        spawn_epoch_ticker(&engine);
        crate::private_dir::ensure(cache_dir)?;
        Ok(PluginEngine {
            engine,
            linker,
            cache_dir: cache_dir.to_path_buf(),
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Reads, checks, compiles (or loads from the cache) and type-checks a plugin.
    pub fn load(&self, source: &PluginSource) -> Result<LoadedPlugin> {
        let file;
        let wasm: &[u8] = match source {
            PluginSource::File(path) => {
                file = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                &file
            }
            PluginSource::BuiltIn(name) => builtin_plugins::wasm(name)
                .ok_or_else(|| anyhow::anyhow!("no built-in plugin is named {name:?}"))?,
        };
        api_version::check(wasm)?;
        let needs = capabilities::needs::declared(wasm)?;
        let cache_file = self
            .cache_dir
            .join(format!("{}.cwasm", cache_key(&self.engine, wasm)));
        let (component, cached) = self.compile_cached(wasm, source, &cache_file)?;
        Ok(LoadedPlugin {
            pre: PluginPre::new(&self.linker, &component)?,
            needs,
            cached,
            cache_file,
        })
    }

    /// Deletes cached artifacts other than `keep` (plugins no longer configured,
    /// or built by an older daemon).
    pub fn prune_cache<'a>(&self, keep: impl IntoIterator<Item = &'a Path>) {
        let keep: std::collections::HashSet<&Path> = keep.into_iter().collect();
        let Ok(entries) = fs::read_dir(&self.cache_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "cwasm") && !keep.contains(path.as_path()) {
                match fs::remove_file(&path) {
                    Ok(()) => {
                        tracing::info!(cache = %path.display(), "removed unused compiled plugin")
                    }
                    Err(e) => {
                        tracing::warn!(cache = %path.display(), "cannot remove unused compiled plugin: {e}")
                    }
                }
            }
        }
    }

    /// Compiles `wasm`, or loads the artifact a previous run left in the cache.
    /// The key covers the exact bytes and everything that makes an artifact
    /// incompatible (wasmtime version, compiler settings, CPU features).
    fn compile_cached(
        &self,
        wasm: &[u8],
        source: &PluginSource,
        path: &Path,
    ) -> Result<(Component, bool)> {
        if path.is_file() {
            // SAFETY: only this daemon writes the cache, a directory checked to be
            // owned by this user and writable by nobody else, under a key that
            // includes the engine's compatibility hash.
            match unsafe { Component::deserialize_file(&self.engine, path) } {
                Ok(component) => return Ok((component, true)),
                Err(e) => {
                    tracing::warn!(cache = %path.display(), "ignoring unusable cached plugin: {e:#}")
                }
            }
        }
        let started = Instant::now();
        let compiled = self.engine.precompile_component(wasm)?;
        tracing::info!(plugin = %source, elapsed = ?started.elapsed(), "compiled plugin");
        if let Err(e) = write_atomically(path, &compiled) {
            tracing::warn!(cache = %path.display(), "cannot cache compiled plugin: {e:#}");
        }
        // SAFETY: `compiled` was produced by this engine just now.
        let component = unsafe { Component::deserialize(&self.engine, &compiled)? };
        Ok((component, false))
    }
}

/// Names a compiled artifact by the wasm's SHA-256 and the engine's compatibility
/// hash, both fed through SHA-256 so the name is stable across Rust releases.
fn cache_key(engine: &Engine, wasm: &[u8]) -> String {
    /// Feeds what a `Hash` impl writes into SHA-256.
    struct Sha256Hasher(Sha256);
    impl Hasher for Sha256Hasher {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        /// Unused: only the digest is read.
        fn finish(&self) -> u64 {
            0
        }
    }
    let mut compat = Sha256Hasher(Sha256::new());
    engine.precompile_compatibility_hash().hash(&mut compat);
    let compat = compat.0.finalize();
    let digest = Sha256::digest(wasm);
    format!(
        "{}-{}",
        hex::encode(&digest[..16]),
        hex::encode(&compat[..8])
    )
}

/// Bumps the epoch every tick for as long as the engine lives.
fn spawn_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(limits::EPOCH_TICK);
            }
        })
        .expect("spawning the epoch thread");
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_key_follows_the_bytes_and_the_engine_settings() {
        let engine = Engine::default();
        let key = cache_key(&engine, b"wasm");
        assert_eq!(key, cache_key(&engine, b"wasm"), "stable");
        assert_eq!(key, cache_key(&Engine::default(), b"wasm"), "same settings");
        assert_ne!(key, cache_key(&engine, b"wasm2"));
        let mut fuel = Config::new();
        fuel.consume_fuel(true);
        let other = Engine::new(&fuel).unwrap();
        assert_ne!(key, cache_key(&other, b"wasm"), "incompatible engine");
        assert_eq!(key.len(), 32 + 1 + 16);
    }
}
