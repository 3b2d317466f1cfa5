//! Watch coalescing (`watch: { coalesce: true }`): identical watch creates of different client streams share one
//! upstream etcd watch, and a client still sees exactly what etcd would have sent it.
//!
//! Pinned here, against a real etcd: one upstream watch serves hundreds of streams (and goes when they go); a
//! create "from now" that joins gets a created revision no older than a linearizable read made before it and then
//! every later event, none earlier and none missing, even while writes race the create; an explicit start revision
//! the shared watch has passed is replayed from etcd's history, one still ahead joins and starts there; watch ids,
//! event tags, `prev_kv`, filters and cancels on a stream mixing shared and unshared watches are etcd's own (checked
//! against the same requests sent to etcd directly); a progress request moves the stream's shared watches to
//! watches of its own without a duplicate or a gap; a denied create stays denied although an identical allowed
//! watch is shared; a subscriber that stops reading does not hold the others back and later gets every event.
//! The `etcd_guard_shared_watch*` metrics are read throughout, so that a proxy that never shares fails too.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use etcd_client::{Client, EventType, WatchFilterType, WatchOptions, WatchResponse, WatchStream};
use etcd_guard_tests::{Harness, TEST_POLICY, TestResult, http_get};
use futures_util::future::try_join_all;
use futures_util::{Stream, StreamExt};

/// The test configuration's audit section, plus coalescing.
const COALESCE: &str = "audit: { file: audit/audit.log }\nwatch: { coalesce: true }\n";
/// etcd's cancel reason for a denied watch.
const DENIED_REASON: &str = "rpc error: code = PermissionDenied desc = etcdserver: permission denied";
/// Upstream watches shared now.
const SHARED: &str = "etcd_guard_shared_watches";
/// Client watches served by shared upstream watches now.
const SUBSCRIBERS: &str = "etcd_guard_shared_watch_subscribers";
/// Subscribers moved to upstream watches of their own (slow reader, progress request).
const DETACHES: &str = "etcd_guard_shared_watch_detaches_total";
/// Watches open at etcd (etcd's own gauge).
const ETCD_WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
/// Creates from now that waited for a read of etcd's current revision before joining.
const REVISION_WAITS: &str = "etcd_guard_shared_watch_revision_waits_total";
/// Range requests etcd answered (etcd's gRPC server metrics).
const ETCD_RANGES: &str =
    r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Range",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#;
/// Watch streams open at etcd (etcd's own gauge).
const ETCD_STREAMS: &str = "etcd_debugging_mvcc_watch_stream_total";
/// The longest any one awaited answer may take.
const WAIT: Duration = Duration::from_secs(10);
/// How long a stream must stay silent to show that nothing more is coming.
const QUIET: Duration = Duration::from_millis(300);

/// Says what was being waited for when a wait fails.
trait Context<T> {
    fn context(self, what: &str) -> TestResult<T>;
}

impl<T> Context<T> for TestResult<T> {
    fn context(self, what: &str) -> TestResult<T> {
        self.map_err(|e| format!("{what}: {e}").into())
    }
}

async fn start() -> TestResult<Harness> {
    Harness::with_config(TEST_POLICY, COALESCE).await
}

fn prefix() -> WatchOptions {
    WatchOptions::new().with_prefix()
}

/// One event as a client sees it: the watch it is tagged with, and what happened.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ev {
    id: i64,
    delete: bool,
    key: String,
    rev: i64,
    /// The previous value (`prev_kv` watches).
    prev: Option<String>,
}

impl Ev {
    fn put(id: i64, key: &str, rev: i64) -> Ev {
        Ev { id, delete: false, key: key.to_string(), rev, prev: None }
    }
}

fn events_of(r: &WatchResponse) -> Vec<Ev> {
    r.events()
        .iter()
        .map(|e| Ev {
            id: r.watch_id(),
            delete: e.event_type() == EventType::Delete,
            key: e.kv().map(|kv| String::from_utf8_lossy(kv.key()).into_owned()).unwrap_or_default(),
            rev: e.kv().map(|kv| kv.mod_revision()).unwrap_or_default(),
            prev: e.prev_kv().map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
        })
        .collect()
}

/// `got` is `want`; on a difference, the first place they part (sequences of thousands are not printed whole).
fn same(what: &str, got: &[Ev], want: &[Ev]) -> TestResult {
    if got == want {
        return Ok(());
    }
    let at = got.iter().zip(want).position(|(g, w)| g != w).unwrap_or(got.len().min(want.len()));
    Err(format!(
        "{what}: {} events where {} were expected; first difference at {at}: got {:?}, expected {:?}",
        got.len(),
        want.len(),
        got.get(at.saturating_sub(1)..(at + 2).min(got.len())),
        want.get(at.saturating_sub(1)..(at + 2).min(want.len())),
    )
    .into())
}

/// A revision of a put or delete.
fn revision(h: Option<&etcd_client::ResponseHeader>) -> TestResult<i64> {
    Ok(h.ok_or("a response without a header")?.revision())
}

async fn put(c: &mut Client, key: &str, value: &str) -> TestResult<i64> {
    revision(c.put(key, value, None).await?.header())
}

async fn delete(c: &mut Client, key: &str) -> TestResult<i64> {
    revision(c.delete(key, None).await?.header())
}

/// The next response of a watch stream, within [`WAIT`].
async fn next<S>(s: &mut S) -> TestResult<WatchResponse>
where
    S: Stream<Item = Result<WatchResponse, etcd_client::Error>> + Unpin,
{
    match tokio::time::timeout(WAIT, s.next()).await {
        Err(_) => Err(format!("no watch response within {WAIT:?}").into()),
        Ok(None) => Err("the watch stream ended".into()),
        Ok(Some(r)) => Ok(r?),
    }
}

/// The next response, which must answer a create: created and not canceled.
async fn created<S>(s: &mut S) -> TestResult<WatchResponse>
where
    S: Stream<Item = Result<WatchResponse, etcd_client::Error>> + Unpin,
{
    let r = next(s).await?;
    if !r.created() || r.canceled() || !r.events().is_empty() {
        return Err(format!("expected the answer to a create: {r:?}").into());
    }
    Ok(r)
}

/// A new watch stream on `c` with one watch, once the watch is created: the stream and the created answer.
async fn open(c: &Client, key: &str, options: WatchOptions) -> TestResult<(WatchStream, WatchResponse)> {
    let mut c = c.clone();
    let mut s =
        tokio::time::timeout(WAIT, c.watch(key, Some(options))).await.map_err(|_| "opening a watch stream")??;
    let r = created(&mut s).await?;
    Ok((s, r))
}

/// Exactly `n` events, and no other kind of response on the way.
async fn events<S>(s: &mut S, n: usize) -> TestResult<Vec<Ev>>
where
    S: Stream<Item = Result<WatchResponse, etcd_client::Error>> + Unpin,
{
    let mut out = Vec::new();
    while out.len() < n {
        let r = next(s).await?;
        if r.created() || r.canceled() || r.events().is_empty() {
            return Err(format!("expected events ({} of {n} so far), got {r:?}", out.len()).into());
        }
        out.extend(events_of(&r));
    }
    Ok(out)
}

/// Every event up to and including the first on `key`, and the responses without events met on the way.
async fn until<S>(s: &mut S, key: &str) -> TestResult<(Vec<Ev>, Vec<WatchResponse>)>
where
    S: Stream<Item = Result<WatchResponse, etcd_client::Error>> + Unpin,
{
    let (mut evs, mut others) = (Vec::new(), Vec::new());
    loop {
        let r = next(s).await?;
        if r.events().is_empty() {
            others.push(r);
            continue;
        }
        let batch = events_of(&r);
        let done = batch.iter().any(|e| e.key == key);
        evs.extend(batch);
        if done {
            return Ok((evs, others));
        }
    }
}

/// Nothing more arrives for [`QUIET`].
async fn quiet<S>(s: &mut S, what: &str) -> TestResult
where
    S: Stream<Item = Result<WatchResponse, etcd_client::Error>> + Unpin,
{
    match tokio::time::timeout(QUIET, s.next()).await {
        Err(_) => Ok(()),
        Ok(Some(Ok(r))) => Err(format!("{what}: unexpected response {r:?}").into()),
        Ok(Some(Err(e))) => Err(format!("{what}: the stream failed: {e}").into()),
        Ok(None) => Err(format!("{what}: the stream ended").into()),
    }
}

/// A metric of the proxy, `None` when it is not exported.
fn metric(h: &Harness, name: &str) -> TestResult<Option<f64>> {
    let addr = h.proxy.as_ref().and_then(|p| p.metrics_addr).ok_or("no metrics listener")?;
    // A blocking read, off the runtime's workers (the proxy answering it runs on them).
    let (status, body) = tokio::task::block_in_place(|| http_get(addr, "/metrics"))?;
    if status != 200 {
        return Err(format!("/metrics answered {status}").into());
    }
    Ok(body
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.trim().parse().ok()))
}

/// A metric that must be exported.
fn gauge(h: &Harness, name: &str) -> TestResult<f64> {
    metric(h, name)?.ok_or_else(|| format!("{name} is not exported").into())
}

/// Wait (up to 5 s) until a metric has the value `want`.
async fn settles(h: &Harness, name: &str, want: f64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = metric(h, name)?;
        if now == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{name} is {now:?}, not {want}, after 5 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One of etcd's own metrics (its `/metrics` on the client port, read with the proxy's upstream certificate).
async fn etcd_metric(h: &Harness, name: &str) -> TestResult<f64> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(h.pki.ca_file())? {
        roots.add(c?)?;
    }
    let chain = CertificateDer::pem_file_iter(h.pki.path("upstream-client.crt"))?.collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(h.pki.path("upstream-client.key"))?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    let addr = h.etcd.client_url.trim_start_matches("https://");
    let get = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let server = ServerName::try_from("localhost")?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server, tcp).await?;
        tls.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut text = Vec::new();
        tls.read_to_end(&mut text).await?;
        TestResult::Ok(String::from_utf8_lossy(&text).into_owned())
    };
    let text = tokio::time::timeout(WAIT, get).await.map_err(|_| "reading etcd's metrics timed out")??;
    let value = text.lines().filter_map(|l| l.split_once(' ')).find(|(n, _)| *n == name).map(|(_, v)| v.trim());
    Ok(value.ok_or_else(|| format!("etcd does not export {name}"))?.parse()?)
}

/// Wait (up to 5 s) until one of etcd's metrics has the value `want`.
async fn etcd_settles(h: &Harness, name: &str, want: f64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = etcd_metric(h, name).await?;
        if now == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("etcd's {name} is {now}, not {want}, after 5 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const STREAMS: usize = 200;
const BURST: usize = 20;

#[tokio::test(flavor = "multi_thread")]
async fn identical_watches_of_many_streams_share_one_upstream_watch() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    let connections = [h.client(&admin).await?, h.client(&admin).await?];
    // The first makes the shared watch; the others join it, all at once, over two connections.
    let (first, answer) = open(&connections[0], "co/", prefix()).await?;
    assert_eq!(answer.watch_id(), 0, "{answer:?}");
    // Reads etcd answered so far (none yet, perhaps: then the counter is not exported).
    let ranges_before = etcd_metric(&h, ETCD_RANGES).await.unwrap_or(0.0);
    let creates = (1..STREAMS).map(|i| {
        let c = &connections[i % 2];
        async move {
            let (s, answer) = open(c, "co/", prefix()).await?;
            match answer.watch_id() {
                0 => TestResult::Ok(s),
                id => Err(format!("the first watch of a stream has id {id}").into()),
            }
        }
    });
    let mut streams = tokio::time::timeout(Duration::from_secs(60), try_join_all(creates))
        .await
        .map_err(|_| "creating the watches timed out")??;
    streams.push(first);
    assert_eq!(gauge(&h, SHARED)?, 1.0, "one upstream watch serves every stream");
    assert_eq!(gauge(&h, SUBSCRIBERS)?, STREAMS as f64);
    assert_eq!(etcd_metric(&h, ETCD_WATCHERS).await?, 1.0, "etcd serves one watch");
    // Each joining create waited for a read of etcd's current revision sent after it arrived; they shared them.
    assert_eq!(gauge(&h, REVISION_WAITS)?, (STREAMS - 1) as f64);
    let ranges = etcd_metric(&h, ETCD_RANGES).await? - ranges_before;
    assert!(
        ranges >= 1.0 && ranges < (STREAMS / 4) as f64,
        "{ranges} reads of the current revision for {STREAMS} joins"
    );
    // ... on one stream: a client stream whose watches are all shared opens no upstream stream of its own.
    assert_eq!(etcd_metric(&h, ETCD_STREAMS).await?, 1.0, "etcd holds one watch stream");

    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                let got = events(&mut s, BURST).await?;
                quiet(&mut s, "after the burst").await?;
                TestResult::Ok(got)
            })
        })
        .collect();
    let mut writer = h.client(&admin).await?;
    let mut want = Vec::new();
    for i in 0..BURST {
        let key = format!("co/{i}");
        want.push(Ev::put(0, &key, put(&mut writer, &key, "v").await?));
    }
    let received = tokio::time::timeout(Duration::from_secs(60), try_join_all(readers))
        .await
        .map_err(|_| "receiving the events timed out")??;
    for (i, got) in received.into_iter().enumerate() {
        same(&format!("stream {i}"), &got?, &want)?;
    }
    // Every stream is gone (dropped by its reader): so is the upstream watch.
    settles(&h, SHARED, 0.0).await?;
    settles(&h, SUBSCRIBERS, 0.0).await?;
    etcd_settles(&h, ETCD_WATCHERS, 0.0).await?;
    Ok(())
}

const JOINERS: usize = 12;
const PUTTERS: usize = 4;

#[tokio::test(flavor = "multi_thread")]
async fn a_create_from_now_that_joins_sees_no_event_twice_and_misses_none() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    let c = h.client(&admin).await?;
    let mut writer = h.client(&admin).await?;

    // Quietly: A makes the shared watch, j/1 is written and read back, then B joins.
    let (mut a, _) = open(&c, "j/", prefix()).await?;
    put(&mut writer, "j/1", "v").await?;
    let read = writer.get("j/1", None).await?;
    let x = read.kvs().first().ok_or("j/1 is missing")?.mod_revision();
    let (mut b, b_created) = open(&c, "j/", prefix()).await?;
    let b_rev = revision(b_created.header())?;
    assert!(b_rev >= x, "B's created revision {b_rev} is older than a read made before the create ({x})");
    assert_eq!(gauge(&h, SHARED)?, 1.0);
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 2.0, "B joined A's upstream watch");
    let y = put(&mut writer, "j/2", "v").await?;
    same("A", &events(&mut a, 2).await?, &[Ev::put(0, "j/1", x), Ev::put(0, "j/2", y)])?;
    same("B", &events(&mut b, 1).await?, &[Ev::put(0, "j/2", y)])?;
    quiet(&mut b, "B").await?;
    // A write the shared watch does not see: C's created revision is still no older than it (etcd answers with its
    // current revision, not with the last one the shared watch heard of).
    let z = put(&mut writer, "k/elsewhere", "v").await?;
    let (mut c2, c_created) = open(&c, "j/", prefix()).await?;
    let c_rev = revision(c_created.header())?;
    assert!(c_rev >= z, "C's created revision {c_rev} is older than a write acknowledged before the create ({z})");
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 3.0, "C joined A's upstream watch");
    let y2 = put(&mut writer, "j/3", "v").await?;
    same("A", &events(&mut a, 1).await?, &[Ev::put(0, "j/3", y2)])?;
    same("B", &events(&mut b, 1).await?, &[Ev::put(0, "j/3", y2)])?;
    same("C", &events(&mut c2, 1).await?, &[Ev::put(0, "j/3", y2)])?;
    quiet(&mut c2, "C").await?;

    // Racing: writers put without pause while more watches join, each read from the moment it is created.
    let read_all = |mut s: WatchStream| tokio::spawn(async move { until(&mut s, "j/end").await });
    let a_reader = read_all(a);
    let mut joiners = vec![(b_rev, read_all(b), 0), (c_rev, read_all(c2), 0)];
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicI64::new(y2));
    let putters: Vec<_> = (0..PUTTERS)
        .map(|n| {
            let (stop, acked, mut w) = (stop.clone(), acked.clone(), writer.clone());
            tokio::spawn(async move {
                let mut revs = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    // One writer writes where nobody watches: created revisions must be no older than its writes.
                    let key = format!("{}/r{n}-{}", if n == 0 { "k" } else { "j" }, revs.len());
                    let rev = put(&mut w, &key, "v").await?;
                    acked.fetch_max(rev, Ordering::Relaxed);
                    revs.push(Ev::put(0, &key, rev));
                }
                TestResult::Ok(revs)
            })
        })
        .collect();
    for _ in 0..JOINERS {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let seen = acked.load(Ordering::Relaxed);
        let (s, answer) = open(&c, "j/", prefix()).await?;
        joiners.push((revision(answer.header())?, read_all(s), seen));
    }
    // A create whose lookup the shared watch overtook may get a watch of its own instead; most join.
    assert_eq!(gauge(&h, SHARED)?, 1.0);
    let joined = gauge(&h, SUBSCRIBERS)? - 3.0;
    assert!(joined >= 1.0, "no create from now joined the shared watch while the writers ran");
    stop.store(true, Ordering::Relaxed);
    let mut written = Vec::new();
    for revs in tokio::time::timeout(WAIT, try_join_all(putters)).await.map_err(|_| "the writers did not stop")?? {
        written.extend(revs?);
    }
    written.sort_by_key(|e| e.rev);
    written.push(Ev::put(0, "j/end", put(&mut writer, "j/end", "v").await?));
    assert_eq!(written.first().map(|e| e.rev), Some(y2 + 1), "nothing else writes");
    assert!(written.windows(2).all(|p| p[1].rev == p[0].rev + 1), "nothing else writes");
    written.retain(|e| e.key.starts_with("j/"));
    let (from_a, others) = tokio::time::timeout(WAIT, a_reader).await.map_err(|_| "A's reader")???;
    assert!(others.is_empty(), "{others:?}");
    same("A, while the writers raced the creates", &from_a, &written)?;
    let mut raced = 0;
    for (i, (rev, reader, seen)) in joiners.into_iter().enumerate() {
        let (got, others) = tokio::time::timeout(WAIT, reader).await.map_err(|_| "a joiner's reader")???;
        assert!(others.is_empty(), "joiner {i}: {others:?}");
        assert!(
            rev >= seen,
            "joiner {i}: created at {rev}, older than the put acknowledged before the create ({seen})"
        );
        let want: Vec<Ev> = written.iter().filter(|e| e.rev > rev).cloned().collect();
        same(&format!("joiner {i} created at revision {rev}"), &got, &want)?;
        if written.first().is_some_and(|e| e.rev <= rev) {
            raced += 1;
        }
    }
    eprintln!("{} puts raced {JOINERS} creates: {raced} were created among them, {joined} joined", written.len());
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_revision_already_passed_is_replayed_and_one_ahead_joins() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    let c = h.client(&admin).await?;
    let mut writer = h.client(&admin).await?;
    let r0 = put(&mut writer, "s/0", "v").await?;
    // A and A2 share the watch, which starts after r0.
    let (mut a, _) = open(&c, "s/", prefix()).await?;
    let (mut a2, _) = open(&c, "s/", prefix()).await?;
    assert_eq!(gauge(&h, SHARED)?, 1.0);
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 2.0);
    // From r0: before the shared watch began, so only etcd's history has it.
    let (mut from_r0, _) = open(&c, "s/", prefix().with_start_revision(r0)).await?;
    let ra = put(&mut writer, "s/a", "v").await?;
    let rb = put(&mut writer, "s/b", "v").await?;
    let rc = put(&mut writer, "s/c", "v").await?;
    let abc = [Ev::put(0, "s/a", ra), Ev::put(0, "s/b", rb), Ev::put(0, "s/c", rc)];
    // The shared watch has delivered rc.
    same("A", &events(&mut a, 3).await?, &abc)?;
    same("A2", &events(&mut a2, 3).await?, &abc)?;
    let (mut from_ra, _) = open(&c, "s/", prefix().with_start_revision(ra)).await?;
    // Exactly the last revision delivered: etcd sends that event again, so must the proxy.
    let (mut from_rc, _) = open(&c, "s/", prefix().with_start_revision(rc)).await?;
    let (shared, subscribers) = (gauge(&h, SHARED)?, gauge(&h, SUBSCRIBERS)?);
    // Ahead of the shared watch: these join it.
    let (mut next_one, _) = open(&c, "s/", prefix().with_start_revision(rc + 1)).await?;
    let (mut ahead, _) = open(&c, "s/", prefix().with_start_revision(rc + 3)).await?;
    assert_eq!(gauge(&h, SHARED)?, shared, "watches starting ahead join, they do not open upstream watches");
    assert_eq!(gauge(&h, SUBSCRIBERS)?, subscribers + 2.0, "watches starting ahead join the shared watch");

    let mut later = Vec::new();
    for key in ["s/d", "s/e", "s/f", "s/g"] {
        later.push(Ev::put(0, key, put(&mut writer, key, "v").await?));
    }
    assert_eq!(later[0].rev, rc + 1, "nothing else writes");
    assert_eq!(later[3].rev, rc + 4, "nothing else writes");
    let cases: [(&str, &mut WatchStream, Vec<Ev>); 7] = [
        ("A", &mut a, later.clone()),
        ("A2", &mut a2, later.clone()),
        ("from r0", &mut from_r0, [Ev::put(0, "s/0", r0)].iter().chain(&abc).chain(&later).cloned().collect()),
        ("from ra", &mut from_ra, abc.iter().chain(&later).cloned().collect()),
        ("from rc", &mut from_rc, abc[2..].iter().chain(&later).cloned().collect()),
        ("from rc+1", &mut next_one, later.clone()),
        ("from rc+3", &mut ahead, later[2..].to_vec()),
    ];
    // etcd's own answer to each start revision (all in the past by now) is what is expected of the proxy.
    let etcd = h.client_direct().await?;
    for (start, (what, _, want)) in [r0, ra, rc, rc + 1, rc + 3].into_iter().zip(&cases[2..]) {
        let (mut s, _) = open(&etcd, "s/", prefix().with_start_revision(start)).await?;
        same(&format!("{what}, straight from etcd"), &events(&mut s, want.len()).await?, want)?;
    }
    for (what, s, want) in cases {
        same(what, &events(s, want.len()).await?, &want)?;
        quiet(s, what).await?;
    }
    Ok(())
}

/// The creates of the mixed stream, in order: `(key, options)`.
fn mixed_creates() -> Vec<(&'static str, WatchOptions)> {
    vec![
        // Shared with the other stream's watch on m/.
        ("m/", prefix()),
        // prev_kv: not the same watch as the shared one.
        ("m/", prefix().with_prev_key()),
        // Shared with the other stream's watch on m/x.
        ("m/x", WatchOptions::new()),
        // A watch id chosen by the client: etcd's auto ids skip it later.
        ("m/", prefix().with_watch_id(5)),
        // Shared with the other stream's watch on m/y.
        ("m/y", WatchOptions::new()),
        // The same as the first, on the same stream.
        ("m/", prefix()),
        // A filter: not the same watch as the shared one.
        ("m/", prefix().with_filters([WatchFilterType::NoDelete])),
    ]
}

/// Send the mixed creates, and read their answers: the watch ids, in create order.
async fn create_mixed(s: &mut WatchStream) -> TestResult<Vec<i64>> {
    for (key, options) in mixed_creates() {
        s.watch(key, Some(options)).await?;
    }
    let mut ids = Vec::new();
    for _ in mixed_creates() {
        ids.push(created(s).await?.watch_id());
    }
    Ok(ids)
}

/// Events by watch id, in the order each watch got them.
fn by_watch(evs: Vec<Ev>) -> BTreeMap<i64, Vec<Ev>> {
    let mut map = BTreeMap::<i64, Vec<Ev>>::new();
    for e in evs {
        map.entry(e.id).or_default().push(e);
    }
    map
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_events_and_cancels_on_a_stream_mixing_shared_and_unshared_watches_are_etcds() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    // Another stream's watches, for the mixed stream's to share.
    let mut other = c.watch("m/", Some(prefix())).await?;
    other.watch("m/x", None).await?;
    other.watch("m/y", None).await?;
    for _ in 0..3 {
        created(&mut other).await?;
    }
    let subscribers = gauge(&h, SUBSCRIBERS)?;

    // The same creates on a stream through the proxy and on one straight to etcd. First a shared watch, canceled
    // at once: etcd does not give its id again.
    let mut mixed = c.watch("m/", Some(prefix())).await?;
    let first = created(&mut mixed).await?.watch_id();
    mixed.cancel(first).await?;
    let canceled = next(&mut mixed).await?;
    assert!(canceled.canceled() && canceled.watch_id() == first, "{canceled:?}");
    let ids = [vec![first], create_mixed(&mut mixed).await?].concat();
    let mut etcd = h.client_direct().await?;
    let (mut reference, reference_ids) = {
        let mut s = etcd.watch("m/", Some(prefix())).await?;
        let first = created(&mut s).await?.watch_id();
        s.cancel(first).await?;
        assert!(next(&mut s).await?.canceled());
        let ids = create_mixed(&mut s).await?;
        (s, [vec![first], ids].concat())
    };
    assert_eq!(ids, reference_ids, "watch ids in create order, through the proxy and from etcd");
    assert_eq!(reference_ids, [0, 1, 2, 3, 5, 4, 6, 7], "etcd's own ids");
    assert!(
        gauge(&h, SUBSCRIBERS)? >= subscribers + 3.0,
        "the creates on m/, m/x and m/y joined the other stream's watches"
    );

    let mut w = h.client(&admin).await?;
    let a = put(&mut w, "m/x", "1").await?;
    let b = put(&mut w, "m/y", "1").await?;
    let cc = put(&mut w, "m/x", "2").await?;
    let d = delete(&mut w, "m/y").await?;
    let ev = |id, delete, key: &str, rev, prev: Option<&str>| Ev {
        id,
        delete,
        key: key.into(),
        rev,
        prev: prev.map(str::to_string),
    };
    let all = |id| {
        vec![
            ev(id, false, "m/x", a, None),
            ev(id, false, "m/y", b, None),
            ev(id, false, "m/x", cc, None),
            ev(id, true, "m/y", d, None),
        ]
    };
    let want = BTreeMap::from([
        (1, all(1)),
        (
            2,
            vec![
                ev(2, false, "m/x", a, None),
                ev(2, false, "m/y", b, None),
                ev(2, false, "m/x", cc, Some("1")),
                ev(2, true, "m/y", d, Some("1")),
            ],
        ),
        (3, vec![ev(3, false, "m/x", a, None), ev(3, false, "m/x", cc, None)]),
        (5, all(5)),
        (4, vec![ev(4, false, "m/y", b, None), ev(4, true, "m/y", d, None)]),
        (6, all(6)),
        (7, all(7)[..3].to_vec()),
    ]);
    let total = want.values().map(Vec::len).sum();
    let from_etcd = by_watch(events(&mut reference, total).await?);
    let through_proxy = by_watch(events(&mut mixed, total).await?);
    assert_eq!(from_etcd, want, "etcd's own answer");
    assert_eq!(through_proxy, from_etcd, "through the proxy, by watch id");
    quiet(&mut mixed, "the mixed stream").await?;
    let on_other = by_watch(events(&mut other, 8).await?);
    assert_eq!(
        on_other,
        BTreeMap::from([
            (0, all(0)),
            (1, vec![ev(1, false, "m/x", a, None), ev(1, false, "m/x", cc, None)]),
            (2, vec![ev(2, false, "m/y", b, None), ev(2, true, "m/y", d, None)]),
        ])
    );

    // Cancel the shared watch with id 1: etcd's cancel answer, and the rest (its twin with id 6 too) go on.
    let before = gauge(&h, SUBSCRIBERS)?;
    mixed.cancel(1).await?;
    reference.cancel(1).await?;
    let canceled = next(&mut mixed).await?;
    let canceled_by_etcd = next(&mut reference).await?;
    assert!(canceled.canceled() && !canceled.created() && canceled.watch_id() == 1, "{canceled:?}");
    assert_eq!(canceled.cancel_reason(), canceled_by_etcd.cancel_reason());
    assert!(canceled.events().is_empty(), "{canceled:?}");
    settles(&h, SUBSCRIBERS, before - 1.0).await?;
    let e = put(&mut w, "m/z", "1").await?;
    let after: BTreeMap<i64, Vec<Ev>> =
        [2, 5, 6, 7].into_iter().map(|id| (id, vec![ev(id, false, "m/z", e, None)])).collect();
    assert_eq!(by_watch(events(&mut reference, 4).await?), after, "etcd's own answer");
    assert_eq!(by_watch(events(&mut mixed, 4).await?), after, "through the proxy");
    quiet(&mut mixed, "after the cancel").await?;
    assert_eq!(events(&mut other, 1).await?, [ev(0, false, "m/z", e, None)], "the other stream's shared watch");
    Ok(())
}

/// Ten puts on p/a and ten on other keys under p/: the events of a watch on p/ (id 0) and of one on p/a (id 1).
async fn burst(w: &mut Client, from: usize) -> TestResult<(Vec<Ev>, Vec<Ev>)> {
    let (mut all, mut on_a) = (Vec::new(), Vec::new());
    for i in from..from + 10 {
        let ra = put(w, "p/a", &i.to_string()).await?;
        let key = format!("p/b{i}");
        let rb = put(w, &key, "v").await?;
        all.extend([Ev::put(0, "p/a", ra), Ev::put(0, &key, rb)]);
        on_a.push(Ev::put(1, "p/a", ra));
    }
    Ok((all, on_a))
}

/// Wait (up to 5 s) until a metric is above `floor`.
async fn rises(h: &Harness, name: &str, floor: f64) -> TestResult {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = gauge(h, name)?;
        if now > floor {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("{name} is {now}, not above {floor}, after 5 s").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_progress_request_moves_shared_watches_without_a_gap_or_a_duplicate() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    let mut c = h.client(&admin).await?;
    let mut w = h.client(&admin).await?;
    let mut other = c.watch("p/", Some(prefix())).await?;
    other.watch("p/a", None).await?;
    created(&mut other).await?;
    created(&mut other).await?;
    // The same two watches on a stream straight to etcd, for etcd's own answer.
    let mut etcd = h.client_direct().await?;
    let mut reference = etcd.watch("p/", Some(prefix())).await?;
    reference.watch("p/a", None).await?;
    created(&mut reference).await?;
    created(&mut reference).await?;
    // A stream whose watches are all shared.
    let mut s = c.watch("p/", Some(prefix())).await?;
    s.watch("p/a", None).await?;
    assert_eq!(created(&mut s).await?.watch_id(), 0);
    assert_eq!(created(&mut s).await?.watch_id(), 1);
    assert_eq!(gauge(&h, SHARED)?, 2.0);
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 4.0);

    let (all1, on_a1) = burst(&mut w, 0).await?;
    let got = by_watch(events(&mut s, 30).await.context("the first burst")?);
    assert_eq!(got, BTreeMap::from([(0, all1.clone()), (1, on_a1.clone())]));

    let last = all1.last().map(|e| e.rev).unwrap_or_default();
    assert_eq!(by_watch(events(&mut reference, 30).await?), got);
    reference.request_progress().await?;
    let progress = next(&mut reference).await.context("etcd's own progress answer")?;
    assert!(progress.events().is_empty() && progress.watch_id() == -1, "etcd's own progress answer: {progress:?}");
    assert_eq!(revision(progress.header())?, last, "etcd's own progress answer");

    let detaches = gauge(&h, DETACHES)?;
    s.request_progress().await?;
    let progress = next(&mut s).await.context("the progress answer")?;
    assert!(
        progress.events().is_empty() && !progress.created() && !progress.canceled(),
        "a progress answer: {progress:?}"
    );
    assert_eq!(progress.watch_id(), -1, "{progress:?}");
    assert!(revision(progress.header())? >= last, "progress at {:?}, the last put at {last}", progress.header());
    quiet(&mut s, "after the progress answer").await?;
    rises(&h, DETACHES, detaches).await?;
    settles(&h, SUBSCRIBERS, 2.0).await?;

    // The same watch ids go on, from where they were.
    let (all2, on_a2) = burst(&mut w, 10).await?;
    let got = by_watch(events(&mut s, 30).await.context("the second burst, on the moved watches")?);
    assert_eq!(got, BTreeMap::from([(0, all2.clone()), (1, on_a2.clone())]));
    quiet(&mut s, "after the second burst").await?;
    let got = by_watch(events(&mut other, 60).await.context("both bursts, on the other stream")?);
    assert_eq!(got, BTreeMap::from([(0, [all1, all2].concat()), (1, [on_a1, on_a2].concat())]));

    // A progress request while a writer puts without pause: the moved watch misses nothing and repeats nothing.
    let (joiner, _) = open(&c, "p/", prefix()).await?;
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 3.0);
    let (mut requests, mut responses) = joiner.split();
    let reader = tokio::spawn(async move {
        let (evs, others) = until(&mut responses, "p/end").await.context("the racing writer's puts")?;
        TestResult::Ok((evs, others, responses))
    });
    let count = Arc::new(AtomicUsize::new(0));
    let putter = {
        let (count, mut w) = (count.clone(), w.clone());
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in 0..300 {
                let key = format!("p/r{i}");
                revs.push(Ev::put(0, &key, put(&mut w, &key, "v").await?));
                count.fetch_add(1, Ordering::Relaxed);
            }
            TestResult::Ok(revs)
        })
    };
    let deadline = Instant::now() + WAIT;
    while count.load(Ordering::Relaxed) < 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let detaches = gauge(&h, DETACHES)?;
    requests.request_progress().await?;
    let mut written = tokio::time::timeout(Duration::from_secs(30), putter).await.map_err(|_| "the writer")???;
    rises(&h, DETACHES, detaches).await?;
    written.push(Ev::put(0, "p/end", put(&mut w, "p/end", "v").await?));
    let (got, mut others, mut responses) =
        tokio::time::timeout(Duration::from_secs(30), reader).await.map_err(|_| "the reader")???;
    same("the watch moved while a writer raced the progress request", &got, &written)?;
    // etcd 3.5.8 and later answers a progress request only if every watch of the stream is synced at that moment,
    // and drops it otherwise (a watch whose client reads slower than the writer writes falls behind): with the
    // writer racing, there may be no answer, for a client of etcd's own too. Kubernetes asks again until one
    // comes; so does this test (one answer per request at most, nothing else but the puts in between).
    let mut asked = 1;
    while others.is_empty() && asked < 5 {
        requests.request_progress().await?;
        asked += 1;
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(2), responses.next()).await {
            let r = r.ok_or("the watch stream ended")??;
            assert!(r.events().is_empty(), "events after p/end: {r:?}");
            others.push(r);
        }
    }
    assert!(!others.is_empty() && others.len() <= asked, "progress answers to {asked} requests: {others:?}");
    assert!(others.iter().all(|r| r.watch_id() == -1 && !r.created() && !r.canceled()), "{others:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_denied_create_stays_denied_and_an_allowed_one_shares() -> TestResult {
    let h = start().await?;
    let mut admin = h.client(&h.admin()?).await?;
    let cilium = h.client(&h.cilium()?).await?;
    // The admin watches other/ and cilium/: shared watches exist for both.
    let mut a = admin.watch("other/", Some(prefix())).await?;
    a.watch("cilium/", Some(prefix())).await?;
    assert_eq!(created(&mut a).await?.watch_id(), 0);
    assert_eq!(created(&mut a).await?.watch_id(), 1);

    // cilium asks for other/: etcd's denial, although an identical watch is shared.
    let mut cw = cilium.clone().watch("other/", Some(prefix())).await?;
    let denied = next(&mut cw).await?;
    assert!(denied.created() && denied.canceled(), "{denied:?}");
    assert_eq!(denied.watch_id(), -1, "{denied:?}");
    assert_eq!(denied.cancel_reason(), DENIED_REASON);
    // Its own prefix on the same stream: allowed, id 0 (a denial takes no id), shared with the admin's.
    cw.watch("cilium/", Some(prefix())).await?;
    let allowed = created(&mut cw).await?;
    assert_eq!(allowed.watch_id(), 0, "{allowed:?}");
    assert_eq!(gauge(&h, SHARED)?, 2.0);
    assert_eq!(gauge(&h, SUBSCRIBERS)?, 3.0, "the denied create does not subscribe");

    let ro = put(&mut admin, "other/x", "v").await?;
    let rc = put(&mut admin, "cilium/x", "v").await?;
    same("cilium", &events(&mut cw, 1).await?, &[Ev::put(0, "cilium/x", rc)])?;
    quiet(&mut cw, "cilium").await?;
    let got = by_watch(events(&mut a, 2).await?);
    assert_eq!(got, BTreeMap::from([(0, vec![Ev::put(0, "other/x", ro)]), (1, vec![Ev::put(1, "cilium/x", rc)])]));
    Ok(())
}

/// Enough to fill a client's flow-control windows (2 MiB a stream by default) and the proxy's queue many times.
const FLOOD: usize = 3000;
const VALUE: usize = 2048;
const WRITERS: usize = 8;
const FAST: usize = 2;

#[tokio::test(flavor = "multi_thread")]
async fn a_subscriber_that_stops_reading_holds_no_one_back_and_later_gets_everything() -> TestResult {
    let h = start().await?;
    let admin = h.admin()?;
    // The slow subscriber has a connection of its own: only its stream stops.
    let slow_client = h.client(&admin).await?;
    let (mut slow, _) = open(&slow_client, "slow/", prefix()).await?;
    let fast_client = h.client(&admin).await?;
    let mut fast = Vec::new();
    for _ in 0..FAST {
        let (mut s, _) = open(&fast_client, "slow/", prefix()).await?;
        fast.push(tokio::spawn(async move {
            let got = tokio::time::timeout(Duration::from_secs(60), until(&mut s, "slow/end")).await;
            let got = got.map_err(|_| "a fast subscriber did not get the flood within 60 s")??;
            TestResult::Ok((got, s, Instant::now()))
        }));
    }
    assert_eq!(gauge(&h, SHARED)?, 1.0);
    assert_eq!(gauge(&h, SUBSCRIBERS)?, (1 + FAST) as f64);

    let started = Instant::now();
    let value = "x".repeat(VALUE);
    let writer = h.client(&admin).await?;
    let puts = (0..WRITERS).map(|n| {
        let (mut w, value) = (writer.clone(), value.clone());
        tokio::spawn(async move {
            let mut revs = Vec::new();
            for i in (n..FLOOD).step_by(WRITERS) {
                let key = format!("slow/{i}");
                revs.push(Ev::put(0, &key, put(&mut w, &key, &value).await?));
            }
            TestResult::Ok(revs)
        })
    });
    let mut written = Vec::new();
    for revs in tokio::time::timeout(Duration::from_secs(60), try_join_all(puts)).await.map_err(|_| "the flood")?? {
        written.extend(revs?);
    }
    written.sort_by_key(|e| e.rev);
    let mut w = writer.clone();
    written.push(Ev::put(0, "slow/end", put(&mut w, "slow/end", "v").await?));
    let flooded = Instant::now();
    eprintln!("{FLOOD} puts of {VALUE} bytes in {:?}", flooded - started);
    assert!(written.windows(2).all(|p| p[1].rev == p[0].rev + 1), "nothing else writes");

    // The fast subscribers get it all while the slow one still reads nothing.
    let mut fast_streams = Vec::new();
    for (i, f) in fast.into_iter().enumerate() {
        let ((got, others), s, done) =
            tokio::time::timeout(Duration::from_secs(60), f).await.map_err(|_| "fast")???;
        assert!(others.is_empty(), "{others:?}");
        same(&format!("fast subscriber {i}"), &got, &written)?;
        eprintln!(
            "fast subscriber {i} had everything {:?} after the last put",
            done.saturating_duration_since(flooded)
        );
        assert!(done.saturating_duration_since(flooded) < WAIT, "fast subscriber {i} was held back");
        fast_streams.push(s);
    }
    assert!(gauge(&h, DETACHES)? >= 1.0, "the slow subscriber was moved to a watch of its own");
    assert_eq!(gauge(&h, SUBSCRIBERS)?, FAST as f64, "the slow subscriber no longer holds the shared watch");

    // Now the slow one reads: everything, in order, once.
    let (got, others) =
        tokio::time::timeout(Duration::from_secs(60), until(&mut slow, "slow/end")).await.map_err(|_| "slow")??;
    assert!(others.is_empty(), "{others:?}");
    same("the slow subscriber", &got, &written)?;
    // And it goes on.
    let last = put(&mut w, "slow/after", "v").await?;
    same("slow, after", &events(&mut slow, 1).await?, &[Ev::put(0, "slow/after", last)])?;
    quiet(&mut slow, "slow").await?;
    for (i, s) in fast_streams.iter_mut().enumerate() {
        same(&format!("fast {i}, after"), &events(s, 1).await?, &[Ev::put(0, "slow/after", last)])?;
    }
    eprintln!("the whole flood took {:?}", started.elapsed());
    Ok(())
}

/// etcdctl's `watch` (clientv3, as Kubernetes components use it) through a coalescing proxy: several etcdctl
/// processes share one upstream watch and each prints exactly the events etcd would have sent it.
#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_watchers_share_one_upstream_watch_and_print_every_event() -> TestResult {
    use std::process::{Command, Stdio};
    let h = start().await?;
    let admin = h.admin()?;
    let watcher = || {
        // `timeout` ends each etcdctl (which would watch forever) after the puts below.
        Command::new("timeout")
            .arg("4")
            .arg(etcd_guard_tests::etcd_tool("etcdctl"))
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", h.proxy_url()))
            .arg(format!("--cacert={}", h.pki.ca_file().display()))
            .arg(format!("--cert={}", admin.cert.display()))
            .arg(format!("--key={}", admin.key.display()))
            .args(["watch", "--prefix", "ec/"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
    };
    let watchers = [watcher()?, watcher()?, watcher()?];
    // All three are watching once the proxy counts them (each etcdctl is a connection and a stream of its own).
    let deadline = Instant::now() + WAIT;
    while metric(&h, SUBSCRIBERS)? != Some(3.0) {
        if Instant::now() > deadline {
            return Err(format!("{SUBSCRIBERS} is {:?}, not 3", metric(&h, SUBSCRIBERS)?).into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gauge(&h, SHARED)?, 1.0);
    for (key, value) in [("ec/1", "one"), ("other", "x"), ("ec/2", "two")] {
        let out = h.ctl(&admin, &["put", key, value])?;
        assert!(out.status.success(), "put {key}: {}", etcd_guard_tests::stderr(&out));
    }
    for w in watchers {
        let out = tokio::task::block_in_place(|| w.wait_with_output())?;
        assert_eq!(
            etcd_guard_tests::stdout(&out),
            "PUT\nec/1\none\nPUT\nec/2\ntwo\n",
            "{}",
            etcd_guard_tests::stderr(&out)
        );
    }
    settles(&h, SHARED, 0.0).await
}

/// A message on a watch stream that cannot be read ends the stream with etcd's error, its shared watches with it.
/// Before, the proxy's side of the stream stopped reading and rechecking but the stream stayed open, and the shared
/// watch's events kept coming, past any reload that withdrew them.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_message_ends_the_stream_and_its_shared_watches() -> TestResult {
    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::BodyExt;
    use tonic::codegen::Service;

    let h = start().await?;
    let mut conn = etcd_guard_tests::bare_h2(&h, &h.cilium()?, None).await?;
    // Another stream's watch, so that this one joins a shared watch.
    let other = h.client(&h.cilium()?).await?;
    let (_other, _) = open(&other, "cilium/", prefix()).await?;

    let (feed, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = tonic::body::Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
    let request = etcd_guard_tests::grpc_request(etcd_guard_proto::methods::WATCH_WATCH, body)?;
    let create = etcd_guard_proto::etcdserverpb::WatchRequest {
        request_union: Some(etcd_guard_proto::etcdserverpb::watch_request::RequestUnion::CreateRequest(
            etcd_guard_proto::etcdserverpb::WatchCreateRequest {
                key: b"cilium/".to_vec(),
                range_end: b"cilium0".to_vec(),
                ..Default::default()
            },
        )),
    };
    feed.send(Ok(Frame::data(etcd_guard_tests::grpc_message(&create)))).await?;
    std::future::poll_fn(|cx| conn.poll_ready(cx)).await?;
    let mut answer = tokio::time::timeout(WAIT, conn.call(request)).await??.into_body();
    let created = tokio::time::timeout(WAIT, answer.frame()).await?.ok_or("the stream ended")??;
    assert!(created.is_data(), "{created:?}");
    settles(&h, SUBSCRIBERS, 2.0).await.context("both watches share one upstream watch")?;

    // Not a WatchRequest (a length-delimited field whose length runs past the end).
    feed.send(Ok(Frame::data(etcd_guard_tests::grpc_frame(&[0x0a, 0x7f, 0x01])))).await?;
    let status = loop {
        let frame = tokio::time::timeout(WAIT, answer.frame()).await.map_err(|_| "the stream did not end")?;
        let frame = frame.ok_or("the stream ended without a status")??;
        if let Ok(trailers) = frame.into_trailers() {
            break trailers.get("grpc-status").ok_or("no grpc-status")?.to_str()?.to_string();
        }
    };
    assert_eq!(status, "13", "Internal, as etcd ends it");
    settles(&h, SUBSCRIBERS, 1.0).await.context("the stream's shared watch is left")?;
    drop(feed);
    Ok(())
}

/// etcd frees a watch ID as it reads the cancel: a create with that ID right behind the cancel, sent before the
/// cancel's answer came, is accepted through the proxy as by etcd.
#[tokio::test(flavor = "multi_thread")]
async fn a_watch_id_can_be_taken_again_right_behind_its_cancel() -> TestResult {
    let h = start().await?;
    let mut through_proxy = h.client(&h.admin()?).await?;
    let mut direct = h.client_direct().await?;
    for (what, c) in [("from etcd", &mut direct), ("through the proxy", &mut through_proxy)] {
        let mut s = c.watch("r/", Some(prefix().with_watch_id(5))).await?;
        assert_eq!(created(&mut s).await.context(what)?.watch_id(), 5, "{what}");
        s.cancel(5).await?;
        s.watch("r/", Some(prefix().with_watch_id(5))).await?;
        let canceled = next(&mut s).await.context(what)?;
        assert!(canceled.canceled() && canceled.watch_id() == 5, "{what}: {canceled:?}");
        let again = created(&mut s).await.context(what)?;
        assert_eq!(again.watch_id(), 5, "{what}: {again:?}");
        // And it is a live watch.
        let rev = put(c, "r/a", "1").await?;
        let event = next(&mut s).await.context(what)?;
        assert_eq!((event.watch_id(), event.events().len()), (5, 1), "{what}: {event:?}");
        assert_eq!(event.events()[0].kv().map(|kv| kv.mod_revision()), Some(rev), "{what}");
    }
    Ok(())
}

/// A Watch or LeaseKeepAlive stream opens its stream at etcd with the first message it forwards: the streams of a
/// client whose every message is refused (here one bound to nothing) open nothing at etcd, shared watches or not.
#[tokio::test(flavor = "multi_thread")]
async fn streams_whose_messages_are_all_refused_open_nothing_at_etcd() -> TestResult {
    const KEEP_ALIVES_STARTED: &str = r#"grpc_server_started_total{grpc_method="LeaseKeepAlive",grpc_service="etcdserverpb.Lease",grpc_type="bidi_stream"}"#;
    for coalesce in [false, true] {
        let extra = format!("audit: {{ file: audit/audit.log }}\nwatch: {{ coalesce: {coalesce} }}\n");
        let h = Harness::with_config(TEST_POLICY, &extra).await?;
        let what = format!("coalesce: {coalesce}");
        let (streams, keep_alives) =
            (etcd_metric(&h, ETCD_STREAMS).await?, etcd_metric(&h, KEEP_ALIVES_STARTED).await.unwrap_or(0.0));
        let mut nobody = h.client(&h.nobody()?).await?;
        let mut held = Vec::new();
        for i in 0..10 {
            let mut s = nobody.watch(format!("k{i}"), None).await?;
            let refused = next(&mut s).await.context(&what)?;
            assert!(refused.canceled(), "{what}: {refused:?}");
            held.push(s);
        }
        // (Ten of them: whether the stream at etcd would be opened as the refused stream closes is a race.)
        for _ in 0..10 {
            // Refused: the stream ends with etcd's error, and etcd never saw it.
            let kept = nobody.lease_keep_alive(0x1234).await;
            if let Ok((mut keeper, mut answers)) = kept {
                let _ = keeper.keep_alive().await;
                let _ = tokio::time::timeout(WAIT, answers.message()).await;
            }
        }
        // An allowed watch on the same kind of stream does open one.
        let mut admin = h.client(&h.admin()?).await?;
        let mut s = admin.watch("k", Some(WatchOptions::new().with_prev_key())).await?;
        created(&mut s).await.context(&what)?;
        assert_eq!(etcd_metric(&h, ETCD_STREAMS).await?, streams + 1.0, "{what}: only the allowed watch's stream");
        let started = etcd_metric(&h, KEEP_ALIVES_STARTED).await.unwrap_or(0.0);
        assert_eq!(started, keep_alives, "{what}: no keep-alive stream at etcd");
        drop(held);
    }
    Ok(())
}
