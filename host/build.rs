//! Compiles the local API and the Sidero payload protos with protox (no protoc
//! needed on the build machine).

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
    Ok(())
}
