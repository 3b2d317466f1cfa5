//! The upstream leg: client deadlines reach etcd, and an unreachable etcd is `Unavailable`.

use std::time::{Duration, Instant};

use etcd_guard_proto::v3lockpb::LockRequest;
use etcd_guard_proto::v3lockpb::lock_client::LockClient;
use etcd_guard_tests::{Harness, TestResult, bare_h2};
use tonic::Code;

#[tokio::test(flavor = "multi_thread")]
async fn client_deadline_reaches_etcd() -> TestResult {
    let h = Harness::start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    // Hold a lock, then ask for it again with a 300 ms deadline over a connection that only sends `grpc-timeout`:
    // it is etcd that gives up, so `DeadlineExceeded` within seconds shows the deadline went through the proxy.
    let lease = c.lease_grant(30, None).await?.id();
    c.lock("held", Some(etcd_client::LockOptions::new().with_lease(lease))).await?;

    let other_lease = c.lease_grant(30, None).await?.id();
    let mut lock = LockClient::with_origin(bare_h2(&h, &admin, None).await?, "https://localhost".parse()?);
    let mut req = tonic::Request::new(LockRequest { name: b"held".to_vec(), lease: other_lease });
    req.set_timeout(Duration::from_millis(300));
    let started = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(10), lock.lock(req)).await;
    let status = match r {
        Ok(Err(status)) => status,
        Ok(Ok(_)) => return Err("the second lock must not be granted while the first is held".into()),
        Err(_) => return Err("no answer within 10 s: the deadline did not reach etcd".into()),
    };
    // etcd answers in one of two ways, depending on which of its goroutines sees the deadline first: grpc-go's
    // transport (`DeadlineExceeded`) or the lock handler returning Go's context error (`Unknown`, "context deadline
    // exceeded"). Both come from etcd; the proxy forwards either unchanged.
    let from_etcd = status.code() == Code::DeadlineExceeded
        || (status.code() == Code::Unknown && status.message() == "context deadline exceeded");
    assert!(from_etcd, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_etcd_is_unavailable() -> TestResult {
    let mut h = Harness::start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    c.put("k", "v", None).await?;
    h.etcd.kill()?;
    let e = c.get("k", None).await.err();
    match e {
        Some(etcd_client::Error::GRpcStatus(s)) => assert_eq!(s.code(), Code::Unavailable, "{s:?}"),
        other => return Err(format!("expected Unavailable, got {other:?}").into()),
    }
    Ok(())
}

/// clientv3 and kube-apiserver ping idle connections (every 30 s, or as configured, e.g. 5 s): the listener must
/// answer pings, not close the connection. Here a client pings every 300 ms for 3 s, then uses the connection.
#[tokio::test(flavor = "multi_thread")]
async fn frequent_client_pings_keep_the_connection() -> TestResult {
    use etcd_guard_proto::etcdserverpb::RangeRequest;
    use etcd_guard_proto::etcdserverpb::kv_client::KvClient;
    let h = Harness::start().await?;
    let conn = bare_h2(&h, &h.admin()?, Some(Duration::from_millis(300))).await?;
    let mut kv = KvClient::with_origin(conn, "https://localhost".parse()?);
    kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() }).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Same HTTP/2 connection (BareH2 never reconnects): it is still open.
    kv.range(RangeRequest { key: b"a".to_vec(), ..Default::default() }).await?;
    Ok(())
}
