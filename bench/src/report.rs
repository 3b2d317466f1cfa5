//! Results: what goes into the JSON file, the summary of each case, the check against issue #5's targets and
//! the table printed at the end.

use std::path::Path;
use std::process::Command;

use serde::Serialize;

use crate::load::{LoadResult, Workload};
use crate::run::Shape;
use crate::setup::{AuditConfig, ProxyOptions};
use crate::stats::median;

/// Everything a benchmark run produced (the JSON file).
#[derive(Debug, Serialize)]
pub struct Results {
    pub tool: &'static str,
    /// When the run started, seconds since the Unix epoch.
    pub started_unix_s: u64,
    /// How long the whole run took, seconds.
    pub wall_s: f64,
    pub machine: Machine,
    pub settings: Settings,
    pub audit: AuditReport,
    /// What the generated proxy configurations held.
    pub proxy_options: ProxyOptions,
    pub cases: Vec<Case>,
    pub idle: Vec<IdleFigures>,
    pub targets: Vec<TargetCheck>,
}

/// The machine and the binaries measured.
#[derive(Debug, Serialize)]
pub struct Machine {
    /// CPUs this process may use.
    pub nproc: usize,
    pub cpu_model: String,
    pub mem_total_mib: u64,
    pub kernel: String,
    pub etcd_version: String,
    pub proxy_bin: String,
    /// Modification time of the proxy binary, seconds since the Unix epoch (to spot a stale build).
    pub proxy_bin_modified_unix_s: u64,
    /// Clock ticks per second used to convert `/proc/<pid>/stat` CPU times.
    pub clk_tck: u64,
    pub note: &'static str,
}

impl Machine {
    /// Describe this machine.
    pub fn probe(etcd_bin: &Path, proxy_bin: &Path, clk_tck: u64) -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, m)| m.trim()))
            .unwrap_or("unknown")
            .to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let mem_total_mib = crate::procfs::parse_status_kib(&meminfo, "MemTotal").unwrap_or(0) / 1024;
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
        let etcd_version = Command::new(etcd_bin)
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .find_map(|l| l.strip_prefix("etcd Version:").map(|v| v.trim().to_string()))
            })
            .unwrap_or_else(|| "unknown".into());
        let proxy_bin_modified_unix_s = std::fs::metadata(proxy_bin)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Machine {
            nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            cpu_model,
            mem_total_mib,
            kernel,
            etcd_version,
            proxy_bin: proxy_bin.display().to_string(),
            proxy_bin_modified_unix_s,
            clk_tck,
            note: "the load generator, etcd and the proxy run on the same machine and share its cores",
        }
    }
}

/// The settings of the run.
#[derive(Debug, Serialize)]
pub struct Settings {
    pub quick: bool,
    pub runs: usize,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub shapes: Vec<String>,
    pub watchers: usize,
    pub watch_put_rate: f64,
    pub watch_create_window: usize,
    pub watch_puts_direct: bool,
    pub idle_conns: usize,
    pub policy_roles: usize,
    pub policy_rules: usize,
    pub rate: String,
}

/// How the proxy audited.
#[derive(Debug, Serialize)]
pub struct AuditReport {
    pub config: AuditConfig,
    pub note: String,
    /// Bytes of audit files written by the proxies during the whole run.
    pub bytes_written: u64,
}

/// CPU and memory of one server process over one run.
#[derive(Debug, Clone, Serialize)]
pub struct ProcFigures {
    /// CPU seconds (user + system) in the measured window.
    pub cpu_s: f64,
    /// Peak RSS from the start of the run (warm-up and watcher set-up included) to the end of the window, KiB.
    pub peak_rss_kib: u64,
    /// RSS at the end of the window, KiB.
    pub rss_end_kib: u64,
    /// RSS when the load generator started, KiB.
    pub rss_start_kib: u64,
    /// Watch fan-out: RSS once every watcher was created, before any put, KiB.
    pub rss_watchers_ready_kib: Option<u64>,
}

/// One run of the load generator against one leg.
#[derive(Debug, Clone, Serialize)]
pub struct RunRecord {
    pub leg: String,
    pub run: usize,
    pub load: LoadResult,
    pub etcd: ProcFigures,
    /// The proxy serving this leg (none for direct runs).
    pub proxy: Option<ProcFigures>,
    /// Watch fan-out: time to create every watcher.
    pub watchers_setup_ms: Option<u64>,
}

/// Summary of one leg of a case over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct LegSummary {
    pub label: String,
    pub runs: usize,
    /// Median over runs of requests (watch: events delivered) per second.
    pub rps: f64,
    pub rps_runs: Vec<f64>,
    /// Median over runs (that served requests) of the per-run median latency, ms.
    pub p50_ms: f64,
    /// Median over runs (that served requests) of the per-run 99th percentile, ms.
    pub p99_ms: f64,
    pub requests: u64,
    pub errors: u64,
    /// etcd CPU µs per request (all runs' CPU / all runs' requests).
    pub etcd_cpu_us_per_req: f64,
    /// The proxy's CPU µs per request (proxy legs only).
    pub proxy_cpu_us_per_req: Option<f64>,
    /// The load generator's CPU µs per request.
    pub client_cpu_us_per_req: f64,
    /// Largest peak RSS of etcd over the runs, MiB.
    pub etcd_peak_rss_mib: f64,
    /// Largest peak RSS of the proxy over the runs, MiB (proxy legs only).
    pub proxy_peak_rss_mib: Option<f64>,
    /// This leg's throughput / the first leg's (A's); none for the first leg.
    pub ratio: Option<f64>,
    /// This leg's p50 − the first leg's, ms; none for the first leg.
    pub added_p50_ms: Option<f64>,
    /// This leg's p99 − the first leg's, ms; none for the first leg.
    pub added_p99_ms: Option<f64>,
}

/// One comparison: a workload at one shape, two legs or more (A = the first), alternating runs (A B A B …, or
/// A B C A B C …).
#[derive(Debug, Clone, Serialize)]
pub struct Case {
    pub name: String,
    /// `saturation`, `fixed-rate`, `policy-scale`, `audit-cost`, `answer-after`, `coalesced`, `unix-upstream`,
    /// `grpc-proxy` (three legs: direct, grpc-proxy, etcd-guard) or `baseline`.
    pub kind: String,
    pub workload: String,
    pub shape: String,
    pub connections: usize,
    pub in_flight: usize,
    /// Fixed request rate of the run, requests/s (fixed-rate cases).
    pub rate: Option<f64>,
    pub legs: Vec<LegSummary>,
    /// B's throughput / A's.
    pub ratio: f64,
    /// B's p50 − A's p50, ms.
    pub added_p50_ms: f64,
    /// B's p99 − A's p99, ms.
    pub added_p99_ms: f64,
    pub runs: Vec<RunRecord>,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn per_request_us(cpu_s: f64, requests: u64) -> f64 {
    if requests == 0 { 0.0 } else { cpu_s * 1e6 / requests as f64 }
}

impl LegSummary {
    fn of(label: &str, runs: &[&RunRecord]) -> LegSummary {
        let requests: u64 = runs.iter().map(|r| r.load.requests).sum();
        let sum = |f: &dyn Fn(&RunRecord) -> f64| runs.iter().map(|r| f(r)).sum::<f64>();
        let is_proxy = runs.iter().any(|r| r.proxy.is_some());
        let proxy_cpu = sum(&|r| r.proxy.as_ref().map(|p| p.cpu_s).unwrap_or(0.0));
        let rps_runs: Vec<f64> = runs.iter().map(|r| r.load.rps).collect();
        let served: Vec<&&RunRecord> = runs.iter().filter(|r| r.load.requests > 0).collect();
        LegSummary {
            label: label.to_string(),
            runs: runs.len(),
            rps: median(&rps_runs),
            rps_runs,
            // A run that served nothing has no latency (its throughput, 0, still counts).
            p50_ms: median(&served.iter().map(|r| r.load.latency.p50_us as f64 / 1000.0).collect::<Vec<_>>()),
            p99_ms: median(&served.iter().map(|r| r.load.latency.p99_us as f64 / 1000.0).collect::<Vec<_>>()),
            requests,
            errors: runs.iter().map(|r| r.load.errors).sum(),
            etcd_cpu_us_per_req: per_request_us(sum(&|r| r.etcd.cpu_s), requests),
            proxy_cpu_us_per_req: is_proxy.then(|| per_request_us(proxy_cpu, requests)),
            client_cpu_us_per_req: per_request_us(sum(&|r| r.load.client_cpu_s), requests),
            etcd_peak_rss_mib: mib(runs.iter().map(|r| r.etcd.peak_rss_kib).max().unwrap_or(0)),
            proxy_peak_rss_mib: is_proxy
                .then(|| mib(runs.iter().filter_map(|r| r.proxy.as_ref()).map(|p| p.peak_rss_kib).max().unwrap_or(0))),
            ratio: None,
            added_p50_ms: None,
            added_p99_ms: None,
        }
    }

    /// Fill in the figures relative to the first leg.
    fn against(mut self, a: &LegSummary) -> LegSummary {
        self.ratio = Some(if a.rps > 0.0 { self.rps / a.rps } else { 0.0 });
        self.added_p50_ms = Some(self.p50_ms - a.p50_ms);
        self.added_p99_ms = Some(self.p99_ms - a.p99_ms);
        self
    }
}

impl Case {
    /// Summarise the runs of a comparison.
    pub fn new(
        name: &str,
        kind: &str,
        workload: Workload,
        shape: Shape,
        rate: Option<f64>,
        labels: &[&str],
        runs: Vec<RunRecord>,
    ) -> Case {
        let summary =
            |label: &&str| LegSummary::of(label, &runs.iter().filter(|r| r.leg == *label).collect::<Vec<_>>());
        let a = labels.first().map(summary).unwrap_or_else(|| LegSummary::of("", &[]));
        let others = labels.iter().skip(1).map(|label| summary(label).against(&a));
        let legs: Vec<LegSummary> = std::iter::once(a.clone()).chain(others).collect();
        let b = legs.get(1).unwrap_or(&a);
        Case {
            name: name.to_string(),
            kind: kind.to_string(),
            workload: workload.name().to_string(),
            shape: shape.to_string(),
            connections: shape.connections,
            in_flight: shape.in_flight,
            rate,
            ratio: if a.rps > 0.0 { b.rps / a.rps } else { 0.0 },
            added_p50_ms: b.p50_ms - a.p50_ms,
            added_p99_ms: b.p99_ms - a.p99_ms,
            legs,
            runs,
        }
    }
}

impl Case {
    /// Why the case's figures cannot be trusted: a run that served nothing, or failed more than 1 % of its
    /// requests.
    pub fn failure(&self) -> Option<String> {
        self.runs
            .iter()
            .filter(|r| r.load.requests == 0 || r.load.errors * 100 > r.load.requests + r.load.errors)
            .map(|r| format!("{} run {} failed: {} errors, {} served", r.leg, r.run, r.load.errors, r.load.requests))
            .reduce(|a, b| format!("{a}; {b}"))
    }

    /// Lowest and highest p99 of one leg's runs that served requests, ms.
    fn p99_spread_ms(&self, leg: usize) -> Option<(f64, f64)> {
        let label = &self.legs.get(leg)?.label;
        let p99s = self
            .runs
            .iter()
            .filter(|r| &r.leg == label && r.load.requests > 0)
            .map(|r| r.load.latency.p99_us as f64 / 1000.0);
        p99s.fold(None, |acc, v| match acc {
            None => Some((v, v)),
            Some((lo, hi)) => Some((f64::min(lo, v), f64::max(hi, v))),
        })
    }

    fn ok(&self) -> bool {
        self.failure().is_none()
    }

    /// `text`, followed by the failure if there is one.
    fn shown(&self, text: String) -> String {
        match self.failure() {
            Some(f) => format!("{text} [{f}]"),
            None => text,
        }
    }
}

/// The idle-connection memory case for one server.
#[derive(Debug, Clone, Serialize)]
pub struct IdleFigures {
    pub server: String,
    pub connections: u64,
    /// Time to open them all (TLS handshake + one Range each), ms.
    pub setup_ms: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// (after − before) / connections, KiB.
    pub per_connection_kib: f64,
    /// The server's CPU time (user + system) from before the first connection until they were all set up: TLS
    /// handshakes, HTTP/2 set-up and one Range each, s.
    pub setup_cpu_s: f64,
    /// `setup_cpu_s` / connections, µs: what a client's reconnect costs the server.
    pub cpu_us_per_connection: f64,
}

/// One of issue #5's targets, as measured.
#[derive(Debug, Clone, Serialize)]
pub struct TargetCheck {
    pub target: String,
    pub measured: String,
    /// `None` when this run cannot tell (case not run, or not at the target's scale).
    pub met: Option<bool>,
}

fn check(target: &str, measured: String, met: Option<bool>) -> TargetCheck {
    TargetCheck { target: target.to_string(), measured, met }
}

/// A pair of proxies' figures for a target line: B/A throughput, both proxies' CPU per request, B's added p99.
fn pair_figures(c: &Case) -> String {
    let cpu = |i: usize| c.legs[i].proxy_cpu_us_per_req.unwrap_or(0.0);
    c.shown(format!(
        "{} {} {:.3} (proxy CPU {:.1} vs {:.1} us/req, p99 {:+.2} ms)",
        c.workload,
        c.shape,
        c.ratio,
        cpu(1),
        cpu(0),
        c.added_p99_ms
    ))
}

/// The two proxies of a `grpc-proxy` case, `(grpc-proxy, etcd-guard)`: its second and third legs, in the order
/// `run.rs` gives them (direct etcd first).
fn grpc_proxy_legs(c: &Case) -> Option<(&LegSummary, &LegSummary)> {
    Some((c.legs.get(1)?, c.legs.get(2)?))
}

/// A `grpc-proxy` case's line: each proxy's throughput over direct etcd's and its CPU per request.
fn against_grpc_proxy(c: &Case) -> String {
    let figures = |l: &LegSummary| {
        format!("{:.3} of direct, {:.1} us/req", l.ratio.unwrap_or(0.0), l.proxy_cpu_us_per_req.unwrap_or(0.0))
    };
    let text = match grpc_proxy_legs(c) {
        Some((reference, guard)) => format!("etcd-guard {}, grpc-proxy {}", figures(guard), figures(reference)),
        None => "not both proxies".to_string(),
    };
    c.shown(format!("{} {}: {text}", c.name, c.shape))
}

/// Whether etcd-guard spent less CPU per request than grpc-proxy. Throughput is shown beside it, not judged: with
/// both proxies at about 0.8 of direct etcd, this machine's noise decides which of the two is ahead in a single
/// case; the CPU each spends per request is what tells them apart.
fn etcd_guard_cheaper(c: &Case) -> bool {
    let cpu = |l: &LegSummary| l.proxy_cpu_us_per_req.unwrap_or(f64::INFINITY);
    grpc_proxy_legs(c).is_some_and(|(reference, guard)| cpu(guard) < cpu(reference))
}

fn cases_of<'a>(cases: &'a [Case], kind: &str, workloads: &[&str]) -> Vec<&'a Case> {
    cases.iter().filter(|c| c.kind == kind && workloads.contains(&c.workload.as_str())).collect()
}

/// Judge the run against issue #5's targets.
pub fn targets(cases: &[Case], idle: &[IdleFigures], watchers: usize) -> Vec<TargetCheck> {
    let mut out = Vec::new();
    let join = |parts: Vec<String>| parts.join(", ");
    for w in ["lin-range", "put"] {
        let sat = cases_of(cases, "saturation", &[w]);
        if !sat.is_empty() {
            out.push(check(
                &format!("{w}: proxy/direct throughput >= 0.90 at saturation"),
                join(sat.iter().map(|c| c.shown(format!("{} {:.2}", c.shape, c.ratio))).collect()),
                Some(sat.iter().all(|c| c.ok() && c.ratio >= 0.90)),
            ));
        }
    }
    let unary = cases_of(cases, "saturation", &["lin-range", "ser-range", "put"]);
    let cpu = |c: &Case| c.legs[1].proxy_cpu_us_per_req.unwrap_or(0.0);
    if !unary.is_empty() {
        out.push(check(
            "proxy CPU <= 25 us per forwarded unary request (auditing on)",
            join(unary.iter().map(|c| c.shown(format!("{} {} {:.1}", c.workload, c.shape, cpu(c)))).collect()),
            Some(unary.iter().all(|c| c.ok() && cpu(c) <= 25.0)),
        ));
    }
    // Shown, not judged: their requests are not the unary ones.
    let information = [
        ("mix", "proxy CPU per request of the kube-apiserver-like mix, us"),
        ("keep-alive", "proxy CPU per lease keep-alive (a message on a stream), us"),
        (
            "leased-put",
            "proxy CPU per put with a shared lease by a scoped identity (the lease's keys are looked up), us",
        ),
    ];
    for (workload, what) in information {
        let shown = cases_of(cases, "saturation", &[workload]);
        if !shown.is_empty() {
            out.push(check(
                &format!("(information) {what}"),
                join(shown.iter().map(|c| format!("{} {:.1}", c.shape, cpu(c))).collect()),
                None,
            ));
        }
    }
    let fixed = cases_of(cases, "fixed-rate", &["lin-range", "put"]);
    if !fixed.is_empty() {
        out.push(check(
            "added p99 <= 1 ms at half of saturation",
            join(
                fixed
                    .iter()
                    .map(|c| {
                        // The direct runs' own spread says how much of a difference this machine can show.
                        let noise = c
                            .p99_spread_ms(0)
                            .map(|(lo, hi)| format!(" (direct p99 {lo:.2}-{hi:.2} ms over its runs)"))
                            .unwrap_or_default();
                        c.shown(format!("{} {:+.2} ms{noise}", c.name, c.added_p99_ms))
                    })
                    .collect(),
            ),
            Some(fixed.iter().all(|c| c.ok() && c.added_p99_ms <= 1.0)),
        ));
    }
    let policy = cases_of(cases, "policy-scale", &["lin-range"]);
    if !policy.is_empty() {
        out.push(check(
            "large policy throughput within 5 % of the small one",
            join(
                policy
                    .iter()
                    .map(|c| {
                        let cpu = |i: usize| c.legs[i].proxy_cpu_us_per_req.unwrap_or(0.0);
                        c.shown(format!("{} {:.3} (proxy CPU {:.1} vs {:.1} us/req)", c.shape, c.ratio, cpu(1), cpu(0)))
                    })
                    .collect(),
            ),
            Some(policy.iter().all(|c| c.ok() && c.ratio >= 0.95)),
        ));
    }
    let audit = cases_of(cases, "audit-cost", &["lin-range", "put"]);
    if !audit.is_empty() {
        out.push(check(
            "(issue #3) auditing costs under 10 % of throughput at saturation: audit on / off >= 0.90",
            join(audit.iter().map(|c| pair_figures(c)).collect()),
            Some(audit.iter().all(|c| c.ok() && c.ratio >= 0.90)),
        ));
    }
    let answer_after = cases_of(cases, "answer-after", &["lin-range", "put"]);
    if !answer_after.is_empty() {
        out.push(check(
            "(information) audit.answer_after: written / queued",
            join(answer_after.iter().map(|c| pair_figures(c)).collect()),
            None,
        ));
    }
    let unix = cases_of(cases, "unix-upstream", &["lin-range", "put"]);
    if !unix.is_empty() {
        out.push(check(
            "(information) upstream over etcd's unix socket / over TCP",
            join(unix.iter().map(|c| pair_figures(c)).collect()),
            None,
        ));
    }
    let reference = cases_of(cases, "grpc-proxy", &["lin-range", "put"]);
    if !reference.is_empty() {
        out.push(check(
            "etcd-guard (auditing on) spends less CPU per request than etcd grpc-proxy (checks nothing)",
            join(reference.iter().map(|c| against_grpc_proxy(c)).collect()),
            Some(reference.iter().all(|c| c.ok() && etcd_guard_cheaper(c))),
        ));
    }
    let coalesced = cases_of(cases, "coalesced", &["watch"]);
    if !coalesced.is_empty() {
        let figures = |c: &&Case| {
            let (a, b) = (&c.legs[0], &c.legs[1]);
            c.shown(format!(
                "{} {:+.2} ms (etcd CPU {:.1} vs {:.1} us/event, proxy {:.1} us/event)",
                c.shape,
                c.added_p99_ms,
                b.etcd_cpu_us_per_req,
                a.etcd_cpu_us_per_req,
                b.proxy_cpu_us_per_req.unwrap_or(0.0)
            ))
        };
        out.push(check(
            "(information) watch with watch.coalesce: delivery p99 within 2 ms of direct",
            join(coalesced.iter().map(figures).collect()),
            None,
        ));
    }
    let watch = cases_of(cases, "saturation", &["watch"]);
    if !watch.is_empty() {
        let rss = watch.iter().filter_map(|c| c.legs[1].proxy_peak_rss_mib).fold(0.0, f64::max);
        // Memory held per watcher before any event: the first proxy run (least reuse of memory freed earlier).
        let per_watcher = watch
            .iter()
            .filter_map(|c| c.runs.iter().find(|r| r.leg == c.legs[1].label))
            .filter_map(|r| r.proxy.as_ref())
            .filter_map(|p| p.rss_watchers_ready_kib.map(|ready| ready as f64 - p.rss_start_kib as f64))
            .map(|delta| delta / watchers.max(1) as f64)
            .map(|kib| format!("{kib:.1}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let full = watchers >= 10_000;
        out.push(check(
            "watch fan-out, 10,000 watchers: proxy RSS <= 200 MB",
            format!(
                "{rss:.1} MiB peak with {watchers} watchers (KiB per watcher once created, before any event: \
                 {per_watcher}){}{}",
                if full { "" } else { " (not judged: run with --watchers 10000)" },
                if watch.iter().all(|c| c.ok()) { "" } else { " [the proxy path failed]" }
            ),
            full.then_some(watch.iter().all(|c| c.ok()) && rss * 1.048_576 <= 200.0),
        ));
        out.push(check(
            "watch fan-out: delivery p99 within 2 ms of direct",
            join(watch.iter().map(|c| c.shown(format!("{} {:+.2} ms", c.shape, c.added_p99_ms))).collect()),
            Some(watch.iter().all(|c| c.ok() && c.added_p99_ms <= 2.0)),
        ));
    }
    if let Some(p) = idle.iter().find(|i| i.server == "proxy") {
        out.push(check(
            "idle client connection <= 64 KiB in the proxy",
            format!("{:.1} KiB per connection ({} connections)", p.per_connection_kib, p.connections),
            Some(p.per_connection_kib <= 64.0),
        ));
    }
    out
}

fn render(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().filter_map(|r| r.get(i)).map(|c| c.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                // Text columns left-aligned, figures right-aligned.
                if i < 3 { format!("{c}{}", " ".repeat(pad)) } else { format!("{}{c}", " ".repeat(pad)) }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// A leg's latency over the first leg's, for the table: "failed" when the case's figures cannot be trusted.
fn added(ms: Option<f64>, failed: bool) -> String {
    match (ms, failed) {
        (None, _) => String::new(),
        (Some(_), true) => "failed".into(),
        (Some(added), false) => format!("{added:+.2}"),
    }
}

/// The rows of the summary table, header first: a row per leg of each case.
fn table_rows(cases: &[Case]) -> Vec<Vec<String>> {
    let mut rows = vec![
        [
            "case",
            "shape",
            "path",
            "req/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "etcd us/req",
            "proxy us/req",
            "etcd MiB",
            "proxy MiB",
            "x/A",
            "+p50 ms",
            "+p99 ms",
        ]
        .map(String::from)
        .to_vec(),
    ];
    let opt = |v: Option<f64>, digits: usize| v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into());
    for case in cases {
        let failed = case.failure().is_some();
        for (i, leg) in case.legs.iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first { case.name.clone() } else { String::new() },
                if first { format!("{} {}", case.shape, case.kind) } else { String::new() },
                leg.label.clone(),
                format!("{:.0}", leg.rps),
                format!("{:.2}", leg.p50_ms),
                format!("{:.2}", leg.p99_ms),
                leg.errors.to_string(),
                format!("{:.0}", leg.etcd_cpu_us_per_req),
                opt(leg.proxy_cpu_us_per_req, 1),
                format!("{:.0}", leg.etcd_peak_rss_mib),
                opt(leg.proxy_peak_rss_mib, 0),
                leg.ratio.map(|r| format!("{r:.3}")).unwrap_or_default(),
                added(leg.added_p50_ms, failed),
                added(leg.added_p99_ms, failed),
            ]);
        }
    }
    rows
}

/// The summary table printed at the end of a run.
pub fn table(results: &Results) -> String {
    let rows = table_rows(&results.cases);
    let mut out = render(&rows);
    out.push_str("(watch rows: req/s = events delivered per second, latency = put sent to event received)\n");
    for i in &results.idle {
        out.push_str(&format!(
            "idle connections, {}: {} connections, RSS {:.1} -> {:.1} MiB, {:.1} KiB per connection; set up in {} ms, \
             {:.0} us CPU per connection (handshake, HTTP/2, one Range)\n",
            i.server,
            i.connections,
            mib(i.rss_before_kib),
            mib(i.rss_after_kib),
            i.per_connection_kib,
            i.setup_ms,
            i.cpu_us_per_connection
        ));
    }
    out.push_str("\ntargets (issue #5):\n");
    for t in &results.targets {
        let verdict = match t.met {
            Some(true) => "met   ",
            Some(false) => "MISSED",
            None => "  -   ",
        };
        out.push_str(&format!("  [{verdict}] {}: {}\n", t.target, t.measured));
    }
    out.push_str(&format!(
        "\naudit: {} ({} MiB of audit records written); metrics listener: {}\nmachine: {} CPU(s), {}, etcd {}; {}; {} runs per path, {} s \
         windows after {} s warm-up\n",
        results.audit.note,
        results.audit.bytes_written / (1024 * 1024),
        if results.proxy_options.metrics_listen { "on (a free loopback port per proxy)" } else { "not in this build" },
        results.machine.nproc,
        results.machine.cpu_model,
        results.machine.etcd_version,
        results.machine.note,
        results.settings.runs,
        results.settings.duration_s,
        results.settings.warmup_s,
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(leg: &str, rps: f64, p99_us: u64, proxy_cpu: Option<f64>) -> RunRecord {
        let mut load = LoadResult { requests: (rps * 2.0) as u64, rps, elapsed_s: 2.0, ..Default::default() };
        load.latency.p99_us = p99_us;
        load.latency.p50_us = p99_us / 4;
        let figures = |cpu_s| ProcFigures {
            cpu_s,
            peak_rss_kib: 2048,
            rss_end_kib: 1024,
            rss_start_kib: 1000,
            rss_watchers_ready_kib: None,
        };
        RunRecord {
            leg: leg.into(),
            run: 1,
            load,
            etcd: figures(1.0),
            proxy: proxy_cpu.map(figures),
            watchers_setup_ms: None,
        }
    }

    #[test]
    fn case_summary_and_targets() {
        let runs = vec![
            record("direct", 1000.0, 2000, None),
            record("proxy", 950.0, 2500, Some(0.02)),
            record("direct", 1100.0, 2100, None),
            record("proxy", 900.0, 2600, Some(0.02)),
        ];
        let shape = Shape { connections: 1, in_flight: 64 };
        let case = Case::new("lin-range", "saturation", Workload::LinRange, shape, None, &["direct", "proxy"], runs);
        assert_eq!(case.legs[0].rps, 1050.0);
        assert_eq!(case.legs[1].rps, 925.0);
        assert!((case.ratio - 925.0 / 1050.0).abs() < 1e-9);
        assert!((case.added_p99_ms - 0.5).abs() < 1e-9);
        // 0.04 CPU s over 3700 requests.
        let cpu = case.legs[1].proxy_cpu_us_per_req.unwrap_or(0.0);
        assert!((cpu - 0.04e6 / 3700.0).abs() < 1e-6);
        assert_eq!(case.legs[0].proxy_cpu_us_per_req, None);
        let t = targets(&[case], &[], 1000);
        assert_eq!(t[0].met, Some(false)); // 0.88 < 0.90
        assert_eq!(t[1].met, Some(true)); // 10.8 us <= 25 us
    }

    #[test]
    fn a_failed_leg_misses_its_targets() {
        let mut failed = record("proxy", 0.0, 0, Some(0.0));
        failed.load.errors = 1000;
        let runs = vec![
            record("direct", 1000.0, 2000, None),
            record("proxy", 1000.0, 2500, Some(0.01)),
            record("direct", 1000.0, 2000, None),
            failed,
        ];
        let shape = Shape { connections: 1, in_flight: 64 };
        let case = Case::new("watch", "saturation", Workload::Watch, shape, None, &["direct", "proxy"], runs);
        assert_eq!(case.failure().as_deref(), Some("proxy run 1 failed: 1000 errors, 0 served"));
        assert_eq!(case.legs[1].p99_ms, 2.5); // the failed run has no latency
        assert_eq!(case.legs[1].rps, 500.0); // but its throughput counts
        let t = targets(&[case], &[], 10_000);
        assert!(t.iter().all(|t| t.met == Some(false)), "{t:?}");
    }

    #[test]
    fn half_load_line_shows_the_direct_runs_spread() {
        let runs = vec![
            record("direct", 1000.0, 2000, None),
            record("proxy", 1000.0, 2600, Some(0.02)),
            record("direct", 1000.0, 3500, None),
            record("proxy", 1000.0, 2900, Some(0.02)),
            record("direct", 1000.0, 2200, None),
            record("proxy", 1000.0, 2700, Some(0.02)),
        ];
        let shape = Shape { connections: 1, in_flight: 64 };
        let case = Case::new(
            "lin-range@1000/s",
            "fixed-rate",
            Workload::LinRange,
            shape,
            Some(1000.0),
            &["direct", "proxy"],
            runs,
        );
        assert_eq!(case.p99_spread_ms(0), Some((2.0, 3.5)));
        let t = targets(&[case], &[], 1000);
        let line = t.iter().find(|t| t.target.starts_with("added p99")).map(|t| t.measured.clone());
        assert_eq!(line.as_deref(), Some("lin-range@1000/s +0.50 ms (direct p99 2.00-3.50 ms over its runs)"));
    }

    #[test]
    fn three_legs_are_each_compared_with_the_first() {
        let runs = vec![
            record("direct", 1000.0, 2000, None),
            record("etcd grpc-proxy", 700.0, 3000, Some(0.28)),
            record("etcd-guard", 900.0, 2500, Some(0.09)),
        ];
        let shape = Shape { connections: 1, in_flight: 64 };
        let labels = ["direct", "etcd grpc-proxy", "etcd-guard"];
        let case = Case::new("lin-range", "grpc-proxy", Workload::LinRange, shape, None, &labels, runs);
        assert_eq!(case.legs.len(), 3);
        assert_eq!(case.legs[0].ratio, None);
        assert_eq!(case.legs[1].ratio, Some(0.7));
        assert_eq!(case.legs[2].ratio, Some(0.9));
        assert_eq!(case.legs[2].added_p99_ms, Some(0.5));
        // p50 is a quarter of p99 in these runs: 0.625 − 0.5 ms.
        assert_eq!((case.legs[0].added_p50_ms, case.legs[2].added_p50_ms), (None, Some(0.125)));
        // The case's own B/A is the second leg's.
        assert!((case.ratio - 0.7).abs() < 1e-9);
        // 0.28 CPU s over 1400 requests = 200 us; 0.09 over 1800 = 50 us.
        let t = targets(std::slice::from_ref(&case), &[], 1000);
        let line = t.iter().find(|t| t.target.contains("grpc-proxy")).map(|t| (t.met, t.measured.as_str()));
        let measured =
            "lin-range 1x64: etcd-guard 0.900 of direct, 50.0 us/req, grpc-proxy 0.700 of direct, 200.0 us/req";
        assert_eq!(line, Some((Some(true), measured)));
        let table = table_rows(&[case]);
        assert_eq!(table[3][11], "0.900");
        assert_eq!((table[3][12].as_str(), table[3][13].as_str()), ("+0.12", "+0.50"));
        assert_eq!(table[1][11], "");
    }

    #[test]
    fn table_is_aligned() {
        let rows = vec![
            vec!["a".to_string(), "bb".into(), "c".into(), "1".into()],
            vec!["aaa".into(), "b".into(), "c".into(), "100".into()],
        ];
        assert_eq!(render(&rows), "a    bb  c    1\naaa  b   c  100\n");
    }
}
