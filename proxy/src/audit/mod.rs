//! The audit log: a hash-chained JSON line for every request, written off the request path; and the readers
//! that review and verify it. The format is documented in `docs/audit.md`.

pub mod chain;
pub mod review;
pub mod verify;
