//! Compiles the local API and the Sidero payload protos with protox (no protoc
//! needed on the build machine), and embeds the built-in plugins that
//! `scripts/setup` built to `target/plugins/`.

use std::path::{Path, PathBuf};

/// Built-in plugins: the file `scripts/setup` writes, by the name it is embedded as.
const BUILTINS: [&str; 3] = ["kubernetes.wasm", "service.wasm", "static-file.wasm"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["../proto/discoveryd/v1/local.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["../proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    embed_builtin_plugins()
}

fn embed_builtin_plugins() -> Result<(), Box<dyn std::error::Error>> {
    let built = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/plugins");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    for name in BUILTINS {
        let source = built.join(name);
        println!("cargo:rerun-if-changed={}", source.display());
        if !source.is_file() {
            return Err(format!(
                "{} is missing: the daemon embeds its built-in plugins; run ./scripts/setup \
                 first (it builds them), then build again",
                source.display()
            )
            .into());
        }
        std::fs::copy(&source, out.join(name))?;
    }
    Ok(())
}
