//! The audit log: a hash-chained JSON line for every request, written off the request path; and the readers
//! that review and verify it. The format is documented in `docs/audit.md`.

pub mod chain;
pub mod describe;
pub mod record;
pub mod review;
pub mod summary;
pub mod verify;
pub mod writer;

pub use describe::Describe;
pub use record::{Decision, Event, Ops, Record, Subject};
pub use writer::{AuditError, AuditLog, AuditStats};
pub mod read;
