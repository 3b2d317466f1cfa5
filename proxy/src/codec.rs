//! gRPC codecs for a checking proxy.
//!
//! Requests are *decoded* into their protobuf messages (so they can be checked) and the checked message is
//! *re-encoded* towards etcd — the client's original bytes are never forwarded. Responses travel as raw bytes:
//! nothing in them needs checking, so they are passed through untouched (fields of newer etcd versions survive,
//! and no CPU is spent decoding them).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// The first allocation of a call's encode and decode buffers, on both legs. tonic's default is 8 KiB per buffer,
/// four per forwarded call, held for as long as a stream is open: with 10,000 watch streams that was about 30 KiB
/// per stream. Most etcd messages are far smaller; a larger one grows its buffer to fit.
const BUFFER_BYTES: usize = 256;

/// tonic's default batching threshold for messages of one stream that are ready at once.
const YIELD_THRESHOLD_BYTES: usize = 32 * 1024;

fn buffer_settings() -> BufferSettings {
    BufferSettings::new(BUFFER_BYTES, YIELD_THRESHOLD_BYTES)
}

/// Server side: decode requests as `M`, encode responses from raw bytes.
pub struct ServerCodec<M>(PhantomData<fn() -> M>);

/// Client side (towards etcd): encode requests from `M`, decode responses as raw bytes.
pub struct UpstreamCodec<M>(PhantomData<fn() -> M>);

/// Encodes a protobuf message.
pub struct MessageEncoder<M>(PhantomData<fn() -> M>);

/// Decodes a protobuf message.
pub struct MessageDecoder<M>(PhantomData<fn() -> M>);

/// Passes bytes through.
pub struct RawEncoder;

/// Takes a whole message as bytes.
pub struct RawDecoder;

// === impl ServerCodec ===

impl<M> Default for ServerCodec<M> {
    fn default() -> Self {
        ServerCodec(PhantomData)
    }
}

impl<M: prost::Message + Default + Send + 'static> Codec for ServerCodec<M> {
    type Encode = Bytes;
    type Decode = M;
    type Encoder = RawEncoder;
    type Decoder = MessageDecoder<M>;

    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }

    fn decoder(&mut self) -> MessageDecoder<M> {
        MessageDecoder(PhantomData)
    }
}

// === impl UpstreamCodec ===

impl<M> Default for UpstreamCodec<M> {
    fn default() -> Self {
        UpstreamCodec(PhantomData)
    }
}

impl<M: prost::Message + Send + 'static> Codec for UpstreamCodec<M> {
    type Encode = M;
    type Decode = Bytes;
    type Encoder = MessageEncoder<M>;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> MessageEncoder<M> {
        MessageEncoder(PhantomData)
    }

    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

// === impl encoders and decoders ===

impl<M: prost::Message> Encoder for MessageEncoder<M> {
    type Item = M;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn encode(&mut self, item: M, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(dst).map_err(|e| Status::internal(format!("encoding request: {e}")))
    }
}

impl<M: prost::Message + Default> Decoder for MessageDecoder<M> {
    type Item = M;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<M>, Status> {
        // Same code and wording as grpc-go (etcd) for a request that does not parse.
        M::decode(src).map(Some).map_err(|e| Status::internal(format!("grpc: error unmarshalling request: {e}")))
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawDecoder {
    type Item = Bytes;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        buffer_settings()
    }

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

// === gRPC framing for unary calls ===
//
// Unary calls skip tonic's streaming machinery on both legs: a request is read whole and decoded, the checked
// message is sent in one frame, and etcd's answer is passed back as one frame with its status.

/// The gRPC message prefix: a compression flag and a 4-byte big-endian length.
const PREFIX_BYTES: usize = 5;

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
        let Some(prefix) = body.get(..PREFIX_BYTES) else {
            return Err(format!("a gRPC answer of {} bytes has no complete message", body.len()));
        };
        if prefix[0] != 0 {
            return Err("etcd sent a compressed answer, which was not asked for".into());
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
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

    /// The frame's bytes, prefix included.
    pub fn into_bytes(self) -> Bytes {
        self.0
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
    let mut data = Gather::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Status::internal(format!("grpc: error reading request: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue };
        data.push(chunk);
        if data.len() > max_bytes.saturating_add(PREFIX_BYTES) {
            return Err(too_large(data.len() - PREFIX_BYTES, max_bytes));
        }
    }
    let mut body = data.finish();
    if body.len() < PREFIX_BYTES {
        return Err(Status::internal("grpc: error while receiving the request: no complete message"));
    }
    if body.get_u8() != 0 {
        let encoding = headers.get("grpc-encoding").and_then(|v| v.to_str().ok()).unwrap_or("");
        return Err(match encoding {
            "" | "identity" => Status::internal("grpc: compressed flag set with identity or empty encoding"),
            other => Status::unimplemented(format!("grpc: Decompressor is not installed for grpc-encoding {other:?}")),
        });
    }
    let len = body.get_u32() as usize;
    if len > max_bytes {
        return Err(too_large(len, max_bytes));
    }
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
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(GRPC_STATUS.clone(), http::HeaderValue::from_static("0"));
    crate::http2::Reply::Whole(response, trailers)
}

// gRPC's status headers, named once rather than parsed from a string for every call.
pub static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
static GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");
static GRPC_STATUS_DETAILS: http::HeaderName = http::HeaderName::from_static("grpc-status-details-bin");

#[cfg(test)]
mod tests {
    use super::*;

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
