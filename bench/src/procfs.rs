//! CPU time and memory of etcd, the proxy and the load generator: `etcd_guard::procfs`, with the benchmark's
//! error type.

pub use etcd_guard::procfs::{Sample, USER_HZ, parse_status_kib, reset_peak};

use crate::BoxError;

/// Read the counters of process `pid` (`"self"` works too).
pub fn sample(pid: &str) -> Result<Sample, BoxError> {
    Ok(etcd_guard::procfs::sample(pid)?)
}
