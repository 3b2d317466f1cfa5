//! `etcd-guard audit verify`: check the hash chain and `seq` across files.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `etcd-guard audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Audit files, or folders holding them (default: the current folder).
    pub paths: Vec<PathBuf>,
}

/// Run `audit verify`.
pub fn run(_args: VerifyArgs) -> ExitCode {
    eprintln!("etcd-guard: audit verify is not implemented yet");
    ExitCode::from(2)
}
