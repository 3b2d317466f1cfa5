//! The listener: our own accept loop, so each connection's verified client certificate becomes an [`Identity`]
//! and its permissions are computed once, before any request is read. HTTP/2 only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::audit::{AuditError, AuditLog};
use crate::config::Config;
use crate::http2;
use crate::identity::Identity;
use crate::limits::Limiter;
use crate::metrics::{self, HealthState, LimitLabels, Metrics, ReasonLabels};
use crate::policy::{Policy, PolicyError};
use crate::reload::{ReloadHandle, Reloader};
use crate::service::{Conn, Guard, Shared};
use crate::tls::{self, ClientTrust, PeerTrust, TlsError};
use crate::upstream::Upstream;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Issuers(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// A proxy bound to its address, ready to serve.
pub struct Proxy {
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    health_check_interval: Duration,
    acceptor: Arc<RwLock<tls::Acceptor>>,
    trust: Arc<ClientTrust>,
    shared: Arc<Shared>,
    reloader: Reloader,
    shutdown_grace: Duration,
    handshake_timeout: Duration,
    max_concurrent_streams: u32,
    /// One permit per client connection open (`limits.max_connections`), held from the accept to the close.
    connection_slots: Arc<Semaphore>,
    /// Handshakes in progress per client address (`limits.max_handshakes_per_address`).
    handshakes: crate::limits::Handshakes,
    /// The worker runtimes connections are given to in turn; none: connections run on the caller's runtime.
    workers: Vec<Handle>,
}

/// A proxy serving in the background (used by tests and the demo).
pub struct Running {
    pub local_addr: SocketAddr,
    pub metrics_addr: Option<SocketAddr>,
    pub audit: AuditLog,
    pub reload: ReloadHandle,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

// === impl Proxy ===

impl Proxy {
    /// Load everything the configuration names and bind the listener. Every file problem is reported here.
    /// Connections are served on the caller's runtime.
    pub async fn bind(config: &Config) -> Result<Proxy, StartError> {
        Proxy::bind_with_workers(config, Vec::new()).await
    }

    /// The same, serving connections on `workers` ([`crate::runtime::Workers`]), each worker with upstream
    /// connections of its own. The listener, metrics, reloads and health probes stay on the caller's runtime.
    pub async fn bind_with_workers(config: &Config, workers: Vec<Handle>) -> Result<Proxy, StartError> {
        let policy = Policy::load_in_force(&config.policy_file)?;
        check_issuers(&policy, &config.tls).map_err(StartError::Issuers)?;
        for warning in config.warnings().into_iter().chain(policy.warnings()) {
            tracing::warn!("{warning}");
        }
        let server_tls = tls::server_config(&config.tls)?;
        for warning in server_tls.advertise_warnings(&config.tls.cert_file, &config.advertise_client_urls) {
            tracing::warn!("{warning}");
        }
        let upstream_tls = tls::upstream_connections(&config.upstream)?;
        let metrics_listener = match config.metrics_listen {
            Some(addr) => Some(TcpListener::bind(addr).await.map_err(|source| StartError::Bind { addr, source })?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind { addr: config.listen, source })?;
        // Last: its open record says a run began, which a start that fails before serving should not leave.
        let audit = AuditLog::open(&config.audit)?;
        let advertise_client_urls = if config.advertise_client_urls.is_empty() {
            let local = listener.local_addr().unwrap_or(config.listen);
            if local.ip().is_unspecified() {
                tracing::warn!(
                    listen = %local,
                    "MemberList will answer https://{local}, which clients cannot dial; set advertise_client_urls"
                );
            }
            vec![format!("https://{local}")]
        } else {
            config.advertise_client_urls.clone()
        };
        let shared = Arc::new(
            Shared::new(
                policy,
                Upstream::for_workers(upstream_tls.channels, workers.clone()),
                advertise_client_urls,
                config.limits.max_request_bytes,
                audit,
                Arc::new(Metrics::new()),
                Limiter::new(config.limits.max_concurrent_requests).recording_denials(config.audit.denial_records),
            )
            .coalescing_watches(config.watch.coalesce)
            .resetting_unread_streams_after(config.limits.unread_stream_timeout)
            .running_txns_of(config.limits.max_txn_ops),
        );
        shared.metrics.listener(&server_tls);
        shared.metrics.certificates(&upstream_tls.expiries);
        let trust = Arc::new(ClientTrust::new(&server_tls));
        let acceptor = Arc::new(RwLock::new(server_tls.acceptor));
        let reloader = Reloader::new(config.clone(), shared.clone(), acceptor.clone(), trust.clone());
        Ok(Proxy {
            listener,
            metrics_listener,
            health_check_interval: config.upstream.health_check_interval,
            acceptor,
            trust,
            shared,
            reloader,
            shutdown_grace: config.shutdown_grace,
            handshake_timeout: config.tls.handshake_timeout,
            max_concurrent_streams: config.limits.max_concurrent_streams,
            connection_slots: Arc::new(Semaphore::new(config.limits.max_connections as usize)),
            handshakes: crate::limits::Handshakes::new(config.limits.max_handshakes_per_address),
            workers,
        })
    }

    /// Triggers a reload (SIGHUP does this in the binary).
    pub fn reload_handle(&self) -> ReloadHandle {
        self.reloader.handle()
    }

    /// The audit log, to close it at shutdown.
    pub fn audit(&self) -> AuditLog {
        self.shared.audit.clone()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// The metrics listener's address, if it is on.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Serve until `stop` turns true, then shut down gracefully: stop accepting, end open streams with
    /// `Unavailable` (clients reconnect elsewhere), let unary calls in flight finish, and wait (at most
    /// `shutdown_grace`) for the connections to close. A second `stop` (sent again) ends the wait at once. The
    /// connections still open then are ended, and returns only once their tasks are gone, so the records of the
    /// calls they drop, and the summary records of denials still counted, are queued before the caller closes the
    /// audit log.
    pub async fn serve(self, mut stop: watch::Receiver<bool>) {
        let next_id = AtomicU64::new(1);
        let mut connections = tokio::task::JoinSet::new();
        if let Some(listener) = self.metrics_listener {
            let state = HealthState {
                metrics: self.shared.metrics.clone(),
                upstream: self.shared.upstream.clone(),
                audit: self.shared.audit.clone(),
            };
            tokio::spawn(metrics::serve(listener, state, stop.clone()));
        }
        tokio::spawn(probe_upstream(self.shared.upstream.clone(), self.health_check_interval, stop.clone()));
        tokio::spawn(self.reloader.run(stop.clone()));
        tokio::spawn(sweep_summaries(self.shared.clone(), stop.clone()));
        let mut warned_full: Option<Instant> = None;
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off briefly rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = stop.changed() => break,
            };
            // Over a limit: closed before any TLS work, so a flood costs an accept and a close each.
            let slots = match self.connection_slots.clone().try_acquire_owned() {
                Ok(slot) => self.handshakes.try_start(peer.ip()).map(|h| (slot, h)).ok_or("max_handshakes_per_address"),
                Err(_) => Err("max_connections"),
            };
            let (slot, handshaking) = match slots {
                Ok(slots) => slots,
                Err(limit) => {
                    drop(tcp);
                    self.shared.metrics.connections_refused.get_or_create(&LimitLabels { limit }).inc();
                    if warned_full.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                        warned_full = Some(Instant::now());
                        warn!(%peer, limit, "a connection limit (limits.{limit}) is reached; new connections over it are closed at once (logged at most every 10 s; see etcd_guard_client_connections_refused_total)");
                    }
                    continue;
                }
            };
            let id = next_id.fetch_add(1, Ordering::Relaxed);
            // In this order: a reload replaces the acceptor, then the trust of open connections.
            let trust = self.trust.watch();
            let acceptor = self.acceptor.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
            let shared = self.shared.clone();
            let settings = (self.handshake_timeout, self.max_concurrent_streams, self.shutdown_grace);
            let stop = stop.clone();
            match self.workers.get(id as usize % self.workers.len().max(1)) {
                None => drop(connections.spawn(async move {
                    let _slot = slot;
                    connection(tcp, peer, id, (acceptor, trust, handshaking), shared, settings, stop).await
                })),
                // The socket moves to the worker's own reactor.
                Some(worker) => match tcp.into_std() {
                    Ok(tcp) => {
                        let serve = async move {
                            let _slot = slot;
                            match TcpStream::from_std(tcp) {
                                Ok(tcp) => {
                                    connection(tcp, peer, id, (acceptor, trust, handshaking), shared, settings, stop)
                                        .await
                                }
                                Err(e) => warn!(conn = id, %peer, error = %e, "cannot hand the connection to a worker"),
                            }
                        };
                        connections.spawn_on(serve, worker);
                    }
                    Err(e) => warn!(conn = id, %peer, error = %e, "cannot hand the connection to a worker"),
                },
            }
            // Reap finished connections as we go.
            while connections.try_join_next().is_some() {}
        }
        drop(self.listener);
        info!(open = connections.len(), "listener closed; draining connections");
        self.shared.begin_shutdown();
        let drained = tokio::time::timeout(self.shutdown_grace + Duration::from_secs(1), async {
            // A dropped sender is no second stop.
            let mut stop_open = true;
            loop {
                tokio::select! {
                    joined = connections.join_next() => if joined.is_none() { return true },
                    changed = stop.changed(), if stop_open => match changed {
                        Ok(()) => return false,
                        Err(_) => stop_open = false,
                    },
                }
            }
        })
        .await;
        match drained {
            Ok(true) => return self.shared.write_summaries(Duration::ZERO),
            Ok(false) => warn!(open = connections.len(), "stopped again: ending the open connections now"),
            Err(_) => {
                warn!(open = connections.len(), "connections still open after the shutdown grace period; closing them")
            }
        }
        // Tasks on worker runtimes end at their next turn; wait for them (bounded), so that what they drop is
        // recorded before the audit log closes.
        connections.abort_all();
        let ended =
            tokio::time::timeout(Duration::from_secs(5), async { while connections.join_next().await.is_some() {} })
                .await;
        if ended.is_err() {
            warn!(open = connections.len(), "connections still not ended 5 s after they were aborted");
        }
        self.shared.write_summaries(Duration::ZERO);
    }

    /// Serve in the background.
    pub fn spawn(self) -> Running {
        let local_addr = self.local_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (stop, rx) = watch::channel(false);
        let audit = self.audit();
        let metrics_addr = self.metrics_addr();
        let reload = self.reload_handle();
        let task = tokio::spawn(self.serve(rx));
        Running { local_addr, metrics_addr, audit, reload, stop, task }
    }
}

// === impl Running ===

impl Running {
    /// Stop accepting connections, wait for the accept loop to end, and write every queued audit record.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        self.audit.close(Duration::from_secs(10)).await;
    }
}

/// Every few seconds, the summary records of denials counted since (`audit.denial_records`), so that they do not
/// wait for the identity's next recorded denial, which may never come.
async fn sweep_summaries(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(SUMMARY_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => shared.write_summaries(SUMMARY_INTERVAL),
            _ = stop.changed() => return,
        }
    }
}

/// How long denials wait at most (about) for their summary record.
const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// One client connection: handshake, identity, then HTTP/2 until the client goes away.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
    (acceptor, trust, handshaking): (tls::Acceptor, watch::Receiver<tls::Trust>, crate::limits::HandshakeSlot),
    shared: Arc<Shared>,
    (handshake_timeout, max_concurrent_streams, grace): (Duration, u32, Duration),
    stop: watch::Receiver<bool>,
) {
    let _ = tcp.set_nodelay(true);
    let stream = match tokio::time::timeout(handshake_timeout, acceptor.tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            info!(conn = id, %peer, error = %tls::refusal_text(&e), "TLS handshake refused");
            let reason = handshake_failure_reason(&e);
            shared.metrics.handshake_failures.get_or_create(&ReasonLabels { reason }).inc();
            return;
        }
        Err(_) => {
            info!(conn = id, %peer, "TLS handshake timed out");
            shared.metrics.handshake_failures.get_or_create(&ReasonLabels { reason: "timeout" }).inc();
            return;
        }
    };
    drop(handshaking);
    let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
    let mut trust = PeerTrust::new(chain, &acceptor, trust);
    let identity = match chain.first().map(|c| Identity::from_der(c.as_ref())) {
        Some(Ok(identity)) => Identity { issuers: trust.issuers().to_vec(), ..identity },
        Some(Err(e)) => {
            info!(conn = id, %peer, error = %e, "client certificate refused");
            shared.metrics.handshake_failures.get_or_create(&ReasonLabels { reason: "bad_identity" }).inc();
            return;
        }
        None => {
            // The verifier requires a certificate; this is defence in depth.
            info!(conn = id, %peer, "no client certificate");
            return;
        }
    };
    let conn = Conn::new(id, peer, identity, &shared);
    info!(
        conn = id,
        %peer,
        identity = conn.identity.display_name(),
        fingerprint = %conn.identity.fingerprint_sha256,
        roles = ?conn.view(&shared).permissions.roles,
        "client connected"
    );
    let metrics = shared.metrics.clone();
    // Counted off however the connection's task ends (also aborted at the end of a shutdown).
    let _counted = crate::metrics::Counted::new(&metrics.connections);
    let display_name = conn.identity.display_name().to_string();
    let guard = Guard::new(shared.clone(), conn);
    let settings = http2::server::Settings {
        handshake_timeout,
        max_concurrent_streams,
        // Fixed, large windows rather than small ones: h2 closes a connection (ENHANCE_YOUR_CALM,
        // "too_many_data_frames") when small DATA frames pile up beyond half the connection window, and gRPC
        // traffic (watch creates, keep-alives, small puts from many streams) is exactly that.
        connection_window: crate::tls::CONNECTION_WINDOW,
        stream_window: crate::tls::STREAM_WINDOW,
        // Find dead peers; clients' own pings (kube-apiserver every 30 s, clientv3 as set) are always answered.
        keep_alive_interval: Duration::from_secs(120),
        keep_alive_timeout: Duration::from_secs(20),
        // GOAWAY at shutdown: no new requests on this connection; the ones in flight finish (streams are ended by
        // the shutdown signal they watch).
        shutdown_grace: grace,
        own_task: crate::service::is_streaming,
        message_stream: crate::service::is_message_stream,
        refused_receiving: Some(metrics.limited.get_or_create(&LimitLabels { limit: "receiving" }).clone()),
    };
    let handle = |req| guard.clone().handle(req);
    // A reload whose client CA or CRLs no longer trust the certificate closes the connection.
    let untrusted = async {
        let reason = trust.untrusted().await;
        guard.conn.close_because(format!(
            "connection closed: client certificate no longer trusted after a reload ({reason})"
        ));
        warn!(conn = id, %peer, identity = display_name, error = %reason, "client certificate no longer trusted after a reload; connection closed");
        metrics.connections_untrusted.inc();
    };
    if let Err(e) = http2::server::serve(stream, handle, settings, stop, untrusted).await {
        debug!(conn = id, error = %e, "connection ended with an error");
    }
    debug!(conn = id, "client disconnected");
}

/// Refuse a policy whose `issuer:` selectors name no CA of `tls.issuers`: such a binding would match no certificate,
/// which is a mistake (e.g. the shipped policies, which bind kube-apiserver with `issuer: etcd`, without
/// `tls.issuers.etcd`), not a way to deny.
pub fn check_issuers(policy: &Policy, tls: &crate::config::ListenerTls) -> Result<(), String> {
    let names: Vec<&str> = tls.issuers.keys().map(String::as_str).collect();
    let unknown = policy.unknown_issuers(&names);
    if unknown.is_empty() {
        return Ok(());
    }
    let example = unknown.first().copied().unwrap_or("etcd");
    Err(format!(
        "{}: bindings require issuer {unknown:?}, which the configuration's tls.issuers does not name (it names \
         {names:?}); add it, e.g. `tls: {{ issuers: {{ {example}: /path/to/its-ca.crt }} }}` (its CAs must be in \
         tls.client_ca_file), or change the bindings",
        policy.origin()
    ))
}

/// A short, bounded label for a failed handshake.
fn handshake_failure_reason(e: &std::io::Error) -> &'static str {
    use rustls::CertificateError as C;
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match inner {
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        // rustls reports the `…Context` variants (with the times); the plain ones are matched too.
        Some(rustls::Error::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => "expired",
        Some(rustls::Error::InvalidCertificate(C::NotValidYet | C::NotValidYetContext { .. })) => "not_yet_valid",
        Some(rustls::Error::InvalidCertificate(C::Revoked)) => "revoked",
        Some(rustls::Error::InvalidCertificate(
            C::UnknownRevocationStatus | C::ExpiredRevocationList | C::ExpiredRevocationListContext { .. },
        )) => "revocation_unknown",
        Some(rustls::Error::InvalidCertificate(C::UnknownIssuer)) => "unknown_issuer",
        Some(rustls::Error::InvalidCertificate(C::Other(_))) => match tls::chain_error(e) {
            Some(tls::ChainError::Identity(_)) => "bad_identity",
            _ => "bad_certificate",
        },
        Some(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
        Some(rustls::Error::NoApplicationProtocol) => "no_h2",
        Some(_) => "tls_error",
        None => "io_error",
    }
}

/// Probe the upstream endpoints until `stop`.
async fn probe_upstream(upstream: Upstream, every: Duration, mut stop: watch::Receiver<bool>) {
    loop {
        upstream.probe(every.min(Duration::from_secs(2))).await;
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}
