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

/// A client that stops reading its watches holds up only its own streams. HTTP/2 flow control is per connection:
/// etcd's events a client leaves unread hold their connection's window, so on a connection to etcd shared with
/// others (before: 8 streams × 4 MiB unread filled its 16 MiB) etcd could answer nobody on it any more.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_its_watches_holds_up_nobody_else() -> TestResult {
    let h = Harness::start().await?;
    let mut stalled = h.client(&h.cilium()?).await?;
    let mut unread = Vec::new();
    for _ in 0..8 {
        let prefix = etcd_client::WatchOptions::new().with_prefix();
        unread.push(stalled.watch("cilium/big/", Some(prefix)).await?);
    }
    let mut direct = h.client_direct().await?;
    let value = vec![b'x'; 1 << 20];
    for i in 0..24 {
        direct.put(format!("cilium/big/{i}"), value.clone(), None).await?;
    }
    let mut admin = h.client(&h.admin()?).await?;
    for _ in 0..3 {
        let answer = tokio::time::timeout(Duration::from_secs(5), admin.get("cilium/big/0", None)).await;
        assert!(matches!(&answer, Ok(Ok(r)) if r.kvs().len() == 1), "{:?}", answer.map(|r| r.map(|_| ())));
    }
    // (The stalled client's own connection to the proxy is full of what it did not read: like a connection to etcd,
    // it carries nothing more for that client until it reads.)
    drop(unread);
    Ok(())
}

/// Connections etcd has open now (its end of each: local port `port`, ESTABLISHED), from /proc/net/tcp.
fn etcd_connections(port: u16) -> TestResult<usize> {
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    let port = format!(":{port:04X}");
    Ok(table
        .lines()
        .skip(1)
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields.len() > 3 && fields[1].ends_with(&port) && fields[3] == "01"
        })
        .count())
}

/// A client connection's own connection to etcd for its streams is made at its first stream and closed with it.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_connections_own_connection_to_etcd_ends_with_it() -> TestResult {
    let h = Harness::start().await?;
    let port: u16 = h.etcd.client_url.rsplit(':').next().ok_or("no port")?.parse()?;
    let mut c = h.client(&h.cilium()?).await?;
    c.get("cilium/x", None).await?;
    let mut direct = h.client_direct().await?;
    direct.get("cilium/x", None).await?;
    let before = etcd_connections(port)?;
    // A keep-alive stream (a watch may be served from a shared watch when `watch.coalesce` is on).
    let lease = c.lease_grant(30, None).await?.id();
    let (mut keeper, mut answers) = c.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    let got = tokio::time::timeout(Duration::from_secs(5), answers.message()).await;
    assert!(matches!(&got, Ok(Ok(Some(_)))), "{got:?}");
    assert_eq!(etcd_connections(port)?, before + 1, "a connection of its own for the stream");
    let mut other = c.watch("cilium/y", Some(etcd_client::WatchOptions::new().with_start_revision(1))).await?;
    direct.put("cilium/y", "1", None).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), other.message()).await;
    assert!(matches!(&got, Ok(Ok(Some(_)))), "{got:?}");
    assert_eq!(etcd_connections(port)?, before + 1, "its streams share it");
    drop((keeper, answers, other, c));
    let deadline = Instant::now() + Duration::from_secs(10);
    while etcd_connections(port)? > before {
        assert!(Instant::now() < deadline, "still {} connections, {} before", etcd_connections(port)?, before);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
