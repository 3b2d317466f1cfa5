//! What each request needs, RPC by RPC.
//!
//! Pure functions from a *decoded* request message to the list of permissions it needs ([`Needs`]). Nothing here
//! looks at a policy or does I/O: [`crate::service`] evaluates the needs against the caller's permissions (and asks
//! etcd which keys are attached to a lease where a need says so), and the audit log records them.
//!
//! The rules follow what etcd itself checks (see `shared/notes/etcd-semantics.md` §1), made stricter where etcd
//! had authorization bugs: nested transactions, puts with `prev_kv` or a lease inside transactions, leases,
//! maintenance and cluster RPCs, Lock/Election.

use etcd_guard_proto::etcdserverpb::{
    self as pb, AlarmType, alarm_request::AlarmAction, compare, downgrade_request::DowngradeAction, range_request,
    request_op, watch_create_request::FilterType, watch_request,
};
use etcd_guard_proto::{v3electionpb, v3lockpb};
use tonic::Status;

use crate::policy::{Access, Capability, KeyRange, RangeSet};

/// How deep transactions may nest. etcd has no limit of its own beyond the message size; kube-apiserver never
/// nests. Deeper requests are denied.
pub const MAX_TXN_DEPTH: usize = 16;

/// How many operations one transaction may run by default (`limits.max_txn_ops`; etcd's default
/// `--max-txn-ops`), counted over the branches it may take at every level: etcd bounds each level's lists only, so
/// a few kilobytes of nested transactions could make it run tens of thousands of ranges into one answer (gigabytes:
/// etcd 3.4 and 3.5 run out of memory, and with a put inside, again at every restart, since the request is in the
/// raft log).
pub const MAX_TXN_OPS: usize = 128;

/// One permission a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need {
    /// Read (or write) access to every key in the range.
    Key(Access, KeyRange),
    /// A cluster capability.
    Cap(Capability),
    /// Every cluster capability (`admin` in the policy).
    Admin,
    /// Access to every key that is attached to this lease right now (etcd is asked).
    LeaseKeys(Access, i64),
    /// The request can never be allowed (malformed range, too deep, a field the proxy does not understand).
    Never(&'static str),
}

/// Everything one request needs. Empty means "no permission needed" (as in etcd: watch cancel and progress
/// requests, a transaction without compares or operations) — beyond being bound to some role.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Needs(pub Vec<Need>);

/// etcd's own answer for a request without a key, checked before authorization as etcd does.
pub fn err_empty_key() -> Status {
    Status::invalid_argument("etcdserver: key is not provided")
}

// === impl Needs ===

impl Needs {
    fn push(&mut self, need: Need) {
        self.0.push(need);
    }

    fn key(&mut self, access: Access, key: &[u8], range_end: &[u8]) {
        match KeyRange::from_etcd(key, range_end) {
            Ok(range) => self.push(Need::Key(access, range)),
            Err(_) => self.push(Need::Never("inverted key range")),
        }
    }

    fn cap(cap: Capability) -> Needs {
        Needs(vec![Need::Cap(cap)])
    }
}

// === KV ===

/// Range and RangeStream: read on the interval, whatever `limit`, `count_only`, `keys_only` or revisions say.
pub fn range(r: &pb::RangeRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    add_range(&mut needs, r)?;
    Ok(needs)
}

/// Put: write on the key; read too with `prev_kv`; with a lease, `lease` and write on the lease's keys.
pub fn put(r: &pb::PutRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    add_put(&mut needs, r)?;
    Ok(needs)
}

/// DeleteRange: write on the interval; read too with `prev_kv`.
pub fn delete_range(r: &pb::DeleteRangeRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    add_delete(&mut needs, r)?;
    Ok(needs)
}

/// Txn: read on every compare, and every op of *both* branches like its own RPC, recursively.
///
/// Refused as etcd refuses them, before any permission is looked at: more than `max_ops` operations (etcd's
/// `--max-txn-ops`, [`MAX_TXN_OPS`] by default), or compares, on the way through the transaction (`txn_cost`), and a put with `ignore_value` or `ignore_lease` on a key that a
/// delete of the same branch covers (`deletes_ignore_put`).
pub fn txn(r: &pb::TxnRequest, max_ops: usize) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    add_txn(&mut needs, r, 1)?;
    let cost = txn_cost(r, 1);
    if cost.ops > max_ops || cost.compares > max_ops {
        return Err(Status::invalid_argument("etcdserver: too many operations in txn request"));
    }
    if deletes_ignore_put(&r.success) || deletes_ignore_put(&r.failure) {
        return Err(Status::invalid_argument("etcdserver: duplicate key given in txn request"));
    }
    Ok(needs)
}

/// The most operations etcd may run for `r`, and the most compares, each along the way it may take: at each level
/// the costlier branch, a nested transaction counting what it may run itself; its compares run besides. Past
/// [`MAX_TXN_DEPTH`] the count stops (such a request is refused anyway).
fn txn_cost(r: &pb::TxnRequest, depth: usize) -> TxnCost {
    let branch = |ops: &[pb::RequestOp]| -> TxnCost {
        ops.iter()
            .map(|op| match &op.request {
                Some(request_op::Request::RequestTxn(t)) if depth < MAX_TXN_DEPTH => {
                    let nested = txn_cost(t, depth + 1);
                    TxnCost { ops: nested.ops.max(1), compares: nested.compares }
                }
                _ => TxnCost { ops: 1, compares: 0 },
            })
            .fold(TxnCost::default(), |a, b| TxnCost {
                ops: a.ops.saturating_add(b.ops),
                compares: a.compares.saturating_add(b.compares),
            })
    };
    let (success, failure) = (branch(&r.success), branch(&r.failure));
    TxnCost {
        ops: success.ops.max(failure.ops),
        compares: r.compare.len().saturating_add(success.compares.max(failure.compares)),
    }
}

/// What a transaction may make etcd run ([`txn_cost`]).
#[derive(Debug, Default, Clone, Copy)]
struct TxnCost {
    ops: usize,
    compares: usize,
}

/// Whether a put with `ignore_value` or `ignore_lease` in `ops` (or in a transaction nested there) is on a key that
/// a delete there covers. etcd refuses a put and a delete of one key in a transaction ("duplicate key"), but its
/// check reads a delete's `range_end` of `"\0"` (to the end of the keyspace) as an empty interval: it lets such a
/// pair through, and when the delete runs first, the put finds no previous value to keep and etcd 3.4 and 3.5
/// panic applying it — on every member, and again at every restart. Any role with write access to the end of the
/// keyspace could do that; this check is the one etcd meant to make, for the puts that crash it.
fn deletes_ignore_put(ops: &[pb::RequestOp]) -> bool {
    let mut deletes = Vec::new();
    let mut puts = Vec::new();
    collect_deletes_and_ignore_puts(ops, &mut deletes, &mut puts, 1);
    if deletes.is_empty() || puts.is_empty() {
        return false;
    }
    let deleted = RangeSet::from_ranges(deletes);
    puts.iter().any(|key| deleted.contains_key(key))
}

fn collect_deletes_and_ignore_puts<'a>(
    ops: &'a [pb::RequestOp],
    deletes: &mut Vec<KeyRange>,
    puts: &mut Vec<&'a [u8]>,
    depth: usize,
) {
    for op in ops {
        match &op.request {
            Some(request_op::Request::RequestDeleteRange(d)) => {
                if let Ok(range) = KeyRange::from_etcd(&d.key, &d.range_end) {
                    deletes.push(range);
                }
            }
            Some(request_op::Request::RequestPut(p)) if p.ignore_value || p.ignore_lease => puts.push(&p.key),
            // Both branches of a nested transaction, as etcd merges them (a deeper one is refused anyway).
            Some(request_op::Request::RequestTxn(t)) if depth < MAX_TXN_DEPTH => {
                collect_deletes_and_ignore_puts(&t.success, deletes, puts, depth + 1);
                collect_deletes_and_ignore_puts(&t.failure, deletes, puts, depth + 1);
            }
            _ => {}
        }
    }
}

/// Compact: the `compact` capability.
pub fn compact(_: &pb::CompactionRequest) -> Result<Needs, Status> {
    Ok(Needs::cap(Capability::Compact))
}

fn add_range(needs: &mut Needs, r: &pb::RangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(err_empty_key());
    }
    needs.key(Access::Read, &r.key, &r.range_end);
    // An enum value this proxy does not know is refused, not forwarded: etcd 3.4 and 3.5 crash on a sort target
    // outside theirs (they sort with a nil comparator).
    if range_request::SortOrder::try_from(r.sort_order).is_err() {
        needs.push(Need::Never("unknown sort order"));
    }
    if range_request::SortTarget::try_from(r.sort_target).is_err() {
        needs.push(Need::Never("unknown sort target"));
    }
    Ok(())
}

fn add_put(needs: &mut Needs, r: &pb::PutRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(err_empty_key());
    }
    needs.push(Need::Key(Access::Write, KeyRange::point(r.key.as_slice())));
    if r.prev_kv {
        needs.push(Need::Key(Access::Read, KeyRange::point(r.key.as_slice())));
    }
    if r.lease != 0 {
        needs.push(Need::Cap(Capability::Lease));
        needs.push(Need::LeaseKeys(Access::Write, r.lease));
    }
    Ok(())
}

fn add_delete(needs: &mut Needs, r: &pb::DeleteRangeRequest) -> Result<(), Status> {
    if r.key.is_empty() {
        return Err(err_empty_key());
    }
    needs.key(Access::Write, &r.key, &r.range_end);
    if r.prev_kv {
        needs.key(Access::Read, &r.key, &r.range_end);
    }
    Ok(())
}

fn add_txn(needs: &mut Needs, r: &pb::TxnRequest, depth: usize) -> Result<(), Status> {
    if depth > MAX_TXN_DEPTH {
        needs.push(Need::Never("transaction nested too deeply"));
        return Ok(());
    }
    for c in &r.compare {
        if c.key.is_empty() {
            return Err(err_empty_key());
        }
        // A compare target or result this proxy does not know is refused.
        if compare::CompareTarget::try_from(c.target).is_err() {
            needs.push(Need::Never("unknown compare target"));
        }
        if compare::CompareResult::try_from(c.result).is_err() {
            needs.push(Need::Never("unknown compare result"));
        }
        needs.key(Access::Read, &c.key, &c.range_end);
    }
    for op in r.success.iter().chain(r.failure.iter()) {
        match &op.request {
            Some(request_op::Request::RequestRange(r)) => add_range(needs, r)?,
            Some(request_op::Request::RequestPut(p)) => add_put(needs, p)?,
            Some(request_op::Request::RequestDeleteRange(d)) => add_delete(needs, d)?,
            Some(request_op::Request::RequestTxn(t)) => add_txn(needs, t, depth + 1)?,
            // Empty (or an operation of a newer etcd that this proxy does not know, which reads as empty): refused
            // as etcd refuses an empty one, before any check.
            None => return Err(Status::invalid_argument("etcdserver: key not found")),
        }
    }
    Ok(())
}

// === Watch ===

/// What one message on a watch stream needs.
pub fn watch(r: &pb::WatchRequest) -> Needs {
    match &r.request_union {
        Some(watch_request::RequestUnion::CreateRequest(c)) => {
            let mut needs = Needs::default();
            let key: &[u8] = if c.key.is_empty() { b"\0" } else { &c.key };
            needs.key(Access::Read, key, &c.range_end);
            if c.filters.iter().any(|f| FilterType::try_from(*f).is_err()) {
                needs.push(Need::Never("unknown watch filter"));
            }
            needs
        }
        // etcd checks neither: they only touch the caller's own watches.
        Some(watch_request::RequestUnion::CancelRequest(_)) | Some(watch_request::RequestUnion::ProgressRequest(_)) => {
            Needs::default()
        }
        None => Needs(vec![Need::Never("empty or unknown watch request")]),
    }
}

// === Lease ===

/// A grant with an ID of the client's choosing needs every cluster capability too: etcd picks an ID (when the
/// request's is 0, as clientv3's `Grant` always sends) from a per-member counter and does not retry when it is
/// taken, so IDs granted ahead of that counter make other clients' grants fail (`lease already exists`).
pub fn lease_grant(r: &pb::LeaseGrantRequest) -> Result<Needs, Status> {
    if r.id != 0 {
        return Ok(Needs(vec![Need::Cap(Capability::Lease), Need::Admin]));
    }
    Ok(Needs::cap(Capability::Lease))
}

/// Revoke deletes every key attached to the lease.
pub fn lease_revoke(r: &pb::LeaseRevokeRequest) -> Result<Needs, Status> {
    Ok(Needs(vec![Need::Cap(Capability::Lease), Need::LeaseKeys(Access::Write, r.id)]))
}

/// Each keep-alive keeps every attached key alive.
pub fn lease_keep_alive(r: &pb::LeaseKeepAliveRequest) -> Needs {
    Needs(vec![Need::Cap(Capability::Lease), Need::LeaseKeys(Access::Write, r.id)])
}

/// TimeToLive discloses the attached keys when `keys` is set.
pub fn lease_time_to_live(_: &pb::LeaseTimeToLiveRequest) -> Result<Needs, Status> {
    // With `keys`, read on every attached key too: checked on etcd's answer itself, which lists them
    // (`lease_keys::unreadable_key_in`), so that no key attached meanwhile escapes the check.
    Ok(Needs::cap(Capability::Lease))
}

/// Leases lists every lease of the cluster: admin only.
pub fn lease_leases(_: &pb::LeaseLeasesRequest) -> Result<Needs, Status> {
    Ok(Needs(vec![Need::Admin]))
}

// === Cluster ===

/// MemberList needs `status` (and is answered with the proxy's own URLs).
pub fn member_list(_: &pb::MemberListRequest) -> Result<Needs, Status> {
    Ok(Needs::cap(Capability::Status))
}

/// MemberRemove, MemberPromote.
pub fn members<M>(_: &M) -> Result<Needs, Status> {
    Ok(Needs::cap(Capability::Members))
}

/// MemberAdd: `members`; peer URLs checked as for MemberUpdate (`check_peer_urls`).
pub fn member_add(r: &pb::MemberAddRequest) -> Result<Needs, Status> {
    check_peer_urls(&r.peer_ur_ls)?;
    Ok(Needs::cap(Capability::Members))
}

/// MemberUpdate: `members`. etcd 3.4 and 3.5 store a MemberUpdate's peer URLs unchecked, and every other member
/// then panics dialling them (and again at every restart, as they are in the raft log), so they are checked here
/// as etcd checks MemberAdd's (`check_peer_urls`).
pub fn member_update(r: &pb::MemberUpdateRequest) -> Result<Needs, Status> {
    check_peer_urls(&r.peer_ur_ls)?;
    Ok(Needs::cap(Capability::Members))
}

/// etcd's answer to peer URLs it cannot use (`ErrGRPCMemberBadURLs`).
fn err_bad_urls() -> Status {
    Status::invalid_argument("etcdserver: given member URLs are invalid")
}

/// At least one URL, each `scheme://host:port` with a scheme etcd dials (`http`, `https`, `unix`, `unixs`, in any
/// case), a host of letters, digits, `-`, `.` and `_` or an IPv6 literal in brackets (with a `%25` zone), a decimal
/// port, and nothing else (no user, path, query, fragment or percent escape); surrounding whitespace is trimmed, as
/// etcd trims it. A little stricter than etcd's `types.NewURLs` (Go's `url.Parse`), never looser: what passes
/// here, etcd's members can dial.
fn check_peer_urls(urls: &[String]) -> Result<(), Status> {
    if urls.is_empty() || !urls.iter().all(|u| peer_url_ok(u.trim())) {
        return Err(err_bad_urls());
    }
    Ok(())
}

fn peer_url_ok(url: &str) -> bool {
    let Some((scheme, authority)) = url.split_once("://") else {
        return false;
    };
    if !["http", "https", "unix", "unixs"].iter().any(|s| scheme.eq_ignore_ascii_case(s)) {
        return false;
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => {
            let (address, zone) = v6.split_once("%25").unwrap_or((v6, "a"));
            address.parse::<std::net::Ipv6Addr>().is_ok()
                && !zone.is_empty()
                && zone.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
        }
        None => !host.is_empty() && host.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_')),
    };
    host_ok && !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_ok()
}

// === Maintenance ===

/// Alarm GET needs `status`; activating or deactivating an alarm needs `alarm`. An action or alarm type this proxy
/// does not know is refused (etcd 3.4 and 3.5 crash on an unknown action: they answer a nil response), and so is
/// activating or deactivating alarm NONE.
pub fn alarm(r: &pb::AlarmRequest) -> Result<Needs, Status> {
    let mut needs = if r.action == AlarmAction::Get as i32 {
        Needs::cap(Capability::Status)
    } else {
        Needs::cap(Capability::Alarm)
    };
    if AlarmAction::try_from(r.action).is_err() {
        needs.push(Need::Never("unknown alarm action"));
    }
    if AlarmType::try_from(r.alarm).is_err() {
        needs.push(Need::Never("unknown alarm type"));
    }
    // etcd 3.4 stops (fatal "key required") applying an activation or deactivation of alarm NONE, on every member
    // and again at every restart; 3.5 takes it as a no-op.
    if r.action != AlarmAction::Get as i32 && r.alarm == AlarmType::None as i32 {
        needs.push(Need::Never("alarm NONE activated or deactivated"));
    }
    Ok(needs)
}

/// Downgrade needs `downgrade`; an action this proxy does not know is refused.
pub fn downgrade(r: &pb::DowngradeRequest) -> Result<Needs, Status> {
    let mut needs = Needs::cap(Capability::Downgrade);
    if DowngradeAction::try_from(r.action).is_err() {
        needs.push(Need::Never("unknown downgrade action"));
    }
    Ok(needs)
}

/// Auth RoleGrantPermission needs `auth`; a permission type this proxy does not know is refused.
pub fn role_grant_permission(r: &pb::AuthRoleGrantPermissionRequest) -> Result<Needs, Status> {
    let mut needs = Needs::cap(Capability::Auth);
    let perm_type = r.perm.as_ref().map_or(0, |p| p.perm_type);
    if etcd_guard_proto::authpb::permission::Type::try_from(perm_type).is_err() {
        needs.push(Need::Never("unknown permission type"));
    }
    Ok(needs)
}

/// A request that needs one capability, whatever it says.
pub fn capability<M>(cap: Capability) -> impl Fn(&M) -> Result<Needs, Status> + Clone + Send + Sync + 'static {
    move |_| Ok(Needs::cap(cap))
}

// === Lock and Election ===

/// The prefix etcd's lock and election services use for `name`: `name + "/"`.
fn name_prefix(name: &[u8]) -> KeyRange {
    let mut p = Vec::with_capacity(name.len() + 1);
    p.extend_from_slice(name);
    p.push(b'/');
    KeyRange::prefix(p)
}

fn read_write_prefix(needs: &mut Needs, name: &[u8]) {
    let range = name_prefix(name);
    needs.push(Need::Key(Access::Read, range.clone()));
    needs.push(Need::Key(Access::Write, range));
}

fn with_lease(needs: &mut Needs, lease: i64) {
    needs.push(Need::Cap(Capability::Lease));
    if lease != 0 {
        needs.push(Need::LeaseKeys(Access::Write, lease));
    }
}

/// Lock(name, lease): writes `name/<lease>` under the lease and reads/watches `name/`.
pub fn lock(r: &v3lockpb::LockRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    read_write_prefix(&mut needs, &r.name);
    with_lease(&mut needs, r.lease);
    Ok(needs)
}

/// Unlock(key) deletes that one key.
pub fn unlock(r: &v3lockpb::UnlockRequest) -> Result<Needs, Status> {
    if r.key.is_empty() {
        return Err(err_empty_key());
    }
    Ok(Needs(vec![Need::Key(Access::Write, KeyRange::point(r.key.as_slice()))]))
}

/// Campaign(name, lease): like Lock.
pub fn campaign(r: &v3electionpb::CampaignRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    read_write_prefix(&mut needs, &r.name);
    with_lease(&mut needs, r.lease);
    Ok(needs)
}

/// Proclaim writes the leader key, under the leader's lease; Resign deletes it. For both, etcd's election server
/// first makes a session on `leader.lease`: it keeps that lease alive (or grants a new one when it is 0), so both
/// need what a keep-alive (or a grant) needs — else a caller could attach a key it may write to another identity's
/// lease (Proclaim) or keep that lease alive. Without a leader key etcd does nothing and answers as its election
/// server does (`ErrMissingLeaderKey`, a plain error: `Unknown`).
fn leader_key(needs: &mut Needs, leader: Option<&v3electionpb::LeaderKey>) -> Result<(), Status> {
    let l = leader.ok_or_else(|| Status::unknown("\"leader\" field must be provided"))?;
    read_write_prefix(needs, &l.name);
    needs.push(Need::Key(Access::Read, KeyRange::point(l.key.as_slice())));
    needs.push(Need::Key(Access::Write, KeyRange::point(l.key.as_slice())));
    with_lease(needs, l.lease);
    Ok(())
}

pub fn proclaim(r: &v3electionpb::ProclaimRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    leader_key(&mut needs, r.leader.as_ref())?;
    Ok(needs)
}

pub fn resign(r: &v3electionpb::ResignRequest) -> Result<Needs, Status> {
    let mut needs = Needs::default();
    leader_key(&mut needs, r.leader.as_ref())?;
    Ok(needs)
}

/// Leader and Observe read the election's prefix.
pub fn leader(r: &v3electionpb::LeaderRequest) -> Result<Needs, Status> {
    Ok(Needs(vec![Need::Key(Access::Read, name_prefix(&r.name))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(k: &[u8], e: &[u8]) -> Need {
        Need::Key(Access::Read, KeyRange::from_etcd(k, e).unwrap_or_else(|_| KeyRange::point(b"?")))
    }
    fn write(k: &[u8], e: &[u8]) -> Need {
        Need::Key(Access::Write, KeyRange::from_etcd(k, e).unwrap_or_else(|_| KeyRange::point(b"?")))
    }

    #[test]
    fn range_needs_read_on_the_interval() -> Result<(), Status> {
        let r =
            pb::RangeRequest { key: b"a".to_vec(), range_end: b"\0".to_vec(), count_only: true, ..Default::default() };
        assert_eq!(range(&r)?.0, vec![read(b"a", b"\0")]);
        Ok(())
    }

    #[test]
    fn empty_key_is_etcds_invalid_argument() {
        let err = range(&pb::RangeRequest::default()).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(err, Some((tonic::Code::InvalidArgument, "etcdserver: key is not provided".to_string())));
    }

    #[test]
    fn inverted_range_is_never_allowed() -> Result<(), Status> {
        let r = pb::RangeRequest { key: b"z".to_vec(), range_end: b"a".to_vec(), ..Default::default() };
        assert!(matches!(range(&r)?.0.as_slice(), [Need::Never(_)]));
        Ok(())
    }

    #[test]
    fn put_with_prev_kv_and_lease() -> Result<(), Status> {
        let p = pb::PutRequest { key: b"k".to_vec(), prev_kv: true, lease: 7, ..Default::default() };
        assert_eq!(
            put(&p)?.0,
            vec![write(b"k", b""), read(b"k", b""), Need::Cap(Capability::Lease), Need::LeaseKeys(Access::Write, 7)]
        );
        Ok(())
    }

    #[test]
    fn a_lease_id_of_the_clients_choosing_needs_every_capability() -> Result<(), Status> {
        let etcds_choice = pb::LeaseGrantRequest { ttl: 60, id: 0 };
        assert_eq!(lease_grant(&etcds_choice)?.0, vec![Need::Cap(Capability::Lease)]);
        let chosen = pb::LeaseGrantRequest { ttl: 60, id: 0x7e57 };
        assert_eq!(lease_grant(&chosen)?.0, vec![Need::Cap(Capability::Lease), Need::Admin]);
        Ok(())
    }

    #[test]
    fn txn_checks_compares_both_branches_and_nested_ops() -> Result<(), Status> {
        let inner = pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                    key: b"n".to_vec(),
                    prev_kv: true,
                    ..Default::default()
                })),
            }],
            ..Default::default()
        };
        let t = pb::TxnRequest {
            compare: vec![pb::Compare { key: b"c".to_vec(), range_end: b"d".to_vec(), ..Default::default() }],
            success: vec![pb::RequestOp {
                request: Some(request_op::Request::RequestPut(pb::PutRequest {
                    key: b"s".to_vec(),
                    ..Default::default()
                })),
            }],
            failure: vec![pb::RequestOp { request: Some(request_op::Request::RequestTxn(inner)) }],
        };
        assert_eq!(
            txn(&t, MAX_TXN_OPS)?.0,
            vec![read(b"c", b"d"), write(b"s", b""), write(b"n", b""), read(b"n", b"")]
        );
        Ok(())
    }

    #[test]
    fn txn_depth_is_bounded_and_empty_ops_refused() -> Result<(), Status> {
        let mut t = pb::TxnRequest::default();
        for _ in 0..MAX_TXN_DEPTH + 1 {
            t = pb::TxnRequest {
                success: vec![pb::RequestOp { request: Some(request_op::Request::RequestTxn(t)) }],
                ..Default::default()
            };
        }
        assert!(txn(&t, MAX_TXN_OPS)?.0.iter().any(|n| matches!(n, Need::Never(_))));
        let empty = pb::TxnRequest { success: vec![pb::RequestOp { request: None }], ..Default::default() };
        let refused = txn(&empty, MAX_TXN_OPS).err().map(|s| (s.code(), s.message().to_string()));
        assert_eq!(refused, Some((tonic::Code::InvalidArgument, "etcdserver: key not found".to_string())));
        Ok(())
    }

    fn op(request: request_op::Request) -> pb::RequestOp {
        pb::RequestOp { request: Some(request) }
    }

    fn range_op(key: &[u8]) -> pb::RequestOp {
        op(request_op::Request::RequestRange(pb::RangeRequest { key: key.to_vec(), ..Default::default() }))
    }

    fn nested(success: Vec<pb::RequestOp>) -> pb::RequestOp {
        op(request_op::Request::RequestTxn(pb::TxnRequest { success, ..Default::default() }))
    }

    fn refusal(r: &pb::TxnRequest) -> Option<String> {
        txn(r, MAX_TXN_OPS).err().map(|s| format!("{:?}: {}", s.code(), s.message()))
    }

    #[test]
    fn txn_operations_are_counted_over_the_way_through_nested_transactions() {
        let too_many = Some("InvalidArgument: etcdserver: too many operations in txn request".to_string());
        // etcd's own limit per list, both branches full: allowed (only one runs).
        let flat = pb::TxnRequest {
            compare: Vec::new(),
            success: (0..MAX_TXN_OPS).map(|_| range_op(b"k")).collect(),
            failure: (0..MAX_TXN_OPS).map(|_| range_op(b"k")).collect(),
        };
        assert_eq!(refusal(&flat), None);
        let mut over = flat.clone();
        over.success.push(range_op(b"k"));
        assert_eq!(refusal(&over), too_many);
        // A cluster whose etcd runs with a larger `--max-txn-ops` (`limits.max_txn_ops`), or a smaller one.
        assert!(txn(&over, MAX_TXN_OPS + 1).is_ok());
        assert!(txn(&flat, MAX_TXN_OPS - 1).is_err());
        // 12 × 12 × 12 ranges in three levels, each level within etcd's limit: 1,728 run.
        let level2 = nested((0..12).map(|_| range_op(b"k")).collect());
        let level1 = nested((0..12).map(|_| level2.clone()).collect());
        let tree = pb::TxnRequest { success: (0..12).map(|_| level1.clone()).collect(), ..Default::default() };
        assert_eq!(refusal(&tree), too_many);
        // Compares run besides the branch: 16 levels of 100 compares each, with one op, are 1,600 compares.
        let mut chain = pb::TxnRequest::default();
        for _ in 0..15 {
            let compare = (0..100)
                .map(|_| pb::Compare {
                    key: b"k".to_vec(),
                    target: compare::CompareTarget::Version as i32,
                    ..Default::default()
                })
                .collect();
            chain = pb::TxnRequest {
                compare,
                success: vec![op(request_op::Request::RequestTxn(chain))],
                failure: Vec::new(),
            };
        }
        assert_eq!(refusal(&chain), too_many);
        // 128 compares and 128 operations in one level: allowed, as etcd allows them.
        let mut full = flat.clone();
        full.compare = (0..MAX_TXN_OPS).map(|_| pb::Compare { key: b"k".to_vec(), ..Default::default() }).collect();
        assert_eq!(refusal(&full), None);
        // 8 × 16 = 128 run: allowed.
        let level1 = nested((0..16).map(|_| range_op(b"k")).collect());
        let tree = pb::TxnRequest { success: (0..8).map(|_| level1.clone()).collect(), ..Default::default() };
        assert_eq!(refusal(&tree), None);
    }

    #[test]
    fn a_put_keeping_the_value_of_a_key_deleted_in_the_same_transaction_is_refused() {
        let duplicate = Some("InvalidArgument: etcdserver: duplicate key given in txn request".to_string());
        let delete = |key: &[u8], end: &[u8]| {
            op(request_op::Request::RequestDeleteRange(pb::DeleteRangeRequest {
                key: key.to_vec(),
                range_end: end.to_vec(),
                ..Default::default()
            }))
        };
        let put = |key: &[u8], ignore_value: bool, ignore_lease: bool| {
            op(request_op::Request::RequestPut(pb::PutRequest {
                key: key.to_vec(),
                ignore_value,
                ignore_lease,
                ..Default::default()
            }))
        };
        let t = |success: Vec<pb::RequestOp>| pb::TxnRequest { success, ..Default::default() };
        // What crashed etcd: a delete to the end of the keyspace, then a put keeping the deleted value or lease.
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"\0"), put(b"zz/k2", true, false)])), duplicate);
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"\0"), put(b"zz/k2", false, true)])), duplicate);
        assert_eq!(refusal(&t(vec![put(b"zz/k2", true, false), delete(b"zz/", b"\0")])), duplicate);
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"\0"), nested(vec![put(b"zz/k2", true, false)])])), duplicate);
        assert_eq!(refusal(&t(vec![nested(vec![delete(b"\0", b"\0")]), put(b"a", false, true)])), duplicate);
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"zz0"), put(b"zz/k2", true, false)])), duplicate);
        // Not the same key, not a put that keeps anything, or the other branch: as etcd.
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"\0"), put(b"zy", true, false)])), None);
        assert_eq!(refusal(&t(vec![delete(b"zz/", b"\0"), put(b"zz/k2", false, false)])), None);
        let branches = pb::TxnRequest {
            success: vec![delete(b"zz/", b"\0")],
            failure: vec![put(b"zz/k2", true, false)],
            ..Default::default()
        };
        assert_eq!(refusal(&branches), None);
    }

    #[test]
    fn member_peer_urls_are_checked() {
        let update = |urls: &[&str]| {
            member_update(&pb::MemberUpdateRequest { id: 1, peer_ur_ls: urls.iter().map(|u| u.to_string()).collect() })
                .err()
                .map(|s| (s.code(), s.message().to_string()))
        };
        for good in [
            &["http://10.0.0.1:2380"][..],
            &["https://etcd-1.example:2380", "http://[fd00::1]:2380"],
            &["HTTP://etcd_1:2380", " http://10.0.0.2:2380 ", "http://[fe80::1%25eth0]:2380"],
        ] {
            assert_eq!(update(good), None, "{good:?}");
        }
        let bad = Some((tonic::Code::InvalidArgument, "etcdserver: given member URLs are invalid".to_string()));
        for urls in [
            &[][..],
            &["x"],
            &[""],
            &["10.0.0.1:2380"],
            &["ftp://10.0.0.1:2380"],
            &["http://10.0.0.1"],
            &["http://10.0.0.1:"],
            &["http://10.0.0.1:99999"],
            &["http://10.0.0.1:2380/"],
            &["http://10.0.0.1:2380?a"],
            &["http://u@10.0.0.1:2380"],
            &["http://:2380"],
            &["http://fd00::1:2380"],
            &["http://[fd00::1:2380"],
            &["http://10.0.0.1:2380", "http://10.0.0.2:2380x"],
            &["http://a%41:2380"],
            &["http://a{b:2380"],
            &["http://[fe80::1%eth0]:2380"],
            &["http://[fe80::1%25]:2380"],
        ] {
            assert_eq!(update(urls), bad, "{urls:?}");
        }
        let add = member_add(&pb::MemberAddRequest { peer_ur_ls: vec!["x".into()], is_learner: false });
        assert_eq!(add.err().map(|s| s.code()), Some(tonic::Code::InvalidArgument));
    }

    #[test]
    fn activating_or_deactivating_alarm_none_is_never_allowed() -> Result<(), Status> {
        let needs = |action: AlarmAction, kind: AlarmType| {
            alarm(&pb::AlarmRequest { action: action as i32, member_id: 0, alarm: kind as i32 })
        };
        let never = |n: Needs| n.0.iter().any(|n| matches!(n, Need::Never(_)));
        assert!(never(needs(AlarmAction::Activate, AlarmType::None)?));
        assert!(never(needs(AlarmAction::Deactivate, AlarmType::None)?));
        assert!(!never(needs(AlarmAction::Get, AlarmType::None)?));
        assert!(!never(needs(AlarmAction::Deactivate, AlarmType::Nospace)?));
        Ok(())
    }

    #[test]
    fn watch_empty_key_means_from_zero_byte() {
        let w = pb::WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                range_end: b"\0".to_vec(),
                ..Default::default()
            })),
        };
        assert_eq!(watch(&w).0, vec![read(b"\0", b"\0")]);
    }

    #[test]
    fn enum_values_this_proxy_does_not_know_are_never_allowed() -> Result<(), Status> {
        let never = |needs: Needs| needs.0.iter().any(|n| matches!(n, Need::Never(_)));
        let r = |sort_order, sort_target| pb::RangeRequest {
            key: b"k".to_vec(),
            sort_order,
            sort_target,
            ..Default::default()
        };
        assert!(!never(range(&r(2, 4))?));
        assert!(never(range(&r(0, 5))?) && never(range(&r(3, 0))?));
        let cmp = |result| pb::Compare { key: b"k".to_vec(), result, ..Default::default() };
        assert!(!never(txn(&pb::TxnRequest { compare: vec![cmp(3)], ..Default::default() }, MAX_TXN_OPS)?));
        assert!(never(txn(&pb::TxnRequest { compare: vec![cmp(4)], ..Default::default() }, MAX_TXN_OPS)?));
        let op = pb::RequestOp { request: Some(request_op::Request::RequestRange(r(0, 9))) };
        assert!(never(txn(&pb::TxnRequest { failure: vec![op], ..Default::default() }, MAX_TXN_OPS)?));
        let create = |filters| pb::WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(pb::WatchCreateRequest {
                key: b"k".to_vec(),
                filters,
                ..Default::default()
            })),
        };
        assert!(!never(watch(&create(vec![0, 1]))) && never(watch(&create(vec![2]))));
        assert!(!never(alarm(&pb::AlarmRequest { action: 2, member_id: 0, alarm: 2 })?));
        assert!(never(alarm(&pb::AlarmRequest { action: 3, member_id: 0, alarm: 0 })?));
        assert!(never(alarm(&pb::AlarmRequest { action: 0, member_id: 0, alarm: 9 })?));
        assert!(!never(downgrade(&pb::DowngradeRequest { action: 2, version: String::new() })?));
        assert!(never(downgrade(&pb::DowngradeRequest { action: 3, version: String::new() })?));
        let perm = |perm_type| pb::AuthRoleGrantPermissionRequest {
            name: "r".into(),
            perm: Some(etcd_guard_proto::authpb::Permission { perm_type, key: b"k".to_vec(), range_end: Vec::new() }),
        };
        assert!(!never(role_grant_permission(&perm(2))?) && never(role_grant_permission(&perm(3))?));
        Ok(())
    }

    #[test]
    fn lock_and_election_use_the_name_prefix() -> Result<(), Status> {
        let l = lock(&v3lockpb::LockRequest { name: b"cilium/.initlock".to_vec(), lease: 5 })?;
        assert_eq!(l.0[0], Need::Key(Access::Read, KeyRange::prefix(b"cilium/.initlock/")));
        assert!(l.0.contains(&Need::LeaseKeys(Access::Write, 5)));
        let missing =
            resign(&v3electionpb::ResignRequest { leader: None }).err().ok_or_else(|| Status::internal("accepted"))?;
        assert_eq!((missing.code(), missing.message()), (tonic::Code::Unknown, "\"leader\" field must be provided"));
        let missing = proclaim(&v3electionpb::ProclaimRequest { leader: None, value: vec![] })
            .err()
            .ok_or_else(|| Status::internal("accepted"))?;
        assert_eq!(missing.code(), tonic::Code::Unknown);
        // Proclaim and Resign use the leader's lease (etcd's election server keeps it alive; Proclaim attaches the
        // leader key to it): what a keep-alive of it needs, or a grant when it is 0.
        let leader = v3electionpb::LeaderKey { name: b"e".to_vec(), key: b"e/1".to_vec(), rev: 3, lease: 7 };
        let proclaimed = proclaim(&v3electionpb::ProclaimRequest { leader: Some(leader.clone()), value: vec![] })?;
        let resigned = resign(&v3electionpb::ResignRequest { leader: Some(leader.clone()) })?;
        for needs in [&proclaimed, &resigned] {
            assert!(needs.0.contains(&Need::Cap(Capability::Lease)), "{needs:?}");
            assert!(needs.0.contains(&Need::LeaseKeys(Access::Write, 7)), "{needs:?}");
            assert!(needs.0.contains(&Need::Key(Access::Write, KeyRange::point(b"e/1"))), "{needs:?}");
        }
        let no_lease = v3electionpb::LeaderKey { lease: 0, ..leader };
        let granted = proclaim(&v3electionpb::ProclaimRequest { leader: Some(no_lease), value: vec![] })?;
        assert!(granted.0.contains(&Need::Cap(Capability::Lease)));
        assert!(!granted.0.iter().any(|n| matches!(n, Need::LeaseKeys(..))));
        Ok(())
    }
}
