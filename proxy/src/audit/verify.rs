//! `etcd-guard audit verify`: check the hash chain and `seq` across files.
//!
//! Every line must be a record whose hash verifies, whose `prev_hash` is the hash of the record before it, and
//! whose `seq` is one more than that record's. The first line that is not is reported with its file and line, as
//! one of:
//!
//! * **altered**: the line's own hash does not verify, or it is not a well-formed record (also: a last line
//!   without its newline);
//! * **inserted**: a line whose hash does not verify while the next line chains to the record before it; or a
//!   record that verifies but whose `seq` is not after the one before it (duplicated or replayed);
//! * **removed**: a record that verifies but does not follow the one before it: `seq` jumps (the missing `seq`s
//!   are named) or its `prev_hash` is not that record's hash.
//!
//! The first record may start anywhere (older files are deleted by rotation); a note says so unless it is the
//! very first record (`seq` 1 after [`GENESIS`]). A line that is not a record, followed by the writer's record
//! for a line cut off by a crash ([`CUT_RPC`]) that names exactly its length and SHA-256 and is chained to the
//! record before it, is what the writer leaves after a crash and a restart: a note too, and checking goes on.
//!
//! Without an HMAC key the chain detects changes by anyone who does not rewrite every hash after the change;
//! with one (`--hmac-key`, the proxy's `audit.hmac_key_file`) only the key's holders can forge records.
//!
//! After a key change (`etcd-guard audit change-key`) a log holds records under several keys, given oldest first.
//! The chain moves on to the next key only at the key change record ([`KEY_CHANGE_RPC`], written under the new key)
//! — or to any later key at the very first record of the set, when older files were rotated away — and never back;
//! and it must end under the last key given. So a holder of an old key can forge only what was written under it,
//! and cannot cut the log back to the change and go on from there.
//!
//! Anchors (`--anchor SEQ:HASH`, a record's seq and hash kept outside the log: the last one `verify` printed, the
//! key change record `change-key` printed) catch what the chain alone cannot: a log cut back and written on, or
//! rewritten from some record on, by someone who holds the key (or by anyone, without one). The record with that
//! seq must be in the chain with that hash, or be the one the first record's `prev_hash` names; a chain that ends
//! before it has lost records from its end, one that starts after it records from its start (or the files
//! holding it were rotated away: an anchor is a claim the files must bear out, so it fails either way).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use sha2::{Digest, Sha256};

use super::chain::{GENESIS, Hasher, split_line};
use super::read::{self, AuditFile, ChainFields, Line, LineReader, MAX_LINE_BYTES, ReadError};
use super::record::shown;
use super::writer::{CUT_RPC, KEY_CHANGE_RPC, OPEN_RPC};

/// Arguments of `etcd-guard audit verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// Audit files, or folders holding them (default: the current folder). In a folder every regular file whose
    /// name contains ".log" is read; files are read in the order of the `seq` they start with. Files compressed
    /// with gzip are read decompressed (a compressed copy beside its plain file is left out).
    pub paths: Vec<PathBuf>,
    /// The HMAC key the chain is keyed with (the file named by the proxy's `audit.hmac_key_file`). After a key
    /// change, every key the files were written under, oldest first: `--hmac-key old.key --hmac-key new.key`.
    #[arg(long, value_name = "FILE")]
    pub hmac_key: Vec<PathBuf>,
    /// The chain starts without a key: the log was written unkeyed before its first `audit change-key`.
    #[arg(long, requires = "hmac_key")]
    pub unkeyed_before: bool,
    /// A record's seq and hash kept outside the log (`SEQ:HASH`: the last record `verify` printed, the key change
    /// record `change-key` printed): the record with that seq must be in the chain with that hash, so a log cut back
    /// to before it, or rewritten from it or earlier, fails, even by a holder of the key. Repeat it for several; leave
    /// out anchors whose records were rotated away (the files must hold the record, or the one after it).
    #[arg(long, value_name = "SEQ:HASH")]
    pub anchor: Vec<Anchor>,
}

/// A record's `seq` and `hash`, kept outside the log (`--anchor SEQ:HASH`): the chain must hold that record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Anchor {
    /// The record's `seq`.
    pub seq: u64,
    /// Its `hash`.
    pub hash: [u8; 32],
}

/// An `--anchor` that cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("{0:?}: an anchor is SEQ:HASH — a record's seq (from 1) and its 64 hex digit hash, e.g. 42:9a3f…")]
    Malformed(String),
    #[error("two anchors for seq {seq} with different hashes: at most one of them can be the record's")]
    Conflict { seq: u64 },
}

/// Why files without a single record do not verify.
pub const NOTHING_VERIFIED: &str = "nothing to verify — etcd-guard writes an `open` record when it opens a log, so a \
                                    log it has written is never empty (emptied, or not an audit log yet)";

/// What kind of tampering (or damage) a problem looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A line was changed (or cut short, or is not a record).
    Altered,
    /// A line was added, or a record repeated.
    Inserted,
    /// Records are missing.
    Removed,
    /// The chain is intact, but a record kept outside the log (`--anchor`) is not the one in it.
    Rewritten,
}

/// The first problem found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What it looks like.
    pub kind: ProblemKind,
    /// The file of the offending line.
    pub path: PathBuf,
    /// The 1-based line number in that file.
    pub line: u64,
    /// A sentence that names the file and line and says what is wrong.
    pub message: String,
    /// The problem is a last line without its newline: a crash's leftover, an edit — or, in a log being written,
    /// a write still under way.
    pub unfinished_last_line: bool,
}

/// The result of checking a set of files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Records checked and found in order (up to the problem, if any).
    pub records: u64,
    /// Files in the set.
    pub files: usize,
    /// `seq` and `prev_hash` of the first record.
    pub first: Option<(u64, String)>,
    /// `seq` and `hash` of the last record in order.
    pub last: Option<(u64, String)>,
    /// Whether the chain was checked with an HMAC key.
    pub keyed: bool,
    /// How many HMAC keys the records checked were under (the chain moves through them in turn).
    pub keys: usize,
    /// Records before the first key were checked without one (`--unkeyed-before`).
    pub unkeyed_before: bool,
    /// How many anchors (`--anchor`) the chain was found to hold.
    pub anchors: usize,
    /// Things worth knowing that are not problems.
    pub notes: Vec<String>,
    /// The first problem, if any.
    pub problem: Option<Problem>,
}

/// A line whose hash verifies and that is a record.
struct Intact {
    seq: u64,
    prev_hash: [u8; 32],
    hash: [u8; 32],
    /// A key change record ([`KEY_CHANGE_RPC`]).
    key_change: bool,
}

/// A line that is not an intact record.
struct Defect {
    /// What is wrong, as a phrase.
    why: String,
    /// Its `seq`, if one can be read.
    seq: Option<u64>,
    /// A cut-off last line: reported as altered at once.
    partial: bool,
    /// The hash was well-formed but did not verify (rather than the line not being a record).
    hash_mismatch: bool,
    /// What else the line's hash says, when it did not verify: it is a key change record (to a key not given), or
    /// it verifies without a key.
    hint: Option<&'static str>,
}

/// The last record that was in order.
struct Good {
    seq: u64,
    hash: [u8; 32],
    file: usize,
    line: u64,
}

/// A defective line waiting for the next line to tell whether it was altered or inserted (or cut off by a crash,
/// and vouched for).
struct Pending {
    defect: Defect,
    file: usize,
    line: u64,
    /// Its length and SHA-256 (hex), for a record that vouches for it.
    digest: Option<(u64, String)>,
}

/// Whether `line` is the writer's record for a line cut off by a crash ([`CUT_RPC`]) naming exactly `digest`.
fn vouches_for(line: Line<'_>, digest: Option<&(u64, String)>) -> bool {
    #[derive(serde::Deserialize)]
    struct Cut {
        rpc: String,
        ops: Vec<CutOp>,
    }
    #[derive(serde::Deserialize)]
    struct CutOp {
        op: String,
        bytes: u64,
        sha256: String,
    }
    let (Line::Complete(bytes), Some((len, sha256))) = (line, digest) else { return false };
    let Ok(cut) = serde_json::from_slice::<Cut>(bytes) else { return false };
    cut.rpc == CUT_RPC
        && matches!(cut.ops.as_slice(), [op] if op.op == "cut" && op.bytes == *len && op.sha256 == *sha256)
}

/// Run `audit verify`: 0 when the chain is intact, 1 on the first problem, 2 when the files cannot be read or
/// the arguments are wrong.
pub fn run(args: VerifyArgs) -> ExitCode {
    let keys = match keys_or_report(&args.hmac_key, args.unkeyed_before, &args.anchor) {
        Ok(keys) => keys,
        Err(code) => return code,
    };
    let files = match read::audit_files_or_report(&args.paths) {
        Ok(files) => files,
        Err(code) => return code,
    };
    let report = match verify_anchored(&files, &keys, &args.anchor) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("etcd-guard: {e}");
            return ExitCode::from(2);
        }
    };
    for note in &report.notes {
        crate::cli::say(format_args!("note: {note}"));
    }
    match &report.problem {
        Some(problem) => {
            crate::cli::say(problem);
            if report.records > 0 {
                crate::cli::say(format_args!("({} records before it are in order)", report.records));
            }
            ExitCode::from(1)
        }
        None if report.records == 0 => {
            // Nothing verified is no proof of anything: a log the proxy opened starts with its `open` record.
            crate::cli::say(format_args!("no records: {report}; {NOTHING_VERIFIED}"));
            ExitCode::from(1)
        }
        None => {
            crate::cli::say(&report);
            if let Some((seq, hash)) = &report.last {
                crate::cli::say(format_args!(
                    "keep `--anchor {seq}:{hash}` outside the log: verify with it later to show that the log was \
                     not cut back or rewritten up to here"
                ));
            }
            ExitCode::SUCCESS
        }
    }
}

/// What `verify` and `review` check a chain with, from their arguments: the keys (`--hmac-key`, in turn, and
/// `--unkeyed-before`), once the `--anchor`s are found consistent. Errors are told on standard error (exit 2).
pub fn keys_or_report(hmac_key: &[PathBuf], unkeyed_before: bool, anchors: &[Anchor]) -> Result<Vec<Hasher>, ExitCode> {
    let keys = Hasher::chain_keys(hmac_key, unkeyed_before).map_err(|e| e.to_string());
    let checked = keys.and_then(|keys| Anchor::check_all(anchors).map(|()| keys).map_err(|e| format!("--anchor {e}")));
    checked.map_err(|e| {
        eprintln!("etcd-guard: {e}");
        ExitCode::from(2)
    })
}

/// Check `files`, in this order, as one chain written under `keys`, oldest first (none: unkeyed; see the module's
/// documentation for how the chain moves from one key to the next). Stops at the first problem.
///
/// # Errors
///
/// A file cannot be opened or read.
pub fn verify(files: &[AuditFile], keys: &[Hasher]) -> Result<Report, ReadError> {
    verify_anchored(files, keys, &[])
}

/// [`verify`], and the chain must hold every record of `anchors` (the record with its seq, with its hash; the one
/// just before the files' first record as that record's `prev_hash`): see the module's documentation.
///
/// # Errors
///
/// A file cannot be opened or read.
pub fn verify_anchored(files: &[AuditFile], keys: &[Hasher], anchors: &[Anchor]) -> Result<Report, ReadError> {
    // In seq order, each once.
    let mut anchors = anchors.to_vec();
    anchors.sort_by_key(|a| (a.seq, a.hash));
    anchors.dedup();
    let unkeyed = [Hasher::unkeyed()];
    let keys = if keys.is_empty() { &unkeyed[..] } else { keys };
    // The key the chain is under; it only moves forward, one key at a time after the first record.
    let mut key = 0;
    // The key of the first record.
    let mut first_key = None;
    let mut report = Report {
        records: 0,
        files: files.len(),
        first: None,
        last: None,
        keyed: false,
        keys: 0,
        unkeyed_before: false,
        anchors: 0,
        notes: Vec::new(),
        problem: None,
    };
    let mut last: Option<Good> = None;
    let mut pending: Option<Pending> = None;
    // The last intact line's bytes: whether the chain ends with the writer's close record.
    let mut last_line: Vec<u8> = Vec::new();
    // The set starts with a line a crash cut off, vouched for by the record after it (which has its seq).
    let mut cut_at_start = false;
    let unreadable = |file: &AuditFile, source| ReadError::Unreadable { path: shown(&file.path), source };
    for (index, file) in files.iter().enumerate() {
        let mut reader = LineReader::open(&file.path).map_err(|e| unreadable(file, e))?;
        while let Some((number, line)) = reader.next_line().map_err(|e| unreadable(file, e))? {
            let checked = match check_line(&keys[key], line) {
                Err(defect) if defect.hash_mismatch => match later_key(keys, key, line, last.is_none()) {
                    Some((later, intact)) => {
                        report.notes.push(if last.is_none() {
                            format!(
                                "{}: seq {}: the chain starts under {} (the first record of these files)",
                                at(files, index, number),
                                intact.seq,
                                key_name(keys, later),
                            )
                        } else {
                            format!(
                                "{}: seq {}: the chain goes on under {} (the key change record, hash {})",
                                at(files, index, number),
                                intact.seq,
                                key_name(keys, later),
                                hex::encode(intact.hash),
                            )
                        });
                        key = later;
                        Ok(intact)
                    }
                    None => Err(defect),
                },
                // `audit change-key` seals its record with the new key, never with the key before it.
                Ok(intact) if last.is_some() && intact.key_change => Err(Defect {
                    why: "a key change record under the key of the records before it: not one `audit change-key` \
                          wrote (it seals it with the new key)"
                        .to_owned(),
                    seq: Some(intact.seq),
                    partial: false,
                    hash_mismatch: false,
                    hint: None,
                }),
                checked => checked,
            };
            if checked.is_ok() && first_key.is_none() {
                first_key = Some(key);
            }
            let hasher = &keys[key];
            if let Some(p) = pending.take() {
                // The line after a defective one decides: if it chains to the last good record, the defective
                // line was put in between; otherwise it is what became of the record that belonged there.
                let expected_prev = last.as_ref().map_or(genesis(), |g| g.hash);
                let chains = checked.as_ref().is_ok_and(|c| c.prev_hash == expected_prev);
                // At the start of the set (older files rotated away) there is nothing for it to chain to: the
                // writer's record vouching for the line is enough, and the chain starts with it.
                if (chains || last.is_none()) && checked.is_ok() && vouches_for(line, p.digest.as_ref()) {
                    cut_at_start = last.is_none();
                    // What the writer leaves after a crash: the record it was writing, cut off, then (once the
                    // proxy starts again) a record of its own that names the cut-off line's bytes, in the chain.
                    // Checking goes on, so that nothing after a crash escapes verification.
                    report.notes.push(format!(
                        "{}:{}: a record cut off (the proxy stopped while writing it): its text is not verified, \
                         do not trust it (the record after it vouches for its length and SHA-256 only); the chain \
                         goes on",
                        shown(&files[p.file].path),
                        p.line,
                    ));
                } else {
                    let kind = if chains { ProblemKind::Inserted } else { ProblemKind::Altered };
                    let next = Some((index, number));
                    report.problem = Some(defect_problem(files, &p, kind, hasher, last.as_ref(), next));
                    return Ok(report);
                }
            }
            match checked {
                Err(defect) => {
                    let digest = match line {
                        Line::Complete(bytes) => Some((bytes.len() as u64, hex::encode(Sha256::digest(bytes)))),
                        Line::Partial(_) | Line::TooLong { .. } => None,
                    };
                    let p = Pending { defect, file: index, line: number, digest };
                    if p.defect.partial {
                        // A last line a proxy may still be writing: what the chain before it must hold comes first
                        // (a reader told only of an unfinished line would take it for a write under way).
                        let problem = end_problem(files, keys, key, last.as_ref(), &anchors).unwrap_or_else(|| {
                            defect_problem(files, &p, ProblemKind::Altered, hasher, last.as_ref(), None)
                        });
                        report.problem = Some(problem);
                        return Ok(report);
                    }
                    pending = Some(p);
                }
                Ok(record) => {
                    if let Some(problem) = out_of_order(files, last.as_ref(), &record, index, number) {
                        report.problem = Some(problem);
                        return Ok(report);
                    }
                    if last.is_none() {
                        // Rotation names a file after its first record (or a later one): never an earlier one.
                        // (Before it read the seq of a cut line from the record vouching for it, it named a file
                        // that starts with one after the seq before.)
                        let old_cut_name = |named: u64| cut_at_start && named.saturating_add(1) == record.seq;
                        if let Some(named) =
                            named_seq(&file.path).filter(|&named| named < record.seq && !old_cut_name(named))
                        {
                            report.problem = Some(Problem {
                                kind: ProblemKind::Removed,
                                path: file.path.clone(),
                                line: number,
                                message: format!(
                                    "records {named}..={} missing from the start of {}: its name says it starts at \
                                     seq {named}, its first record is seq {}",
                                    record.seq - 1,
                                    shown(&file.path),
                                    record.seq
                                ),
                                unfinished_last_line: false,
                            });
                            return Ok(report);
                        }
                        if record.seq != 1 || record.prev_hash != genesis() {
                            report.notes.push(format!(
                                "chain starts at seq {} (prev_hash {}), earlier records are not in these files",
                                record.seq,
                                hex::encode(record.prev_hash)
                            ));
                        }
                        report.first = Some((record.seq, hex::encode(record.prev_hash)));
                        if let Some(problem) = anchors_before(files, &anchors, &record, index, number, &mut report) {
                            report.problem = Some(problem);
                            return Ok(report);
                        }
                    }
                    if let Some(problem) = anchor_at(files, &anchors, &record, index, number, &mut report) {
                        report.problem = Some(problem);
                        return Ok(report);
                    }
                    report.records += 1;
                    last = Some(Good { seq: record.seq, hash: record.hash, file: index, line: number });
                    if let Line::Complete(bytes) = line {
                        if is_open_after_unclosed_run(bytes) {
                            report.notes.push(format!(
                                "{}: seq {}: the proxy started after a run that did not close the log (a crash, a \
                                 kill, or records removed from its end while it was stopped)",
                                at(files, index, number),
                                record.seq
                            ));
                        }
                        last_line.clear();
                        last_line.extend_from_slice(bytes);
                    }
                }
            }
        }
    }
    if let Some(p) = pending {
        // The last line: nothing after it can show it was inserted.
        report.problem = Some(defect_problem(files, &p, ProblemKind::Altered, &keys[key], last.as_ref(), None));
        return Ok(report);
    }
    // The keys the records were under: from the first record's to the last one's, each in turn.
    let used = keys.get(first_key.unwrap_or(key)..=key).unwrap_or_default();
    report.keyed = used.iter().any(Hasher::is_keyed);
    report.keys = used.iter().filter(|k| k.is_keyed()).count();
    report.unkeyed_before = report.keyed && used.iter().any(|k| !k.is_keyed());
    if let Some(problem) = end_problem(files, keys, key, last.as_ref(), &anchors) {
        report.problem = Some(problem);
        return Ok(report);
    }
    if let Some(g) = &last {
        let closed = super::writer::ends_cleanly(&last_line);
        if !closed {
            report.notes.push(format!(
                "the last record (seq {}) is not the writer's close record: the proxy is still writing, or it stopped \
                 without closing the log (crash, kill), or records were removed from the end",
                g.seq
            ));
        }
    }
    report.last = last.map(|g| (g.seq, hex::encode(g.hash)));
    Ok(report)
}

/// What the chain's end must hold, if it does not (`last`: its last record, `key`: the key it ends under): records
/// under the last key given — whoever holds an older key could cut the log back to the change and write on under
/// that key — and every anchor's record.
fn end_problem(
    files: &[AuditFile],
    keys: &[Hasher],
    key: usize,
    last: Option<&Good>,
    anchors: &[Anchor],
) -> Option<Problem> {
    let Some(g) = last else {
        // No record at all: none of them can be held.
        let anchor = anchors.first()?;
        let file = files.first()?;
        return Some(Problem {
            kind: ProblemKind::Removed,
            path: file.path.clone(),
            line: 1,
            message: format!(
                "no record in these files, so not the one kept as --anchor {anchor}: the log was emptied or cut back"
            ),
            unfinished_last_line: false,
        });
    };
    let problem = |message| {
        Some(Problem {
            kind: ProblemKind::Removed,
            path: files[g.file].path.clone(),
            line: g.line,
            message,
            unfinished_last_line: false,
        })
    };
    if key + 1 < keys.len() {
        return problem(format!(
            "{}: the chain ends (seq {}) under {}: no record of these files is under a later key — records written \
             after the key change were removed (and perhaps replaced by a holder of an older key), or these files \
             end before the change (give only the keys they were written under)",
            at(files, g.file, g.line),
            g.seq,
            key_name(keys, key),
        ));
    }
    let anchor = anchors.last().filter(|a| a.seq > g.seq)?;
    problem(format!(
        "{}: the chain ends at seq {}, before the record kept as --anchor {anchor}: records were removed from the end \
         (the log was cut back, and perhaps written on since), or these files end before it (give the newer ones too)",
        at(files, g.file, g.line),
        g.seq,
    ))
}

/// Check the anchor of `record`'s seq, if one was given (`anchors` sorted by seq, each once): held (counted in
/// `report`) if its hash is the record's.
fn anchor_at(
    files: &[AuditFile],
    anchors: &[Anchor],
    record: &Intact,
    file: usize,
    line: u64,
    report: &mut Report,
) -> Option<Problem> {
    let anchor = anchors.get(anchors.partition_point(|a| a.seq < record.seq)).filter(|a| a.seq == record.seq)?;
    if anchor.hash == record.hash {
        report.anchors += 1;
        return None;
    }
    Some(Problem {
        kind: ProblemKind::Rewritten,
        path: files[file].path.clone(),
        line,
        message: format!(
            "{}: seq {} verifies and chains, but its hash is {}, not the {} kept as --anchor: the log was rewritten \
             from this record or an earlier one (cut back and written on, or replaced), by someone who could seal \
             records",
            at(files, file, line),
            record.seq,
            hex::encode(record.hash),
            hex::encode(anchor.hash),
        ),
        unfinished_last_line: false,
    })
}

/// Check the anchors before `first`, the first record of the files: the one just before it is held if `first`
/// chains to it (its `prev_hash` is the anchor's hash); any earlier one is not in the files, which is a problem —
/// records removed from the start, or files rotated away (then the anchor is to be left out).
fn anchors_before(
    files: &[AuditFile],
    anchors: &[Anchor],
    first: &Intact,
    file: usize,
    line: u64,
    report: &mut Report,
) -> Option<Problem> {
    let here = at(files, file, line);
    let problem = |kind, message| {
        Some(Problem { kind, path: files[file].path.clone(), line, message, unfinished_last_line: false })
    };
    let before = &anchors[..anchors.partition_point(|a| a.seq < first.seq)];
    if let Some(anchor) = before.first().filter(|a| a.seq + 1 < first.seq) {
        return problem(
            ProblemKind::Removed,
            format!(
                "{here}: these files start at seq {}, after the record kept as --anchor {anchor}: records were removed \
                 from the start — or the files holding it were rotated away: then give them too, or leave out the \
                 anchors of records no longer kept",
                first.seq
            ),
        );
    }
    let anchor = before.last()?;
    if anchor.hash != first.prev_hash {
        return problem(
            ProblemKind::Rewritten,
            format!(
                "{here}: seq {}, the first record of these files, chains to a record whose hash is {}, not the {} kept \
                 as --anchor for seq {}: the log was rewritten from seq {} or earlier",
                first.seq,
                hex::encode(first.prev_hash),
                hex::encode(anchor.hash),
                anchor.seq,
                first.seq,
            ),
        );
    }
    report.anchors += 1;
    None
}

/// The seq a rotated file's name gives (`audit.log.00000000000000000042`, also with `.gz` after it), if it has one.
fn named_seq(path: &Path) -> Option<u64> {
    let name = path.file_name()?.to_str()?;
    let name = name.strip_suffix(".gz").unwrap_or(name);
    let (_, digits) = name.rsplit_once('.')?;
    super::writer::rotated_seq(digits)
}

/// Whether an intact record is the writer's open record saying the run before it did not close the log. (Inside a
/// JSON string a `"` is escaped, so no field's value can hold these texts.)
fn is_open_after_unclosed_run(line: &[u8]) -> bool {
    // `str::contains` searches fast; the rarer text first, so most lines are read once.
    std::str::from_utf8(line).is_ok_and(|text| {
        text.contains(r#""previous":"not_closed""#) && text.contains(&format!(r#""rpc":"{OPEN_RPC}""#))
    })
}

/// `GENESIS` as bytes.
fn genesis() -> [u8; 32] {
    let mut out = [0; 32];
    // GENESIS is 64 hex zeros.
    let _ = hex::decode_to_slice(GENESIS, &mut out);
    out
}

/// How notes and problems name `keys[i]`: `--hmac-key #n of N`, counting the keys given, or `no key` for the start
/// of a chain written before a key was set (`--unkeyed-before`).
fn key_name(keys: &[Hasher], i: usize) -> String {
    if keys.get(i).is_some_and(|k| !k.is_keyed()) {
        return "no key".to_owned();
    }
    let n = keys.iter().take(i + 1).filter(|k| k.is_keyed()).count();
    format!("--hmac-key #{n} of {}", keys.iter().filter(|k| k.is_keyed()).count())
}

/// The key after `key` that `line` verifies under, if the chain may move to it there: any later key at the first
/// record of the set (`at_start`: older files rotated away), else the next key, at a key change record (a key given
/// but never used means that key's records were removed).
fn later_key(keys: &[Hasher], key: usize, line: Line<'_>, at_start: bool) -> Option<(usize, Intact)> {
    let Line::Complete(bytes) = line else { return None };
    if at_start {
        return keys.iter().enumerate().skip(key + 1).find_map(|(i, k)| check_bytes(k, bytes).ok().map(|c| (i, c)));
    }
    let intact = check_bytes(keys.get(key + 1)?, bytes).ok()?;
    intact.key_change.then_some((key + 1, intact))
}

/// Why a line's hash may not verify under `hasher` without its having been altered: it is a key change record (the
/// chain moves on to a key not given), or a record of a log written without a key before its first key change.
fn mismatch_hint(hasher: &Hasher, bytes: &[u8]) -> Option<&'static str> {
    if read::rpc_of(bytes).as_deref() == Some(KEY_CHANGE_RPC) {
        return Some(
            "it is a key change record (`audit change-key`): the chain goes on under a key not given here — give \
             every key the log was written under, oldest first",
        );
    }
    (hasher.is_keyed() && check_bytes(&Hasher::unkeyed(), bytes).is_ok()).then_some(
        "it verifies without a key: the log was written without one before its first key change (add \
         --unkeyed-before)",
    )
}

/// Check one line on its own: its hash, and that it is a record.
fn check_line(hasher: &Hasher, line: Line<'_>) -> Result<Intact, Defect> {
    let (bytes, partial) = match line {
        Line::Complete(b) => (b, false),
        Line::Partial(b) => (b, true),
        Line::TooLong { bytes } => {
            return Err(Defect {
                why: format!("the line is {bytes} bytes long, longer than any record ({MAX_LINE_BYTES} bytes)"),
                seq: None,
                partial: false,
                hash_mismatch: false,
                hint: None,
            });
        }
    };
    let defect = |why: String, hash_mismatch: bool| {
        let hint = hash_mismatch.then(|| mismatch_hint(hasher, bytes)).flatten();
        Defect { why, seq: read::seq_of(bytes), partial, hash_mismatch, hint }
    };
    let intact = check_bytes(hasher, bytes).map_err(|(why, mismatch)| defect(why, mismatch))?;
    if partial {
        return Err(defect("the last line has no final newline (the write was cut short?)".to_owned(), false));
    }
    Ok(intact)
}

/// Whether any line of `files` has a hash that verifies with `hasher` (however it chains): an unkeyed chain whose
/// first records were altered still has such lines, an HMAC-keyed one has none without its key. Stops at the first.
///
/// # Errors
///
/// A file cannot be read.
pub fn any_line_verifies(files: &[AuditFile], hasher: &Hasher) -> Result<bool, ReadError> {
    let found = first_line_under(files.iter().map(|f| f.path.as_path()), hasher);
    found.map(|line| line.is_some()).map_err(|(path, source)| ReadError::Unreadable { path: shown(path), source })
}

/// The first line of the files at `paths`, in their order, whose hash verifies with `hasher` (however it chains):
/// its file and 1-based number.
///
/// # Errors
///
/// A file cannot be opened or read: which, and why.
pub fn first_line_under<'a>(
    paths: impl IntoIterator<Item = &'a Path>,
    hasher: &Hasher,
) -> Result<Option<(&'a Path, u64)>, (&'a Path, std::io::Error)> {
    for path in paths {
        let mut reader = LineReader::open(path).map_err(|e| (path, e))?;
        while let Some((number, line)) = reader.next_line().map_err(|e| (path, e))? {
            if let Line::Complete(bytes) = line
                && check_bytes(hasher, bytes).is_ok()
            {
                return Ok(Some((path, number)));
            }
        }
    }
    Ok(None)
}

/// Check a line's hash and fields; on failure, why and whether it was the hash that did not verify.
fn check_bytes(hasher: &Hasher, bytes: &[u8]) -> Result<Intact, (String, bool)> {
    if bytes.is_empty() {
        return Err(("the line is empty".to_owned(), false));
    }
    let Some((body, claimed)) = split_line(bytes) else {
        return Err(("the line does not end in a hash field".to_owned(), false));
    };
    let mut hash = [0; 32];
    if hex::decode_to_slice(claimed, &mut hash).is_err() {
        return Err(("the line's hash is not hex".to_owned(), false));
    }
    if hasher.hash(body) != hash {
        return Err(("the line's hash does not verify".to_owned(), true));
    }
    let fields: ChainFields<'_> = match serde_json::from_slice(bytes) {
        Ok(f) => f,
        Err(e) => return Err((format!("the line's hash verifies, but it is not a well-formed record: {e}"), false)),
    };
    if fields.hash.as_str() != claimed {
        return Err(("the line's hash verifies, but its \"hash\" field is not the hash at its end".to_owned(), false));
    }
    let mut prev_hash = [0; 32];
    if fields.prev_hash.len() != 64 || hex::decode_to_slice(fields.prev_hash.as_str(), &mut prev_hash).is_err() {
        return Err(("the line's hash verifies, but its prev_hash is not 64 hex digits".to_owned(), false));
    }
    let key_change = fields.rpc.as_ref().is_some_and(|rpc| rpc.as_str() == KEY_CHANGE_RPC);
    Ok(Intact { seq: fields.seq, prev_hash, hash, key_change })
}

/// The problem of an intact record that does not follow `last`, if it does not.
fn out_of_order(files: &[AuditFile], last: Option<&Good>, record: &Intact, file: usize, line: u64) -> Option<Problem> {
    let last = last?;
    let here = at(files, file, line);
    let before = format!("seq {} at {}", last.seq, at(files, last.file, last.line));
    let problem = |kind, message| {
        Some(Problem { kind, path: files[file].path.clone(), line, message, unfinished_last_line: false })
    };
    let expected = last.seq.saturating_add(1);
    if record.seq <= last.seq {
        return problem(
            ProblemKind::Inserted,
            format!(
                "{here}: seq {} does not follow {before}: a record was duplicated, replayed or inserted",
                record.seq
            ),
        );
    }
    if record.seq > expected {
        let missing = if record.seq - 1 == expected {
            format!("record {expected} missing")
        } else {
            format!("records {expected}..={} missing", record.seq - 1)
        };
        let chain = if record.prev_hash == last.hash {
            " (yet its prev_hash is that record's hash: seq was skipped when it was written)"
        } else {
            ""
        };
        return problem(
            ProblemKind::Removed,
            format!("{missing} before {here} (seq {}; the record before is {before}){chain}", record.seq),
        );
    }
    if record.prev_hash != last.hash {
        return problem(
            ProblemKind::Removed,
            format!(
                "{here}: seq {} does not chain to {before}: its prev_hash is {}, that record's hash is {}; \
                 records were removed and replaced, or the chain forked",
                record.seq,
                hex::encode(record.prev_hash),
                hex::encode(last.hash)
            ),
        );
    }
    None
}

/// The problem of a defective line.
fn defect_problem(
    files: &[AuditFile],
    p: &Pending,
    kind: ProblemKind,
    hasher: &Hasher,
    last: Option<&Good>,
    next: Option<(usize, u64)>,
) -> Problem {
    let here = at(files, p.file, p.line);
    let seq = p.defect.seq.map(|s| format!(" (seq {s})")).unwrap_or_default();
    let mut message = format!("{here}{seq}: {}", p.defect.why);
    match (kind, next) {
        (ProblemKind::Inserted, Some((file, line))) => {
            let to = last.map_or("the start of the chain".to_owned(), |g| format!("seq {}", g.seq));
            message.push_str(&format!(", and the next line ({}) chains to {to}", at(files, file, line)));
        }
        (_, None) if !p.defect.partial => message.push_str(" (the last line: it may also have been appended)"),
        _ => {}
    }
    if p.line == 1 && p.defect.seq.is_none() && files[p.file].first_seq == super::read::FirstSeq::Unknown {
        // A whole file whose first line is no record at all: often another program's log in the audit folder.
        message.push_str(&format!(
            "; if {} is not an audit file (another log kept in the audit folder), give the audit files by name or \
             move it out of the folder",
            shown(&files[p.file].path)
        ));
    }
    if let Some(hint) = p.defect.hint {
        message.push_str("; ");
        message.push_str(hint);
    } else if last.is_none() && p.defect.hash_mismatch {
        message.push_str(if hasher.is_keyed() {
            "; this is the first record: is the HMAC key the one the log was written with?"
        } else {
            "; this is the first record: if the log is keyed (audit.hmac_key_file), pass --hmac-key"
        });
    }
    Problem { kind, path: files[p.file].path.clone(), line: p.line, message, unfinished_last_line: p.defect.partial }
}

/// `path:line`.
fn at(files: &[AuditFile], file: usize, line: u64) -> String {
    format!("{}:{line}", shown(files.get(file).map_or(Path::new("?"), |f| f.path.as_path())))
}

// === impl Anchor ===

impl Anchor {
    /// Refuse two anchors for one seq with different hashes (the same anchor twice is harmless).
    ///
    /// # Errors
    ///
    /// [`AnchorError::Conflict`].
    pub fn check_all(anchors: &[Anchor]) -> Result<(), AnchorError> {
        for (i, a) in anchors.iter().enumerate() {
            if anchors[..i].iter().any(|b| b.seq == a.seq && b.hash != a.hash) {
                return Err(AnchorError::Conflict { seq: a.seq });
            }
        }
        Ok(())
    }
}

impl std::str::FromStr for Anchor {
    type Err = AnchorError;

    /// `SEQ:HASH`, the hash in hex (either case).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || AnchorError::Malformed(s.to_owned());
        let (seq, hex_hash) = s.trim().split_once(':').ok_or_else(malformed)?;
        // Digits only (no sign), and never 0: the first record is seq 1.
        if !seq.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let seq = seq.parse().ok().filter(|&seq| seq > 0).ok_or_else(malformed)?;
        let mut hash = [0; 32];
        hex::decode_to_slice(hex_hash, &mut hash).map_err(|_| malformed())?;
        Ok(Anchor { seq, hash })
    }
}

impl fmt::Display for Anchor {
    /// `SEQ:HASH`, as `--anchor` takes it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.seq, hex::encode(self.hash))
    }
}

// === impl ProblemKind ===

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProblemKind::Altered => "altered",
            ProblemKind::Inserted => "inserted",
            ProblemKind::Removed => "removed",
            ProblemKind::Rewritten => "rewritten",
        })
    }
}

// === impl Problem ===

impl fmt::Display for Problem {
    /// `kind: message`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

// === impl Report ===

impl fmt::Display for Report {
    /// The success line: `ok: N records, seq A..=B, last hash H (…)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let files = if self.files == 1 { "1 file".to_owned() } else { format!("{} files", self.files) };
        let mut how = match (self.keyed, self.keys) {
            (false, _) => "SHA-256, no HMAC key".to_owned(),
            (true, 1) => "HMAC-SHA256 with the given key".to_owned(),
            (true, n) => format!("HMAC-SHA256 with {n} keys in turn"),
        };
        if self.unkeyed_before {
            how.push_str(", after records without a key");
        }
        match self.anchors {
            0 => {}
            1 => how.push_str("; 1 anchor held"),
            n => how.push_str(&format!("; {n} anchors held")),
        }
        match (&self.first, &self.last) {
            (Some((first, _)), Some((last, hash))) => {
                write!(f, "ok: {} records in {files}, seq {first}..={last}, last hash {hash} ({how})", self.records)
            }
            _ => write!(f, "{files}, all empty"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::read::audit_files;
    use crate::audit::read::testing::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const KEY: &[u8] = b"0123456789abcdef0123";

    /// Verify the files (or folders) at `paths`.
    fn check(paths: &[PathBuf], hasher: &Hasher) -> Result<Report, Box<dyn std::error::Error>> {
        check_keys(paths, std::slice::from_ref(hasher))
    }

    /// Verify the files (or folders) at `paths` written under `keys`, oldest first.
    fn check_keys(paths: &[PathBuf], keys: &[Hasher]) -> Result<Report, Box<dyn std::error::Error>> {
        let files = audit_files(paths).map_err(|e| format!("{e:?}"))?;
        Ok(verify(&files, keys)?)
    }

    /// The problem's kind, file name and line.
    fn problem(report: &Report) -> Option<(ProblemKind, String, u64)> {
        report.problem.as_ref().map(|p| {
            let name = p.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            (p.kind, name, p.line)
        })
    }

    /// A chain of 10 records split into `audit.log.00000000000000000001` (1..=6) and `audit.log` (7..=10), with
    /// `change` applied to the lines first.
    fn two_files(
        dir: &Path,
        hasher: &Hasher,
        change: impl FnOnce(&mut Vec<Vec<u8>>),
    ) -> Result<(PathBuf, PathBuf), Box<dyn std::error::Error>> {
        let mut lines = simple_chain(hasher, 10);
        let (old, new) = (dir.join("audit.log.00000000000000000001"), dir.join("audit.log"));
        change(&mut lines);
        // The first six lines (after the change) go to the old file.
        let split = 6.min(lines.len());
        write(&old, &lines[..split])?;
        write(&new, &lines[split..])?;
        Ok((old, new))
    }

    #[test]
    fn an_intact_chain_in_two_files_verifies_in_any_order() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let (old, new) = two_files(dir.path(), &h, |_| {})?;
        for paths in [vec![old.clone(), new.clone()], vec![new, old], vec![dir.path().to_path_buf()]] {
            let report = check(&paths, &h)?;
            assert_eq!(report.problem, None, "{paths:?}");
            assert_eq!(report.records, 10);
            assert_eq!(report.first, Some((1, GENESIS.to_owned())));
            assert_eq!(report.last.as_ref().map(|l| l.0), Some(10));
            // These records end without the writer's close record (a log still written, or cut at the end).
            assert_eq!(report.notes.len(), 1, "{:?}", report.notes);
            assert!(report.notes[0].starts_with("the last record (seq 10) is not the writer's close record"));
            assert!(report.to_string().starts_with("ok: 10 records in 2 files, seq 1..=10, last hash "));
        }
        Ok(())
    }

    /// Anchors kept outside the log: held by the chain they were taken from, not by one rewritten from an anchored
    /// record (or before it) or cut back before it, noted when their record was rotated away.
    #[test]
    fn anchors_must_be_held_by_the_chain() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let lines = simple_chain(&h, 10);
        let anchor =
            |seq: usize| -> Result<Anchor, AnchorError> { format!("{seq}:{}", hash_of(&lines[seq - 1])).parse() };
        let (four, ten) = (anchor(4)?, anchor(10)?);
        let (old, new) = two_files(dir.path(), &h, |_| {})?;
        let files = audit_files(&[old.clone(), new.clone()]).map_err(|e| format!("{e:?}"))?;
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[four, ten, four])?;
        assert_eq!((&report.problem, report.anchors), (&None, 2));
        assert!(report.to_string().ends_with("(SHA-256, no HMAC key; 2 anchors held)"), "{report}");

        // Rewritten from seq 4 on (every hash after it recomputed, as anyone can without a key).
        let rewritten = |lines: &mut Vec<Vec<u8>>| {
            let specs: Vec<Spec> = (4..=10).map(|i| Spec::get("mallory", &format!("k{i}"))).collect();
            let tail = chain(&h, 4, &hash_of(&lines[2]), &specs);
            lines.splice(3.., tail);
        };
        let (old, new) = two_files(dir.path(), &h, rewritten)?;
        let files = audit_files(&[old, new]).map_err(|e| format!("{e:?}"))?;
        assert_eq!(verify(&files, std::slice::from_ref(&h))?.problem, None);
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[ten])?;
        assert_eq!(problem(&report), Some((ProblemKind::Rewritten, "audit.log".to_owned(), 4)));
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[four])?;
        assert_eq!(problem(&report), Some((ProblemKind::Rewritten, "audit.log.00000000000000000001".to_owned(), 4)));
        let message = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(message.starts_with("rewritten: ") && message.contains(&hash_of(&lines[3])), "{message}");

        // Cut back to seq 8: the anchor of seq 10 is missing at the end; the one of seq 4 holds.
        let (old, new) = two_files(dir.path(), &h, |lines| lines.truncate(8))?;
        let files = audit_files(&[old, new]).map_err(|e| format!("{e:?}"))?;
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[four, ten])?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log".to_owned(), 2)));
        let message = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(message.contains("the chain ends at seq 8, before the record kept as --anchor 10:"), "{message}");

        // Files that start after an anchored record: it is not in them (removed, or rotated away: not to be given
        // then); the one just before the first record is held if the first record chains to it.
        let six = anchor(6)?;
        let (_, new) = two_files(dir.path(), &h, |_| {})?;
        let files = audit_files(std::slice::from_ref(&new)).map_err(|e| format!("{e:?}"))?;
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[four, ten])?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log".to_owned(), 1)));
        let message = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(message.contains(&format!("these files start at seq 7, after the record kept as --anchor {four}")));
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[six, ten])?;
        assert_eq!((report.problem, report.anchors), (None, 2));
        // The older file deleted and the rest written anew from another prev_hash: the anchor before it tells.
        let (_, new) = two_files(dir.path(), &h, |lines| {
            let specs: Vec<Spec> = (7..=10).map(|i| Spec::get("mallory", &format!("k{i}"))).collect();
            lines.splice(6.., chain(&h, 7, &"ab".repeat(32), &specs));
        })?;
        let files = audit_files(&[new]).map_err(|e| format!("{e:?}"))?;
        assert_eq!(verify(&files, std::slice::from_ref(&h))?.problem, None);
        let report = verify_anchored(&files, std::slice::from_ref(&h), &[six])?;
        assert_eq!(problem(&report), Some((ProblemKind::Rewritten, "audit.log".to_owned(), 1)));
        Ok(())
    }

    #[test]
    fn anchors_are_read_as_seq_and_hash() -> TestResult {
        let hash = "9A".repeat(32);
        let anchor: Anchor = format!("42:{hash}").parse()?;
        assert_eq!((anchor.seq, anchor.hash), (42, [0x9a; 32]));
        assert_eq!(anchor.to_string(), format!("42:{}", hash.to_lowercase()));
        assert_eq!(format!(" 42:{hash}\n").parse::<Anchor>()?, anchor, "space around it, as pasted, is left out");
        let bad_seqs = [format!("-1:{hash}"), format!("+42:{hash}"), format!("0:{hash}"), format!("4 2:{hash}")];
        let bad_hashes = [format!("42:{}", &hash[2..]), format!("42:{hash}00"), format!("42: {hash}")];
        for bad in ["42", ":9a", "x:9a"].iter().copied().chain(bad_seqs.iter().chain(&bad_hashes).map(String::as_str)) {
            let e = bad.parse::<Anchor>().err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.contains("an anchor is SEQ:HASH"), "{bad}: {e}");
        }
        let other: Anchor = format!("42:{}", "00".repeat(32)).parse()?;
        assert!(Anchor::check_all(&[anchor, anchor]).is_ok());
        let e = Anchor::check_all(&[anchor, other]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(e.contains("two anchors for seq 42"), "{e}");
        Ok(())
    }

    #[test]
    fn a_chain_without_its_start_verifies_with_a_note() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let (_, new) = two_files(dir.path(), &h, |_| {})?;
        let report = check(&[new], &h)?;
        assert_eq!(report.problem, None);
        assert_eq!(report.notes.len(), 2);
        assert!(report.notes[0].starts_with("chain starts at seq 7 (prev_hash "), "{:?}", report.notes);
        Ok(())
    }

    #[test]
    fn a_rotated_file_compressed_with_gzip_is_read_and_verified() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let (old, _) = two_files(dir.path(), &h, |_| {})?;
        gzip(&old)?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(report.problem, None);
        assert_eq!((report.records, report.files), (10, 2));
        // Its content is checked as closely as a plain file's.
        let dir = tempfile::tempdir()?;
        let (old, _) = two_files(dir.path(), &h, |lines| {
            if let Some(at) = lines[2].windows(5).position(|w| w == b"alice") {
                lines[2][at + 4] = b'f';
            }
        })?;
        gzip(&old)?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log.00000000000000000001.gz".to_owned(), 3)));
        // And its name as a rotated file's: one whose first records were cut off is found out.
        let dir = tempfile::tempdir()?;
        let (old, _) = two_files(dir.path(), &h, |lines| drop(lines.drain(..2)))?;
        let compressed = gzip(&old)?;
        let report = check(&[compressed], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log.00000000000000000001.gz".to_owned(), 1)));
        Ok(())
    }

    /// While `gzip` runs (or after `gzip -k`) a rotated file and its compressed copy are both there: the copy is
    /// left out with a note, not read as every record a second time (reported as inserted).
    #[test]
    fn a_compressed_copy_beside_its_file_is_left_out_with_a_note() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let (old, _) = two_files(dir.path(), &h, |_| {})?;
        let copy = gzip(&old)?;
        std::fs::copy(&copy, dir.path().join("keep.gz"))?;
        two_files(dir.path(), &h, |_| {})?;
        std::fs::rename(dir.path().join("keep.gz"), &copy)?;
        let mut notes = Vec::new();
        let files = crate::audit::read::audit_files_noting(&[dir.path().to_path_buf()], &mut notes)
            .map_err(|e| format!("{e:?}"))?;
        assert_eq!(files.len(), 2);
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("is left out: by its name, a compressed copy of"), "{notes:?}");
        let report = verify(&files, std::slice::from_ref(&h))?;
        assert_eq!((report.problem, report.records), (None, 10));
        // A compressed file cut short fails to read, saying so.
        let bytes = std::fs::read(&copy)?;
        std::fs::write(&copy, &bytes[..bytes.len() / 2])?;
        let errors = audit_files(std::slice::from_ref(&copy)).err().map(|e| format!("{e:?}")).unwrap_or_default();
        let report = check(std::slice::from_ref(&copy), &h).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(errors.contains("gzip data cut short") || report.contains("gzip data cut short"), "{errors} {report}");
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn a_pipe_is_refused_rather_than_read_twice() -> TestResult {
        let dir = tempfile::tempdir()?;
        let fifo = dir.path().join("audit.log");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status()?;
        assert!(made.success());
        let errors = audit_files(std::slice::from_ref(&fifo)).err().ok_or("read")?;
        assert!(format!("{errors:?}").contains("not a regular file or a folder"), "{errors:?}");
        Ok(())
    }

    #[test]
    fn a_file_compressed_otherwise_is_refused_naming_its_format() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.log.00000000000000000001.xz");
        std::fs::write(&path, [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4])?;
        let errors = audit_files(std::slice::from_ref(&path)).err().ok_or("read")?;
        let text = errors.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ");
        assert!(text.contains("compressed with xz; only gzip is read: decompress it first (xz -d)"), "{text}");
        Ok(())
    }

    #[test]
    fn one_changed_byte_is_altered_at_its_line() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| {
            // seq 8: line 2 of audit.log; "alice" -> "alicf".
            if let Some(at) = lines[7].windows(5).position(|w| w == b"alice") {
                lines[7][at + 4] = b'f';
            }
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".to_owned(), 2)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("audit.log:2 (seq 8): the line's hash does not verify"), "{text}");
        assert_eq!(report.records, 7);
        Ok(())
    }

    #[test]
    fn a_deleted_line_is_removed_before_the_next() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| {
            lines.remove(3); // seq 4; seq 5 becomes line 4 of the old file
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log.00000000000000000001".to_owned(), 4)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.starts_with("removed: record 4 missing before "), "{text}");
        assert!(text.contains("audit.log.00000000000000000001:4"), "{text}");
        Ok(())
    }

    #[test]
    fn deleted_lines_across_files_name_the_missing_seqs() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        // seq 5..=8 deleted: the old file ends at 4 and audit.log starts at 9.
        let lines = simple_chain(&h, 10);
        write(&dir.path().join("audit.log.00000000000000000001"), &lines[..4])?;
        write(&dir.path().join("audit.log"), &lines[8..])?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log".to_owned(), 1)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.starts_with("removed: records 5..=8 missing before "), "{text}");
        Ok(())
    }

    #[test]
    fn a_forged_line_is_inserted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| {
            // A made-up record after seq 2, claiming to be seq 3 with a made-up hash.
            let (mut forged, _) = line(&h, 3, GENESIS, &Spec::get("mallory", "k"));
            let len = forged.len();
            forged[len - 4] = if forged[len - 4] == b'0' { b'1' } else { b'0' };
            lines.insert(2, forged);
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Inserted, "audit.log.00000000000000000001".to_owned(), 3)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("the next line (") && text.contains("chains to seq 2"), "{text}");
        Ok(())
    }

    /// The start of the oldest file cut off: its name (rotation names a file after its first record) gives it
    /// away. And a run that began after one that did not close the log is noted, where it began.
    #[test]
    fn a_first_file_that_starts_after_its_name_is_removed_and_unclosed_runs_are_noted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let (old, new) = two_files(dir.path(), &h, |lines| {
            lines.drain(..2);
        })?;
        let report = check(&[old.clone(), new.clone()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log.00000000000000000001".to_owned(), 1)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("records 1..=2 missing from the start of"), "{text}");
        // Named after a later record (its name was taken): fine, as rotation does it.
        std::fs::rename(&old, dir.path().join("audit.log.00000000000000000004"))?;
        assert_eq!(check(&[dir.path().to_path_buf()], &h)?.problem, None);

        let mut lines = simple_chain(&h, 3);
        let mut hash = split_line(lines[2].trim_ascii_end()).map(|(_, hash)| hash.to_owned()).unwrap_or_default();
        let mut text = String::new();
        crate::audit::writer::open_record(3, crate::audit::writer::Previous::NotClosed).write_body(4, &hash, &mut text);
        h.seal(&mut text, 0, &mut hash);
        lines.push(text.into_bytes());
        let log = dir.path().join("run.log");
        write(&log, &lines)?;
        let report = check(&[log], &h)?;
        assert_eq!(report.problem, None, "{report:?}");
        let note = "run.log:4: seq 4: the proxy started after a run that did not close the log";
        assert!(report.notes.iter().any(|n| n.contains(note)), "{:?}", report.notes);
        Ok(())
    }

    /// File names are shown with control characters escaped: a name cannot rewrite the line it is shown in.
    #[test]
    fn file_names_cannot_rewrite_the_verdict() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        let mut lines = simple_chain(&h, 3);
        lines[1][20] ^= 1;
        let log = dir.path().join("audit.log.\r\u{1b}[2Kok: 3 records");
        write(&log, &lines)?;
        let text = check(&[log], &h)?.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.starts_with("altered: ") && text.contains("audit.log.\\r\\u{1b}[2Kok: 3 records:2"), "{text}");
        Ok(())
    }

    /// A crash while a record was written, then a restart: the cut-off line stays, and the writer's record after it
    /// names the line's bytes (what the writer does). The chain verifies with a note, and checking goes on past it;
    /// a line that no such record vouches for is still a problem, however well-formed it looks.
    #[test]
    fn a_line_cut_off_by_a_crash_and_vouched_for_is_a_note_and_checking_goes_on() -> TestResult {
        let h = Hasher::keyed(KEY);
        /// Records 1..=3, the cut-off line (`torn`), the writer's record for `vouched` as seq 4, records 5..=10.
        fn crashed(h: &Hasher, torn: &[u8], vouched: &[u8]) -> Vec<Vec<u8>> {
            let mut lines = simple_chain(h, 3);
            let prev = split_line(lines[2].trim_ascii_end()).map(|(_, hash)| hash.to_owned()).unwrap_or_default();
            lines.push([torn, b"\n"].concat());
            let (mut text, mut hash) = (String::new(), prev);
            crate::audit::writer::cut_record(vouched).write_body(4, &hash, &mut text);
            h.seal(&mut text, 0, &mut hash);
            lines.push(text.into_bytes());
            let specs: Vec<Spec> = (5..=10).map(|i| Spec::get("alice", &format!("k{i}"))).collect();
            lines.extend(chain(h, 5, &hash, &specs));
            lines
        }
        let torn = &simple_chain(&h, 4)[3][..200];
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("audit.log");

        write(&log, &crashed(&h, torn, torn))?;
        let report = check(std::slice::from_ref(&log), &h)?;
        assert_eq!(report.problem, None, "{report:?}");
        assert_eq!(report.records, 10);
        assert!(report.notes.iter().any(|n| n.contains("audit.log:4: a record cut off")), "{report:?}");

        // A record changed after the crash is still found.
        let mut lines = crashed(&h, torn, torn);
        if let Some(at) = lines[8].windows(5).position(|w| w == b"alice") {
            lines[8][at + 4] = b'f';
        }
        write(&log, &lines)?;
        assert_eq!(
            problem(&check(std::slice::from_ref(&log), &h)?),
            Some((ProblemKind::Altered, "audit.log".to_owned(), 9))
        );

        // The writer's record names other bytes: the line is not what it vouched for.
        write(&log, &crashed(&h, torn, &torn[..199]))?;
        assert_eq!(
            problem(&check(std::slice::from_ref(&log), &h)?),
            Some((ProblemKind::Inserted, "audit.log".to_owned(), 4))
        );

        // A forged record (well-formed, its hash in capitals) before a genuine one, with no record vouching for it.
        let mut lines = simple_chain(&h, 10);
        let (forged, _) = line(&h, 4, GENESIS, &Spec::get("mallory", "k4"));
        lines.insert(3, String::from_utf8(forged)?.to_uppercase().into_bytes());
        write(&log, &lines)?;
        assert_eq!(problem(&check(&[log], &h)?), Some((ProblemKind::Inserted, "audit.log".to_owned(), 4)));
        Ok(())
    }

    #[test]
    fn a_duplicated_line_is_inserted() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| {
            let copy = lines[1].clone(); // seq 2, again after seq 8
            lines.insert(8, copy);
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Inserted, "audit.log".to_owned(), 3)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("seq 2 does not follow seq 8 at "), "{text}");
        Ok(())
    }

    #[test]
    fn a_cut_last_line_is_altered() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| {
            if let Some(last) = lines.last_mut() {
                last.truncate(last.len() - 20);
            }
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".to_owned(), 4)));
        // Only the newline missing: still reported.
        two_files(dir.path(), &h, |lines| {
            if let Some(last) = lines.last_mut() {
                last.pop();
            }
        })?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".to_owned(), 4)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("no final newline"), "{text}");
        Ok(())
    }

    #[test]
    fn a_line_that_is_not_a_record_is_altered() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |lines| lines[4] = b"hello\n".to_vec())?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log.00000000000000000001".to_owned(), 5)));
        Ok(())
    }

    /// Another program's log kept in the audit folder is still a problem (a file of records replaced whole must not
    /// pass), named with a hint.
    #[test]
    fn another_log_in_the_folder_is_reported_with_a_hint() -> TestResult {
        let dir = tempfile::tempdir()?;
        let h = Hasher::unkeyed();
        two_files(dir.path(), &h, |_| {})?;
        std::fs::write(dir.path().join("etcd-guard.log"), "2026-12-03T07:00:00Z INFO etcd-guard serving\n")?;
        let report = check(&[dir.path().to_path_buf()], &h)?;
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("etcd-guard.log:1") && text.contains("not an audit file"), "{text}");
        Ok(())
    }

    #[test]
    fn hmac_chains_verify_with_the_right_key_only() -> TestResult {
        let dir = tempfile::tempdir()?;
        let keyed = Hasher::keyed(KEY);
        two_files(dir.path(), &keyed, |_| {})?;
        let all = [dir.path().to_path_buf()];
        let report = check(&all, &keyed)?;
        assert_eq!(report.problem, None);
        assert!(report.to_string().contains("HMAC-SHA256"));

        let wrong = Hasher::keyed(b"0123456789abcdef0124");
        let report = check(&all, &wrong)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log.00000000000000000001".to_owned(), 1)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("HMAC key"), "{text}");
        let report = check(&all, &Hasher::unkeyed())?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log.00000000000000000001".to_owned(), 1)));

        // A record re-hashed without the key after a change does not pass with the key.
        two_files(dir.path(), &keyed, |lines| {
            let prev = hash_of(&lines[3]);
            lines[4] = line(&Hasher::unkeyed(), 5, &prev, &Spec::get("alice", "changed")).0;
        })?;
        let report = check(&all, &keyed)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log.00000000000000000001".to_owned(), 5)));
        Ok(())
    }

    /// Records 1..=5 under `old`, then 6..=9 under `new`, the first of them `at_change` (the open record of the
    /// key change record). Each line with its hash.
    fn changed_keys(old: &Hasher, new: &Hasher, at_change: Spec) -> Vec<Vec<u8>> {
        let mut lines = simple_chain(old, 5);
        let prev = lines.last().map(|l| hash_of(l));
        let later = [at_change, Spec::get("alice", "k7"), Spec::get("alice", "k8"), Spec::get("alice", "k9")];
        lines.extend(chain(new, 6, &prev.unwrap_or_default(), &later));
        lines
    }

    #[test]
    fn a_key_change_verifies_with_every_key_oldest_first_and_only_at_its_record() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (old, new) = (Hasher::keyed(KEY), Hasher::keyed(b"the key after the change"));
        let log = dir.path().join("audit.log");
        let files = [log.clone()];
        write(&log, &changed_keys(&old, &new, Spec::key_change()))?;

        let report = check_keys(&files, &[old.clone(), new.clone()])?;
        assert_eq!((report.problem.clone(), report.records), (None, 9), "{report:?}");
        let lines = changed_keys(&old, &new, Spec::key_change());
        let hash = hash_of(&lines[5]);
        let change = format!(
            "{}:6: seq 6: the chain goes on under --hmac-key #2 of 2 (the key change record, hash {hash})",
            shown(&log)
        );
        assert_eq!(report.notes.first(), Some(&change), "{:?}", report.notes);
        assert!(report.to_string().contains("with 2 keys in turn"), "{report}");
        // One key alone, or the keys the wrong way round (the chain never goes back to an earlier key).
        assert_eq!(problem(&check(&files, &new)?), Some((ProblemKind::Altered, "audit.log".into(), 1)));
        assert_eq!(problem(&check(&files, &old)?), Some((ProblemKind::Altered, "audit.log".into(), 6)));
        assert_eq!(
            problem(&check_keys(&files, &[new.clone(), old.clone()])?),
            Some((ProblemKind::Altered, "audit.log".into(), 6))
        );

        // Under a new key anywhere but at a key change record (a proxy's open record too): not a key change.
        for at_change in [Spec::get("alice", "k6"), Spec::open()] {
            write(&log, &changed_keys(&old, &new, at_change))?;
            assert_eq!(
                problem(&check_keys(&files, &[old.clone(), new.clone()])?),
                Some((ProblemKind::Altered, "audit.log".into(), 6))
            );
        }

        // A holder of the old key cuts the log back to the change and writes on under the old key: the chain
        // never reaches the new key.
        let mut forged = simple_chain(&old, 7);
        forged[5] = chain(&old, 6, &hash_of(&forged[4]), &[Spec::open()]).concat();
        let prev = hash_of(&forged[5]);
        forged[6] = chain(&old, 7, &prev, &[Spec::get("alice", "k7")]).concat();
        write(&log, &forged)?;
        let report = check_keys(&files, &[old.clone(), new.clone()])?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log".into(), 7)));
        let text = report.problem.map(|p| p.to_string()).unwrap_or_default();
        assert!(text.contains("ends (seq 7) under --hmac-key #1 of 2"), "{text}");
        assert_eq!(check(&files, &old)?.problem, None);

        // Older files rotated away: a set that starts under the new key starts there.
        write(&log, &changed_keys(&old, &new, Spec::key_change())[6..])?;
        let report = check_keys(&files, &[old, new])?;
        assert_eq!((report.problem.clone(), report.records), (None, 3), "{report:?}");
        assert!(
            report
                .notes
                .iter()
                .any(|n| n.contains("starts under --hmac-key #2 of 2 (the first record of these files)")),
            "{report:?}"
        );
        assert!(report.to_string().contains("with the given key"), "one key used: {report}");
        Ok(())
    }

    /// After the first record the chain moves one key at a time: a key given but never used means its records were
    /// removed. A key change record under the key before it is not one `audit change-key` wrote.
    #[test]
    fn a_key_change_skips_no_key_and_is_under_the_new_key() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (k1, k2, k3) =
            (Hasher::keyed(KEY), Hasher::keyed(b"the second key, 20 b"), Hasher::keyed(b"the third key, 20 by"));
        let log = dir.path().join("audit.log");
        let files = [log.clone()];
        write(&log, &changed_keys(&k1, &k3, Spec::key_change()))?;
        assert_eq!(check_keys(&files, &[k1.clone(), k3.clone()])?.problem, None);
        let report = check_keys(&files, &[k1.clone(), k2.clone(), k3.clone()])?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".into(), 6)), "{report:?}");
        // Older files rotated away: the first record may be under any key given.
        write(&log, &changed_keys(&k1, &k3, Spec::key_change())[6..])?;
        assert_eq!(check_keys(&files, &[k1.clone(), k2, k3])?.problem, None);

        // Sealed with the key before it, as whoever holds that key could write it (to pass for a clean end).
        write(&log, &changed_keys(&k1, &k1, Spec::key_change()))?;
        let report = check(&files, &k1)?;
        assert_eq!(problem(&report).map(|(_, _, line)| line), Some(6), "{report:?}");
        let text = report.problem.map(|p| p.message).unwrap_or_default();
        assert!(text.contains("a key change record under the key of the records before it"), "{text}");
        Ok(())
    }

    /// The same key given twice would read as a change that never happened: refused.
    #[test]
    fn a_key_given_twice_is_refused() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (a, b, c) = (dir.path().join("a.key"), dir.path().join("b.key"), dir.path().join("c.key"));
        std::fs::write(&a, KEY)?;
        std::fs::write(&b, b"another key of twenty bytes")?;
        std::fs::write(&c, [KEY, b"\n"].concat())?;
        assert_eq!(Hasher::chain_keys(&[a.clone(), b.clone()], true)?.len(), 3);
        let err = Hasher::chain_keys(&[a, b, c.clone()], false).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.starts_with(&format!("{}: the same HMAC key as ", c.display())) && err.contains("a.key"), "{err}");
        Ok(())
    }

    /// A key set for a log written without one: the keyed records that follow hold the unkeyed ones in place too —
    /// an unkeyed record rewritten, and every hash after it up to the key recomputed, no longer chains to them.
    #[test]
    fn a_chain_that_starts_unkeyed_verifies_only_as_written() -> TestResult {
        let dir = tempfile::tempdir()?;
        let key = Hasher::keyed(KEY);
        let log = dir.path().join("audit.log");
        let files = [log.clone()];
        let lines = changed_keys(&Hasher::unkeyed(), &key, Spec::key_change());
        write(&log, &lines)?;
        let keys = Hasher::chain_keys(&[], true)?;
        assert!(keys.is_empty(), "--unkeyed-before needs a key");
        let keys = [Hasher::unkeyed(), key.clone()];
        let report = check_keys(&files, &keys)?;
        assert_eq!((report.problem.clone(), report.records), (None, 9), "{report:?}");
        assert!(
            report.notes.iter().any(|n| n.contains("seq 6: the chain goes on under --hmac-key #1 of 1")),
            "{report:?}"
        );
        assert!(report.to_string().contains("HMAC-SHA256 with the given key, after records without a key"), "{report}");
        // Without `--unkeyed-before`, or without the key: the problem says what is missing.
        let report = check(&files, &key)?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".into(), 1)));
        let text = report.problem.map(|p| p.message).unwrap_or_default();
        assert!(text.contains("it verifies without a key") && text.contains("--unkeyed-before"), "{text}");
        let report = check(&files, &Hasher::unkeyed())?;
        assert_eq!(problem(&report), Some((ProblemKind::Altered, "audit.log".into(), 6)));
        let text = report.problem.map(|p| p.message).unwrap_or_default();
        assert!(text.contains("it is a key change record") && text.contains("oldest first"), "{text}");

        let mut rewritten =
            chain(&Hasher::unkeyed(), 1, GENESIS, &[Spec::get("alice", "k1"), Spec::get("alice", "k2")]);
        let prev = hash_of(&rewritten[1]);
        let forged = [Spec::denied_put("mallory", "k3"), Spec::get("alice", "k4"), Spec::get("alice", "k5")];
        rewritten.extend(chain(&Hasher::unkeyed(), 3, &prev, &forged));
        rewritten.extend_from_slice(&lines[5..]);
        write(&log, &rewritten)?;
        let report = check_keys(&files, &keys)?;
        assert_eq!(problem(&report), Some((ProblemKind::Removed, "audit.log".into(), 6)), "{report:?}");
        Ok(())
    }

    #[test]
    fn a_key_file_is_read() -> TestResult {
        let dir = tempfile::tempdir()?;
        let key = dir.path().join("audit-hmac.key");
        std::fs::write(&key, [KEY, b"\n"].concat())?;
        two_files(dir.path(), &Hasher::keyed(KEY), |_| {})?;
        let report = check(&[dir.path().to_path_buf()], &Hasher::from_key_file(&key)?)?;
        assert_eq!(report.problem, None);
        assert_eq!(report.files, 2, "the key file is not an audit file");
        Ok(())
    }

    #[test]
    fn empty_files_only() -> TestResult {
        let dir = tempfile::tempdir()?;
        write(&dir.path().join("audit.log"), &[])?;
        let report = check(&[dir.path().to_path_buf()], &Hasher::unkeyed())?;
        assert_eq!(report.problem, None);
        assert_eq!(report.to_string(), "1 file, all empty");
        Ok(())
    }
}
