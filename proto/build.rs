//! Compiles etcd's .proto files with a pure-Rust compiler (protox): a fresh machine needs no `protoc`.

use std::path::PathBuf;

const FILES: &[&str] = &[
    "etcd/mvccpb/kv.proto",
    "etcd/authpb/auth.proto",
    "etcd/etcdserverpb/rpc.proto",
    "etcd/v3lockpb/v3lock.proto",
    "etcd/v3electionpb/v3election.proto",
    "grpc/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let files: Vec<PathBuf> = FILES.iter().map(|f| root.join(f)).collect();
    let fds = protox::compile(&files, [&root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Decoded as etcd decodes them (a `oneof` message field sent twice: the last wins whole): src/last_wins.rs.
        .extern_path(".etcdserverpb.RequestOp", "crate::etcdserverpb::RequestOp")
        .extern_path(".etcdserverpb.WatchRequest", "crate::etcdserverpb::WatchRequest")
        .compile_fds(fds)?;
    Ok(())
}
