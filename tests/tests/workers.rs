//! The proxy as the binary runs it: connections served on worker threads (`worker_threads`), each worker with its
//! own upstream connections. Clients on several connections (so on every worker) use KV, watches, leases and get
//! etcd's denial, and the audit log holds a record of each call.

use std::time::Duration;

use etcd_client::PutOptions;
use etcd_guard_tests::{Harness, TEST_POLICY, TestResult};
use futures_util::future::try_join_all;

const CONNECTIONS: usize = 6;

fn is_denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::PermissionDenied && s.message() == "etcdserver: permission denied")
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_on_every_worker_are_served_checked_and_audited() -> TestResult {
    let mut h = Harness::with_config(TEST_POLICY, "audit: { file: audit/audit.log }\nworker_threads: 3\n").await?;
    let (admin, cilium) = (h.admin()?, h.cilium()?);
    // Connections are given to the workers in turn: six connections, two on each of the three.
    let mut clients = Vec::new();
    for i in 0..CONNECTIONS {
        clients.push(h.client(if i % 2 == 0 { &admin } else { &cilium }).await?);
    }
    let work = clients.iter().cloned().enumerate().map(|(i, mut c)| async move {
        let key = format!("cilium/w{i}");
        // A watch on the connection's own key, then a put under a lease: the event comes back through the worker.
        let mut events = c.watch(key.as_str(), None).await?;
        let created =
            tokio::time::timeout(Duration::from_secs(10), events.message()).await.map_err(|_| "no created")??;
        assert!(created.is_some_and(|r| r.created()), "the watch was not created");
        let lease = c.lease_grant(30, None).await?.id();
        let (mut keeper, mut acks) = c.lease_keep_alive(lease).await?;
        keeper.keep_alive().await?;
        let ack =
            tokio::time::timeout(Duration::from_secs(10), acks.message()).await.map_err(|_| "no keep-alive ack")??;
        assert_eq!(ack.map(|a| a.id()), Some(lease));
        c.put(key.as_str(), format!("v{i}"), Some(PutOptions::new().with_lease(lease))).await?;
        let got = c.get(key.as_str(), None).await?;
        assert_eq!(got.kvs().first().map(|kv| kv.value().to_vec()), Some(format!("v{i}").into_bytes()));
        let event = loop {
            let resp = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .map_err(|_| "no watch event")??
                .ok_or("the watch ended")?;
            if let Some(e) = resp.events().first() {
                break e.kv().map(|kv| kv.key().to_vec());
            }
        };
        assert_eq!(event, Some(key.clone().into_bytes()));
        // Outside cilium's prefix: etcd's own denial for cilium, served for admin.
        let outside = c.get("secret", None).await;
        if i % 2 == 0 {
            assert!(outside.is_ok(), "{outside:?}");
        } else {
            assert!(outside.as_ref().err().is_some_and(is_denied), "{outside:?}");
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    });
    tokio::time::timeout(Duration::from_secs(60), try_join_all(work)).await.map_err(|_| "the clients timed out")??;
    drop(clients);
    h.stop_proxy().await;

    let log = std::fs::read_to_string(h.audit_dir().join("audit.log"))?;
    let records: Vec<serde_json::Value> = log.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    for i in 0..CONNECTIONS {
        let key = format!("cilium/w{i}");
        assert!(
            records.iter().any(|r| r["rpc"] == "KV/Put" && r["ops"][0]["key"] == key.as_str() && r["code"] == "OK"),
            "no record of the put of {key}"
        );
    }
    let denials = records.iter().filter(|r| r["rpc"] == "KV/Range" && r["decision"] == "deny").count();
    assert_eq!(denials, CONNECTIONS / 2);
    Ok(())
}
