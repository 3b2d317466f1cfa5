//! Running it: `/healthz`, `/readyz` and `/metrics` on the plain-HTTP listener, readiness following etcd, and
//! rollout mode (`audit-only` bindings record `would_deny` and serve).

use std::time::{Duration, Instant};

use etcd_guard_tests::{Harness, TestResult, http_get};
use serde_json::Value;

/// GET `path` on the metrics listener: (status, body).
fn get(h: &Harness, path: &str) -> TestResult<(u16, String)> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    http_get(addr, path)
}

/// The value of the first sample line starting with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn wait_for(what: &str, mut cond: impl FnMut() -> TestResult<bool>) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !cond()? {
        if Instant::now() > deadline {
            return Err(format!("timed out waiting for {what}").into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() -> TestResult {
    let mut h = Harness::start().await?;
    assert_eq!(get(&h, "/healthz")?.0, 200);
    wait_for("ready", || Ok(get(&h, "/readyz")?.0 == 200))?;

    let mut a = h.client(&h.admin()?).await?;
    for i in 0..3 {
        a.put(format!("m/{i}"), "v", None).await?;
    }
    a.member_list().await?;
    // A call whose answer is inspected (TimeToLive) and one that may wait at etcd (Lock) are timed too.
    let lease = a.lease_grant(60, None).await?.id();
    a.lease_time_to_live(lease, None).await?;
    let lock = a.lock("m-lock", Some(etcd_client::LockOptions::new().with_lease(lease))).await?;
    a.unlock(lock.key()).await?;
    let mut c = h.client(&h.cilium()?).await?;
    assert!(c.get("m/0", None).await.is_err());
    let mut w = c.watch("cilium/", Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    assert!(w.message().await?.is_some_and(|m| m.created()));
    let (status, metrics) = get(&h, "/metrics")?;
    assert_eq!(status, 200);
    assert_eq!(sample(&metrics, r#"etcd_guard_requests_total{rpc="KV/Put",decision="allow",code="OK"}"#), Some(3.0));
    assert_eq!(
        sample(&metrics, r#"etcd_guard_requests_total{rpc="KV/Range",decision="deny",code="PermissionDenied"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert!(metrics.contains("etcd_guard_request_duration_seconds_bucket"), "{metrics}");
    // etcd's part of the forwarded calls, to tell the proxy's own from it: the puts, not the denied get.
    let put = r#"{rpc="KV/Put"}"#;
    assert_eq!(sample(&metrics, &format!("etcd_guard_upstream_duration_seconds_count{put}")), Some(3.0), "{metrics}");
    assert!(!metrics.contains(r#"etcd_guard_upstream_duration_seconds_count{rpc="KV/Range"}"#), "{metrics}");
    // MemberList, whose answer the proxy rewrites, asks etcd too.
    for rpc in ["Cluster/MemberList", "Lease/LeaseTimeToLive", "Lock/Lock", "Lock/Unlock"] {
        let count = format!(r#"etcd_guard_upstream_duration_seconds_count{{rpc="{rpc}"}}"#);
        assert_eq!(sample(&metrics, &count), Some(1.0), "{rpc}: {metrics}");
    }
    let etcd_part = sample(&metrics, &format!("etcd_guard_upstream_duration_seconds_sum{put}")).unwrap_or(-1.0);
    let whole = sample(&metrics, &format!("etcd_guard_request_duration_seconds_sum{put}")).unwrap_or(-1.0);
    assert!(etcd_part > 0.0 && etcd_part <= whole, "{etcd_part} of {whole}: {metrics}");
    assert_eq!(sample(&metrics, "etcd_guard_client_connections "), Some(2.0), "{metrics}");
    assert_eq!(sample(&metrics, "etcd_guard_open_watches "), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, r#"etcd_guard_open_streams{rpc="Watch/Watch"}"#), Some(1.0), "{metrics}");
    assert!(sample(&metrics, "etcd_guard_audit_records_written_total").is_some(), "{metrics}");
    // The open record, three puts, the denied get and the watch create are in the log (within its 5 ms batches).
    wait_for("audit seq", || {
        Ok(sample(&get(&h, "/metrics")?.1, "etcd_guard_audit_last_seq ").is_some_and(|s| s >= 6.0))
    })?;
    assert_eq!(sample(&metrics, "etcd_guard_upstream_endpoint_healthy{"), Some(1.0), "{metrics}");
    // The standard process metrics, for CPU per request and memory in production (docs/deployment.md).
    assert!(sample(&metrics, "process_cpu_seconds_total ").is_some_and(|s| s >= 0.0), "{metrics}");
    assert!(sample(&metrics, "process_resident_memory_bytes ").is_some_and(|b| b > 1e6), "{metrics}");
    // The listeners and the two client connections at least.
    assert!(sample(&metrics, "process_open_fds ").is_some_and(|n| n >= 4.0), "{metrics}");

    // etcd goes away: not ready any more (the proxy itself stays alive).
    h.etcd.kill()?;
    wait_for("not ready", || Ok(get(&h, "/readyz")?.0 == 503))?;
    assert_eq!(get(&h, "/healthz")?.0, 200);
    let (_, metrics) = get(&h, "/metrics")?;
    assert_eq!(sample(&metrics, "etcd_guard_upstream_endpoint_healthy{"), Some(0.0), "{metrics}");
    Ok(())
}

const ROLLOUT_POLICY: &str = r#"
roles:
  - name: admin
    keys: [ { prefix: "", access: readwrite } ]
    cluster: [admin]
  - name: cilium
    keys: [ { prefix: "cilium/", access: readwrite } ]
    cluster: [status]
bindings:
  - role: admin
    subjects: [ { common_name: "admin" } ]
  - role: cilium
    mode: audit-only
    subjects: [ { uri_san: "spiffe://cluster.local/ns/kube-system/sa/cilium" } ]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn audit_only_bindings_record_would_deny_and_serve() -> TestResult {
    let mut h = Harness::with_policy(ROLLOUT_POLICY).await?;
    let mut c = h.client(&h.cilium()?).await?;
    c.put("cilium/ok", "v", None).await?;
    // Outside the grant: served, recorded as what enforcing would break.
    c.put("elsewhere", "v", None).await?;
    let got = c.get("elsewhere", None).await?;
    assert_eq!(got.kvs().len(), 1);
    let (_, metrics) = get(&h, "/metrics")?;
    assert_eq!(sample(&metrics, r#"etcd_guard_would_deny_total{rpc="KV/Put"}"#), Some(1.0), "{metrics}");
    drop(c);
    h.stop_proxy().await;
    let text = std::fs::read_to_string(h.audit_dir().join("audit.log"))?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let decisions: Vec<(&str, &str, &str)> = records
        .iter()
        .filter(|r| r["rpc"] == "KV/Put" || r["rpc"] == "KV/Range")
        .map(|r| {
            (
                r["ops"][0]["key"].as_str().unwrap_or(""),
                r["decision"].as_str().unwrap_or(""),
                r["code"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [("cilium/ok", "allow", "OK"), ("elsewhere", "would_deny", "OK"), ("elsewhere", "would_deny", "OK")]
    );
    Ok(())
}

/// Ready only once etcd has been heard from: a proxy started in front of an etcd that does not answer is not
/// ready from the start (before: ready until its first health probe timed out, endpoints counting as healthy).
#[tokio::test(flavor = "multi_thread")]
async fn not_ready_before_etcd_has_answered() -> TestResult {
    use etcd_guard::config::Config;
    use etcd_guard::server::Proxy;
    use etcd_guard_tests::{Etcd, Pki};
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    etcd.pause()?;
    std::fs::write(pki.path("policy.yaml"), "roles: [ { name: nothing } ]\n")?;
    let config = format!(
        r#"listen: "127.0.0.1:0"
tls: {{ cert_file: server.crt, key_file: server.key, client_ca_file: ca.crt }}
upstream: {{ endpoints: ["{}"], ca_file: ca.crt, cert_file: upstream-client.crt, key_file: upstream-client.key }}
policy_file: policy.yaml
metrics_listen: "127.0.0.1:0"
"#,
        etcd.client_url
    );
    std::fs::write(pki.path("etcd-guard.yaml"), config)?;
    let proxy = Proxy::bind(&Config::load(&pki.path("etcd-guard.yaml"))?).await?.spawn();
    let addr = proxy.metrics_addr.ok_or("no metrics listener")?;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let (status, body) = http_get(addr, "/readyz")?;
        assert_eq!(status, 503, "ready after {:?} with etcd paused: {body}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    etcd.resume()?;
    wait_for("ready once etcd answers", || Ok(http_get(addr, "/readyz")?.0 == 200))?;
    proxy.stop().await;
    Ok(())
}
