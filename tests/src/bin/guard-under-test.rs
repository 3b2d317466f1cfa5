//! The etcd-guard command line, built inside the test crate so that its tests can run the proxy as a separate
//! process (to send it signals) without depending on the build order of the workspace.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    etcd_guard::cli::main()
}
