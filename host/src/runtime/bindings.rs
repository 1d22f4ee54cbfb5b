//! Host bindings for `discovery:registry@0.1.0`, generated from `wit/`.
//!
//! Every import is async (it may wait, like `next-event`) and trappable (the host
//! can end a plugin that breaks the contract).

wasmtime::component::bindgen!({
    path: "../wit",
    world: "registry-plugin",
    imports: { default: async | trappable },
    exports: { default: async },
});

pub use discovery::registry::{cluster_crypto, host, types};
