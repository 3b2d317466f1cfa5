//! gRPC codecs for a checking proxy.
//!
//! Requests are *decoded* into their protobuf messages (so they can be checked) and the checked message is
//! *re-encoded* towards etcd — the client's original bytes are never forwarded. Responses travel as raw bytes:
//! nothing in them needs checking, so they are passed through untouched (fields of newer etcd versions survive,
//! and no CPU is spent decoding them).

use std::marker::PhantomData;

use bytes::{Buf, BufMut, Bytes};
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

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
