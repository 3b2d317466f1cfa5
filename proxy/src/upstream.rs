//! The connection to etcd: calls made with the proxy's own identity, carrying only allowlisted metadata.

use std::time::Duration;

use bytes::Bytes;
use http::uri::PathAndQuery;
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::codec::UpstreamCodec;

/// Client metadata forwarded to etcd. Everything else (notably `token`, `authorization` and `grpcgateway-*`,
/// which would change who etcd thinks is calling) is dropped.
pub const FORWARDED_METADATA: &[&str] = &["hasleader", "client-api-version"];

/// etcd's maximum response size is unbounded in practice (clientv3 accepts up to `i32::MAX`).
const MAX_RESPONSE_BYTES: usize = i32::MAX as usize;

/// A handle to the upstream etcd cluster. Cheap to clone.
#[derive(Clone)]
pub struct Upstream {
    channel: Channel,
}

/// What travels with a forwarded call: the allowlisted metadata and the client's deadline.
#[derive(Debug, Clone, Default)]
pub struct CallMeta {
    metadata: MetadataMap,
    timeout: Option<Duration>,
}

// === impl Upstream ===

impl Upstream {
    pub fn new(channel: Channel) -> Upstream {
        Upstream { channel }
    }

    fn grpc(&self) -> tonic::client::Grpc<Channel> {
        tonic::client::Grpc::new(self.channel.clone())
            .max_decoding_message_size(MAX_RESPONSE_BYTES)
            .max_encoding_message_size(usize::MAX)
    }

    /// A unary call; the response comes back as raw bytes.
    pub async fn unary<M>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<Bytes, Status>
    where
        M: prost::Message + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        let resp = grpc
            .unary(meta.request(msg), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(clean)?;
        Ok(resp.into_inner())
    }

    /// A unary call whose response the proxy needs to read (lease lookups, MemberList).
    pub async fn unary_decoded<M, R>(&self, path: &'static str, msg: M, meta: &CallMeta) -> Result<R, Status>
    where
        M: prost::Message + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        let codec = tonic_prost::ProstCodec::<M, R>::default();
        let resp = grpc.unary(meta.request(msg), PathAndQuery::from_static(path), codec).await.map_err(clean)?;
        Ok(resp.into_inner())
    }

    /// A server-streaming call; messages come back as raw bytes.
    pub async fn server_streaming<M>(
        &self,
        path: &'static str,
        msg: M,
        meta: &CallMeta,
    ) -> Result<Streaming<Bytes>, Status>
    where
        M: prost::Message + Send + Sync + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        let resp = grpc
            .server_streaming(meta.request(msg), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(clean)?;
        Ok(resp.into_inner())
    }

    /// A bidirectional call fed by `messages` (already checked).
    pub async fn streaming<M, S>(
        &self,
        path: &'static str,
        messages: S,
        meta: &CallMeta,
    ) -> Result<Streaming<Bytes>, Status>
    where
        M: prost::Message + Send + Sync + 'static,
        S: futures_util::Stream<Item = M> + Send + 'static,
    {
        let mut grpc = self.grpc();
        grpc.ready().await.map_err(unavailable)?;
        let resp = grpc
            .streaming(meta.request(messages), PathAndQuery::from_static(path), UpstreamCodec::<M>::default())
            .await
            .map_err(clean)?;
        Ok(resp.into_inner())
    }
}

fn unavailable(e: tonic::transport::Error) -> Status {
    Status::unavailable(format!("etcd-guard: upstream unavailable: {e}"))
}

/// Pass etcd's code, message and details on, but none of its response metadata.
///
/// The client's deadline is also enforced by the upstream channel, which may notice it a moment before etcd does;
/// that is answered as etcd (grpc-go) answers an expired deadline, not as tonic's local `Cancelled`.
pub fn clean(s: Status) -> Status {
    if is_local_timeout(&s) {
        return Status::deadline_exceeded(DEADLINE_EXCEEDED);
    }
    Status::with_details(s.code(), s.message().to_string(), s.details().to_vec().into())
}

/// grpc-go's message for a call whose deadline passed.
pub const DEADLINE_EXCEEDED: &str = "context deadline exceeded";

fn is_local_timeout(s: &Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = source {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = e.source();
    }
    false
}

// === impl CallMeta ===

impl CallMeta {
    /// Take what may travel upstream from a client's request metadata.
    pub fn from_client(md: &MetadataMap) -> CallMeta {
        let mut metadata = MetadataMap::new();
        for key in FORWARDED_METADATA {
            if let Some(v) = md.get(*key) {
                metadata.insert(*key, v.clone());
            }
        }
        let timeout = md.get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        CallMeta { metadata, timeout }
    }

    /// The client's deadline, if it sent one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    fn request<T>(&self, msg: T) -> Request<T> {
        let mut req = Request::new(msg);
        *req.metadata_mut() = self.metadata.clone();
        if let Some(t) = self.timeout {
            req.set_timeout(t);
        }
        req
    }
}

/// Parse a `grpc-timeout` header value: at most 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("250m"), Some(Duration::from_millis(250)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("123456789S"), None);
        assert_eq!(parse_grpc_timeout("S"), None);
        assert_eq!(parse_grpc_timeout("-1S"), None);
        assert_eq!(parse_grpc_timeout("5x"), None);
    }

    #[test]
    fn only_allowlisted_metadata_travels() {
        let mut md = MetadataMap::new();
        md.insert("token", "secret".parse().unwrap_or_else(|_| tonic::metadata::MetadataValue::from_static("")));
        md.insert("authorization", tonic::metadata::MetadataValue::from_static("Bearer x"));
        md.insert("grpcgateway-accept", tonic::metadata::MetadataValue::from_static("1"));
        md.insert("hasleader", tonic::metadata::MetadataValue::from_static("true"));
        md.insert("client-api-version", tonic::metadata::MetadataValue::from_static("3.4"));
        let meta = CallMeta::from_client(&md);
        let keys: Vec<String> = meta
            .metadata
            .keys()
            .map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => k.as_str().to_string(),
                tonic::metadata::KeyRef::Binary(k) => k.as_str().to_string(),
            })
            .collect();
        assert_eq!(keys.len(), 2);
        assert!(keys.contains(&"hasleader".to_string()) && keys.contains(&"client-api-version".to_string()));
    }
}
