//! The orchestrator: starts etcd and the proxy, runs the load generator against each in turn (A B A B …) and
//! reads CPU time and memory of both servers from `/proc` around each measured window.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::BoxError;
use crate::load::{LoadEvent, LoadResult, Workload};
use crate::procfs;
use crate::report::{self, AuditReport, Case, IdleFigures, Machine, ProcFigures, Results, RunRecord, Settings};
use crate::setup::{self, AuditConfig, Etcd, Pki, ProxyOptions, ProxyProcess};

/// Options of a benchmark run (the default command).
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Smoke test: one run per path with short windows (about two minutes). Not a measurement.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the results (JSON).
    #[arg(long, default_value = "bench-results.json")]
    pub out: PathBuf,
    /// Auditing in the proxy: `on` writes `audit: { file: … }` (refused up front if the proxy does not accept
    /// it), `off` writes `audit: { enabled: false }`, `omit` leaves the section out; `auto` is `on` when the
    /// proxy accepts it, else `omit` (noted in the results; for builds older than the audit section).
    #[arg(long, value_enum, default_value_t = AuditFlag::On)]
    pub audit: AuditFlag,
    /// Watchers of the watch fan-out (the full case is 10000).
    #[arg(long, default_value_t = 1000)]
    pub watchers: usize,
    /// Puts per second during the watch fan-out [default: 20000 / watchers, at least 1: 20,000 events/s].
    #[arg(long)]
    pub watch_put_rate: Option<f64>,
    /// Watch creations in progress at once per load generator (a burst of thousands of watch streams opened at
    /// the same moment on one connection is a separate question; see BENCHMARKS.md).
    #[arg(long, default_value_t = 100)]
    pub watch_create_window: usize,
    /// Send the watch workload's puts straight to etcd on both legs, so that only the watch streams go through the
    /// proxy and its CPU per event is the streams' alone (with one busy stream, the puts would be most of it).
    #[arg(long)]
    pub watch_puts_direct: bool,
    /// The etcd-guard binary [default: `etcd-guard` next to this program, i.e. the same target folder].
    #[arg(long)]
    pub proxy_bin: Option<PathBuf>,
    /// Another etcd-guard binary (e.g. a build of the previous commit) to compare this one with: the `baseline`
    /// case runs lin-range, put and watch through fresh processes of both, alternating.
    #[arg(long)]
    pub baseline_bin: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd_bin: PathBuf,
    /// Runs per path and case [default: 3; with --quick 1].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Measured window of each run, seconds [default: 4; with --quick 1.5].
    #[arg(long)]
    pub duration: Option<f64>,
    /// Warm-up before each measured window, seconds [default: 1; with --quick 0.5].
    #[arg(long)]
    pub warmup: Option<f64>,
    /// Fixed-rate runs of lin-range and put: `auto` = half of the direct throughput measured at saturation,
    /// a number = that many requests/s, `off` = none.
    #[arg(long, default_value = "auto")]
    pub rate: RateArg,
    /// Only these cases (comma-separated) [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub only: Vec<CaseKind>,
    /// Connection shapes, CONNECTIONSxIN_FLIGHT (requests in flight in all, spread over the connections).
    #[arg(long, value_delimiter = ',', default_value = "1x64,8x256")]
    pub shapes: Vec<Shape>,
    /// Idle connections opened in the memory case.
    #[arg(long, default_value_t = 1000)]
    pub idle_conns: usize,
    /// Roles (and bindings) of the policy-scale case; each role has 10 key rules.
    #[arg(long, default_value_t = 10_000)]
    pub policy_roles: usize,
    /// Keep the temporary folder (certificates, configurations, logs, audit files) and print its path.
    #[arg(long)]
    pub keep_dir: bool,
}

/// `--audit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuditFlag {
    Auto,
    On,
    Off,
    Omit,
}

/// A case that `--only` can select.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CaseKind {
    LinRange,
    SerRange,
    Put,
    Mix,
    Watch,
    /// Lease keep-alives, one stream per request in flight.
    KeepAlive,
    /// Puts with a lease shared by 1,000 keys, by an identity scoped to `/bench/` (kube-apiserver's Events).
    LeasedPut,
    /// Fixed-rate lin-range and put at half of saturation.
    HalfRate,
    /// lin-range through a proxy with the small policy and one with the large policy.
    PolicyScale,
    /// lin-range and put through a proxy with auditing off and the main one with auditing on (issue #3).
    AuditCost,
    /// lin-range and put through a proxy that answers once a record is queued (the default) and one that answers
    /// once it is written (`audit.answer_after: written`).
    AnswerAfter,
    /// The watch workload through a fresh proxy with `watch: { coalesce: true }`, against direct etcd.
    WatchCoalesced,
    /// lin-range and put through a proxy that reaches etcd over TCP (as every other case) and one that reaches it
    /// over its unix socket (`unixs://`, etcd on the same host).
    UnixUpstream,
    /// lin-range and put against etcd directly (A), through `etcd grpc-proxy` (B, the proxy etcd ships, issue
    /// #5's reference) and through etcd-guard (C), alternating A B C, mutual TLS on every leg.
    GrpcProxy,
    /// Memory per idle connection.
    Idle,
    /// lin-range, put and watch through a proxy built from `--baseline-bin` and through this one (only with that
    /// flag).
    Baseline,
}

/// Connections and requests in flight (in all) of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub connections: usize,
    pub in_flight: usize,
}

impl FromStr for Shape {
    type Err = String;

    fn from_str(s: &str) -> Result<Shape, String> {
        let err = || format!("{s:?}: expected CONNECTIONSxIN_FLIGHT, e.g. 8x256");
        let (c, f) = s.split_once('x').ok_or_else(err)?;
        let connections: usize = c.trim().parse().map_err(|_| err())?;
        let in_flight: usize = f.trim().parse().map_err(|_| err())?;
        if connections == 0 || in_flight == 0 {
            return Err(err());
        }
        Ok(Shape { connections, in_flight })
    }
}

impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.connections, self.in_flight)
    }
}

/// `--rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RateArg {
    Auto,
    Off,
    Fixed(f64),
}

impl FromStr for RateArg {
    type Err = String;

    fn from_str(s: &str) -> Result<RateArg, String> {
        match s {
            "auto" => Ok(RateArg::Auto),
            "off" => Ok(RateArg::Off),
            n => match n.parse::<f64>() {
                Ok(r) if r > 0.0 && r.is_finite() => Ok(RateArg::Fixed(r)),
                _ => Err(format!("{s:?}: expected auto, off or a rate in requests/s")),
            },
        }
    }
}

/// One side of a comparison: where the load goes, and which proxy process (if any) serves it.
struct Leg {
    label: String,
    url: String,
    proxy_pid: Option<String>,
}

impl Leg {
    /// The path through a proxy process, named `label`.
    fn through(label: impl Into<String>, proxy: &ProxyProcess) -> Leg {
        Leg { label: label.into(), url: proxy.url.clone(), proxy_pid: Some(proxy.guard.pid()) }
    }
}

/// What stays the same for every run.
struct Bench {
    exe: PathBuf,
    pki: Pki,
    clk_tck: u64,
    warmup_ms: u64,
    duration_ms: u64,
    runs: usize,
    watchers: usize,
    watch_put_rate: f64,
    watch_create_window: usize,
    /// Where the watch workload's puts go when not to the leg's endpoint (etcd, with `--watch-puts-direct`).
    watch_puts_to: Option<String>,
    idle_conns: usize,
    started: Instant,
}

/// Run the benchmark (the default command). Children are killed on return, on error and on Ctrl-C / SIGTERM.
pub fn main(args: RunArgs) -> Result<(), BoxError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async move {
        tokio::select! {
            outcome = run(args) => outcome,
            signal = shutdown_signal() => Err(format!("interrupted ({signal}); stopping etcd and the proxy").into()),
        }
    })
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = tokio::signal::ctrl_c() => "SIGINT",
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

fn find_proxy_bin(args: &RunArgs) -> Result<PathBuf, BoxError> {
    if let Some(p) = &args.proxy_bin {
        return if p.is_file() {
            Ok(p.clone())
        } else {
            Err(format!("--proxy-bin {}: no such file", p.display()).into())
        };
    }
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or("cannot tell the folder of this program")?;
    let candidate = dir.join("etcd-guard");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(format!(
            "{} not found: build it with `cargo build --release -p etcd-guard` (same target folder), or pass \
             --proxy-bin",
            candidate.display()
        )
        .into())
    }
}

/// Paths compared on the same workloads, A B A B … (or A B C A B C …): fresh proxy processes, and direct etcd
/// (no process of its own) where it is one of them.
struct Pair<'a> {
    kind: &'static str,
    workloads: &'a [Workload],
    /// Also lin-range and put at this fixed rate (1x64), after the saturation runs.
    rate: Option<f64>,
    legs: Vec<(&'a Leg, Option<&'a mut ProxyProcess>)>,
}

/// Run the workloads of `pair` at every shape through each of its paths, alternating, into `cases`.
async fn alternate(
    bench: &Bench,
    pair: Pair<'_>,
    shapes: &[Shape],
    etcd: &mut Etcd,
    etcd_pid: &str,
    admin: &tonic::transport::Channel,
    cases: &mut Vec<Case>,
) -> Result<(), BoxError> {
    let Pair { kind, workloads, rate, legs } = pair;
    let (legs, mut processes): (Vec<&Leg>, Vec<Option<&mut ProxyProcess>>) = legs.into_iter().unzip();
    let fixed = Shape { connections: 1, in_flight: 64 };
    let saturation = workloads.iter().flat_map(|&w| shapes.iter().map(move |&shape| (w, shape, None)));
    let fixed_rate = rate.into_iter().flat_map(|r| [Workload::LinRange, Workload::Put].map(|w| (w, fixed, Some(r))));
    for (workload, shape, rate) in saturation.chain(fixed_rate) {
        let mut alive = || -> Result<(), BoxError> {
            etcd.guard.check_alive()?;
            processes.iter_mut().flatten().try_for_each(|p| p.guard.check_alive())
        };
        let name = match rate {
            Some(r) => format!("{}@{r:.0}/s", workload.name()),
            None => workload.name().to_string(),
        };
        let case = bench.compare(&name, kind, workload, shape, rate, &legs, etcd_pid, &mut alive).await?;
        cases.push(case);
        if workload == Workload::Put {
            setup::compact(admin).await?;
        }
    }
    Ok(())
}

fn selected(args: &RunArgs, kind: CaseKind) -> bool {
    args.only.is_empty() || args.only.contains(&kind)
}

/// Decide what the generated configurations hold, asking the proxy binary (`config check`) what it accepts.
fn resolve_options(
    args: &RunArgs,
    bin: &Path,
    pki: &Pki,
    etcd_url: &str,
) -> Result<(ProxyOptions, AuditReport), BoxError> {
    let try_config = |audit: AuditConfig, metrics_listen: bool| {
        let options = ProxyOptions { audit, metrics_listen, answer_after: None, coalesce_watches: false };
        let path = setup::write_proxy_config(pki, "check", 1, etcd_url, "policy-small.yaml", options)
            .map_err(|e| e.to_string())?;
        setup::config_check(bin, &path)
    };
    let report = |config, note: String| AuditReport { config, note, bytes_written: 0 };
    let audit = match args.audit {
        AuditFlag::On => {
            try_config(AuditConfig::On, false)
                .map_err(|e| format!("--audit on: the proxy refuses the section: {e}"))?;
            report(AuditConfig::On, "auditing on (requested)".into())
        }
        AuditFlag::Off => {
            try_config(AuditConfig::Off, false)
                .map_err(|e| format!("--audit off: the proxy refuses the section: {e}"))?;
            report(AuditConfig::Off, "auditing explicitly off (requested)".into())
        }
        AuditFlag::Omit => report(AuditConfig::Omitted, "no audit section (requested)".into()),
        AuditFlag::Auto => match try_config(AuditConfig::On, false) {
            Ok(()) => report(AuditConfig::On, "auditing on".into()),
            Err(refusal) => {
                try_config(AuditConfig::Omitted, false)
                    .map_err(|e| format!("the proxy refuses the configuration: {e}"))?;
                eprintln!(
                    "etcd-guard-bench: WARNING: this etcd-guard does not accept an `audit` section yet; running \
                     without it: {refusal}"
                );
                report(
                    AuditConfig::Omitted,
                    format!("this etcd-guard build does not accept an `audit` section; ran without it ({refusal})"),
                )
            }
        },
    };
    let metrics_listen = try_config(audit.config, true).is_ok();
    Ok((ProxyOptions { audit: audit.config, metrics_listen, answer_after: None, coalesce_watches: false }, audit))
}

async fn run(args: RunArgs) -> Result<(), BoxError> {
    let started = Instant::now();
    let started_unix_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let proxy_bin = find_proxy_bin(&args)?;
    let tmp = tempfile::Builder::new().prefix("etcd-guard-bench-").tempdir()?;
    // With --keep-dir the folder stays, also when the run fails; otherwise it goes when `_cleanup` drops.
    let (_cleanup, work_dir) = if args.keep_dir {
        let kept = tmp.keep();
        (None, kept)
    } else {
        let path = tmp.path().to_path_buf();
        (Some(tmp), path)
    };
    let pki = Pki::generate(&work_dir)?;
    std::fs::write(pki.path("policy-small.yaml"), setup::SMALL_POLICY)?;
    let clk_tck = procfs::USER_HZ;
    let machine = Machine::probe(&args.etcd_bin, &proxy_bin, clk_tck);
    let runs = args.runs.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let duration = args.duration.unwrap_or(if args.quick { 1.5 } else { 4.0 });
    let warmup = args.warmup.unwrap_or(if args.quick { 0.5 } else { 1.0 });
    let watch_put_rate = args.watch_put_rate.unwrap_or((20_000.0 / args.watchers.max(1) as f64).max(1.0));
    let mut bench = Bench {
        exe: std::env::current_exe()?,
        pki: pki.clone(),
        clk_tck,
        warmup_ms: (warmup * 1000.0) as u64,
        duration_ms: (duration * 1000.0).max(100.0) as u64,
        runs,
        watchers: args.watchers.max(1),
        watch_put_rate,
        watch_create_window: args.watch_create_window.max(1),
        watch_puts_to: None,
        idle_conns: args.idle_conns.max(1),
        started,
    };
    let settings = Settings {
        quick: args.quick,
        runs,
        warmup_s: warmup,
        duration_s: duration,
        shapes: args.shapes.iter().map(ToString::to_string).collect(),
        watchers: bench.watchers,
        watch_put_rate,
        watch_create_window: bench.watch_create_window,
        watch_puts_direct: args.watch_puts_direct,
        idle_conns: bench.idle_conns,
        policy_roles: args.policy_roles,
        policy_rules: args.policy_roles * 10,
        rate: format!("{:?}", args.rate),
    };
    eprintln!(
        "etcd-guard-bench: {} core(s), {}; etcd {}; proxy {}; working folder {}",
        machine.nproc,
        machine.cpu_model,
        machine.etcd_version,
        proxy_bin.display(),
        work_dir.display()
    );

    let mut etcd = Etcd::start(&args.etcd_bin, &pki).await?;
    let (options, mut audit) = resolve_options(&args, &proxy_bin, &pki, &etcd.url)?;
    let mut proxy = ProxyProcess::start(&proxy_bin, &pki, "main", &etcd.url, "policy-small.yaml", options).await?;
    let admin = pki.connect(&etcd.url).await?;
    setup::preload(&admin).await?;
    eprintln!("etcd-guard-bench: etcd at {}, etcd-guard at {}, audit: {}", etcd.url, proxy.url, audit.note);

    let etcd_pid = etcd.guard.pid();
    if args.watch_puts_direct {
        bench.watch_puts_to = Some(etcd.url.clone());
    }
    let direct = Leg { label: "direct".into(), url: etcd.url.clone(), proxy_pid: None };
    let proxied = Leg::through("proxy", &proxy);
    let mut cases: Vec<Case> = Vec::new();

    // Saturation: every workload at every shape, A B A B A B.
    let workloads = [
        (CaseKind::LinRange, Workload::LinRange),
        (CaseKind::SerRange, Workload::SerRange),
        (CaseKind::Put, Workload::Put),
        (CaseKind::Mix, Workload::Mix),
        (CaseKind::Watch, Workload::Watch),
        (CaseKind::KeepAlive, Workload::KeepAlive),
        (CaseKind::LeasedPut, Workload::LeasedPut),
    ];
    for (kind, workload) in workloads {
        if !selected(&args, kind) {
            continue;
        }
        for shape in &args.shapes {
            let name = workload.name().to_string();
            let mut alive = || -> Result<(), BoxError> {
                etcd.guard.check_alive()?;
                proxy.guard.check_alive()
            };
            let case = bench
                .compare(&name, "saturation", workload, *shape, None, &[&direct, &proxied], &etcd_pid, &mut alive)
                .await?;
            cases.push(case);
            if matches!(workload, Workload::Put | Workload::Mix | Workload::Watch | Workload::LeasedPut) {
                setup::compact(&admin).await?;
            }
        }
    }

    // Fixed rate at half of saturation: the latency the proxy adds when etcd is not the bottleneck.
    if selected(&args, CaseKind::HalfRate) && args.rate != RateArg::Off {
        let shape = Shape { connections: 1, in_flight: 64 };
        for workload in [Workload::LinRange, Workload::Put] {
            let rate = match args.rate {
                RateArg::Fixed(r) => Some(r),
                _ => cases
                    .iter()
                    .filter(|c| c.kind == "saturation" && c.workload == workload.name())
                    .map(|c| c.legs[0].rps)
                    .reduce(f64::max)
                    .map(|saturation| (saturation / 2.0).round()),
            };
            let Some(rate) = rate.filter(|r| *r >= 1.0) else {
                eprintln!(
                    "etcd-guard-bench: no saturation figure for {} (select it with --only, or pass --rate N); \
                     skipping its fixed-rate case",
                    workload.name()
                );
                continue;
            };
            let name = format!("{}@{:.0}/s", workload.name(), rate);
            let mut alive = || -> Result<(), BoxError> {
                etcd.guard.check_alive()?;
                proxy.guard.check_alive()
            };
            let case = bench
                .compare(&name, "fixed-rate", workload, shape, Some(rate), &[&direct, &proxied], &etcd_pid, &mut alive)
                .await?;
            cases.push(case);
            if workload == Workload::Put {
                setup::compact(&admin).await?;
            }
        }
    }

    // Policy scale: the same proxy binary with the small policy and with a large one, alternating.
    if selected(&args, CaseKind::PolicyScale) {
        let roles = args.policy_roles.max(1);
        eprintln!("etcd-guard-bench: generating a policy of {roles} roles and {} key rules", roles * 10);
        std::fs::write(pki.path("policy-large.yaml"), setup::large_policy(roles, 10))?;
        let load_started = Instant::now();
        let mut large = ProxyProcess::start(&proxy_bin, &pki, "large", &etcd.url, "policy-large.yaml", options).await?;
        eprintln!(
            "etcd-guard-bench: the large-policy proxy answered {:.1} s after start",
            load_started.elapsed().as_secs_f64()
        );
        // Both fresh: the main proxy has served every case before, with a heap shaped by them.
        let mut small = ProxyProcess::start(&proxy_bin, &pki, "small", &etcd.url, "policy-small.yaml", options).await?;
        let small_leg = Leg::through("proxy small policy", &small);
        let large_leg = Leg::through(format!("proxy {roles} roles"), &large);
        for shape in &args.shapes {
            let mut alive = || -> Result<(), BoxError> {
                etcd.guard.check_alive()?;
                small.guard.check_alive()?;
                large.guard.check_alive()
            };
            let case = bench
                .compare(
                    "lin-range",
                    "policy-scale",
                    Workload::LinRange,
                    *shape,
                    None,
                    &[&small_leg, &large_leg],
                    &etcd_pid,
                    &mut alive,
                )
                .await?;
            cases.push(case);
        }
        drop(large);
        drop(small);
    }

    // `--rate N`: the pairs of builds or settings below are compared at that fixed rate too.
    let pair_rate = match args.rate {
        RateArg::Fixed(r) => Some(r),
        RateArg::Auto | RateArg::Off => None,
    };

    // The cost of auditing: the same binary and policy with auditing off (A) and on (B), alternating.
    if selected(&args, CaseKind::AuditCost) {
        if options.audit == AuditConfig::On {
            let off = ProxyOptions { audit: AuditConfig::Off, ..options };
            let mut quiet =
                ProxyProcess::start(&proxy_bin, &pki, "noaudit", &etcd.url, "policy-small.yaml", off).await?;
            let off_leg = Leg::through("proxy audit off", &quiet);
            // A fresh proxy for the audited side too: the main one has served every case before (its heap is
            // fragmented by the watch case), which would be measured as a cost of auditing.
            let mut audited =
                ProxyProcess::start(&proxy_bin, &pki, "audited", &etcd.url, "policy-small.yaml", options).await?;
            let on_leg = Leg::through("proxy audit on", &audited);
            let workloads = &[Workload::LinRange, Workload::Put];
            let pair = Pair {
                kind: "audit-cost",
                workloads,
                rate: pair_rate,
                legs: vec![(&off_leg, Some(&mut quiet)), (&on_leg, Some(&mut audited))],
            };
            alternate(&bench, pair, &args.shapes, &mut etcd, &etcd_pid, &admin, &mut cases).await?;
            drop(quiet);
            drop(audited);
        } else {
            eprintln!("etcd-guard-bench: auditing is not on in the main proxy; skipping the audit-cost case");
        }
    }

    // What an answer that waits for its record costs: `answer_after: queued` (A) against `written` (B), fresh
    // processes of this build, alternating.
    if selected(&args, CaseKind::AnswerAfter) {
        if options.audit == AuditConfig::On {
            let queued = ProxyOptions { answer_after: Some("queued"), ..options };
            let mut a = ProxyProcess::start(&proxy_bin, &pki, "queued", &etcd.url, "policy-small.yaml", queued).await?;
            let a_leg = Leg::through("answer after queued", &a);
            let written = ProxyOptions { answer_after: Some("written"), ..options };
            let mut b =
                ProxyProcess::start(&proxy_bin, &pki, "written", &etcd.url, "policy-small.yaml", written).await?;
            let b_leg = Leg::through("answer after written", &b);
            let pair = Pair {
                kind: "answer-after",
                workloads: &[Workload::LinRange, Workload::Put],
                rate: pair_rate,
                legs: vec![(&a_leg, Some(&mut a)), (&b_leg, Some(&mut b))],
            };
            alternate(&bench, pair, &args.shapes, &mut etcd, &etcd_pid, &admin, &mut cases).await?;
        } else {
            eprintln!("etcd-guard-bench: auditing is not on in the main proxy; skipping the answer-after case");
        }
    }

    // Watch fan-out through a proxy whose identical watches share one upstream watch (`watch.coalesce`), against
    // direct etcd: a fresh process, so the main proxy's watch rows stay those of the default configuration.
    if selected(&args, CaseKind::WatchCoalesced) {
        let coalescing = ProxyOptions { coalesce_watches: true, ..options };
        let mut shared =
            ProxyProcess::start(&proxy_bin, &pki, "coalesce", &etcd.url, "policy-small.yaml", coalescing).await?;
        let shared_leg = Leg::through("proxy coalescing", &shared);
        for shape in &args.shapes {
            let mut alive = || -> Result<(), BoxError> {
                etcd.guard.check_alive()?;
                shared.guard.check_alive()
            };
            let legs = &[&direct, &shared_leg];
            let case =
                bench.compare("watch", "coalesced", Workload::Watch, *shape, None, legs, &etcd_pid, &mut alive).await?;
            cases.push(case);
            setup::compact(&admin).await?;
        }
        drop(shared);
    }

    // The upstream leg over TCP (A) or over etcd's unix socket (B), fresh processes of this build, alternating.
    if selected(&args, CaseKind::UnixUpstream) {
        let mut tcp = ProxyProcess::start(&proxy_bin, &pki, "tcp", &etcd.url, "policy-small.yaml", options).await?;
        let tcp_leg = Leg::through("proxy, etcd over TCP", &tcp);
        let mut unix =
            ProxyProcess::start(&proxy_bin, &pki, "unix", &etcd.socket_url, "policy-small.yaml", options).await?;
        let unix_leg = Leg::through("proxy, etcd over a unix socket", &unix);
        let pair = Pair {
            kind: "unix-upstream",
            workloads: &[Workload::LinRange, Workload::Put],
            rate: pair_rate,
            legs: vec![(&tcp_leg, Some(&mut tcp)), (&unix_leg, Some(&mut unix))],
        };
        alternate(&bench, pair, &args.shapes, &mut etcd, &etcd_pid, &admin, &mut cases).await?;
    }

    // Issue #5's reference on this machine: direct etcd (A), `etcd grpc-proxy` (B) and etcd-guard (C), alternating.
    // Both proxies fresh processes, mutual TLS on both legs; grpc-proxy checks and audits nothing.
    if selected(&args, CaseKind::GrpcProxy) {
        let mut reference = setup::start_grpc_proxy(&args.etcd_bin, &pki, &etcd.url).await?;
        let reference_leg = Leg::through("etcd grpc-proxy", &reference);
        let mut guard = ProxyProcess::start(&proxy_bin, &pki, "guard", &etcd.url, "policy-small.yaml", options).await?;
        let guard_leg = Leg::through("etcd-guard", &guard);
        let pair = Pair {
            kind: "grpc-proxy",
            workloads: &[Workload::LinRange, Workload::Put],
            rate: pair_rate,
            legs: vec![(&direct, None), (&reference_leg, Some(&mut reference)), (&guard_leg, Some(&mut guard))],
        };
        alternate(&bench, pair, &args.shapes, &mut etcd, &etcd_pid, &admin, &mut cases).await?;
    }

    // Another build of etcd-guard (A) against this one (B), alternating: what a change costs or saves.
    if let Some(baseline_bin) = args.baseline_bin.as_ref().filter(|_| selected(&args, CaseKind::Baseline)) {
        let mut base =
            ProxyProcess::start(baseline_bin, &pki, "baseline", &etcd.url, "policy-small.yaml", options).await?;
        let base_leg = Leg::through("baseline proxy", &base);
        let mut this = ProxyProcess::start(&proxy_bin, &pki, "this", &etcd.url, "policy-small.yaml", options).await?;
        let this_leg = Leg::through("this proxy", &this);
        let workloads = &[Workload::LinRange, Workload::Put, Workload::Watch];
        let legs = vec![(&base_leg, Some(&mut base)), (&this_leg, Some(&mut this))];
        let pair = Pair { kind: "baseline", workloads, rate: pair_rate, legs };
        alternate(&bench, pair, &args.shapes, &mut etcd, &etcd_pid, &admin, &mut cases).await?;
    }

    // Memory per idle connection: a fresh proxy (nothing freed by earlier runs to reuse), and etcd for scale.
    let mut idle = Vec::new();
    if selected(&args, CaseKind::Idle) {
        let fresh = ProxyProcess::start(&proxy_bin, &pki, "idle", &etcd.url, "policy-small.yaml", options).await?;
        idle.push(bench.idle("proxy", &fresh.url, &fresh.guard.pid()).await?);
        drop(fresh);
        idle.push(bench.idle("etcd", &etcd.url, &etcd_pid).await?);
    }

    etcd.guard.check_alive()?;
    proxy.guard.check_alive()?;
    audit.bytes_written = audit_bytes(&work_dir);
    let targets = report::targets(&cases, &idle, bench.watchers);
    let results = Results {
        tool: "etcd-guard-bench",
        started_unix_s,
        wall_s: started.elapsed().as_secs_f64(),
        machine,
        settings,
        audit,
        proxy_options: options,
        cases,
        idle,
        targets,
    };
    std::fs::write(&args.out, serde_json::to_string_pretty(&results)?)
        .map_err(|e| format!("writing {}: {e}", args.out.display()))?;
    println!("{}", report::table(&results));
    println!("results: {}", args.out.display());
    if args.keep_dir {
        println!("working folder kept: {}", work_dir.display());
    }
    Ok(())
}

/// Bytes in the audit files the proxies wrote (in the `audit-<name>/` folders of the working folder).
fn audit_bytes(dir: &Path) -> u64 {
    let files_in = |dir: &Path| -> u64 {
        std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("audit-"))
                .map(|e| files_in(&e.path()))
                .sum()
        })
        .unwrap_or(0)
}

impl Bench {
    /// Runs alternating between the legs (A B A B …, or A B C …), `runs` times each, and their summary.
    #[allow(clippy::too_many_arguments)]
    async fn compare(
        &self,
        name: &str,
        kind: &str,
        workload: Workload,
        shape: Shape,
        rate: Option<f64>,
        legs: &[&Leg],
        etcd_pid: &str,
        alive: &mut dyn FnMut() -> Result<(), BoxError>,
    ) -> Result<Case, BoxError> {
        let mut records = Vec::new();
        for run in 0..self.runs {
            for &leg in legs {
                alive()?;
                let record = self.run_once(workload, shape, rate, leg, etcd_pid, run).await?;
                let shown = if workload == Workload::Watch { "events/s" } else { "req/s" };
                eprintln!(
                    "[{:>5.0} s] {name} {shape} {kind} {:<22} run {}: {:>9.0} {shown}, p50 {:.2} ms, p99 {:.2} ms, \
                     {} errors",
                    self.started.elapsed().as_secs_f64(),
                    leg.label,
                    run + 1,
                    record.load.rps,
                    record.load.latency.p50_us as f64 / 1000.0,
                    record.load.latency.p99_us as f64 / 1000.0,
                    record.load.errors,
                );
                for e in record.load.error_examples.iter().take(2) {
                    eprintln!("           error: {e}");
                }
                records.push(record);
            }
        }
        let labels: Vec<&str> = legs.iter().map(|l| l.label.as_str()).collect();
        Ok(Case::new(name, kind, workload, shape, rate, &labels, records))
    }

    /// One run of the load generator against one leg, with `/proc` readings of etcd and the proxy.
    async fn run_once(
        &self,
        workload: Workload,
        shape: Shape,
        rate: Option<f64>,
        leg: &Leg,
        etcd_pid: &str,
        run: usize,
    ) -> Result<RunRecord, BoxError> {
        let mut cmd = tokio::process::Command::new(&self.exe);
        cmd.arg("load")
            .args(["--endpoint", &leg.url])
            .args(self.pki.load_args(workload))
            .args(["--workload", workload.name()])
            .args(["--connections", &shape.connections.to_string()])
            .args(["--in-flight", &shape.in_flight.to_string()])
            .args(["--warmup-ms", &self.warmup_ms.to_string()])
            .args(["--duration-ms", &self.duration_ms.to_string()])
            .args(["--watchers", &self.watchers.to_string()])
            .args(["--put-rate", &self.watch_put_rate.to_string()])
            .args(["--create-window", &self.watch_create_window.to_string()])
            .args(["--seed", &(run as u64 + 1).to_string()]);
        if let Some(r) = rate {
            cmd.args(["--rate", &r.to_string()]);
        }
        if let Some(url) = &self.watch_puts_to {
            cmd.args(["--put-endpoint", url]);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit()).kill_on_drop(true);

        let mut pids = vec![etcd_pid.to_string()];
        pids.extend(leg.proxy_pid.clone());
        let peak_reset = pids.iter().all(|p| procfs::reset_peak(p));
        let sample_all = |pids: &[String]| -> Result<Vec<procfs::Sample>, BoxError> {
            pids.iter().map(|p| procfs::sample(p)).collect()
        };
        let at_start = sample_all(&pids)?;
        let mut at_watchers_ready: Option<Vec<procfs::Sample>> = None;
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().ok_or("the load generator has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let limit = Duration::from_millis(self.warmup_ms + self.duration_ms)
            + Duration::from_secs(60)
            + Duration::from_millis(10 * self.watchers as u64);
        let deadline = tokio::time::Instant::now() + limit;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut sampled_peak = vec![0u64; pids.len()];
        let mut before: Option<Vec<procfs::Sample>> = None;
        let mut after: Option<Vec<procfs::Sample>> = None;
        let mut watchers_setup_ms = None;
        let result: LoadResult = loop {
            tokio::select! {
                line = lines.next_line() => {
                    let line = line?.ok_or("the load generator ended without a result")?;
                    let event: LoadEvent = serde_json::from_str(&line)
                        .map_err(|e| format!("unexpected output from the load generator: {line:?}: {e}"))?;
                    match event {
                        LoadEvent::WatchersReady { setup_ms, .. } => {
                            watchers_setup_ms = Some(setup_ms);
                            at_watchers_ready = Some(sample_all(&pids)?);
                        }
                        LoadEvent::Measuring => before = Some(sample_all(&pids)?),
                        LoadEvent::WindowEnd => after = Some(sample_all(&pids)?),
                        LoadEvent::Result(r) => break r,
                        LoadEvent::Failed { message } => {
                            return Err(format!("load generator ({} via {}): {message}", workload.name(), leg.label).into())
                        }
                        other => return Err(format!("unexpected event from the load generator: {other:?}").into()),
                    }
                }
                _ = tick.tick() => {
                    if after.is_none() {
                        for (peak, pid) in sampled_peak.iter_mut().zip(&pids) {
                            if let Ok(s) = procfs::sample(pid) {
                                *peak = (*peak).max(s.rss_kib);
                            }
                        }
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    return Err(format!("the load generator did not finish within {limit:?}").into());
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        // A run that failed before its window opened (the watchers could not be created) has no window: its
        // CPU figures are 0.
        let (before, after) = match (before, after) {
            (Some(b), Some(a)) => (b, a),
            (None, None) if result.requests == 0 && result.errors > 0 => {
                let now = sample_all(&pids)?;
                (now.clone(), now)
            }
            _ => return Err("the load generator did not report its measured window".into()),
        };
        let figures = |i: usize| ProcFigures {
            cpu_s: after[i].cpu_ticks.saturating_sub(before[i].cpu_ticks) as f64 / self.clk_tck as f64,
            peak_rss_kib: if peak_reset { after[i].hwm_kib.max(sampled_peak[i]) } else { sampled_peak[i] },
            rss_end_kib: after[i].rss_kib,
            rss_start_kib: at_start[i].rss_kib,
            rss_watchers_ready_kib: at_watchers_ready.as_ref().map(|s| s[i].rss_kib),
        };
        Ok(RunRecord {
            leg: leg.label.clone(),
            run: run + 1,
            etcd: figures(0),
            proxy: leg.proxy_pid.as_ref().map(|_| figures(1)),
            watchers_setup_ms,
            load: result,
        })
    }

    /// Open `idle_conns` idle connections to `url` and report the server's RSS growth per connection.
    async fn idle(&self, label: &str, url: &str, pid: &str) -> Result<IdleFigures, BoxError> {
        let mut child = tokio::process::Command::new(&self.exe)
            .arg("load")
            .args(["--endpoint", url])
            .args(self.pki.load_args(Workload::Idle))
            .args(["--workload", "idle", "--idle-conns", &self.idle_conns.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let mut stdin = child.stdin.take().ok_or("the load generator has no stdin")?;
        let stdout = child.stdout.take().ok_or("the load generator has no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let limit = Duration::from_secs(60) + Duration::from_millis(20 * self.idle_conns as u64);
        match next_event(&mut lines, limit).await? {
            LoadEvent::Baseline => {}
            other => return Err(format!("idle case: expected baseline, got {other:?}").into()),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = procfs::sample(pid)?;
        stdin.write_all(b"go\n").await?;
        let (connections, setup_ms) = match next_event(&mut lines, limit).await? {
            LoadEvent::Ready { connections, setup_ms } => (connections, setup_ms),
            LoadEvent::Failed { message } => return Err(format!("idle case: {message}").into()),
            other => return Err(format!("idle case: expected ready, got {other:?}").into()),
        };
        // The set-up's CPU ends here (the second below would add the server's idle work to it).
        let ready = procfs::sample(pid)?;
        // Let the server settle (handshake buffers freed, HTTP/2 settings exchanged).
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = procfs::sample(pid)?;
        stdin.write_all(b"stop\n").await?;
        drop(stdin);
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        let delta = after.rss_kib as f64 - before.rss_kib as f64;
        let setup_cpu_s = ready.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / self.clk_tck as f64;
        let per_connection = |total: f64| if connections > 0 { total / connections as f64 } else { 0.0 };
        let figures = IdleFigures {
            server: label.to_string(),
            connections,
            setup_ms,
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
            per_connection_kib: per_connection(delta),
            setup_cpu_s,
            cpu_us_per_connection: per_connection(setup_cpu_s * 1e6),
        };
        eprintln!(
            "[{:>5.0} s] idle {label}: {connections} connections, RSS {} -> {} KiB, {:.1} KiB per connection, \
             {:.0} us CPU per connection",
            self.started.elapsed().as_secs_f64(),
            figures.rss_before_kib,
            figures.rss_after_kib,
            figures.per_connection_kib,
            figures.cpu_us_per_connection
        );
        Ok(figures)
    }
}

/// The next line of a load generator, decoded, within `limit`.
async fn next_event(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    limit: Duration,
) -> Result<LoadEvent, BoxError> {
    let line = tokio::time::timeout(limit, lines.next_line())
        .await
        .map_err(|_| format!("the load generator did not answer within {limit:?}"))??
        .ok_or("the load generator ended early")?;
    Ok(serde_json::from_str(&line).map_err(|e| format!("unexpected output {line:?}: {e}"))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_rates_parse() {
        assert_eq!("8x256".parse::<Shape>(), Ok(Shape { connections: 8, in_flight: 256 }));
        assert!("8".parse::<Shape>().is_err());
        assert!("0x5".parse::<Shape>().is_err());
        assert_eq!(Shape { connections: 1, in_flight: 64 }.to_string(), "1x64");
        assert_eq!("auto".parse::<RateArg>(), Ok(RateArg::Auto));
        assert_eq!("off".parse::<RateArg>(), Ok(RateArg::Off));
        assert_eq!("2500".parse::<RateArg>(), Ok(RateArg::Fixed(2500.0)));
        assert!("-1".parse::<RateArg>().is_err());
    }
}
