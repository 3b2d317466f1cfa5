//! Limits per identity: one identity over its rate gets ResourceExhausted while another keeps full speed; open
//! watches are capped per identity.

use std::time::Duration;

use etcd_client::WatchOptions;
use etcd_guard_tests::{Harness, TestResult, http_get};

const POLICY: &str = r#"
roles:
  - name: admin
    keys: [ { prefix: "", access: readwrite } ]
    cluster: [admin]
  - name: cilium
    keys: [ { prefix: "cilium/", access: readwrite } ]
    cluster: [status]
    limits: { requests_per_second: 20, burst: 20, open_watches: 2, concurrent_requests: 8 }
bindings:
  - role: admin
    subjects: [ { common_name: "admin" } ]
  - role: cilium
    subjects: [ { uri_san: "spiffe://cluster.local/ns/kube-system/sa/cilium" } ]
"#;

fn exhausted(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::ResourceExhausted
        && s.message().contains("requests per second"))
}

#[tokio::test(flavor = "multi_thread")]
async fn one_identity_over_its_rate_does_not_slow_another() -> TestResult {
    let h = Harness::with_policy(POLICY).await?;
    let mut cilium = h.client(&h.cilium()?).await?;
    let mut admin = h.client(&h.admin()?).await?;
    let flood = tokio::spawn(async move {
        let (mut ok, mut limited, mut other) = (0, 0, Vec::new());
        for i in 0..300 {
            match cilium.get(format!("cilium/{i}"), None).await {
                Ok(_) => ok += 1,
                Err(e) if exhausted(&e) => limited += 1,
                Err(e) => other.push(e.to_string()),
            }
        }
        (ok, limited, other)
    });
    let mut admin_failures = 0;
    for i in 0..300 {
        if admin.get(format!("a/{i}"), None).await.is_err() {
            admin_failures += 1;
        }
    }
    let (ok, limited, other) = flood.await?;
    eprintln!("cilium: {ok} served, {limited} limited; admin: {admin_failures} failures");
    assert!(other.is_empty(), "{other:?}");
    assert!(ok >= 20, "the burst is served: {ok}");
    assert!(limited > 100, "most of the flood is refused: {limited}");
    assert_eq!(admin_failures, 0, "the other identity keeps full speed");
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    assert!(metrics.contains(r#"etcd_guard_limited_total{limit="rate"}"#), "{metrics}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn open_watches_are_capped_per_identity() -> TestResult {
    let h = Harness::with_policy(POLICY).await?;
    let cert = h.cilium()?;
    let mut c = h.client(&cert).await?;
    let mut w = c.watch("cilium/a", None).await?;
    let first = w.message().await?.ok_or("stream ended")?;
    assert!(first.created() && !first.canceled());
    // A second stream of the same identity shares the cap.
    let mut other = h.client(&cert).await?;
    let mut w2 = other.watch("cilium/b", None).await?;
    assert!(w2.message().await?.is_some_and(|m| m.created() && !m.canceled()));
    w.watch("cilium/c", Some(WatchOptions::new())).await?;
    let third = w.message().await?.ok_or("stream ended")?;
    assert!(third.created() && third.canceled(), "{third:?}");
    assert!(third.cancel_reason().contains("ResourceExhausted"), "{}", third.cancel_reason());
    // Closing one frees a slot.
    w.cancel(first.watch_id()).await?;
    assert!(w.message().await?.is_some_and(|m| m.canceled()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    w.watch("cilium/d", None).await?;
    let fourth = w.message().await?.ok_or("stream ended")?;
    assert!(fourth.created() && !fourth.canceled(), "{fourth:?}");
    Ok(())
}
