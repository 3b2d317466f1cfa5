//! `etcd-guard-bench`: etcd directly versus through etcd-guard, on one machine, with mutual TLS on both legs and
//! auditing on (issue #5).
//!
//! One invocation generates certificates in a temporary folder, starts a real etcd and the `etcd-guard` binary as
//! separate processes on free loopback ports, and runs each workload against etcd (A) and the proxy (B) in turn,
//! A B A B A B, from a separate load-generator process (this binary's hidden `load` subcommand). Around each
//! measured window it reads the CPU time and peak memory of etcd and of the proxy from `/proc`. Results go to a
//! JSON file and a table; `BENCHMARKS.md` explains the columns and records a run.
//!
//! Everything listens on and talks to 127.0.0.1 only, every child process is killed when the benchmark ends
//! (also on error or Ctrl-C), and every run is bounded in time.

#![forbid(unsafe_code)]

mod load;
mod procfs;
mod report;
mod run;
mod setup;
mod stats;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The error type of the benchmark: any error, with its message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Benchmark etcd-guard against direct etcd (mutual TLS on both legs, auditing on).
///
/// Starts etcd (`etcd`, 3.4 or later) and `etcd-guard serve` on free 127.0.0.1 ports with generated
/// certificates, then runs each workload — linearizable and serializable Range, Put, a kube-apiserver-like mix,
/// watch fan-out — against etcd directly and through the proxy, alternating (A B A B A B), from a separate
/// load-generator process. Also: fixed-rate runs at half of saturation, a 10,000-role policy, memory per idle
/// connection, and `etcd grpc-proxy` (the reference) beside both. Prints a table and writes a JSON file.
/// Build the proxy first, in the same target folder: `cargo build --release -p etcd-guard -p etcd-guard-bench`.
#[derive(Debug, Parser)]
#[command(name = "etcd-guard-bench", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: run::RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Internal: the load generator (started by the benchmark itself).
    #[command(hide = true)]
    Load(load::LoadArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Load(args)) => load::main(args),
        None => run::main(cli.run),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-guard-bench: {e}");
            ExitCode::FAILURE
        }
    }
}
