//! CPU time and memory of a process, read from `/proc` (Linux only).
//!
//! CPU time is `utime + stime` from `/proc/<pid>/stat` (all threads of the process), in clock ticks; memory is
//! `VmRSS` (now) and `VmHWM` (peak since start, or since the last reset through `/proc/<pid>/clear_refs`) from
//! `/proc/<pid>/status`.

use std::process::Command;

use crate::BoxError;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size now, KiB.
    pub rss_kib: u64,
    /// Peak resident set size, KiB.
    pub hwm_kib: u64,
}

/// Clock ticks per second for `/proc/<pid>/stat`: `getconf CLK_TCK`, or 100 (the value on every common Linux
/// platform) when `getconf` is not available.
pub fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<u64>().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Read the counters of process `pid` (`"self"` works too).
pub fn sample(pid: &str) -> Result<Sample, BoxError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let cpu_ticks = parse_stat_cpu_ticks(&stat).ok_or_else(|| format!("/proc/{pid}/stat: unexpected format"))?;
    let rss_kib = parse_status_kib(&status, "VmRSS").unwrap_or(0);
    let hwm_kib = parse_status_kib(&status, "VmHWM").unwrap_or(0);
    Ok(Sample { cpu_ticks, rss_kib, hwm_kib })
}

/// Reset the peak RSS (`VmHWM`) of a process to its current RSS. Returns whether the kernel accepted it.
pub fn reset_peak(pid: &str) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
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
        let status = "Name:\tetcd\nVmPeak:\t  900 kB\nVmHWM:\t   51200 kB\nVmRSS:\t   40960 kB\nThreads:\t12\n";
        assert_eq!(parse_status_kib(status, "VmHWM"), Some(51200));
        assert_eq!(parse_status_kib(status, "VmRSS"), Some(40960));
        assert_eq!(parse_status_kib(status, "VmSwap"), None);
    }

    #[test]
    fn own_process_can_be_read() -> Result<(), BoxError> {
        let s = sample("self")?;
        assert!(s.rss_kib > 0);
        assert!(clock_ticks_per_second() > 0);
        Ok(())
    }
}
