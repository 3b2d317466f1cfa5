//! Limits per identity: one identity over its rate gets ResourceExhausted while another keeps full speed; open
//! watches are capped per identity.

use std::time::Duration;

use etcd_client::{Txn, TxnOp, WatchOptions};
use etcd_guard_tests::{Harness, TestResult, http_get};

const POLICY: &str = r#"
roles:
  - name: admin
    keys: [ { prefix: "", access: readwrite } ]
    cluster: [admin]
  - name: cilium
    keys: [ { prefix: "cilium/", access: readwrite } ]
    cluster: [status, lease]
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

/// Each keep-alive of a scoped identity makes the proxy ask etcd for the lease's keys: keep-alives take from the
/// identity's rate, so a keep-alive stream cannot make etcd list a lease's keys faster than the identity may call.
#[tokio::test(flavor = "multi_thread")]
async fn lease_keep_alives_take_from_the_identitys_rate() -> TestResult {
    let h = Harness::with_policy(POLICY).await?;
    let mut cilium = h.client(&h.cilium()?).await?;
    let lease = cilium.lease_grant(60, None).await?.id();
    cilium.put("cilium/leased", "v", Some(etcd_client::PutOptions::new().with_lease(lease))).await?;
    let (mut keeper, mut answers) = cilium.lease_keep_alive(lease).await?;
    // 200 keep-alives sent without waiting (the burst is 20; whatever the machine's speed, 200 take far less than
    // the 9 s in which the rate would refill that many), then every answer read.
    let sender = tokio::spawn(async move {
        for _ in 0..200 {
            if keeper.keep_alive().await.is_err() {
                break;
            }
        }
        keeper
    });
    let (mut answered, mut ended) = (0, None);
    loop {
        match tokio::time::timeout(Duration::from_secs(10), answers.message()).await {
            Ok(Ok(Some(_))) => answered += 1,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                ended = Some(e.to_string());
                break;
            }
            Err(_) => break,
        }
    }
    drop(sender.await?);
    eprintln!("{answered} keep-alives answered, then: {ended:?}");
    assert!(answered < 200, "keep-alives past the rate were answered: {answered}");
    let ended = ended.ok_or("the keep-alive stream was not ended")?;
    assert!(ended.contains("requests per second"), "{ended}");
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

/// A request of one message whose message never arrives is undecided, and so is not yet counted by any limit of
/// the policy: a connection may hold at most `MAX_RECEIVING` of them (even an identity the policy grants nothing,
/// as here), a further one is refused with `REFUSED_STREAM`, the connection keeps working, and a request whose
/// message arrives makes room again.
#[tokio::test(flavor = "multi_thread")]
async fn requests_whose_message_never_arrives_are_capped_per_connection() -> TestResult {
    use bytes::Bytes;
    use etcd_guard::http2::server::MAX_RECEIVING;
    use etcd_guard_proto::methods::KV_RANGE;
    use http_body::Frame;
    use tonic::codegen::Service;

    type Sender = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, std::convert::Infallible>>;
    fn request(body: tonic::body::Body) -> TestResult<http::Request<tonic::body::Body>> {
        etcd_guard_tests::grpc_request(KV_RANGE, body)
    }
    /// A request body that is sent as it is fed.
    fn fed() -> (Sender, tonic::body::Body) {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        (tx, tonic::body::Body::new(http_body_util::StreamBody::new(stream)))
    }
    fn message() -> Bytes {
        let msg = etcd_guard_proto::etcdserverpb::RangeRequest { key: b"cilium/x".to_vec(), ..Default::default() };
        etcd_guard_tests::grpc_message(&msg)
    }
    /// The answer's grpc-status (a trailers-only answer carries it in its headers).
    async fn grpc_status(response: http::Response<hyper::body::Incoming>) -> TestResult<String> {
        use http_body_util::BodyExt;
        if let Some(s) = response.headers().get("grpc-status") {
            return Ok(s.to_str()?.to_string());
        }
        let trailers = response.into_body().collect().await?.trailers().cloned().ok_or("no trailers")?;
        Ok(trailers.get("grpc-status").ok_or("no grpc-status")?.to_str()?.to_string())
    }

    let h = Harness::with_policy(POLICY).await?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.nobody()?, None).await?;
    let mut stalled = Vec::new();
    for _ in 0..MAX_RECEIVING {
        let (feed, body) = fed();
        std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
        stalled.push((feed, tokio::spawn(conn.call(request(body)?))));
    }
    // Streams reach the proxy in the order they were opened: this one comes after all of the stalled ones.
    let refused = conn.call(request(tonic::body::Body::new(http_body_util::Full::new(message())))?).await;
    let refused = refused.err().ok_or("the request over the limit was served")?;
    assert!(format!("{refused:?}").contains("REFUSED_STREAM"), "{refused:?}");
    // No gRPC call, so no audit record: counted for the operator.
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    assert!(metrics.contains("etcd_guard_limited_total{limit=\"receiving\"} 1"), "{metrics}");

    // One stalled request's message arrives: it is decided (this identity may do nothing) and answered ...
    let (feed, answer) = stalled.pop().ok_or("none stalled")?;
    feed.send(Ok(Frame::data(message()))).await?;
    drop(feed);
    let answer = tokio::time::timeout(Duration::from_secs(10), answer).await???;
    assert_eq!(grpc_status(answer).await?, "7", "PermissionDenied, as etcd answers");
    // ... and a new request on the same connection is served again.
    let served = conn.call(request(tonic::body::Body::new(http_body_util::Full::new(message())))?);
    let served = tokio::time::timeout(Duration::from_secs(10), served).await??;
    assert_eq!(grpc_status(served).await?, "7");
    // The requests still stalled are not answered: nothing was decided for them.
    assert!(stalled.iter().all(|(_, answer)| !answer.is_finished()));
    Ok(())
}

/// `limits.max_connections` counts connections from the accept, handshakes included, and
/// `limits.max_handshakes_per_address` handshakes in progress from one address: over either, a new connection is
/// closed before any TLS work, and counted by limit; once one closes, the next is served.
#[tokio::test(flavor = "multi_thread")]
async fn connections_over_a_connection_limit_are_closed_at_once() -> TestResult {
    for (limit, section) in [
        ("max_connections", "limits: { max_connections: 2 }\n"),
        ("max_handshakes_per_address", "limits: { max_handshakes_per_address: 2 }\n"),
    ] {
        let h = Harness::with_config(POLICY, section).await?;
        let admin = h.admin()?;
        // Two connections that never start TLS hold both slots (until the 10 s handshake timeout).
        let first = tokio::net::TcpStream::connect(h.proxy_addr).await?;
        let second = tokio::net::TcpStream::connect(h.proxy_addr).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let third = tokio::time::timeout(Duration::from_secs(5), etcd_guard_tests::bare_h2(&h, &admin, None)).await?;
        assert!(third.is_err(), "{limit}: a third connection was served");
        let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
        let (_, metrics) = http_get(addr, "/metrics")?;
        let counted = format!("etcd_guard_client_connections_refused_total{{limit=\"{limit}\"}} ");
        assert!(metrics.lines().any(|l| l.starts_with(&counted) && !l.ends_with(" 0")), "{counted}: {metrics}");
        drop((first, second));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = h.client(&admin).await?;
        c.put("after", "v", None).await?;
        // A client that finished its handshake no longer counts against the address.
        if limit == "max_handshakes_per_address" {
            let mut more = Vec::new();
            for _ in 0..3 {
                more.push(h.client(&admin).await?);
            }
            for c in &mut more {
                c.put("more", "v", None).await?;
            }
        }
    }
    Ok(())
}

/// `limits.max_txn_ops` follows etcd's `--max-txn-ops`: a transaction that may run more operations is refused as
/// etcd refuses it, one within the bound goes through.
#[tokio::test(flavor = "multi_thread")]
async fn transactions_are_bounded_by_the_configured_max_txn_ops() -> TestResult {
    let h = Harness::with_config(POLICY, "audit: { file: audit/audit.log }\nlimits: { max_txn_ops: 4 }\n").await?;
    let mut admin = h.client(&h.admin()?).await?;
    let puts =
        |n: usize| Txn::new().and_then((0..n).map(|i| TxnOp::put(format!("t/{i}"), "v", None)).collect::<Vec<_>>());
    assert!(admin.txn(puts(4)).await?.succeeded());
    let refused = admin.txn(puts(5)).await.err();
    assert!(
        matches!(&refused, Some(etcd_client::Error::GRpcStatus(s)) if s.code() == tonic::Code::InvalidArgument
            && s.message() == "etcdserver: too many operations in txn request"),
        "{refused:?}"
    );
    assert!(admin.get("t/4", None).await?.kvs().is_empty(), "nothing of the refused transaction was applied");
    Ok(())
}

/// Lock calls waiting at etcd for a lock another client holds count against their identity's concurrency limit and
/// a proxy-wide budget of their own (as large as `limits.max_concurrent_requests`), not against the calls' one: one
/// identity's waiters cannot fill that and starve everyone else, and past their own budget they are refused.
#[tokio::test(flavor = "multi_thread")]
async fn waiting_locks_do_not_hold_the_global_budget() -> TestResult {
    let h = Harness::with_config(POLICY, "limits: { max_concurrent_requests: 2 }\n").await?;
    let mut admin = h.client(&h.admin()?).await?;
    let held = admin.lease_grant(60, None).await?.id();
    admin.lock("cilium/lk", Some(etcd_client::LockOptions::new().with_lease(held))).await?;
    let cilium = h.client(&h.cilium()?).await?;
    let mut waiting = Vec::new();
    for _ in 0..3 {
        let mut c = cilium.clone();
        let lease = c.lease_grant(60, None).await?.id();
        waiting.push(tokio::spawn(async move {
            c.lock("cilium/lk", Some(etcd_client::LockOptions::new().with_lease(lease))).await.map(|_| ())
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = waiting.pop().ok_or("no third waiter")?;
    for w in &waiting {
        assert!(!w.is_finished(), "a waiting lock was answered while the lock is held");
    }
    match tokio::time::timeout(Duration::from_secs(5), third).await?? {
        Err(etcd_client::Error::GRpcStatus(s)) => {
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("Lock and Campaign calls waiting"), "{s:?}");
        }
        other => return Err(format!("the third waiter: {other:?}").into()),
    }
    for i in 0..5 {
        admin.put(format!("a/{i}"), "v", None).await?;
    }
    for w in waiting {
        w.abort();
    }
    Ok(())
}
