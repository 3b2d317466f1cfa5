//! HTTP/2 on both legs, on the `h2` crate directly.
//!
//! hyper's server spawns a task per request and its client hands every request to the connection through a
//! queue; for a proxy that forwards small unary calls that means several task wake-ups (often across threads) and
//! one socket write per response. Here a client connection is one task that accepts its streams and drives every
//! call on it ([`server`]), and a call towards etcd is put on the upstream connection directly ([`client`]). The
//! responses that etcd returns together are then answered together: one wake-up, one write.
//!
//! [`RecvBody`] and [`send_body`] join h2's streams to `http_body` bodies (a client's request stream is decoded by
//! tonic's `Streaming`; streamed answers are `codec::StreamBody`).

pub mod client;
pub mod cork;
pub mod server;

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use http_body::{Body, Frame};

/// A received HTTP/2 stream as an `http_body` body. Flow-control capacity is given back as data is taken.
pub struct RecvBody {
    stream: RecvStream,
    data_done: bool,
    /// Held while the request is still arriving (a request of one message; see [`server`]); let go when its data
    /// has ended, or with the body.
    receiving: Option<Receiving>,
    /// An answer from etcd: its call counted as open on its connection until the body is dropped.
    _open: Option<client::Open>,
}

/// One request of a connection whose message has not fully arrived yet; counted in the connection's total until
/// dropped.
pub struct Receiving(Arc<AtomicUsize>);

// === impl RecvBody ===

impl RecvBody {
    pub fn new(stream: RecvStream) -> RecvBody {
        RecvBody { stream, data_done: false, receiving: None, _open: None }
    }

    /// The body of etcd's answer to a call counted as `open` on its connection, until the body is dropped.
    pub fn open_on(self, open: client::Open) -> RecvBody {
        RecvBody { _open: Some(open), ..self }
    }

    /// A request counted as being received until its data has ended.
    pub fn receiving(stream: RecvStream, receiving: Receiving) -> RecvBody {
        RecvBody { stream, data_done: false, receiving: Some(receiving), _open: None }
    }
}

// === impl Receiving ===

impl Receiving {
    /// Count one more request in `count`, unless it already holds `max`.
    pub fn try_new(count: &Arc<AtomicUsize>, max: usize) -> Option<Receiving> {
        count.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Receiving(count.clone()))
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            let polled = ready!(self.stream.poll_data(cx));
            if !matches!(polled, Some(Ok(_))) {
                // The data has ended (or failed): nothing more of it is held.
                self.receiving = None;
            }
            match polled {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM(NO_ERROR) ends a body early without failing it (RFC 9113, section 8.1).
                Some(Err(e)) if e.reason() == Some(h2::Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) if e.reason() == Some(h2::Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// A handler's response to one request.
pub enum Reply<B> {
    /// A body that is already in memory, with its trailers: sent at once. (A unary gRPC answer: one message, then
    /// `grpc-status`.)
    Whole(http::Response<Bytes>, http::HeaderMap),
    /// A body sent frame by frame, each frame only once the peer's flow-control window has room for it.
    Streamed(http::Response<B>),
}

impl<B> From<http::Response<B>> for Reply<B> {
    fn from(response: http::Response<B>) -> Reply<B> {
        Reply::Streamed(response)
    }
}

/// How long a body being sent waits for a peer that takes none of it.
pub trait Patience {
    /// How long one piece of the body may wait for room in the peer's flow-control window before the stream is
    /// reset with `ENHANCE_YOUR_CALM` (the peer sees `ResourceExhausted`). `None`: as long as it takes.
    fn patience(&self) -> Option<Duration> {
        None
    }

    /// Told once, as the stream is reset for running out of patience (before the body is dropped).
    fn ran_out(&mut self) {}
}

/// How long a streamed answer waits for a client that reads none of it (`limits.unread_stream_timeout_ms`), and
/// whether it ran out: shared by the body that is sent and whoever records how the stream ended.
#[derive(Clone, Debug)]
pub struct UnreadLimit {
    after: Duration,
    ran_out: Arc<AtomicBool>,
}

// === impl UnreadLimit ===

impl UnreadLimit {
    pub fn new(after: Duration) -> UnreadLimit {
        UnreadLimit { after, ran_out: Arc::new(AtomicBool::new(false)) }
    }

    pub fn after(&self) -> Duration {
        self.after
    }

    /// Whether the stream was reset because its client read none of it for [`UnreadLimit::after`].
    pub fn ran_out(&self) -> bool {
        self.ran_out.load(Ordering::Relaxed)
    }

    pub fn mark_ran_out(&self) {
        self.ran_out.store(true, Ordering::Relaxed);
    }
}

/// How many bytes of a frame are handed to h2 at once: a large frame (a watch answer with a long history) leaves
/// piece by piece, each once the peer's window has room, so a peer's progress is seen during it.
const PIECE_BYTES: usize = 64 * 1024;

/// Why sending a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the peer reset the stream ({0:?})")]
    Reset(h2::Reason),
    #[error("the peer took none of the stream's data for {0:?}: stream reset")]
    Unread(Duration),
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("the body failed: {0}")]
    Body(String),
}

/// Send `body` on `stream` frame by frame, waiting for flow-control capacity before handing h2 each piece of a
/// frame (so a slow reader holds back a large body instead of having it buffered here), until the body ends or the
/// peer resets the stream. A body that fails resets the stream; so does a peer that takes none of a piece for the
/// body's [`Patience`].
pub async fn send_body<B>(mut body: B, stream: &mut SendStream<Bytes>) -> Result<(), SendError>
where
    B: Body<Data = Bytes> + Patience + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        // The body first: the reset is only looked at (a lock of the connection's state) while the body waits.
        let frame = poll_fn(|cx| {
            if let Poll::Ready(frame) = Pin::new(&mut body).poll_frame(cx) {
                return Poll::Ready(Ok(frame));
            }
            stream.poll_reset(cx).map(|reset| Err(reset.map_or_else(SendError::H2, SendError::Reset)))
        })
        .await?;
        let frame = match frame {
            None => {
                stream.send_data(Bytes::new(), true)?;
                return Ok(());
            }
            Some(Err(e)) => {
                stream.send_reset(h2::Reason::INTERNAL_ERROR);
                return Err(SendError::Body(e.to_string()));
            }
            Some(Ok(frame)) => frame,
        };
        let frame = match frame.into_data() {
            Ok(mut buf) => {
                let eos = body.is_end_stream();
                let mut data = buf.copy_to_bytes(buf.remaining());
                if data.is_empty() {
                    stream.send_data(Bytes::new(), eos)?;
                }
                while !data.is_empty() {
                    let piece = data.split_to(data.len().min(PIECE_BYTES));
                    wait_for_capacity(stream, &mut body).await?;
                    stream.send_data(piece, eos && data.is_empty())?;
                }
                if eos {
                    return Ok(());
                }
                continue;
            }
            Err(frame) => frame,
        };
        if let Ok(trailers) = frame.into_trailers() {
            stream.reserve_capacity(0);
            stream.send_trailers(trailers)?;
            return Ok(());
        }
    }
}

/// Wait until the stream may send at least one byte (h2 buffers the rest of a piece until the window opens), for
/// at most the body's [`Patience`]: then the stream is reset.
async fn wait_for_capacity<B: Patience>(stream: &mut SendStream<Bytes>, body: &mut B) -> Result<(), SendError> {
    stream.reserve_capacity(1);
    if stream.capacity() > 0 {
        return Ok(());
    }
    let wait = async {
        while stream.capacity() == 0 {
            match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Err(SendError::Reset(h2::Reason::CANCEL)),
            }
        }
        Ok(())
    };
    let Some(limit) = body.patience() else { return wait.await };
    match tokio::time::timeout(limit, wait).await {
        Ok(waited) => waited,
        Err(_) => {
            body.ran_out();
            stream.send_reset(h2::Reason::ENHANCE_YOUR_CALM);
            Err(SendError::Unread(limit))
        }
    }
}
