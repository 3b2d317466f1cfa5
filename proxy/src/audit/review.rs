//! `etcd-guard audit review`: filter, print and summarise audit records.

use std::path::PathBuf;
use std::process::ExitCode;

/// Arguments of `etcd-guard audit review`.
#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    /// Audit files, or folders holding them (default: the current folder).
    pub paths: Vec<PathBuf>,
}

/// Run `audit review`.
pub fn run(_args: ReviewArgs) -> ExitCode {
    eprintln!("etcd-guard: audit review is not implemented yet");
    ExitCode::from(2)
}
