#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    etcd_guard::cli::main()
}
