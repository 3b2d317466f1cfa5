//! A process's CPU time, memory and file descriptors, read from `/proc` (Linux only): the proxy's own for the
//! standard `process_*` metrics, and etcd's and the proxy's for the benchmark.
//!
//! CPU time is `utime + stime` from `/proc/<pid>/stat` (all threads of the process), in clock ticks; memory is
//! `VmRSS` (now), `VmHWM` (peak since start, or since the last reset through `/proc/<pid>/clear_refs`) and
//! `VmSize` from `/proc/<pid>/status`.

use std::io;

/// Clock ticks per second of the CPU times in `/proc/<pid>/stat`: the kernel's `USER_HZ`, which is 100 on every
/// architecture Linux and etcd run on (what `getconf CLK_TCK` prints).
pub const USER_HZ: u64 = 100;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
    /// Virtual memory size, KiB.
    pub vm_kib: u64,
}

/// Read the counters of process `pid` (`"self"` works too).
pub fn sample(pid: &str) -> io::Result<Sample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cpu_ticks = parse_stat_cpu_ticks(&stat)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("/proc/{pid}/stat: unexpected format")))?;
    Ok(Sample {
        cpu_ticks,
        rss_kib: parse_status_kib(&status, "VmRSS").unwrap_or(0),
        hwm_kib: parse_status_kib(&status, "VmHWM").unwrap_or(0),
        vm_kib: parse_status_kib(&status, "VmSize").unwrap_or(0),
    })
}

/// Reset the peak RSS (`VmHWM`) of a process to its current RSS. Returns whether the kernel accepted it.
pub fn reset_peak(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// How many file descriptors this process has open (sockets included).
pub fn open_fds() -> io::Result<u64> {
    Ok(std::fs::read_dir("/proc/self/fd")?.count() as u64)
}

/// This process's limit on open file descriptors (the soft limit, `ulimit -n`), if it has one.
pub fn max_fds() -> io::Result<Option<u64>> {
    Ok(parse_limit(&std::fs::read_to_string("/proc/self/limits")?, "Max open files"))
}

/// `utime + stime` (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field 2) is in parentheses
/// and may itself contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // `after` starts at field 3 (state): field n is at index n - 3.
    let utime: u64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.get(15 - 3)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
pub fn parse_status_kib(status: &str, name: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The soft limit of a `/proc/<pid>/limits` line (`Max open files  1024  1048576  files`); `None` if the line is
/// missing or the limit is `unlimited`.
fn parse_limit(limits: &str, name: &str) -> Option<u64> {
    let rest = limits.lines().find_map(|line| line.strip_prefix(name))?;
    rest.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_command_name() {
        let line = "4242 (my (odd) proc) S 1 4242 4242 0 -1 4194560 500 0 0 0 1234 567 0 0 20 0 8 0 100 0 0";
        assert_eq!(parse_stat_cpu_ticks(line), Some(1234 + 567));
        assert_eq!(parse_stat_cpu_ticks("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn status_lines() {
        let status = "Name:\tetcd\nVmPeak:\t  900 kB\nVmSize:\t  800 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(51200));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(40960));
        assert_eq!(parse_status_kib(status, "VmSize"), Some(800));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn limits_lines() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max cpu time              unlimited            unlimited            seconds   \n\
                      Max open files            1024                 1048576              files     \n";
        assert_eq!(parse_limit(limits, "Max open files"), Some(1024));
        assert_eq!(parse_limit(limits, "Max cpu time"), None);
        assert_eq!(parse_limit(limits, "Max processes"), None);
    }

    #[test]
    fn own_process_can_be_read() -> io::Result<()> {
        let s = sample("self")?;
        assert!(s.rss_kib > 0 && s.vm_kib >= s.rss_kib, "{s:?}");
        // stdin, stdout and stderr at least, unless the test runner closed them.
        assert!(open_fds()? > 0);
        assert!(max_fds()?.is_none_or(|n| n > 0));
        Ok(())
    }
}
