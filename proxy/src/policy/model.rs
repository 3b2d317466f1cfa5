//! The policy file: its YAML format, parsing, and validation.
//!
//! ```yaml
//! roles:
//!   - name: monitoring
//!     keys:
//!       - { prefix: "/registry/", access: read }
//!       - { key: "compact_rev_key", access: readwrite }
//!       - { range: { from: "a", to: "b" }, access: read }
//!       - { prefix: { hex: "61ff" }, access: read }
//!     deny:
//!       - { prefix: "/registry/secrets/" }   # access defaults to readwrite
//!     cluster: [status]
//! bindings:
//!   - role: monitoring
//!     mode: enforce                          # or audit-only
//!     subjects: [ { organization: "monitoring" } ]
//! ```
//!
//! A key written as a YAML string stands for its UTF-8 bytes. YAML's `"\x00"`
//! gives the byte 0, but `"\xff"` gives the *character* U+00FF (two UTF-8
//! bytes); keys with bytes `>= 0x80` that are not UTF-8 text need `{ hex: ... }`.
//! Scalars that YAML reads as numbers, booleans or null are rejected as keys:
//! quote them.
//!
//! [`PolicyDocument::parse`] reports every problem as
//! `origin:line:column: reason`. Lines and columns come from serde-saphyr:
//! its own errors carry a location, and the semantic checks here read the
//! location of each item from [`serde_saphyr::Spanned`] wrappers.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_saphyr::{Location, MessageFormatter, Spanned};
use thiserror::Error;

use super::eval::Access;
use super::range::{End, KeyRange, RangeError, quoted_key};
use crate::identity::Identity;

/// Most YAML nodes a policy file may have (a key rule is about 5 nodes).
const MAX_NODES: usize = 20_000_000;
/// Most YAML parser events a policy file may produce.
const MAX_EVENTS: usize = 40_000_000;

/// A policy file that parsed and passed validation, not yet compiled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDocument {
    /// The roles, in file order.
    pub roles: Vec<Role>,
    /// The bindings, in file order.
    pub bindings: Vec<Binding>,
}

/// A named set of key grants, key denials and cluster capabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The role's unique name.
    pub name: String,
    /// Key grants (`keys:`).
    pub keys: Vec<KeyRule>,
    /// Key denials (`deny:`), subtracted from this role's own grants only.
    pub deny: Vec<KeyRule>,
    /// Cluster capabilities (`cluster:`).
    pub cluster: CapabilitySet,
    /// What an identity bound to this role may use at once (`limits:`).
    pub limits: Limits,
    /// Line of the role in the file (0 if unknown).
    pub line: u64,
}

/// Limits on what one identity (one client certificate) may use at once, so that an auxiliary component cannot
/// starve the API servers. Unset fields are unlimited. On a binding they replace the role's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Unary calls in flight.
    pub concurrent_requests: Option<u32>,
    /// Calls and stream messages per second (a token bucket).
    pub requests_per_second: Option<u32>,
    /// Calls allowed in a burst above the rate (default: one second's worth).
    pub burst: Option<u32>,
    /// Watches open at once, over all the identity's streams.
    pub open_watches: Option<u32>,
}

/// One entry of a role's `keys` or `deny` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRule {
    /// How the entry was written.
    pub kind: KeyRuleKind,
    /// The keys it names.
    pub range: KeyRange,
    /// Which access it grants (or, in `deny`, removes).
    pub access: KeyAccess,
    /// Line of the entry in the file (0 if unknown).
    pub line: u64,
}

/// How a [`KeyRule`] names its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRuleKind {
    /// `prefix: p` — every key starting with `p`.
    Prefix,
    /// `key: k` — the single key `k`.
    Key,
    /// `range: { from, to }` — the half-open interval `[from, to)`.
    Range,
}

/// The access named by a key rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyAccess {
    /// Reads only (range, watch).
    Read,
    /// Writes only (put, delete).
    Write,
    /// Both.
    ReadWrite,
}

/// A cluster-level capability (non-key etcd APIs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Capability {
    /// Endpoint status.
    Status,
    /// Lease grant, revoke, keep-alive and listing.
    Lease,
    /// Compaction.
    Compact,
    /// Defragmentation.
    Defragment,
    /// Snapshots.
    Snapshot,
    /// `Hash` and `HashKV`.
    Hash,
    /// Alarms.
    Alarm,
    /// Leadership transfer.
    MoveLeader,
    /// Cluster downgrade.
    Downgrade,
    /// Cluster membership (member list, add, remove, update, promote).
    Members,
    /// etcd's own auth API (users, roles, enable/disable).
    Auth,
}

/// A set of [`Capability`] values; `admin` in a policy file means all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct CapabilitySet {
    bits: u16,
}

/// Whether a binding's grants are enforced or only audited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BindingMode {
    /// Requests are allowed or denied by the grants (the default).
    #[default]
    Enforce,
    /// Decisions are computed and recorded but not enforced; see
    /// [`Permissions`](super::Permissions) for how modes combine.
    AuditOnly,
}

/// Gives a role to the identities any of its subject selectors matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    /// Name of the bound role.
    pub role: String,
    /// Index of the bound role in [`PolicyDocument::roles`].
    pub role_index: usize,
    /// The selectors; the binding applies if any of them matches.
    pub subjects: Vec<Selector>,
    /// Enforce or audit only.
    pub mode: BindingMode,
    /// Limits replacing the role's, if set.
    pub limits: Option<Limits>,
    /// Line of the binding in the file (0 if unknown).
    pub line: u64,
}

/// Matches identities whose certificate fields match every given pattern.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    /// Matches the certificate's common name.
    pub common_name: Option<Pattern>,
    /// Matches if any organization (O) matches.
    pub organization: Option<Pattern>,
    /// Matches if any organizational unit (OU) matches.
    pub organizational_unit: Option<Pattern>,
    /// Matches if any DNS subject alternative name matches.
    pub dns_san: Option<Pattern>,
    /// Matches if any URI subject alternative name matches.
    pub uri_san: Option<Pattern>,
    /// Matches the certificate's SHA-256 fingerprint, ignoring case and `:`.
    pub fingerprint_sha256: Option<Pattern>,
    /// Matches if the certificate chains to a CA with this name in the proxy's `tls.issuers`.
    pub issuer: Option<Pattern>,
}

/// A field of a [`Selector`], as [`Selector::anchor`] names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelectorField {
    CommonName,
    Organization,
    OrganizationalUnit,
    DnsSan,
    UriSan,
    FingerprintSha256,
    Issuer,
}

/// A case-sensitive glob where `*` matches any run of characters (also empty,
/// also `/`) and everything else matches itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    text: String,
    /// `text` split at each `*`; one part means no star.
    parts: Vec<String>,
}

/// A place in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLocation {
    /// The file name (or other origin) given to the parser.
    pub origin: String,
    /// 1-based line, 0 if unknown.
    pub line: u64,
    /// 1-based column, 0 if unknown.
    pub column: u64,
}

/// Why a policy could not be loaded.
#[derive(Debug, Error)]
pub enum PolicyError {
    /// The policy has neither roles nor bindings: it would deny every request. Refused where a policy is put in
    /// force (start, reload) or checked for that (`policy validate`, `config check`): an editor or `cat >` empties
    /// the file before writing the new one, and a policy that denies everyone on purpose says so (a role, no
    /// bindings).
    #[error(
        "{path}: the policy is empty (no roles, no bindings: every request would be denied); an empty file is taken \
         for one being written. To deny everyone, keep a role and remove the bindings"
    )]
    Empty {
        /// The file's path.
        path: String,
    },
    /// The policy file could not be read.
    #[error("{path}: cannot read policy file: {source}")]
    Io {
        /// The file's path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid YAML, or does not have the policy file's shape
    /// (unknown field, wrong type, missing field, unknown access, ...).
    #[error("{at}: {message}")]
    Syntax {
        /// Where the parser stopped.
        at: SourceLocation,
        /// The parser's reason.
        message: String,
    },
    /// The file has the right shape but says something invalid.
    #[error("{at}: {error}")]
    Invalid {
        /// The offending item.
        at: SourceLocation,
        /// What is wrong with it.
        error: Box<ValidationError>,
    },
}

/// A semantic problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ValidationError {
    /// A binding names a role that does not exist.
    #[error("bindings[{binding}] refers to unknown role {role:?}")]
    UnknownRole {
        /// Index of the binding.
        binding: usize,
        /// The role name it gave.
        role: String,
    },
    /// Two roles have the same name.
    #[error("duplicate role name {name:?} (first defined on line {first_line})")]
    DuplicateRole {
        /// The name.
        name: String,
        /// Line of the first role with this name.
        first_line: u64,
    },
    /// A role has an empty name.
    #[error("roles[{index}] has an empty name")]
    EmptyRoleName {
        /// Index of the role.
        index: usize,
    },
    /// A `cluster:` entry is not a known capability.
    #[error("role {role:?}: unknown capability {name:?} (expected one of: {expected})")]
    UnknownCapability {
        /// The role.
        role: String,
        /// The unknown name.
        name: String,
        /// The accepted names.
        expected: String,
    },
    /// A `range:` is empty or inverted.
    #[error("role {role:?} {entry}: invalid range: {error}")]
    BadRange {
        /// The role.
        role: String,
        /// The entry, e.g. `keys[2]`.
        entry: String,
        /// What is wrong.
        error: RangeError,
    },
    /// A key entry does not have exactly one of `prefix`, `key`, `range`.
    #[error("role {role:?} {entry}: a key entry needs exactly one of `prefix`, `key`, `range` (found {found})")]
    KeyEntryShape {
        /// The role.
        role: String,
        /// The entry, e.g. `keys[2]`.
        entry: String,
        /// How many of them the entry has.
        found: usize,
    },
    /// A `keys:` entry has no `access`.
    #[error("role {role:?} {entry}: missing `access` (read, write or readwrite)")]
    MissingAccess {
        /// The role.
        role: String,
        /// The entry, e.g. `keys[2]`.
        entry: String,
    },
    /// A `{ hex: ... }` key is not valid hex.
    #[error("role {role:?} {entry}: invalid hex key {value:?}: {reason}")]
    BadHex {
        /// The role.
        role: String,
        /// The entry, e.g. `keys[2]`.
        entry: String,
        /// The hex text.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A limit of zero.
    #[error("{owner}: limits.{field} must be at least 1 (leave it out for no limit)")]
    ZeroLimit {
        /// `role "x"` or `bindings[3]`.
        owner: String,
        /// The field.
        field: &'static str,
    },
    /// A binding has an empty `subjects` list.
    #[error("bindings[{binding}] has no subjects")]
    NoSubjects {
        /// Index of the binding.
        binding: usize,
    },
    /// A subject selector has no field, so it would match nobody (or, read
    /// naively, everybody).
    #[error("bindings[{binding}] subjects[{subject}]: a subject selector needs at least one field")]
    EmptySelector {
        /// Index of the binding.
        binding: usize,
        /// Index of the selector.
        subject: usize,
    },
    /// A `fingerprint_sha256` pattern is not hex (with optional `:` and `*`).
    #[error("bindings[{binding}] subjects[{subject}]: invalid fingerprint_sha256 {value:?}: {reason}")]
    BadFingerprint {
        /// Index of the binding.
        binding: usize,
        /// Index of the selector.
        subject: usize,
        /// The pattern as written.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
}

// === impl PolicyDocument ===

impl PolicyDocument {
    /// Parses and validates a policy file. `origin` (usually the path) prefixes
    /// every error message.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Syntax`] for YAML and shape errors,
    /// [`PolicyError::Invalid`] for semantic ones; both carry a location.
    pub fn parse(text: &str, origin: &str) -> Result<PolicyDocument, PolicyError> {
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_nodes: MAX_NODES,
                max_events: MAX_EVENTS,
            },
            with_snippet: false,
        };
        let raw: RawPolicy =
            serde_saphyr::from_str_with_options(text, options).map_err(|err| syntax_error(origin, &err))?;
        Validator { origin }.validate(raw)
    }
}

// === impl Role ===

impl Role {
    /// The role's grants for `access`, with their indices in `keys`.
    pub fn grants(&self, access: Access) -> impl Iterator<Item = (usize, &KeyRule)> + '_ {
        self.keys.iter().enumerate().filter(move |(_, rule)| rule.access.allows(access))
    }

    /// The role's denials for `access`, with their indices in `deny`.
    pub fn denials(&self, access: Access) -> impl Iterator<Item = (usize, &KeyRule)> + '_ {
        self.deny.iter().enumerate().filter(move |(_, rule)| rule.access.allows(access))
    }
}

// === impl KeyRule ===

impl fmt::Display for KeyRule {
    /// E.g. `prefix "cilium/" readwrite`, `key "compact_rev_key" read`,
    /// `range from "a" to +inf write`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let start = quoted_key(self.range.start());
        match self.kind {
            KeyRuleKind::Prefix => write!(f, "prefix {start}")?,
            KeyRuleKind::Key => write!(f, "key {start}")?,
            KeyRuleKind::Range => match self.range.end() {
                End::Key(end) => write!(f, "range from {start} to {}", quoted_key(end))?,
                End::Unbounded => write!(f, "range from {start} to +inf")?,
            },
        }
        write!(f, " {}", self.access)
    }
}

// === impl KeyAccess ===

impl KeyAccess {
    /// Whether this rule access includes the request access.
    pub fn allows(self, access: Access) -> bool {
        matches!(
            (self, access),
            (KeyAccess::ReadWrite, _) | (KeyAccess::Read, Access::Read) | (KeyAccess::Write, Access::Write)
        )
    }

    /// The name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            KeyAccess::Read => "read",
            KeyAccess::Write => "write",
            KeyAccess::ReadWrite => "readwrite",
        }
    }
}

impl fmt::Display for KeyAccess {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// === impl Capability ===

impl Capability {
    /// Every capability, in declaration order.
    pub const ALL: [Capability; 11] = [
        Capability::Status,
        Capability::Lease,
        Capability::Compact,
        Capability::Defragment,
        Capability::Snapshot,
        Capability::Hash,
        Capability::Alarm,
        Capability::MoveLeader,
        Capability::Downgrade,
        Capability::Members,
        Capability::Auth,
    ];

    /// The snake_case name used in policy files.
    pub fn name(self) -> &'static str {
        match self {
            Capability::Status => "status",
            Capability::Lease => "lease",
            Capability::Compact => "compact",
            Capability::Defragment => "defragment",
            Capability::Snapshot => "snapshot",
            Capability::Hash => "hash",
            Capability::Alarm => "alarm",
            Capability::MoveLeader => "move_leader",
            Capability::Downgrade => "downgrade",
            Capability::Members => "members",
            Capability::Auth => "auth",
        }
    }

    /// The etcd calls it opens, for `policy grants` (as the README lists them).
    pub fn covers(self) -> &'static str {
        match self {
            Capability::Status => "Maintenance Status, Alarm list, MemberList, gRPC health",
            Capability::Lease => {
                "LeaseGrant (of an ID it chooses itself: admin); TimeToLive of any lease (with its keys: read on \
                 them); revoke, keep-alive and puts with a lease only for leases whose keys it may write"
            }
            Capability::Compact => "Compact",
            Capability::Defragment => "Defragment",
            Capability::Snapshot => "Snapshot (every key and value)",
            Capability::Hash => "Hash, HashKV",
            Capability::Alarm => "Alarm activate and deactivate",
            Capability::MoveLeader => "MoveLeader",
            Capability::Downgrade => "Downgrade",
            Capability::Members => "MemberAdd, MemberRemove, MemberUpdate, MemberPromote",
            Capability::Auth => "etcd's Auth service",
        }
    }

    /// The capability with this name (`admin` is a set, not a capability).
    pub fn from_name(name: &str) -> Option<Capability> {
        Capability::ALL.into_iter().find(|c| c.name() == name)
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Capability {
    type Err = UnknownCapability;

    fn from_str(s: &str) -> Result<Capability, UnknownCapability> {
        Capability::from_name(s).ok_or_else(|| UnknownCapability(s.to_owned()))
    }
}

/// A name that is not a [`Capability`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("unknown capability {0:?}")]
pub struct UnknownCapability(pub String);

// === impl CapabilitySet ===

impl CapabilitySet {
    /// No capability.
    pub const fn empty() -> CapabilitySet {
        CapabilitySet { bits: 0 }
    }

    /// Every capability (`admin`).
    pub const fn all() -> CapabilitySet {
        CapabilitySet { bits: (1 << Capability::ALL.len()) - 1 }
    }

    /// The set named `name` in a policy file: one capability, or `admin`.
    pub fn from_name(name: &str) -> Option<CapabilitySet> {
        if name == "admin" {
            return Some(CapabilitySet::all());
        }
        Capability::from_name(name).map(|c| CapabilitySet { bits: c.bit() })
    }

    /// Whether `cap` is in the set.
    pub fn contains(self, cap: Capability) -> bool {
        self.bits & cap.bit() != 0
    }

    /// Adds `cap`.
    pub fn insert(&mut self, cap: Capability) {
        self.bits |= cap.bit();
    }

    /// Both sets together.
    #[must_use]
    pub fn union(self, other: CapabilitySet) -> CapabilitySet {
        CapabilitySet { bits: self.bits | other.bits }
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.bits == 0
    }

    /// The capabilities in the set, in declaration order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        Capability::ALL.into_iter().filter(move |c| self.contains(*c))
    }
}

impl FromIterator<Capability> for CapabilitySet {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> CapabilitySet {
        let mut set = CapabilitySet::empty();
        for cap in iter {
            set.insert(cap);
        }
        set
    }
}

impl fmt::Display for CapabilitySet {
    /// `admin` for all, `(none)` for none, else e.g. `status, lease`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == CapabilitySet::all() {
            return f.write_str("admin");
        }
        if self.is_empty() {
            return f.write_str("(none)");
        }
        for (i, cap) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(cap.name())?;
        }
        Ok(())
    }
}

// === impl Limits ===

impl Limits {
    /// The limits of an identity bound through several bindings: permissions add up, so the most generous
    /// value wins, and a binding without a limit leaves that field unlimited.
    pub fn combine(all: impl IntoIterator<Item = Limits>) -> Limits {
        fn most(a: Option<u32>, b: Option<u32>) -> Option<u32> {
            Some(a?.max(b?))
        }
        let mut all = all.into_iter();
        let Some(first) = all.next() else { return Limits::default() };
        all.fold(first, |acc, l| Limits {
            concurrent_requests: most(acc.concurrent_requests, l.concurrent_requests),
            requests_per_second: most(acc.requests_per_second, l.requests_per_second),
            burst: most(acc.burst, l.burst),
            open_watches: most(acc.open_watches, l.open_watches),
        })
    }
}

// === impl BindingMode ===

impl fmt::Display for BindingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BindingMode::Enforce => "enforce",
            BindingMode::AuditOnly => "audit-only",
        })
    }
}

// === impl Binding ===

impl Binding {
    /// Index of the first selector that matches `id`, if any.
    pub fn matching_subject(&self, id: &Identity) -> Option<usize> {
        self.subjects.iter().position(|s| s.matches(id))
    }
}

// === impl Selector ===

impl Selector {
    /// Whether every field of the selector matches `id`.
    pub fn matches(&self, id: &Identity) -> bool {
        fn any(pattern: &Option<Pattern>, values: &[String]) -> bool {
            pattern.as_ref().is_none_or(|p| values.iter().any(|v| p.matches(v)))
        }
        self.common_name.as_ref().is_none_or(|p| id.common_name.as_deref().is_some_and(|cn| p.matches(cn)))
            && any(&self.organization, &id.organizations)
            && any(&self.organizational_unit, &id.organizational_units)
            && any(&self.dns_san, &id.dns_sans)
            && any(&self.uri_san, &id.uri_sans)
            && self
                .fingerprint_sha256
                .as_ref()
                .is_none_or(|p| p.matches(&normalize_fingerprint(&id.fingerprint_sha256)))
            && any(&self.issuer, &id.issuers)
    }

    /// A field whose pattern's text before its first `*` (all of it, without one) is not empty, and that text:
    /// the selector matches only identities with a value that begins with it in that field (for the fingerprint:
    /// once normalized, see [`normalize_fingerprint`]). The most selective: a field without `*` first (it matches
    /// one value), then the longest text; the first of equals. `None` if every field given begins with `*` (or
    /// is empty).
    pub fn anchor(&self) -> Option<(SelectorField, &str)> {
        use SelectorField::*;
        [
            (CommonName, &self.common_name),
            (Organization, &self.organization),
            (OrganizationalUnit, &self.organizational_unit),
            (DnsSan, &self.dns_san),
            (UriSan, &self.uri_san),
            (FingerprintSha256, &self.fingerprint_sha256),
            (Issuer, &self.issuer),
        ]
        .into_iter()
        .filter_map(|(field, p)| p.as_ref().map(|p| (field, p)))
        .filter(|(_, p)| !p.prefix().is_empty())
        // The first of the most selective: `max_by_key` would keep the last.
        .fold(None, |best: Option<(SelectorField, &Pattern)>, (field, p)| match best {
            Some((_, b)) if (b.literal(), b.prefix().len()) >= (p.literal(), p.prefix().len()) => best,
            _ => Some((field, p)),
        })
        .map(|(field, p)| (field, p.prefix()))
    }

    fn is_empty(&self) -> bool {
        self.fields().next().is_none()
    }

    fn fields(&self) -> impl Iterator<Item = (&'static str, &Pattern)> {
        [
            ("common_name", &self.common_name),
            ("organization", &self.organization),
            ("organizational_unit", &self.organizational_unit),
            ("dns_san", &self.dns_san),
            ("uri_san", &self.uri_san),
            ("fingerprint_sha256", &self.fingerprint_sha256),
            ("issuer", &self.issuer),
        ]
        .into_iter()
        .filter_map(|(name, p)| p.as_ref().map(|p| (name, p)))
    }
}

impl fmt::Display for Selector {
    /// E.g. `{ common_name: "etcd-*", organization: "system:masters" }`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("{")?;
        for (i, (name, pattern)) in self.fields().enumerate() {
            let sep = if i == 0 { " " } else { ", " };
            write!(f, "{sep}{name}: {:?}", pattern.as_str())?;
        }
        f.write_str(" }")
    }
}

// === impl Selector ===

impl Selector {
    /// Whether every pattern of the selector is stars only, so that it matches (nearly) every certificate the client
    /// CA signs: `Some` with the fields a certificate must carry to match (none: every certificate, one without a
    /// CN aside; `["uri_san"]`: every one with a URI SAN, which in a cluster of SPIFFE IDs is everyone). `None` when a
    /// pattern narrows it. A fingerprint pattern cannot be stars (refused when the policy loads).
    pub fn matches_everyone_with(&self) -> Option<Vec<&'static str>> {
        if self.is_empty() || self.fields().any(|(_, p)| !p.matches_anything()) {
            return None;
        }
        // A CN of stars only asks for a CN, which nearly every client certificate has.
        Some(self.fields().map(|(name, _)| name).filter(|name| *name != "common_name").collect())
    }
}

// === impl Pattern ===

impl Pattern {
    /// Compiles a glob.
    pub fn new(text: &str) -> Pattern {
        Pattern { text: text.to_owned(), parts: text.split('*').map(str::to_owned).collect() }
    }

    /// The glob as written (after normalization for fingerprints).
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether the glob has no `*`: it matches one value.
    pub fn literal(&self) -> bool {
        self.parts.len() == 1
    }

    /// The glob's text before its first `*` (all of it, without one): every value it matches begins with it.
    pub fn prefix(&self) -> &str {
        self.parts.first().map_or("", String::as_str)
    }

    /// Whether the glob matches every value (stars only; an empty glob matches only the empty value).
    pub fn matches_anything(&self) -> bool {
        self.parts.len() > 1 && self.parts.iter().all(String::is_empty)
    }

    /// Whether `value` matches the glob entirely.
    ///
    /// Greedy leftmost matching of the parts between stars is exact for globs
    /// whose only wildcard is `*`; time is O(len(value) * len(pattern)).
    pub fn matches(&self, value: &str) -> bool {
        let [first, middle @ .., last] = self.parts.as_slice() else {
            return self.parts.first().is_some_and(|only| only == value);
        };
        if value.len() < first.len() + last.len()
            || !value.starts_with(first.as_str())
            || !value.ends_with(last.as_str())
        {
            return false;
        }
        // Both slice points are char boundaries: they border matched prefixes/suffixes.
        let Some(mut rest) = value.get(first.len()..value.len() - last.len()) else {
            return false;
        };
        for part in middle {
            match rest.find(part.as_str()) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
        true
    }
}

// === impl SourceLocation ===

impl SourceLocation {
    fn new(origin: &str, location: &Location) -> SourceLocation {
        SourceLocation { origin: origin.to_owned(), line: location.line(), column: location.column() }
    }
}

impl fmt::Display for SourceLocation {
    /// `origin:line:column`, leaving out what is unknown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.origin)?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
            if self.column > 0 {
                write!(f, ":{}", self.column)?;
            }
        }
        Ok(())
    }
}

// === impl PolicyError ===

impl PolicyError {
    /// Where in the file the problem is, if known.
    pub fn location(&self) -> Option<&SourceLocation> {
        match self {
            PolicyError::Io { .. } | PolicyError::Empty { .. } => None,
            PolicyError::Syntax { at, .. } | PolicyError::Invalid { at, .. } => Some(at),
        }
    }
}

// === raw file format (serde) ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    roles: Vec<Spanned<RawRole>>,
    #[serde(default)]
    bindings: Vec<Spanned<RawBinding>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRole {
    name: Spanned<String>,
    #[serde(default)]
    keys: Vec<Spanned<RawKeyRule>>,
    #[serde(default)]
    deny: Vec<Spanned<RawKeyRule>>,
    #[serde(default)]
    cluster: Vec<Spanned<String>>,
    #[serde(default)]
    limits: Option<Spanned<Limits>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyRule {
    // Boxed: a rule has one of the three, and a policy of 100,000 rules holds every rule as parsed at once (with
    // the three inline, 472 bytes per rule).
    prefix: Option<Box<Spanned<RawKey>>>,
    key: Option<Box<Spanned<RawKey>>>,
    range: Option<Box<Spanned<RawRange>>>,
    access: Option<KeyAccess>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    from: Spanned<RawKey>,
    to: Spanned<RawKey>,
}

/// A key as written: a string, or `{ hex: "..." }` (decoded during validation
/// so that bad hex gets a located error).
enum RawKey {
    Text(String),
    Hex(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBinding {
    role: Spanned<String>,
    subjects: Vec<Spanned<RawSelector>>,
    #[serde(default)]
    mode: BindingMode,
    #[serde(default)]
    limits: Option<Spanned<Limits>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSelector {
    common_name: Option<String>,
    organization: Option<String>,
    organizational_unit: Option<String>,
    dns_san: Option<String>,
    uri_san: Option<String>,
    fingerprint_sha256: Option<String>,
    issuer: Option<String>,
}

impl<'de> Deserialize<'de> for RawKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawKey, D::Error> {
        deserializer.deserialize_any(RawKeyVisitor)
    }
}

struct RawKeyVisitor;

impl<'de> Visitor<'de> for RawKeyVisitor {
    type Value = RawKey;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a key: a string (quote numbers, booleans and null) or { hex: \"...\" }")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<RawKey, E> {
        Ok(RawKey::Text(v.to_owned()))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<RawKey, E> {
        Ok(RawKey::Text(v))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawKey, A::Error> {
        let mut hex = None;
        while let Some(field) = map.next_key::<String>()? {
            if field != "hex" {
                return Err(de::Error::unknown_field(&field, &["hex"]));
            }
            if hex.is_some() {
                return Err(de::Error::duplicate_field("hex"));
            }
            hex = Some(map.next_value::<String>()?);
        }
        hex.map(RawKey::Hex).ok_or_else(|| de::Error::missing_field("hex"))
    }
}

// === validation ===

struct Validator<'a> {
    origin: &'a str,
}

impl Validator<'_> {
    fn validate(&self, raw: RawPolicy) -> Result<PolicyDocument, PolicyError> {
        let mut names: HashMap<&str, (usize, u64)> = HashMap::with_capacity(raw.roles.len());
        let mut roles = Vec::with_capacity(raw.roles.len());
        for (index, role) in raw.roles.iter().enumerate() {
            let name = &role.value.name;
            if name.value.is_empty() {
                return Err(self.invalid(&name.referenced, ValidationError::EmptyRoleName { index }));
            }
            let line = role.referenced.line();
            if let Some(&(_, first_line)) = names.get(name.value.as_str()) {
                return Err(self.invalid(
                    &name.referenced,
                    ValidationError::DuplicateRole { name: name.value.clone(), first_line },
                ));
            }
            names.insert(&name.value, (index, line));
            roles.push(self.role(&role.value, line)?);
        }

        let mut bindings = Vec::with_capacity(raw.bindings.len());
        for (index, binding) in raw.bindings.iter().enumerate() {
            let role = &binding.value.role;
            let Some(&(role_index, _)) = names.get(role.value.as_str()) else {
                return Err(self.invalid(
                    &role.referenced,
                    ValidationError::UnknownRole { binding: index, role: role.value.clone() },
                ));
            };
            bindings.push(self.binding(index, binding, role_index)?);
        }
        Ok(PolicyDocument { roles, bindings })
    }

    fn role(&self, raw: &RawRole, line: u64) -> Result<Role, PolicyError> {
        let name = &raw.name.value;
        let rules = |list: &'static str, entries: &[Spanned<RawKeyRule>], default| {
            entries
                .iter()
                .enumerate()
                .map(|(i, entry)| self.key_rule(name, list, i, entry, default))
                .collect::<Result<Vec<_>, _>>()
        };
        // Grants must say what they grant; a denial removes both by default.
        let keys = rules("keys", &raw.keys, None)?;
        let deny = rules("deny", &raw.deny, Some(KeyAccess::ReadWrite))?;
        let mut cluster = CapabilitySet::empty();
        for cap in &raw.cluster {
            let Some(set) = CapabilitySet::from_name(&cap.value) else {
                let expected = Capability::ALL.iter().map(|c| c.name()).chain(["admin"]).collect::<Vec<_>>().join(", ");
                return Err(self.invalid(
                    &cap.referenced,
                    ValidationError::UnknownCapability { role: name.clone(), name: cap.value.clone(), expected },
                ));
            };
            cluster = cluster.union(set);
        }
        let limits = self.limits(raw.limits.as_ref(), || format!("role {name:?}"))?.unwrap_or_default();
        Ok(Role { name: name.clone(), keys, deny, cluster, limits, line })
    }

    fn limits(&self, raw: Option<&Spanned<Limits>>, owner: impl Fn() -> String) -> Result<Option<Limits>, PolicyError> {
        let Some(raw) = raw else { return Ok(None) };
        let l = raw.value;
        for (field, value) in [
            ("concurrent_requests", l.concurrent_requests),
            ("requests_per_second", l.requests_per_second),
            ("burst", l.burst),
            ("open_watches", l.open_watches),
        ] {
            if value == Some(0) {
                return Err(self.invalid(&raw.referenced, ValidationError::ZeroLimit { owner: owner(), field }));
            }
        }
        Ok(Some(l))
    }

    fn key_rule(
        &self,
        role: &str,
        list: &'static str,
        index: usize,
        entry: &Spanned<RawKeyRule>,
        default_access: Option<KeyAccess>,
    ) -> Result<KeyRule, PolicyError> {
        let raw = &entry.value;
        let entry_name = || format!("{list}[{index}]");
        let found =
            usize::from(raw.prefix.is_some()) + usize::from(raw.key.is_some()) + usize::from(raw.range.is_some());
        let shape_error = || {
            self.invalid(
                &entry.referenced,
                ValidationError::KeyEntryShape { role: role.to_owned(), entry: entry_name(), found },
            )
        };
        if found != 1 {
            return Err(shape_error());
        }
        let Some(access) = raw.access.or(default_access) else {
            return Err(self.invalid(
                &entry.referenced,
                ValidationError::MissingAccess { role: role.to_owned(), entry: entry_name() },
            ));
        };
        let key = |k: &Spanned<RawKey>| self.key_bytes(role, &entry_name(), k);
        let (kind, range) = if let Some(prefix) = &raw.prefix {
            (KeyRuleKind::Prefix, KeyRange::prefix(key(prefix)?))
        } else if let Some(single) = &raw.key {
            (KeyRuleKind::Key, KeyRange::point(key(single)?))
        } else if let Some(range) = &raw.range {
            let from = key(&range.value.from)?;
            let to = match key(&range.value.to)? {
                to if to == [0] => End::Unbounded,
                to => End::Key(to),
            };
            let range = KeyRange::new(from, to).map_err(|error| {
                self.invalid(
                    &range.referenced,
                    ValidationError::BadRange { role: role.to_owned(), entry: entry_name(), error },
                )
            })?;
            (KeyRuleKind::Range, range)
        } else {
            return Err(shape_error());
        };
        Ok(KeyRule { kind, range, access, line: entry.referenced.line() })
    }

    fn key_bytes(&self, role: &str, entry: &str, key: &Spanned<RawKey>) -> Result<Vec<u8>, PolicyError> {
        match &key.value {
            RawKey::Text(text) => Ok(text.as_bytes().to_vec()),
            RawKey::Hex(text) => hex::decode(text).map_err(|err| {
                self.invalid(
                    &key.referenced,
                    ValidationError::BadHex {
                        role: role.to_owned(),
                        entry: entry.to_owned(),
                        value: text.clone(),
                        reason: err.to_string(),
                    },
                )
            }),
        }
    }

    fn binding(&self, index: usize, raw: &Spanned<RawBinding>, role_index: usize) -> Result<Binding, PolicyError> {
        if raw.value.subjects.is_empty() {
            return Err(self.invalid(&raw.referenced, ValidationError::NoSubjects { binding: index }));
        }
        let mut subjects = Vec::with_capacity(raw.value.subjects.len());
        for (subject, selector) in raw.value.subjects.iter().enumerate() {
            let s = &selector.value;
            let glob = |v: &Option<String>| v.as_deref().map(Pattern::new);
            let fingerprint = match &s.fingerprint_sha256 {
                None => None,
                Some(value) => Some(check_fingerprint(value).map_err(|reason| {
                    self.invalid(
                        &selector.referenced,
                        ValidationError::BadFingerprint { binding: index, subject, value: value.clone(), reason },
                    )
                })?),
            };
            let compiled = Selector {
                common_name: glob(&s.common_name),
                organization: glob(&s.organization),
                organizational_unit: glob(&s.organizational_unit),
                dns_san: glob(&s.dns_san),
                uri_san: glob(&s.uri_san),
                fingerprint_sha256: fingerprint,
                issuer: glob(&s.issuer),
            };
            if compiled.is_empty() {
                return Err(
                    self.invalid(&selector.referenced, ValidationError::EmptySelector { binding: index, subject })
                );
            }
            subjects.push(compiled);
        }
        let limits = self.limits(raw.value.limits.as_ref(), || format!("bindings[{index}]"))?;
        Ok(Binding {
            role: raw.value.role.value.clone(),
            role_index,
            subjects,
            mode: raw.value.mode,
            limits,
            line: raw.referenced.line(),
        })
    }

    fn invalid(&self, at: &Location, error: ValidationError) -> PolicyError {
        PolicyError::Invalid { at: SourceLocation::new(self.origin, at), error: Box::new(error) }
    }
}

// === helpers ===

/// The YAML parser's advice meant for programs that use it (not for whoever edits the file) taken out of its
/// message.
pub(crate) fn parser_advice_removed(message: &str) -> String {
    message
        .replace(", set DuplicateKeyPolicy in Options if acceptable", " (a key may appear once per mapping)")
        .replace("; use Option<String>", " (null is not a value here)")
        .replace(
            "; use from_str_multiple or from_str_multiple_with_options",
            " (the file must hold one document: remove the extra `---`)",
        )
        .replace(
            " If you just use !!binary for documentation/annotation, set ignore_binary_tag_for_string in Options",
            "",
        )
}

/// Turns a serde-saphyr error into a located [`PolicyError::Syntax`].
fn syntax_error(origin: &str, err: &serde_saphyr::Error) -> PolicyError {
    let at = match err.location() {
        Some(location) => SourceLocation::new(origin, &location),
        None => SourceLocation { origin: origin.to_owned(), line: 0, column: 0 },
    };
    let message = serde_saphyr::DefaultMessageFormatter.format_message(err.without_snippet());
    // The message may quote input text: keep control characters out of logs.
    let message = parser_advice_removed(&message)
        .chars()
        .flat_map(|c| {
            let escaped: Vec<char> = if c.is_control() { c.escape_debug().collect() } else { vec![c] };
            escaped
        })
        .collect();
    PolicyError::Syntax { at, message }
}

/// A fingerprint as `fingerprint_sha256` patterns are kept and matched: lowercase, without `:`.
pub fn normalize_fingerprint(text: &str) -> String {
    text.chars().filter(|&c| c != ':').map(|c| c.to_ascii_lowercase()).collect()
}

/// Normalizes and checks a `fingerprint_sha256` pattern.
fn check_fingerprint(text: &str) -> Result<Pattern, &'static str> {
    let normalized = normalize_fingerprint(text);
    // A pin names one certificate: no wildcards (`*` alone would bind every certificate the CAs trust).
    if !normalized.chars().all(|c| c.is_ascii_hexdigit()) || normalized.len() != 64 {
        return Err("a SHA-256 fingerprint is 64 hex digits (optionally with `:` separators), without wildcards");
    }
    Ok(Pattern::new(&normalized))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PolicyDocument, PolicyError> {
        PolicyDocument::parse(text, "policies/x.yaml")
    }

    /// The error message of a policy that must fail.
    fn error(text: &str) -> String {
        match parse(text) {
            Ok(doc) => panic!("expected an error, parsed {doc:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn assert_error(text: &str, expected_prefix: &str, expected_reason: &str) {
        let message = error(text);
        assert!(message.starts_with(expected_prefix), "message {message:?} should start with {expected_prefix:?}");
        assert!(message.contains(expected_reason), "message {message:?} should contain {expected_reason:?}");
    }

    #[test]
    fn parses_all_key_forms() {
        let doc = parse(
            r#"
roles:
  - name: r
    keys:
      - { prefix: "/registry/", access: readwrite }
      - { key: "compact_rev_key", access: read }
      - { range: { from: "a", to: "b" }, access: write }
      - { range: { from: "a", to: "\x00" }, access: read }
      - { prefix: { hex: "61FF" }, access: read }
      - { key: "\x00\x01", access: read }
      - prefix: ""
        access: read
    deny:
      - { prefix: "/registry/secrets/" }
      - { key: "x", access: write }
    cluster: [status, lease, move_leader]
bindings:
  - role: r
    subjects: [ { common_name: "a" } ]
"#,
        )
        .expect("valid policy");
        let role = &doc.roles[0];
        assert_eq!(role.line, 3);
        let ranges: Vec<&KeyRange> = role.keys.iter().map(|k| &k.range).collect();
        assert_eq!(ranges[0], &KeyRange::prefix("/registry/"));
        assert_eq!(ranges[1], &KeyRange::point("compact_rev_key"));
        assert_eq!(ranges[2], &KeyRange::new("a", End::Key(b"b".to_vec())).expect("valid"));
        assert_eq!(ranges[3], &KeyRange::new("a", End::Unbounded).expect("valid"));
        assert_eq!(ranges[4], &KeyRange::prefix(b"a\xff".to_vec()));
        assert_eq!(ranges[5], &KeyRange::point(b"\x00\x01".to_vec()));
        assert_eq!(ranges[6], &KeyRange::all());
        assert_eq!(role.keys[2].access, KeyAccess::Write);
        assert_eq!(role.keys[0].line, 5);
        assert_eq!(role.keys[6].line, 11);
        assert_eq!(role.deny[0].access, KeyAccess::ReadWrite);
        assert_eq!(role.deny[1].access, KeyAccess::Write);
        assert_eq!(
            role.cluster.iter().collect::<Vec<_>>(),
            [Capability::Status, Capability::Lease, Capability::MoveLeader]
        );
        assert_eq!(doc.bindings[0].mode, BindingMode::Enforce);
        assert_eq!(doc.bindings[0].role_index, 0);
        assert_eq!(role.keys[0].to_string(), "prefix \"/registry/\" readwrite");
        assert_eq!(role.keys[2].to_string(), "range from \"a\" to \"b\" write");
        assert_eq!(role.keys[3].to_string(), "range from \"a\" to +inf read");
        assert_eq!(role.keys[5].to_string(), "key \"\\x00\\x01\" read");
    }

    #[test]
    fn empty_document_forms() {
        let doc = parse("{}").expect("empty policy");
        assert!(doc.roles.is_empty() && doc.bindings.is_empty());
        let doc = parse("roles: []\nbindings: []\n").expect("empty lists");
        assert!(doc.roles.is_empty());
    }

    #[test]
    fn audit_only_mode() {
        let doc = parse(
            "roles: [ { name: r } ]\nbindings:\n  - { role: r, mode: audit-only, subjects: [ { organization: o } ] }\n",
        )
        .expect("valid");
        assert_eq!(doc.bindings[0].mode, BindingMode::AuditOnly);
        assert_error(
            "roles: [ { name: r } ]\nbindings:\n  - { role: r, mode: audit, subjects: [ { organization: o } ] }\n",
            "policies/x.yaml:3:",
            "audit",
        );
    }

    #[test]
    fn error_unknown_role() {
        assert_error(
            "roles:\n  - name: kube-apiserver\nbindings:\n  - role: kube-apiserver\n    subjects: [ { common_name: a } ]\n  - role: kube-apiserver2\n    subjects: [ { common_name: a } ]\n",
            "policies/x.yaml:6:11: ",
            "bindings[1] refers to unknown role \"kube-apiserver2\"",
        );
    }

    #[test]
    fn error_duplicate_role() {
        assert_error(
            "roles:\n  - name: a\n  - name: b\n  - name: a\n",
            "policies/x.yaml:4:11: ",
            "duplicate role name \"a\" (first defined on line 2)",
        );
    }

    #[test]
    fn error_empty_role_name() {
        assert_error("roles:\n  - name: \"\"\n", "policies/x.yaml:2:", "roles[0] has an empty name");
    }

    #[test]
    fn error_unknown_capability() {
        assert_error(
            "roles:\n  - name: a\n    cluster: [status,\n      superuser]\n",
            "policies/x.yaml:4:7: ",
            "role \"a\": unknown capability \"superuser\" (expected one of: status, lease",
        );
    }

    #[test]
    fn error_inverted_and_empty_range() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - access: read\n        range: { from: b, to: a }\n",
            "policies/x.yaml:5:16: ",
            "role \"a\" keys[0]: invalid range: range end is before its start",
        );
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { access: read, range: { from: b, to: b } }\n",
            "policies/x.yaml:4:",
            "invalid range: range is empty",
        );
    }

    #[test]
    fn error_key_entry_shape() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { access: read, key: a }\n      - { access: read, key: a, prefix: a }\n",
            "policies/x.yaml:5:9: ",
            "role \"a\" keys[1]: a key entry needs exactly one of `prefix`, `key`, `range` (found 2)",
        );
        assert_error(
            "roles:\n  - name: a\n    deny:\n      - { access: read }\n",
            "policies/x.yaml:4:9: ",
            "role \"a\" deny[0]: a key entry needs exactly one of `prefix`, `key`, `range` (found 0)",
        );
    }

    #[test]
    fn error_missing_access_on_grant() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { key: a }\n",
            "policies/x.yaml:4:9: ",
            "role \"a\" keys[0]: missing `access`",
        );
    }

    #[test]
    fn error_bad_hex() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - access: read\n        prefix: { hex: \"6g\" }\n",
            "policies/x.yaml:5:17: ",
            "role \"a\" keys[0]: invalid hex key \"6g\"",
        );
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { access: read, key: { hex: \"616\" } }\n",
            "policies/x.yaml:4:",
            "invalid hex key \"616\"",
        );
    }

    #[test]
    fn error_empty_selector_and_no_subjects() {
        assert_error(
            "roles: [ { name: a } ]\nbindings:\n  - role: a\n    subjects:\n      - { common_name: x }\n      - {}\n",
            "policies/x.yaml:6:9: ",
            "bindings[0] subjects[1]: a subject selector needs at least one field",
        );
        assert_error(
            "roles: [ { name: a } ]\nbindings:\n  - role: a\n    subjects: []\n",
            "policies/x.yaml:3:",
            "bindings[0] has no subjects",
        );
    }

    #[test]
    fn error_bad_fingerprint() {
        assert_error(
            "roles: [ { name: a } ]\nbindings:\n  - role: a\n    subjects: [ { fingerprint_sha256: \"zz\" } ]\n",
            "policies/x.yaml:4:",
            "invalid fingerprint_sha256",
        );
        assert_error(
            "roles: [ { name: a } ]\nbindings:\n  - role: a\n    subjects: [ { fingerprint_sha256: \"abcd\" } ]\n",
            "policies/x.yaml:4:",
            "64 hex digits",
        );
        for wild in ["*", "ab*"] {
            assert_error(
                &format!(
                    "roles: [ {{ name: a }} ]\nbindings:\n  - role: a\n    subjects: [ {{ fingerprint_sha256: \"{wild}\" }} ]\n"
                ),
                "policies/x.yaml:4:",
                "without wildcards",
            );
        }
    }

    #[test]
    fn error_unknown_fields() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { prefix: x, acess: read }\n",
            "policies/x.yaml:4:22: ",
            "unknown field `acess`",
        );
        assert_error("role: []\n", "policies/x.yaml:1:1: ", "unknown field `role`");
        assert_error(
            "roles: [ { name: a } ]\nbindings:\n  - role: a\n    subjects: [ { cn: x } ]\n",
            "policies/x.yaml:4:19: ",
            "unknown field `cn`",
        );
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { prefix: { hex: \"61\", base64: x }, access: read }\n",
            "policies/x.yaml:4:",
            "unknown field `base64`",
        );
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { range: { from: a, to: b, step: 1 }, access: read }\n",
            "policies/x.yaml:4:",
            "unknown field `step`",
        );
    }

    #[test]
    fn error_shape_and_syntax() {
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { prefix: x, access: all }\n",
            "policies/x.yaml:4:",
            "all",
        );
        assert_error(
            "roles:\n  - name: a\n    keys:\n      - { prefix: 123, access: read }\n",
            "policies/x.yaml:4:",
            "quote numbers",
        );
        assert_error("roles:\n  - name: a\n   bad: [\n", "policies/x.yaml:3:", "");
        assert_error("roles:\n  - name: a\n    name: b\n", "policies/x.yaml:3:", "duplicate");
        assert_error("roles:\n  - name: a\n    name: b\n", "policies/x.yaml:3:", "a key may appear once per mapping");
        assert_error("bindings:\n  - subjects: [ { common_name: a } ]\n", "policies/x.yaml:2:", "missing field `role`");
    }

    #[test]
    fn syntax_error_messages_have_no_control_characters() {
        let message = error("roles:\n  - name: a\n    \"ke\\u0007ys\": []\n");
        assert!(!message.chars().any(char::is_control), "{message:?}");
    }

    #[test]
    fn globs_that_match_anything_are_stars_only() {
        for (glob, anything) in [("*", true), ("**", true), ("", false), ("a*", false), ("*a", false)] {
            assert_eq!(Pattern::new(glob).matches_anything(), anything, "{glob:?}");
        }
    }

    #[test]
    fn glob_matching() {
        let m = |p: &str, v: &str| Pattern::new(p).matches(v);
        // No star: exact and case-sensitive.
        assert!(m("prometheus", "prometheus"));
        assert!(!m("prometheus", "Prometheus"));
        assert!(!m("prometheus", "prometheus2"));
        assert!(!m("", "a"));
        assert!(m("", ""));
        // Star at the end, start, middle.
        assert!(m("etcd-*", "etcd-"));
        assert!(m("etcd-*", "etcd-client/x"));
        assert!(!m("etcd-*", "etc"));
        assert!(m("*.svc", "a.b.svc"));
        assert!(!m("*.svc", "a.svc.x"));
        assert!(m("spiffe://cluster.local/ns/*/sa/prometheus", "spiffe://cluster.local/ns/mon/sa/prometheus"));
        assert!(m("spiffe://cluster.local/ns/*/sa/prometheus", "spiffe://cluster.local/ns/a/b/sa/prometheus"));
        assert!(!m("spiffe://cluster.local/ns/*/sa/prometheus", "spiffe://cluster.local/ns/mon/sa/prometheus2"));
        // Multiple stars.
        assert!(m("*", ""));
        assert!(m("**", "anything"));
        assert!(m("a*b*c", "abc"));
        assert!(m("a*b*c", "aXbYbZc"));
        assert!(!m("a*b*c", "acb"));
        assert!(m("*a*a*", "aa"));
        assert!(!m("*a*a*", "a"));
        // Prefix and suffix must not overlap.
        assert!(!m("ab*ba", "aba"));
        assert!(m("ab*ba", "abba"));
        // Non-ASCII values.
        assert!(m("ü*ß", "üxyzß"));
        assert!(!m("ü*ß", "ü"));
    }

    #[test]
    fn selector_matching() {
        let id = Identity {
            common_name: Some("prom".into()),
            organizations: vec!["a".into(), "monitoring".into()],
            uri_sans: vec!["spiffe://cluster.local/ns/mon/sa/prometheus".into()],
            fingerprint_sha256: "ab".repeat(32),
            ..Identity::default()
        };
        let sel = |cn: Option<&str>, o: Option<&str>| Selector {
            common_name: cn.map(Pattern::new),
            organization: o.map(Pattern::new),
            ..Selector::default()
        };
        assert!(sel(Some("prom"), None).matches(&id));
        assert!(sel(None, Some("monitoring")).matches(&id));
        assert!(sel(Some("prom"), Some("monitoring")).matches(&id));
        assert!(!sel(Some("prom"), Some("nope")).matches(&id));
        assert!(!sel(Some("prom"), None).matches(&Identity::default()));
        assert!(!sel(None, Some("*")).matches(&Identity::default()));
        let fp = "AB:".repeat(31) + "AB";
        let by_fp = Selector {
            fingerprint_sha256: Some(check_fingerprint(&fp).expect("valid fingerprint")),
            ..Selector::default()
        };
        assert!(by_fp.matches(&id));
        let id_colons = Identity { fingerprint_sha256: fp, ..Identity::default() };
        assert!(by_fp.matches(&id_colons));
        assert!(!by_fp.matches(&Identity::default()));
    }

    #[test]
    fn capability_sets() {
        let all = CapabilitySet::from_name("admin").expect("admin");
        assert_eq!(all, CapabilitySet::all());
        assert!(Capability::ALL.iter().all(|&c| all.contains(c)));
        assert_eq!(all.iter().count(), Capability::ALL.len());
        assert_eq!(all.to_string(), "admin");
        let mut set = CapabilitySet::empty();
        assert_eq!(set.to_string(), "(none)");
        set.insert(Capability::Compact);
        set.insert(Capability::Status);
        assert_eq!(set.to_string(), "status, compact");
        assert!(!set.contains(Capability::Lease));
        assert_eq!("move_leader".parse::<Capability>(), Ok(Capability::MoveLeader));
        assert!("admin".parse::<Capability>().is_err());
        for cap in Capability::ALL {
            assert_eq!(Capability::from_name(cap.name()), Some(cap));
        }
    }
}
