//! The load generator: the hidden `load` subcommand, run as its own process by the orchestrator.
//!
//! It opens real gRPC connections with mutual TLS (tonic, clients generated from `etcd-guard-proto`) to one
//! endpoint — etcd or the proxy, it cannot tell — drives one workload and reports on stdout, one JSON object per
//! line (see [`LoadEvent`]): `measuring` when the measured window opens (after a warm-up), `window_end` when it
//! closes, then `result`. The orchestrator reads `/proc` of etcd and of the proxy at those two moments.
//!
//! Only requests that *complete* inside the window are counted; their latency is from the moment they were sent.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use etcd_guard_proto::etcdserverpb::{
    self as pb, compare, kv_client::KvClient, lease_client::LeaseClient, request_op, response_op,
    watch_client::WatchClient, watch_request,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::BoxError;
use crate::stats::{self, Latency};

/// The single key read by the Range workloads (1 KiB value).
pub const LIN_KEY: &[u8] = b"/bench/lin/key";
/// Prefix of the Put workload's keys.
pub const PUT_PREFIX: &str = "/bench/put/";
/// Prefix of the leased-put workload's keys ([`MIX_KEYS`] of them, like the Put workload's).
pub const LEASED_PREFIX: &str = "/bench/event/";
/// Puts that share one lease in the leased-put workload: kube-apiserver's default `--lease-max-object-count`
/// (it also reuses a lease for at most a minute; a benchmark window is shorter).
pub const KEYS_PER_LEASE: u32 = 1000;
/// Prefix of the kube-apiserver-like mix's keys (preloaded, [`MIX_KEYS`] keys of [`SMALL_VALUE`] bytes).
pub const MIX_PREFIX: &str = "/bench/mix/";
/// End of the mix's prefix (`/bench/mix/` + 1 in the last byte).
pub const MIX_END: &str = "/bench/mix0";
/// Prefix the watchers watch.
pub const WATCH_PREFIX: &str = "/bench/watch/";
/// End of the watched prefix.
pub const WATCH_END: &str = "/bench/watch0";
/// Keys in the Put and mix key spaces.
pub const MIX_KEYS: u64 = 10_000;
/// Value size of Put and mix keys.
pub const SMALL_VALUE: usize = 256;
/// Value size of [`LIN_KEY`].
pub const LIN_VALUE: usize = 1024;
/// Page size of the mix's paged Range.
pub const PAGE_LIMIT: i64 = 500;
/// A request that takes longer than this counts as an error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What the load generator does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Workload {
    /// Linearizable Range of one key (1 KiB value).
    LinRange,
    /// Serializable Range of the same key.
    SerRange,
    /// Put of 256 B values over 10,000 keys.
    Put,
    /// kube-apiserver-like mix: 80 % Txn compare(mod_revision)-and-put (else Range), 10 % paged prefix Range
    /// (limit 500) over 10,000 keys, 10 % count_only Range of the prefix.
    Mix,
    /// Watch fan-out: N watchers on one prefix, steady puts carrying a timestamp, delivery latency.
    Watch,
    /// Lease keep-alives, as Cilium agents and Calico nodes keep their leases: each request in flight is a
    /// keep-alive stream of its own (a lease each, granted first) that sends a keep-alive and waits for its answer.
    KeepAlive,
    /// Puts of 256 B values with a lease, as kube-apiserver writes Events: one lease is shared by up to
    /// [`KEYS_PER_LEASE`] puts before the next is granted (kube-apiserver's lease manager), by the scoped identity
    /// (`/bench/` only), so the proxy asks etcd for the lease's keys before each put.
    LeasedPut,
    /// Idle connections: open N connections, one Range each, then hold them (memory per connection).
    Idle,
}

impl Workload {
    /// The name used on the command line and in results.
    pub fn name(self) -> &'static str {
        match self {
            Workload::LinRange => "lin-range",
            Workload::SerRange => "ser-range",
            Workload::Put => "put",
            Workload::Mix => "mix",
            Workload::Watch => "watch",
            Workload::KeepAlive => "keep-alive",
            Workload::LeasedPut => "leased-put",
            Workload::Idle => "idle",
        }
    }
}

/// Arguments of the hidden `load` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadArgs {
    /// Endpoint URL (https://127.0.0.1:PORT).
    #[arg(long)]
    pub endpoint: String,
    /// CA certificate that signed the server's certificate.
    #[arg(long)]
    pub ca: PathBuf,
    /// Client certificate.
    #[arg(long)]
    pub cert: PathBuf,
    /// Client key.
    #[arg(long)]
    pub key: PathBuf,
    /// Workload.
    #[arg(long, value_enum)]
    pub workload: Workload,
    /// HTTP/2 connections.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Requests in flight in all (spread over the connections).
    #[arg(long, default_value_t = 64)]
    pub in_flight: usize,
    /// Warm-up before the measured window, milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
    /// Measured window, milliseconds.
    #[arg(long, default_value_t = 4000)]
    pub duration_ms: u64,
    /// Fixed total request rate (requests/s, open loop) instead of as fast as possible.
    #[arg(long)]
    pub rate: Option<f64>,
    /// Watchers (watch workload).
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Puts per second (watch workload).
    #[arg(long, default_value_t = 20.0)]
    pub put_rate: f64,
    /// Where the watch workload sends its puts [default: --endpoint].
    #[arg(long)]
    pub put_endpoint: Option<String>,
    /// Watch creations in progress at once (watch workload): a watcher is opened only when fewer than this many
    /// are waiting for their `created` answer.
    #[arg(long, default_value_t = 100)]
    pub create_window: usize,
    /// Connections to open (idle workload).
    #[arg(long, default_value_t = 1000)]
    pub idle_conns: usize,
    /// Seed of the key choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One line of the load generator's output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum LoadEvent {
    /// Watch workload: every watcher is created.
    WatchersReady { watchers: u64, setup_ms: u64 },
    /// The measured window opens.
    Measuring,
    /// The measured window closes.
    WindowEnd,
    /// Figures of the window.
    Result(LoadResult),
    /// Idle workload: one connection is set up; waiting for `go` on stdin.
    Baseline,
    /// Idle workload: every connection is set up; waiting for `stop` (or end of input) on stdin.
    Ready { connections: u64, setup_ms: u64 },
    /// The load generator gave up.
    Failed { message: String },
}

/// Figures of one measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    /// Requests (watch: events delivered) completed successfully inside the window.
    pub requests: u64,
    /// Failed requests (status, timeout, undecodable event) inside the window.
    pub errors: u64,
    /// The first few error messages.
    pub error_examples: Vec<String>,
    /// Length of the window, seconds.
    pub elapsed_s: f64,
    /// `requests / elapsed_s`.
    pub rps: f64,
    /// Latency (watch: from the put being sent to the event arriving).
    pub latency: Latency,
    /// CPU seconds the load generator itself used in the window.
    pub client_cpu_s: f64,
    /// Workload-specific counters (mix: per operation; watch: puts, expected deliveries; rate: late sends).
    pub detail: BTreeMap<String, u64>,
}

const WARMUP: u8 = 0;
const MEASURING: u8 = 1;
const DONE: u8 = 2;

/// Run the load generator (the `load` subcommand). Errors are also reported as a `failed` line.
pub fn main(args: LoadArgs) -> Result<(), BoxError> {
    // A hard bound on the process's life, whatever happens to the connections.
    let bound = Duration::from_millis(args.warmup_ms + args.duration_ms)
        + Duration::from_secs(120)
        + Duration::from_millis(10 * args.watchers as u64 + 20 * args.idle_conns as u64);
    std::thread::spawn(move || {
        std::thread::sleep(bound);
        eprintln!("etcd-guard-bench load: time limit of {bound:?} reached, exiting");
        std::process::exit(3);
    });
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let outcome = runtime.block_on(async move {
        match args.workload {
            Workload::Watch => run_watch(&args).await,
            Workload::Idle => run_idle(&args).await,
            _ => run_unary(&args).await,
        }
    });
    if let Err(e) = &outcome {
        emit(&LoadEvent::Failed { message: e.to_string() });
    }
    outcome
}

fn emit(event: &LoadEvent) {
    match serde_json::to_string(event) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("etcd-guard-bench load: cannot encode an event: {e}"),
    }
}

/// An endpoint with mutual TLS, ready to open connections (each `connect` is a new HTTP/2 connection).
pub fn tls_endpoint(
    url: &str,
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Endpoint, BoxError> {
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(ca)?))
        .identity(Identity::from_pem(read(cert)?, read(key)?))
        .domain_name("localhost");
    Ok(Endpoint::from_shared(url.to_string())?
        .tls_config(tls)?
        .tcp_nodelay(true)
        // A large connection window: h2 closes a connection whose receiver leaves too many small DATA frames
        // unread (a budget of half the connection window); the load generator must not be the one to fail.
        .initial_connection_window_size(Some(16 << 20))
        .connect_timeout(Duration::from_secs(5)))
}

async fn connect_all(args: &LoadArgs, n: usize) -> Result<Vec<Channel>, BoxError> {
    let endpoint = tls_endpoint(&args.endpoint, &args.ca, &args.cert, &args.key)?;
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(endpoint.connect().await.map_err(|e| format!("connecting to {}: {e:?}", args.endpoint))?);
    }
    Ok(channels)
}

/// One answered call on each connection before the warm-up starts (a serializable Range of one key): a fresh
/// proxy makes its upstream connections at its first calls, and on a loaded machine those handshakes can outlast a
/// short warm-up, leaving a short window with nothing served. Set-up is not what the windows measure. A call that
/// fails is made again (as the warm-up's failures, these are not counted), for up to `REQUEST_TIMEOUT` in all.
async fn answered_once(channels: &[Channel]) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    for channel in channels {
        loop {
            let request = pb::RangeRequest { key: LIN_KEY.to_vec(), serializable: true, ..Default::default() };
            let mut kv = KvClient::new(channel.clone());
            let failure = match tokio::time::timeout_at(deadline, kv.range(request)).await {
                Ok(Ok(_)) => break,
                Ok(Err(status)) => status.to_string(),
                Err(_) => "no answer".to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(format!("a connection answered no first call within {REQUEST_TIMEOUT:?}: {failure}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

fn client_cpu_ticks() -> u64 {
    crate::procfs::sample("self").map(|s| s.cpu_ticks).unwrap_or(0)
}

/// A small, fast pseudo-random generator (xorshift64*): key choice only.
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed (any value).
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Key `i` of a 10,000-key space: `prefix` + five digits.
pub fn numbered_key(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}{i:05}").into_bytes()
}

/// What one worker saw.
#[derive(Default)]
struct WorkerOut {
    latencies: Vec<u32>,
    errors: u64,
    error_examples: Vec<String>,
    counts: BTreeMap<&'static str, u64>,
}

impl WorkerOut {
    fn error(&mut self, message: String) {
        self.errors += 1;
        if self.error_examples.len() < 3 {
            self.error_examples.push(message);
        }
    }

    fn merge(&mut self, other: WorkerOut) {
        self.latencies.extend(other.latencies);
        self.errors += other.errors;
        for e in other.error_examples {
            if self.error_examples.len() < 5 {
                self.error_examples.push(e);
            }
        }
        for (k, v) in other.counts {
            *self.counts.entry(k).or_default() += v;
        }
    }

    fn into_result(mut self, elapsed: Duration, client_cpu_s: f64) -> LoadResult {
        let latency = stats::summarise(&mut self.latencies);
        let elapsed_s = elapsed.as_secs_f64();
        let requests = latency.samples;
        LoadResult {
            requests,
            errors: self.errors,
            error_examples: self.error_examples,
            elapsed_s,
            rps: if elapsed_s > 0.0 { requests as f64 / elapsed_s } else { 0.0 },
            latency,
            client_cpu_s,
            detail: self.counts.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        }
    }
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Open the window after the warm-up, close it after the duration; returns the window's length and the load
/// generator's own CPU seconds in it.
async fn measured_window(args: &LoadArgs, phase: &AtomicU8, clk_tck: u64) -> (Duration, f64) {
    tokio::time::sleep(Duration::from_millis(args.warmup_ms)).await;
    let cpu0 = client_cpu_ticks();
    let start = Instant::now();
    phase.store(MEASURING, Ordering::SeqCst);
    emit(&LoadEvent::Measuring);
    tokio::time::sleep(Duration::from_millis(args.duration_ms)).await;
    phase.store(DONE, Ordering::SeqCst);
    let elapsed = start.elapsed();
    emit(&LoadEvent::WindowEnd);
    let cpu = client_cpu_ticks().saturating_sub(cpu0) as f64 / clk_tck as f64;
    (elapsed, cpu)
}

// === unary workloads ===

/// Shared state of the mix: the last known mod_revision of each key, as kube-apiserver's cache would hold it.
struct MixState {
    revisions: Vec<AtomicI64>,
}

async fn run_unary(args: &LoadArgs) -> Result<(), BoxError> {
    let clk_tck = crate::procfs::USER_HZ;
    let channels = connect_all(args, args.connections).await?;
    answered_once(&channels).await?;
    let mix = Arc::new(MixState { revisions: (0..MIX_KEYS).map(|_| AtomicI64::new(0)).collect() });
    if args.workload == Workload::Mix {
        load_mix_revisions(&channels[0], &mix).await?;
    }
    let leases = (args.workload == Workload::LeasedPut)
        .then(|| Arc::new(LeaseShare { current: Default::default(), client: LeaseClient::new(channels[0].clone()) }));
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let in_flight = args.in_flight.max(1);
    let schedule_start = Instant::now();
    let mut workers = JoinSet::new();
    for i in 0..in_flight {
        let kv = KvClient::new(channels[i % channels.len()].clone()).max_decoding_message_size(64 << 20);
        let schedule = args.rate.filter(|r| *r > 0.0).map(|rate| {
            // Worker i sends at rate/in_flight, offset so that the sends of all workers interleave evenly.
            let period = Duration::from_secs_f64(in_flight as f64 / rate);
            (schedule_start + period.mul_f64(i as f64 / in_flight as f64), period)
        });
        let keep_alive = match args.workload {
            Workload::KeepAlive => Some(KeepAliveStream::open(channels[i % channels.len()].clone()).await?),
            _ => None,
        };
        let worker = UnaryWorker {
            workload: args.workload,
            kv,
            rng: Rng::new(args.seed ^ (i as u64 + 1)),
            mix: mix.clone(),
            keep_alive,
            leases: leases.clone(),
        };
        workers.spawn(worker.run(phase.clone(), schedule));
    }
    let (elapsed, client_cpu_s) = measured_window(args, &phase, clk_tck).await;
    let mut total = WorkerOut::default();
    let collect = async {
        while let Some(joined) = workers.join_next().await {
            match joined {
                Ok(out) => total.merge(out),
                Err(e) => total.error(format!("worker: {e}")),
            }
        }
    };
    // Workers stop after their outstanding request; do not wait for a hung one.
    if tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), collect).await.is_err() {
        workers.abort_all();
    }
    emit(&LoadEvent::Result(total.into_result(elapsed, client_cpu_s)));
    Ok(())
}

async fn load_mix_revisions(channel: &Channel, mix: &MixState) -> Result<(), BoxError> {
    let mut kv = KvClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let resp = kv
        .range(pb::RangeRequest {
            key: MIX_PREFIX.as_bytes().to_vec(),
            range_end: MIX_END.as_bytes().to_vec(),
            keys_only: true,
            ..Default::default()
        })
        .await?
        .into_inner();
    for kv in resp.kvs {
        let index = kv
            .key
            .strip_prefix(MIX_PREFIX.as_bytes())
            .and_then(|rest| std::str::from_utf8(rest).ok())
            .and_then(|digits| digits.parse::<usize>().ok());
        if let Some(slot) = index.and_then(|i| mix.revisions.get(i)) {
            slot.store(kv.mod_revision, Ordering::Relaxed);
        }
    }
    Ok(())
}

struct UnaryWorker {
    workload: Workload,
    kv: KvClient<Channel>,
    rng: Rng,
    mix: Arc<MixState>,
    /// The worker's keep-alive stream (keep-alive workload).
    keep_alive: Option<KeepAliveStream>,
    /// The lease shared by all workers (leased-put workload).
    leases: Option<Arc<LeaseShare>>,
}

/// The lease the leased-put workers attach their keys to, as kube-apiserver's lease manager shares one lease among
/// many objects: a new one is granted once [`KEYS_PER_LEASE`] puts have used the current one.
struct LeaseShare {
    /// The current lease and the puts that used it (no lease yet: 0).
    current: tokio::sync::Mutex<(i64, u32)>,
    client: LeaseClient<Channel>,
}

impl LeaseShare {
    /// The lease for the next put.
    async fn next(&self) -> Result<i64, tonic::Status> {
        let mut current = self.current.lock().await;
        if current.0 == 0 || current.1 >= KEYS_PER_LEASE {
            // An hour, as Events live; the keys move to newer leases as they are written again.
            let grant = pb::LeaseGrantRequest { ttl: 3600, id: 0 };
            *current = (self.client.clone().lease_grant(grant).await?.into_inner().id, 0);
        }
        current.1 += 1;
        Ok(current.0)
    }
}

/// A lease and the keep-alive stream that keeps it (keep-alive workload).
struct KeepAliveStream {
    lease: i64,
    requests: tokio::sync::mpsc::Sender<pb::LeaseKeepAliveRequest>,
    answers: tonic::Streaming<pb::LeaseKeepAliveResponse>,
}

impl KeepAliveStream {
    /// Grant a lease (60 s) and open its keep-alive stream with a first keep-alive (etcd sends the stream's headers
    /// only with its first answer), whose answer is read here.
    async fn open(channel: Channel) -> Result<KeepAliveStream, BoxError> {
        let mut client = LeaseClient::new(channel);
        let lease = client.lease_grant(pb::LeaseGrantRequest { ttl: 60, id: 0 }).await?.into_inner().id;
        let (requests, mut rx) = tokio::sync::mpsc::channel(1);
        requests.send(pb::LeaseKeepAliveRequest { id: lease }).await.map_err(|_| "keep-alive stream closed")?;
        let outbound = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut answers = client.lease_keep_alive(outbound).await?.into_inner();
        answers.message().await?.ok_or("the keep-alive stream ended at once")?;
        Ok(KeepAliveStream { lease, requests, answers })
    }

    async fn keep_alive(&mut self) -> Result<(), tonic::Status> {
        let closed = || tonic::Status::unavailable("the keep-alive stream closed");
        self.requests.send(pb::LeaseKeepAliveRequest { id: self.lease }).await.map_err(|_| closed())?;
        match self.answers.message().await? {
            Some(answer) if answer.ttl > 0 => Ok(()),
            Some(_) => Err(tonic::Status::not_found("the lease expired")),
            None => Err(closed()),
        }
    }
}

impl UnaryWorker {
    async fn run(mut self, phase: Arc<AtomicU8>, schedule: Option<(Instant, Duration)>) -> WorkerOut {
        let mut out = WorkerOut::default();
        let mut next = schedule.map(|(start, _)| start);
        loop {
            if phase.load(Ordering::Relaxed) == DONE {
                break;
            }
            if let (Some(at), Some((_, period))) = (next.as_mut(), schedule) {
                tokio::time::sleep_until((*at).into()).await;
                if Instant::now() > *at + period && phase.load(Ordering::Relaxed) == MEASURING {
                    // The generator could not keep the rate (the server is saturated or the host is busy).
                    *out.counts.entry("late_sends").or_default() += 1;
                }
                *at += period;
            }
            let sent = Instant::now();
            let result = tokio::time::timeout(REQUEST_TIMEOUT, self.one()).await;
            let latency = sent.elapsed();
            if phase.load(Ordering::Relaxed) != MEASURING {
                continue;
            }
            match result {
                Ok(Ok(op)) => {
                    out.latencies.push(micros(latency));
                    if self.workload == Workload::Mix {
                        *out.counts.entry(op).or_default() += 1;
                    }
                }
                Ok(Err(status)) => out.error(format!("{:?}: {}", status.code(), status.message())),
                Err(_) => out.error(format!("no answer within {REQUEST_TIMEOUT:?}")),
            }
        }
        out
    }

    /// One request; returns the name of the operation done (for the mix's counters).
    async fn one(&mut self) -> Result<&'static str, tonic::Status> {
        match self.workload {
            Workload::LinRange | Workload::SerRange => {
                let req = pb::RangeRequest {
                    key: LIN_KEY.to_vec(),
                    serializable: self.workload == Workload::SerRange,
                    ..Default::default()
                };
                self.kv.range(req).await?;
                Ok("range")
            }
            Workload::Put => {
                let key = numbered_key(PUT_PREFIX, self.rng.below(MIX_KEYS));
                self.kv.put(pb::PutRequest { key, value: vec![b'p'; SMALL_VALUE], ..Default::default() }).await?;
                Ok("put")
            }
            Workload::Mix => self.mix_op().await,
            Workload::LeasedPut => {
                let Some(leases) = self.leases.as_ref() else {
                    return Err(tonic::Status::internal("no shared lease"));
                };
                let lease = leases.next().await?;
                let key = numbered_key(LEASED_PREFIX, self.rng.below(MIX_KEYS));
                self.kv
                    .put(pb::PutRequest { key, value: vec![b'e'; SMALL_VALUE], lease, ..Default::default() })
                    .await?;
                Ok("leased_put")
            }
            Workload::KeepAlive => match self.keep_alive.as_mut() {
                Some(stream) => stream.keep_alive().await.map(|()| "keep_alive"),
                None => Err(tonic::Status::internal("no keep-alive stream")),
            },
            Workload::Watch | Workload::Idle => Err(tonic::Status::internal("not a unary workload")),
        }
    }

    async fn mix_op(&mut self) -> Result<&'static str, tonic::Status> {
        let dice = self.rng.below(100);
        if dice < 80 {
            // kube-apiserver's GuaranteedUpdate: put if mod_revision is still what we saw, else read the key.
            let index = self.rng.below(MIX_KEYS);
            let key = numbered_key(MIX_PREFIX, index);
            let slot = self.mix.revisions.get(index as usize);
            let seen = slot.map(|s| s.load(Ordering::Relaxed)).unwrap_or(0);
            let txn = pb::TxnRequest {
                compare: vec![pb::Compare {
                    result: compare::CompareResult::Equal as i32,
                    target: compare::CompareTarget::Mod as i32,
                    key: key.clone(),
                    range_end: Vec::new(),
                    target_union: Some(compare::TargetUnion::ModRevision(seen)),
                }],
                success: vec![pb::RequestOp {
                    request: Some(request_op::Request::RequestPut(pb::PutRequest {
                        key: key.clone(),
                        value: vec![b'm'; SMALL_VALUE],
                        ..Default::default()
                    })),
                }],
                failure: vec![pb::RequestOp {
                    request: Some(request_op::Request::RequestRange(pb::RangeRequest { key, ..Default::default() })),
                }],
            };
            let resp = self.kv.txn(txn).await?.into_inner();
            let (op, revision) = if resp.succeeded {
                ("txn_put", resp.header.map(|h| h.revision))
            } else {
                let current = resp.responses.into_iter().find_map(|r| match r.response {
                    Some(response_op::Response::ResponseRange(range)) => range.kvs.first().map(|kv| kv.mod_revision),
                    _ => None,
                });
                ("txn_conflict", current)
            };
            if let (Some(slot), Some(revision)) = (slot, revision) {
                slot.store(revision, Ordering::Relaxed);
            }
            Ok(op)
        } else if dice < 90 {
            let start = self.rng.below(MIX_KEYS);
            let req = pb::RangeRequest {
                key: numbered_key(MIX_PREFIX, start),
                range_end: MIX_END.as_bytes().to_vec(),
                limit: PAGE_LIMIT,
                ..Default::default()
            };
            self.kv.range(req).await?;
            Ok("range_page")
        } else {
            let req = pb::RangeRequest {
                key: MIX_PREFIX.as_bytes().to_vec(),
                range_end: MIX_END.as_bytes().to_vec(),
                count_only: true,
                ..Default::default()
            };
            self.kv.range(req).await?;
            Ok("range_count")
        }
    }
}

// === watch fan-out ===

/// Value of a watched put: microseconds since the load generator's start (8 bytes, little endian), then padding.
fn stamp(base: Instant) -> Vec<u8> {
    let mut value = (base.elapsed().as_micros() as u64).to_le_bytes().to_vec();
    value.resize(64, b'w');
    value
}

fn read_stamp(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.get(..8)?.try_into().ok()?))
}

async fn run_watch(args: &LoadArgs) -> Result<(), BoxError> {
    let clk_tck = crate::procfs::USER_HZ;
    let channels = connect_all(args, args.connections).await?;
    let put_channel = match &args.put_endpoint {
        Some(url) => tls_endpoint(url, &args.ca, &args.cert, &args.key)?.connect().await?,
        None => connect_all(args, 1).await?.remove(0),
    };
    answered_once(std::slice::from_ref(&put_channel)).await?;
    let base = Instant::now();
    let phase = Arc::new(AtomicU8::new(WARMUP));
    let created = Arc::new(AtomicU64::new(0));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut watchers = JoinSet::new();
    let deadline = Instant::now() + Duration::from_secs(60) + Duration::from_millis(10 * args.watchers as u64);
    let window = args.create_window.max(1) as u64;
    let mut spawned: u64 = 0;
    while created.load(Ordering::SeqCst) < args.watchers as u64 {
        while spawned < args.watchers as u64 && spawned - created.load(Ordering::SeqCst) < window {
            let channel = channels[spawned as usize % channels.len()].clone();
            let client = WatchClient::new(channel).max_decoding_message_size(64 << 20);
            watchers.spawn(watcher(client, base, phase.clone(), created.clone(), stop_rx.clone()));
            spawned += 1;
        }
        let failure = if Instant::now() > deadline {
            Some(format!("only {} of {} watchers were created in time", created.load(Ordering::SeqCst), args.watchers))
        } else {
            // A watcher that ended before the puts started failed.
            watchers.try_join_next().map(|out| match out {
                Ok(out) => format!("a watcher ended while the watchers were being created: {:?}", out.error_examples),
                Err(e) => format!("a watcher ended while the watchers were being created: {e}"),
            })
        };
        if let Some(message) = failure {
            // The run failed as a whole: report it as a result (every watcher counted as an error), so that the
            // benchmark records the failure and goes on.
            watchers.abort_all();
            emit(&LoadEvent::Result(LoadResult {
                errors: args.watchers as u64,
                error_examples: vec![message],
                ..Default::default()
            }));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    emit(&LoadEvent::WatchersReady { watchers: args.watchers as u64, setup_ms: base.elapsed().as_millis() as u64 });

    // A putter waits for each answer before its next put, so a high rate is shared among several of them (on the
    // same connection): one watcher with thousands of puts per second is one busy stream, like kube-apiserver's.
    let putters = (args.put_rate / PUTS_PER_PUTTER).ceil().max(1.0) as u64;
    let mut puts = JoinSet::new();
    for first in 0..putters {
        let kv = KvClient::new(put_channel.clone());
        puts.spawn(putter(kv, base, args.put_rate / putters as f64, first, phase.clone()));
    }
    let (elapsed, client_cpu_s) = measured_window(args, &phase, clk_tck).await;
    let _ = stop_tx.send(true);
    let mut total = WorkerOut::default();
    let collect = async {
        while let Some(joined) = watchers.join_next().await {
            match joined {
                Ok(out) => total.merge(out),
                Err(e) => total.error(format!("watcher: {e}")),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(10), collect).await.is_err() {
        watchers.abort_all();
    }
    let all_puts = async {
        let mut all = WorkerOut::default();
        while let Some(joined) = puts.join_next().await {
            match joined {
                Ok(p) => all.merge(p),
                Err(e) => all.error(format!("putter: {e}")),
            }
        }
        all
    };
    match tokio::time::timeout(REQUEST_TIMEOUT + Duration::from_secs(1), all_puts).await {
        Ok(p) => {
            total.counts.insert("puts_in_window", p.latencies.len() as u64);
            total.counts.insert("expected_deliveries", p.latencies.len() as u64 * args.watchers as u64);
            total.counts.insert("put_errors", p.errors);
            let mut lat = p.latencies;
            total.counts.insert("put_p99_us", stats::summarise(&mut lat).p99_us);
            total.errors += p.errors;
            total.error_examples.extend(p.error_examples);
        }
        Err(_) => total.error("the putters did not finish".into()),
    }
    emit(&LoadEvent::Result(total.into_result(elapsed, client_cpu_s)));
    Ok(())
}

async fn watcher(
    mut client: WatchClient<Channel>,
    base: Instant,
    phase: Arc<AtomicU8>,
    created: Arc<AtomicU64>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> WorkerOut {
    let mut out = WorkerOut::default();
    let create = pb::WatchRequest {
        request_union: Some(watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
            key: WATCH_PREFIX.as_bytes().to_vec(),
            range_end: WATCH_END.as_bytes().to_vec(),
            ..Default::default()
        })),
    };
    // The request stream stays open (pending) until the watcher is dropped.
    let outbound = futures_util::stream::iter([create]).chain(futures_util::stream::pending());
    let mut inbound = match client.watch(outbound).await {
        Ok(r) => r.into_inner(),
        Err(status) => {
            out.error(format!("watch: {status:?}"));
            return out;
        }
    };
    loop {
        let message = tokio::select! {
            m = inbound.message() => m,
            _ = stop.changed() => break,
        };
        let resp = match message {
            Ok(Some(resp)) => resp,
            Ok(None) => {
                out.error("watch stream ended".into());
                break;
            }
            Err(status) => {
                out.error(format!("watch: {status:?}"));
                break;
            }
        };
        if resp.created {
            created.fetch_add(1, Ordering::SeqCst);
        }
        if resp.canceled {
            out.error(format!("watch canceled: {}", resp.cancel_reason));
            break;
        }
        let now = base.elapsed().as_micros() as u64;
        let measuring = phase.load(Ordering::Relaxed) == MEASURING;
        for event in resp.events {
            match event.kv.as_ref().and_then(|kv| read_stamp(&kv.value)) {
                Some(sent) if measuring => {
                    out.latencies.push(u32::try_from(now.saturating_sub(sent)).unwrap_or(u32::MAX))
                }
                Some(_) => {}
                None if measuring => out.error("event without a timestamp".into()),
                None => {}
            }
        }
    }
    out
}

/// Put timestamped values at a steady rate until the window closes; latencies are those of the puts.
/// Puts per second one putter is given at most (it sends one put at a time).
const PUTS_PER_PUTTER: f64 = 250.0;

async fn putter(mut kv: KvClient<Channel>, base: Instant, rate: f64, first: u64, phase: Arc<AtomicU8>) -> WorkerOut {
    let mut out = WorkerOut::default();
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    let mut next = Instant::now();
    let mut n: u64 = first;
    while phase.load(Ordering::Relaxed) != DONE {
        tokio::time::sleep_until(next.into()).await;
        next += period;
        let key = format!("{WATCH_PREFIX}{:02}", n % 16).into_bytes();
        n += 1;
        let sent = Instant::now();
        let result = tokio::time::timeout(
            REQUEST_TIMEOUT,
            kv.put(pb::PutRequest { key, value: stamp(base), ..Default::default() }),
        )
        .await;
        if phase.load(Ordering::Relaxed) != MEASURING {
            continue;
        }
        match result {
            Ok(Ok(_)) => out.latencies.push(micros(sent.elapsed())),
            Ok(Err(status)) => out.error(format!("put: {:?}: {}", status.code(), status.message())),
            Err(_) => out.error("put: no answer in time".into()),
        }
    }
    out
}

// === idle connections ===

async fn run_idle(args: &LoadArgs) -> Result<(), BoxError> {
    let endpoint = tls_endpoint(&args.endpoint, &args.ca, &args.cert, &args.key)?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let first = endpoint.connect().await?;
    KvClient::new(first.clone()).range(pb::RangeRequest { key: LIN_KEY.to_vec(), ..Default::default() }).await?;
    emit(&LoadEvent::Baseline);
    // Wait for the orchestrator to read the server's memory.
    let _ = stdin.next_line().await?;
    let start = Instant::now();
    let mut held = Vec::with_capacity(args.idle_conns);
    let mut pending = JoinSet::new();
    for _ in 0..args.idle_conns {
        let endpoint = endpoint.clone();
        pending.spawn(async move {
            let channel = endpoint.connect().await?;
            KvClient::new(channel.clone())
                .range(pb::RangeRequest { key: LIN_KEY.to_vec(), ..Default::default() })
                .await?;
            Ok::<Channel, BoxError>(channel)
        });
        // Keep the handshakes in progress bounded.
        while pending.len() >= 32 {
            if let Some(joined) = pending.join_next().await {
                held.push(joined??);
            }
        }
    }
    while let Some(joined) = pending.join_next().await {
        held.push(joined??);
    }
    emit(&LoadEvent::Ready { connections: held.len() as u64, setup_ms: start.elapsed().as_millis() as u64 });
    let _ = stdin.next_line().await?;
    drop(held);
    drop(first);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let base = Instant::now();
        let value = stamp(base);
        assert_eq!(value.len(), 64);
        assert!(read_stamp(&value).is_some());
        assert_eq!(read_stamp(&[1, 2, 3]), None);
        assert_eq!(read_stamp(&7u64.to_le_bytes()), Some(7));
    }

    #[test]
    fn keys_and_random_choice() {
        assert_eq!(numbered_key(PUT_PREFIX, 42), b"/bench/put/00042".to_vec());
        let mut rng = Rng::new(0);
        assert!((0..1000).all(|_| rng.below(10) < 10));
        assert_eq!(Rng::new(5).next_u64(), Rng::new(5).next_u64());
    }

    #[test]
    fn events_round_trip_as_json_lines() -> Result<(), BoxError> {
        let line = serde_json::to_string(&LoadEvent::Result(LoadResult { requests: 3, ..Default::default() }))?;
        assert!(line.starts_with(r#"{"event":"result""#), "{line}");
        match serde_json::from_str::<LoadEvent>(&line)? {
            LoadEvent::Result(r) => assert_eq!(r.requests, 3),
            other => return Err(format!("unexpected {other:?}").into()),
        }
        Ok(())
    }
}
