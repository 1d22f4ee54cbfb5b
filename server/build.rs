//! Compiles the `.proto` files with protox (pure Rust, no system protoc): our own, and
//! etcd's v3 API (`proto/etcd`, vendored from etcd with its gogoproto annotations
//! commented out) for the etcd state backend's client.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: checkouts sharing a
    // target directory (CI clones) can reuse one compiled script, which then read
    // another checkout's files.
    let root = format!("{}/../proto", std::env::var("CARGO_MANIFEST_DIR")?);
    let files = [
        "sidero/discovery/server/cluster.proto",
        "sidero/discovery/storage/discovery.proto",
    ];
    let fds = protox::compile(files, [&root])?;
    tonic_prost_build::configure()
        // `bytes::Bytes` fields let watch fan-out share payloads instead of copying them.
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={root}/{f}");
    }

    let etcd_root = format!("{root}/etcd");
    let etcd_files = ["rpc.proto", "kv.proto", "auth.proto"];
    let fds = protox::compile(etcd_files, [&etcd_root])?;
    tonic_prost_build::configure()
        .bytes(".")
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    for f in etcd_files {
        println!("cargo:rerun-if-changed={etcd_root}/{f}");
    }
    Ok(())
}
