//! The HTTP/2 connection to one etcd endpoint, with the proxy's own client certificate.
//!
//! A call is put on the connection directly (h2's `SendRequest`), without a queue or task in between. The
//! connection is made at the first call, and again at the next call after it broke; after an attempt that failed,
//! the next one waits a little (see `Backoff`), and calls meanwhile fail at once.
//!
//! A connection is pinged (to find a dead etcd) only while a call is open on it, as etcd's own clients do
//! (grpc-go's `PermitWithoutStream: false`): where grpc-go's own server serves etcd's client port (a port for gRPC
//! only, as with etcd 3.5's `--listen-client-http-urls` elsewhere, or a plaintext one), etcd counts a PING on a
//! connection without streams as a strike and, after three, closes the connection with `GOAWAY`
//! `too_many_pings` (seen with 3.5.16: two minutes after the last stream; a TLS port that also serves HTTP, Go's
//! HTTP/2 server, does not count). A client connection's own upstream connection for streams outlives its
//! streams, so it is often idle. On such a port etcd also closes a connection pinged more often than its
//! `--grpc-keepalive-min-time` with that `GOAWAY`; the endpoint's later connections then ping half as often
//! ([`Connector::ping_slowdowns`]), as grpc-go's clients do.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason};
use http::Uri;
use http::uri::{Authority, Scheme};
use http_body::Body;
use rustls_pki_types::ServerName;
use tokio::net::{TcpStream, UnixStream};
use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use super::{Patience, RecvBody, cork, send_body};

/// The connection under TLS: TCP, or a unix socket to an etcd on the same host.
type Transport = tokio_util::either::Either<TcpStream, UnixStream>;

type TlsStream = tokio_rustls::client::TlsStream<Transport>;

/// The connection's I/O: writes gathered while its task runs (`cork`).
type Io = cork::Corked<TlsStream>;

/// What a handshake gives: the handle for calls, the connection to drive, and the handle that writes its output.
type Handshake = (SendRequest<Bytes>, h2::client::Connection<Io, Bytes>, cork::Cork<TlsStream>);

/// Why a call could not be put on the connection, or its answer not read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot connect to {endpoint}: {message}")]
    Connect { endpoint: String, message: String },
    #[error("connecting to {endpoint} timed out")]
    ConnectTimeout { endpoint: String },
    /// The connection could not take the call (it broke, or etcd is closing it), or its message could not follow
    /// its headers: etcd got no call, or one without its message, which a gRPC server does not run.
    #[error(transparent)]
    NotSent(h2::Error),
    #[error(transparent)]
    H2(#[from] h2::Error),
}

// === impl Error ===

impl Error {
    /// Whether etcd did not process the call, for certain: it was not sent (no connection, or one that could not
    /// take it), or etcd refused its stream (`REFUSED_STREAM`) or went away without processing it (a `GOAWAY`
    /// whose last stream ID is below the call's). Such a call may be made again on another connection, whatever
    /// it does: etcd cannot apply it twice (RFC 9113 §8.7). A call that broke after etcd took it may have been
    /// applied, and is not.
    pub fn unprocessed(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectTimeout { .. } | Error::NotSent(_) => true,
            // h2 gives a stream a remote GOAWAY error only when the GOAWAY's last stream ID is below it; the calls
            // etcd had taken fail with the connection's own error when it closes.
            Error::H2(e) => e.is_remote() && (e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM)),
        }
    }

    /// Whether the endpoint failed (no connection, or one that broke), rather than turned a call away while
    /// working (`GOAWAY`, `REFUSED_STREAM`) or the call was refused by h2 itself (a stream closed under it).
    pub fn endpoint_failed(&self) -> bool {
        match self {
            Error::Connect { .. } | Error::ConnectTimeout { .. } => true,
            Error::NotSent(e) => e.is_io() || (e.is_go_away() && e.is_library()),
            Error::H2(e) => !(e.is_remote() && (e.is_go_away() || e.is_reset())),
        }
    }

    /// Whether no connection could be made (the attempt failed, or the endpoint is waiting before the next one).
    pub fn connect_failed(&self) -> bool {
        matches!(self, Error::Connect { .. } | Error::ConnectTimeout { .. })
    }

    /// Whether etcd refused this very call (`REFUSED_STREAM`, or a `GOAWAY` below it), rather than no call being
    /// made: gRPC clients make such a call again once only.
    pub fn refused(&self) -> bool {
        matches!(self, Error::H2(_)) && self.unprocessed()
    }
}

/// How to reach one endpoint.
#[derive(Clone)]
pub struct Connector {
    pub tls: TlsConnector,
    pub scheme: Scheme,
    /// The requests' `:authority`, and the TCP address connected to unless `socket` is set.
    pub authority: Authority,
    /// A unix socket to connect to instead of `authority` (an etcd on the same host: `unixs://` endpoints).
    pub socket: Option<PathBuf>,
    pub server_name: ServerName<'static>,
    pub connect_timeout: Duration,
    pub connection_window: u32,
    pub stream_window: u32,
    /// A PING every `keep_alive_interval` while a call is open; no answer within `keep_alive_timeout` drops the
    /// connection, and the next call makes a new one.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// How many times the interval of new connections' pings has been doubled because etcd closed a connection
    /// to the endpoint for pinging too often (`GOAWAY` `ENHANCE_YOUR_CALM`; see `Connector::slow_pings`), up to
    /// [`MAX_PING_SLOWDOWNS`], as grpc-go's clients do. Shared by the clones of a connector, so by every
    /// connection to the endpoint (workers', and client connections' own for streams).
    pub ping_slowdowns: Arc<AtomicU32>,
}

/// The keep-alive interval is doubled at most this many times (30 s becomes 32 min).
pub const MAX_PING_SLOWDOWNS: u32 = 6;

// === impl Connector ===

impl Connector {
    /// The interval of a new connection's keep-alive pings: `keep_alive_interval`, doubled for each time etcd
    /// asked for fewer pings.
    pub fn ping_interval(&self) -> Duration {
        self.ping_pace().1
    }

    /// The doublings in force for a new connection, and its ping interval with them.
    fn ping_pace(&self) -> (u32, Duration) {
        let slowdowns = self.ping_slowdowns.load(Ordering::Relaxed).min(MAX_PING_SLOWDOWNS);
        (slowdowns, self.keep_alive_interval.saturating_mul(1 << slowdowns))
    }

    /// etcd closed a connection that pinged with `slowdowns` doublings for pinging too often: later connections
    /// ping half as often as that one did. Several connections closed so at once (one per worker) double the
    /// interval once, as in grpc-go's clients.
    fn slow_pings(&self, slowdowns: u32) -> Duration {
        self.ping_slowdowns.fetch_max((slowdowns + 1).min(MAX_PING_SLOWDOWNS), Ordering::Relaxed);
        self.ping_interval()
    }

    /// The endpoint as messages name it: its address, or its socket's path.
    pub fn endpoint(&self) -> String {
        match &self.socket {
            Some(path) => path.display().to_string(),
            None => self.authority.to_string(),
        }
    }
}

/// One HTTP/2 connection to an endpoint, (re)made on demand. Cheap to share.
pub struct Connection {
    connector: Connector,
    current: Arc<Mutex<Option<Live>>>,
    /// Held while connecting.
    connecting: tokio::sync::Mutex<()>,
    /// Connection attempts that failed.
    failures: AtomicU64,
    /// When the next attempt may be made, after attempts that failed (shared with the connections' drivers: a
    /// connection etcd refused with a TLS alert before answering a call on it counts as a failed attempt).
    backoff: Arc<Mutex<Backoff>>,
    /// Connections made: each one's generation, so that an old connection that ends forgets only itself.
    generations: AtomicU64,
    /// Where the connection is made and driven (a worker's runtime); `None`: the caller's.
    runtime: Option<Handle>,
}

#[derive(Clone)]
struct Live {
    generation: u64,
    sender: SendRequest<Bytes>,
    /// Calls open on this connection (see [`Open`]), and whether etcd has answered one.
    state: Arc<LiveState>,
}

#[derive(Default, Debug)]
struct LiveState {
    open: AtomicUsize,
    answered: AtomicBool,
}

/// One call open on a connection (from before it is sent until its answer is read, or given up): counted while
/// held, so that the connection is pinged only while it carries a call.
#[derive(Debug)]
pub struct Open(Arc<LiveState>);

// === impl Connection ===

impl Connection {
    /// How connections to the endpoint are made.
    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    pub fn new(connector: Connector) -> Connection {
        Connection {
            connector,
            current: Arc::new(Mutex::new(None)),
            connecting: tokio::sync::Mutex::new(()),
            failures: AtomicU64::new(0),
            backoff: Arc::default(),
            generations: AtomicU64::new(0),
            runtime: None,
        }
    }

    /// A connection of its own to the same endpoint, made and driven on the runtime of its first call.
    pub fn fresh(&self) -> Connection {
        Connection::new(self.connector.clone())
    }

    /// A connection of its own to the same endpoint, made and driven on `runtime` (its socket belongs to that
    /// runtime, whoever makes the first call).
    pub fn on(&self, runtime: Handle) -> Connection {
        let mut c = Connection::new(self.connector.clone());
        c.runtime = Some(runtime);
        c
    }

    /// `https://host:port` and `path`, for the `:scheme`, `:authority` and `:path` of a call.
    pub fn uri(&self, path: &'static str) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.connector.scheme.clone());
        parts.authority = Some(self.connector.authority.clone());
        parts.path_and_query = Some(http::uri::PathAndQuery::from_static(path));
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// Send a request whose whole body is `body` (a unary call, or a server-streaming one); the answer's body is
    /// read by the caller, who holds the [`Open`] until it has (a long answer, an Observe or a Snapshot, keeps the
    /// connection pinged while it lasts).
    pub async fn send(
        &self,
        head: http::Request<()>,
        body: Bytes,
    ) -> Result<(http::Response<h2::RecvStream>, Open), Error> {
        let (mut sender, open) = self.ready().await?;
        let (response, mut stream) = sender.send_request(head, false).map_err(Error::NotSent)?;
        // A failure here leaves etcd a call without its message (a gRPC server does not run it).
        stream.send_data(body, true).map_err(Error::NotSent)?;
        let response = response.await?;
        self.answered(&open);
        Ok((response, open))
    }

    /// Send a request with a streaming body (fed by its own task while the answer is read).
    pub async fn send_streaming<B>(&self, req: http::Request<B>) -> Result<http::Response<RecvBody>, Error>
    where
        B: Body<Data = Bytes> + Patience + Unpin + Send + 'static,
        B::Error: std::fmt::Display + Send,
    {
        let (mut sender, open) = self.ready().await?;
        let (head, body) = req.into_parts();
        let end = body.is_end_stream();
        let (response, mut stream) =
            sender.send_request(http::Request::from_parts(head, ()), end).map_err(Error::NotSent)?;
        if !end {
            tokio::spawn(async move {
                if let Err(e) = send_body(body, &mut stream).await {
                    debug!(error = %e, "request body to etcd ended early");
                }
            });
        }
        let response = response.await?;
        self.answered(&open);
        Ok(response.map(|stream| RecvBody::new(stream).open_on(open)))
    }

    /// etcd answered a call on `open`'s connection: the first time, if it is the live connection (not an older
    /// one still finishing its calls), the attempts that made it succeeded.
    fn answered(&self, open: &Open) {
        if !open.0.answered.load(Ordering::Relaxed)
            && !open.0.answered.swap(true, Ordering::AcqRel)
            && self.live().is_some_and(|live| Arc::ptr_eq(&live.state, &open.0))
        {
            self.backoff().succeeded();
        }
    }

    /// A sender with room for one more stream, and the call counted as open on its connection; connecting first
    /// when there is no live connection, or when the live one can take no more calls (it broke, or etcd is closing
    /// it with a `GOAWAY`: its calls in progress finish there).
    async fn ready(&self) -> Result<(SendRequest<Bytes>, Open), Error> {
        let live = match self.live() {
            Some(live) => live,
            // Boxed: connecting (TCP, TLS, HTTP/2 handshakes) is rare, and its future is large.
            None => Box::pin(self.connect()).await?,
        };
        match live.sender.ready().await {
            Ok(sender) => Ok((sender, Open::on(&live.state))),
            Err(e) => {
                self.forget(live.generation);
                debug!(endpoint = %self.connector.endpoint(), error = %e, "upstream connection takes no more calls");
                let live = Box::pin(self.connect()).await?;
                match live.sender.ready().await {
                    Ok(sender) => Ok((sender, Open::on(&live.state))),
                    Err(e) => {
                        self.forget(live.generation);
                        Err(Error::NotSent(e))
                    }
                }
            }
        }
    }

    fn live(&self) -> Option<Live> {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn forget(&self, generation: u64) {
        forget(&self.current, generation);
    }

    async fn connect(&self) -> Result<Live, Error> {
        let c = &self.connector;
        let endpoint = || c.endpoint();
        // One connection attempt at a time. Callers that waited for it use its result: its connection, or its
        // failure (rather than each trying again in turn, which against an endpoint that does not answer would
        // make the last caller wait for every attempt's timeout).
        let failed_before = self.failures.load(Ordering::Acquire);
        let _one = self.connecting.lock().await;
        if let Some(live) = self.live() {
            return Ok(live);
        }
        if self.failures.load(Ordering::Acquire) != failed_before {
            return Err(Error::Connect { endpoint: endpoint(), message: "the connection attempt failed".into() });
        }
        if let Some(message) = self.backoff().waiting(Instant::now()) {
            return Err(Error::Connect { endpoint: endpoint(), message });
        }
        let attempt = match &self.runtime {
            Some(runtime) => runtime.spawn(handshake(c.clone())).await.unwrap_or_else(|e| {
                Err(Error::Connect { endpoint: endpoint(), message: format!("the connecting task failed: {e}") })
            }),
            None => Box::pin(handshake(c.clone())).await,
        };
        let (sender, connection, cork) = match attempt {
            Ok(handshake) => handshake,
            Err(e) => {
                self.backoff().failed(&e, Instant::now());
                self.failures.fetch_add(1, Ordering::AcqRel);
                return Err(e);
            }
        };
        Ok(self.install(sender, connection, cork))
    }

    fn backoff(&self) -> std::sync::MutexGuard<'_, Backoff> {
        self.backoff.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Make a new connection the live one, and drive it (with keep-alive pings) until it ends.
    fn install(
        &self,
        sender: SendRequest<Bytes>,
        connection: h2::client::Connection<Io, Bytes>,
        cork: cork::Cork<TlsStream>,
    ) -> Live {
        let c = &self.connector;
        // Never one an earlier connection had: its driver forgets its own generation when it ends, which must not
        // be this one (it would be dropped while in use, and its successor by this one's driver, and so on).
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        let live = Live { generation, sender, state: Arc::default() };
        {
            let mut slot = self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            *slot = Some(live.clone());
        }
        let current = self.current.clone();
        let ((slowdowns, interval), timeout) = (c.ping_pace(), c.keep_alive_timeout);
        let (endpoint, connector) = (c.endpoint(), c.clone());
        let (state, backoff) = (live.state.clone(), self.backoff.clone());
        let drive = cork::drive(cork, async move {
            let mut connection = connection;
            let pings = connection.ping_pong();
            let failed = tokio::select! {
                result = &mut connection => match result {
                    Err(e) => {
                        debug!(%endpoint, error = %e, "upstream connection ended");
                        if too_many_pings(&e) {
                            let next = connector.slow_pings(slowdowns);
                            warn!(
                                %endpoint, error = %e, pinged_every = ?interval, from_now_on = ?next,
                                "etcd closed the upstream connection with GOAWAY ENHANCE_YOUR_CALM, which it sends \
                                 for pings more frequent than its --grpc-keepalive-min-time allows (or for pings \
                                 while it has no call open on the connection): later connections ping less often \
                                 (the interval doubles, up to 64 times its start)"
                            );
                        }
                        tls_alert(&e).then(|| e.to_string())
                    }
                    Ok(()) => None,
                },
                () = keep_alive(pings, &state.open, interval, timeout) => {
                    debug!(%endpoint, "upstream connection did not answer a keep-alive ping; dropping it");
                    None
                }
            };
            // With TLS 1.3 the handshake ends on the proxy's side before etcd has checked the proxy's certificate:
            // etcd refusing it shows only now, as a TLS alert. A connection etcd refused so before answering
            // anything on it was no success: the next attempt waits as after a failed handshake, so that a refused
            // certificate is not met with a new handshake per call. (Other ends — GOAWAY, a closed socket, a
            // crash — make the next call connect again at once, as before.)
            if let Some(why) = failed.filter(|_| !state.answered.load(Ordering::Acquire)) {
                let why = format!("the connection ended before etcd answered a call on it: {why}");
                backoff.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).failed_with(why, Instant::now());
            }
            forget(&current, generation);
        });
        match &self.runtime {
            Some(runtime) => drop(runtime.spawn(drive)),
            None => drop(tokio::spawn(drive)),
        }
        live
    }
}

// === impl Open ===

impl Open {
    fn on(state: &Arc<LiveState>) -> Open {
        state.open.fetch_add(1, Ordering::Relaxed);
        Open(state.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for Connection {
    /// Nothing more goes on the live connection: it ends (HTTP/2 closes it) once its calls in progress have.
    fn drop(&mut self) {
        self.current.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).take();
    }
}

/// The wait between connection attempts to an endpoint that fails: after the first failure [`BACKOFF_FIRST`],
/// doubling with each failure in a row up to [`BACKOFF_MAX`], each less up to a fifth at random so that many
/// connections (workers, client connections' own for streams, other proxies) do not try again in step. Calls
/// meanwhile fail at once with the last attempt's error (and go to another endpoint if there is one), as a gRPC
/// client's do while its connection backs off: an etcd that restarts, or is overloaded and cannot finish
/// handshakes, is not met with a new TCP and TLS handshake for every call that arrives. etcd's first answer on a
/// new connection ends it (not the handshake: with TLS 1.3 etcd checks the proxy's certificate after it).
#[derive(Debug, Default)]
struct Backoff {
    /// Attempts that failed in a row.
    failed: u32,
    /// No attempt before this.
    until: Option<Instant>,
    /// The last attempt's error.
    error: String,
}

/// The first wait after a failed connection attempt.
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// The longest wait between connection attempts (etcd's restart, once it listens again, is noticed within it).
const BACKOFF_MAX: Duration = Duration::from_secs(1);

// === impl Backoff ===

impl Backoff {
    /// Why no attempt may be made at `now`, if so.
    fn waiting(&self, now: Instant) -> Option<String> {
        let left = self.until?.checked_duration_since(now).filter(|left| !left.is_zero())?;
        Some(format!("{} (next attempt in {} ms)", self.error, left.as_millis().max(1)))
    }

    fn failed(&mut self, e: &Error, now: Instant) {
        // Without the endpoint's address, which clients are not told.
        let error = match e {
            Error::Connect { message, .. } => message.clone(),
            Error::ConnectTimeout { .. } => "the connection attempt timed out".to_owned(),
            Error::NotSent(e) | Error::H2(e) => e.to_string(),
        };
        self.failed_with(error, now);
    }

    fn failed_with(&mut self, error: String, now: Instant) {
        self.failed = self.failed.saturating_add(1);
        let wait = BACKOFF_FIRST.saturating_mul(1 << self.failed.saturating_sub(1).min(16)).min(BACKOFF_MAX);
        // Less by up to a fifth, at random (a fresh SipHash key per call: enough to spread attempts, not a secret).
        use std::hash::{BuildHasher, Hasher};
        let random = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let wait = wait.saturating_sub(wait.mul_f64((random % 1000) as f64 / 5000.0));
        self.until = Some(now + wait);
        self.error = error;
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// A new connection attempt to `c`'s endpoint, apart from any [`Connection`], for a diagnosis (`config check
/// --connect`): the attempt's error as rustls and the system give it, whole — with, for a certificate not valid
/// for the endpoint's name, the names it is valid for (clients are not told those) — if it fails.
pub async fn attempt_error(c: Connector) -> Option<String> {
    handshake(c).await.err().map(|e| match e {
        Error::Connect { message, .. } => message,
        other => other.to_string(),
    })
}

/// TCP, TLS and HTTP/2 handshakes, within the connect timeout.
async fn handshake(c: Connector) -> Result<Handshake, Error> {
    let endpoint = || c.endpoint();
    tokio::time::timeout(c.connect_timeout, async {
        let transport = match &c.socket {
            Some(path) => UnixStream::connect(path).await.map(Transport::Right),
            None => TcpStream::connect(c.authority.as_str()).await.map(|tcp| {
                let _ = tcp.set_nodelay(true);
                Transport::Left(tcp)
            }),
        }
        .map_err(|e| Error::Connect { endpoint: endpoint(), message: e.to_string() })?;
        let tls = c
            .tls
            .connect(c.server_name.clone(), transport)
            .await
            .map_err(|e| Error::Connect { endpoint: endpoint(), message: e.to_string() })?;
        let (io, cork) = cork::cork(tls);
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(c.stream_window)
            .initial_connection_window_size(c.connection_window)
            .handshake::<_, Bytes>(io)
            .await?;
        Ok::<_, Error>((sender, connection, cork))
    })
    .await
    .map_err(|_| Error::ConnectTimeout { endpoint: endpoint() })?
}

fn forget(current: &Mutex<Option<Live>>, generation: u64) {
    let mut slot = current.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if slot.as_ref().is_some_and(|l| l.generation == generation) {
        *slot = None;
    }
}

/// Whether a connection ended with a TLS alert from etcd (after the handshake: it refused the proxy's certificate).
/// h2 keeps an I/O error's kind and text only (rustls' error is not its source any more): the text tells.
fn tls_alert(e: &h2::Error) -> bool {
    e.is_io() && tells_tls_alert(&e.to_string())
}

/// Whether an error's text is rustls' for a TLS alert received ("received fatal alert: BadCertificate").
pub fn tells_tls_alert(text: &str) -> bool {
    let alert = rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate).to_string();
    // What comes before the alert's name.
    let said = alert.split(':').next().unwrap_or("received fatal alert");
    text.contains(said)
}

/// Whether the connection ended because etcd found it pinged too often: grpc-go's server closes it with
/// `GOAWAY` `ENHANCE_YOUR_CALM` (debug data `too_many_pings`, which h2 only shows in its error's text); nothing
/// else the proxy does repeats on its own. h2 keeps the reason only if the connection then ends cleanly: with TLS
/// `close_notify`, as Go's `tls.Conn` closes it. A bare TCP end after the `GOAWAY` is an I/O error to h2, and the
/// interval stays.
fn too_many_pings(e: &h2::Error) -> bool {
    e.is_go_away() && e.is_remote() && e.reason() == Some(Reason::ENHANCE_YOUR_CALM)
}

/// Resolves when the peer failed to answer a PING within `timeout`; pings every `interval` while a call is `open`.
async fn keep_alive(pings: Option<PingPong>, open: &AtomicUsize, interval: Duration, timeout: Duration) {
    let Some(mut pings) = pings else { return std::future::pending().await };
    loop {
        tokio::time::sleep(interval).await;
        if open.load(Ordering::Relaxed) == 0 {
            continue;
        }
        match tokio::time::timeout(timeout, pings.ping(Ping::opaque())).await {
            Ok(Ok(_)) => {}
            // The connection itself failed; its own future reports that.
            Ok(Err(_)) => return std::future::pending().await,
            Err(_) => return,
        }
    }
}

/// For tests of the client against small endpoints of their own.
#[cfg(test)]
pub mod testing {
    use super::*;

    /// A connector to `authority` with `tls`, trusting `localhost`'s certificate name, with the defaults of a
    /// test (2 s to connect, 1 MiB windows, no pings within a test's time); change fields as needed.
    pub fn connector(tls: rustls::ClientConfig, authority: Authority) -> Result<Connector, Box<dyn std::error::Error>> {
        Ok(Connector {
            tls: TlsConnector::from(Arc::new(tls)),
            scheme: Scheme::HTTPS,
            authority,
            socket: None,
            server_name: ServerName::try_from("localhost")?,
            connect_timeout: Duration::from_secs(2),
            connection_window: 1 << 20,
            stream_window: 1 << 20,
            keep_alive_interval: Duration::from_secs(30),
            keep_alive_timeout: Duration::from_secs(10),
            ping_slowdowns: Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint that accepts TCP connections and never answers: every TLS handshake times out.
    async fn silent_endpoint() -> std::io::Result<(Authority, tokio::task::JoinHandle<usize>)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(Ok((tcp, _))) = tokio::time::timeout(Duration::from_millis(1500), listener.accept()).await {
                held.push(tcp);
            }
            held.len()
        });
        let authority = addr.to_string().parse().map_err(std::io::Error::other)?;
        Ok((authority, accepting))
    }

    #[tokio::test]
    async fn callers_waiting_for_a_failed_attempt_share_its_failure() -> Result<(), Box<dyn std::error::Error>> {
        let (authority, accepting) = silent_endpoint().await?;
        let tls = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = testing::connector(tls, authority)?;
        let connection =
            Arc::new(Connection::new(Connector { connect_timeout: Duration::from_millis(300), ..connector }));
        let calls = (0..5).map(|_| {
            let connection = connection.clone();
            async move {
                let head = http::Request::new(());
                connection.send(head, Bytes::new()).await.err().map(|e| e.to_string())
            }
        });
        let errors = futures_util::future::join_all(calls).await;
        assert!(errors.iter().all(Option::is_some), "{errors:?}");
        assert_eq!(accepting.await?, 1, "one connection attempt for all five callers");
        // The next call (after the failure and its wait, see the next tests) tries again.
        let head = http::Request::new(());
        assert!(connection.send(head, Bytes::new()).await.is_err());
        Ok(())
    }

    #[test]
    fn the_wait_after_failed_attempts_doubles_up_to_its_maximum_less_a_random_fifth() {
        let mut backoff = Backoff::default();
        let now = Instant::now();
        assert_eq!(backoff.waiting(now), None, "no failure, no wait");
        let e = Error::Connect { endpoint: "10.0.0.1:2379".into(), message: "Connection refused".into() };
        for full_ms in [100, 200, 400, 800, 1000, 1000, 1000] {
            backoff.failed(&e, now);
            let until = backoff.until.unwrap_or(now);
            let wait = until - now;
            let full = Duration::from_millis(full_ms);
            assert!(wait <= full && wait >= full.mul_f64(0.8), "{wait:?} after a wait of at most {full:?}");
            let told = backoff.waiting(now).unwrap_or_default();
            assert!(told.starts_with("Connection refused (next attempt in "), "{told}");
            assert_eq!(backoff.waiting(until), None, "the wait is over");
        }
        backoff.succeeded();
        assert_eq!(backoff.waiting(now), None);
        backoff.failed(&Error::ConnectTimeout { endpoint: "10.0.0.1:2379".into() }, now);
        assert!(backoff.until.is_some_and(|u| u - now <= BACKOFF_FIRST), "a success starts the waits over");
        let told = backoff.waiting(now).unwrap_or_default();
        assert!(told.starts_with("the connection attempt timed out") && !told.contains("10.0.0.1"), "{told}");
    }

    /// An endpoint that refuses the client's certificate after the handshake, as etcd does with TLS 1.3 (the
    /// client's side of the handshake ends first; the refusal comes as an alert): a connection refused so before
    /// any answer counts as a failed attempt, so the calls after it do not each make a new one.
    #[tokio::test]
    async fn a_connection_that_ends_before_any_answer_is_a_failed_attempt() -> Result<(), Box<dyn std::error::Error>> {
        let (acceptor, client) = crate::tls::testing::loopback_h2_with_client_auth()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let authority: Authority = listener.local_addr()?.to_string().parse()?;
        let (accepted, refused) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (counted, refusals) = (accepted.clone(), refused.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                // The client sends no certificate: the handshake fails here, with an alert to the client.
                if acceptor.accept(tcp).await.is_err() {
                    refusals.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let connection = Connection::new(testing::connector(client, authority)?);
        let call =
            || async { connection.send(http::Request::new(()), Bytes::new()).await.err().map(|e| e.to_string()) };
        let first = call().await.ok_or("answered")?;
        assert!(first.contains("alert"), "{first}");
        // The driver sees the end after the call does: once it has, calls wait.
        tokio::time::sleep(Duration::from_millis(20)).await;
        for _ in 0..20 {
            let e = call().await.ok_or("answered")?;
            assert!(e.contains("ended before etcd answered") && e.contains("alert"), "{e}");
            assert!(e.contains("next attempt in"), "{e}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "calls during the wait made no attempt");
        assert_eq!(refused.load(Ordering::SeqCst), 1, "the server refused the connection");
        Ok(())
    }

    /// A diagnosis of an endpoint whose certificate is not valid for the name connected to tells the names it is
    /// valid for (`config check --connect`; clients get a sentence without them).
    #[tokio::test]
    async fn an_attempt_error_names_what_the_certificate_is_valid_for() -> Result<(), Box<dyn std::error::Error>> {
        let (acceptor, client) = crate::tls::testing::loopback_h2()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let authority: Authority = listener.local_addr()?.to_string().parse()?;
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let _ = acceptor.accept(tcp).await;
            }
        });
        let connector = testing::connector(client, authority)?;
        assert_eq!(attempt_error(connector.clone()).await, None, "the certificate is valid for localhost");
        let other = Connector { server_name: ServerName::try_from("etcd-0.example")?, ..connector };
        let told = attempt_error(other).await.unwrap_or_default();
        assert!(
            told.contains("etcd-0.example") && told.contains("only valid for") && told.contains("localhost"),
            "{told}"
        );
        Ok(())
    }

    /// An endpoint whose TLS handshakes all fail: calls in between the attempts fail at once without one, and
    /// after the wait the next call makes one.
    #[tokio::test]
    async fn an_endpoint_that_fails_is_not_tried_again_before_its_wait_is_over()
    -> Result<(), Box<dyn std::error::Error>> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let authority: Authority = listener.local_addr()?.to_string().parse()?;
        let accepted = Arc::new(AtomicUsize::new(0));
        let counted = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                drop(tcp);
            }
        });
        let (_, client) = crate::tls::testing::loopback_h2()?;
        let connection = Connection::new(testing::connector(client, authority)?);
        let call =
            || async { connection.send(http::Request::new(()), Bytes::new()).await.err().map(|e| e.to_string()) };
        let first = call().await.ok_or("connected")?;
        assert!(!first.contains("next attempt"), "{first}");
        for _ in 0..20 {
            let e = call().await.ok_or("connected")?;
            assert!(e.contains("next attempt in"), "{e}");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "calls during the wait made no attempt");
        tokio::time::sleep(BACKOFF_FIRST).await;
        let again = call().await.ok_or("connected")?;
        assert!(!again.contains("next attempt"), "{again}");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "an attempt once the wait was over");
        Ok(())
    }

    /// Counts the PING frames (not their acknowledgements) in the HTTP/2 bytes a client sends, after its preface.
    struct PingCounter<S> {
        io: S,
        pings: Arc<AtomicUsize>,
        /// Bytes of the preface still to come, of the frame header read so far, and of the frame's payload left.
        preface_left: usize,
        head: Vec<u8>,
        payload_left: usize,
    }

    impl<S> PingCounter<S> {
        fn scan(&mut self, mut bytes: &[u8]) {
            while let Some((&first, rest)) = bytes.split_first() {
                if self.preface_left > 0 || self.payload_left > 0 {
                    let left = if self.preface_left > 0 { &mut self.preface_left } else { &mut self.payload_left };
                    let n = (*left).min(bytes.len());
                    *left -= n;
                    bytes = &bytes[n..];
                    continue;
                }
                self.head.push(first);
                bytes = rest;
                if let [l0, l1, l2, kind, flags, _, _, _, _] = self.head[..] {
                    self.payload_left = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                    if kind == 0x6 && flags & 0x1 == 0 {
                        self.pings.fetch_add(1, Ordering::SeqCst);
                    }
                    self.head.clear();
                }
            }
        }
    }

    impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for PingCounter<S> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            let before = buf.filled().len();
            let polled = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
            let new = buf.filled()[before..].to_vec();
            self.scan(&new);
            polled
        }
    }

    impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for PingCounter<S> {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A request without a body.
    struct NoBody;

    impl Patience for NoBody {}

    impl Body for NoBody {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            std::task::Poll::Ready(None)
        }

        fn is_end_stream(&self) -> bool {
            true
        }
    }

    /// etcd's gRPC server closes a connection pinged more often than its `--grpc-keepalive-min-time` allows with
    /// `GOAWAY` `ENHANCE_YOUR_CALM`: each such end doubles the ping interval of the endpoint's later connections
    /// (other ends do not), up to [`MAX_PING_SLOWDOWNS`] times.
    #[tokio::test]
    async fn a_connection_closed_for_pinging_too_often_halves_the_pings_of_later_ones()
    -> Result<(), Box<dyn std::error::Error>> {
        let (acceptor, client) = crate::tls::testing::loopback_h2()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let authority = listener.local_addr()?.to_string().parse()?;
        // Each connection answers one call, then ends as the list says: two ENHANCE_YOUR_CALM, then a GOAWAY
        // without an error (etcd shutting down), then a broken TCP connection.
        tokio::spawn(async move {
            for end in [Some(Reason::ENHANCE_YOUR_CALM), Some(Reason::ENHANCE_YOUR_CALM), Some(Reason::NO_ERROR), None]
            {
                let Ok((tcp, _)) = listener.accept().await else { return };
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let Ok(mut conn) = h2::server::handshake(tls).await else { return };
                if let Some(Ok((_, mut respond))) = conn.accept().await {
                    let _ = respond.send_response(http::Response::new(()), true);
                }
                // The answer is written while the connection is polled; then it ends.
                let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
                match end {
                    Some(Reason::NO_ERROR) => conn.graceful_shutdown(),
                    Some(reason) => conn.abrupt_shutdown(reason),
                    None => continue,
                }
                while let Some(Ok(_)) = conn.accept().await {}
            }
        });

        let connection = Connection::new(testing::connector(client, authority)?);
        let base = connection.connector().keep_alive_interval;
        let mut intervals = Vec::new();
        for call in 0..4 {
            let head = http::Request::builder().method("POST").uri(connection.uri("/unary")).body(())?;
            let answer = connection.send(head, Bytes::new()).await;
            drop(answer.map_err(|e| format!("call {call}: {e}"))?);
            // The connection's driver sees the end after the call was answered; the next call connects again.
            let deadline = Instant::now() + Duration::from_secs(5);
            while connection.live().is_some() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            intervals.push(connection.connector().ping_interval());
        }
        assert_eq!(intervals, [base * 2, base * 4, base * 4, base * 4]);

        // Connections that pinged at the same pace and were closed so at once double it once; at most
        // MAX_PING_SLOWDOWNS doublings.
        let connector = connection.connector();
        assert_eq!((connector.slow_pings(2), connector.slow_pings(2)), (base * 8, base * 8));
        assert_eq!(connector.slow_pings(1), base * 8, "a connection made before the last doubling");
        for slowdowns in 3..10 {
            connector.slow_pings(slowdowns);
        }
        assert_eq!(connector.ping_interval(), base * (1 << MAX_PING_SLOWDOWNS));
        Ok(())
    }

    /// etcd closes a connection it is pinged on without a stream open (three strikes, then `GOAWAY`
    /// `too_many_pings`), so pings are sent only while a call is open: a unary call that was answered leaves the
    /// connection unpinged, an answer still streaming has it pinged, and once that stream is dropped the pings stop.
    #[tokio::test]
    async fn a_connection_is_pinged_only_while_a_call_is_open() -> Result<(), Box<dyn std::error::Error>> {
        let (acceptor, client) = crate::tls::testing::loopback_h2()?;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let authority = listener.local_addr()?.to_string().parse()?;
        let pings = Arc::new(AtomicUsize::new(0));
        let counted = pings.clone();
        // Answers `/unary` at once; answers the head of any other call and keeps its stream open.
        tokio::spawn(async move {
            let Ok((tcp, _)) = listener.accept().await else { return };
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let io = PingCounter { io: tls, pings: counted, preface_left: 24, head: Vec::new(), payload_left: 0 };
            let Ok(mut conn) = h2::server::handshake(io).await else { return };
            let mut held = Vec::new();
            while let Some(Ok((request, mut respond))) = conn.accept().await {
                let unary = request.uri().path() == "/unary";
                if let Ok(stream) = respond.send_response(http::Response::new(()), unary) {
                    held.push(stream);
                }
            }
        });

        let connection = Connection::new(Connector {
            keep_alive_interval: Duration::from_millis(50),
            keep_alive_timeout: Duration::from_secs(2),
            ..testing::connector(client, authority)?
        });
        let request = |path| http::Request::builder().method("POST").uri(connection.uri(path));
        let answered = connection.send(request("/unary").body(())?, Bytes::new()).await?;
        drop(answered);
        // A ping sent while the call was open (on a loaded machine it can outlast the interval) arrives first.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let idle = pings.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(pings.load(Ordering::SeqCst), idle, "pinged while idle");

        let streaming = connection.send_streaming(request("/stream").body(NoBody)?).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let while_open = pings.load(Ordering::SeqCst) - idle;
        assert!(while_open >= 3, "{while_open} pings while a stream was open");

        drop(streaming);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after = pings.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(pings.load(Ordering::SeqCst), after, "pinged after the stream was dropped");

        // A server-streaming call (one message out, an answer that lasts: Observe, Snapshot) is open while its
        // answer is held, after its headers have come.
        let (answer, open) = connection.send(request("/stream").body(())?, Bytes::new()).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let while_answering = pings.load(Ordering::SeqCst) - after;
        assert!(while_answering >= 3, "{while_answering} pings while an answer was being read");
        drop((answer, open));
        Ok(())
    }
}
