//! Generates the peer link's and the intercluster link's gRPC code (proto/peer.proto,
//! proto/intercluster.proto) for the `cluster` feature only: a single-node build needs no protoc.

fn main() {
    println!("cargo:rerun-if-changed=proto/peer.proto");
    println!("cargo:rerun-if-changed=proto/intercluster.proto");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cluster")]
    if let Err(e) = tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &["proto/peer.proto", "proto/intercluster.proto"],
            &["proto"],
        )
    {
        // protoc missing is the usual cause; say which package has it.
        panic!(
            "cannot generate the gRPC code from proto/*.proto: {e} \
             (the `cluster` feature needs protoc: apt-get install protobuf-compiler)"
        );
    }
}
