//! Requests that crash etcd 3.4 or 3.5, or make it run out of memory, are refused as etcd refuses such requests,
//! not forwarded (found by fuzzing the proxy; each one also stops etcd again at every restart, as it is in the raft
//! log, or takes the whole cluster down). Each test sends one through the proxy with a real client, checks the
//! answer, and checks that etcd is still there.

use std::time::Duration;

use etcd_client::{AlarmAction, AlarmType, DeleteOptions, GetOptions, PutOptions, Txn, TxnOp};
use etcd_guard_tests::{EtcdCluster, Harness, Pki, TestResult, proxy_in_front_of};

/// The status code and message of a refusal (or "ok").
fn answer<T>(r: Result<T, etcd_client::Error>) -> String {
    match r {
        Ok(_) => "ok".to_string(),
        Err(etcd_client::Error::GRpcStatus(s)) => format!("{:?}: {}", s.code(), s.message()),
        Err(e) => format!("other error: {e}"),
    }
}

/// A put that keeps a key's value (or lease), after a delete to the end of the keyspace that covers the key in
/// the same transaction: etcd's duplicate key check misses it, and etcd 3.4 and 3.5 panic applying it.
#[tokio::test(flavor = "multi_thread")]
async fn a_put_keeping_the_value_of_a_key_the_transaction_deleted_is_refused() -> TestResult {
    let h = Harness::start().await?;
    let mut c = h.client(&h.admin()?).await?;
    c.put("zz/k2", "v", None).await?;
    for (what, put) in [
        ("ignore_value", PutOptions::new().with_ignore_value()),
        ("ignore_lease", PutOptions::new().with_ignore_lease()),
    ] {
        let txn = Txn::new().and_then([
            TxnOp::delete("zz/", Some(DeleteOptions::new().with_from_key())),
            TxnOp::put("zz/k2", "", Some(put)),
        ]);
        let refused = answer(c.txn(txn).await);
        assert_eq!(refused, "InvalidArgument: etcdserver: duplicate key given in txn request", "{what}");
        let mut direct = h.client_direct().await?;
        let kept = direct.get("zz/k2", None).await.map_err(|e| format!("etcd is gone after {what}: {e}"))?;
        assert_eq!(kept.kvs().len(), 1, "{what}: nothing was deleted");
    }
    // The same delete and a plain put, which etcd runs one after the other: still forwarded.
    let txn = Txn::new()
        .and_then([TxnOp::delete("zz/", Some(DeleteOptions::new().with_from_key())), TxnOp::put("zz/k2", "w", None)]);
    assert_eq!(answer(c.txn(txn).await), "ok");
    Ok(())
}

/// Nested transactions, each level within etcd's own limit of 128 operations, whose product is far more: etcd
/// runs every range into one answer (tens of thousands of ranges in a megabyte of request were gigabytes: etcd
/// ran out of memory). An identity allowed to read a prefix is refused as etcd refuses too many operations.
#[tokio::test(flavor = "multi_thread")]
async fn nested_transactions_running_more_operations_than_etcd_allows_are_refused() -> TestResult {
    let h = Harness::start().await?;
    let mut c = h.client(&h.cilium()?).await?;
    c.put("cilium/a", "v", None).await?;
    let ranges = |n: usize| -> Vec<TxnOp> {
        (0..n).map(|_| TxnOp::get("cilium/", Some(GetOptions::new().with_prefix()))).collect()
    };
    let level = |ops: Vec<TxnOp>| TxnOp::txn(Txn::new().and_then(ops));
    // 12 × 12 × 12 = 1,728 ranges.
    let inner: Vec<TxnOp> = (0..12).map(|_| level(ranges(12))).collect();
    let outer: Vec<TxnOp> = (0..12).map(|_| level(inner.clone())).collect();
    let refused = answer(c.txn(Txn::new().and_then(outer)).await);
    assert_eq!(refused, "InvalidArgument: etcdserver: too many operations in txn request");
    // 8 × 16 = 128, etcd's own limit: answered.
    let allowed: Vec<TxnOp> = (0..8).map(|_| level(ranges(16))).collect();
    let answered = c.txn(Txn::new().and_then(allowed)).await?;
    assert_eq!(answered.op_responses().len(), 8);
    Ok(())
}

/// Activating (or deactivating) alarm NONE: etcd 3.4 stops with "key required" applying it.
#[tokio::test(flavor = "multi_thread")]
async fn activating_alarm_none_is_refused() -> TestResult {
    let h = Harness::start().await?;
    let mut c = h.client(&h.admin()?).await?;
    for action in [AlarmAction::Activate, AlarmAction::Deactivate] {
        let refused = answer(c.alarm(action, AlarmType::None, None).await);
        assert_eq!(refused, "PermissionDenied: etcdserver: permission denied", "{action:?}");
        h.client_direct().await?.get("a", None).await.map_err(|e| format!("etcd is gone after {action:?}: {e}"))?;
    }
    assert_eq!(answer(c.alarm(AlarmAction::Get, AlarmType::None, None).await), "ok");
    Ok(())
}

/// A MemberUpdate with peer URLs etcd cannot dial: etcd stores them unchecked, and the other members panic.
#[tokio::test(flavor = "multi_thread")]
async fn a_member_update_with_peer_urls_etcd_cannot_use_is_refused() -> TestResult {
    let pki = Pki::new()?;
    let mut cluster = EtcdCluster::start(&pki, 2)?;
    let proxy = proxy_in_front_of(&pki, &cluster).await?;
    let admin = pki.client("admin", "admin", None, &[])?;
    let proxy_url = format!("https://{}", proxy.local_addr);
    let mut c = pki.etcd_client(&proxy_url, &admin, Some(Duration::from_secs(5))).await?;
    // The proxy answers MemberList with itself: etcd is asked directly.
    let mut direct = pki.etcd_client(&cluster.client_urls[0], &pki.upstream_client(), None).await?;
    let members = direct.member_list().await?;
    let m1 = members.members().iter().find(|m| m.name() == "m1").ok_or("no member m1")?;
    let (id, peer_urls) = (m1.id(), m1.peer_urls().to_vec());
    for urls in [vec!["x".to_string()], Vec::new(), vec!["http://127.0.0.1:2380/path".to_string()]] {
        let refused = answer(c.member_update(id, urls.clone()).await);
        assert_eq!(refused, "InvalidArgument: etcdserver: given member URLs are invalid", "{urls:?}");
    }
    // Its own peer URLs again: forwarded and answered.
    assert_eq!(answer(c.member_update(id, peer_urls).await), "ok");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..2 {
        assert!(cluster.alive(i)?, "member m{i} has stopped");
    }
    drop(c);
    proxy.stop().await;
    Ok(())
}
