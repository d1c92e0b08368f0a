//! Links Intel ISA-L (Debian package libisal-dev), used by `engine::pipeline` for
//! Reed-Solomon coding and crc32c, and compiles the control API's protobuf definitions
//! (`proto/`) with protoc (Debian package protobuf-compiler).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=dylib=isal");

    println!("cargo:rerun-if-changed=proto");
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_protos(
            &[
                "proto/dpu/control/v1/control.proto",
                "proto/dpu/control/v1/network.proto",
            ],
            &["proto"],
        )
    {
        panic!(
            "compiling proto/dpu/control/v1/control.proto failed: {e}\n\
             protoc comes from the Debian package protobuf-compiler (scripts/install-deps.sh installs it)"
        );
    }
}
