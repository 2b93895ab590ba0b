//! Compiles `pixfarm.proto` with the pure-Rust `protox`, so building pixfarm
//! needs no `protoc`, and writes the file descriptor set that the coordinator
//! serves through gRPC reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=pixfarm.proto");
    let fds = protox::compile(["pixfarm.proto"], ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("pixfarm_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
