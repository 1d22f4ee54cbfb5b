//! The plugin ABI, one module per version of our WIT package, as Zed's extension
//! host does. Each module holds that version's generated bindings, its host trait
//! implementations and its conversions; the rest of the daemon sees our own types
//! and the version-independent [`PluginPre`] and [`PluginInstance`] here. Adding a
//! version means adding a module and a variant, not editing host functions.

pub mod since_v0_1_0;

use wasmtime::Store;
use wasmtime::component::{Component, Linker};

use super::state::PluginState;

/// What a registry plugin says about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegistryInfo {
    pub prefix: String,
}

/// Adds every version's host interfaces to the linker.
pub fn add_to_linker(linker: &mut Linker<PluginState>) -> wasmtime::Result<()> {
    since_v0_1_0::add_to_linker(linker)
}

/// A type-checked plugin, ready to instantiate any number of times.
pub enum PluginPre {
    V0_1_0(since_v0_1_0::RegistryPluginPre<PluginState>),
}

impl PluginPre {
    /// Type-checks `component` against our WIT package. There is one version so
    /// far; with more, the version its imports name (see `api_version`) picks the
    /// module.
    pub fn new(linker: &Linker<PluginState>, component: &Component) -> wasmtime::Result<PluginPre> {
        let pre = linker.instantiate_pre(component)?;
        Ok(PluginPre::V0_1_0(since_v0_1_0::RegistryPluginPre::new(
            pre,
        )?))
    }

    pub async fn instantiate(
        &self,
        store: &mut Store<PluginState>,
    ) -> wasmtime::Result<PluginInstance> {
        match self {
            PluginPre::V0_1_0(pre) => {
                Ok(PluginInstance::V0_1_0(pre.instantiate_async(store).await?))
            }
        }
    }
}

/// One instance of a plugin.
pub enum PluginInstance {
    V0_1_0(since_v0_1_0::RegistryPlugin),
}

impl PluginInstance {
    pub async fn describe(
        &self,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<RegistryInfo, String>> {
        match self {
            PluginInstance::V0_1_0(plugin) => since_v0_1_0::describe(plugin, store, config).await,
        }
    }

    pub async fn run(
        &self,
        store: &mut Store<PluginState>,
        config: &str,
    ) -> wasmtime::Result<Result<(), String>> {
        match self {
            PluginInstance::V0_1_0(plugin) => {
                plugin
                    .discovery_registry_registry()
                    .call_run(store, config)
                    .await
            }
        }
    }
}
