//! Generates the message types (and the admin API's gRPC service) from `proto/*.proto` with protox (a pure-Rust
//! protobuf parser), so building needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/peer.proto", "proto/admin.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let peer = protox::compile(["proto/peer.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(peer)?;
    let admin = protox::compile(["proto/admin.proto"], ["proto"])?;
    tonic_prost_build::configure().build_transport(false).compile_fds(admin)?;
    Ok(())
}
