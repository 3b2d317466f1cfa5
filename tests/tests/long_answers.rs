//! A watch answer replaying a long history (a watch from an old revision; a delete of many keys with `prev_kv`)
//! can be hundreds of MB in one message. The proxy passes such answers on in parts as they arrive: it does not
//! hold one whole for a client that does not read, and what arrives is what etcd sent.
//!
//! One test in this binary: it measures the process's memory, which other tests running beside it would move.
//! Its watches are unshared whatever the test matrix says: a shared watch (`watch.coalesce`) reads each of etcd's
//! answers whole to hand it to every subscriber (docs/watch-coalescing.md).

use std::time::Duration;

use etcd_client::{EventType, WatchOptions, WatchStream};
use etcd_guard_tests::{ClientCert, Harness, TestResult};

const KEYS: usize = 24;
const UNREAD_WATCHES: usize = 4;

/// Resident memory of this process (the proxy runs in it), in MiB.
fn rss_mib() -> TestResult<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or("no VmRSS")?;
    Ok(kib / 1024)
}

async fn watch_from_start(url: &str, h: &Harness, who: &ClientCert) -> TestResult<(etcd_client::Client, WatchStream)> {
    let client = h.pki.etcd_client(url, who, None).await?;
    let options = WatchOptions::new().with_prefix().with_start_revision(1).with_prev_key();
    let stream = client.watch_client().max_decoding_message_size(256 << 20).watch("big/", Some(options)).await?;
    Ok((client, stream))
}

/// What a client can compare of each event: type, key, revision, and the value and previous value by length and
/// first byte.
type Seen = (bool, Vec<u8>, i64, usize, u8, usize);

async fn events(stream: &mut WatchStream, n: usize) -> TestResult<Vec<Seen>> {
    let mut seen = Vec::new();
    while seen.len() < n {
        let answer = tokio::time::timeout(Duration::from_secs(30), stream.message()).await??.ok_or("ended")?;
        assert!(!answer.canceled(), "{:?}", answer.cancel_reason());
        for e in answer.events() {
            let kv = e.kv().ok_or("no kv")?;
            let prev = e.prev_kv().map(|p| p.value().len()).unwrap_or(0);
            let first = kv.value().first().copied().unwrap_or(0);
            seen.push((
                e.event_type() == EventType::Put,
                kv.key().to_vec(),
                kv.mod_revision(),
                kv.value().len(),
                first,
                prev,
            ));
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread")]
async fn long_watch_answers_pass_in_parts_and_arrive_as_etcd_sent_them() -> TestResult {
    let h = Harness::with_config(
        etcd_guard_tests::TEST_POLICY,
        "audit: { file: audit/audit.log }\nwatch: { coalesce: false }\n",
    )
    .await?;
    let admin = h.admin()?;
    let mut direct = h.client_direct().await?;
    for i in 0..KEYS {
        direct.put(format!("big/{i:02}"), vec![b'a' + i as u8; 1 << 20], None).await?;
    }
    // One revision deleting every key: with prev_kv, one answer of 24 MiB.
    direct.delete("big/", Some(etcd_client::DeleteOptions::new().with_prefix())).await?;

    // Watches that replay the whole history and are never read: each has one answer of 24 MiB and another one
    // coming. The proxy holds what HTTP/2's windows let through, not the answers.
    let before = rss_mib()?;
    let mut unread = Vec::new();
    for _ in 0..UNREAD_WATCHES {
        unread.push(watch_from_start(&h.proxy_url(), &h, &admin).await?);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = rss_mib()?;
    eprintln!("resident: {before} MiB before, {after} MiB with {UNREAD_WATCHES} unread watches of a 48 MiB history");
    assert!(
        after.saturating_sub(before) < 48,
        "{UNREAD_WATCHES} unread watches took {} MiB (answers held whole?)",
        after - before
    );
    drop(unread);

    // Read: what arrives through the proxy is what etcd sends.
    let (_p, mut through) = watch_from_start(&h.proxy_url(), &h, &admin).await?;
    let (_d, mut straight) = watch_from_start(&h.etcd.client_url, &h, &h.pki.upstream_client()).await?;
    let proxied = events(&mut through, 2 * KEYS).await?;
    let from_etcd = events(&mut straight, 2 * KEYS).await?;
    assert_eq!(proxied.len(), 2 * KEYS);
    assert_eq!(proxied, from_etcd);
    assert_eq!(proxied[KEYS - 1].4, b'a' + KEYS as u8 - 1);
    assert!(proxied[KEYS..].iter().all(|e| !e.0 && e.5 == 1 << 20), "the deletes carry their previous values");

    // The stream goes on after them: a new event arrives.
    direct.put("big/next", "x", None).await?;
    let next = events(&mut through, 1).await?;
    assert_eq!(next[0].1, b"big/next");
    Ok(())
}
