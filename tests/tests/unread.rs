//! Streams whose client reads none of etcd's answers are reset after `limits.unread_stream_timeout_ms`, and
//! etcd's call with them: a Snapshot stream left unread otherwise keeps etcd's read transaction open, and a
//! Defragment then stops every request to the member for as long as the client likes; a watch of a long history
//! left unread keeps its answer in etcd and in the proxy.

use std::time::Duration;

use etcd_client::{WatchOptions, WatchResponse, WatchStream};
use etcd_guard_tests::{ClientCert, Harness, TestResult, http_get};

const TIMEOUT_MS: u64 = 2_000;

/// About 24 MB of values in etcd: more than etcd, the proxy and the client's windows hold between them, so a
/// Snapshot or a watch from the first revision cannot be sent whole while its client does not read.
async fn fill(h: &Harness) -> TestResult {
    let mut direct = h.client_direct().await?;
    let value = vec![b'v'; 1 << 20];
    for i in 0..24 {
        direct.put(format!("big/{i:02}"), value.clone(), None).await?;
    }
    Ok(())
}

/// The end record of the one `rpc` stream that ended `ResourceExhausted`, read from the audit log once the proxy
/// has stopped.
fn reset_record(h: &Harness, rpc: &str) -> TestResult<serde_json::Value> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(h.audit_dir())? {
        for line in std::fs::read_to_string(entry?.path())?.lines() {
            let record: serde_json::Value = serde_json::from_str(line)?;
            if record["rpc"] == rpc && record["event"] == "end" && record["code"] == "ResourceExhausted" {
                found.push(record);
            }
        }
    }
    assert_eq!(found.len(), 1, "{found:#?}");
    let record = found.remove(0);
    assert_eq!(record["decision"], "deny", "{record}");
    let reason = record["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("limits.unread_stream_timeout_ms"), "{record}");
    Ok(record)
}

/// A watch through the proxy as `who`, with no call timeout, taking answers of up to 64 MiB.
async fn watch_from_start(h: &Harness, who: &ClientCert) -> TestResult<(etcd_client::Client, WatchStream)> {
    let client = h.pki.etcd_client(&h.proxy_url(), who, None).await?;
    let options = WatchOptions::new().with_prefix().with_start_revision(1).with_prev_key();
    let stream = client.watch_client().max_decoding_message_size(64 << 20).watch("big/", Some(options)).await?;
    Ok((client, stream))
}

fn reset_for_not_reading(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::ResourceExhausted)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unread_snapshot_is_reset_so_a_defragment_does_not_stop_the_member() -> TestResult {
    let config = format!("audit: {{ file: audit/audit.log }}\nlimits: {{ unread_stream_timeout_ms: {TIMEOUT_MS} }}\n");
    let mut h = Harness::with_config(etcd_guard_tests::TEST_POLICY, &config).await?;
    fill(&h).await?;
    // No call timeout: etcd would end the snapshot at the client's deadline otherwise.
    let mut snapshotter = h.pki.etcd_client(&h.proxy_url(), &h.admin()?, None).await?;
    let mut snapshot = snapshotter.snapshot().await?;
    let first = snapshot.message().await?.ok_or("the snapshot ended at once")?;
    assert!(!first.blob().is_empty());

    // The client reads no more. An operator's defragment waits for etcd's snapshot to end, and every request
    // to the member waits behind it; once the proxy resets the unread stream, etcd's snapshot ends too.
    let mut direct = h.client_direct().await?;
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let defragment = direct.defragment().await.map(|_| ());
        let put = direct.put("after", "defragment", None).await.map(|_| ());
        (defragment, put)
    })
    .await;
    let (defragment, put) =
        served.map_err(|_| "etcd still stopped 20 s after the snapshot's client stopped reading")?;
    defragment?;
    put?;

    // The client that comes back finds its stream reset (what it had already received first, if anything).
    let mut ended = None;
    for _ in 0..1_000 {
        match snapshot.message().await {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(e) => {
                ended = Some(e);
                break;
            }
        }
    }
    let ended = ended.ok_or("the unread snapshot stream ended without an error")?;
    assert!(reset_for_not_reading(&ended), "{ended:?}");
    drop((snapshot, snapshotter));

    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    assert!(metrics.contains(r#"etcd_guard_limited_total{limit="unread_stream_timeout"} 1"#), "{metrics}");
    h.stop_proxy().await;
    reset_record(&h, "Maintenance/Snapshot")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unread_watch_of_a_long_history_is_reset_and_a_reading_one_is_not() -> TestResult {
    let config = format!("audit: {{ file: audit/audit.log }}\nlimits: {{ unread_stream_timeout_ms: {TIMEOUT_MS} }}\n");
    let mut h = Harness::with_config(etcd_guard_tests::TEST_POLICY, &config).await?;
    fill(&h).await?;
    let admin = h.admin()?;

    // Read as it comes: the whole history arrives, however long it takes.
    let (reader, mut reading) = watch_from_start(&h, &admin).await?;
    let mut events = 0;
    while events < 24 {
        let answer: WatchResponse = reading.message().await?.ok_or("the reading watch ended")?;
        assert!(!answer.canceled(), "{answer:?}");
        events += answer.events().len();
        // A slow reader is not a stalled one.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Created, then never read: reset once the time is up.
    let (idle, mut unread) = watch_from_start(&h, &admin).await?;
    // However long etcd takes to start answering it on a busy machine: the unread stream ends, the reading one
    // stays (read the client's side only after that, or the read itself would make room).
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let open_watch_streams = || -> TestResult<Option<f64>> {
        let (_, metrics) = http_get(addr, "/metrics")?;
        let line = metrics.lines().find(|l| l.starts_with(r#"etcd_guard_open_streams{rpc="Watch/Watch"}"#));
        Ok(line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok()))
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while open_watch_streams()? != Some(1.0) {
        assert!(std::time::Instant::now() < deadline, "the unread watch stream is still open after 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match unread.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(e) => return Some(e),
            }
        }
    })
    .await
    .map_err(|_| "the unread watch stream is still open")?;
    let ended = ended.ok_or("the unread watch stream ended without an error")?;
    assert!(reset_for_not_reading(&ended), "{ended:?}");

    // The reading stream was not touched: a new event still arrives on it.
    let mut direct = h.client_direct().await?;
    direct.put("big/next", "x", None).await?;
    let next = tokio::time::timeout(Duration::from_secs(10), reading.message()).await??.ok_or("ended")?;
    assert_eq!(next.events().len(), 1, "{next:?}");
    drop((reading, reader, unread, idle));

    h.stop_proxy().await;
    reset_record(&h, "Watch/Watch")?;
    Ok(())
}
