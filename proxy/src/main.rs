#![forbid(unsafe_code)]

use std::process::ExitCode;

/// jemalloc rather than glibc's malloc: after two rounds of 10,000 watch streams the proxy peaked at 168 MiB with
/// it and at 212 MiB with glibc, whose per-thread arenas kept what the first round freed (BENCHMARKS.md).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    purge_in_background();
    etcd_guard::cli::main()
}

/// One jemalloc thread returns freed memory to the system on jemalloc's decay schedule (about 10 s). Without it,
/// memory is purged only when the thread that freed it allocates again: what parsing a large policy left behind
/// (at start, and at every reload) stayed in an idle proxy's RSS — 126 MiB instead of 56 MiB with a policy of
/// 10,000 roles and 100,000 key rules (BENCHMARKS.md). Failing to start it costs only that memory.
#[cfg(not(target_env = "msvc"))]
fn purge_in_background() {
    let _ = tikv_jemalloc_ctl::max_background_threads::write(1);
    let _ = tikv_jemalloc_ctl::background_thread::write(true);
}

#[cfg(target_env = "msvc")]
fn purge_in_background() {}
