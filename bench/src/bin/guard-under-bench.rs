//! The etcd-guard command line, built inside the benchmark's package so that its smoke test can start the proxy
//! as a separate process without depending on the build order of the workspace (as `tests/`'s
//! `guard-under-test`). Use `target/release/etcd-guard` for measurements.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    etcd_guard::cli::main()
}
