//! Upstream failover against a three-member etcd cluster on loopback: killing a member moves requests to the
//! others within seconds, and a member that comes back is used again.

use std::time::{Duration, Instant};

use etcd_guard_tests::{EtcdCluster, Pki, TestResult, http_get, proxy_in_front_of};

/// Put until 20 puts in a row succeed; returns (failures, time taken). Bounded at 20 s.
async fn until_steady(c: &mut etcd_client::Client, tag: &str) -> TestResult<(usize, Duration)> {
    let start = Instant::now();
    let (mut failures, mut in_a_row, mut i) = (0, 0, 0);
    while in_a_row < 20 {
        if start.elapsed() > Duration::from_secs(20) {
            return Err(format!("{tag}: still failing after 20 s ({failures} failures)").into());
        }
        i += 1;
        match c.put(format!("{tag}/{i}"), "v", None).await {
            Ok(_) => in_a_row += 1,
            Err(_) => {
                failures += 1;
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    Ok((failures, start.elapsed()))
}

fn endpoint_health(metrics: &str, url: &str) -> Option<f64> {
    let prefix = format!("etcd_guard_upstream_endpoint_healthy{{endpoint=\"{url}\"}}");
    metrics.lines().find(|l| l.starts_with(&prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_fail_over_to_the_other_members_and_come_back() -> TestResult {
    let pki = Pki::new()?;
    let mut cluster = EtcdCluster::start(&pki, 3)?;
    let proxy = proxy_in_front_of(&pki, &cluster).await?;
    let metrics_addr = proxy.metrics_addr.ok_or("no metrics listener")?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let proxy_url = format!("https://{}", proxy.local_addr);
    let mut c = pki.etcd_client(&proxy_url, &admin, Some(Duration::from_secs(3))).await?;
    until_steady(&mut c, "before").await?;

    // Kill a member: requests go to the other two within seconds.
    cluster.kill(0)?;
    let (failures, took) = until_steady(&mut c, "killed").await?;
    eprintln!("member 0 killed: {failures} failed requests, steady again after {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    let (_, metrics) = http_get(metrics_addr, "/metrics")?;
    assert_eq!(endpoint_health(&metrics, &cluster.client_urls[0]), Some(0.0), "{metrics}");
    assert_eq!(endpoint_health(&metrics, &cluster.client_urls[1]), Some(1.0), "{metrics}");

    // It comes back and is marked healthy again; then another member can go and the cluster still answers.
    cluster.restart(&pki, 0)?;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, metrics) = http_get(metrics_addr, "/metrics")?;
        if endpoint_health(&metrics, &cluster.client_urls[0]) == Some(1.0) {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("member 0 not healthy again: {metrics}").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill(1)?;
    let (failures, took) = until_steady(&mut c, "second").await?;
    eprintln!("member 1 killed: {failures} failed requests, steady again after {took:?}");
    drop(c);
    proxy.stop().await;
    Ok(())
}

/// Members stopped gracefully (as a rolling restart or upgrade does) turn new calls away with `GOAWAY`, refuse
/// connections, or are picked before they are known to be down: each such call etcd did not process is made again
/// on another member. Without that, several calls per restart fail with the proxy's `Unavailable`. etcd's own
/// failures during its stop (an empty HTTP answer, a call it holds past the client's deadline) reach a direct
/// client too, and are let through.
#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_restart_of_etcd_fails_no_call_for_want_of_a_retry() -> TestResult {
    let pki = Pki::new()?;
    let mut cluster = EtcdCluster::start(&pki, 3)?;
    let proxy = proxy_in_front_of(&pki, &cluster).await?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let proxy_url = format!("https://{}", proxy.local_addr);
    let c = pki.etcd_client(&proxy_url, &admin, Some(Duration::from_secs(5))).await?;

    // Puts from 8 tasks, each waiting for its answer, while every member is restarted in turn.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let putters: Vec<_> = (0..8)
        .map(|t| {
            let (mut c, stop) = (c.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut ok, mut failed) = (0usize, Vec::new());
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    match c.put(format!("rolling/{t}/{}", i % 100), "v", None).await {
                        Ok(_) => ok += 1,
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        cluster.stop(i)?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.restart(&pki, i)?;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for p in putters {
        let (o, f) = p.await?;
        ok += o;
        failed.extend(f);
    }
    eprintln!("rolling restart: {ok} puts, {} failed: {failed:?}", failed.len());
    // The proxy's failures for calls etcd did not process: no connection to a stopped member, a GOAWAY, a
    // refused stream. (A connection that breaks under a call etcd took is answered `Unavailable` too, rightly.)
    let unprocessed = ["cannot connect", "connecting to", "connection error received", "refused stream"];
    let by_proxy: Vec<&String> = failed.iter().filter(|e| unprocessed.iter().any(|u| e.contains(u))).collect();
    assert!(by_proxy.is_empty(), "{by_proxy:?}");
    assert!(ok > 100, "{ok}");
    drop(c);
    proxy.stop().await;
    Ok(())
}
