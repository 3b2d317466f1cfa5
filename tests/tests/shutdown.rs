//! SIGTERM under load: the proxy runs as its own process; every request it answered has its audit record.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use etcd_guard_tests::{Etcd, Pki, ProxyProcess, TEST_POLICY, TestResult, proxy_process};
use serde_json::Value;

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_under_load_loses_no_record_of_an_answered_request() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let (mut proxy, addr) = start_proxy(&pki, &etcd, "")?;

    // Load: 8 clients putting unique keys until the proxy stops answering (bounded at 20 s).
    let admin = pki.client("admin", "admin", None, &[])?;
    let tls = pki.client_tls(&admin)?;
    let mut tasks = Vec::new();
    for t in 0..8 {
        let opts = etcd_client::ConnectOptions::new().with_tls(tls.clone()).with_timeout(Duration::from_secs(5));
        let mut c = etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?;
        tasks.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            let stop = Instant::now() + Duration::from_secs(20);
            for i in 0.. {
                let key = format!("load/{t}/{i}");
                if c.put(key.clone(), "v", None).await.is_err() || Instant::now() > stop {
                    break;
                }
                answered.push(key);
            }
            answered
        }));
    }
    // An open watch: the shutdown ends it with Unavailable, so a client retries elsewhere.
    let opts = etcd_client::ConnectOptions::new().with_tls(tls.clone());
    let mut watcher = etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?;
    let mut watch = watcher.watch("load/", Some(etcd_client::WatchOptions::new().with_prefix())).await?;
    assert!(watch.message().await?.is_some_and(|m| m.created()));
    let watch_end = tokio::spawn(async move {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the watch ended without a status".to_string()),
                Err(etcd_client::Error::GRpcStatus(s)) => return Ok(s.code()),
                Err(e) => return Err(e.to_string()),
            }
        }
    });

    // An open keep-alive stream: the same.
    let lease = watcher.lease_grant(60, None).await?.id();
    let (mut keeper, mut acks) = watcher.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    assert!(acks.message().await?.is_some_and(|a| a.id() == lease));
    let keep_alive_end = tokio::spawn(async move {
        let _keeper = keeper;
        loop {
            match acks.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Err("the keep-alive stream ended without a status".to_string()),
                Err(etcd_client::Error::GRpcStatus(s)) => return Ok(s.code()),
                Err(e) => return Err(e.to_string()),
            }
        }
    });

    tokio::time::sleep(Duration::from_millis(1500)).await;
    proxy.signal("TERM")?;
    let mut answered = BTreeSet::new();
    for t in tasks {
        answered.extend(t.await?);
    }
    let status = proxy.wait_exit(Duration::from_secs(20))?;
    assert!(status.success(), "exit status {status}: {}", std::fs::read_to_string(pki.path("proxy.log"))?);
    assert!(answered.len() > 50, "too little load to mean anything: {}", answered.len());
    let ended = tokio::time::timeout(Duration::from_secs(10), watch_end).await??;
    assert_eq!(ended, Ok(tonic::Code::Unavailable));
    let ended = tokio::time::timeout(Duration::from_secs(10), keep_alive_end).await??;
    assert_eq!(ended, Ok(tonic::Code::Unavailable), "keep-alive stream");

    let text = std::fs::read_to_string(pki.path("audit/audit.log"))?;
    let recorded: BTreeSet<String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|r| r["rpc"] == "KV/Put" && r["code"] == "OK")
        .filter_map(|r| r["ops"][0]["key"].as_str().map(String::from))
        .collect();
    let missing: Vec<&String> = answered.difference(&recorded).collect();
    assert!(
        missing.is_empty(),
        "{} answered puts have no record, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    eprintln!("answered {} puts, all recorded", answered.len());
    Ok(())
}

/// A second SIGTERM ends the drain at once: the call still waiting for etcd is dropped, and recorded as canceled.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_sigterm_ends_the_drain_at_once() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let (mut proxy, addr) = start_proxy(&pki, &etcd, "shutdown_grace_ms: 60000\n")?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let tls = pki.client_tls(&admin)?;
    let opts = etcd_client::ConnectOptions::new().with_tls(tls);
    let mut c = etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?;
    c.put("drain/before", "v", None).await?;
    // A put etcd does not answer: the drain waits for it (up to the 60 s grace).
    etcd.pause()?;
    let stuck = tokio::spawn(async move { c.put("drain/stuck", "v", None).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.signal("TERM")?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let still_draining = proxy.child.try_wait()?.is_none();
    proxy.signal("TERM")?;
    let exited = proxy.wait_exit(Duration::from_secs(10));
    etcd.resume()?;
    let status = exited?;
    assert!(still_draining, "the proxy exited before its drain ended: nothing was tested");
    assert!(status.success(), "exit status {status}: {}", std::fs::read_to_string(pki.path("proxy.log"))?);
    assert!(tokio::time::timeout(Duration::from_secs(10), stuck).await??.is_err(), "the stuck put was answered");
    let text = std::fs::read_to_string(pki.path("audit/audit.log"))?;
    let record = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|r| r["rpc"] == "KV/Put" && r["ops"][0]["key"] == "drain/stuck")
        .ok_or("the put dropped at the second SIGTERM has no record")?;
    assert_eq!(record["code"], "Cancelled", "{record}");
    Ok(())
}

/// Calls that last until their client lets go do not hold the drain: a Lock waiting for a lock another client
/// holds, and an election's Observe streams (one of an election without a leader, which etcd has not answered
/// at all yet), end with `Unavailable` at the first SIGTERM (clients ask again
/// elsewhere), as watches do, and the proxy exits long before its 60 s grace. Their records say so.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_lock_and_an_observe_stream_do_not_hold_the_drain() -> TestResult {
    let pki = Pki::new()?;
    let etcd = Etcd::start(&pki)?;
    let (mut proxy, addr) = start_proxy(&pki, &etcd, "shutdown_grace_ms: 60000\n")?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let tls = pki.client_tls(&admin)?;
    let opts = etcd_client::ConnectOptions::new().with_tls(tls.clone());
    let mut holder = etcd_client::Client::connect([format!("https://{addr}")], Some(opts.clone())).await?;
    let mut waiter = etcd_client::Client::connect([format!("https://{addr}")], Some(opts)).await?;

    let held = holder.lease_grant(60, None).await?.id();
    holder.lock("drain/lock", Some(etcd_client::LockOptions::new().with_lease(held))).await?;
    let waits = waiter.lease_grant(60, None).await?.id();
    let mut locker = waiter.clone();
    let waiting = tokio::spawn(async move {
        locker.lock("drain/lock", Some(etcd_client::LockOptions::new().with_lease(waits))).await.map(|_| ())
    });
    // An Observe of an election nobody leads: etcd has not even answered its headers.
    let mut observer = waiter.clone();
    let leaderless = tokio::spawn(async move {
        let mut stream = observer.observe("drain/nobody").await?;
        stream.message().await.map(|_| ())
    });
    holder.campaign("drain/leader", "one", held).await?;
    let mut observe = waiter.observe("drain/leader").await?;
    let leader = tokio::time::timeout(Duration::from_secs(5), observe.message()).await??.ok_or("stream ended")?;
    assert_eq!(leader.kv().map(|kv| kv.value()), Some(&b"one"[..]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the lock was granted: nothing waits");

    let asked = Instant::now();
    proxy.signal("TERM")?;
    let status = proxy.wait_exit(Duration::from_secs(30))?;
    assert!(status.success(), "exit status {status}: {}", std::fs::read_to_string(pki.path("proxy.log"))?);
    assert!(asked.elapsed() < Duration::from_secs(30), "the drain waited for them");
    let locked = tokio::time::timeout(Duration::from_secs(10), waiting).await??;
    match locked {
        Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        other => return Err(format!("the waiting lock: {other:?}").into()),
    }
    match tokio::time::timeout(Duration::from_secs(10), observe.message()).await? {
        Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        other => return Err(format!("the observe stream: {other:?}").into()),
    }
    match tokio::time::timeout(Duration::from_secs(10), leaderless).await?? {
        Err(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}"),
        other => return Err(format!("the observe stream without a leader: {other:?}").into()),
    }

    let text = std::fs::read_to_string(pki.path("audit/audit.log"))?;
    let records: Vec<Value> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let lock = records
        .iter()
        .filter(|r| r["rpc"] == "Lock/Lock")
        .nth(1)
        .ok_or_else(|| format!("no record of the waiting lock: {text}"))?;
    assert_eq!(lock["code"], "Unavailable", "{lock}");
    let ends: Vec<&Value> = records.iter().filter(|r| r["rpc"] == "Election/Observe" && r["event"] == "end").collect();
    assert_eq!(ends.len(), 2, "both observe streams end: {text}");
    for end in ends {
        assert_eq!(end["code"], "Unavailable", "{end}");
        // Why it ended, after the grant it was opened under.
        let reason = end["reason"].as_str().unwrap_or_default();
        assert!(reason.ends_with("; stream ended: etcd-guard: shutting down"), "{end}");
    }
    Ok(())
}

/// Start the proxy binary in front of `etcd` (`extra`: more configuration lines); wait until it listens.
fn start_proxy(pki: &Pki, etcd: &Etcd, extra: &str) -> TestResult<(ProxyProcess, String)> {
    let proxy = proxy_process(env!("CARGO_BIN_EXE_guard-under-test"), pki, etcd, TEST_POLICY, extra)?;
    let addr = proxy.addr.clone();
    Ok((proxy, addr))
}
