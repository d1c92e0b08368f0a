//! Compiles the client side of dpud's control API (`engine/proto`) with protoc (Debian
//! package protobuf-compiler), so that dpuctl does not link the engine.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../engine/proto");
    if let Err(e) = tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_protos(
            &[
                "../engine/proto/dpu/control/v1/control.proto",
                "../engine/proto/dpu/control/v1/network.proto",
            ],
            &["../engine/proto"],
        )
    {
        panic!(
            "compiling engine/proto/dpu/control/v1/control.proto failed: {e}\n\
             protoc comes from the Debian package protobuf-compiler (scripts/install-deps.sh installs it)"
        );
    }
}
