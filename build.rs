//! Generates the peer link's and the intercluster link's gRPC code (proto/peer.proto,
//! proto/intercluster.proto) for the `cluster` feature only: a single-node build needs no protoc.

fn main() {
    println!("cargo:rerun-if-changed=proto/peer.proto");
    println!("cargo:rerun-if-changed=proto/intercluster.proto");
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "cluster")]
    {
        // Two passes: the intercluster link, which carries the peer link's envelopes as the
        // same Rust type (not a second copy of them), then the peer link. In that order: the
        // first pass also writes the peer package's file (its service, without the messages
        // it takes from outside), which the second pass replaces with the whole package.
        let intercluster = tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .extern_path(".legate.peer.v1", "crate::cluster::peer::proto")
            .compile_protos(&["proto/intercluster.proto"], &["proto"]);
        let both = intercluster.and_then(|()| {
            tonic_prost_build::configure()
                .build_client(true)
                .build_server(true)
                .compile_protos(&["proto/peer.proto"], &["proto"])
        });
        if let Err(e) = both {
            // protoc missing is the usual cause; say which package has it.
            panic!(
                "cannot generate the gRPC code from proto/*.proto: {e} \
                 (the `cluster` feature needs protoc: apt-get install protobuf-compiler)"
            );
        }
    }
}
