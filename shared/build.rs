//! Generates the `agentrun.v1` Rust types and tonic stubs from `proto/`.
//! protoc comes from `protoc-bin-vendored`, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Read when the script runs, not baked in when it is compiled: a build script binary
    // shared by two checkouts of the workspace must read each one's own `proto/`.
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files: Vec<PathBuf> = std::fs::read_dir(proto_root.join("agentrun/v1"))?
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    // SAFETY: build scripts are single-threaded, so setting the variable is sound.
    unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };

    let descriptor = PathBuf::from(std::env::var("OUT_DIR")?).join("agentrun_v1_descriptor.bin");
    tonic_prost_build::configure()
        // The contract has an RPC named `Connect`, whose client method would clash with the
        // generated `connect` constructor; clients are built with `XClient::new(channel)`.
        .build_transport(false)
        // prost's encoding; a request that does not decode is INVALID_ARGUMENT, not INTERNAL.
        .codec_path("crate::codec::ProtoCodec")
        // An assignment carries a whole run (680 bytes inline): boxed, every other message
        // to a runner (acks, heartbeat answers) is not moved around at its size.
        .boxed(".agentrun.v1.ManagerMessage.body.assignment")
        .file_descriptor_set_path(descriptor)
        .compile_protos(&files, std::slice::from_ref(&proto_root))?;
    println!("cargo:rerun-if-changed={}", proto_root.display());
    Ok(())
}
