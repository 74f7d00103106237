use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a crate, so a fresh machine needs nothing installed.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("rws_descriptor.bin"))
        .compile_protos(
            &[
                "proto/rws/v1/inference.proto",
                "proto/rws/v1/admin.proto",
                "proto/rws/v1/events.proto",
                "proto/inference/grpc_service.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
