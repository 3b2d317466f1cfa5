//! The client-facing HTTP/2 connection: one task accepts the connection's streams and drives every call on it.
//!
//! No task is spawned per unary request: a call's future lives in the connection task, so when etcd's answers to
//! several calls arrive together they are all finished in one wake-up and leave in one write. Long-lived calls
//! (streams, chosen by [`Settings::own_task`]) get a task each: a connection carrying a thousand watch streams
//! then has their events decoded, checked and framed by every runtime thread, not by its one task.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use h2::server::SendResponse;
use h2::{Ping, PingPong};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::{Instant, Sleep};
use tracing::debug;

use super::{Patience, Receiving, RecvBody, Reply, cork, send_body};

/// How a client connection is run.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a client may take, after TLS, to start HTTP/2 (its preface and SETTINGS).
    pub handshake_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub connection_window: u32,
    pub stream_window: u32,
    /// A PING is sent this often; a peer that does not answer within `keep_alive_timeout` is dropped.
    pub keep_alive_interval: Duration,
    pub keep_alive_timeout: Duration,
    /// After `stop`: how long calls in flight may take before the connection is closed.
    pub shutdown_grace: Duration,
    /// Requests (by path) whose call runs in a task of its own; the others run in the connection's task. Either
    /// way a call ends when the connection does.
    pub own_task: fn(&str) -> bool,
    /// Requests (by path) that carry a stream of messages rather than one; the others count against
    /// [`MAX_RECEIVING`] until their message has arrived.
    pub message_stream: fn(&str) -> bool,
    /// Counts requests refused for [`MAX_RECEIVING`] (`REFUSED_STREAM`; no gRPC call, so no audit record).
    pub refused_receiving: Option<prometheus_client::metrics::counter::Counter>,
}

/// Requests of one message per connection whose message has not fully arrived yet; a further one is refused
/// (`REFUSED_STREAM`, which a client may retry) until one of them has arrived. A request is decided only once it
/// has arrived, so without this a client could hold up to `max_concurrent_streams` undecided calls, each several
/// KiB of the proxy's memory, with a few bytes of HEADERS each — even one the policy grants nothing. Clients send a
/// request's message right behind its headers, so this is never reached by one that is not stalling on purpose.
pub const MAX_RECEIVING: usize = 1024;

/// How long a connection closed by the proxy (`close`) may take to send its last frames.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Largest header block a client may send (etcd's requests carry a few short headers).
const MAX_HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Serve one connection until the client goes away, or `stop` turns true (then GOAWAY, and the calls in flight get
/// `shutdown_grace` to finish), or `close` resolves (then the calls in flight are dropped, their streams reset, and
/// the connection is closed after a GOAWAY). `handle` answers each request; its response body is sent with flow
/// control.
pub async fn serve<T, H, Fut, B, C>(
    io: T,
    handle: H,
    settings: Settings,
    mut stop: watch::Receiver<bool>,
    close: C,
) -> Result<(), h2::Error>
where
    C: Future<Output = ()>,
    T: AsyncRead + AsyncWrite + Unpin,
    H: Fn(http::Request<RecvBody>) -> Fut,
    Fut: Future<Output = Reply<B>> + Send + 'static,
    B: Body<Data = Bytes> + Patience + Unpin + Send + 'static,
    B::Error: std::fmt::Display + Send,
{
    // The connection's writes are gathered while this task runs, and leave before it waits (`cork`).
    let (io, cork) = cork::cork(io);
    cork::drive(cork, async move {
        let handshake = h2::server::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.connection_window)
            .max_concurrent_streams(settings.max_concurrent_streams)
            .max_header_list_size(MAX_HEADER_LIST_BYTES)
            .handshake::<_, Bytes>(io);
        // A client that completed TLS but does not start HTTP/2 is not held: not past the handshake timeout, not
        // past a shutdown.
        let mut conn = tokio::select! {
            conn = tokio::time::timeout(settings.handshake_timeout, handshake) => match conn {
                Ok(conn) => conn?,
                Err(_) => {
                    debug!("the client did not start HTTP/2 within the handshake timeout");
                    return Ok(());
                }
            },
            _ = stop.wait_for(|stopped| *stopped) => return Ok(()),
        };
        let mut keep_alive =
            KeepAlive::new(conn.ping_pong(), settings.keep_alive_interval, settings.keep_alive_timeout);
        // Boxed: FuturesUnordered keeps one slot of its future's size per connection (idle connections) and moves each
        // new call into an allocation of that size; a box is one pointer to move.
        let mut calls: FuturesUnordered<Pin<Box<dyn Future<Output = ()> + Send>>> = FuturesUnordered::new();
        // Dropped with the connection, which aborts what is still running.
        let mut streams = JoinSet::new();
        let mut grace: Option<Pin<Box<Sleep>>> = None;
        let mut close = std::pin::pin!(close);
        let receiving = Arc::new(AtomicUsize::new(0));
        loop {
            tokio::select! {
                // Calls first: every answer that is ready goes into the connection's buffer before it is written.
                biased;
                Some(()) = calls.next(), if !calls.is_empty() => {}
                Some(_) = streams.join_next(), if !streams.is_empty() => {}
                accepted = poll_fn(|cx| conn.poll_accept(cx)) => match accepted {
                    Some(Ok((req, mut respond))) => {
                        let path = req.uri().path();
                        let own_task = (settings.own_task)(path);
                        let req = if (settings.message_stream)(path) {
                            req.map(RecvBody::new)
                        } else {
                            let Some(counted) = Receiving::try_new(&receiving, MAX_RECEIVING) else {
                                debug!(receiving = MAX_RECEIVING, "too many requests still arriving; refusing one");
                                if let Some(refused) = &settings.refused_receiving {
                                    refused.inc();
                                }
                                respond.send_reset(h2::Reason::REFUSED_STREAM);
                                continue;
                            };
                            req.map(|body| RecvBody::receiving(body, counted))
                        };
                        let answer = call(Box::pin(handle(req)), respond);
                        if own_task {
                            streams.spawn(answer);
                        } else {
                            calls.push(Box::pin(answer));
                        }
                    }
                    Some(Err(e)) => return quiet(e),
                    None => return Ok(()),
                },
                () = poll_fn(|cx| keep_alive.poll_expired(cx)) => {
                    debug!("client did not answer a keep-alive ping; closing the connection");
                    return Ok(());
                }
                _ = stop.changed(), if grace.is_none() => {
                    conn.graceful_shutdown();
                    grace = Some(Box::pin(tokio::time::sleep(settings.shutdown_grace)));
                }
                () = async { if let Some(g) = grace.as_mut() { g.await } }, if grace.is_some() => return Ok(()),
                () = &mut close => {
                    calls.clear();
                    streams.abort_all();
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    // Long enough to send the resets and the GOAWAY.
                    let _ = tokio::time::timeout(CLOSE_FLUSH, poll_fn(|cx| conn.poll_closed(cx))).await;
                    return Ok(());
                }
            }
        }
    })
    .await
}

/// Answer one request: run the handler (dropped if the client resets the stream first), then send the response.
///
/// The handler's future comes boxed and is freed as soon as it has answered: its allocation (several KiB, the
/// largest route's size) is not held for as long as a watch stream lasts.
async fn call<Fut, B>(mut answer: Pin<Box<Fut>>, mut respond: SendResponse<Bytes>)
where
    Fut: Future<Output = Reply<B>>,
    B: Body<Data = Bytes> + Patience + Unpin,
    B::Error: std::fmt::Display,
{
    // The answer is polled first: the reset is only looked at (a lock of the connection's state) while it waits.
    let reply = poll_fn(|cx| {
        if let Poll::Ready(reply) = answer.as_mut().poll(cx) {
            return Poll::Ready(Ok(reply));
        }
        respond.poll_reset(cx).map(Err)
    })
    .await;
    drop(answer);
    let Ok(reply) = reply else { return };
    match reply {
        Reply::Whole(response, trailers) => send_whole(respond, response, trailers),
        Reply::Streamed(response) => send_streamed(respond, response).await,
    }
}

/// A response whose body is in memory: headers, the body as one DATA frame and the trailers, queued at once. h2
/// holds the frame until the client's window lets it go; no task waits for that.
fn send_whole(mut respond: SendResponse<Bytes>, response: http::Response<Bytes>, trailers: http::HeaderMap) {
    let (head, data) = response.into_parts();
    let sent = respond.send_response(http::Response::from_parts(head, ()), false).and_then(|mut stream| {
        if !data.is_empty() {
            stream.send_data(data, false)?;
        }
        stream.send_trailers(trailers)
    });
    if let Err(e) = sent {
        debug!(error = %e, "response not sent");
    }
}

/// A response whose body is sent frame by frame, as the client's window allows.
async fn send_streamed<B>(mut respond: SendResponse<Bytes>, response: http::Response<B>)
where
    B: Body<Data = Bytes> + Patience + Unpin,
    B::Error: std::fmt::Display,
{
    let (head, body) = response.into_parts();
    let end = body.is_end_stream();
    let mut stream = match respond.send_response(http::Response::from_parts(head, ()), end) {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "response not sent");
            return;
        }
    };
    if !end && let Err(e) = send_body(body, &mut stream).await {
        debug!(error = %e, "response body not sent");
    }
}

/// A connection that ended by the client going away is not an error worth reporting.
fn quiet(e: h2::Error) -> Result<(), h2::Error> {
    if e.is_io() || e.is_go_away() || e.reason() == Some(h2::Reason::NO_ERROR) { Ok(()) } else { Err(e) }
}

/// Pings the client every `interval`; expires when an answer takes longer than `timeout`.
struct KeepAlive {
    pings: Option<PingPong>,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

// === impl KeepAlive ===

impl KeepAlive {
    fn new(pings: Option<PingPong>, interval: Duration, timeout: Duration) -> KeepAlive {
        let timer = Box::pin(tokio::time::sleep(interval));
        KeepAlive { pings, interval, timeout, timer, waiting: false }
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(pings) = self.pings.as_mut() else { return Poll::Pending };
        loop {
            if self.waiting {
                match pings.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.timer.as_mut().reset(Instant::now() + self.interval);
                        continue;
                    }
                    Poll::Ready(Err(_)) => return Poll::Pending,
                    Poll::Pending => {}
                }
                ready!(self.timer.as_mut().poll(cx));
                return Poll::Ready(());
            }
            ready!(self.timer.as_mut().poll(cx));
            if pings.send_ping(Ping::opaque()).is_ok() {
                self.waiting = true;
                self.timer.as_mut().reset(Instant::now() + self.timeout);
            } else {
                self.timer.as_mut().reset(Instant::now() + self.interval);
            }
        }
    }
}
