//! `etcd-guard audit review`: filter, print and summarise audit records.
//!
//! Records are read in chain order and filtered; all filters must hold. They are printed as the original lines
//! (`--output json`, the default when standard output is not a terminal), as an aligned table (`--output table`,
//! the default on a terminal), or counted (`--summary`). Review does not check hashes: use `audit verify`.
//!
//! A record is deserialized into borrowed fields, skipping everything it does not need; `ops` are only read when
//! `--key-prefix` filters on them or the table or summary shows them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::{self, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use time::format_description::well_known::Rfc3339;
use time::{Date, Duration, OffsetDateTime, Time};

use super::chain::Hasher;
use super::read::{self, AuditFile, FullRecord, LightRecord, Line, LineReader, ReadError, Record, Target};
use super::record::{clean, shown};
use super::verify::{Anchor, ProblemKind};
use crate::policy::{KeyRange, Pattern, RangeError, unescape_key};

/// Arguments of `etcd-guard audit review`.
#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    /// Audit files, or folders holding them (default: the current folder). In a folder every regular file whose
    /// name contains ".log" is read; files are read in the order of the `seq` they start with. Files compressed
    /// with gzip are read decompressed (a compressed copy beside its plain file is left out).
    pub paths: Vec<PathBuf>,
    /// Only records whose certificate CN, DNS SAN or URI SAN matches; `*` matches any run of characters.
    #[arg(long, value_name = "GLOB")]
    pub identity: Option<String>,
    /// Only records whose certificate's SHA-256 fingerprint starts with HEX (case and `:` ignored, as `openssl x509
    /// -noout -fingerprint -sha256` prints it): one certificate among others of the same name.
    #[arg(long, value_name = "HEX", value_parser = parse_fingerprint)]
    pub fingerprint: Option<String>,
    /// Only records whose certificate chains to the CA that `tls.issuers` names NAME (recorded with `tls.issuers`
    /// set): tells apart certificates of the same name from different CAs.
    #[arg(long, value_name = "NAME")]
    pub issuer: Option<String>,
    /// Only this RPC: `KV/Range`, or just the method, `Range` (case-insensitive). Repeat for any of several
    /// (`--rpc Put --rpc Txn --rpc DeleteRange`).
    #[arg(long, value_name = "RPC")]
    pub rpc: Vec<String>,
    /// Only records with this decision.
    #[arg(long, value_enum)]
    pub decision: Option<DecisionArg>,
    /// Only records with an operation on a key that starts with PREFIX (`\xNN` escapes give any byte, `\\` a
    /// backslash); intervals and lock/election names count when they overlap those keys, a lease revoke always
    /// (it deletes the lease's keys, which its record does not name).
    #[arg(long, value_name = "PREFIX", value_parser = parse_key_prefix)]
    pub key_prefix: Option<KeyPrefix>,
    /// Only records naming this lease, in hex as etcdctl prints and takes it (`694d7a0e7bd5d60a`): its revoke,
    /// keep-alives and time-to-live, its grant, puts, locks and campaigns attached to it, txn compares on it.
    #[arg(long, value_name = "ID", value_parser = parse_lease, allow_hyphen_values = true)]
    pub lease: Option<i64>,
    /// Only records of requests that change keys, allowed or not: put, delete (also in a txn's branches, whichever
    /// ran; a txn whose record left ops out counts), lease revoke (it deletes the lease's keys), lock, unlock,
    /// campaign, proclaim, resign; and, by their RPC, summary records of denied calls and records of calls refused
    /// before their message was read.
    #[arg(long)]
    pub writes: bool,
    /// Only records at or after TIME: RFC 3339 (`2026-11-22T10:00:00Z`), a date (`2026-11-22`, midnight UTC), or a
    /// duration before now (`15m`, `2h`, `7d`, `1h30m`; units s, m, h, d, w).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub since: Option<OffsetDateTime>,
    /// Only records at or before TIME (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = parse_time_arg)]
    pub until: Option<OffsetDateTime>,
    /// How to print: `json` prints the matching lines unchanged; `table` aligned columns (KEY: the first key,
    /// `P*` for every key starting with P, `[A, B)` for an interval, `+N` more). Default: table on a terminal,
    /// json otherwise.
    #[arg(long, value_enum)]
    pub output: Option<OutputFormat>,
    /// Print counts per identity, RPC and decision, and the most denied keys, instead of records.
    #[arg(long)]
    pub summary: bool,
    /// The HMAC key the chain is keyed with (the file named by the proxy's `audit.hmac_key_file`), to verify the
    /// chain after the review as `audit verify` does. After a key change, every key, oldest first.
    #[arg(long, value_name = "FILE")]
    pub hmac_key: Vec<PathBuf>,
    /// The chain starts without a key (written before its first `audit change-key`), as for `audit verify`.
    #[arg(long, requires = "hmac_key")]
    pub unkeyed_before: bool,
    /// A record's seq and hash kept outside the log (`SEQ:HASH`), that the chain must hold, as for `audit verify`
    /// (of a keyed log, only with `--hmac-key`).
    #[arg(long, value_name = "SEQ:HASH", conflicts_with = "no_verify")]
    pub anchor: Vec<Anchor>,
    /// Do not verify the chain after the review.
    #[arg(long)]
    pub no_verify: bool,
}

/// A decision to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DecisionArg {
    /// Allowed and served.
    Allow,
    /// Denied.
    Deny,
    /// Denied by an `audit-only` binding, but served.
    #[value(name = "would_deny", alias = "would-deny")]
    WouldDeny,
}

/// How to print.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Aligned columns (or plain text for --summary).
    Table,
    /// The original lines (or one JSON object for --summary).
    Json,
}

/// The bytes of `--key-prefix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPrefix(pub Vec<u8>);

/// A `--since`/`--until` value that is not a time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimeArgError {
    /// None of the accepted forms.
    #[error(
        "{text:?} is not a time: use RFC 3339 (2026-11-22T10:00:00Z), a date (2026-11-22) or a duration (15m, 2h, 7d)"
    )]
    Unrecognised {
        /// The argument.
        text: String,
    },
    /// A duration too large to subtract from now.
    #[error("{text:?} is too long ago")]
    OutOfRange {
        /// The argument.
        text: String,
    },
}

/// Why review failed.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// An audit file could not be read.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// Standard output could not be written.
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

/// What records to keep.
#[derive(Debug, Default)]
pub struct Filter {
    /// Matches the CN or any DNS or URI SAN.
    pub identity: Option<Pattern>,
    /// The certificate's fingerprint starts with this (lowercase hex).
    pub fingerprint: Option<String>,
    /// The certificate chains to the CA of this `tls.issuers` name.
    pub issuer: Option<String>,
    /// Any of these: `Service/Method`, or just `Method` (no `/`); compared case-insensitively. None: every RPC.
    pub rpc: Vec<String>,
    /// `allow`, `deny` or `would_deny`.
    pub decision: Option<DecisionArg>,
    /// Some operation's keys overlap this range.
    pub keys: Option<KeyRange>,
    /// Some operation changes keys ([`read::Op::writes`]).
    pub writes: bool,
    /// Some operation names this lease.
    pub lease: Option<i64>,
    /// At or after.
    pub since: Option<OffsetDateTime>,
    /// At or before.
    pub until: Option<OffsetDateTime>,
}

/// What to do with the matching records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Print each matching line unchanged.
    Lines,
    /// Print an aligned table.
    Table,
    /// Print counts as text.
    SummaryText,
    /// Print counts as one JSON object.
    SummaryJson,
}

/// Counts from one review.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Lines read.
    pub lines: u64,
    /// Records that matched.
    pub matched: u64,
    /// Lines that were not records and were skipped.
    pub skipped: u64,
    /// Where the first skipped line is (`path:line`).
    pub first_skipped: Option<String>,
}

/// Where matching records go.
enum Sink<'w> {
    Lines(&'w mut dyn Write),
    Table(Table<'w>),
    Summary { out: &'w mut dyn Write, json: bool, summary: Summary },
}

/// Table output: the first [`Table::SAMPLE`] rows fix the column widths; later cells are cut to them.
struct Table<'w> {
    out: &'w mut dyn Write,
    rows: Vec<[String; COLUMNS]>,
    widths: Option<[usize; COLUMNS]>,
}

const COLUMNS: usize = 8;
const HEADERS: [&str; COLUMNS] = ["TIME", "SEQ", "IDENTITY", "RPC", "DECISION", "CODE", "KEY", "REASON"];
/// Widest a column gets (in characters); longer cells are cut with `…`.
const MAX_WIDTHS: [usize; COLUMNS] = [27, 20, 40, 28, 10, 18, 48, 100];

/// Counts per identity × RPC × decision, and per denied key.
#[derive(Debug, Default)]
pub struct Summary {
    /// Each identity (its name, and its issuer names when the log has them), RPC and decision text seen, numbered.
    numbers: HashMap<String, usize>,
    /// The name, issuers and the name's field of each identity's number.
    identities: HashMap<usize, (String, Vec<String>, &'static str)>,
    /// The texts by number.
    texts: Vec<String>,
    /// (identity, rpc, decision) numbers → count.
    counts: HashMap<[usize; 3], u64>,
    /// key or interval text → denied records naming it; at most [`DENIED_KEYS_KEPT`] keys, counted as Misra and
    /// Gries count frequent items: once full, a key not in it takes one off every count instead (and keys that
    /// reach 0 leave). Each count is then low by at most `denied_total / (DENIED_KEYS_KEPT + 1)`.
    denied: HashMap<String, u64>,
    /// Keys counted into `denied` (each denied record's keys once).
    denied_total: u64,
    /// Counts were taken off: they are floors, within the bound above.
    denied_pruned: bool,
    /// Matching records.
    records: u64,
    /// The requests they stand for (a summary record stands for its `count`).
    requests: u64,
}

/// `--fingerprint`: hex digits of a SHA-256 fingerprint (or its start), `:` and case ignored (as `openssl x509
/// -fingerprint -sha256` prints them), lowercase.
fn parse_fingerprint(text: &str) -> Result<String, String> {
    let hex: String = text.chars().filter(|&c| c != ':').map(|c| c.to_ascii_lowercase()).collect();
    if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{text:?} is not a (start of a) hex fingerprint, e.g. 3F:00:A1 or 3f00a1"));
    }
    if hex.len() > 64 {
        return Err(format!("{text:?} is longer than a SHA-256 fingerprint (64 hex digits)"));
    }
    Ok(hex)
}

/// How many of the most denied keys the summary lists.
const TOP_DENIED: usize = 20;

/// How many distinct denied keys the summary counts at once (a log of millions of distinct denied keys would
/// otherwise take gigabytes to summarise). Past it the counts are approximate, within a bound the output gives.
const DENIED_KEYS_KEPT: usize = 100_000;

/// Run `audit review`: 0 when the files were read (whether or not anything matched), 1 when they were but their
/// chain does not verify (the records shown may have been altered; see `verified`), 2 on errors.
pub fn run(args: ReviewArgs) -> ExitCode {
    // The key first: a wrong path is an error before anything is printed.
    let keys = match super::verify::keys_or_report(&args.hmac_key, args.unkeyed_before, &args.anchor) {
        Ok(keys) => keys,
        Err(code) => return code,
    };
    let files = match read::audit_files_or_report(&args.paths) {
        Ok(files) => files,
        Err(code) => return code,
    };
    for rpc in args.rpc.iter().filter(|rpc| !is_known_rpc(rpc)) {
        eprintln!(
            "etcd-guard: note: --rpc {rpc:?} names no RPC etcd-guard records (e.g. KV/Range or Range, \
             Watch/Watch, Lease/LeaseKeepAlive, etcd-guard/AuditOpen; case does not matter)"
        );
    }
    let filter = Filter {
        identity: args.identity.as_deref().map(Pattern::new),
        fingerprint: args.fingerprint,
        issuer: args.issuer,
        rpc: args.rpc,
        decision: args.decision,
        keys: args.key_prefix.map(|p| KeyRange::prefix(p.0)),
        writes: args.writes,
        lease: args.lease,
        since: args.since,
        until: args.until,
    };
    let format =
        args.output.unwrap_or(if io::stdout().is_terminal() { OutputFormat::Table } else { OutputFormat::Json });
    let mode = match (args.summary, format) {
        (false, OutputFormat::Json) => Mode::Lines,
        (false, OutputFormat::Table) => Mode::Table,
        (true, OutputFormat::Table) => Mode::SummaryText,
        (true, OutputFormat::Json) => Mode::SummaryJson,
    };
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    let result = review(&files, &filter, mode, &mut out).and_then(|stats| {
        out.flush().map_err(ReviewError::Output)?;
        Ok(stats)
    });
    match result {
        Ok(stats) => {
            if stats.matched == 0 && mode == Mode::Table {
                eprintln!("etcd-guard: no records matched ({} lines read)", stats.lines);
            }
            if stats.skipped > 0 {
                eprintln!(
                    "etcd-guard: note: skipped {} line(s) that are not audit records (the first at {}); \
                     run `etcd-guard audit verify`",
                    stats.skipped,
                    stats.first_skipped.as_deref().unwrap_or("?")
                );
            }
            if args.no_verify {
                return ExitCode::SUCCESS;
            }
            verified(&files, &keys, &args.anchor)
        }
        // `… | head` closed the pipe: nothing more is wanted.
        Err(ReviewError::Output(e)) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-guard: {e}");
            ExitCode::from(2)
        }
    }
}

/// What verifying the chain after a review found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verification {
    /// The chain verifies.
    Verified,
    /// Not checked: without a key the first hash does not verify, which is what an HMAC-keyed chain looks like
    /// (the message says what verify found, in case it is not).
    Keyed(String),
    /// It verifies up to a last line without its newline, which a log being written can show for a moment.
    Unfinished(String),
    /// It does not verify: verify's problem (`altered: …`, `removed: …`, `inserted: …`), and the records in order
    /// before it.
    Failed(String, u64),
    /// The files hold no record at all (and no proxy is opening them): nothing was verified.
    Empty,
}

/// Verify the chain of `files` after a review (as `audit verify` does, with `keys` or unkeyed), so that a reviewer
/// does not take altered records at their word. Without a key, a chain whose first hash does not verify unkeyed is
/// taken for an HMAC-keyed one, whose hashes cannot be checked without its key — unless some other line verifies
/// unkeyed: then it is an unkeyed chain whose first records were altered. A last line without its newline is
/// noted only while a proxy writes the folder (holds its lock); otherwise it is what became of an altered record.
///
/// # Errors
///
/// A file cannot be read.
pub fn verification(files: &[AuditFile], keys: &[Hasher], anchors: &[Anchor]) -> Result<Verification, ReadError> {
    let unkeyed = Hasher::unkeyed();
    let report = super::verify::verify_anchored(files, keys, anchors)?;
    let written_now = || files.last().is_some_and(|f| being_written(&f.path));
    Ok(match report.problem {
        // A log a proxy is opening this very moment has its `open` record on the way.
        None if report.records == 0 && !written_now() => Verification::Empty,
        None => Verification::Verified,
        Some(p)
            if keys.is_empty()
                && report.records == 0
                && p.kind == ProblemKind::Altered
                && !super::verify::any_line_verifies(files, &unkeyed)? =>
        {
            if anchors.is_empty() {
                Verification::Keyed(p.message)
            } else {
                // Anchors cannot be checked without the key: the chain is not shown to hold them.
                let message =
                    format!("the anchors cannot be checked without the log's HMAC key: pass --hmac-key ({p})");
                Verification::Failed(message, 0)
            }
        }
        Some(p) if p.unfinished_last_line && written_now() => Verification::Unfinished(p.message),
        Some(p) => Verification::Failed(p.to_string(), report.records),
    })
}

/// Whether a proxy is writing the folder of `file` now (it holds the folder's lock, `audit::writer`).
fn being_written(file: &std::path::Path) -> bool {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(dir).is_ok_and(|d| matches!(d.try_lock_shared(), Err(std::fs::TryLockError::WouldBlock)))
}

/// [`verification`], told on standard error: 1 if the chain does not verify.
fn verified(files: &[AuditFile], keys: &[Hasher], anchors: &[Anchor]) -> ExitCode {
    match verification(files, keys, anchors) {
        Ok(Verification::Verified) => ExitCode::SUCCESS,
        Ok(Verification::Keyed(message)) => {
            eprintln!(
                "etcd-guard: note: the records were not verified: the first one's hash does not verify without a \
                 key (an HMAC-keyed chain: pass --hmac-key to verify it; else: {message})"
            );
            ExitCode::SUCCESS
        }
        Ok(Verification::Unfinished(message)) => {
            eprintln!(
                "etcd-guard: note: the chain verifies up to its last line, which has no newline yet (a proxy is \
                 writing this folder; `etcd-guard audit verify` again to be sure): {message}"
            );
            ExitCode::SUCCESS
        }
        Ok(Verification::Empty) => {
            eprintln!("etcd-guard: warning: no records in these files: {}", super::verify::NOTHING_VERIFIED);
            ExitCode::from(1)
        }
        Ok(Verification::Failed(message, in_order)) => {
            eprintln!(
                "etcd-guard: warning: the audit chain does not verify, so the records above may have been altered, \
                 added or removed: {message} ({in_order} records in order before it; `etcd-guard audit verify` for \
                 the details)"
            );
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("etcd-guard: {e}");
            ExitCode::from(2)
        }
    }
}

/// Read `files` in order and send the records `filter` keeps to `out` as `mode` says.
///
/// # Errors
///
/// A file cannot be read, or `out` cannot be written.
pub fn review(files: &[AuditFile], filter: &Filter, mode: Mode, out: &mut dyn Write) -> Result<Stats, ReviewError> {
    let mut stats = Stats::default();
    let mut sink = match mode {
        Mode::Lines => Sink::Lines(out),
        Mode::Table => Sink::Table(Table { out, rows: Vec::new(), widths: None }),
        Mode::SummaryText => Sink::Summary { out, json: false, summary: Summary::default() },
        Mode::SummaryJson => Sink::Summary { out, json: true, summary: Summary::default() },
    };
    for file in files {
        let unreadable = |source| ReadError::Unreadable { path: shown(&file.path), source };
        let mut reader = LineReader::open(&file.path).map_err(unreadable)?;
        while let Some((number, line)) = reader.next_line().map_err(unreadable)? {
            stats.lines += 1;
            let bytes = match line {
                Line::Complete(b) | Line::Partial(b) => b,
                Line::TooLong { .. } => &[][..],
            };
            // Some(kept or not), None: not a record.
            let kept: Option<bool> = if filter.needs_ops() {
                // The ops decide: read them with the rest.
                match serde_json::from_slice::<FullRecord<'_>>(bytes) {
                    Ok(record) => {
                        let targets = record.targets();
                        let keep = filter.keeps(&record) && filter.keeps_ops(&record, &targets);
                        if keep {
                            sink.take(bytes, &record, &targets).map_err(ReviewError::Output)?;
                        }
                        Some(keep)
                    }
                    Err(_) => None,
                }
            } else {
                match serde_json::from_slice::<LightRecord<'_>>(bytes) {
                    Ok(record) => {
                        let keep = filter.keeps(&record);
                        if keep {
                            if sink.wants_targets(&record) {
                                // Read again, with the ops; if they have an unexpected shape, show none.
                                let full = serde_json::from_slice::<FullRecord<'_>>(bytes).ok();
                                let targets = full.as_ref().map(FullRecord::targets).unwrap_or_default();
                                sink.take(bytes, &record, &targets)
                            } else {
                                sink.take(bytes, &record, &[])
                            }
                            .map_err(ReviewError::Output)?;
                        }
                        Some(keep)
                    }
                    Err(_) => None,
                }
            };
            match kept {
                Some(true) => stats.matched += 1,
                Some(false) => {}
                None => {
                    stats.skipped += 1;
                    if stats.first_skipped.is_none() {
                        stats.first_skipped = Some(format!("{}:{number}", shown(&file.path)));
                    }
                }
            }
        }
    }
    sink.finish().map_err(ReviewError::Output)?;
    Ok(stats)
}

/// `--lease` parser: hex as etcdctl takes it (`strconv.ParseInt(id, 16, 64)`), also after `0x`; not 0 (no lease).
///
/// A negative ID is `-` and its magnitude, as etcdctl prints it; 16 digits above `7fff…` are taken as the
/// two's-complement bits (how a negative ID reads elsewhere).
fn parse_lease(text: &str) -> Result<i64, String> {
    let digits = text.strip_prefix("0x").unwrap_or(text);
    let parsed = match i64::from_str_radix(digits, 16) {
        Err(_) if !digits.starts_with(['-', '+']) => u64::from_str_radix(digits, 16).map(|bits| bits as i64),
        parsed => parsed,
    };
    match parsed {
        Ok(0) => Err("0 is no lease".to_owned()),
        Ok(lease) => Ok(lease),
        Err(e) => Err(format!("{text:?} is not a lease ID in hex, as etcdctl prints it (694d7a0e7bd5d60a): {e}")),
    }
}

/// `--key-prefix` parser.
fn parse_key_prefix(text: &str) -> Result<KeyPrefix, RangeError> {
    unescape_key(text).map(KeyPrefix)
}

/// `--since`/`--until` parser, relative to now.
fn parse_time_arg(text: &str) -> Result<OffsetDateTime, TimeArgError> {
    parse_time(text, OffsetDateTime::now_utc())
}

/// Parse an RFC 3339 time, a date (`YYYY-MM-DD`, midnight UTC), or a duration before `now` (`15m`, `2h`, `7d`,
/// `1h30m`; units `s`, `m`, `h`, `d`, `w`).
///
/// # Errors
///
/// None of these forms, or a duration reaching before the representable range.
pub fn parse_time(text: &str, now: OffsetDateTime) -> Result<OffsetDateTime, TimeArgError> {
    let text = text.trim();
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    if let Ok(d) = Date::parse(text, &date_format) {
        return Ok(d.with_time(Time::MIDNIGHT).assume_utc());
    }
    let duration = parse_duration(text).ok_or_else(|| TimeArgError::Unrecognised { text: text.to_owned() })?;
    now.checked_sub(duration).ok_or_else(|| TimeArgError::OutOfRange { text: text.to_owned() })
}

/// `15m`, `2h`, `1h30m`, …; `None` if not such a duration.
fn parse_duration(text: &str) -> Option<Duration> {
    let mut total: i64 = 0;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        let number: i64 = rest.get(..digits)?.parse().ok()?;
        let unit = rest.get(digits..)?.chars().next()?;
        let seconds = match unit {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return None,
        };
        total = total.checked_add(number.checked_mul(seconds)?)?;
        rest = rest.get(digits + 1..)?;
    }
    Some(Duration::seconds(total))
}

// === impl Filter ===

impl Filter {
    /// Whether the filters other than `keys` keep `record`. Cheap ones first.
    pub fn keeps<O>(&self, record: &Record<'_, O>) -> bool {
        if self.decision.is_some_and(|d| record.decision() != d.as_str()) {
            return false;
        }
        if !self.rpc.is_empty() && !self.rpc.iter().any(|rpc| rpc_matches(rpc, record.rpc())) {
            return false;
        }
        if let Some(pattern) = &self.identity
            && !record.identity.as_ref().is_some_and(|id| id.any_name(|name| pattern.matches(name)))
        {
            return false;
        }
        if let Some(prefix) = &self.fingerprint
            && !record
                .identity
                .as_ref()
                .and_then(|id| id.fingerprint_sha256.as_ref())
                .is_some_and(|f| f.starts_with(prefix.as_str()))
        {
            return false;
        }
        if let Some(issuer) = &self.issuer
            && !record.identity.as_ref().is_some_and(|id| id.issuers.iter().any(|i| i.as_str() == issuer))
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(t) = record.time.as_ref().and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok()) else {
                return false;
            };
            if self.since.is_some_and(|since| t < since) || self.until.is_some_and(|until| t > until) {
                return false;
            }
        }
        true
    }

    /// Whether the keys named by a record's operations overlap `keys` (true when there is no such filter).
    pub fn keeps_targets(&self, targets: &[Target<'_>]) -> bool {
        match &self.keys {
            None => true,
            Some(keys) => targets.iter().any(|t| t.range().is_some_and(|range| range.intersects(keys))),
        }
    }

    /// Whether a filter looks at the operations ([`Filter::keeps_ops`]), so that records must be read with them.
    pub fn needs_ops(&self) -> bool {
        self.keys.is_some() || self.writes || self.lease.is_some()
    }

    /// Whether a record's operations (`targets`: their keys) pass the filters on them: keys, writes, lease.
    pub fn keeps_ops(&self, record: &FullRecord<'_>, targets: &[Target<'_>]) -> bool {
        self.keeps_targets(targets)
            && (!self.writes || record.writes())
            && self.lease.is_none_or(|lease| {
                // Ops the record left out could name any lease, as any key.
                record.leases().contains(&lease) || targets.iter().any(|t| matches!(t, Target::Omitted(_)))
            })
    }
}

/// Whether `--rpc wanted` matches an RPC records can name: etcd's (as `service::rpc_name` writes them), `Unknown`,
/// and the writer's own.
fn is_known_rpc(wanted: &str) -> bool {
    let etcd = etcd_guard_proto::methods::ALL.iter().map(|path| crate::service::rpc_name(path));
    let own = super::writer::OWN_RPCS.into_iter().chain([crate::service::UNKNOWN_RPC]);
    etcd.chain(own).any(|rpc| rpc_matches(wanted, rpc))
}

/// `KV/Range` against `kv/range` or `range`.
fn rpc_matches(wanted: &str, rpc: &str) -> bool {
    if wanted.contains('/') {
        rpc.eq_ignore_ascii_case(wanted)
    } else {
        rpc.rsplit('/').next().is_some_and(|method| method.eq_ignore_ascii_case(wanted))
    }
}

// === impl DecisionArg ===

impl DecisionArg {
    /// As written in records.
    pub fn as_str(self) -> &'static str {
        match self {
            DecisionArg::Allow => "allow",
            DecisionArg::Deny => "deny",
            DecisionArg::WouldDeny => "would_deny",
        }
    }
}

// === impl Sink ===

impl Sink<'_> {
    /// Whether [`Sink::take`] shows the keys of `record`.
    fn wants_targets<O>(&self, record: &Record<'_, O>) -> bool {
        match self {
            Sink::Lines(_) => false,
            Sink::Table(_) => true,
            Sink::Summary { .. } => record.is_denial(),
        }
    }

    /// Handle one matching record; `line` is its text, `targets` the keys of its operations (empty unless
    /// [`Sink::wants_targets`]).
    fn take<O>(&mut self, line: &[u8], record: &Record<'_, O>, targets: &[Target<'_>]) -> io::Result<()> {
        match self {
            Sink::Lines(out) => {
                out.write_all(line)?;
                out.write_all(b"\n")
            }
            Sink::Table(table) => table.push(row(record, targets)),
            Sink::Summary { summary, .. } => {
                summary.add(record, targets);
                Ok(())
            }
        }
    }

    /// Print what was held back.
    fn finish(self) -> io::Result<()> {
        match self {
            Sink::Lines(_) => Ok(()),
            Sink::Table(mut table) => table.finish(),
            Sink::Summary { out, json: false, summary } => summary.write_text(out),
            Sink::Summary { out, json: true, summary } => summary.write_json(out),
        }
    }
}

/// The table cells of a record.
fn row<O>(record: &Record<'_, O>, targets: &[Target<'_>]) -> [String; COLUMNS] {
    let text = |t: &Option<read::Text<'_>>| t.as_ref().map_or_else(|| "-".to_owned(), |t| clean(t));
    // Ops the record left out come last; the cell says how many, after the keys it shows.
    let omitted: u64 = targets.iter().map(|t| if let Target::Omitted(n) = t { *n } else { 0 }).sum();
    let named: Vec<&Target<'_>> = targets.iter().filter(|t| !matches!(t, Target::Omitted(_))).collect();
    let mut key = match named.as_slice() {
        [] => "-".to_owned(),
        [only] => clean(&only.to_string()),
        [first, rest @ ..] => format!("{} +{}", clean(&first.to_string()), rest.len()),
    };
    if omitted > 0 {
        key.push_str(&format!(" ({omitted} ops omitted)"));
    }
    [
        text(&record.time),
        record.seq.to_string(),
        identity_cell(record.identity_label()),
        text(&record.rpc),
        text(&record.decision),
        text(&record.code),
        key,
        record.reason.as_ref().map_or_else(String::new, |r| clean(r)),
    ]
}

/// An identity's name for a table: as it is when it is printable ASCII without spaces, quotes or brackets; else
/// quoted, with every character but printable ASCII and the space escaped (`"\u{430}pp-a"`, `"app-a "`), so that no
/// name can pass for another by look-alike letters, spaces a column does not show, or a suffix the table adds
/// itself (`(uri_san)`, `[issuer etcd]`).
fn identity_cell(name: &str) -> String {
    let plain = |c: char| c.is_ascii_graphic() || c == ' ';
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_graphic() && !matches!(c, '"' | '(' | '[')) {
        return name.to_owned();
    }
    let mut out = String::from('"');
    for c in name.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if plain(c) => out.push(c),
            c => out.push_str(&format!("\\u{{{:x}}}", u32::from(c))),
        }
    }
    out.push('"');
    out
}

/// `text` cut to at most `width` characters, ending in `…` when cut.
fn fit(text: &str, width: usize) -> Cow<'_, str> {
    if text.chars().count() <= width {
        return text.into();
    }
    let mut out: String = text.chars().take(width.saturating_sub(1)).collect();
    // Never end inside an escape (`\u{202e}`, `\x2a`, `\\`): half of one could read as something else.
    let mut at = 0;
    while let Some(start) = out[at..].find('\\').map(|i| at + i) {
        let rest = &out[start..];
        let len = if rest.starts_with("\\u") {
            rest.find('}').map(|end| end + 1)
        } else if rest.starts_with("\\x") {
            (rest.len() >= 4).then_some(4)
        } else {
            (rest.len() >= 2).then_some(2)
        };
        match len {
            Some(len) => at = start + len,
            None => {
                out.truncate(start);
                break;
            }
        }
    }
    out.push('…');
    out.into()
}

/// Write one row of `cells` in columns of `widths`; `right` says which columns are right-aligned. The last
/// column is not padded.
fn write_columns(out: &mut dyn Write, widths: &[usize], right: &[bool], cells: &[&str]) -> io::Result<()> {
    let mut line = String::new();
    let last = cells.len().saturating_sub(1);
    for (i, cell) in cells.iter().enumerate() {
        let width = widths.get(i).copied().unwrap_or(0);
        let cell = fit(cell, width);
        let pad = width.saturating_sub(cell.chars().count());
        if i > 0 {
            line.push_str("  ");
        }
        if right.get(i).copied().unwrap_or(false) {
            line.extend(std::iter::repeat_n(' ', pad));
            line.push_str(&cell);
        } else {
            line.push_str(&cell);
            if i < last {
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
    }
    line.truncate(line.trim_end().len());
    line.push('\n');
    out.write_all(line.as_bytes())
}

/// Column widths fitting `header` and `rows`, each at most `max`.
fn widths_for<'r>(header: &[&str], rows: impl Iterator<Item = &'r [String]>, max: &[usize]) -> Vec<usize> {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for (w, m) in widths.iter_mut().zip(max) {
        *w = (*w).min(*m).max(1);
    }
    widths
}

/// The cells of a row as `&str`.
fn cells<const N: usize>(row: &[String; N]) -> [&str; N] {
    row.each_ref().map(String::as_str)
}

// === impl Table ===

impl Table<'_> {
    /// Rows held back to size the columns.
    const SAMPLE: usize = 1000;
    /// Right-aligned columns (seq).
    const RIGHT: [bool; COLUMNS] = [false, true, false, false, false, false, false, false];

    fn push(&mut self, row: [String; COLUMNS]) -> io::Result<()> {
        match &self.widths {
            Some(widths) => write_columns(self.out, widths, &Self::RIGHT, &cells(&row)),
            None => {
                self.rows.push(row);
                if self.rows.len() >= Self::SAMPLE { self.flush_sample() } else { Ok(()) }
            }
        }
    }

    /// Fix the widths from the rows held back, and print the header and them.
    fn flush_sample(&mut self) -> io::Result<()> {
        let found = widths_for(&HEADERS, self.rows.iter().map(|r| &r[..]), &MAX_WIDTHS);
        let mut widths = [0; COLUMNS];
        for (w, f) in widths.iter_mut().zip(found) {
            *w = f;
        }
        write_columns(self.out, &widths, &Self::RIGHT, &HEADERS)?;
        for row in std::mem::take(&mut self.rows) {
            write_columns(self.out, &widths, &Self::RIGHT, &cells(&row))?;
        }
        self.widths = Some(widths);
        Ok(())
    }

    fn finish(&mut self) -> io::Result<()> {
        if self.widths.is_none() && !self.rows.is_empty() {
            self.flush_sample()?;
        }
        Ok(())
    }
}

// === impl Summary ===

/// One line of the summary.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Count {
    /// CN, else first URI SAN, else first DNS SAN (what `--identity` takes).
    pub identity: String,
    /// Which field `identity` comes from: `common_name`, `uri_san`, `dns_san` (`""` for records without one).
    pub from: &'static str,
    /// The `tls.issuers` names its certificate chains to, when the log records them: one name from different CAs
    /// is counted apart (the table shows them in brackets after the name).
    pub issuers: Vec<String>,
    /// `Service/Method`.
    pub rpc: String,
    /// The decision.
    pub decision: String,
    /// Requests of the matching records (a summary record, `"event":"summary"`, counts its `count`).
    pub count: u64,
}

/// A denied key (or interval) and how many denied records named it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeniedKey {
    /// As the key column shows it.
    pub key: String,
    /// Denied records.
    pub count: u64,
}

/// Widest a summary column gets (an identity with its issuers: a SPIFFE ID and a CA name fit).
const SUMMARY_MAX_WIDTHS: [usize; 4] = [20, 100, 40, 12];

// === impl Count ===

impl Count {
    /// The identity as the table shows it: its name ([`identity_cell`]), with the field it comes from when
    /// another identity has the same name from another field, then the issuers in brackets (`name [issuer etcd]`).
    fn label(&self, with_field: bool) -> String {
        let mut name = identity_cell(&self.identity);
        if with_field {
            name = format!("{name} ({})", self.from);
        }
        match self.issuers.as_slice() {
            [] => name,
            [one] => format!("{name} [issuer {}]", clean(one)),
            many => format!("{name} [issuers {}]", clean(&many.join(", "))),
        }
    }
}

impl Summary {
    /// Count `record`; `targets` are its keys (needed for denials only).
    pub fn add<O>(&mut self, record: &Record<'_, O>, targets: &[Target<'_>]) {
        self.records += 1;
        // `count` comes from the file: added without overflowing, whatever it says.
        self.requests = self.requests.saturating_add(record.requests());
        // One name from different CAs is counted apart: the key is the name and the issuer names, each after its
        // length (so that no name, whatever it holds, reads as another name and issuer).
        // The field the name comes from too: a CN that reads like a SPIFFE ID is not that workload.
        let (name, issuers) = (record.identity_label(), record.identity.as_ref().map_or(&[][..], |i| &i.issuers[..]));
        let source = record.identity_source();
        let key = issuers.iter().fold(format!("{source}:{}:{name}", name.len()), |key, issuer| {
            format!("{key}{}:{}", issuer.as_str().len(), issuer.as_str())
        });
        let identity = self.number(&key);
        self.identities
            .entry(identity)
            .or_insert_with(|| (name.to_owned(), issuers.iter().map(|n| n.as_str().to_owned()).collect(), source));
        let key = [identity, self.number(record.rpc()), self.number(record.decision())];
        let count = self.counts.entry(key).or_default();
        *count = count.saturating_add(record.requests());
        if record.is_denial() {
            // Omitted ops name no key of their own to count.
            let mut keys: Vec<String> = targets
                .iter()
                .filter(|t| !matches!(t, Target::Omitted(_) | Target::Lease(_)))
                .map(ToString::to_string)
                .collect();
            keys.sort_unstable();
            keys.dedup();
            for key in keys {
                self.count_denied(key);
            }
        }
    }

    /// One more denied record naming `key`. A full table takes one off every count instead of adding `key`: each
    /// such step takes as much off as DENIED_KEYS_KEPT additions put on, so its cost is paid for.
    fn count_denied(&mut self, key: String) {
        self.denied_total = self.denied_total.saturating_add(1);
        if let Some(count) = self.denied.get_mut(&key) {
            *count += 1;
        } else if self.denied.len() < DENIED_KEYS_KEPT {
            self.denied.insert(key, 1);
        } else {
            self.denied.retain(|_, count| {
                *count -= 1;
                *count > 0
            });
            self.denied_pruned = true;
        }
    }

    /// How much any count of the most denied keys may be low by.
    fn denied_error(&self) -> u64 {
        if self.denied_pruned { self.denied_total / (DENIED_KEYS_KEPT as u64 + 1) } else { 0 }
    }

    /// The number of `text`, allocating only for a new one.
    fn number(&mut self, text: &str) -> usize {
        if let Some(&n) = self.numbers.get(text) {
            return n;
        }
        let n = self.texts.len();
        self.texts.push(text.to_owned());
        self.numbers.insert(text.to_owned(), n);
        n
    }

    /// Records counted.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Counts per identity × RPC × decision, most first.
    pub fn counts(&self) -> Vec<Count> {
        let text = |n: usize| self.texts.get(n).cloned().unwrap_or_default();
        let mut out: Vec<Count> = self
            .counts
            .iter()
            .map(|(&[identity, rpc, decision], &count)| Count {
                identity: self
                    .identities
                    .get(&identity)
                    .map(|(name, _, _)| name.clone())
                    .unwrap_or_else(|| text(identity)),
                issuers: self.identities.get(&identity).map(|(_, issuers, _)| issuers.clone()).unwrap_or_default(),
                from: self.identities.get(&identity).map_or("", |(_, _, source)| source),
                rpc: text(rpc),
                decision: text(decision),
                count,
            })
            .collect();
        out.sort_by(|a, b| {
            b.count.cmp(&a.count).then_with(|| {
                (&a.identity, &a.issuers, a.from, &a.rpc, &a.decision).cmp(&(
                    &b.identity,
                    &b.issuers,
                    b.from,
                    &b.rpc,
                    &b.decision,
                ))
            })
        });
        out
    }

    /// The `TOP_DENIED` most denied keys, most first.
    pub fn most_denied(&self) -> Vec<DeniedKey> {
        let mut out: Vec<DeniedKey> =
            self.denied.iter().map(|(key, &count)| DeniedKey { key: key.clone(), count }).collect();
        out.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
        out.truncate(TOP_DENIED);
        out
    }

    fn write_text(&self, out: &mut dyn Write) -> io::Result<()> {
        if self.requests == self.records {
            writeln!(out, "{} records", self.records)?;
        } else {
            writeln!(
                out,
                "{} records, standing for {} requests (summary records count theirs)",
                self.records, self.requests
            )?;
        }
        let counts = self.counts();
        if !counts.is_empty() {
            writeln!(out)?;
            // One name from different fields (a CN that reads like another certificate's SPIFFE ID) is counted
            // apart and shown with its field.
            let mut fields: HashMap<(&str, &[String]), Vec<&str>> = HashMap::new();
            for c in &counts {
                let seen = fields.entry((c.identity.as_str(), c.issuers.as_slice())).or_default();
                if !seen.contains(&c.from) {
                    seen.push(c.from);
                }
            }
            let rows: Vec<[String; 4]> = counts
                .iter()
                .map(|c| {
                    let ambiguous =
                        fields.get(&(c.identity.as_str(), c.issuers.as_slice())).is_some_and(|f| f.len() > 1);
                    [c.count.to_string(), c.label(ambiguous), clean(&c.rpc), clean(&c.decision)]
                })
                .collect();
            let header = ["COUNT", "IDENTITY", "RPC", "DECISION"];
            let widths = widths_for(&header, rows.iter().map(|r| &r[..]), &SUMMARY_MAX_WIDTHS);
            let right = [true, false, false, false];
            write_columns(out, &widths, &right, &header)?;
            for row in &rows {
                write_columns(out, &widths, &right, &cells(row))?;
            }
        }
        writeln!(out)?;
        let denied = self.most_denied();
        if denied.is_empty() {
            return writeln!(out, "no denied keys");
        }
        if self.denied_pruned {
            writeln!(
                out,
                "most denied keys (top {TOP_DENIED}; approximate: over {DENIED_KEYS_KEPT} distinct keys were denied, \
                 so each count may be low by up to {}):",
                self.denied_error()
            )?;
        } else {
            writeln!(out, "most denied keys (top {TOP_DENIED}):")?;
        }
        let rows: Vec<[String; 2]> = denied.iter().map(|d| [d.count.to_string(), clean(&d.key)]).collect();
        let header = ["COUNT", "KEY"];
        let widths = widths_for(&header, rows.iter().map(|r| &r[..]), &[20, 200]);
        write_columns(out, &widths, &[true, false], &header)?;
        for row in &rows {
            write_columns(out, &widths, &[true, false], &cells(row))?;
        }
        Ok(())
    }

    fn write_json(&self, out: &mut dyn Write) -> io::Result<()> {
        let value = serde_json::json!({
            "records": self.records,
            "requests": self.requests,
            "counts": self.counts(),
            "most_denied_keys": self.most_denied(),
            "most_denied_keys_approximate": self.denied_pruned,
            "most_denied_keys_max_undercount": self.denied_error(),
        });
        serde_json::to_writer(&mut *out, &value).map_err(io::Error::from)?;
        out.write_all(b"\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{GENESIS, Hasher};
    use crate::audit::read::audit_files;
    use crate::audit::read::testing::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// Ten records of several kinds, seq 1..=10 (times 00:01 … 00:10), split over two files.
    fn specs() -> Vec<Spec> {
        let txn = Spec {
            rpc: "KV/Txn",
            ops: r#"[{"op":"txn","compare":[{"target":"mod","result":"equal","key":"locks/a"}],"success":[{"op":"put","key":"sec/b"}],"failure":[]}]"#.to_owned(),
            ..Spec::denied_put("bob", "")
        };
        vec![
            Spec::get("alice", "app/1"),      // 1
            Spec::get("alice", "app/2"),      // 2
            Spec::denied_put("bob", "sec/x"), // 3
            Spec { uri_san: Some("spiffe://c/ns/kube-system/sa/cilium"), ..Spec::get("", "cilium/a") }, // 4
            Spec::denied_put("bob", "sec/x"), // 5
            Spec { decision: "would_deny", code: "OK", ..Spec::denied_put("carol", "sec/y") }, // 6
            txn,                              // 7
            Spec {
                rpc: "KV/Range",
                ops: r#"[{"op":"range","from":"m","to":"o"},{"op":"range","from":"z"}]"#.to_owned(),
                ..Spec::get("alice", "")
            }, // 8
            Spec {
                rpc: "Lock/Lock",
                ops: r#"[{"op":"lock","name":"locks/m","lease":5}]"#.to_owned(),
                ..Spec::get("dave", "")
            }, // 9
            Spec { reason: "evil\u{1b}[2J", ..Spec::get("alice\u{7}", "esc\\x00") }, // 10
        ]
    }

    fn fixture() -> Result<(tempfile::TempDir, Vec<AuditFile>), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let lines = chain(&Hasher::unkeyed(), 1, GENESIS, &specs());
        write(&dir.path().join("audit.log.00000000000000000001"), &lines[..5])?;
        write(&dir.path().join("audit.log"), &lines[5..])?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        Ok((dir, files))
    }

    #[test]
    fn the_chain_is_verified_after_a_review_and_a_keyed_one_only_noted_without_its_key() -> TestResult {
        let (dir, files) = fixture()?;
        assert_eq!(verification(&files, &[], &[])?, Verification::Verified);
        // One record's decision changed: the review shows it, the verification says it is not to be trusted.
        let active = dir.path().join("audit.log");
        let text =
            std::fs::read_to_string(&active)?.replacen("\"decision\":\"would_deny\"", "\"decision\":\"allow\"", 1);
        std::fs::write(&active, text)?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        match verification(&files, &[], &[])? {
            Verification::Failed(message, in_order) => {
                assert_eq!(in_order, 5, "{message}");
                assert!(message.contains("audit.log:1"), "{message}");
            }
            other => panic!("{other:?}"),
        }

        // An HMAC-keyed chain: noted without the key, verified with it, and a wrong key fails.
        let keyed_dir = tempfile::tempdir()?;
        let key = Hasher::keyed(b"0123456789abcdef0123456789abcdef");
        write(&keyed_dir.path().join("audit.log"), &chain(&key, 1, GENESIS, &specs()))?;
        let keyed = audit_files(&[keyed_dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert!(matches!(verification(&keyed, &[], &[])?, Verification::Keyed(_)));
        // An anchor cannot be checked without the key: the chain does not verify then.
        let anchor = Anchor { seq: 1, hash: [0; 32] };
        assert!(matches!(verification(&keyed, &[], &[anchor])?, Verification::Failed(_, 0)));
        assert_eq!(verification(&keyed, std::slice::from_ref(&key), &[])?, Verification::Verified);
        let wrong = Hasher::keyed(b"another key, just as long as it..");
        assert!(matches!(verification(&keyed, std::slice::from_ref(&wrong), &[])?, Verification::Failed(_, 0)));

        // A last line without its newline is only noted while a proxy writes the folder (holds its lock); cut
        // anywhere else, or with no proxy writing, it is a problem.
        let live = tempfile::tempdir()?;
        let whole = chain(&Hasher::unkeyed(), 1, GENESIS, &specs());
        let anchor = |seq: usize| -> Result<Anchor, Box<dyn std::error::Error>> {
            Ok(format!("{seq}:{}", hash_of(&whole[seq - 1])).parse()?)
        };
        let mut lines = whole.clone();
        if let Some(last) = lines.last_mut() {
            last.truncate(40);
        }
        let path = live.path().join("audit.log");
        write(&path, &lines)?;
        let bytes = std::fs::read(&path)?;
        let files = audit_files(&[live.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert!(matches!(verification(&files, &[], &[])?, Verification::Failed(_, 9)));
        let lock = std::fs::File::open(live.path())?;
        lock.try_lock()?;
        assert!(matches!(verification(&files, &[], &[])?, Verification::Unfinished(_)));
        // Unless the chain before it does not hold an anchor: a log cut back mid-line while a proxy runs.
        assert!(matches!(verification(&files, &[], &[anchor(9)?])?, Verification::Unfinished(_)));
        assert!(matches!(verification(&files, &[], &[anchor(10)?])?, Verification::Failed(_, 9)));
        std::fs::write(&path, b"")?;
        assert_eq!(verification(&files, &[], &[])?, Verification::Verified, "a log being opened");
        assert!(matches!(verification(&files, &[], &[anchor(1)?])?, Verification::Failed(_, 0)));
        std::fs::write(&path, b"{\"seq\":11,\"ti")?;
        assert!(matches!(verification(&files, &[], &[anchor(10)?])?, Verification::Failed(_, 0)));
        std::fs::write(&path, [&bytes[..], b"\n"].concat())?;
        assert!(matches!(verification(&files, &[], &[])?, Verification::Failed(_, 9)));
        drop(lock);

        // An unkeyed chain whose first record was altered is not taken for a keyed one: its other lines verify.
        let altered = tempfile::tempdir()?;
        let mut lines = chain(&Hasher::unkeyed(), 1, GENESIS, &specs());
        if let Some(byte) = lines.first_mut().and_then(|first| first.get_mut(20)) {
            *byte ^= 1; // a digit of its time
        }
        write(&altered.path().join("audit.log"), &lines)?;
        let files = audit_files(&[altered.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert!(
            matches!(verification(&files, &[], &[])?, Verification::Failed(_, 0)),
            "{:?}",
            verification(&files, &[], &[])
        );
        Ok(())
    }

    /// The seqs `filter` keeps.
    fn seqs(files: &[AuditFile], filter: &Filter) -> Result<Vec<u64>, Box<dyn std::error::Error>> {
        let mut out = Vec::new();
        let stats = review(files, filter, Mode::Lines, &mut out)?;
        let mut seqs = Vec::new();
        for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            seqs.push(read::seq_of(line).ok_or("no seq")?);
        }
        assert_eq!(stats.matched, seqs.len() as u64);
        assert_eq!(stats.skipped, 0);
        Ok(seqs)
    }

    fn prefix(p: &str) -> Option<KeyRange> {
        parse_key_prefix(p).ok().map(|p| KeyRange::prefix(p.0))
    }

    #[test]
    fn json_output_is_the_lines_unchanged_in_chain_order() -> TestResult {
        let (dir, files) = fixture()?;
        let mut out = Vec::new();
        let stats = review(&files, &Filter::default(), Mode::Lines, &mut out)?;
        assert_eq!(stats.matched, 10);
        let original = [
            std::fs::read(dir.path().join("audit.log.00000000000000000001"))?,
            std::fs::read(dir.path().join("audit.log"))?,
        ]
        .concat();
        assert_eq!(out, original);
        Ok(())
    }

    #[test]
    fn identity_filter_matches_cn_and_sans_with_globs() -> TestResult {
        let (_dir, files) = fixture()?;
        let by = |glob: &str| seqs(&files, &Filter { identity: Some(Pattern::new(glob)), ..Filter::default() });
        assert_eq!(by("alice")?, [1, 2, 8]);
        assert_eq!(by("b*")?, [3, 5, 7]);
        assert_eq!(by("spiffe://*/sa/cilium")?, [4]);
        assert_eq!(by("*")?.len(), 10);
        assert_eq!(by("nobody")?, Vec::<u64>::new());
        Ok(())
    }

    #[test]
    fn rpc_filter_takes_service_and_method_or_method() -> TestResult {
        let (_dir, files) = fixture()?;
        let by = |rpc: &str| seqs(&files, &Filter { rpc: vec![rpc.to_owned()], ..Filter::default() });
        assert_eq!(by("KV/Put")?, [3, 5, 6]);
        assert_eq!(by("put")?, [3, 5, 6]);
        assert_eq!(by("kv/txn")?, [7]);
        assert_eq!(by("Lock")?, [9]);
        assert_eq!(by("Lock/Put")?, Vec::<u64>::new());
        // Several: any of them.
        let writes = Filter { rpc: vec!["Put".into(), "Txn".into()], ..Filter::default() };
        assert_eq!(seqs(&files, &writes)?, [3, 5, 6, 7]);
        // One certificate, or one CA, among others (the fixture's carol comes from the components CA).
        let fingerprint = |hex: &str| Filter { fingerprint: parse_fingerprint(hex).ok(), ..Filter::default() };
        assert_eq!(seqs(&files, &fingerprint("C0:FF"))?, [6]);
        assert_eq!(seqs(&files, &fingerprint("c0ffee00aa"))?, Vec::<u64>::new());
        assert!(parse_fingerprint("xyz").is_err());
        let issuer = Filter { issuer: Some("components".into()), ..Filter::default() };
        assert_eq!(seqs(&files, &issuer)?, [6]);
        Ok(())
    }

    #[test]
    fn decision_filter() -> TestResult {
        let (_dir, files) = fixture()?;
        let by = |d| seqs(&files, &Filter { decision: Some(d), ..Filter::default() });
        assert_eq!(by(DecisionArg::Deny)?, [3, 5, 7]);
        assert_eq!(by(DecisionArg::WouldDeny)?, [6]);
        assert_eq!(by(DecisionArg::Allow)?, [1, 2, 4, 8, 9, 10]);
        Ok(())
    }

    #[test]
    fn key_prefix_filter_sees_keys_intervals_txns_and_names() -> TestResult {
        let (_dir, files) = fixture()?;
        let by = |p: &str| seqs(&files, &Filter { keys: prefix(p), ..Filter::default() });
        assert_eq!(by("app/")?, [1, 2]);
        assert_eq!(by("sec/")?, [3, 5, 6, 7]); // 7: a txn's success op
        assert_eq!(by("locks/")?, [7, 9]); // 7: a compare; 9: the lock's keys locks/m/…
        assert_eq!(by("locks/m/")?, [9]);
        assert_eq!(by("n")?, [8]); // inside [m, o)
        assert_eq!(by("o")?, Vec::<u64>::new()); // the end is exclusive
        assert_eq!(by("zz")?, [8]); // [z, +inf)
        assert_eq!(by("esc\\x00")?, [10]);
        assert_eq!(by("esc\\x01")?, Vec::<u64>::new());
        assert!(parse_key_prefix("bad\\q").is_err());
        // Combined with another filter: both must hold.
        let f = Filter { keys: prefix("sec/"), decision: Some(DecisionArg::Deny), ..Filter::default() };
        assert_eq!(seqs(&files, &f)?, [3, 5, 7]);
        Ok(())
    }

    #[test]
    fn time_filters_are_inclusive() -> TestResult {
        let (_dir, files) = fixture()?;
        let now = OffsetDateTime::now_utc();
        let since = parse_time("2026-01-01T00:03:00Z", now)?;
        let until = parse_time("2026-01-01T00:05:00.000000Z", now)?;
        assert_eq!(seqs(&files, &Filter { since: Some(since), until: Some(until), ..Filter::default() })?, [3, 4, 5]);
        assert_eq!(
            seqs(&files, &Filter { since: Some(parse_time("2026-01-02", now)?), ..Filter::default() })?.len(),
            0
        );
        let day = parse_time("2026-01-01", now)?;
        assert_eq!(seqs(&files, &Filter { since: Some(day), ..Filter::default() })?.len(), 10);
        Ok(())
    }

    #[test]
    fn times_parse() -> TestResult {
        let now = OffsetDateTime::parse("2026-05-10T12:00:00Z", &Rfc3339)?;
        let at = |s: &str| {
            parse_time(s, now).map(|t| t.to_offset(time::UtcOffset::UTC).format(&Rfc3339).unwrap_or_default())
        };
        assert_eq!(at("15m")?, "2026-05-10T11:45:00Z");
        assert_eq!(at("2h")?, "2026-05-10T10:00:00Z");
        assert_eq!(at("7d")?, "2026-05-03T12:00:00Z");
        assert_eq!(at("1h30m")?, "2026-05-10T10:30:00Z");
        assert_eq!(at("1w")?, "2026-05-03T12:00:00Z");
        assert_eq!(at("2026-01-01T10:00:00+02:00")?, "2026-01-01T08:00:00Z");
        assert_eq!(at("2026-01-01")?, "2026-01-01T00:00:00Z");
        for bad in ["", "15", "m", "15x", "yesterday", "2026-13-01", "1h-5m"] {
            assert!(parse_time(bad, now).is_err(), "{bad:?}");
        }
        assert!(matches!(parse_time("999999999d", now), Err(TimeArgError::OutOfRange { .. })));
        Ok(())
    }

    /// Files without a record are not "verified": a log a proxy wrote always holds its `open` record (review
    /// exits 1 on them, as verify does).
    #[test]
    fn files_without_records_are_not_verified() -> TestResult {
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &[])?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert_eq!(verification(&files, &[], &[])?, Verification::Empty);
        Ok(())
    }

    #[test]
    fn summary_counts_and_most_denied_keys() -> TestResult {
        let (_dir, files) = fixture()?;
        let mut out = Vec::new();
        review(&files, &Filter::default(), Mode::SummaryJson, &mut out)?;
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(v["records"], 10);
        let counts = v["counts"].as_array().ok_or("counts")?;
        assert_eq!(
            counts[0],
            serde_json::json!({"identity": "alice", "from": "common_name", "issuers": ["etcd"], "rpc": "KV/Range", "decision": "allow", "count": 3})
        );
        let bob = serde_json::json!({"identity": "bob", "from": "common_name", "issuers": ["etcd"], "rpc": "KV/Put", "decision": "deny", "count": 2});
        assert_eq!(counts[1], bob);
        // With the CA its certificate chains to: one name from two CAs is counted apart.
        assert!(counts.iter().any(|c| c["identity"] == "carol" && c["issuers"][0] == "components"), "{counts:?}");
        let total: u64 = counts.iter().filter_map(|c| c["count"].as_u64()).sum();
        assert_eq!(total, 10);
        assert_eq!(
            v["most_denied_keys"],
            serde_json::json!([
                {"key": "sec/x", "count": 2},
                {"key": "locks/a", "count": 1},
                {"key": "sec/b", "count": 1},
                {"key": "sec/y", "count": 1},
            ])
        );

        // Filters apply to the summary; the text form is aligned.
        let mut out = Vec::new();
        let filter = Filter { decision: Some(DecisionArg::Deny), ..Filter::default() };
        review(&files, &filter, Mode::SummaryText, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(
            text.starts_with(
                "3 records\n\nCOUNT  IDENTITY           RPC     DECISION\n    2  bob [issuer etcd]  KV/Put  deny\n"
            ),
            "{text}"
        );
        assert!(text.contains("most denied keys (top 20):\nCOUNT  KEY\n    2  sec/x\n"), "{text}");
        Ok(())
    }

    /// Millions of distinct denied keys do not take gigabytes: the count keeps at most DENIED_KEYS_KEPT keys, the
    /// often denied ones stay on top, and the output says it is approximate.
    #[test]
    fn the_most_denied_keys_are_counted_in_bounded_memory() -> TestResult {
        let mut summary = Summary::default();
        // One-off keys (a scan) with a key denied 30 times spread evenly among them, last in key order.
        let scans = DENIED_KEYS_KEPT * 10;
        for i in 0..scans {
            summary.count_denied(format!("scan/{i:08}"));
            if i % (scans / 30) == 0 {
                summary.count_denied("zz/hot".to_owned());
            }
            assert!(summary.denied.len() <= DENIED_KEYS_KEPT);
        }
        let top = summary.most_denied();
        let error = summary.denied_error();
        assert_eq!(top[0].key, "zz/hot", "{:?}", &top[..3]);
        assert!(top[0].count <= 30 && top[0].count + error >= 30, "{} + {error}", top[0].count);
        let mut out = Vec::new();
        summary.write_json(&mut out)?;
        let v: serde_json::Value = serde_json::from_slice(&out)?;
        assert_eq!(v["most_denied_keys_approximate"], true);
        assert_eq!(v["most_denied_keys_max_undercount"], error);
        Ok(())
    }

    #[test]
    fn table_rows_are_aligned_compact_and_escaped() -> TestResult {
        let (_dir, files) = fixture()?;
        let mut out = Vec::new();
        review(&files, &Filter::default(), Mode::Table, &mut out)?;
        let text = String::from_utf8(out)?;
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 11, "{text}");
        assert!(lines[0].starts_with("TIME                         SEQ  IDENTITY "), "{text}");
        // Every row starts its identity column at the same place.
        let column = lines[0].find("IDENTITY").ok_or("header")?;
        assert!(lines[1..].iter().all(|l| l.get(column..column + 1).is_some_and(|c| c != " ")), "{text}");
        assert!(lines[1].contains("alice") && lines[1].contains(" app/1 ") && lines[1].contains("read granted"));
        assert!(lines[4].contains("spiffe://c/ns/kube-system/sa/cilium"), "{}", lines[4]);
        assert!(lines[7].contains(" locks/a +1 "), "{}", lines[7]);
        assert!(lines[8].contains(" [m, o) +1 "), "{}", lines[8]);
        // Control characters from a record never reach the terminal.
        assert!(!text.contains('\u{1b}') && !text.contains('\u{7}'));
        assert!(lines[10].contains("alice\\u{7}") && lines[10].contains("evil\\u{1b}[2J"), "{}", lines[10]);
        assert!(lines[10].contains(" esc\\x00 "), "{}", lines[10]);
        Ok(())
    }

    /// A CN that reads like another certificate's SPIFFE ID, and names that look alike, are told apart: counted
    /// apart, shown with their field, quoted and escaped.
    #[test]
    fn look_alike_identities_are_told_apart() -> TestResult {
        let spiffe = "spiffe://c/ns/kube-system/sa/cilium";
        let specs = [
            Spec { common_name: "", uri_san: Some(spiffe), ..Spec::get("", "cilium/a") },
            Spec { common_name: spiffe, ..Spec::get("", "cilium/b") },
            Spec::get("app-a ", "x"),
            Spec::get("\u{430}pp-a", "y"),
        ];
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &chain(&Hasher::unkeyed(), 1, GENESIS, &specs))?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        let mut out = Vec::new();
        review(&files, &Filter::default(), Mode::SummaryText, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(text.contains(&format!("{spiffe} (uri_san) ")), "{text}");
        assert!(text.contains(&format!("{spiffe} (common_name) ")), "{text}");
        assert!(text.contains("\"app-a \" ") && text.contains("\"\\u{430}pp-a\" "), "{text}");
        let mut out = Vec::new();
        review(&files, &Filter::default(), Mode::Table, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(text.contains("\"app-a \" ") && text.contains("\"\\u{430}pp-a\" "), "{text}");
        assert_eq!(identity_cell("plain-name.example"), "plain-name.example");
        assert_eq!(identity_cell("a\\b"), "a\\b");
        assert_eq!(identity_cell("a \"b\\"), "\"a \\\"b\\\\\"");
        // Names that would read like the table's own suffixes are quoted.
        assert_eq!(identity_cell("x [issuer etcd]"), "\"x [issuer etcd]\"");
        assert_eq!(identity_cell("x(uri_san)"), "\"x(uri_san)\"");
        // A name that starts with a quote could pass for a quoted one: it is quoted too.
        assert_eq!(identity_cell("\"app-a \""), "\"\\\"app-a \\\"\"");
        Ok(())
    }

    /// A record that left ops out touches every key for `--key-prefix`, and its KEY cell says how many it left out.
    #[test]
    fn omitted_ops_are_found_by_any_key_filter_and_shown() -> TestResult {
        let ops = r#"[{"op":"txn","success":[{"op":"put","key":"cilium/1"},{"op":"omitted","count":37}]}]"#;
        let specs = [Spec { ops: ops.to_owned(), rpc: "KV/Txn", ..Spec::get("cilium", "x") }];
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &chain(&Hasher::unkeyed(), 1, GENESIS, &specs))?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        let secret =
            Filter { keys: parse_key_prefix("secret/").ok().map(|p| KeyRange::prefix(p.0)), ..Filter::default() };
        assert_eq!(seqs(&files, &secret)?, [1]);
        let mut out = Vec::new();
        review(&files, &secret, Mode::Table, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(text.contains(" cilium/1 (37 ops omitted) "), "{text}");
        Ok(())
    }

    #[test]
    fn cells_are_never_cut_inside_an_escape() {
        assert_eq!(fit("abc\\u{202e}def", 6), "abc…");
        assert_eq!(fit("abc\\u{202e}def", 12), "abc\\u{202e}…");
        assert_eq!(fit("ab\\x2acd", 5), "ab…");
        assert_eq!(fit("ab\\x2acd", 7), "ab\\x2a…");
        assert_eq!(fit("ab\\\\cd", 4), "ab…");
        assert_eq!(fit("ab\\\\cd", 5), "ab\\\\…");
        assert_eq!(fit("plain text", 5), "plai…");
    }

    /// `--writes`: the records of requests that change keys, a txn by either branch, ops left out counted.
    #[test]
    fn the_writes_filter_keeps_requests_that_change_keys() -> TestResult {
        let with = |rpc: &'static str, ops: &str| Spec { rpc, ops: ops.to_owned(), ..Spec::get("app", "x") };
        let specs = [
            with("KV/Put", r#"[{"op":"put","key":"a"}]"#),
            with("KV/Range", r#"[{"op":"range","key":"a"}]"#),
            with("KV/Txn", r#"[{"op":"txn","success":[{"op":"range","key":"a"}]}]"#),
            with(
                "KV/Txn",
                r#"[{"op":"txn","success":[{"op":"range","key":"a"}],"failure":[{"op":"delete","key":"a"}]}]"#,
            ),
            with("Lease/LeaseRevoke", r#"[{"op":"lease_revoke","lease":7}]"#),
            with("KV/Txn", r#"[{"op":"txn","success":[{"op":"omitted","count":3}]}]"#),
            with("Watch/Watch", r#"[{"op":"watch_create","key":"a"}]"#),
            with("v3lockpb.Lock/Unlock", r#"[{"op":"unlock","key":"l/1"}]"#),
        ];
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &chain(&Hasher::unkeyed(), 1, GENESIS, &specs))?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert_eq!(seqs(&files, &Filter { writes: true, ..Filter::default() })?, [1, 4, 5, 6, 8]);
        Ok(())
    }

    /// `--lease`: the records naming a lease, wherever in their ops; the table names it as etcdctl does; a revoke
    /// (which deletes the lease's keys, not named in the record) is kept by every `--key-prefix`.
    #[test]
    fn the_lease_filter_and_the_table_name_leases_in_etcdctls_hex() -> TestResult {
        let lease = 0x694d_7a0e_7bd5_d60a_i64;
        let with = |rpc: &'static str, ops: String| Spec { rpc, ops, ..Spec::get("app", "x") };
        let specs = [
            with("Lease/LeaseGrant", format!(r#"[{{"op":"lease_grant","ttl":60,"lease":{lease}}}]"#)),
            with("KV/Put", format!(r#"[{{"op":"put","key":"a","lease":{lease}}}]"#)),
            with("KV/Put", r#"[{"op":"put","key":"b","lease":7}]"#.to_owned()),
            with("KV/Txn", format!(r#"[{{"op":"txn","success":[{{"op":"put","key":"c","lease":{lease}}}]}}]"#)),
            with("Lease/LeaseRevoke", format!(r#"[{{"op":"lease_revoke","lease":{lease}}}]"#)),
            with("KV/Range", r#"[{"op":"range","key":"a"}]"#.to_owned()),
            // Ops left out could name the lease (a put attached to it past the record's bound on ops).
            with(
                "KV/Txn",
                r#"[{"op":"txn","success":[{"op":"put","key":"z"},{"op":"omitted","count":7}]}]"#.to_owned(),
            ),
        ];
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &chain(&Hasher::unkeyed(), 1, GENESIS, &specs))?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        let by_lease = Filter { lease: parse_lease("694d7a0e7bd5d60a").ok(), ..Filter::default() };
        assert_eq!(seqs(&files, &by_lease)?, [1, 2, 4, 5, 7]);
        assert_eq!(parse_lease("0x7"), Ok(7));
        assert_eq!(parse_lease("-000000000000005"), Ok(-5));
        assert_eq!(parse_lease("fffffffffffffffb"), Ok(-5));
        assert!(parse_lease("0").is_err() && parse_lease("xyz").is_err());
        let secrets = Filter { keys: Some(KeyRange::prefix("secret/")), ..Filter::default() };
        assert_eq!(seqs(&files, &secrets)?, [5, 7]);
        let mut out = Vec::new();
        review(&files, &Filter::default(), Mode::Table, &mut out)?;
        let text = String::from_utf8(out)?;
        assert!(text.contains("(lease 694d7a0e7bd5d60a)"), "{text}");
        assert!(text.contains("(keys of lease 694d7a0e7bd5d60a)"), "{text}");
        Ok(())
    }

    #[test]
    fn invisible_characters_are_shown_escaped() {
        assert_eq!(clean("a\u{202e}b\u{200b}c\u{2029}d"), "a\\u{202e}b\\u{200b}c\\u{2029}d");
        assert_eq!(clean("plain ünï"), "plain ünï");
    }

    #[test]
    fn long_cells_are_cut() {
        assert_eq!(fit("abcdef", 4), "abc…");
        assert_eq!(fit("abcd", 4), "abcd");
        let mut out = Vec::new();
        let _ = write_columns(&mut out, &[3, 3], &[false, false], &["abcdef", "xyz"]);
        assert_eq!(String::from_utf8_lossy(&out), "ab…  xyz\n");
    }

    #[test]
    fn lines_that_are_not_records_are_skipped_and_counted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut lines = simple_chain(&Hasher::unkeyed(), 3);
        lines.insert(1, b"not json\n".to_vec());
        write(&dir.path().join("audit.log"), &lines)?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        let mut out = Vec::new();
        let stats = review(&files, &Filter::default(), Mode::Lines, &mut out)?;
        assert_eq!((stats.lines, stats.matched, stats.skipped), (4, 3, 1));
        assert!(stats.first_skipped.is_some_and(|s| s.ends_with("audit.log:2")));
        Ok(())
    }

    #[test]
    fn known_rpcs() {
        for known in ["KV/Range", "range", "watch/watch", "LeaseKeepAlive", "Unknown", "etcd-guard/AuditOpen", "Check"]
        {
            assert!(is_known_rpc(known), "{known}");
        }
        for unknown in ["etcdserverpb.KV/Range", "/etcdserverpb.KV/Range", "KV/Ranges", "Get", "AuditOpen/x", ""] {
            assert!(!is_known_rpc(unknown), "{unknown}");
        }
    }

    #[test]
    fn rpc_matching() {
        assert!(rpc_matches("KV/Range", "KV/Range"));
        assert!(rpc_matches("kv/range", "KV/Range"));
        assert!(rpc_matches("RANGE", "KV/Range"));
        assert!(!rpc_matches("Range", "KV/RangeX"));
        assert!(!rpc_matches("KV", "KV/Range"));
    }
}
