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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};

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
}

/// One request of a connection whose message has not fully arrived yet; counted in the connection's total until
/// dropped.
pub struct Receiving(Arc<AtomicUsize>);

// === impl RecvBody ===

impl RecvBody {
    pub fn new(stream: RecvStream) -> RecvBody {
        RecvBody { stream, data_done: false, receiving: None }
    }

    /// A request counted as being received until its data has ended.
    pub fn receiving(stream: RecvStream, receiving: Receiving) -> RecvBody {
        RecvBody { stream, data_done: false, receiving: Some(receiving) }
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

/// Why sending a body stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("the peer reset the stream ({0:?})")]
    Reset(h2::Reason),
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("the body failed: {0}")]
    Body(String),
}

/// Send `body` on `stream` frame by frame, waiting for flow-control capacity before taking the next frame (so a
/// slow reader holds back a large body instead of having it buffered here), until the body ends or the peer
/// resets the stream. A body that fails resets the stream.
pub async fn send_body<B>(mut body: B, stream: &mut SendStream<Bytes>) -> Result<(), SendError>
where
    B: Body<Data = Bytes> + Unpin,
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
            Ok(mut data) => {
                let eos = body.is_end_stream();
                let data = data.copy_to_bytes(data.remaining());
                if !data.is_empty() {
                    wait_for_capacity(stream).await?;
                }
                stream.send_data(data, eos)?;
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

/// Wait until the stream may send at least one byte (h2 buffers the rest of a frame until the window opens).
async fn wait_for_capacity(stream: &mut SendStream<Bytes>) -> Result<(), SendError> {
    stream.reserve_capacity(1);
    while stream.capacity() == 0 {
        match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e.into()),
            None => return Err(SendError::Reset(h2::Reason::CANCEL)),
        }
    }
    Ok(())
}
