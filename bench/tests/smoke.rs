//! The benchmark end to end, briefly: real etcd, the proxy as a separate process, the load generator, every
//! workload at one shape for one short run. Not a measurement (a debug build, windows of 0.3 s): it checks that the
//! benchmark still works, i.e. that every case served requests on both paths without errors and that the figures
//! the targets are judged on were read, so a change to the proxy or to the benchmark cannot break it unnoticed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

type TestResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

/// The whole invocation takes about 30 s here; it stops itself well before this.
const LIMIT: Duration = Duration::from_secs(300);

fn run_bench(out: &Path, log: &Path) -> TestResult {
    let mut command = Command::new(env!("CARGO_BIN_EXE_etcd-guard-bench"));
    // The etcd under test, as for the integration tests (`scripts/test.sh` runs them again with etcd 3.5).
    if let Some(dir) = std::env::var_os("ETCD_GUARD_TEST_ETCD_DIR").filter(|d| !d.is_empty()) {
        command.arg("--etcd-bin").arg(Path::new(&dir).join("etcd"));
    }
    command
        .arg("--proxy-bin")
        .arg(env!("CARGO_BIN_EXE_guard-under-bench"))
        .args([
            "--only",
            "lin-range,ser-range,put,mix,watch,keep-alive,leased-put,watch-coalesced,unix-upstream,grpc-proxy,idle",
        ])
        .args(["--shapes", "1x64", "--runs", "1", "--duration", "0.3", "--warmup", "0.1", "--rate", "off"])
        .args(["--watchers", "20", "--idle-conns", "100"])
        .arg("--out")
        .arg(out);
    let printed = std::fs::File::create(log)?;
    let mut child = command.stdin(Stdio::null()).stderr(printed.try_clone()?).stdout(printed).spawn()?;
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait()? {
            let printed = std::fs::read_to_string(log).unwrap_or_default();
            return if status.success() {
                Ok(())
            } else {
                Err(format!("benchmark failed: {status}\n{printed}").into())
            };
        }
        if Instant::now() > deadline {
            // SIGTERM first: the benchmark then stops etcd, the proxies and the load generators it started.
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let stop = Instant::now() + Duration::from_secs(15);
            while child.try_wait()?.is_none() && Instant::now() < stop {
                std::thread::sleep(Duration::from_millis(200));
            }
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("benchmark still running after {LIMIT:?}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn every_workload_runs_through_both_paths() -> TestResult {
    let dir = tempfile::tempdir()?;
    let (out, log) = (dir.path().join("results.json"), dir.path().join("bench.log"));
    run_bench(&out, &log)?;
    let results: Value = serde_json::from_str(&std::fs::read_to_string(&out)?)?;
    let printed = std::fs::read_to_string(&log)?;

    let cases = results["cases"].as_array().ok_or("no cases in the results")?;
    let mut workloads: Vec<&str> = cases.iter().filter_map(|c| c["workload"].as_str()).collect();
    workloads.sort_unstable();
    workloads.dedup();
    assert_eq!(workloads, ["keep-alive", "leased-put", "lin-range", "mix", "put", "ser-range", "watch"], "{printed}");
    // The watch workload through a proxy that shares identical watches, too.
    assert!(cases.iter().any(|c| c["kind"] == "coalesced" && c["workload"] == "watch"), "{printed}");
    // lin-range and put through a proxy that reaches etcd over its unix socket, too.
    let over_socket = cases.iter().filter(|c| c["kind"] == "unix-upstream").count();
    assert_eq!(over_socket, 2, "{printed}");
    // lin-range and put against etcd, through `etcd grpc-proxy` and through etcd-guard, and the line comparing them.
    let reference = cases.iter().filter(|c| c["kind"] == "grpc-proxy").count();
    assert_eq!(reference, 2, "{printed}");
    assert!(printed.contains("spends less CPU per request than etcd grpc-proxy"), "{printed}");
    for case in cases {
        let name = case["name"].as_str().unwrap_or("?");
        let legs = case["legs"].as_array().ok_or("a case without legs")?;
        let expected = if case["kind"] == "grpc-proxy" { 3 } else { 2 };
        assert_eq!(legs.len(), expected, "{name}: {case}");
        for leg in legs {
            let label = leg["label"].as_str().unwrap_or("?");
            // With the benchmark's own lines: which runs served what, and what the processes said.
            assert!(leg["requests"].as_u64().is_some_and(|n| n > 0), "{name} {label} served nothing: {leg}\n{printed}");
            assert_eq!(leg["errors"].as_u64(), Some(0), "{name} {label}: {leg}");
            assert!(leg["etcd_cpu_us_per_req"].as_f64().is_some_and(|us| us > 0.0), "{name} {label}: {leg}");
        }
        // The proxy's own CPU per request, which the CPU target is judged on, was read from /proc (a figure, not
        // null; it may be 0: /proc counts in 10 ms ticks, and a 0.3 s window of a debug build on a loaded machine
        // can serve few requests — a fresh proxy's first calls wait for its upstream TLS handshakes).
        for leg in &legs[1..] {
            assert!(leg["proxy_cpu_us_per_req"].as_f64().is_some_and(|us| us >= 0.0), "{name}: {case}");
            assert!(leg["ratio"].as_f64().is_some_and(|r| r > 0.0), "{name}: {case}");
        }
        assert!(case["ratio"].as_f64().is_some_and(|r| r > 0.0), "{name}: {case}");
    }
    let idle = results["idle"].as_array().ok_or("no idle-connection figures")?;
    assert_eq!(idle.len(), 2, "{printed}");
    for server in idle {
        assert_eq!(server["connections"].as_u64(), Some(100), "{server}");
        // 100 TLS handshakes (debug build) take more than one 10 ms clock tick of CPU.
        assert!(server["cpu_us_per_connection"].as_f64().is_some_and(|us| us > 0.0), "{server}");
    }
    // A fresh proxy process grows with its connections (etcd, which served every case before, may reuse what its
    // heap has free, so its figure is not checked).
    let proxy = idle.iter().find(|s| s["server"] == "proxy").ok_or("no idle figures of the proxy")?;
    assert!(proxy["per_connection_kib"].as_f64().is_some_and(|kib| kib > 0.0), "{proxy}");
    assert!(printed.contains("targets (issue #5):"), "{printed}");
    Ok(())
}
