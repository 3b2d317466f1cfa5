//! etcd-guard: an access-control proxy for etcd.
//!
//! Data flows one way: [`server`] (listener) → [`identity`] → [`authz`] + [`policy`] → [`upstream`] → client.
//! See the README for the security model.

#![forbid(unsafe_code)]
// The library serves the binary and the tests, and its docs are read with `cargo doc --document-private-items`:
// public items may point at the private ones that explain them.
#![allow(rustdoc::private_intra_doc_links)]

pub mod audit;
pub mod authz;
pub mod certs;
pub mod cli;
pub mod codec;
pub mod config;
pub mod http2;
pub mod identity;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod procfs;
pub mod reload;
pub mod runtime;
pub mod server;
pub mod service;
pub mod tls;
pub mod upstream;
