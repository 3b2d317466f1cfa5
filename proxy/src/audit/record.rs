//! One audit record, and its JSON line (format: `docs/audit.md`).
//!
//! The request path only gathers what a record needs (the ops are rendered from the decoded request right away, so
//! nothing of the request is kept); the writer thread adds `seq` and the chain and serialises.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;

use tonic::Code;

use crate::identity::Identity;
use crate::policy::{End, KeyRange};

/// Who a connection is, rendered once per connection.
#[derive(Debug)]
pub struct Subject {
    /// `"conn":…,"peer":"…","identity":{…},"roles":[…]` — already JSON.
    json: String,
}

/// What the proxy decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// Denied by the policy, served because every binding of the identity is `audit-only`.
    WouldDeny,
}

/// What a record is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A unary call, or the request that opens a server stream.
    Call,
    /// A message on a client stream.
    Message,
    /// The end of a stream.
    End,
    /// Denials of one RPC by one identity that got no record of their own (`audit.denial_records`): `count` of
    /// them, from the record's `time` to `last`.
    Summary { count: u64, last: SystemTime },
}

/// A record before the writer numbers and chains it.
#[derive(Debug)]
pub struct Record {
    pub subject: Arc<Subject>,
    pub time: SystemTime,
    pub rpc: &'static str,
    pub event: Event,
    pub stream: Option<u64>,
    /// The rendered `ops` array (`[…]`).
    pub ops: String,
    pub decision: Decision,
    pub reason: String,
    pub code: Code,
    pub revision: Option<i64>,
    pub latency_us: u64,
}

// === impl Subject ===

impl Subject {
    pub fn new(conn: u64, peer: SocketAddr, identity: &Identity, roles: &[String]) -> Subject {
        let mut json = String::with_capacity(256);
        let _ = write!(json, "\"conn\":{conn},\"peer\":\"{peer}\",");
        json.push_str("\"identity\":{\"common_name\":");
        match &identity.common_name {
            Some(cn) => push_json_str(&mut json, cn),
            None => json.push_str("null"),
        }
        for (name, values) in [
            ("organizations", &identity.organizations),
            ("organizational_units", &identity.organizational_units),
            ("dns_sans", &identity.dns_sans),
            ("uri_sans", &identity.uri_sans),
        ] {
            let _ = write!(json, ",\"{name}\":");
            push_json_str_list(&mut json, values);
        }
        json.push_str(",\"fingerprint_sha256\":");
        push_json_str(&mut json, &identity.fingerprint_sha256);
        // Only with `tls.issuers` set: records without it keep their shape.
        if !identity.issuers.is_empty() {
            json.push_str(",\"issuers\":");
            push_json_str_list(&mut json, &identity.issuers);
        }
        json.push_str("},\"roles\":");
        push_json_str_list(&mut json, roles);
        Subject { json }
    }

    /// The proxy itself, for records it writes on its own behalf.
    pub fn proxy() -> Subject {
        let json = "\"conn\":0,\"peer\":\"0.0.0.0:0\",\"identity\":{\"common_name\":\"etcd-guard\",\"organizations\":[],\
                    \"organizational_units\":[],\"dns_sans\":[],\"uri_sans\":[],\"fingerprint_sha256\":\"\"},\"roles\":[]";
        Subject { json: json.to_string() }
    }
}

// === impl Decision ===

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::WouldDeny => "would_deny",
        }
    }
}

// === impl Event ===

impl Event {
    pub fn as_str(self) -> &'static str {
        match self {
            Event::Call => "call",
            Event::Message => "message",
            Event::End => "end",
            Event::Summary { .. } => "summary",
        }
    }
}

// === impl Record ===

impl Record {
    /// Append this record's line body (everything before `,"hash":`) to `out`.
    ///
    /// Written piece by piece rather than through `format!`: the writer thread does this for every request, and
    /// the formatting machinery was a good part of its time.
    pub fn write_body(&self, seq: u64, prev_hash: &str, out: &mut String) {
        out.reserve(512 + self.ops.len() + self.reason.len());
        out.push_str("{\"seq\":");
        push_u64(out, seq);
        out.push_str(",\"time\":\"");
        push_time(out, self.time);
        out.push_str("\",");
        out.push_str(&self.subject.json);
        out.push_str(",\"rpc\":");
        push_json_str(out, self.rpc);
        out.push_str(",\"event\":\"");
        out.push_str(self.event.as_str());
        out.push('"');
        if let Event::Summary { count, last } = self.event {
            out.push_str(",\"count\":");
            push_u64(out, count);
            out.push_str(",\"last_time\":\"");
            push_time(out, last);
            out.push('"');
        }
        if let Some(stream) = self.stream {
            out.push_str(",\"stream\":");
            push_u64(out, stream);
        }
        out.push_str(",\"ops\":");
        out.push_str(if self.ops.is_empty() { "[]" } else { &self.ops });
        out.push_str(",\"decision\":\"");
        out.push_str(self.decision.as_str());
        out.push_str("\",\"reason\":");
        push_json_str(out, &shortened(&self.reason, MAX_REASON_BYTES));
        out.push_str(",\"code\":\"");
        out.push_str(code_name(self.code));
        out.push('"');
        if let Some(rev) = self.revision {
            out.push_str(",\"revision\":");
            if rev < 0 {
                out.push('-');
            }
            push_u64(out, rev.unsigned_abs());
        }
        out.push_str(",\"latency_us\":");
        push_u64(out, self.latency_us);
        out.push_str(",\"prev_hash\":\"");
        out.push_str(prev_hash);
        out.push('"');
    }
}

/// `n` in decimal.
fn push_u64(out: &mut String, n: u64) {
    push_padded(out, n, 0);
}

/// `n` in decimal, with leading zeros to at least `width` digits.
fn push_padded(out: &mut String, mut n: u64, width: usize) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for _ in digits.len() - at..width {
        out.push('0');
    }
    // ASCII digits: one copy rather than a push per character.
    out.push_str(std::str::from_utf8(&digits[at..]).unwrap_or_default());
}

/// gRPC code names as the record writes them (`OK`, `PermissionDenied`, …).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Cancelled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// RFC 3339, UTC, microseconds: `2026-11-22T10:15:03.123456Z`.
fn push_time(out: &mut String, t: SystemTime) {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let dt = time::OffsetDateTime::UNIX_EPOCH + since;
    // Years outside 0..=9999 cannot come from a clock after 1970 and before the year 10000.
    push_padded(out, u64::try_from(dt.year()).unwrap_or(0), 4);
    for (sep, value) in
        [('-', u8::from(dt.month())), ('-', dt.day()), ('T', dt.hour()), (':', dt.minute()), (':', dt.second())]
    {
        out.push(sep);
        push_padded(out, u64::from(value), 2);
    }
    out.push('.');
    push_padded(out, u64::from(dt.microsecond()), 6);
    out.push('Z');
}

// === ops ===

/// What one record's `ops` may take, about: once its JSON is this long, further ops (at any depth) are counted,
/// not written — each list that left some out ends with `{"op":"omitted","count":N}`. A request of
/// `max_request_bytes` (2 MiB of empty Txn compares is a million of them) must not make a record that readers
/// refuse or that rotates the history away.
pub const MAX_OPS_BYTES: usize = 64 * 1024;

/// The bytes of a key written into a record; a longer key is cut there, and the field `<name>_len` gives its
/// whole length.
pub const MAX_KEY_BYTES: usize = 1024;

/// The bytes of a `reason` written into a record (it can name keys); a longer one is cut there, ending `…`.
pub const MAX_REASON_BYTES: usize = 4096;

/// Builds the `ops` array of a record.
#[derive(Debug, Default)]
pub struct Ops {
    buf: String,
    /// Where this list starts in `buf` (a nested list is written into its parent's buffer).
    start: usize,
    /// Ops left out for [`MAX_OPS_BYTES`].
    omitted: usize,
}

/// One op object being written; fields with zero/false values are left out.
pub struct Op<'a> {
    buf: &'a mut String,
}

impl Ops {
    pub fn new() -> Ops {
        // Room for a typical op (a key of a few dozen bytes and a field or two) without growing.
        Ops { buf: String::with_capacity(128), start: 0, omitted: 0 }
    }

    /// Write one `{"op": name, …}` object; `fields` adds its fields. Counted instead once the record's ops
    /// reached [`MAX_OPS_BYTES`].
    pub fn op(&mut self, name: &str, fields: impl FnOnce(&mut Op<'_>)) {
        if self.buf.len() >= MAX_OPS_BYTES {
            self.omitted += 1;
            return;
        }
        self.buf.push(if self.buf.len() == self.start { '[' } else { ',' });
        self.buf.push_str("{\"op\":");
        push_json_str(&mut self.buf, name);
        fields(&mut Op { buf: &mut self.buf });
        self.buf.push('}');
    }

    pub fn is_empty(&self) -> bool {
        self.buf.len() == self.start && self.omitted == 0
    }

    /// The finished array (`[]` when no op was written).
    pub fn finish(mut self) -> String {
        self.close();
        self.buf
    }

    /// End the list: `]`, after the count of what was left out, if anything was.
    fn close(&mut self) {
        if self.omitted > 0 {
            self.buf.push(if self.buf.len() == self.start { '[' } else { ',' });
            let _ = write!(self.buf, "{{\"op\":\"omitted\",\"count\":{}}}", self.omitted);
        }
        if self.buf.len() == self.start {
            self.buf.push('[');
        }
        self.buf.push(']');
    }
}

impl Op<'_> {
    /// An etcd `key` + `range_end` pair, written canonically (`key`, or `from` + optional `to`), as
    /// [`KeyRange::from_etcd`] reads it, without making the range.
    pub fn interval(&mut self, key: &[u8], range_end: &[u8]) {
        let point_end = range_end.len() == key.len() + 1 && range_end.last() == Some(&0) && range_end.starts_with(key);
        match range_end {
            [] => self.key("key", key),
            [0] => self.key("from", key),
            _ if point_end => self.key("key", key),
            _ => match range_end.cmp(key) {
                std::cmp::Ordering::Greater => {
                    self.key("from", key);
                    self.key("to", range_end);
                }
                std::cmp::Ordering::Equal => self.key("key", key),
                // Not a valid interval (etcd answers it with an error): recorded as sent.
                std::cmp::Ordering::Less => {
                    self.key("key", key);
                    self.key("range_end", range_end);
                }
            },
        }
    }

    /// A canonical interval.
    pub fn range(&mut self, range: &KeyRange) {
        if range.is_point() {
            self.key("key", range.start());
            return;
        }
        self.key("from", range.start());
        if let End::Key(end) = range.end() {
            self.key("to", end);
        }
    }

    /// A key-valued field; a key longer than [`MAX_KEY_BYTES`] is cut there, and `<name>_len` gives its length.
    pub fn key(&mut self, name: &str, key: &[u8]) {
        self.buf.push_str(",\"");
        self.buf.push_str(name);
        self.buf.push_str("\":");
        push_json_key(self.buf, key.get(..MAX_KEY_BYTES).unwrap_or(key));
        if key.len() > MAX_KEY_BYTES {
            let _ = write!(self.buf, ",\"{name}_len\":{}", key.len());
        }
    }

    /// A number, left out when zero.
    pub fn num(&mut self, name: &str, value: i64) {
        if value != 0 {
            let _ = write!(self.buf, ",\"{name}\":{value}");
        }
    }

    /// A number written even when zero.
    pub fn num_always(&mut self, name: &str, value: i64) {
        let _ = write!(self.buf, ",\"{name}\":{value}");
    }

    /// A flag, left out when false.
    pub fn flag(&mut self, name: &str, value: bool) {
        if value {
            let _ = write!(self.buf, ",\"{name}\":true");
        }
    }

    /// A short text field.
    pub fn text(&mut self, name: &str, value: &str) {
        let _ = write!(self.buf, ",\"{name}\":");
        push_json_str(self.buf, value);
    }

    /// A nested list of ops (written in place: [`MAX_OPS_BYTES`] counts the whole record's ops).
    pub fn ops(&mut self, name: &str, fill: impl FnOnce(&mut Ops)) {
        let _ = write!(self.buf, ",\"{name}\":");
        let start = self.buf.len();
        let mut nested = Ops { buf: std::mem::take(self.buf), start, omitted: 0 };
        fill(&mut nested);
        nested.close();
        *self.buf = nested.buf;
    }

    /// A list of short texts.
    pub fn texts(&mut self, name: &str, values: &[&str]) {
        if values.is_empty() {
            return;
        }
        let _ = write!(self.buf, ",\"{name}\":");
        self.buf.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.buf.push(',');
            }
            push_json_str(self.buf, v);
        }
        self.buf.push(']');
    }
}

// === JSON text ===

/// `text` cut to at most `max` bytes (at a character boundary), ending `…` if it was cut.
fn shortened(text: &str, max: usize) -> Cow<'_, str> {
    if text.len() <= max {
        return Cow::Borrowed(text);
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// Characters a terminal does not show as themselves: control characters, spaces other than the ASCII one, and the
/// invisible ones that reorder or hide text (bidirectional overrides and isolates, zero-width characters, line and
/// paragraph separators, tags) and U+FFFD, which a lossy decoder also produces. Keys show them escaped.
pub fn is_hidden(c: char) -> bool {
    c.is_control()
        || (c.is_whitespace() && c != ' ')
        || matches!(c,
            '\u{ad}' | '\u{61c}' | '\u{180e}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}' | '\u{feff}' | '\u{fff9}'..='\u{fffd}' | '\u{e0000}'..='\u{e007f}')
}

/// `text` with control and invisible characters escaped ([`is_hidden`]), so that nothing in a record can move the
/// terminal's cursor or hide or reorder what is shown.
pub fn clean(text: &str) -> String {
    if !text.chars().any(is_hidden) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_hidden(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// A file's path for a message on a terminal: [`clean`], so that a file named to look like a verdict cannot
/// rewrite the line it is shown in.
pub fn shown(path: &std::path::Path) -> String {
    clean(&path.display().to_string())
}

/// A JSON string for a key: UTF-8 text stays text; `\` becomes `\\`; control characters and bytes that are not
/// UTF-8 become `\xNN` (then JSON-escaped, so the JSON text holds `\\xNN`). `crate::policy::unescape_key`
/// reverses the decoded string exactly.
pub fn push_json_key(out: &mut String, key: &[u8]) {
    out.push('"');
    for chunk in key.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '\\' => out.push_str("\\\\\\\\"),
                '"' => out.push_str("\\\""),
                c if is_hidden(c) => {
                    let mut buf = [0u8; 4];
                    for b in c.encode_utf8(&mut buf).bytes() {
                        let _ = write!(out, "\\\\x{b:02x}");
                    }
                }
                c => out.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(out, "\\\\x{b:02x}");
        }
    }
    out.push('"');
}

/// The key text of [`push_json_key`], without JSON quoting (for people).
pub fn key_text(key: &[u8]) -> String {
    let mut json = String::with_capacity(key.len() + 2);
    push_json_key(&mut json, key);
    serde_json::from_str::<String>(&json).unwrap_or_default()
}

/// A JSON string.
pub fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    // Runs of characters that need no escape are copied whole.
    let mut clean = 0;
    for (at, c) in s.char_indices() {
        let escape = match c {
            '"' => "\\\"",
            '\\' => "\\\\",
            '\n' => "\\n",
            '\r' => "\\r",
            '\t' => "\\t",
            c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => "",
            _ => continue,
        };
        out.push_str(&s[clean..at]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push_str(escape);
        }
        clean = at + c.len_utf8();
    }
    out.push_str(&s[clean..]);
    out.push('"');
}

fn push_json_str_list(out: &mut String, values: &[String]) {
    out.push('[');
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(out, v);
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_written_in_decimal_padded_to_their_width() {
        for (n, width, want) in [(0, 0, "0"), (42, 4, "0042"), (7, 6, "000007"), (123_456, 2, "123456")] {
            let mut out = String::from("x");
            push_padded(&mut out, n, width);
            assert_eq!(out, format!("x{want}"));
        }
        let mut out = String::new();
        push_u64(&mut out, u64::MAX);
        assert_eq!(out, u64::MAX.to_string());
    }
    use crate::policy::unescape_key;

    #[test]
    fn keys_are_lossless_and_readable() {
        for key in [
            b"plain/key".to_vec(),
            "ünïcödé/ключ".as_bytes().to_vec(),
            b"back\\slash \"quoted\"".to_vec(),
            vec![0, 1, 0x7f, 0xff, b'a', 0xc3],
            b"\\x41 looks like an escape".to_vec(),
            "rtl \u{202e}override, zero\u{200b}width \u{2029} \u{fffd} no\u{a0}break\u{3000}".as_bytes().to_vec(),
        ] {
            let mut json = String::new();
            push_json_key(&mut json, &key);
            let text: String = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(unescape_key(&text).ok(), Some(key.clone()), "{json}");
            assert!(!json.chars().any(is_hidden), "{json}");
        }
        assert_eq!(key_text("ünï".as_bytes()), "ünï");
        assert_eq!(key_text(&[b'a', 0]), "a\\x00");
    }

    #[test]
    fn long_reasons_are_cut_at_a_character() {
        assert_eq!(shortened("short", 10), "short");
        let cut = shortened("ääääää", 7);
        assert_eq!(cut, "ää…");
        assert!(cut.len() <= 7);
        assert!(shortened(&"x".repeat(1 << 20), MAX_REASON_BYTES).len() <= MAX_REASON_BYTES);
    }

    #[test]
    fn intervals_are_written_as_key_range_reads_them() {
        let keys: [&[u8]; 7] = [b"", b"\0", b"a", b"a\0", b"b", b"a\0\0", b"a\xff"];
        for key in keys {
            for range_end in keys {
                let mut fast = String::new();
                Op { buf: &mut fast }.interval(key, range_end);
                let mut reference = String::new();
                let mut o = Op { buf: &mut reference };
                match KeyRange::from_etcd(key, range_end) {
                    Ok(range) => o.range(&range),
                    Err(_) => {
                        o.key("key", key);
                        o.key("range_end", range_end);
                    }
                }
                assert_eq!(fast, reference, "{key:?} {range_end:?}");
            }
        }
    }

    #[test]
    fn ops_render_canonical_intervals() {
        let mut ops = Ops::new();
        ops.op("range", |o| {
            o.interval(b"a", b"");
            o.num("limit", 0);
        });
        ops.op("range", |o| {
            o.interval(b"a", b"b");
            o.num("limit", 500);
            o.flag("count_only", true);
        });
        ops.op("range", |o| o.interval(b"a", b"\0"));
        ops.op("range", |o| o.interval(b"\0", b"\0"));
        ops.op("range", |o| o.interval(b"a", b"a\0"));
        let json = ops.finish();
        assert_eq!(
            json,
            r#"[{"op":"range","key":"a"},{"op":"range","from":"a","to":"b","limit":500,"count_only":true},{"op":"range","from":"a"},{"op":"range","from":"\\x00"},{"op":"range","key":"a"}]"#
        );
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_ok());
    }

    #[test]
    fn record_body_is_json_in_documented_order() {
        let identity = Identity {
            common_name: Some("cilium \"agent\"".into()),
            organizations: vec!["o".into()],
            organizational_units: vec![],
            dns_sans: vec![],
            uri_sans: vec!["spiffe://x/y".into()],
            serial: "01".into(),
            fingerprint_sha256: "ab".into(),
            issuers: vec![],
        };
        let subject = Arc::new(Subject::new(7, SocketAddr::from(([127, 0, 0, 1], 5)), &identity, &["cilium".into()]));
        let r = Record {
            subject,
            time: SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456),
            rpc: "KV/Range",
            event: Event::Call,
            stream: None,
            ops: r#"[{"op":"range","key":"a"}]"#.into(),
            decision: Decision::Allow,
            reason: "role cilium".into(),
            code: Code::Ok,
            revision: Some(9),
            latency_us: 12,
        };
        let mut out = String::new();
        r.write_body(3, super::super::chain::GENESIS, &mut out);
        out.push('}');
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456Z");
        assert_eq!(v["identity"]["common_name"], "cilium \"agent\"");
        assert_eq!(v["identity"]["uri_sans"][0], "spiffe://x/y");
        assert_eq!(v["roles"][0], "cilium");
        assert_eq!(v["ops"][0]["key"], "a");
        assert_eq!(v["code"], "OK");
        assert_eq!(v["revision"], 9);
        let text = &out;
        let order = ["\"seq\"", "\"time\"", "\"conn\"", "\"peer\"", "\"identity\"", "\"roles\"", "\"rpc\"", "\"ops\""];
        let positions: Vec<usize> = order.iter().filter_map(|k| text.find(k)).collect();
        assert_eq!(positions.len(), order.len());
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
        assert!(text.ends_with(&format!("\"prev_hash\":\"{}\"}}", super::super::chain::GENESIS)));
    }

    /// The line as `format!` wrote it before the body was written piece by piece: the bytes must not change
    /// (they are hashed, and readers parse them).
    fn reference_body(r: &Record, (conn, peer): (u64, SocketAddr), seq: u64, prev_hash: &str) -> String {
        let since = r.time.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        let dt = time::OffsetDateTime::UNIX_EPOCH + since;
        let mut s = format!(
            "{{\"seq\":{seq},\"time\":\"{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z\",\"conn\":{},\"peer\":\"{}\",",
            dt.year(),
            u8::from(dt.month()),
            dt.day(),
            dt.hour(),
            dt.minute(),
            dt.second(),
            dt.microsecond(),
            conn,
            peer
        );
        // The subject's identity and roles (its JSON now starts with the connection and peer written above).
        let identity = r.subject.json.find("\"identity\"").map_or("", |at| &r.subject.json[at..]);
        s.push_str(identity);
        s.push_str(",\"rpc\":");
        push_json_str_reference(&mut s, r.rpc);
        s.push_str(&format!(",\"event\":\"{}\"", r.event.as_str()));
        if let Some(stream) = r.stream {
            s.push_str(&format!(",\"stream\":{stream}"));
        }
        s.push_str(",\"ops\":");
        s.push_str(if r.ops.is_empty() { "[]" } else { &r.ops });
        s.push_str(&format!(",\"decision\":\"{}\",\"reason\":", r.decision.as_str()));
        push_json_str_reference(&mut s, &r.reason);
        s.push_str(&format!(",\"code\":\"{}\"", code_name(r.code)));
        if let Some(rev) = r.revision {
            s.push_str(&format!(",\"revision\":{rev}"));
        }
        s.push_str(&format!(",\"latency_us\":{},\"prev_hash\":\"{prev_hash}\"", r.latency_us));
        s
    }

    /// JSON string escaping one character at a time, as before.
    fn push_json_str_reference(out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' || c == '\u{2028}' || c == '\u{2029}' => {
                    out.push_str(&format!("\\u{:04x}", c as u32));
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    #[test]
    fn record_body_bytes_are_those_of_the_format_before() {
        let identity = Identity {
            common_name: None,
            organizations: vec![],
            organizational_units: vec!["ou \u{2028} x".into()],
            dns_sans: vec!["a.example".into()],
            uri_sans: vec![],
            serial: "02".into(),
            fingerprint_sha256: "cd".into(),
            issuers: vec![],
        };
        let v6 = SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 40000));
        let proxy = (0, SocketAddr::from(([0, 0, 0, 0], 0)));
        let subjects = [
            (Arc::new(Subject::new(u64::MAX, v6, &identity, &[])), (u64::MAX, v6)),
            (Arc::new(Subject::proxy()), proxy),
        ];
        let times = [
            SystemTime::UNIX_EPOCH,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1),
            SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_764_547_199_999_999),
        ];
        for (i, ((subject, at), time)) in subjects.iter().flat_map(|s| times.iter().map(move |t| (s, t))).enumerate() {
            let r = Record {
                subject: subject.clone(),
                time: *time,
                rpc: "Watch/Watch",
                event: if i % 2 == 0 { Event::Message } else { Event::End },
                stream: (i % 2 == 0).then_some(i as u64 * 1_000_003),
                ops: if i % 3 == 0 { String::new() } else { r#"[{"op":"put","key":"k"}]"#.into() },
                decision: [Decision::Allow, Decision::Deny, Decision::WouldDeny][i % 3],
                reason: "quote \" backslash \\ tab \t nul \u{0} del \u{7f} ünï \u{2029} end".into(),
                code: [Code::Ok, Code::PermissionDenied, Code::Unavailable][i % 3],
                revision: [None, Some(-5), Some(i64::MAX)][i % 3],
                latency_us: [0, 9, u64::MAX][i % 3],
            };
            for seq in [0, 1, 10, 123_456_789, u64::MAX] {
                let mut out = String::from("earlier line\n");
                r.write_body(seq, "prev", &mut out);
                assert_eq!(out.strip_prefix("earlier line\n"), Some(reference_body(&r, *at, seq, "prev").as_str()));
            }
        }
    }
}
