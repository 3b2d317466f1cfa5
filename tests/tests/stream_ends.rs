//! The end record of a Watch or LeaseKeepAlive stream says how the stream ended for its client (docs/audit.md):
//! `Cancelled` when the client went away, etcd's status when etcd ended it — not how the client's side of the
//! stream happened to end, or when.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_guard_tests::{ClientCert, Harness, TestResult, etcd_tool, http_get};
use serde_json::Value;

/// `etcdctl args…` through the proxy as `who`, left running.
fn etcdctl_running(h: &Harness, who: &ClientCert, args: &[&str]) -> TestResult<Child> {
    let child = Command::new(etcd_tool("etcdctl"))
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", h.proxy_url()))
        .arg(format!("--cacert={}", h.pki.ca_file().display()))
        .arg(format!("--cert={}", who.cert.display()))
        .arg(format!("--key={}", who.key.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("running etcdctl (is etcd-client installed?): {e}"))?;
    Ok(child)
}

/// The proxy's open-streams gauge of `rpc`.
fn open_streams(h: &Harness, rpc: &str) -> TestResult<f64> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    let prefix = format!(r#"etcd_guard_open_streams{{rpc="{rpc}"}} "#);
    let value = metrics.lines().find_map(|l| l.strip_prefix(prefix.as_str())).unwrap_or("0");
    Ok(value.parse()?)
}

/// Wait until the proxy counts `n` open `rpc` streams.
async fn until_open(h: &Harness, rpc: &str, n: f64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(20);
    while open_streams(h, rpc)? != n {
        assert!(Instant::now() < deadline, "{rpc}: not {n} open streams after 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// The end records of `rpc` streams, read once the proxy has stopped.
fn end_records(h: &Harness, rpc: &str) -> TestResult<Vec<Value>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(h.audit_dir())? {
        for line in std::fs::read_to_string(entry?.path())?.lines() {
            let record: Value = serde_json::from_str(line)?;
            if record["rpc"] == rpc && record["event"] == "end" {
                found.push(record);
            }
        }
    }
    Ok(found)
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_of_a_client_that_went_away_end_cancelled() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let lease = h.client(&admin).await?.lease_grant(60, None).await?.id();

    // etcdctl (grpc-go) watching and keeping a lease alive, then killed: its connection is gone at once.
    let mut watch = etcdctl_running(&h, &admin, &["watch", "ends/"])?;
    let mut keep = etcdctl_running(&h, &admin, &["lease", "keep-alive", &format!("{lease:x}")])?;
    until_open(&h, "Watch/Watch", 1.0).await?;
    until_open(&h, "Lease/LeaseKeepAlive", 1.0).await?;
    // A keep-alive has passed (etcdctl sends one at once), so etcd has the stream too.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for child in [&mut watch, &mut keep] {
        child.kill()?;
        child.wait()?;
    }
    until_open(&h, "Watch/Watch", 0.0).await?;
    until_open(&h, "Lease/LeaseKeepAlive", 0.0).await?;

    h.stop_proxy().await;
    for rpc in ["Watch/Watch", "Lease/LeaseKeepAlive"] {
        let ends = end_records(&h, rpc)?;
        assert_eq!(ends.len(), 1, "{rpc}: {ends:#?}");
        assert_eq!((&ends[0]["decision"], &ends[0]["code"]), (&"allow".into(), &"Cancelled".into()), "{}", ends[0]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_a_client_resets_end_cancelled() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let client = h.pki.etcd_client(&h.proxy_url(), &admin, None).await?;
    let mut watch = client.watch_client();
    let (watcher, mut events) = watch.watch("ends/", None).await?.split();
    let mut lease = client.lease_client();
    let id = lease.grant(60, None).await?.id();
    let (mut keeper, mut answers) = lease.keep_alive(id).await?;
    keeper.keep_alive().await?;
    tokio::time::timeout(Duration::from_secs(10), answers.message()).await??.ok_or("no keep-alive answer")?;
    let _ = tokio::time::timeout(Duration::from_millis(300), events.message()).await;

    // Both sides of each stream let go while the connection stays: the client resets the streams (CANCEL).
    drop((watcher, events, keeper, answers));
    until_open(&h, "Watch/Watch", 0.0).await?;
    until_open(&h, "Lease/LeaseKeepAlive", 0.0).await?;
    client.kv_client().put("ends/after", "1", None).await?;

    h.stop_proxy().await;
    drop(client);
    for rpc in ["Watch/Watch", "Lease/LeaseKeepAlive"] {
        let ends = end_records(&h, rpc)?;
        assert_eq!(ends.len(), 1, "{rpc}: {ends:#?}");
        assert_eq!(ends[0]["code"], "Cancelled", "{}", ends[0]);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_etcd_ended_are_recorded_with_the_status_their_client_got() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let client = h.pki.etcd_client(&h.proxy_url(), &admin, None).await?;
    let mut watch = client.watch_client().watch("ends/", None).await?;
    let lease = client.lease_client().grant(60, None).await?.id();
    let (mut keeper, mut keep) = client.lease_client().keep_alive(lease).await?;
    keeper.keep_alive().await?;
    tokio::time::timeout(Duration::from_secs(10), keep.message()).await??.ok_or("no keep-alive answer")?;

    // etcd goes away under both streams: each client hears it, while its own side of the stream stays open.
    h.etcd.kill()?;
    let watch_ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(etcd_client::Error::GRpcStatus(s)) => return Some(s.code()),
                Err(e) => panic!("watch: {e}"),
            }
        }
    })
    .await?;
    let keep_ended = match tokio::time::timeout(Duration::from_secs(20), keep.message()).await? {
        Err(etcd_client::Error::GRpcStatus(s)) => Some(s.code()),
        Ok(None) => None,
        other => panic!("keep-alive: {other:?}"),
    };
    assert_eq!(watch_ended, Some(tonic::Code::Unavailable));
    assert_eq!(keep_ended, Some(tonic::Code::Unavailable));
    // The records are written as the streams end for the client, not when it lets its side go.
    until_open(&h, "Watch/Watch", 0.0).await?;
    until_open(&h, "Lease/LeaseKeepAlive", 0.0).await?;

    h.stop_proxy().await;
    drop((client, keeper, watch, keep));
    for rpc in ["Watch/Watch", "Lease/LeaseKeepAlive"] {
        let ends = end_records(&h, rpc)?;
        assert_eq!(ends.len(), 1, "{rpc}: {ends:#?}");
        assert_eq!(ends[0]["code"], "Unavailable", "{}", ends[0]);
    }
    Ok(())
}
