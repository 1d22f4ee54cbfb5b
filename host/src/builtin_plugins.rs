//! The stock registry plugins, built into the daemon so that a stock Talos block
//! (`registries: {service: {}}`) works as written: `service` (a Sidero-compatible
//! discovery service), `kubernetes` (Talos's Node annotations) and `static` (a
//! peers file). `plugins.<name>.path` overrides one. `build.rs` embeds what
//! `scripts/setup` built.

/// The registries that have a built-in plugin.
pub const NAMES: [&str; 3] = ["kubernetes", "service", "static"];

/// The component of a built-in plugin.
pub fn wasm(name: &str) -> Option<&'static [u8]> {
    match name {
        "kubernetes" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/kubernetes.wasm"))),
        "service" => Some(include_bytes!(concat!(env!("OUT_DIR"), "/service.wasm"))),
        "static" => Some(include_bytes!(concat!(
            env!("OUT_DIR"),
            "/static-file.wasm"
        ))),
        _ => None,
    }
}

pub fn is_builtin(name: &str) -> bool {
    NAMES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_builtin_is_a_component() {
        for name in NAMES {
            let wasm = wasm(name).unwrap();
            assert!(wasmparser::Parser::is_component(wasm), "{name}");
        }
        assert!(wasm("etcd").is_none());
    }
}
