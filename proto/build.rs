//! Generates the message types from `proto/*.proto` with protox (a pure-Rust protobuf parser), so building needs
//! no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/peer.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
