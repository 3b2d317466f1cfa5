//! Watch fan-out: many watch streams on one client connection, created all at once, each receive every event of a
//! burst of puts. Both HTTP/2 legs then carry bursts of thousands of small DATA frames (watch creates from the
//! client; one event per watcher per put from etcd), which an HTTP/2 stack with small windows treats as abuse and
//! answers by closing the connection (h2: `ENHANCE_YOUR_CALM`, "too_many_data_frames").

use std::time::Duration;

use etcd_client::WatchOptions;
use etcd_guard_tests::{Harness, TestResult};
use futures_util::future::try_join_all;

const WATCHERS: usize = 1000;
const PUTS: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_watchers_on_one_connection_get_every_event_of_a_burst() -> TestResult {
    let h = Harness::start().await?;
    let admin = h.admin()?;
    let watching = h.client(&admin).await?;
    // Every create at once, on the one connection.
    let creates = (0..WATCHERS).map(|_| {
        let mut c = watching.clone();
        async move {
            let mut stream = c.watch("fan/", Some(WatchOptions::new().with_prefix())).await?;
            // Answered once etcd has made the watch: events from here on are delivered.
            match stream.message().await? {
                Some(resp) if resp.created() => Ok(stream),
                other => Err(etcd_client::Error::WatchError(format!("not created: {other:?}"))),
            }
        }
    });
    let streams = tokio::time::timeout(Duration::from_secs(60), try_join_all(creates))
        .await
        .map_err(|_| "creating the watchers timed out")??;
    // Every stream is read by its own task from now on, as a client would.
    let receivers: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut events = 0;
                while events < PUTS {
                    match stream.message().await? {
                        Some(resp) => events += resp.events().len(),
                        None => return Err(etcd_client::Error::WatchError("the stream ended".into())),
                    }
                }
                Ok(events)
            })
        })
        .collect();
    // A burst of puts from another connection: WATCHERS × PUTS events come back through the proxy.
    let mut writer = h.client(&admin).await?;
    for i in 0..PUTS {
        writer.put(format!("fan/{i}"), "v", None).await?;
    }
    let received = tokio::time::timeout(Duration::from_secs(60), try_join_all(receivers))
        .await
        .map_err(|_| "receiving the events timed out")??;
    let received = received.into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(received.len(), WATCHERS);
    assert!(received.iter().all(|&n| n == PUTS), "every watcher got every event");
    Ok(())
}
