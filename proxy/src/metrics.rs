//! Prometheus metrics, and the plain-HTTP listener for `/healthz`, `/readyz` and `/metrics`.
//!
//! The listener is separate from the gRPC one and binds to loopback by default: it has no authentication and
//! must not be exposed beyond the node.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::audit::AuditLog;
use crate::procfs;
use crate::upstream::Upstream;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub rpc: &'static str,
    pub decision: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub rpc: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    pub certificate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// Every metric the proxy keeps.
pub struct Metrics {
    registry: Registry,
    /// Requests and stream messages, by RPC, decision and gRPC code.
    pub requests: Family<RequestLabels, Counter>,
    /// Time from arrival to answer of unary calls and stream messages.
    pub latency: Family<RpcLabels, Histogram>,
    /// Time from sending an allowed unary call to etcd until its whole answer was read or the call was dropped:
    /// `latency` (which counts denied calls too) minus this is about what the proxy adds.
    pub upstream_latency: Family<RpcLabels, Histogram>,
    /// Denials not enforced because of `audit-only` bindings.
    pub would_deny: Family<RpcLabels, Counter>,
    /// Denials counted in summary records rather than recorded each (`audit.denial_records`).
    pub audit_denials_summarised: Counter,
    /// Streams open now, by RPC.
    pub open_streams: Family<RpcLabels, Gauge>,
    /// Client connections open now.
    pub connections: Gauge,
    /// Client connections closed at once because `limits.max_connections` were open.
    pub connections_refused: Family<LimitLabels, Counter>,
    /// Watches open now (created by etcd, not yet canceled).
    pub open_watches: Gauge,
    /// Upstream watches shared by several client watches now (`watch.coalesce`).
    pub shared_watches: Gauge,
    /// Client watches served by a shared upstream watch now.
    pub shared_watch_subscribers: Gauge,
    /// Client watches moved from a shared upstream watch to one of their own (slow reader, progress request).
    pub shared_watch_detaches: Counter,
    /// Creates from now that waited for a lookup of etcd's current revision before joining a shared watch.
    pub shared_watch_revision_waits: Counter,
    /// TLS handshakes that failed, by reason.
    pub handshake_failures: Family<ReasonLabels, Counter>,
    /// Open connections closed because a reloaded client CA bundle or CRL no longer trusts their certificate.
    pub connections_untrusted: Counter,
    /// When the certificate files in force expire (earliest notAfter per file), Unix seconds.
    pub certificate_expiry: Family<CertificateLabels, Gauge>,
    /// The earliest nextUpdate of the CRLs in force, Unix seconds.
    pub crl_next_update: Gauge,
    /// Reloads of the policy and certificates, by result.
    pub reloads: Family<ResultLabels, Counter>,
    /// 1 while a reload round reads and checks its files.
    pub reload_in_progress: Gauge,
    /// Requests refused by a limit, by limit.
    pub limited: Family<LimitLabels, Counter>,
    /// Lookups of a lease's keys at etcd (`LeaseTimeToLive` with keys) made to check a lease request.
    pub lease_lookups: Counter,
    /// Requests that waited for the keys of a lease (several share one lookup).
    pub lease_lookup_waits: Counter,
    upstream_healthy: Family<EndpointLabels, Gauge>,
    upstream_retried: Counter,
    audit_queue: Gauge,
    audit_written: Counter,
    audit_last_seq: Gauge,
    audit_errors: Counter,
    audit_lost: Counter,
}

/// The request counter and latency histogram of each label set one connection has used, so that counting a
/// request does not hash its labels and lock the shared families every time. Handles share their values with the
/// families, so `/metrics` shows the same numbers.
#[derive(Default)]
pub struct RequestHandles {
    seen: Mutex<Vec<(RequestLabels, (Counter, Histogram))>>,
    /// The upstream latency histogram of each RPC forwarded.
    upstream: Mutex<Vec<(&'static str, Histogram)>>,
}

/// Label sets a connection keeps handles for; further ones are looked up in the families each time.
const MAX_HANDLES: usize = 32;

// === impl RequestHandles ===

impl RequestHandles {
    /// Count one request and its latency.
    pub fn observe(&self, metrics: &Metrics, labels: RequestLabels, seconds: f64) {
        let make = |labels: &RequestLabels| {
            let counter = metrics.requests.get_or_create(labels).clone();
            (counter, metrics.latency.get_or_create(&RpcLabels { rpc: labels.rpc }).clone())
        };
        with_handle(&self.seen, labels, make, |(counter, latency)| {
            counter.inc();
            latency.observe(seconds);
        });
    }

    /// The time etcd took to answer a unary call of `rpc`.
    pub fn observe_upstream(&self, metrics: &Metrics, rpc: &'static str, seconds: f64) {
        let make = |&rpc: &&'static str| metrics.upstream_latency.get_or_create(&RpcLabels { rpc }).clone();
        with_handle(&self.upstream, rpc, make, |latency| latency.observe(seconds));
    }
}

/// `apply` to the handle `cache` keeps for `key`; the first time, to the one `make` gives, which is kept (up to
/// [`MAX_HANDLES`] of them).
fn with_handle<K: PartialEq, V>(
    cache: &Mutex<Vec<(K, V)>>,
    key: K,
    make: impl FnOnce(&K) -> V,
    apply: impl FnOnce(&V),
) {
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, handle)) = cache.iter().find(|(k, _)| *k == key) {
        apply(handle);
        return;
    }
    let handle = make(&key);
    apply(&handle);
    if cache.len() < MAX_HANDLES {
        cache.push((key, handle));
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        // The standard `process_*` metrics, unprefixed, so that dashboards and the CPU-per-request figure of
        // BENCHMARKS.md work on them as on any other process.
        root.register_collector(Box::new(ProcessCollector::new()));
        let registry = root.sub_registry_with_prefix("etcd_guard");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests and stream messages by RPC, decision and gRPC code", requests.clone());
        let latency = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_05, 2.0, 18))) as fn() -> Histogram,
        );
        registry.register_with_unit(
            "request_duration",
            "Time from arrival to answer of unary calls and stream messages",
            Unit::Seconds,
            latency.clone(),
        );
        let upstream_latency = Family::<RpcLabels, Histogram>::new_with_constructor(
            (|| Histogram::new(exponential_buckets(0.000_05, 2.0, 18))) as fn() -> Histogram,
        );
        registry.register_with_unit(
            "upstream_duration",
            "Time from sending an allowed unary call to etcd (its encoding and its wait for the HTTP/2 connection \
             included, and calls made again on another endpoint) until its whole answer was read or the call was \
             dropped; request_duration, which counts denied calls too, minus this is about what the proxy adds",
            Unit::Seconds,
            upstream_latency.clone(),
        );
        let would_deny = Family::<RpcLabels, Counter>::default();
        registry.register("would_deny", "Denials not enforced because of audit-only bindings", would_deny.clone());
        let audit_denials_summarised = Counter::default();
        registry.register(
            "audit_denials_summarised",
            "Denials counted in summary audit records rather than recorded each (audit.denial_records)",
            audit_denials_summarised.clone(),
        );
        let open_streams = Family::<RpcLabels, Gauge>::default();
        registry.register("open_streams", "Streams open now, by RPC", open_streams.clone());
        let open_watches = Gauge::default();
        registry.register("open_watches", "Watches open now", open_watches.clone());
        let shared_watches = Gauge::default();
        registry.register("shared_watches", "Upstream watches shared by client watches now", shared_watches.clone());
        let shared_watch_subscribers = Gauge::default();
        registry.register(
            "shared_watch_subscribers",
            "Client watches served by a shared upstream watch now",
            shared_watch_subscribers.clone(),
        );
        let shared_watch_detaches = Counter::default();
        registry.register(
            "shared_watch_detaches",
            "Client watches moved from a shared upstream watch to one of their own",
            shared_watch_detaches.clone(),
        );
        let shared_watch_revision_waits = Counter::default();
        registry.register(
            "shared_watch_revision_waits",
            "Creates from now that waited for a lookup of etcd's current revision (several share one)",
            shared_watch_revision_waits.clone(),
        );
        let connections = Gauge::default();
        registry.register("client_connections", "Client connections open now", connections.clone());
        let connections_refused = Family::<LimitLabels, Counter>::default();
        registry.register(
            "client_connections_refused",
            "Client connections closed at once, by limit: max_connections (open connections, handshakes included), \
             max_handshakes_per_address (handshakes in progress from one address)",
            connections_refused.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by reason",
            handshake_failures.clone(),
        );
        let connections_untrusted = Counter::default();
        registry.register(
            "connections_untrusted",
            "Open client connections closed because a reloaded client CA bundle or CRL no longer trusts their \
             certificate",
            connections_untrusted.clone(),
        );
        let certificate_expiry = Family::<CertificateLabels, Gauge>::default();
        registry.register(
            "certificate_expiration_timestamp_seconds",
            "When the certificate files in force expire (the earliest notAfter in each file), Unix seconds; \
             certificate: listener, client_ca, upstream_client, upstream_ca",
            certificate_expiry.clone(),
        );
        let crl_next_update = Gauge::default();
        registry.register(
            "crl_next_update_timestamp_seconds",
            "The earliest nextUpdate of the CRLs in force (tls.crl_files), Unix seconds; once it passes, new \
             handshakes are refused until a fresh CRL is loaded",
            crl_next_update.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register("reloads", "Reloads of policy and certificates, by result", reloads.clone());
        let reload_in_progress = Gauge::default();
        registry.register(
            "reload_in_progress",
            "1 while a reload reads and checks its files (normally for at most a few seconds); later SIGHUPs and \
             file changes wait for it, so a value that stays 1 means new policies and certificates are not applied",
            reload_in_progress.clone(),
        );
        let limited = Family::<LimitLabels, Counter>::default();
        registry.register("limited", "Requests refused with ResourceExhausted, by limit", limited.clone());
        let lease_lookups = Counter::default();
        registry.register(
            "lease_key_lookups",
            "Lookups of a lease's keys at etcd made to check a lease request (not needed for identities that may \
             write every key)",
            lease_lookups.clone(),
        );
        let lease_lookup_waits = Counter::default();
        registry.register(
            "lease_key_lookup_waits",
            "Requests that waited for a lookup of a lease's keys; the requests that wait for one lease at once share \
             lookups, so this exceeds lease_key_lookups under load",
            lease_lookup_waits.clone(),
        );
        let upstream_healthy = Family::<EndpointLabels, Gauge>::default();
        registry.register("upstream_endpoint_healthy", "1 if the etcd endpoint is healthy", upstream_healthy.clone());
        let upstream_retried = Counter::default();
        registry.register(
            "upstream_calls_retried",
            "Attempts made again because etcd did not process a call (stream refused, connection going away or not made)",
            upstream_retried.clone(),
        );
        let audit_queue = Gauge::default();
        registry.register("audit_queue_depth", "Audit records waiting for the writer", audit_queue.clone());
        let audit_written = Counter::default();
        registry.register("audit_records_written", "Audit records written", audit_written.clone());
        let audit_last_seq = Gauge::default();
        registry.register(
            "audit_last_seq",
            "The seq of the last audit record written: a restart goes on from it, so a drop means the log was cut \
             back or replaced",
            audit_last_seq.clone(),
        );
        let audit_errors = Counter::default();
        registry.register("audit_write_errors", "Failed attempts to write audit records", audit_errors.clone());
        let audit_lost = Counter::default();
        registry.register(
            "audit_records_lost",
            "Audit records that could not be queued or written",
            audit_lost.clone(),
        );
        Metrics {
            registry: root,
            requests,
            latency,
            upstream_latency,
            would_deny,
            audit_denials_summarised,
            open_streams,
            connections,
            connections_refused,
            open_watches,
            shared_watches,
            shared_watch_subscribers,
            shared_watch_detaches,
            shared_watch_revision_waits,
            handshake_failures,
            connections_untrusted,
            certificate_expiry,
            crl_next_update,
            reloads,
            reload_in_progress,
            limited,
            lease_lookups,
            lease_lookup_waits,
            upstream_healthy,
            upstream_retried,
            audit_queue,
            audit_written,
            audit_last_seq,
            audit_errors,
            audit_lost,
        }
    }

    /// The listener's: its certificates' expiry and the CRLs' next update.
    pub fn listener(&self, tls: &crate::tls::ServerTls) {
        self.certificates(&tls.expiries);
        if let Some(next) = tls.crl_next_update {
            self.crl_next_update.set(next);
        }
    }

    /// Put the expiry of certificate files now in force in the metrics, and warn of those that expire soon.
    pub fn certificates(&self, expiries: &[crate::tls::Expiry]) {
        for e in expiries {
            self.certificate_expiry.get_or_create(&CertificateLabels { certificate: e.certificate }).set(e.not_after);
            if let Some(warning) = e.warning_now() {
                warn!(certificate = e.certificate, file = %e.path.display(), "{warning}");
            }
        }
    }

    /// The text exposition, with gauges that mirror other state refreshed first.
    pub fn render(&self, upstream: &Upstream, audit: &AuditLog) -> String {
        for (endpoint, healthy) in upstream.health() {
            self.upstream_healthy.get_or_create(&EndpointLabels { endpoint }).set(i64::from(healthy));
        }
        // Counters only go up: add what they are behind by.
        let sync = |c: &Counter, v: u64| {
            let have = c.get();
            if v > have {
                c.inc_by(v - have);
            }
        };
        sync(&self.upstream_retried, upstream.retried());
        if let Some(stats) = audit.stats() {
            self.audit_queue.set(stats.queued.load(Ordering::Relaxed) as i64);
            sync(&self.audit_written, stats.written.load(Ordering::Relaxed));
            self.audit_last_seq.set(i64::try_from(stats.last_seq.load(Ordering::Relaxed)).unwrap_or(i64::MAX));
            sync(&self.audit_errors, stats.write_errors.load(Ordering::Relaxed));
            sync(&self.audit_lost, stats.lost.load(Ordering::Relaxed));
        }
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The standard process metrics of the Prometheus client libraries (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, …), read from `/proc/self` at each scrape. With `etcd_guard_requests_total`
/// they give the proxy's CPU per request in production:
/// `rate(process_cpu_seconds_total[5m]) / sum(rate(etcd_guard_requests_total[5m]))`.
#[derive(Debug)]
struct ProcessCollector {
    /// When the proxy started (when its metrics were made, at start-up), seconds since the Unix epoch.
    start_time: f64,
}

// === impl ProcessCollector ===

impl ProcessCollector {
    fn new() -> ProcessCollector {
        let start_time = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        ProcessCollector { start_time }
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, unit: Option<&Unit>, v: f64) -> std::fmt::Result {
            let g = ConstGauge::new(v);
            g.encode(e.encode_descriptor(name, help, unit, g.metric_type())?)
        }
        // What cannot be read is left out of the scrape rather than shown as 0.
        if let Ok(s) = procfs::sample("self") {
            let cpu = ConstCounter::new(s.cpu_ticks as f64 / procfs::USER_HZ as f64);
            let help = "Total user and system CPU time spent in seconds.";
            cpu.encode(encoder.encode_descriptor("process_cpu", help, Some(&Unit::Seconds), cpu.metric_type())?)?;
            let resident = (s.rss_kib * 1024) as f64;
            gauge(
                &mut encoder,
                "process_resident_memory",
                "Resident memory size in bytes.",
                Some(&Unit::Bytes),
                resident,
            )?;
            let virt = (s.vm_kib * 1024) as f64;
            gauge(&mut encoder, "process_virtual_memory", "Virtual memory size in bytes.", Some(&Unit::Bytes), virt)?;
        }
        if let Ok(n) = procfs::open_fds() {
            gauge(&mut encoder, "process_open_fds", "Number of open file descriptors.", None, n as f64)?;
        }
        if let Ok(Some(n)) = procfs::max_fds() {
            gauge(&mut encoder, "process_max_fds", "Maximum number of open file descriptors.", None, n as f64)?;
        }
        let help = "Start time of the process since unix epoch in seconds.";
        gauge(&mut encoder, "process_start_time", help, Some(&Unit::Seconds), self.start_time)
    }
}

/// What the health listener reads.
#[derive(Clone)]
pub struct HealthState {
    pub metrics: Arc<Metrics>,
    pub upstream: Upstream,
    pub audit: AuditLog,
}

/// Serve `/healthz`, `/readyz` and `/metrics` over plain HTTP/1.1 until `stop` turns true.
pub async fn serve(listener: TcpListener, state: HealthState, mut stop: watch::Receiver<bool>) {
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "metrics listener: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&state, &req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await {
                debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn answer(state: &HealthState, req: &http::Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => {
            let mut problems = Vec::new();
            if !state.upstream.probed() {
                // Endpoints count as healthy until probed; ready only once etcd has answered (or been found down).
                problems.push("the upstream endpoints have not been checked yet");
            } else if !state.upstream.any_healthy() {
                problems.push("no healthy upstream endpoint");
            }
            if state.audit.is_failing() {
                problems.push("the audit log cannot be written");
            }
            if problems.is_empty() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {}\n", problems.join("; ")))
            }
        }
        "/metrics" => {
            let body = state.metrics.render(&state.upstream, &state.audit);
            let mut resp = text(StatusCode::OK, body);
            if let Ok(v) = "application/openmetrics-text; version=1.0.0; charset=utf-8".parse() {
                resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
            }
            resp
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

/// The address the metrics listener is bound to, for logs and tests.
pub fn bound(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

/// Counts one of something in a gauge while it lives (an open watch, a client connection): counted off however
/// it ends.
pub struct Counted(Gauge);

impl Counted {
    pub fn new(gauge: &Gauge) -> Counted {
        gauge.inc();
        Counted(gauge.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_count_into_the_shared_families() {
        let metrics = Metrics::new();
        let (a, b) = (RequestHandles::default(), RequestHandles::default());
        let ok = RequestLabels { rpc: "KV/Range", decision: "allow", code: "OK" };
        let denied = RequestLabels { rpc: "KV/Put", decision: "deny", code: "PermissionDenied" };
        for _ in 0..3 {
            a.observe(&metrics, ok.clone(), 0.001);
        }
        b.observe(&metrics, ok.clone(), 0.001);
        b.observe(&metrics, denied.clone(), 0.001);
        assert_eq!(metrics.requests.get_or_create(&ok).get(), 4);
        assert_eq!(metrics.requests.get_or_create(&denied).get(), 1);
        let mut text = String::new();
        let _ = encode(&mut text, &metrics.registry);
        assert!(text.contains("etcd_guard_request_duration_seconds_count{rpc=\"KV/Range\"} 4"), "{text}");
        assert!(text.contains("etcd_guard_request_duration_seconds_count{rpc=\"KV/Put\"} 1"), "{text}");
    }

    #[test]
    fn process_metrics_are_standard_and_unprefixed() {
        let metrics = Metrics::new();
        let mut text = String::new();
        let _ = encode(&mut text, &metrics.registry);
        let value = |name: &str| -> Option<f64> {
            text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        };
        // Some CPU time has been spent by now (parsing the counters at least), though it may round to 0 ticks.
        assert!(value("process_cpu_seconds_total").is_some_and(|v| v >= 0.0), "{text}");
        assert!(text.contains("# TYPE process_cpu_seconds counter"), "{text}");
        let resident = value("process_resident_memory_bytes").unwrap_or(0.0);
        assert!(resident > 1e6, "{text}");
        assert!(value("process_virtual_memory_bytes").unwrap_or(0.0) >= resident, "{text}");
        assert!(value("process_open_fds").is_some_and(|v| v > 0.0), "{text}");
        assert!(value("process_start_time_seconds").is_some_and(|v| v > 1.7e9), "{text}");
        // The proxy's own metrics keep their prefix.
        assert!(text.contains("\netcd_guard_open_watches 0\n"), "{text}");
        assert!(!text.contains("etcd_guard_process"), "{text}");
    }

    #[test]
    fn handles_beyond_the_cap_still_count() {
        let metrics = Metrics::new();
        let handles = RequestHandles::default();
        const CODES: [&str; 40] = [
            "c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9", "c10", "c11", "c12", "c13", "c14", "c15",
            "c16", "c17", "c18", "c19", "c20", "c21", "c22", "c23", "c24", "c25", "c26", "c27", "c28", "c29", "c30",
            "c31", "c32", "c33", "c34", "c35", "c36", "c37", "c38", "c39",
        ];
        for _ in 0..2 {
            for code in CODES {
                handles.observe(&metrics, RequestLabels { rpc: "KV/Range", decision: "allow", code }, 0.0);
            }
        }
        for code in CODES {
            assert_eq!(
                metrics.requests.get_or_create(&RequestLabels { rpc: "KV/Range", decision: "allow", code }).get(),
                2
            );
        }
    }
}
