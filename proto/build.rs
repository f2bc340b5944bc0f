//! Generates the Rust types for `ratify.v1` with protox (pure Rust), so building needs no
//! system `protoc`. The encoded descriptor set is also written out for gRPC reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // compile_fds does not emit rerun-if-changed itself.
    println!("cargo:rerun-if-changed=proto");
    let files = [
        "proto/ratify/v1/participant.proto",
        "proto/ratify/v1/coordinator.proto",
        "proto/ratify/v1/admin.proto",
        "proto/ratify/v1/kv.proto",
        "proto/ratify/v1/wal.proto",
        "proto/ratify/v1/echo.proto",
    ];
    let fds = protox::compile(files, ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("ratify_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
