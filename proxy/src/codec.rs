//! gRPC framing for a checking proxy.
//!
//! Requests are *decoded* into their protobuf messages (so they can be checked) and the checked message is
//! *re-encoded* towards etcd — the client's original bytes are never forwarded. Responses travel as raw bytes:
//! nothing in them needs checking, so etcd's frames are passed through untouched (fields of newer etcd versions
//! survive, and no CPU is spent decoding or re-framing them).
//!
//! tonic is used for one thing only: decoding the messages of a client's request stream ([`MessageDecoder`]).
//! Unary calls, etcd's answers and every response body are framed here.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::codec::{BufferSettings, DecodeBuf, Decoder};
use tonic::{Code, Status};

use crate::http2::{Patience, UnreadLimit};

/// The first allocation of a client stream's decode buffer. tonic's default is 8 KiB, held for as long as a
/// stream is open: with 10,000 watch streams that added up. Most etcd requests are far smaller; a larger one grows
/// the buffer to fit.
const BUFFER_BYTES: usize = 256;

/// tonic's default batching threshold for messages of one stream that are ready at once.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

/// Decodes the messages of a client's request stream as `M`.
pub struct MessageDecoder<M>(PhantomData<fn() -> M>);

// === impl MessageDecoder ===

impl<M> Default for MessageDecoder<M> {
    fn default() -> Self {
        MessageDecoder(PhantomData)
    }
}

impl<M: prost::Message + Default> Decoder for MessageDecoder<M> {
    type Item = M;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
    }

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<M>, Status> {
        // Same code and wording as grpc-go (etcd) for a request that does not parse.
        M::decode(src).map(Some).map_err(|e| Status::internal(format!("grpc: error unmarshalling request: {e}")))
    }
}

// === gRPC framing ===
//
// A unary request is read whole and decoded, the checked message is sent in one frame, and etcd's answer is
// passed back as one frame with its status. On streams, etcd's frames are cut out of its DATA frames
// ([`Deframer`]) and passed on as they came ([`StreamBody`]), each after the proxy has read what it needs of it.

/// The gRPC message prefix: a compression flag and a 4-byte big-endian length.
pub const PREFIX_BYTES: usize = 5;

/// One uncompressed gRPC frame holding `msg`.
pub fn frame<M: prost::Message>(msg: &M) -> Bytes {
    let mut buf = prefixed(msg.encoded_len());
    // Cannot fail: the buffer was sized for the message.
    let _ = msg.encode(&mut buf);
    buf.freeze()
}

/// A buffer for one uncompressed frame of `len` bytes, with its prefix written.
fn prefixed(len: usize) -> BytesMut {
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    buf
}

/// One whole, uncompressed gRPC frame (prefix and message) whose prefix has been checked: an answer from etcd,
/// passed to the client as it came, or one the proxy made.
#[derive(Debug, Clone, PartialEq)]
pub struct Framed(Bytes);

// === impl Framed ===

impl Framed {
    /// A body that must be exactly one uncompressed gRPC frame (an answer from etcd).
    pub fn parse(body: Bytes) -> Result<Framed, String> {
        let Some((compressed, len)) = prefix(&body) else {
            return Err(format!("a gRPC answer of {} bytes has no complete message", body.len()));
        };
        if compressed {
            return Err("etcd sent a compressed answer, which was not asked for".into());
        }
        let carried = body.len() - PREFIX_BYTES;
        if carried != len {
            return Err(format!("a gRPC answer declared {len} bytes and carried {carried}"));
        }
        Ok(Framed(body))
    }

    /// `msg` in one frame.
    pub fn encode<M: prost::Message>(msg: &M) -> Framed {
        Framed(frame(msg))
    }

    /// The message, without its prefix.
    pub fn message(&self) -> &[u8] {
        self.0.get(PREFIX_BYTES..).unwrap_or_default()
    }

    /// The message, without its prefix, as a slice of the frame (no copy).
    pub fn message_bytes(&self) -> Bytes {
        if self.0.len() < PREFIX_BYTES {
            return Bytes::new();
        }
        self.0.slice(PREFIX_BYTES..)
    }

    /// The frame's bytes, prefix included.
    pub fn into_bytes(self) -> Bytes {
        self.0
    }
}

/// Cuts etcd's stream of DATA chunks into whole gRPC frames. A frame that arrived inside one chunk (the usual case:
/// etcd writes each message in a DATA frame of its own) is a slice of that chunk, not a copy; one split across
/// chunks is gathered.
#[derive(Default)]
pub struct Deframer {
    /// What is left of the last chunk, while nothing is being gathered.
    rest: Bytes,
    /// The start of a frame that continues in the next chunk.
    partial: BytesMut,
}

// === impl Deframer ===

impl Deframer {
    /// The next chunk of the stream.
    pub fn push(&mut self, chunk: Bytes) {
        if self.rest.is_empty() && self.partial.is_empty() {
            self.rest = chunk;
            return;
        }
        if !self.rest.is_empty() {
            self.partial.extend_from_slice(&self.rest);
            self.rest = Bytes::new();
        }
        self.partial.extend_from_slice(&chunk);
    }

    /// The next whole frame, if it has arrived. A compressed frame, or one longer than `max` bytes, is an error.
    pub fn next_frame(&mut self, max: usize) -> Result<Option<Framed>, String> {
        if self.partial.is_empty() {
            Ok(whole_frame(&self.rest, max)?.map(|n| Framed(self.rest.split_to(n))))
        } else {
            Ok(whole_frame(&self.partial, max)?.map(|n| Framed(self.partial.split_to(n).freeze())))
        }
    }

    /// The next whole frame, as [`Deframer::next_frame`]; or, for a frame of more than `long` bytes, its start
    /// once [`START_BYTES`] of it (or all) have arrived: the rest is then taken with [`Deframer::take`] as it comes.
    pub fn next_part(&mut self, max: usize, long: usize) -> Result<Option<Part>, String> {
        let buf = if self.partial.is_empty() { &self.rest[..] } else { &self.partial[..] };
        let have = buf.len();
        if let Some((false, len)) = prefix(buf)
            && len > long
            && len <= max
            && have < PREFIX_BYTES + len
        {
            if have < PREFIX_BYTES + START_BYTES {
                return Ok(None);
            }
            let start = self.take(have).unwrap_or_default();
            let rest = PREFIX_BYTES + len - start.len();
            return Ok(Some(Part::Start { start, rest }));
        }
        Ok(self.next_frame(max)?.map(Part::Whole))
    }

    /// Up to `n` bytes of what has arrived, if anything has (the rest of a long frame, see [`Deframer::next_part`]).
    pub fn take(&mut self, n: usize) -> Option<Bytes> {
        let taken = if self.partial.is_empty() {
            self.rest.split_to(n.min(self.rest.len()))
        } else {
            self.partial.split_to(n.min(self.partial.len())).freeze()
        };
        (!taken.is_empty()).then_some(taken)
    }

    /// Whether no part of a frame is waiting for the rest of it.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty() && self.partial.is_empty()
    }
}

/// How much of a long frame must have arrived before its start is handed out ([`Deframer::next_part`]): enough
/// for the fields before a watch answer's events.
pub const START_BYTES: usize = 4096;

/// A frame as [`Deframer::next_part`] hands it out: whole, or the start of a long one, its prefix included, with
/// the number of its bytes still to come; those come as `More` (from whoever reads them with [`Deframer::take`]),
/// `last` on the one that ends the frame.
#[derive(Debug, PartialEq)]
pub enum Part {
    Whole(Framed),
    Start { start: Bytes, rest: usize },
    More { more: Bytes, last: bool },
}

/// The compression flag and declared message length of the frame at the start of `buf`, if its prefix is there.
fn prefix(buf: &[u8]) -> Option<(bool, usize)> {
    let p = buf.get(..PREFIX_BYTES)?;
    Some((p[0] != 0, u32::from_be_bytes([p[1], p[2], p[3], p[4]]) as usize))
}

/// The length (prefix included) of the frame at the start of `buf`, if all of it is there.
fn whole_frame(buf: &[u8], max: usize) -> Result<Option<usize>, String> {
    let Some((compressed, len)) = prefix(buf) else { return Ok(None) };
    if compressed {
        return Err("etcd sent a compressed message, which was not asked for".into());
    }
    if len > max {
        return Err(format!("etcd sent a message of {len} bytes, more than the {max} accepted"));
    }
    Ok((buf.len() - PREFIX_BYTES >= len).then_some(PREFIX_BYTES + len))
}

/// The items of a streamed answer: whole frames (etcd's as they came, or the proxy's own), or the status that
/// ends the stream.
pub type FrameStream = Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, Status>> + Send + 'static>>;

/// The body of a streamed gRPC answer: the frames of its stream, then the status as trailers (`grpc-status: 0`
/// when the stream ends, the failure's status when an item is one). The default is an empty body (a
/// "trailers-only" answer carries its status in its headers).
///
/// A frame that arrives on its own (a watch event of a fan-out: one per stream and put) is one DATA frame, as it
/// came. On a busy stream (the previous poll also found a frame ready) the frames that are ready together are
/// gathered into one DATA frame of up to [`GATHER_BYTES`]: one flow-control reservation and one HTTP/2 frame per
/// batch instead of per message, for the price of copying them. Only a busy stream is asked for more, so a quiet
/// one is not polled an extra time per message.
#[derive(Default)]
pub struct StreamBody {
    stream: Option<FrameStream>,
    /// How long its frames wait for a client that reads none of them.
    unread: Option<UnreadLimit>,
    /// The status that ended the stream while frames were being gathered: sent after them.
    end: Option<http::HeaderMap>,
    /// The last poll found a frame ready.
    busy: bool,
}

/// How many bytes of ready frames a busy stream gathers into one DATA frame (tonic's threshold for the same).
pub const GATHER_BYTES: usize = 32 * 1024;

// === impl StreamBody ===

impl http_body::Body for StreamBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if let Some(trailers) = this.end.take() {
            this.stream = None;
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))));
        }
        let Some(stream) = this.stream.as_mut() else { return Poll::Ready(None) };
        let first = match stream.as_mut().poll_next(cx) {
            Poll::Pending => {
                this.busy = false;
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(status))) => return this.ended(status_trailers(&status)),
            Poll::Ready(None) => return this.ended(ok_trailers()),
        };
        let busy = std::mem::replace(&mut this.busy, true);
        if !busy || first.len() >= GATHER_BYTES {
            return Poll::Ready(Some(Ok(http_body::Frame::data(first))));
        }
        let mut gathered = BytesMut::new();
        gathered.extend_from_slice(&first);
        while gathered.len() < GATHER_BYTES {
            match stream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(frame))) => gathered.extend_from_slice(&frame),
                Poll::Ready(Some(Err(status))) => {
                    this.end = Some(status_trailers(&status));
                    break;
                }
                Poll::Ready(None) => {
                    this.end = Some(ok_trailers());
                    break;
                }
                Poll::Pending => break,
            }
        }
        Poll::Ready(Some(Ok(http_body::Frame::data(gathered.freeze()))))
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_none()
    }
}

impl Patience for StreamBody {
    fn patience(&self) -> Option<std::time::Duration> {
        self.unread.as_ref().map(UnreadLimit::after)
    }

    fn ran_out(&mut self) {
        if let Some(unread) = &self.unread {
            unread.mark_ran_out();
        }
    }
}

impl StreamBody {
    fn ended(&mut self, trailers: http::HeaderMap) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        self.stream = None;
        Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
    }
}

/// A streamed answer to the client: `application/grpc`, then the frames of `stream` and its status; reset if the
/// client reads none of it for `unread`'s time.
pub fn streamed_response(stream: FrameStream, unread: Option<UnreadLimit>) -> crate::http2::Reply<StreamBody> {
    let body = StreamBody { stream: Some(stream), unread, end: None, busy: false };
    let mut response = http::Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    crate::http2::Reply::Streamed(response)
}

/// `grpc-status: 0`.
fn ok_trailers() -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS.clone(), http::HeaderValue::from_static("0"));
    trailers
}

/// A failure's code, message and details as trailers.
fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut trailers = http::HeaderMap::with_capacity(3);
    if status.add_header(&mut trailers).is_err() {
        // Only a message or details that cannot be a header value fail; the code alone still tells the client.
        trailers.clear();
        let code = http::HeaderValue::from(status.code() as i32);
        trailers.insert(GRPC_STATUS.clone(), code);
    }
    if !status.message().is_empty() {
        trailers.insert(GRPC_MESSAGE.clone(), grpc_message(status.message()));
    }
    trailers
}

/// Bytes of a `grpc-message` that gRPC percent-encodes: controls, `%` and everything beyond ASCII (which
/// `percent_encoding` always encodes). Spaces and other printable characters go as they are, as grpc-go (etcd)
/// sends them: `etcdserver: permission denied`, byte for byte (tonic would send `etcdserver:%20permission%20denied`,
/// which clients decode alike, but a reader of the raw trailers would not recognise).
const GRPC_MESSAGE_ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');

fn grpc_message(message: &str) -> http::HeaderValue {
    let encoded = percent_encoding::utf8_percent_encode(message, GRPC_MESSAGE_ENCODED).to_string();
    // Only visible ASCII and spaces are left, which a header value takes.
    http::HeaderValue::from_str(&encoded).unwrap_or_else(|_| http::HeaderValue::from_static(""))
}

/// A trailers-only answer with `status` (a refusal, or a failure before any message).
pub fn status_response<B: Default>(status: &Status) -> http::Response<B> {
    let mut response = http::Response::new(B::default());
    let headers = response.headers_mut();
    headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    headers.extend(status_trailers(status));
    response
}

/// What makes a request a gRPC call the proxy understands, checked before anything else: `:method` POST, a
/// `content-type` of `application/grpc` or `application/grpc+proto` (parameters after `;` aside: a message in
/// another codec would be read as protobuf), a `:path` without a query, and a `grpc-timeout`, if any, as gRPC
/// defines it (at most 8 digits and a unit). Anything else is refused rather than read as protobuf or run without
/// its deadline (fail closed); etcd's clients always send these exactly. The refusal is grpc-go's: HTTP 405,
/// 415 or 400 with its gRPC status (a path with a query is an unknown method).
pub fn check_grpc_request(
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> Result<(), (http::StatusCode, Status)> {
    if method != http::Method::POST {
        let status = Status::internal(format!("etcd-guard: a gRPC request's :method must be POST, got {method}"));
        return Err((http::StatusCode::METHOD_NOT_ALLOWED, status));
    }
    let content_type = headers.get(http::header::CONTENT_TYPE).map(http::HeaderValue::as_bytes);
    if !content_type.is_some_and(is_grpc_proto) {
        let shown = content_type.map_or("none".into(), |v| format!("{:?}", String::from_utf8_lossy(v)));
        let status = Status::invalid_argument(format!(
            "etcd-guard: invalid gRPC request content-type {shown} (application/grpc, protobuf messages only)"
        ));
        return Err((http::StatusCode::UNSUPPORTED_MEDIA_TYPE, status));
    }
    if uri.query().is_some() {
        let status = Status::unimplemented("etcd-guard: a gRPC method's path carries no query");
        return Err((http::StatusCode::OK, status));
    }
    if let Some(v) = headers.get("grpc-timeout")
        && v.to_str().ok().and_then(crate::upstream::parse_grpc_timeout).is_none()
    {
        let shown = String::from_utf8_lossy(v.as_bytes());
        let status = Status::internal(format!("etcd-guard: malformed grpc-timeout {shown:?}"));
        return Err((http::StatusCode::BAD_REQUEST, status));
    }
    Ok(())
}

/// `application/grpc` or `application/grpc+proto`, either with parameters after `;`.
fn is_grpc_proto(content_type: &[u8]) -> bool {
    let base = content_type.split(|b| *b == b';').next().unwrap_or_default();
    matches!(base.trim_ascii_end(), b"application/grpc" | b"application/grpc+proto")
}

/// A client stream's messages must come uncompressed (the proxy offers no compression, like etcd): any other
/// `grpc-encoding` is refused up front, worded as grpc-go (etcd) words it.
pub fn check_request_encoding(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding").map(http::HeaderValue::as_bytes) {
        None | Some(b"identity") => Ok(()),
        Some(other) => Err(Status::unimplemented(format!(
            "grpc: Decompressor is not installed for grpc-encoding {:?}",
            String::from_utf8_lossy(other)
        ))),
    }
}

/// A unary request's message, read whole from `body` and decoded. Errors are worded as grpc-go (etcd) words them.
pub async fn read_request<M, B>(mut body: B, headers: &http::HeaderMap, max_bytes: usize) -> Result<M, Status>
where
    M: prost::Message + Default,
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    // As grpc-go (etcd) does before reading: a `grpc-encoding` it has no decompressor for is refused whatever the
    // message's compressed flag says.
    check_request_encoding(headers)?;
    let mut data = Gather::default();
    // The prefix as it arrives: a message declared larger than allowed is refused at once, as grpc-go refuses it,
    // rather than held while the rest of it comes (or never does).
    let (mut head, mut head_len) = ([0u8; PREFIX_BYTES], 0);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("grpc: error reading request: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue };
        if head_len < PREFIX_BYTES {
            let take = (PREFIX_BYTES - head_len).min(chunk.len());
            head[head_len..head_len + take].copy_from_slice(&chunk[..take]);
            head_len += take;
            if let Some((_, len)) = prefix(&head[..head_len])
                && len > max_bytes
            {
                return Err(too_large(len, max_bytes));
            }
        }
        data.push(chunk);
        if data.len() > max_bytes.saturating_add(PREFIX_BYTES) {
            return Err(too_large(data.len() - PREFIX_BYTES, max_bytes));
        }
    }
    let mut body = data.finish();
    let Some((compressed, len)) = prefix(&body) else {
        return Err(Status::internal("grpc: error while receiving the request: no complete message"));
    };
    // Any other encoding was refused above.
    if compressed {
        return Err(Status::internal("grpc: compressed flag set with identity or empty encoding"));
    }
    if len > max_bytes {
        return Err(too_large(len, max_bytes));
    }
    body.advance(PREFIX_BYTES);
    if body.len() != len {
        return Err(Status::internal("grpc: a unary request must carry exactly one message"));
    }
    M::decode(body).map_err(|e| Status::internal(format!("grpc: error unmarshalling request: {e}")))
}

/// A body's chunks gathered into one buffer. A body of one chunk (most gRPC messages) is kept as it came, without
/// a copy.
#[derive(Default)]
pub struct Gather {
    first: Option<Bytes>,
    rest: BytesMut,
}

// === impl Gather ===

impl Gather {
    pub fn push(&mut self, chunk: Bytes) {
        match self.first.take() {
            None if self.rest.is_empty() => self.first = Some(chunk),
            None => self.rest.extend_from_slice(&chunk),
            Some(first) => {
                self.rest.extend_from_slice(&first);
                self.rest.extend_from_slice(&chunk);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.first.as_ref().map_or(self.rest.len(), Bytes::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn finish(self) -> Bytes {
        self.first.unwrap_or_else(|| self.rest.freeze())
    }
}

/// gRPC's binary headers: standard base64, padded or not.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

fn too_large(len: usize, max: usize) -> Status {
    Status::resource_exhausted(format!("grpc: received message larger than max ({len} vs. {max})"))
}

/// etcd's status in trailers (or in the headers of a trailers-only answer), if it is not `OK`. Only the code,
/// message and details are kept: no other metadata of etcd's reaches the client.
pub fn status_from_trailers(trailers: &http::HeaderMap) -> Option<Status> {
    let code = Code::from_bytes(trailers.get(&GRPC_STATUS)?.as_bytes());
    if code == Code::Ok {
        return None;
    }
    let message = trailers
        .get(&GRPC_MESSAGE)
        .map(|v| percent_encoding::percent_decode(v.as_bytes()).decode_utf8_lossy().into_owned())
        .unwrap_or_default();
    let details = trailers.get(&GRPC_STATUS_DETAILS).and_then(|v| base64::Engine::decode(&BASE64, v.as_bytes()).ok());
    Some(match details {
        Some(d) => Status::with_details(code, message, d.into()),
        None => Status::new(code, message),
    })
}

/// A unary call's answer to the client: the message's frame, then `grpc-status: 0`.
pub fn unary_response<B>(message: Framed) -> crate::http2::Reply<B> {
    let mut response = http::Response::new(message.into_bytes());
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    crate::http2::Reply::Whole(response, ok_trailers())
}

// gRPC's status headers, named once rather than parsed from a string for every call.
pub static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
static GRPC_STATUS_DETAILS: http::HeaderName = http::HeaderName::from_static("grpc-status-details-bin");

#[cfg(test)]
mod tests {
    use super::*;

    /// `grpc-message` as gRPC encodes it (and grpc-go sends it): spaces and printable ASCII as they are; `%`,
    /// controls and non-ASCII percent-encoded; decoded back to the same message.
    #[test]
    fn grpc_messages_are_percent_encoded_as_grpc_says() {
        let plain = grpc_message("etcdserver: permission denied");
        assert_eq!(plain.as_bytes(), b"etcdserver: permission denied");
        let odd = "100% sure\nnot \u{e9}t\u{e9}";
        let encoded = grpc_message(odd);
        assert_eq!(encoded.as_bytes(), b"100%25 sure%0Anot %C3%A9t%C3%A9");
        let trailers = status_trailers(&Status::internal(odd));
        assert_eq!(status_from_trailers(&trailers).map(|s| s.message().to_string()).as_deref(), Some(odd));
        let response: http::Response<()> = status_response(&Status::permission_denied("etcdserver: permission denied"));
        assert_eq!(response.headers().get("grpc-status").map(http::HeaderValue::as_bytes), Some(&b"7"[..]));
    }

    #[test]
    fn gather_keeps_one_chunk_and_joins_several() {
        let mut one = Gather::default();
        one.push(Bytes::from_static(b"abc"));
        assert_eq!(one.finish(), Bytes::from_static(b"abc"));
        let mut three = Gather::default();
        for part in [&b"ab"[..], b"", b"cd", b"e"] {
            three.push(Bytes::copy_from_slice(part));
        }
        assert_eq!(three.len(), 5);
        assert_eq!(three.finish(), Bytes::from_static(b"abcde"));
        assert!(Gather::default().is_empty());
    }

    #[test]
    fn a_frame_round_trips_and_a_bad_one_is_refused() {
        let msg = etcd_guard_proto::etcdserverpb::RangeRequest { key: b"k".to_vec(), ..Default::default() };
        let framed = frame(&msg);
        let parsed = Framed::parse(framed.clone());
        assert_eq!(parsed.as_ref().map(Framed::message).ok(), Some(&prost::Message::encode_to_vec(&msg)[..]));
        assert_eq!(parsed.map(Framed::into_bytes).ok(), Some(framed.clone()));
        assert_eq!(Framed::encode(&msg).into_bytes(), framed);
        assert!(Framed::parse(framed.slice(..framed.len() - 1)).is_err());
        assert!(Framed::parse(framed.slice(..4)).is_err());
        assert!(Framed::parse(Bytes::from_static(&[1, 0, 0, 0, 0])).is_err());
        assert_eq!(Framed::parse(Bytes::from_static(&[0, 0, 0, 0, 0])).map(|f| f.message().len()), Ok(0));
    }

    /// `n` frames of messages of 1, 2, ... bytes, one after the other.
    fn frames(n: u8) -> Vec<Bytes> {
        (1..=n).map(|i| Framed::encode(&Bytes::from(vec![i; usize::from(i)])).into_bytes()).collect()
    }

    #[test]
    fn a_frame_inside_one_chunk_is_a_slice_of_it() -> Result<(), String> {
        let chunk = frames(1).concat();
        let chunk = Bytes::from(chunk);
        let mut d = Deframer::default();
        d.push(chunk.clone());
        let frame = d.next_frame(1024)?.ok_or("no frame")?;
        assert_eq!(frame.into_bytes().as_ptr(), chunk.as_ptr(), "not copied");
        assert!(d.is_empty());
        assert_eq!(d.next_frame(1024)?, None);
        Ok(())
    }

    #[test]
    fn frames_come_out_whole_however_the_chunks_cut_them() -> Result<(), String> {
        let sent = frames(6);
        let stream: Vec<u8> = sent.concat();
        // Every way of cutting the stream into two or three chunks, prefixes included.
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let mut d = Deframer::default();
                let mut got = Vec::new();
                for part in [&stream[..a], &stream[a..b], &stream[b..]] {
                    d.push(Bytes::copy_from_slice(part));
                    while let Some(frame) = d.next_frame(1024)? {
                        got.push(frame.into_bytes());
                    }
                }
                assert_eq!(got, sent, "cut at {a} and {b}");
                assert!(d.is_empty(), "cut at {a} and {b}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_long_frame_comes_out_as_its_start_and_the_rest_however_the_chunks_cut_it() -> Result<(), String> {
        let long = Framed::encode(&Bytes::from(vec![9u8; 3 * START_BYTES])).into_bytes();
        let short = frames(3);
        let stream: Vec<u8> = [&short[..1], std::slice::from_ref(&long), &short[1..]].concat().concat();
        let mut started = 0;
        for cut in (0..stream.len()).step_by(97) {
            let mut d = Deframer::default();
            let (mut got, mut starts, mut rest) = (Vec::<u8>::new(), 0, 0);
            for part in [&stream[..cut], &stream[cut..]] {
                d.push(Bytes::copy_from_slice(part));
                loop {
                    if rest > 0 {
                        let Some(more) = d.take(rest) else { break };
                        rest -= more.len();
                        got.extend_from_slice(&more);
                        continue;
                    }
                    match d.next_part(1 << 20, START_BYTES)? {
                        // The long one too, when all of it arrived in one chunk.
                        Some(Part::Whole(frame)) => got.extend_from_slice(&frame.into_bytes()),
                        Some(Part::Start { start, rest: more }) => {
                            assert!(start.len() >= START_BYTES, "cut at {cut}");
                            starts += 1;
                            rest = more;
                            got.extend_from_slice(&start);
                        }
                        Some(Part::More { .. }) | None => break,
                    }
                }
            }
            assert_eq!(got, stream, "cut at {cut}");
            assert!(starts <= 1 && rest == 0, "cut at {cut}");
            assert!(d.is_empty(), "cut at {cut}");
            started += starts;
        }
        // Cut inside the long frame, after at least `START_BYTES` of it: it starts before its end has arrived.
        assert!(started >= 2 * START_BYTES / 97 - 2, "{started}");
        Ok(())
    }

    #[test]
    fn a_compressed_or_oversized_frame_is_refused() {
        let mut d = Deframer::default();
        d.push(Bytes::from_static(&[1, 0, 0, 0, 1, 7]));
        assert!(d.next_frame(1024).is_err());
        let mut d = Deframer::default();
        d.push(Bytes::from_static(&[0, 0, 0, 4, 1]));
        assert!(d.next_frame(1024).is_err(), "1025 bytes declared");
        let mut d = Deframer::default();
        d.push(Bytes::from_static(&[0, 0, 0]));
        assert_eq!(d.next_frame(1024), Ok(None));
        assert!(!d.is_empty(), "a partial prefix waits");
    }

    /// A unary message declared larger than allowed is refused as soon as its prefix is in, not once the client
    /// has sent (or stopped sending) the rest.
    #[tokio::test]
    async fn a_message_declared_too_large_is_refused_at_its_prefix() {
        use futures_util::StreamExt;
        use http_body_util::{BodyExt, StreamBody};
        // The prefix in two pieces (declaring 3 MiB), one byte of the message, then nothing more, ever.
        let chunks = futures_util::stream::iter([&[0u8, 0, 0x30][..], &[0, 0], &[7]])
            .map(|c| Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .chain(futures_util::stream::pending());
        let body = StreamBody::new(chunks).boxed_unsync();
        let headers = http::HeaderMap::new();
        let read = read_request::<etcd_guard_proto::etcdserverpb::RangeRequest, _>(body, &headers, 2 << 20);
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), read).await;
        let status = refused.map(Result::err).ok().flatten().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(
            status,
            Some((Code::ResourceExhausted, "grpc: received message larger than max (3145728 vs. 2097152)".into()))
        );
    }

    /// A `grpc-encoding` etcd has no decompressor for is refused as etcd refuses it, also with an uncompressed
    /// message (which etcd does not serve either).
    #[tokio::test]
    async fn a_unary_request_with_an_encoding_etcd_lacks_is_unimplemented() {
        let message = Bytes::from_static(&[0, 0, 0, 0, 3, 0x0a, 0x01, b'k']);
        let read = |encoding: Option<&'static str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(e) = encoding {
                headers.insert("grpc-encoding", http::HeaderValue::from_static(e));
            }
            let body = http_body_util::Full::new(message.clone());
            async move { read_request::<etcd_guard_proto::etcdserverpb::RangeRequest, _>(body, &headers, 1024).await }
        };
        let refused = read(Some("gzip")).await.err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(
            refused,
            Some((Code::Unimplemented, "grpc: Decompressor is not installed for grpc-encoding \"gzip\"".into()))
        );
        assert_eq!(read(Some("identity")).await.ok().map(|r| r.key), Some(b"k".to_vec()));
        assert_eq!(read(None).await.ok().map(|r| r.key), Some(b"k".to_vec()));
    }

    #[tokio::test]
    async fn a_streamed_answer_is_its_frames_then_its_status() -> Result<(), Box<dyn std::error::Error>> {
        use http_body_util::BodyExt;
        let items = vec![
            Ok(Bytes::from_static(b"one")),
            Ok(Bytes::from_static(b"two")),
            Err(Status::permission_denied("etcdserver: permission denied")),
        ];
        let crate::http2::Reply::Streamed(response) =
            streamed_response(Box::pin(futures_util::stream::iter(items)), None)
        else {
            return Err("not streamed".into());
        };
        assert_eq!(
            response.headers().get("content-type").map(http::HeaderValue::as_bytes),
            Some(&b"application/grpc"[..])
        );
        let mut body = response.into_body();
        let mut data = Vec::new();
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => data.push(d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(data, [Bytes::from_static(b"one"), Bytes::from_static(b"two")]);
        let status = trailers.as_ref().and_then(status_from_trailers).ok_or("no status")?;
        assert_eq!((status.code(), status.message()), (Code::PermissionDenied, "etcdserver: permission denied"));
        assert!(http_body::Body::is_end_stream(&body));

        let ended = streamed_response(Box::pin(futures_util::stream::empty()), None);
        let crate::http2::Reply::Streamed(response) = ended else { return Err("not streamed".into()) };
        let trailers = response.into_body().collect().await?.trailers().cloned().ok_or("no trailers")?;
        assert_eq!(trailers.get("grpc-status").map(http::HeaderValue::as_bytes), Some(&b"0"[..]));
        assert!(http_body::Body::is_end_stream(&StreamBody::default()), "a trailers-only answer has no body");
        Ok(())
    }

    /// The DATA frames and the `grpc-status` of a streamed answer.
    async fn read_streamed(stream: FrameStream) -> Result<(Vec<Bytes>, Option<String>), Box<dyn std::error::Error>> {
        use http_body_util::BodyExt;
        let crate::http2::Reply::Streamed(response) = streamed_response(stream, None) else {
            return Err("not streamed".into());
        };
        let mut body = response.into_body();
        let (mut data, mut status) = (Vec::new(), None);
        while let Some(frame) = body.frame().await {
            match frame?.into_data() {
                Ok(d) => data.push(d),
                Err(frame) => {
                    let trailers = frame.into_trailers().map_err(|_| "neither data nor trailers")?;
                    status = trailers.get("grpc-status").and_then(|v| v.to_str().ok()).map(str::to_string);
                }
            }
        }
        Ok((data, status))
    }

    #[tokio::test]
    async fn a_busy_stream_is_gathered_and_a_quiet_one_is_not() -> Result<(), Box<dyn std::error::Error>> {
        let items = |n: usize, len: usize| (0..n).map(move |i| Ok::<_, Status>(Bytes::from(vec![i as u8; len])));
        // Ready together: the first frame alone, then the rest gathered, in order, up to about GATHER_BYTES each.
        let sent: Vec<Bytes> = items(100, 1000).map(|r| r.unwrap_or_default()).collect();
        let (data, status) = read_streamed(Box::pin(futures_util::stream::iter(items(100, 1000)))).await?;
        assert_eq!(data.concat(), sent.concat(), "same bytes, same order");
        assert_eq!(data.first().map(Bytes::len), Some(1000), "the first frame goes alone");
        assert!(data.len() >= 4 && data.len() < 10, "{} DATA frames", data.len());
        assert!(data.iter().all(|d| d.len() < GATHER_BYTES + 1000));
        assert_eq!(status.as_deref(), Some("0"));

        // Each frame after a wait: one DATA frame each, nothing copied together.
        let mut n = 0;
        let quiet = futures_util::stream::poll_fn(move |cx| {
            n += 1;
            if n > 20 {
                return Poll::Ready(None);
            }
            if n % 2 == 1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Poll::Ready(Some(Ok(Bytes::from(vec![n as u8; 10]))))
        });
        let (data, status) = read_streamed(Box::pin(quiet)).await?;
        assert_eq!(data.len(), 10, "{data:?}");
        assert_eq!(status.as_deref(), Some("0"));
        Ok(())
    }

    #[test]
    fn statuses_from_trailers_keep_code_message_and_nothing_else() {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("7"));
        t.insert("grpc-message", http::HeaderValue::from_static("etcdserver:%20permission%20denied"));
        t.insert("x-etcd-internal", http::HeaderValue::from_static("secret"));
        let status = status_from_trailers(&t);
        assert_eq!(status.as_ref().map(Status::code), Some(Code::PermissionDenied));
        assert_eq!(status.as_ref().map(Status::message), Some("etcdserver: permission denied"));
        assert!(status.is_some_and(|s| s.metadata().is_empty()));
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        assert!(status_from_trailers(&t).is_none());
    }
}
