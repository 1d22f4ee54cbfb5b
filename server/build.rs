//! Compiles our own `.proto` files with protox (pure Rust, no system protoc).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../proto");
    let files = [
        "sidero/discovery/server/cluster.proto",
        "sidero/discovery/storage/discovery.proto",
    ];
    let fds = protox::compile(files, [root])?;
    tonic_prost_build::configure()
        // `bytes::Bytes` fields let watch fan-out share payloads instead of copying them.
        .bytes(".")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    for f in files {
        println!("cargo:rerun-if-changed={root}/{f}");
    }
    Ok(())
}
