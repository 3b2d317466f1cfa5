//! The compiled policy and its evaluation.
//!
//! Per connection, [`Policy::permissions_for`] resolves the client's
//! [`Identity`] to [`Permissions`]: the union of the compiled key sets and
//! capabilities of every role bound to it. Per request,
//! [`Permissions::check`] is one binary search and does not allocate when it
//! allows. [`Policy::explain`] says why a decision was made, for a CLI.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use thiserror::Error;

use super::model::{
    Binding, BindingMode, Capability, CapabilitySet, KeyRule, Limits, PolicyDocument, PolicyError, Role, SelectorField,
    normalize_fingerprint,
};
use super::range::{End, KeyRange, RangeSet, prefix_end, quoted_key};
use crate::identity::Identity;

/// The kind of access a key request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Range and watch requests.
    Read,
    /// Put, delete and transaction writes.
    Write,
}

/// A loaded, validated and compiled policy.
#[derive(Debug, Clone)]
pub struct Policy {
    origin: String,
    roles: Vec<CompiledRole>,
    bindings: Vec<Binding>,
    subjects: SubjectIndex,
}

/// How the grants of a connection are to be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Deny what the permissions do not allow.
    Enforce,
    /// Every binding that matched is `audit-only`: record what the
    /// permissions would deny, but do not deny it.
    AuditOnly,
}

/// What one identity may do, resolved once per connection.
///
/// How binding modes combine:
/// * no binding matches: empty permissions, [`Mode::Enforce`] (deny all);
/// * at least one `enforce` binding matches: the sets below come from the
///   `enforce` bindings only, [`Mode::Enforce`]; matching `audit-only`
///   bindings grant nothing (they are listed in `ignored_audit_roles`);
/// * only `audit-only` bindings match: the sets come from them and
///   [`Mode::AuditOnly`] — the caller is expected to log the failures of
///   [`Permissions::check`] instead of denying.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Names of the roles whose grants are below, sorted, without duplicates.
    pub roles: Vec<String>,
    /// Keys that may be read.
    pub read: RangeSet,
    /// Keys that may be written.
    pub write: RangeSet,
    /// Cluster capabilities.
    pub caps: CapabilitySet,
    /// True only if bindings matched and all of them are `audit-only`.
    pub audit_only: bool,
    /// Roles of `audit-only` bindings that matched but count for nothing
    /// because `enforce` bindings matched too; sorted, without duplicates.
    pub ignored_audit_roles: Vec<String>,
    /// What the identity may use at once (from the bindings that count).
    pub limits: Limits,
}

/// A request the permissions do not allow.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{reason}")]
pub struct Denied {
    /// A short human-readable reason, e.g. `no write grant covers "cilium0"`.
    pub reason: String,
}

/// Why a request is allowed or denied, for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The request, e.g. `read "/registry/pods/a"` or `capability compact`.
    pub request: String,
    /// Whether the permissions allow the request.
    pub allowed: bool,
    /// Whether the identity's permissions are audit-only (so a denial would
    /// not be enforced).
    pub audit_only: bool,
    /// The bindings that matched the identity, one line each.
    pub bindings: Vec<String>,
    /// Why the decision was made, one line each.
    pub reasons: Vec<String>,
}

/// Everything one identity is granted, for humans (`etcd-guard policy grants`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grants {
    /// The bindings that matched the identity, one line each.
    pub bindings: Vec<String>,
    /// Why nothing is granted, when no binding matched.
    pub no_binding: Option<String>,
    /// What the identity may do: the same value the proxy computes for its connections.
    pub permissions: Permissions,
}

/// A role compiled to key sets, with its rules kept for explanations.
#[derive(Debug, Clone)]
struct CompiledRole {
    role: Role,
    read: RangeSet,
    write: RangeSet,
}

/// The bindings' selectors, filed so that resolving an identity (at its handshake, and for each open connection
/// after a reload) tries the few that can match it rather than every one. A pattern matches only values that begin
/// with its text before the first `*` (all of it, without one), so a selector is filed under that prefix of one of
/// its fields (one without `*` first, else the longest prefix); the few whose every field begins with `*` are tried
/// for every identity. An identity whose values would take more lookups than there are selectors (hundreds of
/// SANs, a policy of many prefix lengths) is resolved by trying every selector, as without the index: the index
/// never costs more than that.
#[derive(Debug, Clone, Default)]
struct SubjectIndex {
    /// Every selector, in binding order: the index's numbers are positions in it.
    selectors: Vec<SubjectAt>,
    /// Per [`SelectorField`] (by its position): prefix → the selectors filed under it.
    by_prefix: [HashMap<Box<str>, Vec<usize>>; 7],
    /// Per field: the lengths of its prefixes, ascending, each once (the prefixes of a value to look up).
    lengths: [Vec<usize>; 7],
    /// The selectors with no prefix to file them under.
    everyone: Vec<usize>,
}

/// `(binding index, selector index)`: one selector of one binding.
type SubjectAt = (usize, usize);

/// The bindings that matched an identity and the roles that count.
struct Resolution<'p> {
    /// `(binding index, selector index)` of every matching binding.
    matched: Vec<(usize, usize)>,
    /// Indices of the roles whose grants count, sorted, deduplicated.
    counted: Vec<usize>,
    /// Indices of audit-only roles that are ignored, sorted, deduplicated.
    ignored: Vec<usize>,
    audit_only: bool,
    policy: &'p Policy,
}

// === impl Policy ===

impl Policy {
    /// Parses, validates and compiles a YAML policy. `origin` (usually the
    /// file name) prefixes error messages.
    ///
    /// # Errors
    ///
    /// A [`PolicyError`] naming the origin, line and column of the problem.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Policy, PolicyError> {
        let document = PolicyDocument::parse(text, origin)?;
        Ok(Policy::compile(document, origin))
    }

    /// The `issuer:` patterns of its bindings that match none of `names` (the proxy's `tls.issuers`): such a
    /// selector matches no certificate, most likely by mistake.
    pub fn unknown_issuers<'a>(&'a self, names: &[&str]) -> Vec<&'a str> {
        let mut unknown: Vec<&str> = self
            .bindings
            .iter()
            .flat_map(|b| &b.subjects)
            .filter_map(|s| s.issuer.as_ref())
            .filter(|p| !names.iter().any(|n| p.matches(n)))
            .map(|p| p.as_str())
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        unknown
    }

    /// The issuer names the bindings' subjects name (their `issuer:` patterns as written), sorted, once each.
    pub fn issuer_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .bindings
            .iter()
            .flat_map(|b| &b.subjects)
            .filter_map(|s| s.issuer.as_ref())
            .map(|p| p.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// Whether it has neither roles nor bindings (an empty file, `{}`): it denies every request.
    pub fn is_empty(&self) -> bool {
        self.roles.is_empty() && self.bindings.is_empty()
    }

    /// Reads and compiles the policy file at `path`.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Io`] if the file cannot be read, else as
    /// [`Policy::from_yaml`].
    pub fn load(path: &Path) -> Result<Policy, PolicyError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Io { path: origin.clone(), source })?;
        Policy::from_yaml(&text, &origin)
    }

    /// [`Policy::load`] for a policy to put in force (at start, on reload) or to check for that: an empty one
    /// ([`Policy::is_empty`]) is refused ([`PolicyError::Empty`]).
    ///
    /// # Errors
    ///
    /// As [`Policy::load`], and [`PolicyError::Empty`].
    pub fn load_in_force(path: &Path) -> Result<Policy, PolicyError> {
        match Policy::load(path)? {
            p if p.is_empty() => Err(PolicyError::Empty { path: path.display().to_string() }),
            p => Ok(p),
        }
    }

    /// What an operator should know about a policy that loads: its `audit-only` bindings, which take nothing
    /// away — an identity that only they match is served what its roles would deny (recorded as `would_deny`).
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        // A subject that every client certificate matches grants its role to anyone the client CA signed.
        for (i, b) in self.bindings.iter().enumerate() {
            if let Some((j, fields)) =
                b.subjects.iter().enumerate().find_map(|(j, s)| Some((j, s.matches_everyone_with()?)))
            {
                let carrying = match fields.as_slice() {
                    [] => String::new(),
                    fields => format!(" that has any {}", fields.join(" and any ")),
                };
                warnings.push(format!(
                    "{}: bindings[{i}] (role {:?}, line {}) subjects[{j}] matches every client certificate the \
                     client CA signs{carrying}: is that meant?",
                    self.origin, b.role, b.line
                ));
            }
        }
        // etcd refuses the empty key to every put, get and delete: a rule naming it alone grants nothing.
        for role in self.roles.iter().map(|r| &r.role) {
            for (list, rules) in [("keys", &role.keys), ("deny", &role.deny)] {
                for (i, rule) in rules.iter().enumerate() {
                    if rule.range.is_point() && rule.range.start().is_empty() {
                        warnings.push(format!(
                            "{}: role {:?} {list}[{i}] (line {}) names the empty key, which etcd refuses to store \
                             or read: did you mean `prefix: \"\"` (every key)?",
                            self.origin, role.name, rule.line
                        ));
                    }
                }
            }
        }
        let audit_only: Vec<String> = (self.bindings.iter().enumerate())
            .filter(|(_, b)| b.mode == BindingMode::AuditOnly)
            .map(|(i, b)| format!("bindings[{i}] (role {:?}, line {})", b.role, b.line))
            .collect();
        if audit_only.is_empty() {
            return warnings;
        }
        warnings.push(format!(
            "{}: audit-only {}: an identity that only these match is served what its roles would deny (recorded as \
             decision \"would_deny\"; requests the proxy does not understand are still refused and limits still \
             apply): set mode: enforce once the records show nothing unexpected",
            self.origin,
            audit_only.join(", ")
        ));
        warnings
    }

    /// Compiles a validated document: per role, the union of its grants minus
    /// the union of its own denials, for read and for write. O(n log n).
    pub fn compile(document: PolicyDocument, origin: &str) -> Policy {
        let roles = document
            .roles
            .into_iter()
            .map(|role| CompiledRole {
                read: compile_access(&role, Access::Read),
                write: compile_access(&role, Access::Write),
                role,
            })
            .collect();
        let subjects = SubjectIndex::new(&document.bindings);
        Policy { origin: origin.to_owned(), roles, bindings: document.bindings, subjects }
    }

    /// What `id` may do. Called once per connection; an identity no binding
    /// matches gets empty permissions.
    pub fn permissions_for(&self, id: &Identity) -> Permissions {
        self.permissions_of(&self.resolve(id))
    }

    /// The permissions of the bindings `resolution` found.
    fn permissions_of(&self, resolution: &Resolution<'_>) -> Permissions {
        let names = |indices: &[usize]| {
            let mut names: Vec<String> = indices.iter().map(|&i| self.roles[i].role.name.clone()).collect();
            names.sort_unstable();
            names.dedup();
            names
        };
        let roles = || resolution.counted.iter().map(|&i| &self.roles[i]);
        Permissions {
            roles: names(&resolution.counted),
            read: RangeSet::from_ranges(roles().flat_map(|r| r.read.ranges().cloned())),
            write: RangeSet::from_ranges(roles().flat_map(|r| r.write.ranges().cloned())),
            caps: roles().fold(CapabilitySet::empty(), |caps, r| caps.union(r.role.cluster)),
            audit_only: resolution.audit_only,
            ignored_audit_roles: names(&resolution.ignored),
            limits: Limits::combine(
                resolution
                    .matched
                    .iter()
                    .map(|&(b, _)| &self.bindings[b])
                    .filter(|b| resolution.counted.contains(&b.role_index))
                    .map(|b| b.limits.unwrap_or(self.roles[b.role_index].role.limits)),
            ),
        }
    }

    /// Why nothing is bound to `id`, naming a binding that only its `issuer:` keeps from matching.
    fn no_binding(&self, id: &Identity) -> String {
        match self.near_issuer(id) {
            Some((i, role, issuer)) if issuer.contains('*') => format!(
                "no binding matches this identity as given; bindings[{i}] (role {role:?}) would for a certificate \
                 that chains to a CA whose tls.issuers name matches {issuer:?}: add an --issuer with that name"
            ),
            Some((i, role, issuer)) => format!(
                "no binding matches this identity as given; bindings[{i}] (role {role:?}) would for a certificate \
                 that chains to the CA named {issuer:?} in tls.issuers: add --issuer {issuer}"
            ),
            None => "no binding matches this identity".to_owned(),
        }
    }

    /// A binding that only its `issuer:` keeps from matching `id`: its index, role and issuer pattern.
    fn near_issuer(&self, id: &Identity) -> Option<(usize, &str, &str)> {
        self.bindings.iter().enumerate().find_map(|(i, b)| {
            b.subjects
                .iter()
                .filter(|s| s.issuer.is_some() && super::Selector { issuer: None, ..(*s).clone() }.matches(id))
                .find_map(|s| s.issuer.as_ref())
                .map(|issuer| (i, b.role.as_str(), issuer.as_str()))
        })
    }

    /// Whether some binding's `issuer:` matches the `tls.issuers` name `name`.
    pub fn binds_issuer(&self, name: &str) -> bool {
        self.bindings.iter().flat_map(|b| &b.subjects).filter_map(|s| s.issuer.as_ref()).any(|p| p.matches(name))
    }

    /// Explains the decision on a key request by `id`.
    pub fn explain(&self, id: &Identity, access: Access, range: &KeyRange) -> Explanation {
        let resolution = self.resolve(id);
        let permissions = self.permissions_for(id);
        let decision = permissions.check(access, range);
        let mut reasons = Vec::new();
        match &decision {
            _ if resolution.matched.is_empty() => reasons.push(self.no_binding(id)),
            Ok(()) => self.explain_allow(&resolution, access, range, &mut reasons),
            Err(denied) => {
                reasons.push(denied.reason.clone());
                self.explain_deny(&resolution, &permissions, access, range, &mut reasons);
            }
        }
        Explanation {
            request: format!("{} {}", access, quoted_range(range)),
            allowed: decision.is_ok(),
            audit_only: permissions.audit_only,
            bindings: resolution.describe_bindings(),
            reasons,
        }
    }

    /// Explains the decision on a cluster capability for `id`.
    pub fn explain_capability(&self, id: &Identity, cap: Capability) -> Explanation {
        let resolution = self.resolve(id);
        let mut reasons = Vec::new();
        let granting: Vec<&Role> =
            resolution.counted.iter().map(|&i| &self.roles[i].role).filter(|role| role.cluster.contains(cap)).collect();
        if resolution.matched.is_empty() {
            reasons.push(self.no_binding(id));
        } else if granting.is_empty() {
            reasons.push(format!(
                "capability \"{cap}\" not granted: none of the roles {} grants it",
                resolution.role_list(&resolution.counted)
            ));
        }
        for role in &granting {
            reasons.push(format!("role {:?} grants capability \"{cap}\" (cluster: {})", role.name, role.cluster));
        }
        resolution.note_ignored(&mut reasons);
        Explanation {
            request: format!("capability {cap}"),
            allowed: !granting.is_empty(),
            audit_only: resolution.audit_only,
            bindings: resolution.describe_bindings(),
            reasons,
        }
    }

    /// Everything `id` is granted: its bindings, and the key sets, capabilities and limits its connections get.
    pub fn grants(&self, id: &Identity) -> Grants {
        let resolution = self.resolve(id);
        Grants {
            bindings: resolution.describe_bindings(),
            no_binding: resolution.matched.is_empty().then(|| {
                let why = self.no_binding(id);
                // Denied for certain only when no issuer could change it.
                if self.near_issuer(id).is_some() { why } else { format!("{why}: every request is denied") }
            }),
            permissions: self.permissions_of(&resolution),
        }
    }

    /// The name given to the parser (usually the file path).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The roles, in file order.
    pub fn roles(&self) -> impl ExactSizeIterator<Item = &Role> + '_ {
        self.roles.iter().map(|r| &r.role)
    }

    /// The role named `name`.
    pub fn role(&self, name: &str) -> Option<&Role> {
        self.roles().find(|r| r.name == name)
    }

    /// The bindings, in file order.
    pub fn bindings(&self) -> &[Binding] {
        &self.bindings
    }

    /// Finds the bindings matching `id` and the roles that count.
    fn resolve(&self, id: &Identity) -> Resolution<'_> {
        // As `b.matching_subject(id)` for every binding `b` in order (the first selector that matches), among the
        // selectors that may match.
        let mut matched = match self.subjects.candidates(id) {
            Some(candidates) => candidates,
            None => self.subjects.selectors.clone(),
        };
        matched.retain(|&(b, s)| self.bindings[b].subjects[s].matches(id));
        matched.sort_unstable();
        matched.dedup_by_key(|&mut (b, _)| b);
        let any_enforce = matched.iter().any(|&(i, _)| self.bindings[i].mode == BindingMode::Enforce);
        let mut counted = Vec::new();
        let mut ignored = Vec::new();
        for &(i, _) in &matched {
            let binding = &self.bindings[i];
            if any_enforce && binding.mode == BindingMode::AuditOnly {
                ignored.push(binding.role_index);
            } else {
                counted.push(binding.role_index);
            }
        }
        for list in [&mut counted, &mut ignored] {
            list.sort_unstable();
            list.dedup();
        }
        ignored.retain(|i| counted.binary_search(i).is_err());
        Resolution { audit_only: !matched.is_empty() && !any_enforce, matched, counted, ignored, policy: self }
    }

    /// Reasons for an allowed key request: the role(s) and rule(s) covering it.
    fn explain_allow(&self, resolution: &Resolution<'_>, access: Access, range: &KeyRange, reasons: &mut Vec<String>) {
        let counted = || resolution.counted.iter().map(|&i| &self.roles[i]);
        let covering: Vec<&CompiledRole> = counted().filter(|r| r.set(access).covers(range)).collect();
        if covering.is_empty() {
            let contributing: Vec<&CompiledRole> = counted().filter(|r| r.set(access).intersects(range)).collect();
            let names: Vec<String> = contributing.iter().map(|r| format!("{:?}", r.role.name)).collect();
            reasons.push(format!("no single role covers the request; together the roles {} do", names.join(", ")));
            for role in contributing {
                for (i, rule) in role.role.grants(access) {
                    if rule.range.intersects(range) {
                        reasons.push(format!("role {:?} rule keys[{i}] {rule}", role.role.name));
                    }
                }
            }
            return;
        }
        for role in covering {
            let name = &role.role.name;
            match role.role.grants(access).find(|(_, rule)| rule.range.contains_range(range)) {
                Some((i, rule)) => reasons.push(format!("allowed by role {name:?} rule keys[{i}] {rule}")),
                None => {
                    let rules: Vec<String> = role
                        .role
                        .grants(access)
                        .filter(|(_, rule)| rule.range.intersects(range))
                        .map(|(i, rule)| format!("keys[{i}] {rule}"))
                        .collect();
                    reasons.push(format!("allowed by role {name:?} rules {}", rules.join("; ")));
                }
            }
        }
        resolution.note_ignored(reasons);
    }

    /// Reasons for a denied key request, about its first uncovered key.
    fn explain_deny(
        &self,
        resolution: &Resolution<'_>,
        permissions: &Permissions,
        access: Access,
        range: &KeyRange,
        reasons: &mut Vec<String>,
    ) {
        let Some(key) = permissions.set(access).first_uncovered(range) else {
            return;
        };
        let shown = quoted_key(&key);
        for &index in &resolution.counted {
            let role = &self.roles[index].role;
            let granted: Vec<(usize, &KeyRule)> =
                role.grants(access).filter(|(_, rule)| rule.range.contains_key(&key)).collect();
            let Some((gi, grant)) = granted.first() else {
                reasons.push(format!("role {:?} has no {access} rule for {shown}", role.name));
                continue;
            };
            for (di, deny) in role.denials(access) {
                if deny.range.contains_key(&key) {
                    reasons.push(format!(
                        "role {:?} rule keys[{gi}] {grant} is removed for {shown} by deny[{di}] {deny}",
                        role.name
                    ));
                }
            }
        }
        resolution.note_ignored(reasons);
    }
}

// === impl Permissions ===

impl Permissions {
    /// Permissions that allow nothing.
    pub fn none() -> Permissions {
        Permissions::default()
    }

    /// Whether the permissions allow `access` to every key of `range`.
    /// O(log n); does not allocate when it allows.
    ///
    /// # Errors
    ///
    /// [`Denied`] naming the first key not covered.
    pub fn check(&self, access: Access, range: &KeyRange) -> Result<(), Denied> {
        let set = self.set(access);
        if set.covers(range) {
            return Ok(());
        }
        let key = set.first_uncovered(range).unwrap_or_default();
        let mut reason = format!("no {access} grant covers {}", quoted_key(&key));
        if !range.is_point() {
            reason.push_str(&format!(" (requested {})", quoted_range(range)));
        }
        Err(Denied { reason })
    }

    /// [`Permissions::check`] for one key; does not allocate when it allows.
    ///
    /// # Errors
    ///
    /// [`Denied`] naming the key.
    pub fn check_key(&self, access: Access, key: &[u8]) -> Result<(), Denied> {
        if self.set(access).contains_key(key) { Ok(()) } else { self.check(access, &KeyRange::point(key)) }
    }

    /// Whether the capability is granted.
    pub fn has(&self, cap: Capability) -> bool {
        self.caps.contains(cap)
    }

    /// `Ok` if the capability is granted.
    ///
    /// # Errors
    ///
    /// [`Denied`] with reason `capability "compact" not granted`.
    pub fn check_capability(&self, cap: Capability) -> Result<(), Denied> {
        if self.has(cap) { Ok(()) } else { Err(Denied { reason: format!("capability \"{cap}\" not granted") }) }
    }

    /// Whether failures of [`Permissions::check`] are to be enforced.
    pub fn mode(&self) -> Mode {
        if self.audit_only { Mode::AuditOnly } else { Mode::Enforce }
    }

    /// The key set for `access`.
    pub fn set(&self, access: Access) -> &RangeSet {
        match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        }
    }
}

// === impl Access ===

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

// === impl Mode ===

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Enforce => "enforce",
            Mode::AuditOnly => "audit-only",
        })
    }
}

// === impl Explanation ===

impl fmt::Display for Explanation {
    /// ```text
    /// ALLOW read "/registry/pods/a"
    ///   binding: bindings[0] role "kube-apiserver" via subjects[0] { common_name: "..." }
    ///   allowed by role "kube-apiserver" rule keys[0] prefix "/registry/" readwrite
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "ALLOW" } else { "DENY" };
        write!(f, "{verdict} {}", self.request)?;
        if self.audit_only {
            f.write_str(" (audit-only: not enforced)")?;
        }
        for binding in &self.bindings {
            write!(f, "\n  binding: {binding}")?;
        }
        for reason in &self.reasons {
            write!(f, "\n  {reason}")?;
        }
        Ok(())
    }
}

// === impl Grants ===

impl fmt::Display for Grants {
    /// ```text
    /// binding: bindings[2] role "cilium" via subjects[0] { uri_san: "spiffe://…" } (enforce)
    /// roles: "cilium"
    /// read:
    ///   prefix "cilium/"
    /// write:
    ///   prefix "cilium/"
    /// cluster: status, lease
    ///   status: Maintenance Status, Alarm list, MemberList, gRPC health
    ///   lease: LeaseGrant; revoke, keep-alive, … only for leases whose keys it may write
    /// limits: concurrent_requests 100
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(why) = &self.no_binding {
            return f.write_str(why);
        }
        let p = &self.permissions;
        for binding in &self.bindings {
            writeln!(f, "binding: {binding}")?;
        }
        let roles: Vec<String> = p.roles.iter().map(|r| format!("{r:?}")).collect();
        write!(f, "roles: {}", roles.join(", "))?;
        if p.audit_only {
            f.write_str(
                " (audit-only: what these grants leave out is served and recorded as would_deny; requests the proxy \
                 does not understand, and the limits, are still enforced)",
            )?;
        }
        if !p.ignored_audit_roles.is_empty() {
            let ignored: Vec<String> = p.ignored_audit_roles.iter().map(|r| format!("{r:?}")).collect();
            write!(f, "\nignored: audit-only roles {} (enforce bindings match too)", ignored.join(", "))?;
        }
        for (name, set) in [("read", &p.read), ("write", &p.write)] {
            write!(f, "\n{name}:")?;
            if set.is_empty() {
                f.write_str(" (no keys)")?;
            }
            for range in set.ranges() {
                write!(f, "\n  {}", described_range(range))?;
            }
        }
        write!(f, "\ncluster: {}", p.caps)?;
        for cap in p.caps.iter() {
            write!(f, "\n  {cap}: {}", cap.covers())?;
        }
        f.write_str("\nlimits: ")?;
        let l = &p.limits;
        let limits: Vec<String> = [
            ("concurrent_requests", l.concurrent_requests),
            ("requests_per_second", l.requests_per_second),
            ("burst", l.burst),
            ("open_watches", l.open_watches),
        ]
        .into_iter()
        .filter_map(|(name, value)| value.map(|v| format!("{name} {v}")))
        .collect();
        if limits.is_empty() {
            // Limits::combine: a binding without a limit leaves that field unlimited.
            f.write_str("none for this identity (the proxy-wide limits apply)")
        } else {
            f.write_str(&limits.join(", "))
        }
    }
}

// === impl CompiledRole ===

impl CompiledRole {
    fn set(&self, access: Access) -> &RangeSet {
        match access {
            Access::Read => &self.read,
            Access::Write => &self.write,
        }
    }
}

// === impl SubjectIndex ===

impl SubjectIndex {
    fn new(bindings: &[Binding]) -> SubjectIndex {
        let mut index = SubjectIndex::default();
        for (b, binding) in bindings.iter().enumerate() {
            for (s, selector) in binding.subjects.iter().enumerate() {
                let n = index.selectors.len();
                index.selectors.push((b, s));
                match selector.anchor() {
                    Some((field, prefix)) => {
                        index.by_prefix[field as usize].entry(prefix.into()).or_default().push(n);
                        index.lengths[field as usize].push(prefix.len());
                    }
                    None => index.everyone.push(n),
                }
            }
        }
        for lengths in &mut index.lengths {
            lengths.sort_unstable();
            lengths.dedup();
        }
        index
    }

    /// The selectors that may match `id` (all that match it, and others), each once, in no order; `None` when
    /// finding them would take more lookups than there are selectors (then try them all).
    fn candidates(&self, id: &Identity) -> Option<Vec<SubjectAt>> {
        let fingerprint = (!self.lengths[SelectorField::FingerprintSha256 as usize].is_empty())
            .then(|| normalize_fingerprint(&id.fingerprint_sha256));
        let values = || {
            let cn = id.common_name.iter().map(|cn| (SelectorField::CommonName, cn));
            cn.chain(id.organizations.iter().map(|v| (SelectorField::Organization, v)))
                .chain(id.organizational_units.iter().map(|v| (SelectorField::OrganizationalUnit, v)))
                .chain(id.dns_sans.iter().map(|v| (SelectorField::DnsSan, v)))
                .chain(id.uri_sans.iter().map(|v| (SelectorField::UriSan, v)))
                .chain(id.issuers.iter().map(|v| (SelectorField::Issuer, v)))
                .chain(fingerprint.iter().map(|v| (SelectorField::FingerprintSha256, v)))
        };
        // One lookup per prefix length up to the value's length; each hashes that much of the value.
        let lookups: usize = values()
            .map(|(field, value)| self.lengths[field as usize].partition_point(|&len| len <= value.len()))
            .sum();
        if lookups > self.selectors.len() {
            return None;
        }
        let mut seen = vec![false; self.selectors.len()];
        let mut found: Vec<SubjectAt> = self.everyone.iter().map(|&n| self.selectors[n]).collect();
        for (field, value) in values() {
            let (by_prefix, lengths) = (&self.by_prefix[field as usize], &self.lengths[field as usize]);
            for &len in lengths.iter().take_while(|&&len| len <= value.len()) {
                // A selector filed under a prefix many values share is found once.
                for &n in value.get(..len).and_then(|prefix| by_prefix.get(prefix)).into_iter().flatten() {
                    if !std::mem::replace(&mut seen[n], true) {
                        found.push(self.selectors[n]);
                    }
                }
            }
        }
        Some(found)
    }
}

// === impl Resolution ===

impl Resolution<'_> {
    fn describe_bindings(&self) -> Vec<String> {
        self.matched
            .iter()
            .map(|&(i, s)| {
                let binding = &self.policy.bindings[i];
                let ignored = if binding.mode == BindingMode::AuditOnly && !self.audit_only {
                    ", ignored: enforce bindings match too"
                } else {
                    ""
                };
                format!(
                    "bindings[{i}] role {:?} via subjects[{s}] {} ({}{ignored})",
                    binding.role, binding.subjects[s], binding.mode
                )
            })
            .collect()
    }

    fn role_list(&self, indices: &[usize]) -> String {
        indices.iter().map(|&i| format!("{:?}", self.policy.roles[i].role.name)).collect::<Vec<_>>().join(", ")
    }

    fn note_ignored(&self, reasons: &mut Vec<String>) {
        if !self.ignored.is_empty() {
            reasons.push(format!(
                "audit-only roles {} are ignored because enforce bindings match",
                self.role_list(&self.ignored)
            ));
        }
    }
}

// === helpers ===

/// The role's keys for `access`: its grants minus its own denials.
fn compile_access(role: &Role, access: Access) -> RangeSet {
    let grants = RangeSet::from_ranges(role.grants(access).map(|(_, r)| r.range.clone()));
    let mut denials = role.denials(access).peekable();
    if denials.peek().is_none() {
        return grants;
    }
    grants.subtract(&RangeSet::from_ranges(denials.map(|(_, r)| r.range.clone())))
}

/// A range as a policy would name it: `"key"`, `prefix "app/"`, `every key`, else `[from, to)`.
fn described_range(range: &KeyRange) -> String {
    match range.end() {
        End::Unbounded if range.start().is_empty() => "every key".to_owned(),
        end if !range.start().is_empty() && *end == prefix_end(range.start()) => {
            format!("prefix {}", quoted_key(range.start()))
        }
        _ => quoted_range(range),
    }
}

/// A range for messages: a point as `"key"`, else `[start, end)` unquoted.
fn quoted_range(range: &KeyRange) -> String {
    if range.is_point() { quoted_key(range.start()) } else { range.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::range::End;

    #[test]
    fn an_empty_policy_is_not_put_in_force() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("p.yaml");
        for empty in ["", "{}\n", "# nothing yet\n", "roles: []\nbindings: []\n"] {
            std::fs::write(&path, empty)?;
            assert!(Policy::load(&path)?.is_empty(), "{empty:?}");
            assert!(matches!(Policy::load_in_force(&path), Err(PolicyError::Empty { .. })), "{empty:?}");
        }
        // Denying everyone on purpose: a role, no bindings.
        std::fs::write(&path, "roles: [ { name: nobody } ]\n")?;
        assert!(!Policy::load_in_force(&path)?.is_empty());
        Ok(())
    }

    #[test]
    fn grants_name_ranges_as_a_policy_would() -> Result<(), crate::policy::RangeError> {
        assert_eq!(described_range(&KeyRange::all()), "every key");
        assert_eq!(described_range(&KeyRange::prefix(b"app/".to_vec())), "prefix \"app/\"");
        assert_eq!(described_range(&KeyRange::prefix(b"a\xff".to_vec())), "prefix \"a\\xff\"");
        assert_eq!(described_range(&KeyRange::point(b"app/x".to_vec())), "\"app/x\"");
        assert_eq!(described_range(&KeyRange::new(b"a".to_vec(), End::Key(b"c".to_vec()))?), "[a, c)");
        assert_eq!(described_range(&KeyRange::new(b"a".to_vec(), End::Unbounded)?), "[a, +inf)");
        Ok(())
    }

    const EXAMPLE: &str = r#"
roles:
  - name: kube-apiserver
    keys:
      - { prefix: "/registry/", access: readwrite }
      - { key: "compact_rev_key", access: readwrite }
    cluster: [status, lease, compact]
  - name: cilium
    keys:
      - { prefix: "cilium/", access: readwrite }
    cluster: [lease]
  - name: monitoring
    keys:
      - { prefix: "/registry/", access: read }
      - { range: { from: "a", to: "b" }, access: read }
    deny:
      - { prefix: "/registry/secrets/" }
    cluster: [status]
  - name: admin
    keys:
      - { prefix: "", access: readwrite }
    cluster: [admin]
bindings:
  - role: kube-apiserver
    subjects: [ { common_name: "kube-apiserver-etcd-client" } ]
  - role: cilium
    subjects: [ { common_name: "cilium-*" } ]
  - role: monitoring
    subjects: [ { organization: "monitoring" }, { uri_san: "spiffe://cluster.local/ns/*/sa/prometheus" } ]
  - role: admin
    subjects: [ { organization: "system:masters", common_name: "root" } ]
"#;

    fn example() -> Policy {
        Policy::from_yaml(EXAMPLE, "example.yaml").expect("example policy is valid")
    }

    fn cn(name: &str) -> Identity {
        Identity { common_name: Some(name.to_owned()), ..Identity::default() }
    }

    #[test]
    fn an_issuer_in_a_selector_requires_the_certificate_to_chain_to_that_ca() -> Result<(), PolicyError> {
        let p = Policy::from_yaml(
            "roles: [ { name: r, keys: [ { prefix: a/, access: read } ] } ]\n\
             bindings:\n  - role: r\n    subjects: [ { common_name: x, issuer: etcd }, { issuer: \"mon*\" } ]\n",
            "p.yaml",
        )?;
        let with = |issuers: &[&str]| Identity { issuers: issuers.iter().map(|s| s.to_string()).collect(), ..cn("x") };
        assert!(p.permissions_for(&with(&["etcd"])).roles.contains(&"r".to_string()));
        assert!(p.permissions_for(&with(&["components", "etcd"])).roles.contains(&"r".to_string()));
        assert!(p.permissions_for(&with(&[])).roles.is_empty(), "the CN alone");
        assert!(p.permissions_for(&with(&["components"])).roles.is_empty());
        assert!(p.permissions_for(&Identity { common_name: None, ..with(&["monitoring"]) }).roles.len() == 1);
        assert_eq!(p.unknown_issuers(&["etcd", "monitoring"]), Vec::<&str>::new());
        assert_eq!(p.unknown_issuers(&["etcd"]), ["mon*"]);
        assert_eq!(p.unknown_issuers(&[]), ["etcd", "mon*"]);
        let why = p.explain(&cn("x"), Access::Read, &point("a/1")).reasons.join(" ");
        let near =
            r#"bindings[0] (role "r") would for a certificate that chains to the CA named "etcd" in tls.issuers"#;
        assert!(why.contains(near) && why.ends_with("add --issuer etcd"), "{why}");
        // A pattern is not a name to pass.
        let why = p.explain(&Identity { common_name: None, ..cn("x") }, Access::Read, &point("a/1")).reasons.join(" ");
        assert!(why.contains(r#"chains to a CA whose tls.issuers name matches "mon*": add an --issuer"#), "{why}");
        Ok(())
    }

    fn point(key: &str) -> KeyRange {
        KeyRange::point(key)
    }

    fn range(from: &str, to: &str) -> KeyRange {
        KeyRange::new(from, End::Key(to.as_bytes().to_vec())).expect("valid test range")
    }

    fn allowed(p: &Permissions, access: Access, r: &KeyRange) -> bool {
        p.check(access, r).is_ok()
    }

    #[test]
    fn kube_apiserver() {
        let p = example().permissions_for(&cn("kube-apiserver-etcd-client"));
        assert_eq!(p.roles, ["kube-apiserver"]);
        assert_eq!(p.mode(), Mode::Enforce);
        assert!(allowed(&p, Access::Write, &point("/registry/pods/default/a")));
        assert!(allowed(&p, Access::Read, &KeyRange::prefix("/registry/")));
        assert!(allowed(&p, Access::Write, &point("compact_rev_key")));
        assert!(!allowed(&p, Access::Read, &point("/registry")));
        assert!(!allowed(&p, Access::Write, &point("compact_rev_key2")));
        assert!(!allowed(&p, Access::Read, &point("cilium/x")));
        assert!(p.has(Capability::Compact) && p.has(Capability::Lease));
        assert!(!p.has(Capability::Defragment));
        assert_eq!(
            p.check_capability(Capability::Defragment),
            Err(Denied { reason: "capability \"defragment\" not granted".to_owned() })
        );
    }

    #[test]
    fn cilium_prefix_is_byte_exact() {
        let p = example().permissions_for(&cn("cilium-agent"));
        assert_eq!(p.roles, ["cilium"]);
        assert!(allowed(&p, Access::Write, &point("cilium/state/nodes/v1/n1")));
        assert!(allowed(&p, Access::Read, &KeyRange::prefix("cilium/state/")));
        assert_eq!(
            p.check(Access::Write, &point("cilium0")),
            Err(Denied { reason: "no write grant covers \"cilium0\"".to_owned() })
        );
        assert!(!allowed(&p, Access::Read, &point("cilium")));
        let too_wide = KeyRange::from_etcd(b"cilium/", b"cilium0\x00").expect("valid");
        assert_eq!(
            p.check(Access::Read, &too_wide).map_err(|d| d.reason),
            Err("no read grant covers \"cilium0\" (requested [cilium/, cilium0\\x00))".to_owned())
        );
    }

    #[test]
    fn monitoring_deny_secrets() {
        let policy = example();
        let by_org = Identity { organizations: vec!["monitoring".to_owned()], ..Identity::default() };
        let by_uri = Identity {
            uri_sans: vec!["spiffe://cluster.local/ns/mon/sa/prometheus".to_owned()],
            ..Identity::default()
        };
        for id in [by_org, by_uri] {
            let p = policy.permissions_for(&id);
            assert_eq!(p.roles, ["monitoring"]);
            assert!(allowed(&p, Access::Read, &point("/registry/pods/a")));
            assert!(allowed(&p, Access::Read, &point("/registry/secrets")));
            assert!(!allowed(&p, Access::Read, &point("/registry/secrets/kube-system/token")));
            assert!(!allowed(&p, Access::Read, &KeyRange::prefix("/registry/")));
            assert!(!allowed(&p, Access::Write, &point("/registry/pods/a")));
            assert!(allowed(&p, Access::Read, &range("a", "b")));
            assert!(allowed(&p, Access::Read, &point("a\u{7f}")));
            assert!(!allowed(&p, Access::Read, &point("b")));
            assert!(p.has(Capability::Status));
            assert!(!p.has(Capability::Lease));
        }
    }

    #[test]
    fn admin_has_everything_and_unbound_has_nothing() {
        let policy = example();
        let root = Identity {
            common_name: Some("root".to_owned()),
            organizations: vec!["system:masters".to_owned()],
            ..Identity::default()
        };
        let p = policy.permissions_for(&root);
        assert_eq!(p.roles, ["admin"]);
        assert!(allowed(&p, Access::Write, &KeyRange::all()));
        assert!(allowed(&p, Access::Read, &point("")));
        assert!(Capability::ALL.iter().all(|&c| p.has(c)));
        // The admin selector needs both fields.
        let p = policy.permissions_for(&cn("root"));
        assert!(p.roles.is_empty());
        assert!(!allowed(&p, Access::Read, &point("a")));
        let nobody = policy.permissions_for(&Identity::default());
        assert_eq!(nobody, Permissions::none());
        assert_eq!(nobody.mode(), Mode::Enforce);
        assert!(Capability::ALL.iter().all(|&c| !nobody.has(c)));
    }

    const TWO_ROLES: &str = r#"
roles:
  - name: a
    keys:
      - { prefix: "/registry/", access: read }
    deny:
      - { prefix: "/registry/secrets/", access: read }
  - name: b
    keys:
      - { prefix: "/registry/secrets/", access: read }
  - name: low
    keys:
      - { range: { from: "k/a", to: "k/m" }, access: write }
  - name: high
    keys:
      - { range: { from: "k/m", to: "k/z" }, access: write }
bindings:
  - { role: a, subjects: [ { organization: a } ] }
  - { role: b, subjects: [ { organization: b } ] }
  - { role: low, subjects: [ { organization: split } ] }
  - { role: high, subjects: [ { organization: split } ] }
"#;

    fn org(names: &[&str]) -> Identity {
        Identity { organizations: names.iter().map(|s| (*s).to_owned()).collect(), ..Identity::default() }
    }

    #[test]
    fn deny_subtracts_from_its_own_role_only() {
        let policy = Policy::from_yaml(TWO_ROLES, "two.yaml").expect("valid");
        let secret = point("/registry/secrets/ns/s");
        let only_a = policy.permissions_for(&org(&["a"]));
        assert!(!allowed(&only_a, Access::Read, &secret));
        assert!(allowed(&only_a, Access::Read, &point("/registry/pods/x")));
        let both = policy.permissions_for(&org(&["a", "b"]));
        assert_eq!(both.roles, ["a", "b"]);
        assert!(allowed(&both, Access::Read, &secret));
        assert!(allowed(&both, Access::Read, &KeyRange::prefix("/registry/")));

        let explanation = policy.explain(&org(&["a"]), Access::Read, &secret);
        assert!(!explanation.allowed);
        let text = explanation.to_string();
        assert!(text.starts_with("DENY read \"/registry/secrets/ns/s\""), "{text}");
        assert!(
            text.contains("role \"a\" rule keys[0] prefix \"/registry/\" read is removed for \"/registry/secrets/ns/s\" by deny[0] prefix \"/registry/secrets/\" read"),
            "{text}"
        );
        let text = policy.explain(&org(&["a", "b"]), Access::Read, &secret).to_string();
        assert!(text.starts_with("ALLOW"), "{text}");
        assert!(text.contains("allowed by role \"b\" rule keys[0] prefix \"/registry/secrets/\" read"), "{text}");
    }

    #[test]
    fn union_across_roles_covers_what_no_single_role_does() {
        let policy = Policy::from_yaml(TWO_ROLES, "two.yaml").expect("valid");
        let id = org(&["split"]);
        let p = policy.permissions_for(&id);
        let wide = range("k/c", "k/x");
        assert!(allowed(&p, Access::Write, &wide));
        assert!(!allowed(&p, Access::Write, &range("k/c", "k/z\x00")));
        assert!(!allowed(&p, Access::Read, &wide));
        let text = policy.explain(&id, Access::Write, &wide).to_string();
        assert!(text.starts_with("ALLOW write [k/c, k/x)"), "{text}");
        assert!(text.contains("no single role covers the request; together the roles \"low\", \"high\" do"), "{text}");
        assert!(text.contains("role \"low\" rule keys[0] range from \"k/a\" to \"k/m\" write"), "{text}");
        assert!(text.contains("role \"high\" rule keys[0] range from \"k/m\" to \"k/z\" write"), "{text}");
        let text = policy.explain(&id, Access::Write, &range("k/c", "k/z\x00")).to_string();
        assert!(text.contains("no write grant covers \"k/z\""), "{text}");
        assert!(text.contains("role \"low\" has no write rule for \"k/z\""), "{text}");
    }

    #[test]
    fn explain_bindings_and_capabilities() {
        let policy = example();
        let id = cn("kube-apiserver-etcd-client");
        let e = policy.explain(&id, Access::Write, &point("/registry/pods/a"));
        assert!(e.allowed);
        assert_eq!(
            e.bindings,
            [
                "bindings[0] role \"kube-apiserver\" via subjects[0] { common_name: \"kube-apiserver-etcd-client\" } (enforce)"
            ]
        );
        assert_eq!(e.reasons, ["allowed by role \"kube-apiserver\" rule keys[0] prefix \"/registry/\" readwrite"]);
        let e = policy.explain(&cn("stranger"), Access::Read, &point("a"));
        assert!(!e.allowed);
        assert_eq!(e.to_string(), "DENY read \"a\"\n  no binding matches this identity");

        let e = policy.explain_capability(&id, Capability::Compact);
        assert!(e.allowed);
        assert_eq!(
            e.reasons,
            ["role \"kube-apiserver\" grants capability \"compact\" (cluster: status, lease, compact)"]
        );
        let e = policy.explain_capability(&id, Capability::Defragment);
        assert!(!e.allowed);
        assert_eq!(
            e.reasons,
            ["capability \"defragment\" not granted: none of the roles \"kube-apiserver\" grants it"]
        );
        assert!(e.to_string().starts_with("DENY capability defragment\n"));
        assert!(!policy.explain_capability(&cn("x"), Capability::Status).allowed);
    }

    /// A rule for the empty key alone grants nothing etcd would serve: warned about where warnings are.
    #[test]
    fn a_rule_for_the_empty_key_is_warned_about() -> Result<(), PolicyError> {
        let p = Policy::from_yaml("roles: [ { name: r, keys: [ { key: \"\", access: read } ] } ]\n", "p.yaml")?;
        let warnings = p.warnings();
        assert!(
            warnings.iter().any(|w| w.contains(r#"role "r" keys[0] (line 1) names the empty key"#)),
            "{warnings:?}"
        );
        let p = Policy::from_yaml("roles: [ { name: r, keys: [ { prefix: \"\", access: read } ] } ]\n", "p.yaml")?;
        assert!(p.warnings().is_empty());
        Ok(())
    }

    /// What `serve`, `config check` and `policy validate` warn about: bindings any client certificate matches, and
    /// audit-only bindings.
    #[test]
    fn warnings_name_bindings_everyone_matches_and_audit_only_ones() {
        let yaml = r#"
roles:
  - { name: wide, keys: [ { prefix: "", access: readwrite } ] }
  - { name: narrow, keys: [ { prefix: "app/", access: read } ] }
bindings:
  - { role: narrow, subjects: [ { common_name: "app" }, { common_name: "**" } ] }
  - { role: wide, mode: audit-only, subjects: [ { common_name: "app-*" } ] }
  - { role: narrow, subjects: [ { common_name: "*", organization: "ops" }, { common_name: "*", issuer: "x" } ] }
  - { role: narrow, subjects: [ { uri_san: "spiffe://*" }, { uri_san: "*" } ] }
  - { role: narrow, subjects: [ { common_name: "*", issuer: "*", organization: "**" } ] }
"#;
        let policy = Policy::from_yaml(yaml, "w.yaml").expect("valid");
        let warnings = policy.warnings();
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(
            warnings[0].contains("bindings[0]")
                && warnings[0].contains("subjects[1] matches every client certificate the client CA signs: is"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("bindings[3]")
                && warnings[1].contains("subjects[1] matches every")
                && warnings[1].contains("signs that has any uri_san:"),
            "{warnings:?}"
        );
        assert!(
            warnings[2].contains("bindings[4]") && warnings[2].contains("that has any organization and any issuer:"),
            "{warnings:?}"
        );
        assert!(warnings[3].contains("audit-only bindings[1] (role \"wide\""), "{warnings:?}");
        let quiet = Policy::from_yaml(
            "roles: [ { name: r } ]\nbindings: [ { role: r, subjects: [ { common_name: a } ] } ]\n",
            "q.yaml",
        );
        assert_eq!(quiet.expect("valid").warnings(), Vec::<String>::new());
    }

    #[test]
    fn audit_only_bindings() {
        let yaml = r#"
roles:
  - { name: wide, keys: [ { prefix: "", access: readwrite } ] }
  - { name: narrow, keys: [ { prefix: "app/", access: read } ] }
bindings:
  - { role: wide, mode: audit-only, subjects: [ { common_name: "*" } ] }
  - { role: narrow, subjects: [ { common_name: "app" } ] }
"#;
        let policy = Policy::from_yaml(yaml, "audit.yaml").expect("valid");
        // Only audit-only bindings match: audit mode, grants from them.
        let p = policy.permissions_for(&cn("other"));
        assert!(p.audit_only);
        assert_eq!(p.mode(), Mode::AuditOnly);
        assert_eq!(p.roles, ["wide"]);
        assert!(allowed(&p, Access::Write, &point("x")));
        // A mix: the enforce binding's grants are what count.
        let p = policy.permissions_for(&cn("app"));
        assert_eq!(p.mode(), Mode::Enforce);
        assert_eq!(p.roles, ["narrow"]);
        assert_eq!(p.ignored_audit_roles, ["wide"]);
        assert!(allowed(&p, Access::Read, &point("app/x")));
        assert!(!allowed(&p, Access::Write, &point("app/x")));
        let text = policy.explain(&cn("app"), Access::Write, &point("app/x")).to_string();
        assert!(text.contains("(audit-only, ignored: enforce bindings match too)"), "{text}");
        assert!(text.contains("audit-only roles \"wide\" are ignored"), "{text}");
        let text = policy.explain(&cn("other"), Access::Write, &point("x")).to_string();
        assert!(text.starts_with("ALLOW write \"x\" (audit-only: not enforced)"), "{text}");
    }

    #[test]
    fn load_reports_io_errors_with_path() {
        let err = Policy::load(Path::new("/nonexistent/policy.yaml")).expect_err("missing file");
        assert!(err.to_string().starts_with("/nonexistent/policy.yaml: cannot read policy file"), "{err}");
    }

    /// 10,000 roles with 10 rules each (100,000 key rules) and 10,000 bindings.
    #[test]
    fn large_policy_loads() {
        use std::fmt::Write as _;
        let mut yaml = String::from("roles:\n");
        for r in 0..10_000 {
            let _ = writeln!(yaml, "  - name: role{r}\n    keys:");
            for k in 0..10 {
                let _ = writeln!(yaml, "      - {{ prefix: \"/t{r}/k{k}/\", access: readwrite }}");
            }
            let _ = writeln!(yaml, "    deny: [ {{ key: \"/t{r}/k0/secret\" }} ]\n    cluster: [status]");
        }
        yaml.push_str("bindings:\n");
        for r in 0..10_000 {
            let _ = writeln!(yaml, "  - {{ role: role{r}, subjects: [ {{ common_name: \"client{r}-*\" }} ] }}");
        }
        let started = std::time::Instant::now();
        let policy = Policy::from_yaml(&yaml, "large.yaml").expect("large policy is valid");
        let elapsed = started.elapsed();
        assert_eq!(policy.roles().len(), 10_000);
        assert_eq!(policy.bindings().len(), 10_000);
        let p = policy.permissions_for(&cn("client9999-a"));
        assert_eq!(p.roles, ["role9999"]);
        assert!(allowed(&p, Access::Write, &point("/t9999/k3/x")));
        assert!(!allowed(&p, Access::Read, &point("/t9999/k0/secret")));
        assert!(!allowed(&p, Access::Read, &point("/t9998/k3/x")));
        // Generous: debug builds are slow and the machine may be busy.
        assert!(elapsed.as_secs() < 60, "loading took {elapsed:?}");
    }

    mod subject_index {
        use super::*;
        use proptest::prelude::*;

        const FIELDS: [&str; 6] =
            ["common_name", "organization", "organizational_unit", "dns_san", "uri_san", "issuer"];
        const FINGERPRINTS: [&str; 2] = [
            "ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89:ab:cd:ef:01:23:45:67:89",
            "0000000000000000000000000000000000000000000000000000000000000001",
        ];

        /// A selector: some of the fields, with and without `*`, over a small alphabet, and maybe a fingerprint.
        fn selector() -> impl Strategy<Value = String> {
            let pattern = prop::sample::select(vec![
                "a", "b", "ab", "a*", "*b", "*", "a*b", "**", "ab*", "b*a", "aa*", "é*", "aé", "😀*", "€a*", "a*é*",
            ]);
            (prop::collection::btree_map(0..FIELDS.len(), pattern, 0..4), prop::option::of(0..FINGERPRINTS.len()))
                .prop_filter("a selector names a field", |(fields, fp)| !fields.is_empty() || fp.is_some())
                .prop_map(|(fields, fp)| {
                    let mut parts: Vec<String> =
                        fields.into_iter().map(|(f, p)| format!("{}: \"{p}\"", FIELDS[f])).collect();
                    parts.extend(fp.map(|i| format!("fingerprint_sha256: \"{}\"", FINGERPRINTS[i])));
                    format!("{{ {} }}", parts.join(", "))
                })
        }

        fn identity() -> impl Strategy<Value = Identity> {
            let value = || {
                prop::sample::select(vec!["a", "b", "ab", "aab", "", "ba", "é", "aé", "😀a", "€ab", "aéé"])
                    .prop_map(str::to_owned)
            };
            let values = move || prop::collection::vec(value(), 0..3);
            let fingerprint = prop::sample::select(vec![
                "abcdef0123456789abcdef0123456789abcdef0123456789abcdef0123456789",
                "ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789ABCDEF0123456789",
                "0000000000000000000000000000000000000000000000000000000000000001",
                "ff",
            ]);
            (prop::option::of(value()), values(), values(), values(), values(), values(), fingerprint).prop_map(
                |(common_name, organizations, organizational_units, dns_sans, uri_sans, issuers, fp)| Identity {
                    common_name,
                    organizations,
                    organizational_units,
                    dns_sans,
                    uri_sans,
                    issuers,
                    fingerprint_sha256: fp.to_owned(),
                    ..Identity::default()
                },
            )
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]

            /// The index finds exactly the bindings, and each one's first matching selector, that trying every
            /// binding in order finds.
            #[test]
            fn resolving_through_the_index_matches_trying_every_binding(
                bindings in prop::collection::vec(prop::collection::vec(selector(), 1..4), 1..10),
                id in identity(),
            ) {
                let mut yaml = String::from("roles: [ { name: r, keys: [ { prefix: \"x/\", access: read } ] } ]\nbindings:\n");
                for subjects in &bindings {
                    yaml.push_str(&format!("  - {{ role: r, subjects: [ {} ] }}\n", subjects.join(", ")));
                }
                let policy = Policy::from_yaml(&yaml, "index.yaml");
                prop_assert!(policy.is_ok(), "{yaml}: {policy:?}");
                let Ok(policy) = policy else { return Ok(()) };
                let every: Vec<(usize, usize)> = policy
                    .bindings
                    .iter()
                    .enumerate()
                    .filter_map(|(i, b)| b.matching_subject(&id).map(|s| (i, s)))
                    .collect();
                prop_assert_eq!(policy.resolve(&id).matched, every, "{}", yaml);
            }
        }

        #[test]
        fn selectors_are_filed_under_their_most_selective_prefix() -> Result<(), PolicyError> {
            let policy = Policy::from_yaml(
                r#"
roles: [ { name: r } ]
bindings:
  - role: r
    subjects:
      - { common_name: "node-*", organization: "system:nodes" }
      - { common_name: "*", organizational_unit: "*" }
      - { uri_san: "spiffe://cluster.local/ns/kube-system/sa/*" }
      - { uri_san: "spiffe://cluster.local/ns/*", common_name: "node-1" }
"#,
                "filed.yaml",
            )?;
            let index = &policy.subjects;
            assert_eq!(index.selectors, vec![(0, 0), (0, 1), (0, 2), (0, 3)]);
            assert_eq!(index.everyone, vec![1]);
            // Without `*` first (a longer prefix of another field notwithstanding), then the longest prefix.
            let filed = |field: SelectorField, prefix: &str| index.by_prefix[field as usize].get(prefix).cloned();
            assert_eq!(filed(SelectorField::Organization, "system:nodes"), Some(vec![0]));
            assert_eq!(filed(SelectorField::CommonName, "node-1"), Some(vec![3]));
            let spiffe = "spiffe://cluster.local/ns/kube-system/sa/";
            assert_eq!(filed(SelectorField::UriSan, spiffe), Some(vec![2]));
            assert_eq!(index.lengths[SelectorField::UriSan as usize], vec![spiffe.len()]);
            // A URI SAN under the prefix finds it; another is not tried.
            let cilium = Identity { uri_sans: vec![format!("{spiffe}cilium")], ..Identity::default() };
            assert_eq!(index.candidates(&cilium), Some(vec![(0, 1), (0, 2)]));
            let other = Identity { uri_sans: vec!["spiffe://cluster.local/ns/default/sa/x".into()], ..cilium.clone() };
            assert_eq!(index.candidates(&other), Some(vec![(0, 1)]));
            // Many values under one prefix find its selectors once.
            let many = Identity { uri_sans: (0..3).map(|i| format!("{spiffe}{i}")).collect(), ..Identity::default() };
            assert_eq!(index.candidates(&many), Some(vec![(0, 1), (0, 2)]));
            Ok(())
        }

        #[test]
        fn an_identity_with_more_lookups_than_selectors_is_resolved_by_trying_them_all() -> Result<(), PolicyError> {
            let policy = Policy::from_yaml(
                r#"
roles: [ { name: a }, { name: b } ]
bindings:
  - { role: a, subjects: [ { uri_san: "spiffe://x/ns/*" } ] }
  - { role: b, subjects: [ { uri_san: "spiffe://x/ns/b/*" }, { dns_san: "*.example" } ] }
"#,
                "many.yaml",
            )?;
            let id = Identity {
                uri_sans: (0..10).map(|i| format!("spiffe://x/ns/{i}")).chain(["spiffe://x/ns/b/y".into()]).collect(),
                ..Identity::default()
            };
            assert_eq!(policy.subjects.candidates(&id), None);
            assert_eq!(policy.resolve(&id).matched, vec![(0, 0), (1, 0)]);
            Ok(())
        }
    }
}
