//! Byte-exact etcd key ranges and sets of them.
//!
//! etcd keys are arbitrary byte strings ordered bytewise (lexicographically);
//! the empty key is the smallest key. Nothing here treats keys as text.
//!
//! * [`KeyRange`] is one non-empty half-open interval `[start, end)`.
//! * [`RangeSet`] is a union of intervals kept sorted and merged, so that the
//!   question "is this request range entirely granted?" is one binary search.
//! * [`escape_key`] / [`unescape_key`] print keys readably and losslessly.

use std::cmp::Ordering;
use std::fmt::{self, Write as _};

use thiserror::Error;

/// Why a key range or an escaped key could not be built.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RangeError {
    /// The end of the range lies before its start.
    #[error("range end is before its start")]
    Inverted,
    /// The end of the range equals its start, so the range holds no key.
    #[error("range is empty (its end equals its start)")]
    Empty,
    /// An escaped key has a backslash that is not `\\` or `\xNN`.
    #[error("invalid escape at byte {position}: expected \\\\ or \\xNN")]
    BadEscape {
        /// Byte offset of the offending backslash in the escaped text.
        position: usize,
    },
}

/// The exclusive upper bound of a [`KeyRange`].
///
/// Ordered so that every key bound is below [`End::Unbounded`], and key bounds
/// compare bytewise.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum End {
    /// The range stops just before this key.
    Key(Vec<u8>),
    /// The range extends past every key.
    Unbounded,
}

/// A non-empty half-open interval of keys `[start, end)`.
///
/// Invariant: `start < end`, so every `KeyRange` holds at least the key `start`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyRange {
    start: Vec<u8>,
    end: End,
}

/// A union of key ranges, stored as sorted, disjoint and non-adjacent intervals.
///
/// Because touching intervals are merged, a range is covered by the union iff it
/// is covered by a single stored interval, which [`RangeSet::covers`] finds with
/// one binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RangeSet {
    ranges: Vec<KeyRange>,
}

/// Escapes a key for display: printable ASCII stays as it is, except that a
/// backslash becomes `\\`; every other byte (controls, DEL, and all bytes
/// `>= 0x80`, so also non-ASCII UTF-8) becomes `\xNN` with lowercase hex.
///
/// The output is plain ASCII without control characters, so it is safe to
/// write to logs and terminals, and [`unescape_key`] reverses it exactly.
pub fn escape_key(key: &[u8]) -> String {
    let mut out = String::with_capacity(key.len());
    // Writing to a String cannot fail.
    let _ = escape_into(&mut out, key, false);
    out
}

/// A key in quotes for messages: escaped as [`escape_key`] escapes it, and a `"` as `\x22`, so the quotes are
/// the key's own ends (and [`unescape_key`] still reads it back).
pub(crate) fn quoted_key(key: &[u8]) -> String {
    format!("\"{}\"", escape_key(key).replace('"', "\\x22"))
}

/// Reverses [`escape_key`]: `\\` becomes one backslash and `\xNN` (two hex
/// digits, either case) becomes the byte `0xNN`; every other character stands
/// for its own UTF-8 bytes.
///
/// # Errors
///
/// [`RangeError::BadEscape`] for a backslash followed by anything else.
pub fn unescape_key(text: &str) -> Result<Vec<u8>, RangeError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'\\' {
            out.push(b);
            i += 1;
            continue;
        }
        match bytes.get(i + 1) {
            Some(b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hi = bytes.get(i + 2).copied().and_then(hex_value);
                let lo = bytes.get(i + 3).copied().and_then(hex_value);
                match (hi, lo) {
                    (Some(hi), Some(lo)) => out.push((hi << 4) | lo),
                    _ => return Err(RangeError::BadEscape { position: i }),
                }
                i += 4;
            }
            _ => return Err(RangeError::BadEscape { position: i }),
        }
    }
    Ok(out)
}

/// Returns the first key after every key that starts with `prefix`, as etcd's
/// `GetPrefixRangeEnd` does: strip trailing `0xff` bytes, then increment the
/// last byte. An empty or all-`0xff` prefix has no such key.
pub fn prefix_end(prefix: &[u8]) -> End {
    match prefix.iter().rposition(|&b| b != 0xff) {
        Some(last) => {
            let mut end = prefix[..=last].to_vec();
            end[last] += 1;
            End::Key(end)
        }
        None => End::Unbounded,
    }
}

// === impl End ===

impl End {
    /// Whether `key` lies below this bound (`key < end`).
    pub fn is_above(&self, key: &[u8]) -> bool {
        match self {
            End::Key(end) => key < end.as_slice(),
            End::Unbounded => true,
        }
    }

    /// The key bound, or `None` when unbounded.
    pub fn key(&self) -> Option<&[u8]> {
        match self {
            End::Key(end) => Some(end),
            End::Unbounded => None,
        }
    }

    /// Compares this bound with the bound "just before `key`" (`End::Key(key)`)
    /// without allocating.
    fn cmp_key(&self, key: &[u8]) -> Ordering {
        match self {
            End::Key(end) => end.as_slice().cmp(key),
            End::Unbounded => Ordering::Greater,
        }
    }
}

// === impl KeyRange ===

impl KeyRange {
    /// The single key `key`: `[key, key + "\x00")`.
    pub fn point(key: impl Into<Vec<u8>>) -> KeyRange {
        let start = key.into();
        let mut end = Vec::with_capacity(start.len() + 1);
        end.extend_from_slice(&start);
        end.push(0);
        KeyRange { start, end: End::Key(end) }
    }

    /// Every key that starts with `prefix`: `[prefix, prefix_end(prefix))`.
    ///
    /// The empty prefix is the whole keyspace. Byte-exact: the prefix
    /// `"cilium/"` holds neither `"cilium"` nor `"cilium0"`.
    pub fn prefix(prefix: impl Into<Vec<u8>>) -> KeyRange {
        let start = prefix.into();
        let end = prefix_end(&start);
        KeyRange { start, end }
    }

    /// The whole keyspace, `["", +inf)`.
    pub fn all() -> KeyRange {
        KeyRange { start: Vec::new(), end: End::Unbounded }
    }

    /// The interval `[from, to)`.
    ///
    /// # Errors
    ///
    /// [`RangeError::Empty`] when `to == from`, [`RangeError::Inverted`] when
    /// `to < from`.
    pub fn new(from: impl Into<Vec<u8>>, to: End) -> Result<KeyRange, RangeError> {
        let start = from.into();
        match to.cmp_key(&start) {
            Ordering::Greater => Ok(KeyRange { start, end: to }),
            Ordering::Equal => Err(RangeError::Empty),
            Ordering::Less => Err(RangeError::Inverted),
        }
    }

    /// The keys an etcd request with these `key` and `range_end` fields means:
    ///
    /// * `range_end` empty: the single key `key`;
    /// * `range_end == "\x00"`: every key `>= key`;
    /// * `range_end > key`: `[key, range_end)`;
    /// * `range_end == key`: treated as the single key `key`. etcd reads this as
    ///   an empty range; being asked about one more key is stricter, never laxer;
    /// * `range_end < key`: an error, as etcd rejects inverted ranges too.
    ///
    /// # Errors
    ///
    /// [`RangeError::Inverted`] when `range_end` is non-empty, not `"\x00"` and
    /// below `key`.
    pub fn from_etcd(key: &[u8], range_end: &[u8]) -> Result<KeyRange, RangeError> {
        match range_end {
            [] => Ok(KeyRange::point(key)),
            [0] => Ok(KeyRange { start: key.to_vec(), end: End::Unbounded }),
            _ => match range_end.cmp(key) {
                Ordering::Greater => Ok(KeyRange { start: key.to_vec(), end: End::Key(range_end.to_vec()) }),
                Ordering::Equal => Ok(KeyRange::point(key)),
                Ordering::Less => Err(RangeError::Inverted),
            },
        }
    }

    /// The first key of the range (inclusive).
    pub fn start(&self) -> &[u8] {
        &self.start
    }

    /// The exclusive upper bound of the range.
    pub fn end(&self) -> &End {
        &self.end
    }

    /// Whether the range holds exactly one key.
    pub fn is_point(&self) -> bool {
        match &self.end {
            End::Key(end) => {
                end.len() == self.start.len() + 1 && end.last() == Some(&0) && end.starts_with(&self.start)
            }
            End::Unbounded => false,
        }
    }

    /// Whether `key` lies in the range.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.start.as_slice() <= key && self.end.is_above(key)
    }

    /// Whether every key of `other` lies in `self`.
    pub fn contains_range(&self, other: &KeyRange) -> bool {
        self.start <= other.start && self.end >= other.end
    }

    /// Whether `self` and `other` share at least one key.
    pub fn intersects(&self, other: &KeyRange) -> bool {
        self.end.is_above(&other.start) && other.end.is_above(&self.start)
    }
}

impl fmt::Display for KeyRange {
    /// A point prints as its escaped key; any other range as `[start, end)`
    /// with `+inf` for an unbounded end.
    ///
    /// To keep the output unambiguous, a point whose key starts with `[` writes
    /// it `\x5b` (only ranges start with `[`), and inside `[start, end)` a `,`
    /// is written `\x2c` and an end key that is literally `+inf` is written
    /// `\x2binf`. Every form still reads back with [`unescape_key`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_point() {
            return match self.start.split_first() {
                Some((b'[', rest)) => {
                    f.write_str("\\x5b")?;
                    escape_into(f, rest, false)
                }
                _ => escape_into(f, &self.start, false),
            };
        }
        f.write_char('[')?;
        escape_into(f, &self.start, true)?;
        f.write_str(", ")?;
        match &self.end {
            End::Key(end) if end.as_slice() == b"+inf" => f.write_str("\\x2binf")?,
            End::Key(end) => escape_into(f, end, true)?,
            End::Unbounded => f.write_str("+inf")?,
        }
        f.write_char(')')
    }
}

// === impl RangeSet ===

impl RangeSet {
    /// The empty set.
    pub fn new() -> RangeSet {
        RangeSet { ranges: Vec::new() }
    }

    /// The union of `ranges`, in O(n log n) (sort, then one merging pass).
    pub fn from_ranges(ranges: impl IntoIterator<Item = KeyRange>) -> RangeSet {
        let mut ranges: Vec<KeyRange> = ranges.into_iter().collect();
        ranges.sort_unstable_by(|a, b| a.start.cmp(&b.start));
        RangeSet { ranges: merge_sorted(ranges) }
    }

    /// Adds `range` to the set, merging it with the intervals it overlaps or
    /// touches. O(log n) to find the place plus O(n) to shift the vector.
    pub fn insert(&mut self, range: KeyRange) {
        // First interval that ends at or after `range.start` (could merge).
        let lo = self.ranges.partition_point(|r| r.end.cmp_key(&range.start) == Ordering::Less);
        // First interval that starts after `range.end` (cannot merge).
        let hi = self.ranges.partition_point(|r| range.end.cmp_key(&r.start) != Ordering::Less);
        let mut merged = range;
        if lo < hi {
            if self.ranges[lo].start < merged.start {
                merged.start = std::mem::take(&mut self.ranges[lo].start);
            }
            let last = &mut self.ranges[hi - 1];
            if last.end > merged.end {
                merged.end = std::mem::replace(&mut last.end, End::Unbounded);
            }
        }
        self.ranges.splice(lo..hi, std::iter::once(merged));
    }

    /// The union of two sets, in O(n + m).
    pub fn union(&self, other: &RangeSet) -> RangeSet {
        let mut all = Vec::with_capacity(self.ranges.len() + other.ranges.len());
        let (mut a, mut b) = (self.ranges.iter().peekable(), other.ranges.iter().peekable());
        loop {
            let next = match (a.peek(), b.peek()) {
                (Some(x), Some(y)) if x.start <= y.start => a.next(),
                (Some(_), Some(_)) => b.next(),
                (Some(_), None) => a.next(),
                (None, Some(_)) => b.next(),
                (None, None) => break,
            };
            if let Some(range) = next {
                all.push(range.clone());
            }
        }
        RangeSet { ranges: merge_sorted(all) }
    }

    /// The keys of `self` that are not in `other`, in O(n + m).
    pub fn subtract(&self, other: &RangeSet) -> RangeSet {
        let cut = &other.ranges;
        let mut out = Vec::with_capacity(self.ranges.len());
        let mut j = 0;
        for range in &self.ranges {
            // Skip cuts that end at or before this range starts.
            while j < cut.len() && cut[j].end.cmp_key(&range.start) != Ordering::Greater {
                j += 1;
            }
            let mut start = range.start.clone();
            let mut rest = true;
            while j < cut.len() && range.end.is_above(&cut[j].start) {
                let c = &cut[j];
                if c.start > start {
                    out.push(KeyRange { start, end: End::Key(c.start.clone()) });
                }
                match &c.end {
                    End::Key(c_end) if range.end.is_above(c_end) => {
                        start = c_end.clone();
                        j += 1;
                    }
                    // This cut reaches past the range; it may cut the next one too.
                    _ => {
                        rest = false;
                        start = Vec::new();
                        break;
                    }
                }
            }
            if rest {
                out.push(KeyRange { start, end: range.end.clone() });
            }
        }
        RangeSet { ranges: out }
    }

    /// Whether the set holds no key.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Number of stored (merged) intervals.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Whether every key of `range` is in the set. O(log n), no allocation.
    pub fn covers(&self, range: &KeyRange) -> bool {
        self.containing(&range.start).is_some_and(|r| r.end >= range.end)
    }

    /// Whether `key` is in the set. O(log n), no allocation.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.containing(key).is_some()
    }

    /// The smallest key of `range` that is not in the set, or `None` when the
    /// set covers `range`.
    pub fn first_uncovered(&self, range: &KeyRange) -> Option<Vec<u8>> {
        match self.containing(&range.start) {
            None => Some(range.start.clone()),
            Some(r) if r.end >= range.end => None,
            // Intervals are merged, so the end of the one holding `start` is
            // itself uncovered; it is a key because it is below `range.end`.
            Some(r) => r.end.key().map(<[u8]>::to_vec),
        }
    }

    /// Whether the set and `range` share at least one key. O(log n).
    pub fn intersects(&self, range: &KeyRange) -> bool {
        let i = self.ranges.partition_point(|r| r.end.cmp_key(&range.start) != Ordering::Greater);
        self.ranges.get(i).is_some_and(|r| range.end.is_above(&r.start))
    }

    /// The stored intervals, ascending.
    pub fn ranges(&self) -> impl ExactSizeIterator<Item = &KeyRange> + '_ {
        self.ranges.iter()
    }

    /// The stored interval holding `key`, if any.
    fn containing(&self, key: &[u8]) -> Option<&KeyRange> {
        let i = self.ranges.partition_point(|r| r.start.as_slice() <= key);
        let r = self.ranges.get(i.checked_sub(1)?)?;
        r.end.is_above(key).then_some(r)
    }
}

impl FromIterator<KeyRange> for RangeSet {
    fn from_iter<I: IntoIterator<Item = KeyRange>>(iter: I) -> RangeSet {
        RangeSet::from_ranges(iter)
    }
}

impl fmt::Display for RangeSet {
    /// The intervals separated by ` | `; the empty set prints as `{}`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.ranges.is_empty() {
            return f.write_str("{}");
        }
        for (i, r) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(" | ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

// === helpers ===

/// Merges intervals sorted by start into disjoint, non-adjacent ones.
fn merge_sorted(sorted: Vec<KeyRange>) -> Vec<KeyRange> {
    let mut out: Vec<KeyRange> = Vec::with_capacity(sorted.len());
    for range in sorted {
        if let Some(last) = out.last_mut()
            && last.end.cmp_key(&range.start) != Ordering::Less
        {
            if range.end > last.end {
                last.end = range.end;
            }
            continue;
        }
        out.push(range);
    }
    out
}

/// Appends the escaped form of `key` to `out`; with `in_range`, also escapes
/// `,` so that a `[start, end)` rendering stays unambiguous.
fn escape_into<W: fmt::Write>(out: &mut W, key: &[u8], in_range: bool) -> fmt::Result {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    // Runs of bytes that stand for themselves are written whole.
    let mut clean = 0;
    for (at, &b) in key.iter().enumerate() {
        let stands_for_itself = matches!(b, 0x20..=0x7e) && b != b'\\' && !(in_range && b == b',');
        if stands_for_itself {
            continue;
        }
        // Printable ASCII, hence UTF-8.
        out.write_str(std::str::from_utf8(key.get(clean..at).unwrap_or_default()).unwrap_or_default())?;
        clean = at + 1;
        match b {
            b'\\' => out.write_str("\\\\")?,
            _ => {
                out.write_str("\\x")?;
                out.write_char(char::from(HEX[usize::from(b >> 4)]))?;
                out.write_char(char::from(HEX[usize::from(b & 0xf)]))?;
            }
        }
    }
    out.write_str(std::str::from_utf8(key.get(clean..).unwrap_or_default()).unwrap_or_default())
}

/// The value of one ASCII hex digit.
fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn k(s: &[u8]) -> Vec<u8> {
        s.to_vec()
    }

    fn range(from: &[u8], to: &[u8]) -> KeyRange {
        KeyRange::new(from, End::Key(to.to_vec())).expect("valid test range")
    }

    // --- named edge cases ---

    #[test]
    fn prefix_with_separator_is_byte_exact() {
        let set = RangeSet::from_ranges([KeyRange::prefix("cilium/")]);
        assert!(set.covers(&KeyRange::point("cilium/")));
        assert!(set.covers(&KeyRange::point("cilium/x/y")));
        assert!(!set.covers(&KeyRange::point("cilium")));
        assert!(!set.covers(&KeyRange::point("cilium0")));
        assert!(!set.covers(&range(b"cilium/", b"cilium0\x00")));
        assert!(set.covers(&range(b"cilium/", b"cilium0")));
        assert_eq!(set.first_uncovered(&range(b"cilium/", b"cilium0\x00")), Some(k(b"cilium0")));
        assert_eq!(KeyRange::prefix("cilium/").end(), &End::Key(k(b"cilium0")));
    }

    #[test]
    fn prefix_without_separator_over_grants() {
        // The engine is byte-exact: this is why users must write "/registry/pods/".
        let pods = KeyRange::prefix("/registry/pods");
        assert!(pods.contains_key(b"/registry/podsecuritypolicies/x"));
        assert!(!KeyRange::prefix("/registry/pods/").contains_key(b"/registry/podsecuritypolicies/x"));
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"a\xff"), End::Key(k(b"b")));
        assert_eq!(prefix_end(b"a\xfe"), End::Key(k(b"a\xff")));
        assert_eq!(prefix_end(b"\xff\xff"), End::Unbounded);
        assert_eq!(prefix_end(b""), End::Unbounded);
        assert_eq!(prefix_end(b"\x00"), End::Key(k(b"\x01")));
    }

    #[test]
    fn empty_prefix_is_everything() {
        let all = KeyRange::prefix("");
        assert_eq!(all, KeyRange::all());
        let set = RangeSet::from_ranges([all]);
        assert!(set.covers(&KeyRange::point("")));
        assert!(set.covers(&KeyRange::from_etcd(b"", b"\x00").expect("valid")));
        assert!(set.covers(&KeyRange::point(b"\xff\xff\xff".to_vec())));
    }

    #[test]
    fn from_etcd_cases() {
        assert_eq!(KeyRange::from_etcd(b"foo", b"").expect("point"), KeyRange::point("foo"));
        assert_eq!(KeyRange::from_etcd(b"foo", b"foo").expect("same as point"), KeyRange::point("foo"));
        assert_eq!(KeyRange::from_etcd(b"foo", b"fop").expect("range"), range(b"foo", b"fop"));
        assert_eq!(KeyRange::from_etcd(b"foo", b"fon"), Err(RangeError::Inverted));
        let from_zero = KeyRange::from_etcd(b"\x00", b"\x00").expect("all but empty key");
        assert_eq!(from_zero.end(), &End::Unbounded);
        assert!(!from_zero.contains_key(b""));
        assert!(from_zero.contains_key(b"\x00"));
        assert!(from_zero.contains_key(b"\xff"));
        // An empty range_end with the empty key is the single empty key.
        assert!(KeyRange::from_etcd(b"", b"").expect("point").is_point());
    }

    #[test]
    fn new_rejects_empty_and_inverted() {
        assert_eq!(KeyRange::new("b", End::Key(k(b"b"))), Err(RangeError::Empty));
        assert_eq!(KeyRange::new("b", End::Key(k(b"a"))), Err(RangeError::Inverted));
        assert_eq!(KeyRange::new("", End::Key(k(b""))), Err(RangeError::Empty));
        assert!(KeyRange::new("b", End::Unbounded).is_ok());
    }

    #[test]
    fn end_order() {
        assert!(End::Unbounded > End::Key(k(b"\xff\xff\xff")));
        assert!(End::Key(k(b"a")) < End::Key(k(b"a\x00")));
        assert!(End::Key(k(b"")) < End::Key(k(b"\x00")));
    }

    #[test]
    fn is_point() {
        assert!(KeyRange::point("a").is_point());
        assert!(KeyRange::point("").is_point());
        assert!(!range(b"a", b"b").is_point());
        assert!(!KeyRange::prefix("a").is_point());
        assert!(KeyRange::from_etcd(b"a", b"a\x00").expect("point").is_point());
    }

    #[test]
    fn display() {
        assert_eq!(KeyRange::point("a\\b\x00\x7f").to_string(), "a\\\\b\\x00\\x7f");
        assert_eq!(KeyRange::prefix("cilium/").to_string(), "[cilium/, cilium0)");
        assert_eq!(KeyRange::prefix(b"\xff".to_vec()).to_string(), "[\\xff, +inf)");
        assert_eq!(KeyRange::all().to_string(), "[, +inf)");
        assert_eq!(range(b"a,b", b"c").to_string(), "[a\\x2cb, c)");
        assert_eq!(range(b"+", b"+inf").to_string(), "[+, \\x2binf)");
        assert_eq!(escape_key("ü".as_bytes()), "\\xc3\\xbc");
    }

    #[test]
    fn unescape_errors_and_cases() {
        assert_eq!(unescape_key("a\\x4A\\\\"), Ok(k(b"aJ\\")));
        assert_eq!(unescape_key("ü"), Ok("ü".as_bytes().to_vec()));
        assert_eq!(unescape_key("ab\\"), Err(RangeError::BadEscape { position: 2 }));
        assert_eq!(unescape_key("\\n"), Err(RangeError::BadEscape { position: 0 }));
        assert_eq!(unescape_key("\\x4"), Err(RangeError::BadEscape { position: 0 }));
        assert_eq!(unescape_key("\\xg0"), Err(RangeError::BadEscape { position: 0 }));
    }

    #[test]
    fn union_of_grants_covers_what_no_single_grant_does() {
        let set = RangeSet::from_ranges([range(b"a", b"c"), range(b"c", b"e")]);
        assert_eq!(set.len(), 1);
        assert!(set.covers(&range(b"b", b"d")));
        let gap = RangeSet::from_ranges([range(b"a", b"c"), range(b"c\x00", b"e")]);
        assert_eq!(gap.first_uncovered(&range(b"b", b"d")), Some(k(b"c")));
    }

    #[test]
    fn subtract_examples() {
        let all = RangeSet::from_ranges([KeyRange::prefix("/registry/")]);
        let secrets = RangeSet::from_ranges([KeyRange::prefix("/registry/secrets/")]);
        let rest = all.subtract(&secrets);
        assert!(rest.covers(&KeyRange::point("/registry/pods/x")));
        assert!(rest.covers(&KeyRange::point("/registry/secrets")));
        assert!(!rest.covers(&KeyRange::point("/registry/secrets/x")));
        assert!(rest.covers(&KeyRange::point("/registry/secrets0")));
        assert_eq!(rest.len(), 2);
        assert!(all.subtract(&all).is_empty());
        let everything = RangeSet::from_ranges([KeyRange::all()]);
        assert!(all.subtract(&everything).is_empty());
    }

    // --- property tests against a brute-force model ---

    const ALPHABET: [u8; 5] = [0x00, 0x01, b'a', 0xfe, 0xff];

    fn arb_key() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(ALPHABET.to_vec()), 0..4)
    }

    fn arb_end() -> impl Strategy<Value = End> {
        prop_oneof![
            4 => arb_key().prop_map(End::Key),
            1 => Just(End::Unbounded),
        ]
    }

    fn arb_range() -> impl Strategy<Value = KeyRange> {
        prop_oneof![
            (arb_key(), arb_end()).prop_map(|(a, e)| {
                // Turn an empty or inverted pick into a point, so every pick is valid.
                KeyRange::new(a.clone(), e).unwrap_or_else(|_| KeyRange::point(a))
            }),
            arb_key().prop_map(KeyRange::point),
            arb_key().prop_map(KeyRange::prefix),
        ]
    }

    /// Ranges over bytes that appear in the display syntax itself.
    fn arb_tricky_range() -> impl Strategy<Value = KeyRange> {
        let key = || proptest::collection::vec(proptest::sample::select(b",[)+inf \\x".to_vec()), 0..6);
        prop_oneof![
            (key(), key())
                .prop_map(|(a, b)| { KeyRange::new(a.clone(), End::Key(b)).unwrap_or_else(|_| KeyRange::point(a)) }),
            key().prop_map(|a| KeyRange::new(a, End::Unbounded).unwrap_or_else(|_| KeyRange::all())),
            key().prop_map(KeyRange::point),
        ]
    }

    fn arb_ranges() -> impl Strategy<Value = Vec<KeyRange>> {
        proptest::collection::vec(arb_range(), 0..6)
    }

    /// Every key over the alphabet of length <= 5.
    fn all_keys() -> Vec<Vec<u8>> {
        let mut keys = vec![Vec::new()];
        let mut layer = vec![Vec::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for key in &layer {
                for &b in &ALPHABET {
                    let mut longer = key.clone();
                    longer.push(b);
                    next.push(longer);
                }
            }
            keys.extend(next.iter().cloned());
            layer = next;
        }
        keys
    }

    /// Membership in a plain list of intervals (no merging logic).
    fn model_member(ranges: &[KeyRange], key: &[u8]) -> bool {
        ranges.iter().any(|r| r.contains_key(key))
    }

    /// Every key bound appearing in the inputs, plus the smallest key "".
    ///
    /// Membership in a union of half-open intervals is constant between two
    /// consecutive bounds and equal to the membership of the left one, so
    /// comparing two such unions at all their bounds is an exact comparison.
    fn boundaries<'a>(groups: impl IntoIterator<Item = &'a [KeyRange]>) -> Vec<Vec<u8>> {
        let mut points = vec![Vec::new()];
        for group in groups {
            for r in group {
                points.push(r.start.clone());
                if let End::Key(end) = &r.end {
                    points.push(end.clone());
                }
            }
        }
        points.sort();
        points.dedup();
        points
    }

    fn assert_canonical(set: &RangeSet) {
        for r in &set.ranges {
            assert!(r.end.cmp_key(&r.start) == Ordering::Greater, "empty interval {r}");
        }
        for w in set.ranges.windows(2) {
            assert!(
                w[0].end.cmp_key(&w[1].start) == Ordering::Less,
                "not sorted/disjoint/non-adjacent: {} then {}",
                w[0],
                w[1]
            );
        }
    }

    /// Exact model of coverage: every bound inside the request is in some grant.
    fn model_covers(grants: &[KeyRange], request: &KeyRange) -> bool {
        boundaries([grants, std::slice::from_ref(request)])
            .iter()
            .filter(|p| request.contains_key(p))
            .all(|p| model_member(grants, p))
    }

    fn model_first_uncovered(grants: &[KeyRange], request: &KeyRange) -> Option<Vec<u8>> {
        boundaries([grants, std::slice::from_ref(request)])
            .into_iter()
            .filter(|p| request.contains_key(p))
            .find(|p| !model_member(grants, p))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn covers_matches_model(grants in arb_ranges(), request in arb_range()) {
            let set = RangeSet::from_ranges(grants.clone());
            assert_canonical(&set);
            prop_assert_eq!(set.covers(&request), model_covers(&grants, &request));
            prop_assert_eq!(set.first_uncovered(&request), model_first_uncovered(&grants, &request));
        }

        #[test]
        fn intersects_matches_model(grants in arb_ranges(), request in arb_range()) {
            let set = RangeSet::from_ranges(grants.clone());
            let expected = boundaries([grants.as_slice(), std::slice::from_ref(&request)])
                .iter()
                .any(|p| request.contains_key(p) && model_member(&grants, p));
            prop_assert_eq!(set.intersects(&request), expected);
        }

        #[test]
        fn from_ranges_and_insert_match_model(grants in arb_ranges()) {
            let set = RangeSet::from_ranges(grants.clone());
            let mut inserted = RangeSet::new();
            for g in &grants {
                inserted.insert(g.clone());
                assert_canonical(&inserted);
            }
            prop_assert_eq!(&inserted, &set);
            for p in boundaries([grants.as_slice(), set.ranges.as_slice()]) {
                prop_assert_eq!(model_member(&set.ranges, &p), model_member(&grants, &p));
                prop_assert_eq!(set.contains_key(&p), model_member(&grants, &p));
            }
        }

        #[test]
        fn union_matches_model(a in arb_ranges(), b in arb_ranges()) {
            let (sa, sb) = (RangeSet::from_ranges(a.clone()), RangeSet::from_ranges(b.clone()));
            let u = sa.union(&sb);
            assert_canonical(&u);
            for p in boundaries([a.as_slice(), b.as_slice(), u.ranges.as_slice()]) {
                prop_assert_eq!(
                    model_member(&u.ranges, &p),
                    model_member(&a, &p) || model_member(&b, &p),
                    "at {}", escape_key(&p)
                );
            }
            prop_assert_eq!(u, sb.union(&sa));
        }

        #[test]
        fn subtract_matches_model(a in arb_ranges(), b in arb_ranges()) {
            let (sa, sb) = (RangeSet::from_ranges(a.clone()), RangeSet::from_ranges(b.clone()));
            let d = sa.subtract(&sb);
            assert_canonical(&d);
            for p in boundaries([a.as_slice(), b.as_slice(), d.ranges.as_slice()]) {
                prop_assert_eq!(
                    model_member(&d.ranges, &p),
                    model_member(&a, &p) && !model_member(&b, &p),
                    "at {}", escape_key(&p)
                );
            }
        }

        #[test]
        fn prefix_matches_starts_with(p in arb_key()) {
            let r = KeyRange::prefix(p.clone());
            for key in all_keys() {
                prop_assert_eq!(r.contains_key(&key), key.starts_with(&p), "key {}", escape_key(&key));
            }
        }

        #[test]
        fn from_etcd_matches_model(key in arb_key(), range_end in arb_key()) {
            let got = KeyRange::from_etcd(&key, &range_end);
            if !range_end.is_empty() && range_end != [0] && range_end < key {
                prop_assert_eq!(got, Err(RangeError::Inverted));
                return Ok(());
            }
            let got = got.map_err(|e| TestCaseError::fail(e.to_string()))?;
            for k in all_keys() {
                let expected = if range_end == [0] {
                    k >= key
                } else if range_end.is_empty() || range_end == key {
                    k == key
                } else {
                    key <= k && k < range_end
                };
                prop_assert_eq!(got.contains_key(&k), expected, "key {}", escape_key(&k));
            }
        }

        #[test]
        fn escape_round_trips(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let escaped = escape_key(&bytes);
            prop_assert!(escaped.bytes().all(|b| (0x20..=0x7e).contains(&b)));
            prop_assert_eq!(unescape_key(&escaped), Ok(bytes));
        }

        #[test]
        fn range_display_is_unambiguous(a in arb_tricky_range(), b in arb_tricky_range()) {
            if a != b {
                prop_assert_ne!(a.to_string(), b.to_string());
            }
        }
    }
}
