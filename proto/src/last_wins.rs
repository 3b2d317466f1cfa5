//! The two request messages whose `oneof` holds messages, decoded as etcd decodes them.
//!
//! protobuf (and prost) *merge* a message field of a `oneof` that a message carries twice with the same field
//! number: `request_put { key: "a" value: "secret" }` then `request_put { key: "b" }` reads as
//! `request_put { key: "b" value: "secret" }`. etcd's generated code (gogoproto) starts a fresh message at every
//! occurrence instead, so the last one wins whole: etcd stores `b` with an empty value. The proxy re-encodes what it
//! decoded, so a merged op would reach etcd with a meaning the client's bytes do not have for etcd. These types
//! are the generated ones but for that rule (`build.rs` maps the `.proto` messages here with `extern_path`).
//!
//! Scalar and bytes fields of a `oneof` (`Compare.target_union`) are replaced by prost as by etcd, and message
//! fields outside a `oneof` are merged by both, so only these two messages need it.

use prost::DecodeError;
use prost::bytes::{Buf, BufMut};
use prost::encoding::{DecodeContext, WireType, skip_field};

/// `oneof` message fields decoded as etcd does: each occurrence replaces the field whole (see the module's text).
macro_rules! last_wins_oneof {
    ($message:ident . $field:ident : $oneof:ty, $tags:pat) => {
        impl prost::Message for $message {
            fn encode_raw(&self, buf: &mut impl BufMut) {
                if let Some(value) = &self.$field {
                    value.encode(buf);
                }
            }

            fn merge_field(
                &mut self,
                tag: u32,
                wire_type: WireType,
                buf: &mut impl Buf,
                ctx: DecodeContext,
            ) -> Result<(), DecodeError> {
                match tag {
                    $tags => {
                        let mut fresh = None;
                        <$oneof>::merge(&mut fresh, tag, wire_type, buf, ctx).map_err(|mut error| {
                            error.push(stringify!($message), stringify!($field));
                            error
                        })?;
                        self.$field = fresh;
                        Ok(())
                    }
                    _ => skip_field(wire_type, tag, buf, ctx),
                }
            }

            fn encoded_len(&self) -> usize {
                self.$field.as_ref().map_or(0, <$oneof>::encoded_len)
            }

            fn clear(&mut self) {
                self.$field = None;
            }
        }
    };
}

// === RequestOp ===

/// One operation of a transaction's `success` or `failure` list (etcd's `etcdserverpb.RequestOp`).
#[derive(Clone, PartialEq, Default, Debug)]
pub struct RequestOp {
    pub request: Option<request_op::Request>,
}

last_wins_oneof!(RequestOp.request: request_op::Request, 1..=4);

/// Nested message and enum types in `RequestOp`.
pub mod request_op {
    #[derive(Clone, PartialEq, prost::Oneof)]
    pub enum Request {
        #[prost(message, tag = "1")]
        RequestRange(crate::etcdserverpb::RangeRequest),
        #[prost(message, tag = "2")]
        RequestPut(crate::etcdserverpb::PutRequest),
        #[prost(message, tag = "3")]
        RequestDeleteRange(crate::etcdserverpb::DeleteRangeRequest),
        #[prost(message, tag = "4")]
        RequestTxn(crate::etcdserverpb::TxnRequest),
    }
}

// === WatchRequest ===

/// One message of a Watch stream from the client (etcd's `etcdserverpb.WatchRequest`).
#[derive(Clone, PartialEq, Eq, Hash, Default, Debug)]
pub struct WatchRequest {
    pub request_union: Option<watch_request::RequestUnion>,
}

last_wins_oneof!(WatchRequest.request_union: watch_request::RequestUnion, 1..=3);

/// Nested message and enum types in `WatchRequest`.
pub mod watch_request {
    #[derive(Clone, PartialEq, Eq, Hash, prost::Oneof)]
    pub enum RequestUnion {
        #[prost(message, tag = "1")]
        CreateRequest(crate::etcdserverpb::WatchCreateRequest),
        #[prost(message, tag = "2")]
        CancelRequest(crate::etcdserverpb::WatchCancelRequest),
        #[prost(message, tag = "3")]
        ProgressRequest(crate::etcdserverpb::WatchProgressRequest),
    }
}
