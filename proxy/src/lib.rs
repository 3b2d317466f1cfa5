//! etcd-guard: an access-control proxy for etcd.
//!
//! Data flows one way: [`server`] (listener) → [`identity`] → [`authz`] + [`policy`] → [`upstream`] → client.
//! See the README for the security model.

#![forbid(unsafe_code)]

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
