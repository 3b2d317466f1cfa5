//! The audit writer: a bounded queue filled by the request path and one dedicated thread that numbers, chains,
//! serialises and writes records in batches.
//!
//! Guarantees:
//! - a request's record is queued before its answer is sent, and [`AuditLog::close`] writes everything queued,
//!   so a clean shutdown loses nothing that was answered; with `answer_after: written` (or `synced`) the answer
//!   waits until the record is in the file (and synced), so a crash loses nothing that was answered either;
//! - when the queue is full, requests wait; records are not dropped to make room;
//! - when a record cannot be written (disk full, folder removed, permission), the writer keeps the records and
//!   retries; with `on_write_failure: deny` (the default) new requests are refused with `Unavailable` meanwhile,
//!   with `allow` they are served and records beyond the retry buffer are counted as lost and noted in the log
//!   once writing works again;
//! - the file is rotated by size; rotated files are never written again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, oneshot};
use tonic::{Code, Status};
use tracing::{error, info, warn};

use super::chain::{self, GENESIS, Hasher};
use super::record::{Decision, Event, Ops, Record, Subject};
use crate::config::{AnswerAfter, Audit as AuditConfig, AuditOutput, OnWriteFailure};

/// How long the writer waits before retrying a failed write.
const RETRY: Duration = Duration::from_millis(200);

/// While records keep coming, the writer sleeps this long, then writes everything that arrived meanwhile in one
/// batch; only after a window that brought nothing does it wait for the next record (and get woken by its sender).
/// Under load this turns a wake-up of the writer (a futex call on the request path, two context switches), a
/// `write` and a `stat` per record into one per window; a record reaches the file at most this much later.
const BATCH_WINDOW: Duration = Duration::from_millis(5);

/// The message a request gets while the audit log cannot be written.
pub const AUDIT_UNAVAILABLE: &str = "etcd-guard: the audit log cannot be written";

/// Why the audit log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit: {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("audit: {0}")]
    Key(#[from] chain::KeyError),
    #[error(
        "audit: {path}: the last record does not verify{keyed}; refusing to continue its chain. If \
         audit.hmac_key_file was changed without `etcd-guard audit change-key`, restore the key the log is written \
         under, and change it with that command (proxy stopped). If that command was run for this key, the log has \
         lost records since (removed or replaced): keep the files for review and do not run it again; move them \
         away to start a new chain"
    )]
    BrokenTail { path: PathBuf, keyed: &'static str },
    #[error("audit: {path}: the last record is not an audit record: {reason}")]
    NotARecord { path: PathBuf, reason: String },
    #[error("audit: {0}")]
    KeyChange(String),
    #[error(
        "audit: {path}: another etcd-guard writes an audit log in this folder (it holds the folder's lock); two \
         writers would interleave their chains. Give each instance a folder of its own"
    )]
    Locked { path: PathBuf },
}

// === impl AuditError ===

impl AuditError {
    /// The last record of the file at `path` does not verify under `hasher`.
    fn broken_tail(path: PathBuf, hasher: &Hasher) -> AuditError {
        let keyed = if hasher.is_keyed() { " with the configured HMAC key" } else { " (unkeyed)" };
        AuditError::BrokenTail { path, keyed }
    }
}

/// Counters for metrics and tests.
#[derive(Debug, Default)]
pub struct AuditStats {
    pub written: AtomicU64,
    /// The `seq` of the last record written (0 before the first).
    pub last_seq: AtomicU64,
    pub write_errors: AtomicU64,
    pub lost: AtomicU64,
    pub queued: AtomicUsize,
}

/// The request path's handle on the audit log. Cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<Msg>,
    on_failure: OnWriteFailure,
    answer_after: AnswerAfter,
    failing: AtomicBool,
    closed: AtomicBool,
    /// Submissions between their `closed` check and their send (see [`AuditLog::close`]).
    sending: AtomicUsize,
    next_stream: AtomicU64,
    stats: Arc<AuditStats>,
    /// Records still unwritten when the writer gave up on a shutdown's flush (the log kept failing).
    unwritten: AtomicU64,
}

enum Msg {
    /// A record, and whom to tell once it is in the file (`answer_after: written` or `synced`).
    Record(Record, Option<Written>),
    Flush(oneshot::Sender<()>),
}

/// Told `true` once a record is written (and synced, with `answer_after: synced`), `false` if that failed; dropped
/// without a word if the record was dropped (`on_write_failure: allow` past the retry buffer).
type Written = oneshot::Sender<bool>;

// === impl AuditLog ===

impl AuditLog {
    /// No auditing (`audit: { enabled: false }`).
    pub fn disabled() -> AuditLog {
        AuditLog { inner: None }
    }

    /// Open the output, continue the chain from the last record written, and start the writer thread.
    pub fn open(config: &AuditConfig) -> Result<AuditLog, AuditError> {
        if !config.enabled {
            return Ok(AuditLog::disabled());
        }
        let hasher = match &config.hmac_key_file {
            Some(path) => Hasher::from_key_file(path)?,
            None => Hasher::unkeyed(),
        };
        let (sink, seq, prev, previous) = match &config.output {
            AuditOutput::Stdout => (Sink::Stdout, 0, GENESIS.to_string(), Previous::None),
            AuditOutput::File(path) => {
                let (file, seq, prev, previous) =
                    FileSink::open(path, config.max_file_bytes, config.max_files, &hasher)?;
                (Sink::File(file), seq, prev, previous)
            }
        };
        if previous == Previous::NotClosed {
            warn!(
                after_seq = seq,
                "audit: the log's last record is not a close record: the previous run stopped without closing it (crash, kill), or records were removed from its end"
            );
        }
        let log = AuditLog::start(config, sink, hasher, seq, prev)?;
        // Every start is in the chain, with what it found: a restart, and a tail that ends without a close, are
        // visible to a reviewer (and to `audit verify`).
        if let Some(inner) = &log.inner
            && inner.tx.try_send(Msg::Record(open_record(seq, previous), None)).is_ok()
        {
            inner.stats.queued.fetch_add(1, Ordering::Relaxed);
        }
        Ok(log)
    }

    /// Start the writer thread on an open sink whose chain stands at `seq`, `prev`.
    fn start(config: &AuditConfig, sink: Sink, hasher: Hasher, seq: u64, prev: String) -> Result<AuditLog, AuditError> {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(AuditStats::default());
        // Where the chain stands in the folder (the records the cut of a crash added included), so that the gauge
        // does not read 0 before this run's first write.
        stats.last_seq.store(seq, Ordering::Relaxed);
        let inner = Arc::new(Inner {
            tx,
            on_failure: config.on_write_failure,
            answer_after: config.answer_after,
            failing: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            sending: AtomicUsize::new(0),
            next_stream: AtomicU64::new(1),
            stats: stats.clone(),
            unwritten: AtomicU64::new(0),
        });
        let writer = Writer {
            sink,
            answer_after: config.answer_after,
            written: Vec::new(),
            hasher,
            seq,
            prev,
            pending: Vec::new(),
            cap: config.queue.max(1),
            buf: String::with_capacity(1 << 16),
            saved_prev: String::new(),
            shared: inner.clone(),
            lost_reported: 0,
            last_error_log: None,
        };
        std::thread::Builder::new()
            .name("etcd-guard-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| AuditError::Io { path: PathBuf::from("<audit writer thread>"), source })?;
        // What an operator checks after changing them: when answers may leave, and what a failing log does.
        info!(answer_after = ?config.answer_after, on_write_failure = ?config.on_write_failure, "audit writer started");
        Ok(AuditLog { inner: Some(inner) })
    }

    pub fn is_enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Whether a new request may be served now. `Err(Unavailable)` while records cannot be written (with
    /// `on_write_failure: deny`) and after shutdown began.
    pub fn admit(&self) -> Result<(), Status> {
        let Some(inner) = &self.inner else { return Ok(()) };
        if inner.closed.load(Ordering::SeqCst) {
            return Err(Status::unavailable("etcd-guard: shutting down"));
        }
        if inner.on_failure == OnWriteFailure::Deny && inner.failing.load(Ordering::Relaxed) {
            return Err(Status::unavailable(AUDIT_UNAVAILABLE));
        }
        Ok(())
    }

    /// Queue a record. Waits while the queue is full. `Err(Unavailable)` if the record will not be written in
    /// time for the answer to count as audited: the caller must not serve the request then.
    pub async fn submit(&self, record: Record) -> Result<(), Status> {
        let Some(inner) = &self.inner else { return Ok(()) };
        // Counted off also when the caller is dropped while it waits (a client that went away).
        let _sending = Sending::new(&inner.sending);
        inner.submit(record).await
    }

    /// Queue a record without waiting (for records written from `Drop`); counted as lost if the queue is full.
    pub fn submit_now(&self, record: Record) {
        let Some(inner) = &self.inner else { return };
        if inner.closed.load(Ordering::SeqCst) {
            // Too late for the file: at least counted (etcd_guard_audit_records_lost_total).
            inner.stats.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match inner.tx.try_send(Msg::Record(record, None)) {
            Ok(()) => {
                inner.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(Msg::Record(record, _))) => {
                // Do not block a destructor: hand the record to a task if there is a runtime.
                let inner = inner.clone();
                match tokio::runtime::Handle::try_current() {
                    Ok(handle) => {
                        handle.spawn(async move {
                            let _ = inner.submit(record).await;
                        });
                    }
                    Err(_) => {
                        inner.stats.lost.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(_) => {
                inner.stats.lost.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A new stream id.
    pub fn stream_id(&self) -> Option<u64> {
        self.inner.as_ref().map(|i| i.next_stream.fetch_add(1, Ordering::Relaxed))
    }

    /// Counters (None when auditing is off).
    pub fn stats(&self) -> Option<Arc<AuditStats>> {
        self.inner.as_ref().map(|i| i.stats.clone())
    }

    /// Whether records are failing to be written right now.
    pub fn is_failing(&self) -> bool {
        self.inner.as_ref().is_some_and(|i| i.failing.load(Ordering::Relaxed))
    }

    /// Stop taking records, write everything queued, sync the file. Requests that try to submit afterwards are
    /// refused, so every answered request is in the log when this returns. Returns how many records could not be
    /// written (the log kept failing, or the deadline passed): 0 when everything is in the file.
    pub async fn close(&self, timeout: Duration) -> u64 {
        let Some(inner) = &self.inner else { return 0 };
        inner.closed.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + timeout;
        while inner.sending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (ack_tx, ack_rx) = oneshot::channel();
        let mut unwritten = 0;
        if inner.tx.send(Msg::Flush(ack_tx)).await.is_ok() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, ack_rx).await {
                Ok(_) => unwritten = inner.unwritten.load(Ordering::SeqCst),
                Err(_) => {
                    // Still queued or being written: not known to be in the file.
                    unwritten = (inner.stats.queued.load(Ordering::SeqCst) as u64).max(1);
                }
            }
        }
        if unwritten > 0 {
            error!(unwritten, "audit: records could not be written before the shutdown; they are lost");
            inner.stats.lost.fetch_add(unwritten, Ordering::Relaxed);
        }
        unwritten
    }
}

/// One record on its way into the queue ([`AuditLog::close`] waits for them); counted off when dropped.
struct Sending<'a>(&'a AtomicUsize);

impl<'a> Sending<'a> {
    fn new(count: &'a AtomicUsize) -> Sending<'a> {
        count.fetch_add(1, Ordering::SeqCst);
        Sending(count)
    }
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// === impl Inner ===

impl Inner {
    async fn submit(&self, record: Record) -> Result<(), Status> {
        if self.closed.load(Ordering::SeqCst) {
            // Too late for the file: at least counted (etcd_guard_audit_records_lost_total).
            self.stats.lost.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unavailable("etcd-guard: shutting down"));
        }
        if self.on_failure == OnWriteFailure::Deny && self.failing.load(Ordering::Relaxed) {
            // Keep the record if there is room (it is written once the log works again), but do not wait.
            if self.tx.try_send(Msg::Record(record, None)).is_err() {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.queued.fetch_add(1, Ordering::Relaxed);
            }
            return Err(Status::unavailable(AUDIT_UNAVAILABLE));
        }
        let stopped = || Status::unavailable("etcd-guard: audit writer stopped");
        // With `answer_after: written` or `synced` the answer waits for the writer's word, except while the log is
        // failing with `on_write_failure: allow` (requests are served then, written or not).
        let wait = self.answer_after != AnswerAfter::Queued && !self.failing.load(Ordering::Relaxed);
        let (written, word) = if wait {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        // Queue without waiting when there is room (nearly always); only a full queue needs the waiting send, whose
        // future is boxed so that it does not make every call's future larger.
        match self.tx.try_send(Msg::Record(record, written)) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => Box::pin(self.tx.send(msg)).await.map_err(|_| stopped())?,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stats.lost.fetch_add(1, Ordering::Relaxed);
                return Err(stopped());
            }
        }
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match word {
            None => Ok(()),
            Some(rx) => match Box::pin(rx).await {
                Ok(true) => Ok(()),
                // Not written (or dropped, or the writer is gone): an answer without its record is not given, unless
                // the operator chose to serve requests while the log fails.
                _ if self.on_failure == OnWriteFailure::Allow => Ok(()),
                _ => Err(Status::unavailable(AUDIT_UNAVAILABLE)),
            },
        }
    }
}

// === the writer thread ===

struct Writer {
    sink: Sink,
    answer_after: AnswerAfter,
    /// Whom to tell about the records written by the current `write_pending`.
    written: Vec<Written>,
    hasher: Hasher,
    /// The last seq written.
    seq: u64,
    /// The hash of the last record written.
    prev: String,
    pending: Vec<(Record, Option<Written>)>,
    cap: usize,
    buf: String,
    /// `prev` before the record being added, to take it back (a reused buffer).
    saved_prev: String,
    shared: Arc<Inner>,
    /// How many of `stats.lost` already have a note in the log.
    lost_reported: u64,
    last_error_log: Option<Instant>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
        let mut failed_attempts = 0u32;
        // A flush is asked for by `close`: once it is answered the writer ends, and gives up the file and the
        // folder's lock.
        let mut closing = false;
        // The last window brought nothing: wait for a record (woken by its sender) rather than sleep on.
        let mut quiet = true;
        loop {
            // A failing log is tried again every RETRY also with nothing to write (a failed sync clears only
            // with a sync that succeeds).
            if quiet && self.pending.is_empty() && acks.is_empty() && !self.shared.failing.load(Ordering::Relaxed) {
                match rx.blocking_recv() {
                    Some(msg) => self.take(msg, &mut acks),
                    None => break,
                }
            }
            // Senders do not wake a writer that sleeps here rather than in `blocking_recv`. Answers that wait for
            // their record are not kept waiting for a window: what arrived while the last batch was written is the
            // next batch.
            if self.answer_after == AnswerAfter::Queued {
                std::thread::sleep(BATCH_WINDOW);
            }
            quiet = true;
            loop {
                if self.pending.len() >= self.cap && !self.drop_overflow() {
                    break;
                }
                match rx.try_recv() {
                    Ok(msg) => {
                        quiet = false;
                        self.take(msg, &mut acks);
                    }
                    Err(_) => break,
                }
            }
            let wrote = self.write_pending();
            let synced = self.tell_written(wrote.is_ok());
            let wrote = match wrote {
                // With `synced`, a failed sync fails the log as a failed write does (after an fsync error the
                // kernel may have dropped the pages), and it works again only once a sync succeeds.
                Ok(()) if !synced => Err(io::Error::other("syncing the written records failed")),
                Ok(()) if self.answer_after == AnswerAfter::Synced && self.shared.failing.load(Ordering::Relaxed) => {
                    self.sink.sync()
                }
                other => other,
            };
            match wrote {
                Ok(()) => {
                    failed_attempts = 0;
                    if self.shared.failing.swap(false, Ordering::Relaxed) {
                        info!("audit: records are being written again");
                    }
                    if !acks.is_empty() {
                        if let Err(e) = self.sink.sync() {
                            error!(error = %e, "audit: sync at shutdown failed");
                            self.shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        closing = true;
                    }
                }
                Err(e) => {
                    failed_attempts += 1;
                    self.shared.failing.store(true, Ordering::Relaxed);
                    self.shared.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if self.last_error_log.is_none_or(|t| now.duration_since(t) > Duration::from_secs(5)) {
                        self.last_error_log = Some(now);
                        error!(error = %e, pending = self.pending.len(), "audit: cannot write records");
                    }
                    // A shutdown waits a bounded time for a log that does not come back; it is told how many
                    // records are left.
                    if !acks.is_empty() && failed_attempts > 25 {
                        closing = true;
                    }
                    std::thread::sleep(RETRY);
                }
            }
            if closing {
                break;
            }
        }
        // Closed, or every sender is gone: write what is left.
        while let Ok(msg) = rx.try_recv() {
            self.take(msg, &mut acks);
        }
        let wrote = self.write_pending();
        let _ = self.tell_written(wrote.is_ok());
        let _ = self.sink.sync();
        self.shared.unwritten.store(self.pending.len() as u64, Ordering::SeqCst);
        // The file and the folder's lock are given up before `close` hears back, so the folder is free for the
        // next writer when it returns.
        drop(self);
        for ack in acks {
            let _ = ack.send(());
        }
    }

    fn take(&mut self, msg: Msg, acks: &mut Vec<oneshot::Sender<()>>) {
        match msg {
            Msg::Record(r, written) => {
                self.shared.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.pending.push((r, written));
            }
            Msg::Flush(ack) => {
                // The last record of a run that closed cleanly.
                self.pending.push((close_record(), None));
                acks.push(ack);
            }
        }
    }

    /// With `allow`, a failing log must not hold up requests: past the retry buffer, records are dropped and
    /// counted. Returns whether there is room again.
    fn drop_overflow(&mut self) -> bool {
        if self.shared.on_failure == OnWriteFailure::Allow && self.shared.failing.load(Ordering::Relaxed) {
            let n = self.pending.len().saturating_sub(self.cap / 2);
            if n > 0 {
                self.pending.drain(self.cap / 2..);
                self.shared.stats.lost.fetch_add(n as u64, Ordering::Relaxed);
            }
            return true;
        }
        false
    }

    /// Serialise and write every pending record, in as few writes as rotation allows. On failure nothing of the
    /// failed write is consumed: the chain state is restored and a partial write is cut off, so the retry writes
    /// the same lines.
    fn write_pending(&mut self) -> io::Result<()> {
        // Records per write: all that fit in the active file, halved after each failed write (a nearly full disk
        // takes what it has room for, so the backlog shrinks), down to one.
        let mut limit = usize::MAX;
        loop {
            let lost_now = self.shared.stats.lost.load(Ordering::Relaxed).saturating_sub(self.lost_reported);
            if self.pending.is_empty() && lost_now == 0 {
                return Ok(());
            }
            let room = self.sink.room();
            let (seq0, prev0) = (self.seq, self.prev.clone());
            self.buf.clear();
            if lost_now > 0 {
                self.append(&lost_record(lost_now));
            }
            // Take the records that fit in the active file (at least one), so rotation happens between them.
            let pending = std::mem::take(&mut self.pending);
            let mut taken = 0;
            for (r, _) in &pending {
                if taken == limit {
                    break;
                }
                let (len, seq) = (self.buf.len(), self.seq);
                self.saved_prev.clone_from(&self.prev);
                self.append(r);
                if self.buf.len() as u64 > room && !(taken == 0 && lost_now == 0) {
                    self.buf.truncate(len);
                    self.seq = seq;
                    std::mem::swap(&mut self.prev, &mut self.saved_prev);
                    break;
                }
                taken += 1;
            }
            self.pending = pending;
            match self.sink.write(self.buf.as_bytes(), seq0 + 1) {
                Ok(()) => {
                    self.written.extend(self.pending.drain(..taken).filter_map(|(_, w)| w));
                    self.lost_reported += lost_now;
                    self.shared.stats.written.fetch_add(taken as u64, Ordering::Relaxed);
                    self.shared.stats.last_seq.store(self.seq, Ordering::Relaxed);
                }
                Err(e) => {
                    (self.seq, self.prev) = (seq0, prev0);
                    if taken > 1 {
                        limit = taken / 2;
                        continue;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Tell the answers waiting for the records of the last `write_pending` whether they may be given: yes once
    /// written (`answer_after: written`) or written and synced (`synced`); no if the write or the sync failed, and
    /// then also for every record still pending (each is written later, and its answer has been refused).
    fn tell_written(&mut self, wrote: bool) -> bool {
        // The records in `written` are in the file, also when a later part of the same batch failed.
        let mut ok = true;
        if !self.written.is_empty()
            && self.answer_after == AnswerAfter::Synced
            && let Err(e) = self.sink.sync()
        {
            warn!(error = %e, "audit: sync failed");
            // Failing before the refused answers hear of it: a caller that sees its refusal sees the log fail.
            // (Counted as a write error by the caller.)
            self.shared.failing.store(true, Ordering::Relaxed);
            ok = false;
        }
        for w in self.written.drain(..) {
            let _ = w.send(ok);
        }
        if !wrote || !ok {
            for w in self.pending.iter_mut().filter_map(|(_, w)| w.take()) {
                let _ = w.send(false);
            }
        }
        ok
    }

    fn append(&mut self, r: &Record) {
        self.seq += 1;
        let start = self.buf.len();
        r.write_body(self.seq, &self.prev, &mut self.buf);
        self.hasher.seal(&mut self.buf, start, &mut self.prev);
    }
}

/// The `rpc` of the record the writer puts after a line cut off by a crash ([`cut_record`]).
pub const CUT_RPC: &str = "etcd-guard/AuditCut";

/// The record that follows a line cut off by a crash (written when the proxy starts again): its op names the cut-off
/// line's length and SHA-256 (`{"op":"cut","bytes":N,"sha256":"…"}`), which `audit verify` checks the line against.
pub fn cut_record(line: &[u8]) -> Record {
    let sha256 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(line));
    let mut ops = Ops::new();
    ops.op("cut", |op| {
        op.num_always("bytes", i64::try_from(line.len()).unwrap_or(i64::MAX));
        op.text("sha256", &sha256);
    });
    Record {
        subject: Arc::new(Subject::proxy()),
        time: SystemTime::now(),
        rpc: CUT_RPC,
        event: Event::Call,
        stream: None,
        ops: ops.finish(),
        decision: Decision::Allow,
        reason: "the line before this record was cut off (the proxy stopped while writing it); what it said is lost"
            .into(),
        code: Code::DataLoss,
        revision: None,
        latency_us: 0,
    }
}

/// The `rpc` of the record a writer starts with (`open_record`).
pub const OPEN_RPC: &str = "etcd-guard/AuditOpen";

/// The `rpc` of the record a writer ends with when it is closed (a clean shutdown).
pub const CLOSE_RPC: &str = "etcd-guard/AuditClose";

/// The RPC of the writer's record noting records lost while the log failed.
pub const LOST_RPC: &str = "etcd-guard/AuditLost";

/// The RPC of the record that moves the chain to a new HMAC key ([`change_key`]).
pub const KEY_CHANGE_RPC: &str = "etcd-guard/AuditKeyChange";

/// The RPCs of the records the writer writes on its own behalf.
pub const OWN_RPCS: [&str; 5] = [OPEN_RPC, CLOSE_RPC, CUT_RPC, LOST_RPC, KEY_CHANGE_RPC];

/// Whether the record `line` ends the log as a clean shutdown does: a close record, or a key change made after one
/// (`{"op":"key_change",…,"previous":"closed"}`).
pub(super) fn ends_cleanly(line: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Own {
        rpc: String,
        #[serde(default)]
        ops: Vec<OwnOp>,
    }
    #[derive(serde::Deserialize)]
    struct OwnOp {
        #[serde(default)]
        previous: Option<String>,
    }
    match serde_json::from_slice::<Own>(line) {
        Ok(own) if own.rpc == CLOSE_RPC => true,
        Ok(own) if own.rpc == KEY_CHANGE_RPC => {
            matches!(own.ops.as_slice(), [op] if op.previous.as_deref() == Some("closed"))
        }
        _ => false,
    }
}

/// Where [`change_key`] left the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyChange {
    /// The log's active file.
    pub log: PathBuf,
    /// The seq and hash of the record that moved the chain to the new key (the first under it).
    pub seq: u64,
    pub hash: String,
    /// The hash of the last record under the old key (the change record's `prev_hash`).
    pub after_hash: String,
}

/// Move the audit log of `config` to the HMAC key `new`, with no proxy writing it (the folder's lock is taken): its
/// last record must verify under the configured key (`audit.hmac_key_file`, or none: a log written unkeyed); a
/// record under `new` saying so is appended (after the record vouching for a line a crash cut off, if there is one)
/// and synced. From then on the proxy must run with `new` as its `hmac_key_file` — it refuses the log otherwise —
/// and `audit verify` takes both keys, oldest first.
///
/// The change is a record in the log, made by whoever holds the new key, rather than a setting the proxy would
/// apply at every start: a holder of the old key who cut the log back to before the change and wrote on under the
/// old key would have the proxy refuse the log, not continue it.
///
/// # Errors
///
/// The log cannot be read, written or locked, its last record does not verify under the configured key, it holds no
/// record yet, `new` is the key in use or a record of the log is under it already (each key is used once), or the
/// audit log is standard output.
pub fn change_key(config: &AuditConfig, new: &Hasher) -> Result<KeyChange, AuditError> {
    let AuditOutput::File(path) = &config.output else {
        return Err(AuditError::KeyChange(
            "audit.file is standard output: there is no log to change the key of".into(),
        ));
    };
    let old = match &config.hmac_key_file {
        Some(key) => Hasher::from_key_file(key)?,
        None => Hasher::unkeyed(),
    };
    if old.same_key(new) {
        return Err(AuditError::KeyChange("the new key is the one audit.hmac_key_file names already".into()));
    }
    let no_record = || {
        AuditError::KeyChange(format!(
            "{}: no record yet: set audit.hmac_key_file to the new key instead (a new log starts under it)",
            path.display()
        ))
    };
    // A log not there at all is not created just to be refused.
    let rotated = rotated_files_of(path, true).or_else(|e| match e.kind() {
        io::ErrorKind::NotFound => Ok(Vec::new()),
        _ => Err(AuditError::Io { path: path.clone(), source: e }),
    })?;
    if rotated.is_empty() && !path.exists() {
        return Err(no_record());
    }
    // A key is used once: records already under it are an earlier era of this log (going back to it would make
    // the log unverifiable), or the trace of a change to it whose record is gone since.
    let files = rotated.iter().map(|(f, _)| f.as_path()).chain(Some(path.as_path()).filter(|p| p.exists()));
    let used = super::verify::first_line_under(files, new)
        .map_err(|(at, source)| AuditError::Io { path: at.to_path_buf(), source })?;
    if let Some((file, number)) = used {
        return Err(AuditError::KeyChange(format!(
            "{}:{number}: a record of this log is under the new key already: each key is used once (a log back under \
             an earlier key cannot be verified). If `audit change-key` was run for this key and the log is under the \
             old one again, records were removed since: keep the files for review",
            file.display()
        )));
    }
    let (mut sink, seq, prev, previous) =
        FileSink::open(path, config.max_file_bytes, config.max_files, &old).map_err(|e| match e {
            AuditError::BrokenTail { path, .. } => AuditError::KeyChange(format!(
                "{}: the last record does not verify {}: the configuration must name the key the log is written \
                 under now",
                path.display(),
                if old.is_keyed() { "under audit.hmac_key_file" } else { "without a key (no audit.hmac_key_file)" }
            )),
            e => e,
        })?;
    if seq == 0 {
        return Err(no_record());
    }
    let mut text = String::new();
    key_change_record(seq, previous, old.is_keyed()).write_body(seq + 1, &prev, &mut text);
    let mut hash = String::new();
    new.seal(&mut text, 0, &mut hash);
    let io_err = |source| AuditError::Io { path: path.clone(), source };
    sink.write(text.as_bytes(), seq + 1).map_err(io_err)?;
    sink.sync().map_err(io_err)?;
    Ok(KeyChange { log: path.clone(), seq: seq + 1, hash, after_hash: prev })
}

/// `{"op":"key_change","after_seq":N,"from":"hmac|unkeyed","previous":"closed|not_closed"}`: the chain goes on under
/// a new HMAC key from this record on.
fn key_change_record(after_seq: u64, previous: Previous, from_keyed: bool) -> Record {
    let mut ops = Ops::new();
    ops.op("key_change", |op| {
        op.num_always("after_seq", i64::try_from(after_seq).unwrap_or(i64::MAX));
        op.text("from", if from_keyed { "hmac" } else { "unkeyed" });
        op.text("previous", if previous == Previous::Closed { "closed" } else { "not_closed" });
    });
    Record {
        subject: Arc::new(Subject::proxy()),
        time: SystemTime::now(),
        rpc: KEY_CHANGE_RPC,
        event: Event::Call,
        stream: None,
        ops: ops.finish(),
        decision: Decision::Allow,
        reason: "the HMAC key was changed (etcd-guard audit change-key): this record and those after it are under the \
                 new key"
            .into(),
        code: Code::Ok,
        revision: None,
        latency_us: 0,
    }
}

/// How the log a writer opens ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Previous {
    /// No record before: a new log.
    None,
    /// With a close record: the previous run shut down cleanly.
    Closed,
    /// Without one: the previous run crashed or was killed, or records were removed from the end.
    NotClosed,
}

/// The first record of every run: `{"op":"open","after_seq":N,"previous":"none|closed|not_closed"}`.
pub(super) fn open_record(after_seq: u64, previous: Previous) -> Record {
    let (word, reason) = match previous {
        Previous::None => ("none", "audit log opened: a new chain"),
        Previous::Closed => ("closed", "audit log opened after a clean close"),
        Previous::NotClosed => (
            "not_closed",
            "audit log opened; the record before this one is not a close record: the previous run stopped without \
             closing the log (crash, kill), or records were removed from its end",
        ),
    };
    let mut ops = Ops::new();
    ops.op("open", |op| {
        op.num_always("after_seq", i64::try_from(after_seq).unwrap_or(i64::MAX));
        op.text("previous", word);
    });
    Record {
        subject: Arc::new(Subject::proxy()),
        time: SystemTime::now(),
        rpc: OPEN_RPC,
        event: Event::Call,
        stream: None,
        ops: ops.finish(),
        decision: Decision::Allow,
        reason: reason.into(),
        code: if previous == Previous::NotClosed { Code::DataLoss } else { Code::Ok },
        revision: None,
        latency_us: 0,
    }
}

/// The last record of a run that shut down cleanly.
fn close_record() -> Record {
    Record {
        subject: Arc::new(Subject::proxy()),
        time: SystemTime::now(),
        rpc: CLOSE_RPC,
        event: Event::Call,
        stream: None,
        ops: "[]".into(),
        decision: Decision::Allow,
        reason: "audit log closed (clean shutdown)".into(),
        code: Code::Ok,
        revision: None,
        latency_us: 0,
    }
}

/// A record noting records that were lost while the log could not be written (`on_write_failure: allow`).
fn lost_record(n: u64) -> Record {
    Record {
        subject: Arc::new(Subject::proxy()),
        time: SystemTime::now(),
        rpc: LOST_RPC,
        event: Event::Call,
        stream: None,
        ops: "[]".into(),
        decision: Decision::Allow,
        reason: format!("{n} records could not be written while the audit log was failing"),
        code: Code::DataLoss,
        revision: None,
        latency_us: 0,
    }
}

// === sinks ===

enum Sink {
    Stdout,
    File(FileSink),
    #[cfg(test)]
    Faulty(tests::Faulty),
}

impl Sink {
    /// Bytes the active file can take before it is rotated.
    fn room(&self) -> u64 {
        match self {
            Sink::Stdout => u64::MAX,
            Sink::File(f) if f.len == 0 || f.len >= f.max_bytes => f.max_bytes,
            Sink::File(f) => f.max_bytes - f.len,
            #[cfg(test)]
            Sink::Faulty(_) => u64::MAX,
        }
    }

    fn write(&mut self, buf: &[u8], first_seq: u64) -> io::Result<()> {
        match self {
            Sink::Stdout => {
                let mut out = io::stdout().lock();
                out.write_all(buf)?;
                out.flush()
            }
            Sink::File(f) => f.write(buf, first_seq),
            #[cfg(test)]
            Sink::Faulty(f) => f.write(buf),
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::Stdout => io::stdout().lock().flush(),
            Sink::File(f) => f.sync(),
            #[cfg(test)]
            Sink::Faulty(f) => f.sync(),
        }
    }
}

/// The active audit file plus its rotated predecessors `<name>.<first seq, 20 digits>`.
struct FileSink {
    /// The folder, locked (`flock`) for as long as this writer lives: one writer per folder.
    _lock: File,
    path: PathBuf,
    file: Option<File>,
    /// Device and inode of the open file, to notice that it was removed or replaced.
    ident: Option<(u64, u64)>,
    len: u64,
    /// The seq of the first record in the active file.
    first_seq: Option<u64>,
    max_bytes: u64,
    max_files: usize,
}

/// Open (or create, readable by the owner alone) the active audit file.
fn open_active(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).read(true).mode(0o600).open(path)
}

impl FileSink {
    /// Open (or create) the active file and find where the chain stands: `(sink, last seq, last hash)`.
    fn open(
        path: &Path,
        max_bytes: u64,
        max_files: usize,
        hasher: &Hasher,
    ) -> Result<(FileSink, u64, String, Previous), AuditError> {
        let io_err = |source| AuditError::Io { path: path.to_path_buf(), source };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        // Records name identities and keys (Secrets' names among them): not for every local user.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| AuditError::Io { path: dir.to_path_buf(), source })?;
        // One writer per folder: a second instance would interleave its chain with ours, cut our records off
        // after a failed write and race our rotations. The lock is the folder's own, so no file is added to it.
        let lock = File::open(dir).map_err(|source| AuditError::Io { path: dir.to_path_buf(), source })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(AuditError::Locked { path: dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(source)) => {
                return Err(AuditError::Io { path: dir.to_path_buf(), source });
            }
        }
        let mut file = open_active(path).map_err(io_err)?;
        let len = file.metadata().map_err(io_err)?.len();
        let mut sink = FileSink {
            _lock: lock,
            path: path.to_path_buf(),
            file: None,
            ident: None,
            len,
            first_seq: None,
            max_bytes,
            max_files,
        };
        let Standing { seq, prev, previous, cut, unterminated } = standing(path, Some(&mut file), hasher)?;
        if unterminated {
            if cut.is_some() {
                warn!(path = %path.display(), "audit: the last line was cut off (crash?); it stays as it is, a record vouching for it follows, and audit verify notes it");
            }
            file.write_all(b"\n").map_err(io_err)?;
            sink.len += 1;
        }
        if len > 0 {
            sink.first_seq = starts_at(path).map_err(io_err)?;
        }
        let (seq, prev) = match cut {
            // The chain goes on with a record that names the cut-off line's bytes: only the writer (the key's
            // holder, with an HMAC key) can vouch for one, so `audit verify` can tell it from an inserted line.
            Some(torn) => {
                let mut text = String::new();
                let mut hash = prev;
                cut_record(&torn).write_body(seq + 1, &hash, &mut text);
                hasher.seal(&mut text, 0, &mut hash);
                file.write_all(text.as_bytes()).map_err(io_err)?;
                sink.len += text.len() as u64;
                (seq + 1, hash)
            }
            None => (seq, prev),
        };
        sink.ident = file_ident(&file);
        sink.file = Some(file);
        info!(path = %path.display(), next_seq = seq + 1, "audit log open");
        Ok((sink, seq, prev, previous))
    }

    /// Errors name the file and what was being done (rotating, opening, writing).
    fn write(&mut self, buf: &[u8], first_seq: u64) -> io::Result<()> {
        let at =
            |path: &Path, what: &str, e: io::Error| io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()));
        self.check_still_there();
        if self.len > 0 && self.len + buf.len() as u64 > self.max_bytes {
            self.rotate(first_seq).map_err(|e| at(&self.path, "rotating", e))?;
        }
        if self.file.is_none() {
            self.reopen().map_err(|e| at(&self.path, "opening", e))?;
        }
        let file = self.file.as_mut().ok_or_else(|| io::Error::other("audit file not open"))?;
        if let Err(e) = file.write_all(buf) {
            // Cut off a partial write so that the retry does not leave half a line behind.
            let _ = file.set_len(self.len);
            return Err(at(&self.path, "writing", e));
        }
        if self.len == 0 {
            self.first_seq = Some(first_seq);
        }
        self.len += buf.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        match &self.file {
            Some(f) => f.sync_data(),
            None => Ok(()),
        }
    }

    /// If the file was removed or replaced under us, stop writing into the old inode.
    fn check_still_there(&mut self) {
        if self.file.is_none() {
            return;
        }
        let now = std::fs::metadata(&self.path).ok().map(|m| ident_of(&m));
        if now != self.ident {
            error!(path = %self.path.display(), "audit: the file was removed or replaced; starting a new one");
            self.gone();
        }
    }

    /// The active file is no longer at its path: what is known of it no longer holds.
    fn gone(&mut self) {
        self.file = None;
        self.len = 0;
        self.first_seq = None;
    }

    fn reopen(&mut self) -> io::Result<()> {
        let file = open_active(&self.path)?;
        self.len = file.metadata()?.len();
        self.ident = file_ident(&file);
        if self.len == 0 {
            self.first_seq = None;
        }
        self.file = Some(file);
        Ok(())
    }

    /// Move the active file to its rotated name and start a new one, whose first record will be `next_seq`.
    ///
    /// A rotated file is named after its first record; where that cannot be read (a damaged start), after the
    /// record before `next_seq`, which sorts it after every older file all the same. An existing file is never
    /// replaced: if the name is taken, the next free one is used; if neither it nor the next 999 is free, the
    /// rotation fails (and with it the write, which is retried), loudly, rather than losing the records in that file.
    fn rotate(&mut self, next_seq: u64) -> io::Result<()> {
        self.sync()?;
        let first = match self.first_seq {
            Some(seq) => seq,
            None => starts_at(&self.path)?.unwrap_or(next_seq.saturating_sub(1)),
        };
        // Compressed too: a plain file beside a compressed one of the same name would read as the same records twice.
        let taken = |seq| {
            let name = rotated_name(&self.path, seq);
            let mut compressed = name.clone().into_os_string();
            compressed.push(".gz");
            std::fs::symlink_metadata(&name).is_ok() || std::fs::symlink_metadata(compressed).is_ok()
        };
        // A name that is taken (a copy put back by hand?) is never replaced: the next free one is used, which sorts
        // the file all the same (`audit verify` orders files by their records, not their names).
        let Some(free) = (first..first.saturating_add(1000)).find(|&seq| !taken(seq)) else {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot rotate: {} and the next 999 names are taken",
                    rotated_name(&self.path, first).display()
                ),
            ));
        };
        if free != first {
            warn!(taken = %rotated_name(&self.path, first).display(), "audit: the rotated file's name is taken; using the next free one");
        }
        let rotated = rotated_name(&self.path, free);
        match std::fs::rename(&self.path, &rotated) {
            Ok(()) => {}
            // Moved away since it was checked: there is nothing to rotate.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                error!(path = %self.path.display(), "audit: the file was removed; starting a new one");
                self.gone();
                return self.reopen();
            }
            Err(e) => return Err(e),
        }
        self.file = None;
        self.reopen()?;
        info!(rotated = %rotated.display(), "audit: rotated");
        if self.max_files > 0 {
            let files = self.rotated_files()?;
            let excess = files.len().saturating_sub(self.max_files);
            for old in &files[..excess] {
                if let Err(e) = std::fs::remove_file(old) {
                    warn!(file = %old.display(), error = %e, "audit: cannot remove an old rotated file");
                }
            }
        }
        Ok(())
    }

    /// Rotated files of this log, oldest first.
    /// Compressed ones included: `max_files` bounds them too, and the oldest go first whatever their form (deleting
    /// plain files newer than compressed ones would leave a hole in the chain).
    fn rotated_files(&self) -> io::Result<Vec<PathBuf>> {
        Ok(rotated_files_of(&self.path, true)?.into_iter().map(|(p, _)| p).collect())
    }
}

/// The rotated files of the audit log at `path`, oldest first, not those an operator compressed.
#[cfg(test)]
fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    Ok(rotated_files_of(path, false)?.into_iter().map(|(p, _)| p).collect())
}

/// The rotated files of the audit log at `path`, oldest first, and whether each is compressed; with `compressed`,
/// also those compressed with gzip (`<name>.<seq>.gz`), each after the plain file of its seq (which `gzip` leaves
/// until it has written the whole compressed one).
fn rotated_files_of(path: &Path, compressed: bool) -> io::Result<Vec<(PathBuf, bool)>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!("{base}.");
    let mut found: Vec<(u64, bool, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&prefix) else { continue };
        let (digits, gz) = match rest.strip_suffix(".gz") {
            Some(digits) if compressed => (digits, true),
            _ => (rest, false),
        };
        if let Some(seq) = rotated_seq(digits) {
            found.push((seq, gz, entry.path()));
        }
    }
    // Of one seq, the compressed file first: the plain one, whole, is the newer for the chain.
    found.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)).then_with(|| a.2.cmp(&b.2)));
    Ok(found.into_iter().map(|(_, gz, p)| (p, gz)).collect())
}

/// The last whole line of a rotated file an operator compressed with gzip (read through to its end).
fn last_compressed_line(path: &Path) -> io::Result<Option<Vec<u8>>> {
    let mut reader = super::read::LineReader::open(path)?;
    let mut last: Option<Vec<u8>> = None;
    while let Some((_, line)) = reader.next_line()? {
        if let super::read::Line::Complete(bytes) = line {
            let kept = last.get_or_insert_with(Vec::new);
            kept.clear();
            kept.extend_from_slice(bytes);
        }
    }
    Ok(last)
}

/// Where the chain of an audit log stands: what its writer goes on from ([`standing`]).
struct Standing {
    /// The last record's sequence number and hash (0 and [`GENESIS`] for a new chain).
    seq: u64,
    prev: String,
    previous: Previous,
    /// The active file's last line as a crash cut it off (not a whole record): it stays, and a record vouching
    /// for its bytes follows.
    cut: Option<Vec<u8>>,
    /// The active file's last line has no newline (cut off, or a whole record but for it).
    unterminated: bool,
}

/// Where the chain of the audit log at `path` stands: its last record — the active file's (`active`, if it exists),
/// else the newest rotated file's — must verify under `hasher`; a last line a crash cut off must be the start of the
/// next record. Reads only: `FileSink::open` acts on it, `config check` asks it ([`check_tail`]).
fn standing(path: &Path, active: Option<&mut File>, hasher: &Hasher) -> Result<Standing, AuditError> {
    let io_err = |at: &Path, source| AuditError::Io { path: at.to_path_buf(), source };
    let mut tail_source = None;
    let mut cut = None;
    let mut unterminated = false;
    if let Some(file) = active {
        let Tail { mut last, torn } = read_last_line(file).map_err(|e| io_err(path, e))?;
        if let Some(torn) = torn {
            unterminated = true;
            if chain::line_is_intact(hasher, &torn) {
                // Written whole but for its newline: the chain goes on from it.
                last = Some(torn);
            } else if serde_json::from_slice::<serde::de::IgnoredAny>(&torn).is_ok() {
                // A whole JSON line that does not verify is not what a crash leaves (a cut-off record is never
                // valid JSON): it is not vouched for, and the file is left as it is.
                return Err(AuditError::broken_tail(path.to_path_buf(), hasher));
            } else {
                cut = Some(torn);
            }
        }
        tail_source = last.map(|l| (path.to_path_buf(), l));
    }
    if tail_source.is_none() {
        // The newest rotated file, also if an operator compressed it: the chain goes on from its last record.
        let rotated = match rotated_files_of(path, true) {
            Ok(mut files) => files.pop(),
            // No folder yet (`config check` before the first start): no log either.
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(path, e)),
        };
        if let Some((rotated, compressed)) = rotated {
            // A pipe would hold the start up; a device is no rotated file.
            let regular = std::fs::metadata(&rotated).map_err(|e| io_err(&rotated, e))?.is_file();
            if !regular {
                let e = io::Error::new(io::ErrorKind::InvalidInput, "not a regular file");
                return Err(io_err(&rotated, e));
            }
            let last = if compressed {
                last_compressed_line(&rotated).map_err(|e| io_err(&rotated, e))?
            } else {
                let mut f = File::open(&rotated).map_err(|e| io_err(&rotated, e))?;
                read_last_line(&mut f).map_err(|e| io_err(&rotated, e))?.last
            };
            // A rotated file always holds records: one without (emptied, or not the writer's) says nothing of where
            // the chain stands, and a new chain would hide what it held.
            let Some(last) = last else {
                let e = io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the newest rotated audit file holds no record, so where the chain stands is unknown: put back \
                     what it held, or move it out of the folder to start a new chain",
                );
                return Err(io_err(&rotated, e));
            };
            tail_source = Some((rotated, last));
        }
    }
    let (seq, prev, previous) = match tail_source {
        None => (0, GENESIS.to_string(), Previous::None),
        Some((from, line)) => {
            if !chain::line_is_intact(hasher, &line) {
                return Err(AuditError::broken_tail(from, hasher));
            }
            let seq = line_seq(&line).map_err(|reason| AuditError::NotARecord { path: from.clone(), reason })?;
            let hash = chain::split_line(&line).map(|(_, h)| h.to_string()).unwrap_or_default();
            let previous = if cut.is_none() && ends_cleanly(&line) { Previous::Closed } else { Previous::NotClosed };
            (seq, hash, previous)
        }
    };
    // What a crash leaves is the start of the next record: `{"seq":<next>,"time":"…` cut anywhere. Anything else
    // at the end (text added while the proxy was stopped) is not vouched for.
    if let Some(torn) = &cut {
        let expected = format!("{{\"seq\":{},\"time\":\"", seq + 1);
        if !(torn.starts_with(expected.as_bytes()) || expected.as_bytes().starts_with(torn)) {
            return Err(AuditError::broken_tail(path.to_path_buf(), hasher));
        }
    }
    Ok(Standing { seq, prev, previous, cut, unterminated })
}

/// Whether the audit log at `path` can go on under `hasher`, as the writer requires when it opens it (for
/// `config check`; reads only, takes no lock). A missing log is fine.
pub fn check_tail(path: &Path, hasher: &Hasher) -> Result<(), AuditError> {
    let mut active = match File::open(path) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => return Err(AuditError::Io { path: path.to_path_buf(), source }),
    };
    standing(path, active.as_mut(), hasher).map(|_| ())
}

/// The seq in a rotated file's name: the 20 digits after `<name>.` ([`rotated_name`]).
pub fn rotated_seq(digits: &str) -> Option<u64> {
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten()
}

/// `<path>.<first seq, 20 digits>`.
pub fn rotated_name(path: &Path, first_seq: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{first_seq:020}"));
    PathBuf::from(name)
}

fn file_ident(file: &File) -> Option<(u64, u64)> {
    file.metadata().ok().map(|m| ident_of(&m))
}

#[cfg(unix)]
fn ident_of(m: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (m.dev(), m.ino())
}

#[cfg(not(unix))]
fn ident_of(m: &std::fs::Metadata) -> (u64, u64) {
    (m.len(), 0)
}

/// The seq of the first record of the file at `path`, read as `audit verify` reads it (a long or damaged first
/// line is looked past); `None` if no seq can be read from its start.
fn starts_at(path: &Path) -> io::Result<Option<u64>> {
    Ok(match super::read::first_seq(path)? {
        super::read::FirstSeq::Seq(seq) => Some(seq),
        super::read::FirstSeq::Unknown | super::read::FirstSeq::Empty => None,
    })
}

/// The end of a file: its last complete line (without its newline), and the torn line after it, if any.
struct Tail {
    last: Option<Vec<u8>>,
    torn: Option<Vec<u8>>,
}

/// Where a file ends ([`Tail`]).
fn read_last_line(file: &mut File) -> io::Result<Tail> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(Tail { last: None, torn: None });
    }
    // Read backwards in growing windows.
    let mut window = 64 * 1024u64;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut tail = vec![0u8; (len - start) as usize];
        file.read_exact(&mut tail)?;
        // The complete part ends at the last newline; what follows it is a torn line.
        let Some(end) = tail.iter().rposition(|&b| b == b'\n') else {
            if start == 0 {
                return Ok(Tail { last: None, torn: Some(tail) });
            }
            window *= 4;
            continue;
        };
        let torn = tail.get(end + 1..).filter(|t| !t.is_empty()).map(<[u8]>::to_vec);
        match tail[..end].iter().rposition(|&b| b == b'\n') {
            Some(begin) => return Ok(Tail { last: Some(tail[begin + 1..end].to_vec()), torn }),
            None if start == 0 => return Ok(Tail { last: Some(tail[..end].to_vec()), torn }),
            None => window *= 4,
        }
        if window > 64 * 1024 * 1024 {
            return Err(io::Error::other("no line boundary in the last 64 MiB"));
        }
    }
}

fn line_seq(line: &[u8]) -> Result<u64, String> {
    #[derive(serde::Deserialize)]
    struct Head {
        seq: u64,
    }
    serde_json::from_slice::<Head>(line).map(|h| h.seq).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::record::Subject;
    use crate::identity::Identity;

    /// A sink whose writes longer than `max_write` bytes fail as on a full disk (leaving nothing), and whose syncs
    /// fail while `sync_fails`.
    #[derive(Clone)]
    pub(super) struct Faulty {
        pub max_write: Arc<AtomicUsize>,
        pub sync_fails: Arc<AtomicBool>,
        pub out: Arc<std::sync::Mutex<Vec<u8>>>,
    }

    impl Faulty {
        fn new() -> Faulty {
            Faulty {
                max_write: Arc::new(AtomicUsize::new(usize::MAX)),
                sync_fails: Arc::new(AtomicBool::new(false)),
                out: Arc::default(),
            }
        }

        pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<()> {
            if buf.len() > self.max_write.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(28)); // ENOSPC
            }
            self.out.lock().map_err(|_| io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(())
        }

        pub(super) fn sync(&mut self) -> io::Result<()> {
            if self.sync_fails.load(Ordering::SeqCst) { Err(io::Error::from_raw_os_error(5)) } else { Ok(()) }
        }

        fn lines(&self) -> Vec<String> {
            let out = self.out.lock().map(|o| o.clone()).unwrap_or_default();
            String::from_utf8_lossy(&out).lines().map(str::to_string).collect()
        }
    }

    fn open_faulty(cfg: &AuditConfig) -> Result<(AuditLog, Faulty), AuditError> {
        let faulty = Faulty::new();
        let log = AuditLog::start(cfg, Sink::Faulty(faulty.clone()), Hasher::unkeyed(), 0, GENESIS.to_string())?;
        Ok((log, faulty))
    }

    fn config(dir: &Path) -> AuditConfig {
        AuditConfig {
            enabled: true,
            output: AuditOutput::File(dir.join("audit.log")),
            max_file_bytes: 4096,
            max_files: 0,
            hmac_key_file: None,
            on_write_failure: OnWriteFailure::Deny,
            answer_after: AnswerAfter::Queued,
            queue: 128,
            denial_records: None,
        }
    }

    fn record(subject: &Arc<Subject>, n: usize) -> Record {
        Record {
            subject: subject.clone(),
            time: SystemTime::now(),
            rpc: "KV/Range",
            event: Event::Call,
            stream: None,
            ops: format!(r#"[{{"op":"range","key":"k{n}"}}]"#),
            decision: Decision::Allow,
            reason: "test".into(),
            code: Code::Ok,
            revision: Some(n as i64),
            latency_us: 1,
        }
    }

    fn subject() -> Arc<Subject> {
        let id = Identity {
            common_name: Some("t".into()),
            organizations: vec![],
            organizational_units: vec![],
            dns_sans: vec![],
            uri_sans: vec![],
            serial: "1".into(),
            fingerprint_sha256: "00".into(),
            issuers: vec![],
        };
        Arc::new(Subject::new(1, "127.0.0.1:1".parse().unwrap_or(std::net::SocketAddr::from(([0; 4], 0))), &id, &[]))
    }

    fn all_lines(dir: &Path) -> Vec<String> {
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).collect();
        files.sort();
        // audit.log sorts before audit.log.000…; the active file holds the newest records.
        files.rotate_left(1);
        files
            .iter()
            .flat_map(|f| std::fs::read_to_string(f).unwrap_or_default().lines().map(String::from).collect::<Vec<_>>())
            .collect()
    }

    /// One run of the writer on `dir`: opened, the records `numbers` submitted, closed.
    async fn write_run(
        dir: &Path,
        s: &Arc<Subject>,
        numbers: std::ops::Range<usize>,
    ) -> Result<(), Box<dyn std::error::Error>> {
        let log = AuditLog::open(&config(dir))?;
        for n in numbers {
            log.submit(record(s, n)).await?;
        }
        log.close(Duration::from_secs(5)).await;
        Ok(())
    }

    /// [`all_lines`] without the writer's own open and close records.
    fn request_lines(dir: &Path) -> Vec<String> {
        all_lines(dir).into_iter().filter(|l| !l.contains(OPEN_RPC) && !l.contains(CLOSE_RPC)).collect()
    }

    /// `audit verify` of the audit files in `path` (a folder or one file), written under `keys` oldest first.
    fn verify_at(path: &Path, keys: &[Hasher]) -> Result<crate::audit::verify::Report, Box<dyn std::error::Error>> {
        let files = crate::audit::read::audit_files(&[path.to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        Ok(crate::audit::verify::verify(&files, keys)?)
    }

    fn check_chain(lines: &[String], hasher: &Hasher) {
        let mut prev = GENESIS.to_string();
        for (i, l) in lines.iter().enumerate() {
            assert!(chain::line_is_intact(hasher, l.as_bytes()), "line {i}: {l}");
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            assert_eq!(v["seq"], i as u64 + 1, "{l}");
            assert_eq!(v["prev_hash"], prev.as_str());
            prev = v["hash"].as_str().unwrap_or_default().to_string();
        }
    }

    /// A caller dropped while its record waits (a client gone during `answer_after: written`) does not leave
    /// `close` waiting for it until its deadline (before: every such drop made the shutdown wait it out).
    /// Records name identities and keys: the files and the folder made for them are not for every local user.
    #[tokio::test]
    async fn audit_files_are_the_owners_alone() -> Result<(), Box<dyn std::error::Error>> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let s = subject();
        let log = AuditLog::open(&config(&dir.path().join("made")))?;
        for n in 0..40 {
            log.submit(record(&s, n)).await?;
        }
        log.close(Duration::from_secs(5)).await;
        let folder = dir.path().join("made");
        assert_eq!(std::fs::metadata(&folder)?.permissions().mode() & 0o007, 0, "folder open to others");
        for entry in std::fs::read_dir(&folder)? {
            let path = entry?.path();
            assert_eq!(std::fs::metadata(&path)?.permissions().mode() & 0o077, 0, "{}", path.display());
        }
        Ok(())
    }

    #[tokio::test]
    async fn callers_dropped_while_submitting_do_not_hold_up_close() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let cfg = AuditConfig { answer_after: AnswerAfter::Written, ..config(dir.path()) };
        let log = AuditLog::open(&cfg)?;
        for n in 0..10 {
            let _ = tokio::time::timeout(Duration::ZERO, log.submit(record(&s, n))).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        log.close(Duration::from_secs(3)).await;
        assert!(started.elapsed() < Duration::from_secs(1), "close took {:?}", started.elapsed());
        Ok(())
    }

    #[tokio::test]
    async fn writes_rotates_and_continues_the_chain_after_a_restart() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..40).await?;
        // A restart continues seq and chain.
        write_run(dir.path(), &s, 40..60).await?;
        let files = std::fs::read_dir(dir.path())?.count();
        assert!(files > 2, "rotated by size: {files} files");
        assert_eq!(request_lines(dir.path()).len(), 60);
        let lines = all_lines(dir.path());
        // Each run begins with an open record and ends with a close record; the second says the first closed.
        assert_eq!(lines.len(), 64);
        assert!(lines[0].contains(OPEN_RPC) && lines[0].contains(r#""previous":"none""#), "{}", lines[0]);
        assert!(lines[41].contains(CLOSE_RPC) && lines[42].contains(r#""previous":"closed""#), "{}", lines[42]);
        check_chain(&lines, &Hasher::unkeyed());
        Ok(())
    }

    /// `max_files` counts compressed rotated files too and removes the oldest first, whatever their form: removing
    /// the oldest plain ones, newer than the compressed, left a hole in the middle of the chain.
    #[tokio::test]
    async fn compressed_rotated_files_count_for_max_files_oldest_first() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let mut cfg = config(dir.path());
        cfg.max_files = 3;
        let active = dir.path().join("audit.log");
        for run in 0..3 {
            let log = AuditLog::open(&cfg)?;
            for n in run * 30..run * 30 + 30 {
                log.submit(record(&s, n)).await?;
            }
            log.close(Duration::from_secs(5)).await;
            for file in rotated_files(&active)? {
                crate::audit::read::testing::gzip(&file)?;
            }
        }
        assert_eq!(rotated_files_of(&active, true)?.len(), 3);
        let report = verify_at(dir.path(), &[])?;
        assert_eq!(report.problem, None);
        Ok(())
    }

    /// A newest rotated file without a record says nothing of where the chain stands: the writer refuses to start
    /// (a new chain would hide what the file held), and names the file.
    #[tokio::test]
    async fn a_newest_rotated_file_without_a_record_is_refused() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..30).await?;
        let active = dir.path().join("audit.log");
        std::fs::remove_file(&active)?;
        let newest = rotated_files(&active)?.pop().ok_or("no rotated file")?;
        std::fs::write(&newest, "")?;
        let refused = AuditLog::open(&config(dir.path())).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("holds no record"), "{refused}");
        Ok(())
    }

    /// An operator compresses rotated files (docs/audit.md); when the active file is gone too (moved away, or a
    /// crash right after a rotation left it empty), a restart goes on from the newest rotated file although it is
    /// compressed, rather than starting a new chain that `verify` would report as records inserted.
    #[tokio::test]
    async fn a_restart_goes_on_from_a_compressed_rotated_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..30).await?;
        // The active file rotates away as it is, and every rotated file is compressed.
        let active = dir.path().join("audit.log");
        std::fs::rename(&active, rotated_name(&active, 1_000_000))?;
        for file in rotated_files(&active)? {
            crate::audit::read::testing::gzip(&file)?;
        }
        assert!(rotated_files(&active)?.is_empty());
        write_run(dir.path(), &s, 30..31).await?;
        let text = std::fs::read_to_string(&active)?;
        assert!(text.contains(r#""previous":"closed""#), "{text}");
        let report = verify_at(dir.path(), &[])?;
        assert_eq!(report.problem, None);
        assert_eq!(report.records, 35);
        Ok(())
    }

    /// `change_key` where its record must rotate the active file, and a proxy going on under the new key from a
    /// compressed rotated file that holds only that record.
    #[tokio::test]
    async fn a_key_change_rotates_and_the_proxy_goes_on_from_a_compressed_tail()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let key_file = dir.path().join("new.key");
        std::fs::write(&key_file, "the new key, twenty b")?;
        let new = Hasher::from_key_file(&key_file)?;
        let logs = dir.path().join("logs");
        write_run(&logs, &s, 0..30).await?;
        let active = logs.join("audit.log");
        let mut full = config(&logs);
        full.max_file_bytes = std::fs::metadata(&active)?.len() + 1;
        let changed = change_key(&full, &new)?;
        let text = std::fs::read_to_string(&active)?;
        assert!(text.starts_with(&format!("{{\"seq\":{},", changed.seq)) && text.lines().count() == 1, "{text}");

        std::fs::rename(&active, rotated_name(&active, changed.seq))?;
        for file in rotated_files(&active)? {
            crate::audit::read::testing::gzip(&file)?;
        }
        let mut keyed = config(&logs);
        keyed.hmac_key_file = Some(key_file);
        let log = AuditLog::open(&keyed)?;
        log.submit(record(&s, 31)).await?;
        log.close(Duration::from_secs(5)).await;
        let report = verify_at(&logs, &[Hasher::unkeyed(), new])?;
        assert_eq!((report.problem, report.records), (None, changed.seq + 3), "{:?}", report.notes);
        Ok(())
    }

    /// `change_key` when the active file is empty beside rotated ones (rotated, then the proxy stopped before its
    /// next record): the chain's tail is the newest rotated file's, and the key change record goes on from it.
    #[tokio::test]
    async fn a_key_change_goes_on_from_the_rotated_tail_when_the_active_file_is_empty()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let new = Hasher::from_key_file(&{
            let key_file = dir.path().join("new.key");
            std::fs::write(&key_file, "the new key, twenty b")?;
            key_file
        })?;
        let logs = dir.path().join("logs");
        write_run(&logs, &s, 0..30).await?;
        let before = verify_at(&logs, &[])?;
        let active = logs.join("audit.log");
        // The active file's records go to a rotated file of their own; the active file is left empty.
        let active_first = super::super::read::seq_of(&std::fs::read(&active)?).ok_or("no record in audit.log")?;
        std::fs::rename(&active, rotated_name(&active, active_first))?;
        std::fs::write(&active, "")?;
        let changed = change_key(&config(&logs), &new)?;
        assert_eq!(changed.seq, before.last.as_ref().map_or(0, |l| l.0) + 1);
        let report = verify_at(&logs, &[Hasher::unkeyed(), new])?;
        assert_eq!((report.problem, report.records), (None, before.records + 1), "{:?}", report.notes);
        assert_eq!(std::fs::read_to_string(&active)?.lines().count(), 1, "the record goes to the active file");
        Ok(())
    }

    #[tokio::test]
    async fn with_answer_after_written_or_synced_a_submission_returns_once_its_record_is_in_the_file()
    -> Result<(), Box<dyn std::error::Error>> {
        for answer_after in [AnswerAfter::Written, AnswerAfter::Synced] {
            let dir = tempfile::tempdir()?;
            let s = subject();
            let mut cfg = config(dir.path());
            cfg.answer_after = answer_after;
            let log = AuditLog::open(&cfg)?;
            for n in 0..30 {
                log.submit(record(&s, n)).await?;
                // No waiting: with `queued` the record would reach the file up to a batch window later.
                let lines = request_lines(dir.path());
                assert_eq!(lines.len(), n + 1, "{answer_after:?}: record {n} is not in the file yet");
                assert!(lines[n].contains(&format!("\"k{n}\"")), "{}", lines[n]);
            }
            // Submissions at once share writes and still each wait for their own.
            let at_once = (30..90).map(|n| log.submit(record(&s, n)));
            for r in futures_util::future::join_all(at_once).await {
                r?;
            }
            assert_eq!(request_lines(dir.path()).len(), 90, "{answer_after:?}");
            log.close(Duration::from_secs(5)).await;
            check_chain(&all_lines(dir.path()), &Hasher::unkeyed());
        }
        Ok(())
    }

    #[tokio::test]
    async fn with_answer_after_written_a_record_that_cannot_be_written_refuses_its_own_answer()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let folder = dir.path().join("audit");
        std::fs::create_dir(&folder)?;
        let s = subject();
        let mut cfg = config(&folder);
        cfg.answer_after = AnswerAfter::Written;
        let log = AuditLog::open(&cfg)?;
        log.submit(record(&s, 0)).await?;
        // The folder goes away: the very record that cannot be written is refused, not a later one.
        std::fs::remove_dir_all(&folder)?;
        let refused = log.submit(record(&s, 1)).await;
        assert!(refused.as_ref().is_err_and(|e| e.code() == Code::Unavailable), "{refused:?}");
        // It comes back: the refused record is written (its answer was refused, the request is still recorded),
        // and submissions succeed again.
        std::fs::create_dir(&folder)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while log.submit(record(&s, 2)).await.is_err() {
            assert!(Instant::now() < deadline, "the log did not come back");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        log.close(Duration::from_secs(5)).await;
        let lines = all_lines(&folder);
        assert!(lines.iter().any(|l| l.contains("\"k1\"")), "{lines:?}");
        Ok(())
    }

    /// Wait (at most 10 s) for `done`.
    async fn eventually(what: &str, done: impl Fn() -> bool) -> Result<(), Box<dyn std::error::Error>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            if Instant::now() > deadline {
                return Err(format!("not within 10 s: {what}").into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    #[tokio::test]
    async fn one_writer_per_folder() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let first = AuditLog::open(&config(dir.path()))?;
        first.submit(record(&s, 1)).await?;
        // Another instance (here the same process; flock locks are per open file) is refused, with the folder.
        let mut other = config(dir.path());
        other.output = AuditOutput::File(dir.path().join("other.log"));
        let second = AuditLog::open(&other);
        assert!(matches!(&second, Err(AuditError::Locked { path }) if path == dir.path()), "{:?}", second.err());
        // Once the first is closed, its writer ends and gives the folder up.
        first.close(Duration::from_secs(5)).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        let again = loop {
            match AuditLog::open(&config(dir.path())) {
                Err(AuditError::Locked { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                other => break other?,
            }
        };
        again.submit(record(&s, 2)).await?;
        again.close(Duration::from_secs(5)).await;
        check_chain(&all_lines(dir.path()), &Hasher::unkeyed());
        Ok(())
    }

    #[tokio::test]
    async fn a_nearly_full_disk_takes_the_backlog_in_what_fits() -> Result<(), Box<dyn std::error::Error>> {
        let s = subject();
        let (log, faulty) = open_faulty(&config(Path::new("/unused")))?;
        faulty.max_write.store(0, Ordering::SeqCst);
        for n in 0..40 {
            log.submit_now(record(&s, n));
        }
        eventually("the log fails", || log.is_failing()).await?;
        // Room for a few records per write only: before, the whole backlog was retried as one write for good.
        let one = record(&s, 0);
        let mut line = String::new();
        one.write_body(1, GENESIS, &mut line);
        faulty.max_write.store(line.len() * 3 + 200, Ordering::SeqCst);
        eventually("every record written", || faulty.lines().len() == 40).await?;
        eventually("the log works again", || !log.is_failing()).await?;
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        let lines = faulty.lines();
        assert!(lines[..40].iter().enumerate().all(|(i, l)| l.contains(&format!("\"k{i}\""))), "in order: {lines:?}");
        assert!(lines[40].contains(CLOSE_RPC), "{}", lines[40]);
        Ok(())
    }

    #[tokio::test]
    async fn with_answer_after_synced_a_failed_sync_fails_the_log() -> Result<(), Box<dyn std::error::Error>> {
        let s = subject();
        let mut cfg = config(Path::new("/unused"));
        cfg.answer_after = AnswerAfter::Synced;
        let (log, faulty) = open_faulty(&cfg)?;
        log.submit(record(&s, 0)).await?;
        faulty.sync_fails.store(true, Ordering::SeqCst);
        assert!(log.submit(record(&s, 1)).await.is_err_and(|e| e.code() == Code::Unavailable));
        // Before: the answer was refused, but the log counted as working, so requests went on being admitted
        // (and applied at etcd, then answered Unavailable).
        assert!(log.is_failing());
        assert!(log.admit().is_err());
        faulty.sync_fails.store(false, Ordering::SeqCst);
        eventually("the log works again", || !log.is_failing()).await?;
        log.submit(record(&s, 2)).await?;
        assert_eq!(log.close(Duration::from_secs(5)).await, 0);
        Ok(())
    }

    #[tokio::test]
    async fn close_says_how_many_records_it_could_not_write() -> Result<(), Box<dyn std::error::Error>> {
        let s = subject();
        let (log, faulty) = open_faulty(&config(Path::new("/unused")))?;
        faulty.max_write.store(0, Ordering::SeqCst);
        for n in 0..5 {
            log.submit_now(record(&s, n));
        }
        // The five, and the close record.
        assert_eq!(log.close(Duration::from_secs(15)).await, 6);
        assert_eq!(log.stats().map(|s| s.lost.load(Ordering::SeqCst)), Some(6));
        Ok(())
    }

    #[tokio::test]
    async fn refuses_a_tail_that_does_not_verify() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 1..2).await?;
        let key = dir.path().join("key");
        std::fs::write(&key, "0123456789abcdef0123")?;
        let mut keyed = config(dir.path());
        keyed.hmac_key_file = Some(key.clone());
        let active = dir.path().join("audit.log");
        assert!(matches!(check_tail(&active, &Hasher::from_key_file(&key)?), Err(AuditError::BrokenTail { .. })));
        assert!(check_tail(&active, &Hasher::unkeyed()).is_ok());
        assert!(matches!(AuditLog::open(&keyed), Err(AuditError::BrokenTail { .. })));
        Ok(())
    }

    /// `change_key`: the chain goes on under the new key from a record of its own; the proxy then runs only with the
    /// new key; a log cut back to before the change and written on under the old key is refused, not continued.
    #[tokio::test]
    async fn a_key_change_is_a_record_under_the_new_key() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let (old_file, new_file) = (dir.path().join("old.key"), dir.path().join("new.key"));
        std::fs::write(&old_file, "0123456789abcdef0123")?;
        std::fs::write(&new_file, "another key, as long as the first")?;
        let (old, new) = (Hasher::from_key_file(&old_file)?, Hasher::from_key_file(&new_file)?);
        let logs = dir.path().join("logs");
        let mut under_old = config(&logs);
        under_old.hmac_key_file = Some(old_file.clone());
        let mut under_new = config(&logs);
        under_new.hmac_key_file = Some(new_file.clone());

        // Nothing to change yet, and nothing created by asking.
        let refused = change_key(&under_old, &new).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("no record yet"), "{refused}");
        assert!(!logs.exists());
        let log = AuditLog::open(&under_old)?;
        log.submit(record(&s, 1)).await?;
        // Not while a proxy writes the log, and not to the key in use.
        assert!(matches!(change_key(&under_old, &new), Err(AuditError::Locked { .. })));
        log.close(Duration::from_secs(5)).await;
        assert!(matches!(change_key(&under_old, &old), Err(AuditError::KeyChange(_))));
        let before_change = std::fs::read(logs.join("audit.log"))?;

        let changed = change_key(&under_old, &new)?;
        assert_eq!(changed.seq, 4, "open, record, close, then the change");
        // The proxy goes on only under the new key, and the change after a clean close is no crash.
        assert!(matches!(AuditLog::open(&under_old), Err(AuditError::BrokenTail { .. })));
        let log = AuditLog::open(&under_new)?;
        log.submit(record(&s, 2)).await?;
        log.close(Duration::from_secs(5)).await;
        let lines = all_lines(&logs);
        assert!(lines[3].contains(KEY_CHANGE_RPC) && lines[3].contains(r#""from":"hmac","previous":"closed""#));
        assert!(lines[4].contains(OPEN_RPC) && lines[4].contains(r#""previous":"closed""#), "{}", lines[4]);
        let report = verify_at(&logs, &[old.clone(), new.clone()])?;
        assert_eq!((report.problem, report.records), (None, 7), "{:?}", report.notes);
        for one in [&old, &new] {
            assert!(verify_at(&logs, std::slice::from_ref(one))?.problem.is_some());
        }

        // Not back to a key the log was under (the log could not be verified), and not from a key the log is not
        // under now.
        let back = change_key(&under_new, &old).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(back.contains("audit.log:1: a record of this log is under the new key already"), "{back}");
        let third = Hasher::keyed(b"a third key, 20 byte");
        let wrong = change_key(&config(&logs), &third).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(wrong.contains("does not verify without a key (no audit.hmac_key_file)"), "{wrong}");

        // A holder of the old key puts back the log as it was before the change and writes on under the old key:
        // the proxy, configured with the new key, refuses it.
        std::fs::write(logs.join("audit.log"), &before_change)?;
        let forger = AuditLog::open(&under_old)?;
        forger.submit(record(&s, 666)).await?;
        forger.close(Duration::from_secs(5)).await;
        let refused = AuditLog::open(&under_new).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(refused.contains("the log has lost records since") && refused.contains("do not run it again"));

        // From a log written without a key; and after a crash cut its last line off.
        let unkeyed = tempfile::tempdir()?;
        write_run(unkeyed.path(), &s, 0..1).await?;
        OpenOptions::new().append(true).open(unkeyed.path().join("audit.log"))?.write_all(br#"{"seq":4,"ti"#)?;
        let changed = change_key(&config(unkeyed.path()), &new)?;
        assert_eq!(changed.seq, 5, "the cut record under no key, then the change");
        let lines = all_lines(unkeyed.path());
        assert!(lines[5].contains(r#""from":"unkeyed","previous":"not_closed""#), "{}", lines[5]);
        let report = verify_at(unkeyed.path(), &[Hasher::unkeyed(), new.clone()])?;
        assert_eq!((report.problem, report.records), (None, 5), "{:?}", report.notes);
        Ok(())
    }

    #[tokio::test]
    async fn old_rotated_files_are_pruned() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let mut cfg = config(dir.path());
        cfg.max_files = 2;
        let log = AuditLog::open(&cfg)?;
        for n in 0..100 {
            log.submit(record(&s, n)).await?;
            if n % 10 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        log.close(Duration::from_secs(5)).await;
        let files = std::fs::read_dir(dir.path())?.count();
        assert_eq!(files, 3, "active + 2 rotated");
        Ok(())
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into())
            .collect();
        names.sort();
        names
    }

    /// A first record longer than any fixed read of the file's start (a denied request with a 70 KiB key, say)
    /// still names the file it rotates into: before, a restart left its seq unknown, the file was rotated to
    /// `….00000000000000000000`, and the next such rotation replaced it (or pruning took it first).
    #[tokio::test]
    async fn restarts_after_a_long_first_record_rotate_without_losing_records() -> Result<(), Box<dyn std::error::Error>>
    {
        for max_files in [0, 3] {
            let dir = tempfile::tempdir()?;
            let s = subject();
            let mut cfg = config(dir.path());
            cfg.max_file_bytes = 200_000;
            cfg.max_files = max_files;
            let mut n = 0;
            for _ in 0..3 {
                let log = AuditLog::open(&cfg)?;
                for _ in 0..4 {
                    let mut r = record(&s, n);
                    r.ops = format!(r#"[{{"op":"range","key":"{}{n}"}}]"#, "k".repeat(70_000));
                    log.submit(r).await?;
                    n += 1;
                }
                log.close(Duration::from_secs(5)).await;
            }
            let names = names(dir.path());
            assert!(!names.iter().any(|f| f.ends_with(&format!("{:020}", 0))), "{names:?}");
            if max_files == 0 {
                check_chain(&all_lines(dir.path()), &Hasher::unkeyed());
            } else {
                // The newest records are kept, the oldest pruned.
                let seqs: Vec<u64> = all_lines(dir.path())
                    .iter()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["seq"].as_u64())
                    .collect();
                // 3 runs of an open record, 4 records and a close record.
                assert_eq!(seqs.last(), Some(&18), "{names:?}");
                assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?} in {names:?}");
            }
        }
        Ok(())
    }

    /// The active file moved away when it was nearly full: the writer starts a new one (before, it kept trying to
    /// rotate the file that was gone, and every request was refused until a restart).
    #[tokio::test]
    async fn a_file_moved_away_near_its_size_limit_is_started_again() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let log = AuditLog::open(&config(dir.path()))?;
        let active = dir.path().join("audit.log");
        let mut n = 0;
        // Near the limit, short of a rotation (records are about 420 bytes).
        while std::fs::metadata(&active)?.len() < 4096 - 860 {
            log.submit(record(&s, n)).await?;
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        std::fs::rename(&active, dir.path().join("moved.away"))?;
        for _ in 0..3 {
            log.submit(record(&s, n)).await?;
            n += 1;
        }
        log.close(Duration::from_secs(5)).await;
        assert!(!log.is_failing());
        let text = std::fs::read_to_string(&active)?;
        // The three, and the close record.
        assert_eq!(text.lines().count(), 4, "{text}");
        Ok(())
    }

    /// A crash during the first write into a freshly rotated file: the file starts with the cut-off line, then the
    /// writer's record for it (the same seq). Rotated later, the file is named after that seq (not one before it),
    /// and once the files before it are removed (`max_files`) the set still verifies, starting at the cut.
    #[tokio::test]
    async fn a_file_that_starts_with_a_line_cut_off_by_a_crash_is_named_and_verified_right()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..3).await?;
        // Open record, 3 records, close record; rotated; the crash cut seq 6 in the new file (`{"se`).
        std::fs::rename(dir.path().join("audit.log"), rotated_name(&dir.path().join("audit.log"), 1))?;
        std::fs::write(dir.path().join("audit.log"), br#"{"se"#)?;
        write_run(dir.path(), &s, 3..40).await?;
        assert!(rotated_name(&dir.path().join("audit.log"), 6).exists(), "{:?}", names(dir.path()));
        std::fs::remove_file(rotated_name(&dir.path().join("audit.log"), 1))?;
        let report = verify_at(dir.path(), &[])?;
        assert_eq!(report.problem, None, "{report:?}");
        assert_eq!(report.first.as_ref().map(|f| f.0), Some(6), "{report:?}");
        assert!(report.notes.iter().any(|n| n.contains(":1: a record cut off")), "{report:?}");
        // Named as earlier builds named it (one before the cut's seq): still fine; any earlier is a removal.
        let verify_as = |seq: u64| -> Result<_, Box<dyn std::error::Error>> {
            let named = rotated_name(&dir.path().join("audit.log"), seq);
            let first = std::fs::read_dir(dir.path())?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().contains(".log.0"))
                .min()
                .ok_or("no rotated file")?;
            std::fs::rename(first, &named)?;
            Ok(verify_at(dir.path(), &[])?.problem.map(|p| p.kind))
        };
        assert_eq!(verify_as(5)?, None);
        assert_eq!(verify_as(4)?, Some(crate::audit::verify::ProblemKind::Removed));
        Ok(())
    }

    /// After a crash in the middle of a record, the restarted writer leaves the cut-off line and puts a record of
    /// its own after it that vouches for the line's bytes (what the cut-off record said is lost), and `audit verify`
    /// accepts the chain with a note.
    #[tokio::test]
    async fn after_a_record_cut_off_by_a_crash_the_chain_goes_on_and_verifies() -> Result<(), Box<dyn std::error::Error>>
    {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..3).await?;
        let mut file = OpenOptions::new().append(true).open(dir.path().join("audit.log"))?;
        // Open record, 3 records, close record: a crash cut the next one.
        file.write_all(br#"{"seq":6,"time":"2026-12-02T0"#)?;
        write_run(dir.path(), &s, 3..5).await?;
        let report = verify_at(dir.path(), &[])?;
        assert_eq!(report.problem, None, "{report:?}");
        // Noted: the cut-off line, and the run that started after the crash.
        assert_eq!((report.records, report.notes.len()), (10, 2), "5, the writer's record for the cut, 4: {report:?}");
        assert!(report.notes[1].contains("seq 7: the proxy started after a run that did not close the log"));
        let lines = all_lines(dir.path());
        let cut = lines.iter().position(|l| l.contains(CUT_RPC)).ok_or("no cut record")?;
        assert!(lines[cut].contains(r#""bytes":29"#) && lines[cut - 1].starts_with(r#"{"seq":6,"time":"2026-12-02T0"#));
        // The run after a crash says that the one before did not close.
        assert!(lines[cut + 1].contains(OPEN_RPC) && lines[cut + 1].contains("not_closed"), "{}", lines[cut + 1]);
        Ok(())
    }

    /// A last line written whole but for its newline goes on the chain; a whole JSON line without a newline that
    /// does not verify is not vouched for as a crash leftover (the writer refuses to go on, as for any tail that does
    /// not verify).
    #[tokio::test]
    async fn a_last_line_without_its_newline_is_vouched_for_only_if_a_crash_could_have_left_it()
    -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        let active = dir.path().join("audit.log");
        write_run(dir.path(), &s, 0..1).await?;
        // The newline of the last record is lost.
        let text = std::fs::read_to_string(&active)?;
        std::fs::write(&active, text.trim_end())?;
        // `config check` (`check_tail`) agrees with the writer each time.
        let unkeyed = Hasher::unkeyed();
        assert!(check_tail(&active, &unkeyed).is_ok());
        write_run(dir.path(), &s, 1..2).await?;
        let report = verify_at(dir.path(), &[])?;
        // Each run: open record, a record, close record.
        assert_eq!((report.problem, report.records, report.notes.len()), (None, 6, 0));

        let good = std::fs::read_to_string(&active)?;
        // A forged record put at the end without its newline (say while the proxy was stopped).
        let mut file = OpenOptions::new().append(true).open(&active)?;
        file.write_all(br#"{"seq":3,"rpc":"KV/Range","hash":"00"}"#)?;
        assert!(matches!(check_tail(&active, &unkeyed), Err(AuditError::BrokenTail { .. })));
        assert!(matches!(AuditLog::open(&config(dir.path())), Err(AuditError::BrokenTail { .. })));
        // Nor is text that is not the start of the next record, cut (before: any line that was not JSON was).
        for junk in [&br#"{"seq":3,"rpc":"KV/Put","key":"forged"#[..], b"anything at all", br#"{"seq":9,"time":"2"#] {
            std::fs::write(&active, &good)?;
            OpenOptions::new().append(true).open(&active)?.write_all(junk)?;
            assert!(check_tail(&active, &unkeyed).is_err(), "{}", String::from_utf8_lossy(junk));
            let opened = AuditLog::open(&config(dir.path()));
            assert!(matches!(opened, Err(AuditError::BrokenTail { .. })), "{}", String::from_utf8_lossy(junk));
        }
        // What a crash leaves is: the next record's start, cut anywhere.
        for cut in [&br#"{"se"#[..], br#"{"seq":7,"time":"2026-12-0"#] {
            std::fs::write(&active, &good)?;
            OpenOptions::new().append(true).open(&active)?.write_all(cut)?;
            assert!(check_tail(&active, &unkeyed).is_ok(), "{}", String::from_utf8_lossy(cut));
            let log = AuditLog::open(&config(dir.path()))?;
            log.close(Duration::from_secs(5)).await;
        }
        Ok(())
    }

    /// A rotation whose name is taken uses the next free one, and the file under that name is left as it was.
    #[tokio::test]
    async fn a_rotation_never_replaces_a_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let s = subject();
        write_run(dir.path(), &s, 0..1).await?;
        // Whatever put it there: the name the active file would rotate to is taken.
        let taken = rotated_name(&dir.path().join("audit.log"), 1);
        std::fs::write(&taken, "kept\n")?;
        let log = AuditLog::open(&config(dir.path()))?;
        for n in 1..60 {
            let _ = log.submit(record(&s, n)).await;
        }
        log.close(Duration::from_secs(5)).await;
        assert!(!log.is_failing());
        assert_eq!(std::fs::read_to_string(&taken)?, "kept\n");
        let next = std::fs::read_to_string(rotated_name(&dir.path().join("audit.log"), 2))?;
        assert!(next.starts_with(r#"{"seq":1,"#), "the rotated file, under the next name: {next}");
        Ok(())
    }
}
