//! Reading audit files, shared by `audit review` and `audit verify`.
//!
//! * [`audit_files`] turns the command line's `[FILES|DIR]...` into the files to read, in chain order (by the
//!   `seq` of each file's first record; empty files last).
//! * [`LineReader`] reads one file line by line through a reused buffer, never holding more than one line (of at
//!   most [`MAX_LINE_BYTES`]) in memory, and tells complete lines from a cut-off last line. A file compressed with
//!   gzip (a rotated file an operator compressed, e.g. by logrotate's `compress`) is read decompressed; one
//!   compressed otherwise is refused, naming the format.
//! * [`Record`], [`ChainFields`] and [`Op`] are borrowed views of a line: strings point into the line unless JSON
//!   escapes force a copy, and what a command does not need is skipped ([`serde::de::IgnoredAny`]).
//!
//! Nothing here checks hashes; see [`super::verify`].

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::marker::PhantomData;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, Visitor};

use crate::policy::{End, KeyRange, prefix_end, unescape_key};

/// Longest line read as one line. Records are a few KiB; a key can make one larger (etcd takes requests of
/// 1.5 MiB by default and an escaped byte takes up to 5 characters), so this only guards against a file that is
/// not a log at all. Longer lines are skipped without being held in memory.
pub const MAX_LINE_BYTES: usize = 32 << 20;

/// Buffer size of [`LineReader`].
const READ_BUFFER_BYTES: usize = 256 << 10;

/// How many lines of a file are looked at to find the `seq` it starts with when its first line has none.
const SEQ_PROBE_LINES: u64 = 64;

/// Why the files to read could not be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// A path given on the command line cannot be looked at (missing, no permission).
    #[error("{path}: {source}")]
    Path {
        /// The path as given.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A folder cannot be listed.
    #[error("{path}: cannot list the folder: {source}")]
    Folder {
        /// The folder.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// An audit file cannot be opened or read.
    #[error("{path}: cannot read: {source}")]
    Unreadable {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A folder holds no audit file.
    #[error("{path}: no audit files here (regular files whose name contains \".log\")")]
    NoAuditFiles {
        /// The folder.
        path: String,
    },
}

/// One file to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFile {
    /// The path, as given or as found in a given folder.
    pub path: PathBuf,
    /// Where the file starts in the chain.
    pub first_seq: FirstSeq,
}

/// Where a file starts in the chain; files are read in this order (derived `Ord`: known `seq` first, ascending;
/// then files whose start could not be read; empty files last).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FirstSeq {
    /// The `seq` of the first record (estimated from a later line when the first line is damaged).
    Seq(u64),
    /// No `seq` could be read from the start of the file.
    Unknown,
    /// The file has no bytes.
    Empty,
}

/// One line as read by [`LineReader`], without its newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Line<'a> {
    /// A line that ends in a newline.
    Complete(&'a [u8]),
    /// The last line of the file, without a final newline (a write that was cut short, or a truncated file).
    Partial(&'a [u8]),
    /// A line longer than [`MAX_LINE_BYTES`]; it was skipped.
    TooLong {
        /// Its length in bytes, without the newline.
        bytes: u64,
    },
}

/// Reads a file line by line through one reused buffer.
pub struct LineReader {
    reader: BufReader<Source>,
    buf: Vec<u8>,
    number: u64,
}

/// A string field of a record: borrowed from the line, or owned when it held JSON escapes.
///
/// (`Cow<str>` borrows only as a direct field with `#[serde(borrow)]`, not inside `Option` or `Vec`; this does.)
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Text<'a>(pub Cow<'a, str>);

struct TextVisitor<'a>(PhantomData<&'a ()>);

/// The fields of a line that the chain is about. Deserializing it also checks that the line is one JSON object
/// with these fields (other fields are skipped, but must be valid JSON).
#[derive(Debug, Deserialize)]
pub struct ChainFields<'a> {
    /// The record's sequence number.
    pub seq: u64,
    /// The hash of the record before.
    #[serde(borrow)]
    pub prev_hash: Text<'a>,
    /// This line's hash.
    #[serde(borrow)]
    pub hash: Text<'a>,
    /// The record's RPC (the writer's own records are told by it).
    #[serde(borrow, default)]
    pub rpc: Option<Text<'a>>,
}

/// The fields `audit review` shows or filters on. `O` is what `ops` is read as: [`IgnoredAny`] when they are not
/// needed ([`LightRecord`]), `Vec<Op>` when they are ([`FullRecord`]).
///
/// Only `seq` is required; a field the writer left out is `None`.
#[derive(Debug, Deserialize)]
#[serde(bound(deserialize = "O: Deserialize<'de>"))]
pub struct Record<'a, O> {
    /// The record's sequence number.
    pub seq: u64,
    /// RFC 3339 time of arrival.
    #[serde(borrow, default)]
    pub time: Option<Text<'a>>,
    /// The client's certificate identity.
    #[serde(borrow, default)]
    pub identity: Option<RecordIdentity<'a>>,
    /// `Service/Method`.
    #[serde(borrow, default)]
    pub rpc: Option<Text<'a>>,
    /// The operations.
    #[serde(default)]
    pub ops: Option<O>,
    /// `allow`, `deny` or `would_deny`.
    #[serde(borrow, default)]
    pub decision: Option<Text<'a>>,
    /// Why.
    #[serde(borrow, default)]
    pub reason: Option<Text<'a>>,
    /// The gRPC code of the answer.
    #[serde(borrow, default)]
    pub code: Option<Text<'a>>,
    /// The requests a summary record stands for (`"event":"summary"`); absent on others (one request each).
    #[serde(default)]
    pub count: Option<u64>,
}

/// A record whose `ops` were skipped.
pub type LightRecord<'a> = Record<'a, IgnoredAny>;

/// A record with its `ops`.
pub type FullRecord<'a> = Record<'a, Vec<Op<'a>>>;

/// The identity fields `audit review` uses.
#[derive(Debug, Default, Deserialize)]
pub struct RecordIdentity<'a> {
    /// The subject CN.
    #[serde(borrow, default)]
    pub common_name: Option<Text<'a>>,
    /// DNS subject alternative names.
    #[serde(borrow, default)]
    pub dns_sans: Vec<Text<'a>>,
    /// URI subject alternative names.
    #[serde(borrow, default)]
    pub uri_sans: Vec<Text<'a>>,
    /// The certificate's SHA-256 fingerprint, lowercase hex.
    #[serde(borrow, default)]
    pub fingerprint_sha256: Option<Text<'a>>,
    /// The `tls.issuers` names the certificate chains to (absent without `tls.issuers`).
    #[serde(borrow, default)]
    pub issuers: Vec<Text<'a>>,
}

/// One operation, or one `compare` of a `txn` (which has no `op`). Only the fields that name keys are read.
#[derive(Debug, Default, Deserialize)]
pub struct Op<'a> {
    /// The operation, e.g. `range`, `put`, `txn`.
    #[serde(borrow, default)]
    pub op: Option<Text<'a>>,
    /// Exactly one key (escaped text).
    #[serde(borrow, default)]
    pub key: Option<Text<'a>>,
    /// The first key of an interval.
    #[serde(borrow, default)]
    pub from: Option<Text<'a>>,
    /// The end of an interval (exclusive); absent: to the end of the keyspace.
    #[serde(borrow, default)]
    pub to: Option<Text<'a>>,
    /// A lock or election name: the keys under `name/`.
    #[serde(borrow, default)]
    pub name: Option<Text<'a>>,
    /// The whole length of a key the record cut (`key`, `to`, `name` longer than 1 KiB: only their first 1 KiB is
    /// written). A cut `from` (`from_len`) needs no reading: what was written is at or before the real start.
    #[serde(default)]
    pub key_len: Option<u64>,
    #[serde(default)]
    pub to_len: Option<u64>,
    #[serde(default)]
    pub name_len: Option<u64>,
    /// How many ops an `omitted` op stands for.
    #[serde(default)]
    pub count: Option<u64>,
    /// The lease the op names: a lease RPC's, a put's, a lock's or campaign's, a compare's value (0: none).
    #[serde(default)]
    pub lease: Option<i64>,
    /// The lease etcd granted (a grant's answer).
    #[serde(default)]
    pub granted: Option<i64>,
    /// A txn's comparisons.
    #[serde(borrow, default)]
    pub compare: Vec<Op<'a>>,
    /// A txn's ops when the comparisons hold.
    #[serde(borrow, default)]
    pub success: Vec<Op<'a>>,
    /// A txn's ops otherwise.
    #[serde(borrow, default)]
    pub failure: Vec<Op<'a>>,
}

/// The keys one operation names, as written in the record (escaped text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'r> {
    /// `"key": K`.
    Key(&'r str),
    /// `"from": K` with an optional `"to": E`.
    Interval {
        /// The first key.
        from: &'r str,
        /// The end (exclusive), `None` for the end of the keyspace.
        to: Option<&'r str>,
    },
    /// `"name": N`: the keys under `N/`.
    Name(&'r str),
    /// A key or name the record cut to its first bytes (`key_len`, `name_len`): it stands for every key starting
    /// with them.
    Cut(&'r str),
    /// Ops the record left out (`{"op":"omitted","count":N}`, past its bound on ops): they could name any key,
    /// so for the filters they stand for every key.
    Omitted(u64),
    /// The keys attached to a lease, which a revoke deletes. The record does not name them, so for the filters
    /// they stand for every key.
    LeaseKeys(i64),
    /// A lease the op acts on without naming keys (grant, keep-alive, time-to-live): no key, for the filters.
    Lease(i64),
}

/// The files named by `paths` (the current folder when empty), in chain order.
///
/// A file is taken as given; a folder contributes every regular file whose name contains `.log`. A file named
/// twice is read once.
///
/// # Errors
///
/// Every path that cannot be looked at, folder that cannot be listed or holds no audit file, and file that cannot
/// be opened or read: all of them, not just the first.
pub fn audit_files(paths: &[PathBuf]) -> Result<Vec<AuditFile>, Vec<ReadError>> {
    audit_files_noting(paths, &mut Vec::new())
}

/// [`audit_files`], with a note in `notes` for every file left out: a compressed copy (`X.gz`) of a file `X`
/// also read — which `gzip` leaves while it runs, and `gzip -k` for good: read both, every record would be there
/// twice.
pub fn audit_files_noting(paths: &[PathBuf], notes: &mut Vec<String>) -> Result<Vec<AuditFile>, Vec<ReadError>> {
    let default = [PathBuf::from(".")];
    let paths = if paths.is_empty() { &default[..] } else { paths };
    let mut errors = Vec::new();
    let mut candidates = Vec::new();
    for path in paths {
        match std::fs::metadata(path) {
            // A pipe or a device would be read twice (its first records, then all): only files and folders.
            Ok(meta) if !meta.is_dir() && !meta.is_file() => errors.push(ReadError::Path {
                path: super::record::shown(path),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file or a folder"),
            }),
            Ok(meta) if meta.is_dir() => match folder_files(path) {
                Ok(found) if found.is_empty() => {
                    errors.push(ReadError::NoAuditFiles { path: super::record::shown(path) })
                }
                Ok(found) => candidates.extend(found),
                Err(source) => errors.push(ReadError::Folder { path: super::record::shown(path), source }),
            },
            Ok(_) => candidates.push(path.clone()),
            Err(source) => errors.push(ReadError::Path { path: super::record::shown(path), source }),
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut canonicals = Vec::new();
    for path in candidates {
        match std::fs::canonicalize(&path) {
            Ok(c) if seen.insert(c.clone()) => canonicals.push((path, c)),
            Ok(_) => {}
            Err(source) => errors.push(ReadError::Unreadable { path: super::record::shown(&path), source }),
        }
    }
    let mut files = Vec::new();
    for (path, canonical) in canonicals {
        let plain = canonical.to_str().and_then(|c| c.strip_suffix(".gz")).map(PathBuf::from);
        if plain.is_some_and(|p| seen.contains(&p)) {
            // Taken for a copy by its name (gzip still running, or gzip -k): not compared.
            let given = path.to_str().and_then(|p| p.strip_suffix(".gz")).map_or_else(|| path.clone(), PathBuf::from);
            notes.push(format!(
                "{} is left out: by its name, a compressed copy of {}, which is read",
                super::record::shown(&path),
                super::record::shown(&given)
            ));
            continue;
        }
        match first_seq(&path) {
            Ok(first_seq) => files.push(AuditFile { path, first_seq }),
            Err(source) => errors.push(ReadError::Unreadable { path: super::record::shown(&path), source }),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    files.sort_by(|a, b| a.first_seq.cmp(&b.first_seq).then_with(|| a.path.cmp(&b.path)));
    Ok(files)
}

/// [`audit_files`], printing every error and note for the command line: `Err` holds the exit code (2).
pub fn audit_files_or_report(paths: &[std::path::PathBuf]) -> Result<Vec<AuditFile>, std::process::ExitCode> {
    let mut notes = Vec::new();
    let files = audit_files_noting(paths, &mut notes);
    for note in notes {
        eprintln!("etcd-guard: note: {note}");
    }
    files.map_err(|errors| {
        for e in errors {
            eprintln!("etcd-guard: {e}");
        }
        std::process::ExitCode::from(2)
    })
}

/// The regular files (symbolic links followed) in `dir` whose name contains `.log`, sorted by name.
fn folder_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_name().to_string_lossy().contains(".log") {
            continue;
        }
        let path = entry.path();
        // Follow symbolic links; a dangling one is reported when it is read.
        let is_file = std::fs::metadata(&path).map(|m| m.is_file()).unwrap_or(true);
        if is_file {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Where the file at `path` starts in the chain.
pub fn first_seq(path: &Path) -> io::Result<FirstSeq> {
    let mut reader = LineReader::open(path)?;
    let mut index = 0;
    while index < SEQ_PROBE_LINES {
        let Some((_, line)) = reader.next_line()? else { break };
        let bytes = match line {
            Line::Complete(b) | Line::Partial(b) => b,
            Line::TooLong { .. } => &[][..],
        };
        if let Some(seq) = seq_of(bytes) {
            // A damaged first line still starts the file: count back from the first readable one — but for the
            // line a crash cut off just before the writer's record for it, which has that line's seq.
            let cut = index > 0 && rpc_of(bytes).as_deref() == Some(super::writer::CUT_RPC);
            return Ok(FirstSeq::Seq(seq.saturating_sub(index - u64::from(cut))));
        }
        index += 1;
    }
    Ok(if reader.line_number() == 0 { FirstSeq::Empty } else { FirstSeq::Unknown })
}

/// The `rpc` of a record line, if it parses.
pub fn rpc_of(line: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct RpcOnly {
        rpc: String,
    }
    serde_json::from_slice::<RpcOnly>(line).ok().map(|r| r.rpc)
}

/// The `seq` of a line: from the parsed record, or else from a line that at least starts with `{"seq":<digits>,`
/// (the writer puts `seq` first), so that a damaged line can still be placed. Digits without the comma after them
/// may be cut short (`{"seq":1` of seq 12) and are not read.
pub fn seq_of(line: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct SeqOnly {
        seq: u64,
    }
    if let Ok(s) = serde_json::from_slice::<SeqOnly>(line) {
        return Some(s.seq);
    }
    let rest = line.strip_prefix(b"{\"seq\":")?;
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    if rest.get(digits) != Some(&b',') {
        return None;
    }
    std::str::from_utf8(rest.get(..digits)?).ok()?.parse().ok()
}

/// What a [`LineReader`] reads: the file, or what gzip's decompression of it gives. Either starts with the bytes
/// read to tell which it is.
enum Source {
    Plain(Whole),
    Gzip(Box<flate2::read::MultiGzDecoder<BufReader<Whole>>>),
}

/// A file read from its start after its first bytes were read: those bytes, then the rest.
type Whole = io::Chain<io::Cursor<Vec<u8>>, File>;

/// The first bytes of files compressed with the formats logrotate and operators use, and how to decompress them.
const COMPRESSED: [(&[u8], &str, &str); 3] = [
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", "zstd -d"),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz", "xz -d"),
    (b"BZh", "bzip2", "bunzip2"),
];

/// gzip's first two bytes.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

// === impl LineReader ===

impl LineReader {
    /// Open `path`: a file as the writer left it, or one compressed with gzip.
    ///
    /// # Errors
    ///
    /// The file cannot be opened or read, or is compressed in another format (`InvalidData`, naming it).
    pub fn open(path: &Path) -> io::Result<LineReader> {
        let mut file = File::open(path)?;
        let mut magic = Vec::with_capacity(6);
        (&mut file).take(6).read_to_end(&mut magic)?;
        if let Some((_, format, command)) = COMPRESSED.iter().find(|(m, _, _)| magic.starts_with(m)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("compressed with {format}; only gzip is read: decompress it first ({command})"),
            ));
        }
        let gzip = magic.starts_with(&GZIP_MAGIC);
        let whole = io::Cursor::new(magic).chain(file);
        let source = if gzip {
            Source::Gzip(Box::new(flate2::read::MultiGzDecoder::new(BufReader::new(whole))))
        } else {
            Source::Plain(whole)
        };
        Ok(LineReader { reader: BufReader::with_capacity(READ_BUFFER_BYTES, source), buf: Vec::new(), number: 0 })
    }

    /// The next line and its 1-based number, or `None` at the end of the file.
    pub fn next_line(&mut self) -> io::Result<Option<(u64, Line<'_>)>> {
        let line = read_line(&mut self.reader, &mut self.buf)?;
        if line.is_some() {
            self.number += 1;
        }
        Ok(line.map(|line| (self.number, line)))
    }

    /// The 1-based number of the line last returned (0 before the first).
    pub fn line_number(&self) -> u64 {
        self.number
    }
}

/// Read one line from `reader` into `buf` (cleared first).
fn read_line<'b>(reader: &mut BufReader<Source>, buf: &'b mut Vec<u8>) -> io::Result<Option<Line<'b>>> {
    buf.clear();
    let limit = MAX_LINE_BYTES as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Some(Line::Complete(buf)));
    }
    if (buf.len() as u64) < limit {
        return Ok(Some(Line::Partial(buf)));
    }
    // Too long: skip to the end of the line without keeping it.
    let mut bytes = buf.len() as u64;
    buf.clear();
    loop {
        let chunk = reader.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|&b| b == b'\n') {
            Some(at) => {
                bytes += at as u64;
                reader.consume(at + 1);
                break;
            }
            None => {
                let len = chunk.len();
                bytes += len as u64;
                reader.consume(len);
            }
        }
    }
    Ok(Some(Line::TooLong { bytes }))
}

// === impl Source ===

impl Read for Source {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Source::Plain(file) => file.read(buf),
            Source::Gzip(decoder) => {
                decoder.read(buf).map_err(|e| io::Error::new(e.kind(), format!("gzip data cut short or corrupt: {e}")))
            }
        }
    }
}

// === impl Text ===

impl Text<'_> {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Text<'a>, D::Error> {
        deserializer.deserialize_str(TextVisitor(PhantomData))
    }
}

impl<'de: 'a, 'a> Visitor<'de> for TextVisitor<'a> {
    type Value = Text<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Text<'a>, E> {
        Ok(Text(Cow::Owned(v)))
    }
}

// === impl Record ===

impl<O> Record<'_, O> {
    /// Who sent it, in one word: the CN, else the first URI SAN, else the first DNS SAN, else `-`.
    pub fn identity_label(&self) -> &str {
        self.identity.as_ref().map_or("-", RecordIdentity::label)
    }

    /// Which field [`Record::identity_label`] comes from: `common_name`, `uri_san`, `dns_san`, or `""` for none.
    pub fn identity_source(&self) -> &'static str {
        self.identity.as_ref().map_or("", RecordIdentity::label_source)
    }

    /// The field as text, `""` when absent.
    pub fn rpc(&self) -> &str {
        self.rpc.as_ref().map_or("", Text::as_str)
    }

    /// The field as text, `""` when absent.
    pub fn decision(&self) -> &str {
        self.decision.as_ref().map_or("", Text::as_str)
    }

    /// The requests this record stands for: a summary record's `count`, else 1.
    pub fn requests(&self) -> u64 {
        self.count.unwrap_or(1)
    }

    /// Whether the record is a denial (`deny` or `would_deny`).
    pub fn is_denial(&self) -> bool {
        matches!(self.decision(), "deny" | "would_deny")
    }
}

impl FullRecord<'_> {
    /// The keys of all operations, depth first (a txn's compares, then success, then failure ops).
    pub fn targets(&self) -> Vec<Target<'_>> {
        let mut out = Vec::new();
        for op in self.ops.iter().flatten() {
            op.collect_targets(&mut out);
        }
        out
    }

    /// The leases its operations name (not 0), depth first, each once.
    pub fn leases(&self) -> Vec<i64> {
        let mut out = Vec::new();
        for op in self.ops.iter().flatten() {
            op.collect_leases(&mut out);
        }
        out
    }

    /// Whether the request changes keys ([`Op::writes`]). A summary record (denials counted, no ops) by its RPC:
    /// whether the denials it counts could have changed keys.
    pub fn writes(&self) -> bool {
        // A summary has no ops; a request refused before its message was read (too large, malformed, reset) has
        // only its method's name (`{"op":"delete_range"}`): both by their RPC.
        let unread = match self.ops.as_deref() {
            None | Some([]) => true,
            Some([only]) => only.is_bare(),
            Some(_) => false,
        };
        if self.count.is_some() || unread {
            return matches!(
                self.rpc(),
                "KV/Put"
                    | "KV/DeleteRange"
                    | "KV/Txn"
                    | "Lease/LeaseRevoke"
                    | "Lock/Lock"
                    | "Lock/Unlock"
                    | "Election/Campaign"
                    | "Election/Proclaim"
                    | "Election/Resign"
            );
        }
        self.ops.iter().flatten().any(Op::writes)
    }
}

// === impl RecordIdentity ===

impl RecordIdentity<'_> {
    /// The CN, else the first URI SAN, else the first DNS SAN, else `-`.
    pub fn label(&self) -> &str {
        self.labelled().map_or("-", |(name, _)| name.as_str())
    }

    /// Which field [`RecordIdentity::label`] comes from (`""` for none): a CN can read like a SPIFFE ID or a DNS
    /// name, so a summary counts names from different fields apart.
    pub fn label_source(&self) -> &'static str {
        self.labelled().map_or("", |(_, source)| source)
    }

    fn labelled(&self) -> Option<(&Text<'_>, &'static str)> {
        let cn = self.common_name.as_ref().filter(|cn| !cn.is_empty()).map(|cn| (cn, "common_name"));
        cn.or_else(|| self.uri_sans.first().map(|u| (u, "uri_san")))
            .or_else(|| self.dns_sans.first().map(|d| (d, "dns_san")))
    }

    /// Whether the CN or any DNS or URI SAN satisfies `matches`.
    pub fn any_name(&self, mut matches: impl FnMut(&str) -> bool) -> bool {
        self.common_name.iter().chain(&self.dns_sans).chain(&self.uri_sans).any(|name| matches(name))
    }
}

// === impl Op ===

impl<'a> Op<'a> {
    /// Whether the op changes keys: a put, a delete, a lease revoke (it deletes the lease's keys), a lock,
    /// unlock, campaign, proclaim or resign; a txn if either branch does (which one ran is not recorded); ops a
    /// record left out, which could have.
    pub fn writes(&self) -> bool {
        match self.op.as_deref() {
            Some("put" | "delete" | "lease_revoke" | "lock" | "unlock" | "campaign" | "proclaim" | "resign")
            | Some("omitted") => true,
            Some("txn") => self.success.iter().chain(&self.failure).any(Op::writes),
            _ => false,
        }
    }

    /// Whether the op is only a method's name, as recorded for a request whose message was not read.
    fn is_bare(&self) -> bool {
        self.key.is_none()
            && self.from.is_none()
            && self.name.is_none()
            && self.lease.is_none()
            && self.count.is_none()
            && self.compare.is_empty()
            && self.success.is_empty()
            && self.failure.is_empty()
    }

    /// Push the keys this op (and any nested op) names onto `out`.
    pub fn collect_targets<'r>(&'r self, out: &mut Vec<Target<'r>>) {
        if let Some(key) = &self.key {
            out.push(if self.key_len.is_some() { Target::Cut(key) } else { Target::Key(key) });
        }
        if let Some(from) = &self.from {
            // A cut `from` is at or before the real one; a cut `to` could be before the real end: the interval
            // then stands for everything from `from` on (more than it was, never less).
            let to = self.to.as_deref().filter(|_| self.to_len.is_none());
            out.push(Target::Interval { from, to });
        }
        if let Some(name) = &self.name {
            out.push(if self.name_len.is_some() { Target::Cut(name) } else { Target::Name(name) });
        }
        let lease = self.lease.filter(|&l| l != 0).or(self.granted);
        match (self.op.as_deref(), lease) {
            (Some("omitted"), _) => out.push(Target::Omitted(self.count.unwrap_or(0))),
            (Some("lease_revoke"), Some(lease)) => out.push(Target::LeaseKeys(lease)),
            (Some("lease_grant" | "lease_keepalive" | "lease_timetolive"), Some(lease)) => {
                out.push(Target::Lease(lease));
            }
            _ => {}
        }
        for op in self.compare.iter().chain(&self.success).chain(&self.failure) {
            op.collect_targets(out);
        }
    }

    /// Push the leases this op (and any nested op) names onto `out`, unless 0 or already there.
    pub fn collect_leases(&self, out: &mut Vec<i64>) {
        for lease in [self.lease, self.granted].into_iter().flatten() {
            if lease != 0 && !out.contains(&lease) {
                out.push(lease);
            }
        }
        for op in self.compare.iter().chain(&self.success).chain(&self.failure) {
            op.collect_leases(out);
        }
    }
}

/// A lease ID as etcdctl prints it (Go's `%016x` of an int64: a negative one is `-` and 15 digits).
pub struct LeaseHex(pub i64);

impl fmt::Display for LeaseHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 < 0 { write!(f, "-{:015x}", self.0.unsigned_abs()) } else { write!(f, "{:016x}", self.0) }
    }
}

// === impl Target ===

impl Target<'_> {
    /// The keys it names (`None`: no key). Escaped text that does not unescape stands for its own bytes; an empty
    /// or inverted interval stands for its first key.
    pub fn range(&self) -> Option<KeyRange> {
        Some(match *self {
            Target::Key(key) => KeyRange::point(key_bytes(key)),
            Target::Interval { from, to } => {
                let start = key_bytes(from);
                let end = to.map_or(End::Unbounded, |to| End::Key(key_bytes(to)));
                KeyRange::new(start.clone(), end).unwrap_or_else(|_| KeyRange::point(start))
            }
            Target::Name(name) => {
                let mut prefix = key_bytes(name);
                prefix.push(b'/');
                KeyRange::prefix(prefix)
            }
            Target::Cut(start) => KeyRange::prefix(key_bytes(start)),
            Target::Omitted(_) | Target::LeaseKeys(_) => KeyRange::all(),
            Target::Lease(_) => return None,
        })
    }
}

impl fmt::Display for Target<'_> {
    /// Compact, in the record's escaped text: `key`; `P*` for the interval of every key starting with `P`;
    /// `[from, to)` for another interval, `[from, +inf)` when it has no end; a lock or election `name`. The empty
    /// key is `""`, the whole keyspace `*`; a key the record cut (longer than 1 KiB) ends with `…`. Unambiguous, as the policy's ranges print: in keys a `*` is written
    /// `\x2a` and a space `\x20` (a table row adds ` +N`), a key's leading `[` `\x5b`, and within an interval a
    /// `,` `\x2c` and an end that is literally `+inf` `\x2binf` — all of which read back as the same bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Target::Key(key) | Target::Name(key) => shown(f, key, Part::Alone),
            Target::Cut(start) => {
                shown(f, start, Part::Alone)?;
                f.write_char('…')
            }
            Target::Omitted(count) => write!(f, "({count} ops omitted)"),
            // As etcdctl prints lease IDs. (A space: no key reads like these, see above.)
            Target::LeaseKeys(lease) => write!(f, "(keys of lease {})", LeaseHex(lease)),
            Target::Lease(lease) => write!(f, "(lease {})", LeaseHex(lease)),
            Target::Interval { from, to } => {
                let end = to.map_or(End::Unbounded, |to| End::Key(key_bytes(to)));
                if prefix_end(&key_bytes(from)) == end {
                    if !from.is_empty() {
                        shown(f, from, Part::Alone)?;
                    }
                    return f.write_char('*');
                }
                f.write_char('[')?;
                shown(f, from, Part::Start)?;
                f.write_str(", ")?;
                match to {
                    Some(to) => shown(f, to, Part::End)?,
                    None => f.write_str("+inf")?,
                }
                f.write_char(')')
            }
        }
    }
}

/// Where [`shown`] writes a key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Part {
    Alone,
    Start,
    End,
}

/// An escaped key from a record as [`Target`] shows it.
fn shown(f: &mut fmt::Formatter<'_>, key: &str, part: Part) -> fmt::Result {
    if key.is_empty() {
        return f.write_str("\"\"");
    }
    if part == Part::End && key == "+inf" {
        return f.write_str("\\x2binf");
    }
    for (i, c) in key.char_indices() {
        match c {
            '*' => f.write_str("\\x2a")?,
            '…' => f.write_str("\\xe2\\x80\\xa6")?,
            ' ' => f.write_str("\\x20")?,
            '[' if i == 0 && part == Part::Alone => f.write_str("\\x5b")?,
            ',' if part != Part::Alone => f.write_str("\\x2c")?,
            c => f.write_char(c)?,
        }
    }
    Ok(())
}

/// The bytes of an escaped key from a record.
fn key_bytes(text: &str) -> Vec<u8> {
    unescape_key(text).unwrap_or_else(|_| text.as_bytes().to_vec())
}

/// Builders of correctly chained audit lines for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::path::Path;

    use crate::audit::chain::{GENESIS, Hasher};

    /// What varies between test records.
    #[derive(Debug, Clone)]
    pub struct Spec {
        pub common_name: &'static str,
        pub uri_san: Option<&'static str>,
        pub rpc: &'static str,
        pub decision: &'static str,
        pub code: &'static str,
        /// The `ops` array as JSON.
        pub ops: String,
        pub reason: &'static str,
    }

    impl Spec {
        /// `cn` reads `key` and is allowed.
        pub fn get(cn: &'static str, key: &str) -> Spec {
            Spec {
                common_name: cn,
                uri_san: None,
                rpc: "KV/Range",
                decision: "allow",
                code: "OK",
                ops: format!(r#"[{{"op":"range","key":{}}}]"#, json(key)),
                reason: "read granted",
            }
        }

        /// The record of `etcd-guard audit change-key` (the only place where a chain may move on to a new HMAC
        /// key).
        pub fn key_change() -> Spec {
            Spec {
                common_name: "etcd-guard",
                uri_san: None,
                rpc: crate::audit::writer::KEY_CHANGE_RPC,
                decision: "allow",
                code: "OK",
                ops: r#"[{"op":"key_change","after_seq":5,"from":"hmac","previous":"closed"}]"#.to_owned(),
                reason: "the HMAC key was changed",
            }
        }

        /// The writer's open record of a run.
        pub fn open() -> Spec {
            Spec {
                common_name: "etcd-guard",
                uri_san: None,
                rpc: crate::audit::writer::OPEN_RPC,
                decision: "allow",
                code: "OK",
                ops: r#"[{"op":"open","after_seq":5,"previous":"closed"}]"#.to_owned(),
                reason: "audit log opened after a clean close",
            }
        }

        /// `cn` writes `key` and is denied.
        pub fn denied_put(cn: &'static str, key: &str) -> Spec {
            Spec {
                common_name: cn,
                uri_san: None,
                rpc: "KV/Put",
                decision: "deny",
                code: "PermissionDenied",
                ops: format!(r#"[{{"op":"put","key":{},"lease":0}}]"#, json(key)),
                reason: "no write grant",
            }
        }
    }

    fn json(s: &str) -> String {
        serde_json::to_string(s).unwrap_or_default()
    }

    /// The time of record `seq`: 2026-01-01 plus `seq` minutes.
    pub fn time_of(seq: u64) -> String {
        let minutes = seq % (24 * 60);
        format!("2026-01-{:02}T{:02}:{:02}:00.000000Z", 1 + seq / (24 * 60), minutes / 60, minutes % 60)
    }

    /// One sealed line (with its newline) for record `seq` after `prev`, and its hash.
    pub fn line(hasher: &Hasher, seq: u64, prev: &str, spec: &Spec) -> (Vec<u8>, String) {
        let uri = spec.uri_san.map(json).unwrap_or_default();
        // Two certificates of one name from two CAs: carol's come from the components CA.
        let (fingerprint, issuers) = match spec.common_name {
            "carol" => ("c0ffee00", r#","issuers":["components"]"#),
            _ => ("3f00", r#","issuers":["etcd"]"#),
        };
        let body = format!(
            concat!(
                r#"{{"seq":{seq},"time":"{time}","conn":1,"peer":"10.0.0.5:53122","identity":{{"common_name":{cn},"#,
                r#""organizations":[],"organizational_units":[],"dns_sans":[],"uri_sans":[{uri}],"#,
                r#""fingerprint_sha256":"{fingerprint}"{issuers}}},"roles":["r"],"rpc":"{rpc}","event":"call","ops":{ops},"#,
                r#""decision":"{decision}","reason":{reason},"code":"{code}","latency_us":10,"prev_hash":"{prev}""#
            ),
            seq = seq,
            time = time_of(seq),
            cn = json(spec.common_name),
            uri = uri,
            fingerprint = fingerprint,
            issuers = issuers,
            rpc = spec.rpc,
            ops = spec.ops,
            decision = spec.decision,
            reason = json(spec.reason),
            code = spec.code,
            prev = prev,
        );
        let mut line = body;
        let mut hash = String::new();
        hasher.seal(&mut line, 0, &mut hash);
        (line.into_bytes(), hash)
    }

    /// The hash a sealed line (with or without its newline) ends with.
    pub fn hash_of(line: &[u8]) -> String {
        let text = line.strip_suffix(b"\n").unwrap_or(line);
        crate::audit::chain::split_line(text).map(|(_, hash)| hash.to_owned()).unwrap_or_default()
    }

    /// Lines for records `first..first + specs.len()`, chained from `prev`.
    pub fn chain(hasher: &Hasher, first: u64, prev: &str, specs: &[Spec]) -> Vec<Vec<u8>> {
        let mut prev = prev.to_owned();
        let mut out = Vec::new();
        for (i, spec) in specs.iter().enumerate() {
            let (line, hash) = line(hasher, first + i as u64, &prev, spec);
            out.push(line);
            prev = hash;
        }
        out
    }

    /// `n` allowed reads of `k1`, `k2`, … by `alice`, from seq 1.
    pub fn simple_chain(hasher: &Hasher, n: usize) -> Vec<Vec<u8>> {
        let specs: Vec<Spec> = (1..=n).map(|i| Spec::get("alice", &format!("k{i}"))).collect();
        chain(hasher, 1, GENESIS, &specs)
    }

    /// Write `lines` to `path`.
    pub fn write(path: &Path, lines: &[Vec<u8>]) -> std::io::Result<()> {
        std::fs::write(path, lines.concat())
    }

    /// Replace `path` by `path.gz`, compressed as `gzip` (or logrotate's `compress`) does; the new path.
    pub fn gzip(path: &Path) -> std::io::Result<std::path::PathBuf> {
        use std::io::Write as _;
        let mut name = path.as_os_str().to_owned();
        name.push(".gz");
        let compressed = std::path::PathBuf::from(name);
        let mut encoder = flate2::write::GzEncoder::new(std::fs::File::create(&compressed)?, Default::default());
        encoder.write_all(&std::fs::read(path)?)?;
        encoder.finish()?;
        std::fs::remove_file(path)?;
        Ok(compressed)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use crate::audit::chain::Hasher;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn folders_are_ordered_by_first_seq_and_empty_files_last() -> TestResult {
        let dir = tempfile::tempdir()?;
        let lines = simple_chain(&Hasher::unkeyed(), 6);
        // Names sort the other way round from the chain.
        write(&dir.path().join("a.log"), &lines[4..])?;
        write(&dir.path().join("b.log.00000000000000000003"), &lines[2..4])?;
        write(&dir.path().join("c.log.00000000000000000001"), &lines[..2])?;
        write(&dir.path().join("0.log.empty"), &[])?;
        write(&dir.path().join("notes.txt"), &lines)?;
        std::fs::create_dir(dir.path().join("sub.log"))?;
        let files = audit_files(&[dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        let names: Vec<_> = files.iter().filter_map(|f| f.path.file_name()?.to_str().map(str::to_owned)).collect();
        assert_eq!(names, ["c.log.00000000000000000001", "b.log.00000000000000000003", "a.log", "0.log.empty"]);
        assert_eq!(files[1].first_seq, FirstSeq::Seq(3));
        assert_eq!(files[3].first_seq, FirstSeq::Empty);
        Ok(())
    }

    #[test]
    fn a_damaged_first_line_is_placed_by_the_next_one() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut lines = simple_chain(&Hasher::unkeyed(), 4);
        lines[2] = b"garbage\n".to_vec();
        let path = dir.path().join("x.log");
        write(&path, &lines[2..])?;
        assert_eq!(first_seq(&path)?, FirstSeq::Seq(3));
        write(&path, &[b"?\n".to_vec()])?;
        assert_eq!(first_seq(&path)?, FirstSeq::Unknown);
        Ok(())
    }

    #[test]
    fn missing_paths_and_empty_folders_are_all_reported() -> TestResult {
        let dir = tempfile::tempdir()?;
        let errors = audit_files(&[dir.path().join("nope.log"), dir.path().to_path_buf()]).err().unwrap_or_default();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(matches!(errors[0], ReadError::Path { .. }));
        assert!(matches!(errors[1], ReadError::NoAuditFiles { .. }));
        Ok(())
    }

    #[test]
    fn the_same_file_twice_is_read_once() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("audit.log");
        write(&path, &simple_chain(&Hasher::unkeyed(), 2))?;
        let files = audit_files(&[path.clone(), dir.path().to_path_buf()]).map_err(|e| format!("{e:?}"))?;
        assert_eq!(files.len(), 1);
        Ok(())
    }

    #[test]
    fn lines_complete_partial_and_too_long() -> TestResult {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("x.log");
        let mut data = b"one\n\n".to_vec();
        data.extend(std::iter::repeat_n(b'x', MAX_LINE_BYTES + 10));
        data.extend(b"\ntwo\nthr");
        std::fs::write(&path, data)?;
        let mut r = LineReader::open(&path)?;
        assert_eq!(r.next_line()?, Some((1, Line::Complete(b"one"))));
        assert_eq!(r.next_line()?, Some((2, Line::Complete(b""))));
        assert_eq!(r.next_line()?, Some((3, Line::TooLong { bytes: MAX_LINE_BYTES as u64 + 10 })));
        assert_eq!(r.next_line()?, Some((4, Line::Complete(b"two"))));
        assert_eq!(r.next_line()?, Some((5, Line::Partial(b"thr"))));
        assert_eq!(r.line_number(), 5);
        assert_eq!(r.next_line()?, None);
        Ok(())
    }

    #[test]
    fn records_borrow_and_unescape() -> TestResult {
        let line = br#"{"seq":7,"identity":{"common_name":"","dns_sans":["d"],"uri_sans":["spiffe://x"]},"rpc":"KV/Txn","ops":[{"op":"txn","compare":[{"target":"version","result":"equal","key":"a\\x00"}],"success":[{"op":"put","key":"b"}],"failure":[{"op":"range","from":"c/","to":"c0"},{"op":"lock","name":"l"}]}],"decision":"deny","prev_hash":"x","hash":"y"}"#;
        let r: FullRecord<'_> = serde_json::from_slice(line)?;
        assert_eq!(r.seq, 7);
        assert_eq!(r.identity_label(), "spiffe://x");
        assert!(matches!(r.rpc.as_ref().map(|t| &t.0), Some(Cow::Borrowed("KV/Txn"))));
        let targets = r.targets();
        let shown: Vec<String> = targets.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a\\x00", "b", "c/*", "l"]);
        assert_eq!(targets[0].range(), Some(KeyRange::point(b"a\x00".to_vec())));
        assert_eq!(targets[3].range(), Some(KeyRange::prefix("l/")));
        assert!(r.is_denial());
        let light: LightRecord<'_> = serde_json::from_slice(line)?;
        assert!(light.ops.is_some());
        Ok(())
    }

    #[test]
    fn targets_display_compactly() {
        let interval = |from, to| Target::Interval { from, to }.to_string();
        assert_eq!(interval("a/", Some("a0")), "a/*");
        assert_eq!(interval("a\\xff", Some("b")), "a\\xff*");
        assert_eq!(interval("a", Some("c")), "[a, c)");
        assert_eq!(interval("a", None), "[a, +inf)");
        assert_eq!(interval("", None), "*");
        assert_eq!(interval("", Some("b")), "[\"\", b)");
        assert_eq!(Target::Key("").to_string(), "\"\"");
    }

    /// A summary record has no ops: whether it counts writes comes from its RPC.
    #[test]
    fn summary_records_write_by_their_rpc() -> Result<(), serde_json::Error> {
        let summary = |rpc: &str| format!(r#"{{"seq":1,"rpc":"{rpc}","event":"summary","count":5,"ops":[]}}"#);
        for (rpc, writes) in [("KV/Put", true), ("KV/Txn", true), ("Lock/Unlock", true), ("KV/Range", false)] {
            assert_eq!(serde_json::from_str::<FullRecord<'_>>(&summary(rpc))?.writes(), writes, "{rpc}");
        }
        // So has a request refused before its message was read: only its method is recorded.
        let unread = |rpc: &str, op: &str| format!(r#"{{"seq":1,"rpc":"{rpc}","ops":[{{"op":"{op}"}}]}}"#);
        for (rpc, op, writes) in
            [("KV/DeleteRange", "delete_range", true), ("KV/Txn", "txn", true), ("KV/Range", "range", false)]
        {
            assert_eq!(serde_json::from_str::<FullRecord<'_>>(&unread(rpc, op))?.writes(), writes, "{rpc}");
        }
        // A read-only txn stays a read.
        let txn = r#"{"seq":1,"rpc":"KV/Txn","ops":[{"op":"txn","success":[{"op":"range","key":"a"}]}]}"#;
        assert!(!serde_json::from_str::<FullRecord<'_>>(txn)?.writes());
        Ok(())
    }

    /// Ops a record left out could name any key: a key filter must not pass over the record (before, a write put
    /// after enough others in one txn was in no `--key-prefix` review).
    #[test]
    fn omitted_ops_stand_for_every_key() -> Result<(), serde_json::Error> {
        let op: Op<'_> =
            serde_json::from_str(r#"{"op":"txn","success":[{"op":"put","key":"a/1"},{"op":"omitted","count":37}]}"#)?;
        let mut targets = Vec::new();
        op.collect_targets(&mut targets);
        assert_eq!(targets, [Target::Key("a/1"), Target::Omitted(37)]);
        assert_eq!(targets[1].range(), Some(KeyRange::all()));
        assert_eq!(targets[1].to_string(), "(37 ops omitted)");
        Ok(())
    }

    /// A revoke deletes the keys attached to its lease, which the record does not name: they stand for every key.
    /// Other lease RPCs name no key. Every lease an op names (a put's, a compare's) is found, in etcdctl's hex.
    #[test]
    fn leases_are_found_and_a_revoke_stands_for_every_key() -> Result<(), serde_json::Error> {
        let targets_of = |line: &str| -> Result<Vec<String>, serde_json::Error> {
            let op: Op<'_> = serde_json::from_str(line)?;
            let mut targets = Vec::new();
            op.collect_targets(&mut targets);
            Ok(targets.iter().map(|t| format!("{t} {:?}", t.range())).collect())
        };
        let lease = 0x694d_7a0e_7bd5_d60a_i64;
        let all = format!("{:?}", Some(KeyRange::all()));
        assert_eq!(
            targets_of(&format!(r#"{{"op":"lease_revoke","lease":{lease}}}"#))?,
            [format!("(keys of lease 694d7a0e7bd5d60a) {all}")]
        );
        assert_eq!(targets_of(r#"{"op":"lease_keepalive","lease":255}"#)?, ["(lease 00000000000000ff) None"]);
        // A client may choose a negative ID (etcd takes it): shown as etcdctl shows it.
        assert_eq!(targets_of(r#"{"op":"lease_keepalive","lease":-5}"#)?, ["(lease -000000000000005) None"]);
        assert_eq!(LeaseHex(i64::MIN).to_string(), "-8000000000000000");
        assert_eq!(targets_of(r#"{"op":"lease_grant","ttl":60}"#)?, Vec::<String>::new());
        assert_eq!(targets_of(r#"{"op":"lease_grant","ttl":60,"granted":16}"#)?, ["(lease 0000000000000010) None"]);
        // A put's lease is not a target of its own (the put names its key).
        assert_eq!(targets_of(r#"{"op":"put","key":"a","lease":9}"#)?.len(), 1);
        let line = r#"{"seq":1,"rpc":"KV/Txn","ops":[{"op":"txn","compare":[{"target":"lease","result":"equal","key":"a","lease":5}],"success":[{"op":"put","key":"a","lease":9},{"op":"put","key":"b","lease":5}],"failure":[{"op":"put","key":"c","lease":0}]}]}"#;
        let record: FullRecord<'_> = serde_json::from_str(line)?;
        assert_eq!(record.leases(), [5, 9]);
        Ok(())
    }

    /// A key the record cut (its `key_len`) stands for every key starting with what was written, shown ending `…`;
    /// an interval whose end was cut, for everything from its start on.
    #[test]
    fn cut_keys_stand_for_every_key_they_start() -> Result<(), serde_json::Error> {
        let op: Op<'_> = serde_json::from_str(r#"{"op":"put","key":"long/k","key_len":70000}"#)?;
        let mut targets = Vec::new();
        op.collect_targets(&mut targets);
        assert_eq!(targets, [Target::Cut("long/k")]);
        assert_eq!(targets[0].range(), Some(KeyRange::prefix(b"long/k".to_vec())));
        assert_eq!(targets[0].to_string(), "long/k…");
        let op: Op<'_> = serde_json::from_str(r#"{"op":"range","from":"a","to":"b/x","to_len":5000}"#)?;
        let mut targets = Vec::new();
        op.collect_targets(&mut targets);
        assert_eq!(targets, [Target::Interval { from: "a", to: None }]);
        // A key that really ends with `…` is not taken for a cut one.
        assert_eq!(Target::Key("a…").to_string(), "a\\xe2\\x80\\xa6");
        Ok(())
    }

    /// Keys that look like another target's form are shown escaped (a reviewer's table and summary must not
    /// count a literal key `/registry/secrets/*` as the prefix).
    #[test]
    fn targets_are_shown_unambiguously() {
        let interval = |from, to| Target::Interval { from, to }.to_string();
        let key = |k| Target::Key(k).to_string();
        assert_eq!(key("/registry/secrets/*"), "/registry/secrets/\\x2a");
        assert_ne!(key("/registry/secrets/*"), interval("/registry/secrets/", Some("/registry/secrets0")));
        assert_eq!(key("*"), "\\x2a");
        assert_eq!(key("[/a, +inf)"), "\\x5b/a,\\x20+inf)");
        assert_eq!(key("cilium/a +3"), "cilium/a\\x20+3");
        assert_eq!(interval("a,b", Some("+inf")), "[a\\x2cb, \\x2binf)");
        assert_eq!(interval("a*", Some("a+")), "a\\x2a*");
        // Each reads back as the same bytes.
        for shown in [key("/registry/secrets/*"), key("[/a, +inf)"), key("cilium/a +3")] {
            let bytes = unescape_key(&shown).unwrap_or_default();
            assert!(
                [&b"/registry/secrets/*"[..], b"[/a, +inf)", b"cilium/a +3"].contains(&bytes.as_slice()),
                "{shown}"
            );
        }
    }

    #[test]
    fn seq_of_damaged_lines() {
        assert_eq!(seq_of(br#"{"seq":12,"time":"#), Some(12));
        assert_eq!(seq_of(br#"{"time":"t","seq":13}"#), Some(13));
        assert_eq!(seq_of(b"{\"seq\":x"), None);
    }
}
