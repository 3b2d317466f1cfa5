//! Messages of every size pass through unchanged, both ways: the proxy's codec buffers start small (256 bytes, so
//! that 10,000 open watch streams stay cheap) and grow for larger messages.

use std::time::Duration;

use etcd_client::{GetOptions, WatchOptions};
use etcd_guard_tests::{Harness, TestResult};

/// Bytes that differ everywhere, so a truncated, shifted or reordered copy is noticed.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed).wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_le_bytes()[0]
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn small_and_large_values_pass_unchanged_in_requests_responses_and_watch_events() -> TestResult {
    let h = Harness::start().await?;
    let admin = h.admin()?;
    let mut client = h.client(&admin).await?;
    let mut watch = client.watch("sizes/", Some(WatchOptions::new().with_prefix())).await?;
    match tokio::time::timeout(Duration::from_secs(10), watch.message()).await?? {
        Some(resp) if resp.created() => {}
        other => return Err(format!("watch not created: {other:?}").into()),
    }
    // Around the initial buffer size, a frame (16 KiB), and a megabyte.
    let sizes = [0, 1, 200, 250, 251, 256, 257, 1024, 16 * 1024 - 5, 16 * 1024 + 1, 100_000, 1 << 20];
    for (i, len) in sizes.iter().enumerate() {
        let key = format!("sizes/{i:02}");
        let value = pattern(*len, i as u8);
        client.put(key.as_str(), value.clone(), None).await?;
        let got = client.get(key.as_str(), None).await?;
        let kv = got.kvs().first().ok_or_else(|| format!("{key}: not found"))?;
        assert!(kv.value() == value.as_slice(), "{key}: value of {len} bytes changed on the way back");
        let event = tokio::time::timeout(Duration::from_secs(10), watch.message()).await??.ok_or("the watch ended")?;
        let kv = event.events().first().and_then(|e| e.kv()).ok_or("an event without a key")?;
        assert_eq!(kv.key(), key.as_bytes());
        assert!(kv.value() == value.as_slice(), "{key}: watch event of {len} bytes changed");
    }
    // One response of about 1.3 MB made of every value above, in key order.
    let all = client.get("sizes/", Some(GetOptions::new().with_prefix())).await?;
    assert_eq!(all.kvs().len(), sizes.len());
    for (i, (kv, len)) in all.kvs().iter().zip(sizes).enumerate() {
        assert!(kv.value() == pattern(len, i as u8).as_slice(), "sizes/{i:02} changed in the prefix range");
    }
    Ok(())
}
