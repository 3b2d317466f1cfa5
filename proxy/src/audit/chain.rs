//! The hash chain over audit lines.
//!
//! A line is `BODY,"hash":"<64 hex>"}` + `\n`, where `BODY` is the record's JSON up to and including its
//! `"prev_hash":"<64 hex>"` field (no closing brace). `hash` = SHA-256(BODY), or HMAC-SHA256(key, BODY) when the
//! chain is keyed. Because `prev_hash` is part of `BODY`, each hash covers every record before it.
//!
//! Hashing the exact bytes written (rather than a re-serialisation) leaves no room for two readings of one record.

use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

/// `prev_hash` of the first record ever written.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What follows `BODY` on a line: `,"hash":"` + 64 hex digits + `"}`.
pub const SUFFIX_LEN: usize = HASH_PREFIX.len() + 64 + 2;

const HASH_FIELD: &str = ",\"hash\":\"";
const HASH_PREFIX: &[u8] = HASH_FIELD.as_bytes();

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Shortest HMAC key accepted from a key file.
pub const MIN_HMAC_KEY_BYTES: usize = 16;

/// Computes line hashes, keyed or not.
#[derive(Clone)]
pub struct Hasher {
    key: Option<Hmac<Sha256>>,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read the HMAC key: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: the HMAC key is {len} bytes; at least {MIN_HMAC_KEY_BYTES} are required")]
    TooShort { path: String, len: usize },
    #[error("{second}: the same HMAC key as {first}; give each key the log was written under once, oldest first")]
    Repeated { first: String, second: String },
}

// === impl Hasher ===

impl Hasher {
    /// Plain SHA-256.
    pub fn unkeyed() -> Hasher {
        Hasher { key: None }
    }

    /// HMAC-SHA256 with `key`.
    pub fn keyed(key: &[u8]) -> Hasher {
        // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
        Hasher { key: <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok() }
    }

    /// Read a key file (surrounding whitespace, such as a final newline, is not part of the key).
    pub fn from_key_file(path: &Path) -> Result<Hasher, KeyError> {
        let raw = std::fs::read(path).map_err(|source| KeyError::Read { path: path.display().to_string(), source })?;
        let key = raw.trim_ascii();
        if key.len() < MIN_HMAC_KEY_BYTES {
            return Err(KeyError::TooShort { path: path.display().to_string(), len: key.len() });
        }
        Ok(Hasher::keyed(key))
    }

    /// The keys a chain was written under, oldest first, for `audit verify` and `review`: the key files in their
    /// order, after no key at all when the chain started unkeyed (`unkeyed_before`). Empty: unkeyed throughout. A
    /// key given twice is refused (it would read as a key change that never happened).
    pub fn chain_keys(paths: &[std::path::PathBuf], unkeyed_before: bool) -> Result<Vec<Hasher>, KeyError> {
        let keys = paths.iter().map(|p| Hasher::from_key_file(p)).collect::<Result<Vec<_>, _>>()?;
        for (i, key) in keys.iter().enumerate() {
            if let Some(j) = keys[..i].iter().position(|earlier| earlier.same_key(key)) {
                let name = |k: usize| paths.get(k).map(|p| p.display().to_string()).unwrap_or_default();
                return Err(KeyError::Repeated { first: name(j), second: name(i) });
            }
        }
        Ok(if unkeyed_before && !keys.is_empty() { [vec![Hasher::unkeyed()], keys].concat() } else { keys })
    }

    /// Whether `other` hashes as this one does (the same key, or both unkeyed).
    pub fn same_key(&self, other: &Hasher) -> bool {
        const PROBE: &[u8] = b"etcd-guard: are these the same key?";
        self.is_keyed() == other.is_keyed() && self.hash(PROBE) == other.hash(PROBE)
    }

    pub fn is_keyed(&self) -> bool {
        self.key.is_some()
    }

    /// The hash of a line's `BODY`.
    pub fn hash(&self, body: &[u8]) -> [u8; 32] {
        match &self.key {
            Some(mac) => {
                let mut mac = mac.clone();
                mac.update(body);
                mac.finalize().into_bytes().into()
            }
            None => Sha256::digest(body).into(),
        }
    }

    /// Append `,"hash":"…"}` and a newline to the line that starts at `body_start` in `text`, and put the hash
    /// (hex) into `hash`.
    pub fn seal(&self, text: &mut String, body_start: usize, hash: &mut String) {
        let digest = self.hash(text.as_bytes().get(body_start..).unwrap_or_default());
        hash.clear();
        for byte in digest {
            hash.push(char::from(HEX[usize::from(byte >> 4)]));
            hash.push(char::from(HEX[usize::from(byte & 0xf)]));
        }
        text.push_str(HASH_FIELD);
        text.push_str(hash);
        text.push_str("\"}\n");
    }
}

/// Split a line (without its newline) into `BODY` and the hex hash it claims. `None` if the line does not end in
/// a well-formed hash field.
pub fn split_line(line: &[u8]) -> Option<(&[u8], &str)> {
    let cut = line.len().checked_sub(SUFFIX_LEN)?;
    let (body, suffix) = line.split_at(cut);
    let rest = suffix.strip_prefix(HASH_PREFIX)?;
    let hex = rest.strip_suffix(b"\"}")?;
    if hex.len() != 64 || !hex.iter().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b)) {
        return None;
    }
    Some((body, std::str::from_utf8(hex).ok()?))
}

/// Whether a line's claimed hash is right.
pub fn line_is_intact(hasher: &Hasher, line: &[u8]) -> bool {
    match split_line(line) {
        Some((body, claimed)) => hex::encode(hasher.hash(body)) == claimed,
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_split_round_trips() {
        let h = Hasher::unkeyed();
        let mut line = r#"{"seq":1,"prev_hash":""#.to_string();
        line.push_str(GENESIS);
        line.push('"');
        let mut hash = String::new();
        h.seal(&mut line, 0, &mut hash);
        let line = line.into_bytes();
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        assert!(line_is_intact(&h, text));
        assert_eq!(split_line(text).map(|(_, x)| x.to_string()), Some(hash));
        // The line is valid JSON.
        let v: serde_json::Value = serde_json::from_slice(text).unwrap_or_default();
        assert_eq!(v["seq"], 1);
    }

    #[test]
    fn one_changed_byte_breaks_the_line() {
        let h = Hasher::unkeyed();
        let mut line = r#"{"seq":1,"prev_hash":"x""#.to_string();
        h.seal(&mut line, 0, &mut String::new());
        let mut line = line.into_bytes();
        line.pop();
        line[3] = b'x';
        assert!(!line_is_intact(&h, &line));
    }

    #[test]
    fn keyed_and_unkeyed_differ() {
        let body = b"{\"seq\":1";
        assert_ne!(Hasher::unkeyed().hash(body), Hasher::keyed(b"0123456789abcdef").hash(body));
        assert_ne!(Hasher::keyed(b"0123456789abcdef").hash(body), Hasher::keyed(b"0123456789abcdeF").hash(body));
    }
}
