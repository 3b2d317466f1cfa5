//! A scoped identity (cilium, `prefix: "cilium/"`) through etcd-guard in front of a real etcd: it can use its
//! prefix and is denied everything else with etcd's exact error.

use etcd_client::{
    Compare, CompareOp, DeleteOptions, GetOptions, LeaseGrantOptions, ProclaimOptions, PutOptions, ResignOptions, Txn,
    TxnOp, WatchOptions,
};
use std::time::Duration;

use etcd_guard_tests::{Harness, TestResult, http_get, stderr, stdout};

const DENIED: &str = "etcdserver: permission denied";

fn is_denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::PermissionDenied && s.message() == DENIED)
}

#[tokio::test(flavor = "multi_thread")]
async fn scoped_identity_uses_its_prefix_and_nothing_else() -> TestResult {
    let h = Harness::start().await?;
    let cilium = h.cilium()?;
    let admin = h.admin()?;
    // Keys around the grant's edges, written directly to etcd.
    for k in ["cilium", "cilium0", "cilium/a", "cilium/b", "secret", "zzz"] {
        assert!(h.ctl_direct(&["put", k, "v"])?.status.success());
    }

    // Inside the prefix: everything works.
    let out = h.ctl(&cilium, &["put", "cilium/x", "1"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    let out = h.ctl(&cilium, &["get", "--prefix", "cilium/"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "cilium/a\nv\ncilium/b\nv\ncilium/x\n1\n");

    // Outside, with etcdctl: etcd's exact error.
    for args in [
        vec!["get", "cilium"],
        vec!["get", "cilium0"],
        vec!["put", "cilium0", "x"],
        vec!["del", "secret"],
        vec!["get", "--from-key", "cilium/"],
        vec!["get", "--prefix", ""],
        vec!["get", "--prefix", "cilium"],
        vec!["get", "cilium/", "cilium1"],
        vec!["snapshot", "save", "/dev/null"],
        vec!["defrag"],
        vec!["compaction", "1"],
        vec!["auth", "enable"],
        vec!["user", "list"],
        vec!["member", "add", "x", "--peer-urls=http://127.0.0.1:1"],
        vec!["member", "remove", "1234"],
        vec!["lease", "list"],
    ] {
        let out = h.ctl(&cilium, &args)?;
        assert!(!out.status.success(), "{args:?} should be denied: {}", stdout(&out));
        assert!(stderr(&out).contains(DENIED), "{args:?}: {}", stderr(&out));
    }

    // Outside, with the etcd-client crate and byte-exact ranges.
    let mut c = h.client(&cilium).await?;
    // One byte past the prefix's end: [cilium/, cilium0\x00) covers the key "cilium0".
    let e = c.get("cilium/", Some(GetOptions::new().with_range(b"cilium0\0".to_vec()))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    // Exactly the prefix as a range is fine.
    let r = c.get("cilium/", Some(GetOptions::new().with_range("cilium0"))).await?;
    assert_eq!(r.kvs().len(), 3);
    let e = c.get("\0", Some(GetOptions::new().with_range(b"\0".to_vec()))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "whole keyspace: {e:?}");
    let e = c.delete("cilium/", Some(DeleteOptions::new().with_from_key())).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");

    // Txn: a compare outside the grant, an op outside in the branch that would not run, a nested op outside.
    let compare_outside = Txn::new()
        .when([Compare::value("secret", CompareOp::Equal, "v")])
        .and_then([TxnOp::put("cilium/t", "1", None)]);
    let e = c.txn(compare_outside).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    let failure_outside = Txn::new()
        .when([Compare::version("cilium/a", CompareOp::Greater, 0)])
        .and_then([TxnOp::put("cilium/t", "1", None)])
        .or_else([TxnOp::delete("zzz", None)]);
    let e = c.txn(failure_outside).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    let nested = Txn::new().and_then([TxnOp::txn(Txn::new().and_then([TxnOp::get("secret", None)]))]);
    let e = c.txn(nested).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    let inside = Txn::new()
        .when([Compare::version("cilium/a", CompareOp::Greater, 0)])
        .and_then([TxnOp::txn(Txn::new().and_then([TxnOp::put("cilium/n", "1", None)]))]);
    assert!(c.txn(inside).await?.succeeded());

    // Alarm changes need `alarm` (etcdctl's disarm only lists when nothing is raised, so send one directly).
    let e = c.alarm(etcd_client::AlarmAction::Deactivate, etcd_client::AlarmType::Nospace, None).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "alarm deactivate: {e:?}");
    assert!(c.alarm(etcd_client::AlarmAction::Get, etcd_client::AlarmType::None, None).await.is_ok());

    // Nothing outside was changed by any of that.
    let direct = h.ctl_direct(&["get", "zzz"])?;
    assert_eq!(stdout(&direct), "zzz\nv\n");
    drop(admin);
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_watch_keeps_the_stream_usable() -> TestResult {
    let h = Harness::start().await?;
    let mut c = h.client(&h.cilium()?).await?;
    let mut stream = c.watch("b/", Some(WatchOptions::new().with_prefix())).await?;
    let first = stream.message().await?.ok_or("stream ended")?;
    assert!(first.created() && first.canceled(), "{first:?}");
    assert_eq!(first.watch_id(), -1);
    assert_eq!(first.cancel_reason(), "rpc error: code = PermissionDenied desc = etcdserver: permission denied");

    // Same stream: an allowed watch, then an event on it.
    stream.watch("cilium/", Some(WatchOptions::new().with_prefix())).await?;
    let created = stream.message().await?.ok_or("stream ended")?;
    assert!(created.created() && !created.canceled(), "{created:?}");
    c.put("cilium/w", "1", None).await?;
    let event = stream.message().await?.ok_or("stream ended")?;
    assert_eq!(event.events().len(), 1);
    assert_eq!(event.events()[0].kv().map(|kv| kv.key()), Some(&b"cilium/w"[..]));

    // Creates answered in order: allowed, denied, allowed.
    stream.watch("cilium/1", None).await?;
    stream.watch("secret", None).await?;
    stream.watch("cilium/2", None).await?;
    let a = stream.message().await?.ok_or("stream ended")?;
    let b = stream.message().await?.ok_or("stream ended")?;
    let d = stream.message().await?.ok_or("stream ended")?;
    assert!(a.created() && !a.canceled() && a.watch_id() >= 0, "{a:?}");
    assert!(b.created() && b.canceled() && b.watch_id() == -1, "{b:?}");
    assert!(d.created() && !d.canceled() && d.watch_id() >= 0, "{d:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_of_another_identity_are_off_limits() -> TestResult {
    let h = Harness::start().await?;
    let mut b = h.client(&h.tenant_b()?).await?;
    let mut c = h.client(&h.cilium()?).await?;
    let lease = b.lease_grant(60, None).await?.id();
    b.put("b/owned", "1", Some(PutOptions::new().with_lease(lease))).await?;

    let e = c.lease_revoke(lease).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "revoke: {e:?}");
    let e = c.lease_time_to_live(lease, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "timetolive --keys: {e:?}");
    // The owner sees its lease's keys; they are checked on etcd's answer itself, not by a lookup before it.
    let before = lease_lookups(&h)?;
    let own = b.lease_time_to_live(lease, Some(etcd_client::LeaseTimeToLiveOptions::new().with_keys())).await?;
    assert_eq!(own.keys(), [b"b/owned".to_vec()]);
    assert_eq!(lease_lookups(&h)?, before, "no lookup for TimeToLive");
    // Attaching one's own key to another identity's lease is a write on that lease's keys.
    let e = c.put("cilium/x", "1", Some(PutOptions::new().with_lease(lease))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "put with lease: {e:?}");
    // Keep-alive of the other identity's lease: the stream ends with PermissionDenied (etcd-client sees it as
    // soon as it opens the stream, since it sends the first keep-alive with the open).
    match c.lease_keep_alive(lease).await {
        Err(e) => assert!(is_denied(&e), "keep-alive: {e:?}"),
        Ok((mut keeper, mut responses)) => {
            let _ = keeper.keep_alive().await;
            let r = responses.message().await;
            assert!(matches!(&r, Err(e) if is_denied(e)), "keep-alive: {r:?}");
        }
    }

    // Proclaim and Resign make etcd's election server use the leader's lease (keep it alive; Proclaim puts the
    // leader key under it): with another identity's lease they are refused like a put with that lease.
    let mine = c.lease_grant(60, None).await?.id();
    let leader = c.campaign("cilium/elect", "v1", mine).await?.take_leader().ok_or("no leader key")?;
    let theirs = leader.clone().with_lease(lease);
    let e = c.proclaim("v2", Some(ProclaimOptions::new().with_leader(theirs.clone()))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "proclaim with another's lease: {e:?}");
    let e = c.resign(Some(ResignOptions::new().with_leader(theirs))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "resign with another's lease: {e:?}");
    // Without a leader key etcd does nothing and says so; the proxy answers the same, whoever asks.
    let mut direct = h.client_direct().await?;
    for (what, through_proxy) in [("cilium", &mut c), ("etcd", &mut direct)] {
        let e = through_proxy.proclaim("v2", None).await.err();
        let text = format!("{e:?}");
        assert!(text.contains("Unknown") && text.contains("leader\\\" field must be provided"), "{what}: {text}");
        let e = through_proxy.resign(None).await.err();
        assert!(format!("{e:?}").contains("field must be provided"), "{what}: {e:?}");
    }
    // With its own lease, as a campaigner uses them.
    c.proclaim("v2", Some(ProclaimOptions::new().with_leader(leader.clone()))).await?;
    c.resign(Some(ResignOptions::new().with_leader(leader))).await?;
    c.lease_revoke(mine).await?;

    // The owner still can; the key survived.
    let (mut keeper, mut responses) = b.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    assert!(responses.message().await?.is_some_and(|r| r.ttl() > 0));
    assert_eq!(b.get("b/owned", None).await?.kvs().len(), 1);
    b.lease_revoke(lease).await?;
    assert_eq!(b.get("b/owned", None).await?.kvs().len(), 0);

    // A lease with no keys can be used by anyone with the lease capability.
    let own = c.lease_grant(60, None).await?.id();
    c.put("cilium/leased", "1", Some(PutOptions::new().with_lease(own))).await?;
    c.lease_revoke(own).await?;

    // A lease ID of the client's choosing: granted ahead of etcd's counter, it would make others' grants fail
    // ("lease already exists"). Only an identity with every cluster capability may choose one.
    let ahead = own + 1_000;
    let e = c.lease_grant(60, Some(LeaseGrantOptions::new().with_id(ahead))).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "grant with a chosen ID: {e:?}");
    assert!(b.lease_time_to_live(ahead, None).await?.ttl() <= 0, "no lease was granted");
    let mut admin = h.client(&h.admin()?).await?;
    assert_eq!(admin.lease_grant(60, Some(LeaseGrantOptions::new().with_id(ahead))).await?.id(), ahead);
    admin.lease_revoke(ahead).await?;
    Ok(())
}

/// `etcd_guard_lease_key_lookups_total` from the proxy's metrics.
fn lease_lookups(h: &Harness) -> TestResult<u64> {
    counter(h, "etcd_guard_lease_key_lookups_total")
}

/// The value of a counter on the proxy's metrics listener.
fn counter(h: &Harness, name: &str) -> TestResult<u64> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics")?;
    let (_, metrics) = http_get(addr, "/metrics")?;
    let line =
        metrics.lines().find(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' '))).ok_or("no counter")?;
    Ok(line.rsplit(' ').next().unwrap_or_default().parse()?)
}

#[tokio::test(flavor = "multi_thread")]
async fn lease_keys_are_looked_up_only_for_identities_that_may_not_write_every_key() -> TestResult {
    let h = Harness::start().await?;
    let mut admin = h.client(&h.admin()?).await?;
    let mut b = h.client(&h.tenant_b()?).await?;

    // The admin may write every key: whatever keys a lease has, they are covered; etcd is not asked.
    let lease = admin.lease_grant(60, None).await?.id();
    admin.put("b/by-admin", "1", Some(PutOptions::new().with_lease(lease))).await?;
    let (mut keeper, mut acks) = admin.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    assert!(acks.message().await?.is_some_and(|a| a.ttl() > 0));
    assert_eq!(lease_lookups(&h)?, 0, "no lookup for an identity that may write every key");

    // tenant-b may write only b/: its use of the same lease is checked against the lease's keys at etcd, and
    // allowed (the only key is b/by-admin).
    let (mut keeper, mut acks) = b.lease_keep_alive(lease).await?;
    keeper.keep_alive().await?;
    assert!(acks.message().await?.is_some_and(|a| a.ttl() > 0));
    let after_keep_alives = lease_lookups(&h)?;
    assert!(after_keep_alives >= 1, "tenant-b's keep-alives are checked at etcd");
    // Once the lease holds a key outside b/, tenant-b may no longer use it.
    admin.put("elsewhere", "1", Some(PutOptions::new().with_lease(lease))).await?;
    assert_eq!(lease_lookups(&h)?, after_keep_alives, "the admin's put asked nothing");
    let e = b.lease_revoke(lease).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "revoke: {e:?}");
    assert!(lease_lookups(&h)? > after_keep_alives);
    admin.lease_revoke(lease).await?;
    Ok(())
}

/// A transaction's lease needs are looked up once per lease, and one naming more than 1,024 leases (in branches
/// that do not all run) is refused before etcd is asked anything.
#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_asks_for_each_lease_once_and_for_at_most_1024() -> TestResult {
    use etcd_client::{Txn, TxnOp};
    let h = Harness::start().await?;
    let mut admin = h.client(&h.admin()?).await?;
    let mut b = h.client(&h.tenant_b()?).await?;
    let lease = admin.lease_grant(60, None).await?.id();
    let before = lease_lookups(&h)?;
    let puts: Vec<TxnOp> =
        (0..3).map(|i| TxnOp::put(format!("b/{i}"), "v", Some(PutOptions::new().with_lease(lease)))).collect();
    b.txn(Txn::new().and_then(puts)).await?;
    assert_eq!(lease_lookups(&h)? - before, 1, "three puts with one lease: one lookup");

    // 2,048 leases that do not exist (each lookup is answered at once: not found), in a tree of nested
    // transactions with a put in either branch at each of 11 levels: one put runs, within etcd's 128 operations.
    fn tree(depth: u32, lease: &mut i64) -> TxnOp {
        if depth == 0 {
            *lease += 1;
            return TxnOp::put("b/x", "v", Some(PutOptions::new().with_lease(*lease)));
        }
        let success = tree(depth - 1, lease);
        let failure = tree(depth - 1, lease);
        TxnOp::txn(Txn::new().and_then([success]).or_else([failure]))
    }
    let mut next = lease;
    let e = b.txn(Txn::new().and_then([tree(11, &mut next)])).await.err();
    let refused = matches!(&e, Some(etcd_client::Error::GRpcStatus(s))
        if s.code() == tonic::Code::ResourceExhausted && s.message().contains("at most 1024 leases"));
    assert!(refused, "{e:?}");
    assert!(lease_lookups(&h)? - before <= 1 + 1024, "no lookup past the 1,024th");
    admin.lease_revoke(lease).await?;
    Ok(())
}

/// For each `(client, prefix)`, `n` puts of `<prefix>shared-<i>` with `lease`, all sent at once and interleaved;
/// how many of each client's were allowed and how many denied.
async fn concurrent_leased_puts(
    clients: &[(&etcd_client::Client, &str)],
    lease: i64,
    n: usize,
) -> TestResult<Vec<(usize, usize)>> {
    let mut puts = tokio::task::JoinSet::new();
    for i in 0..n {
        for (c, (client, prefix)) in clients.iter().enumerate() {
            let mut client = (*client).clone();
            let key = format!("{prefix}shared-{i}");
            puts.spawn(async move { (c, client.put(key, "v", Some(PutOptions::new().with_lease(lease))).await) });
        }
    }
    let mut counts = vec![(0, 0); clients.len()];
    while let Some(put) = puts.join_next().await {
        let (c, answer) = put?;
        let count = counts.get_mut(c).ok_or("no such client")?;
        match answer {
            Ok(_) => count.0 += 1,
            Err(e) if is_denied(&e) => count.1 += 1,
            Err(e) => return Err(format!("a leased put failed: {e}").into()),
        }
    }
    Ok(counts)
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uses_of_a_lease_share_lookups_that_see_its_latest_keys() -> TestResult {
    let h = Harness::start().await?;
    let mut admin = h.client(&h.admin()?).await?;
    let mut b = h.client(&h.tenant_b()?).await?;
    let lease = b.lease_grant(60, None).await?.id();
    b.put("b/first", "v", Some(PutOptions::new().with_lease(lease))).await?;

    // 200 puts with the lease at once: each needs the lease's keys, and they wait for shared lookups.
    let waits = "etcd_guard_lease_key_lookup_waits_total";
    let (before, waited_before) = (lease_lookups(&h)?, counter(&h, waits)?);
    assert_eq!(concurrent_leased_puts(&[(&b, "b/")], lease, 200).await?, [(200, 0)]);
    let lookups = lease_lookups(&h)? - before;
    assert!((1..100).contains(&lookups), "200 concurrent leased puts made {lookups} lookups");
    assert_eq!(counter(&h, waits)? - waited_before, 200, "every put waited for a lookup");

    // Requests of two identities that wait for the same lookups each get their own verdict: cilium may not write
    // the lease's b/ keys, so it may not attach even a key of its own prefix. (Four rounds: the two connections'
    // requests do not always meet in one lookup.)
    let cilium = h.client(&h.cilium()?).await?;
    for _ in 0..4 {
        let both = concurrent_leased_puts(&[(&b, "b/"), (&cilium, "cilium/")], lease, 100).await?;
        assert_eq!(both, [(100, 0), (0, 100)]);
    }

    // Once the admin has attached a key outside b/, no later use by tenant-b is answered from an earlier lookup.
    admin.put("elsewhere", "1", Some(PutOptions::new().with_lease(lease))).await?;
    assert_eq!(concurrent_leased_puts(&[(&b, "b/")], lease, 50).await?, [(0, 50)]);
    let e = b.lease_revoke(lease).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "revoke: {e:?}");
    admin.lease_revoke(lease).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn unbound_identity_gets_nothing() -> TestResult {
    let h = Harness::start().await?;
    let nobody = h.nobody()?;
    for args in [vec!["get", "a"], vec!["put", "a", "b"], vec!["endpoint", "status"], vec!["member", "list"]] {
        let out = h.ctl(&nobody, &args)?;
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(DENIED), "{args:?}: {}", stderr(&out));
    }
    let mut c = h.client(&nobody).await?;
    let e = c.lease_grant(10, None).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "{e:?}");
    // A transaction that touches nothing still answers with the cluster's revision and member: not for an
    // identity that no binding matches (etcd would answer any authenticated user).
    let e = c.txn(etcd_client::Txn::new()).await.err();
    assert!(e.as_ref().is_some_and(is_denied), "empty txn: {e:?}");
    let mut admin = h.client(&h.admin()?).await?;
    admin.txn(etcd_client::Txn::new()).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn read_only_role_with_deny_cannot_read_secrets() -> TestResult {
    let h = Harness::start().await?;
    let mon = h.pki.client("monitoring", "prometheus", Some("monitoring"), &[])?;
    for k in ["/registry/pods/a", "/registry/secrets/s"] {
        assert!(h.ctl_direct(&["put", k, "v"])?.status.success());
    }
    let out = h.ctl(&mon, &["get", "/registry/pods/a"])?;
    assert!(out.status.success(), "{}", stderr(&out));
    for args in [
        vec!["get", "/registry/secrets/s"],
        vec!["get", "--prefix", "/registry/"],
        vec!["put", "/registry/pods/a", "x"],
    ] {
        let out = h.ctl(&mon, &args)?;
        assert!(stderr(&out).contains(DENIED), "{args:?}: {}", stderr(&out));
    }
    Ok(())
}

/// Creates the proxy refuses wait, in order, behind creates still waiting for etcd's answers (here etcd is paused;
/// a client that does not read its stream leaves them waiting the same way). Their number is bounded: past 4096
/// waiting, the stream ends with `ResourceExhausted` instead of the proxy holding every refusal a client sends.
#[tokio::test(flavor = "multi_thread")]
async fn refused_watch_creates_waiting_behind_unread_answers_are_bounded() -> TestResult {
    use bytes::{Buf, Bytes};
    use etcd_guard_proto::etcdserverpb::{WatchCreateRequest, WatchRequest, WatchResponse, watch_request};
    use http_body::Frame;
    use http_body_util::BodyExt;
    use prost::Message;
    use tonic::codegen::Service;

    fn create(key: &str) -> Bytes {
        let msg = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(WatchCreateRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })),
        };
        etcd_guard_tests::grpc_message(&msg)
    }

    // Creates at etcd: with `watch.coalesce` they would join shared watches, answered through a bounded queue.
    let extra = "audit: { file: audit/audit.log }\nwatch: { coalesce: false }\n";
    let h = Harness::with_config(etcd_guard_tests::TEST_POLICY, extra).await?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.cilium()?, None).await?;
    let (feed, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(8192);
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let request = etcd_guard_tests::grpc_request(etcd_guard_proto::methods::WATCH_WATCH, body)?;
    std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
    let answer = tokio::spawn(conn.call(request));
    // One watch, answered: the stream is open at etcd.
    feed.send(Ok(Frame::data(create("cilium/0")))).await?;
    let response = tokio::time::timeout(Duration::from_secs(10), answer).await???;
    let mut body = response.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame()).await?.ok_or("the stream ended")??;
    let mut data = first.into_data().map_err(|_| "not the created answer")?.to_vec();
    // etcd stops answering: the next allowed creates wait at etcd, and the refused ones behind them.
    h.etcd.pause()?;
    const ALLOWED: usize = 10;
    for i in 1..=ALLOWED {
        feed.send(Ok(Frame::data(create(&format!("cilium/{i}"))))).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    const REFUSED: usize = 5000;
    for _ in 0..REFUSED {
        feed.send(Ok(Frame::data(create("secret/x")))).await?;
    }
    drop(feed);

    // Read what comes, then let etcd go on.
    let mut status = None;
    while let Ok(Some(frame)) = tokio::time::timeout(Duration::from_secs(5), body.frame()).await {
        let frame = frame?;
        match frame.into_data() {
            Ok(bytes) => data.extend_from_slice(&bytes),
            Err(frame) => {
                status = frame.trailers_ref().and_then(|t| t.get("grpc-status")).map(|s| s.as_bytes().to_vec());
            }
        }
    }
    h.etcd.resume()?;
    let (mut created, mut canceled) = (0, 0);
    let mut rest = &data[..];
    while rest.len() >= 5 {
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        rest.advance(5);
        let response = WatchResponse::decode(&rest[..len.min(rest.len())])?;
        rest.advance(len.min(rest.len()));
        if response.canceled {
            canceled += 1;
        } else if response.created {
            created += 1;
        }
    }
    assert_eq!(created, 1, "only the first create was answered before etcd stopped");
    assert!(canceled < REFUSED, "{canceled} refusals answered: the stream should have ended before");
    assert_eq!(status.as_deref(), Some(&b"8"[..]), "ResourceExhausted; {canceled} refusals answered first");
    Ok(())
}
