//! Asking etcd which keys a lease has, once for every request that waits for the same answer.
//!
//! A put with a lease, a keep-alive and a revoke by an identity that may not write every key are allowed only if
//! the identity may write every key attached to the lease (etcd's own rule, `checkLeasePuts`), so the proxy asks
//! etcd for them (`LeaseTimeToLive` with `keys`) before it decides. kube-apiserver writes its Events with one
//! lease shared by up to 1,000 keys: one lookup per Event, each listing all of them, cost etcd more than the puts
//! themselves (BENCHMARKS.md, "Leased puts").
//!
//! Here the requests that wait for the keys of one lease share lookups. At most one lookup per lease is in flight;
//! requests that arrive meanwhile join the *next* lookup, which is sent as soon as that one is answered. A request
//! is therefore only ever answered by a lookup sent after it arrived: it sees the lease as it was at some moment
//! after its arrival, as with a lookup of its own (etcd applies the request later still, so neither is atomic with
//! it). A lookup that fails fails every request that waited for it.
//!
//! A lookup serves several clients, so it has a deadline of its own ([`LOOKUP_TIMEOUT`]); each request waits for
//! it no longer than its own deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tonic::Status;

use etcd_guard_proto::etcdserverpb as pb;
use etcd_guard_proto::methods;

use super::View;
use crate::codec::Framed;
use crate::metrics::Metrics;
use crate::policy::{Access, Denied};
use crate::upstream::{CallMeta, Upstream, within};

/// How long a lookup may take at etcd.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a lookup found, or why there is no answer.
pub type Keys = Result<Arc<Found>, Status>;

/// A lease's keys as one lookup found them (slices of etcd's answer), shared by the requests that waited for it.
pub struct Found {
    keys: Vec<Bytes>,
    /// The verdicts already reached on these keys, per connection view and access: the requests of one connection
    /// that waited for this lookup check the keys once, not once each (up to 1,000 keys).
    verdicts: Mutex<Vec<Reached>>,
}

/// A verdict on a lookup's keys for one connection view and access.
struct Reached {
    view: Arc<View>,
    access: Access,
    verdict: Result<(), Denied>,
}

/// Only the keys of etcd's `LeaseTimeToLiveResponse`, each a slice of etcd's frame: a lease of kube-apiserver's has
/// up to 1,000 keys, and decoding them into vectors of their own cost an allocation each.
#[derive(Clone, PartialEq, prost::Message)]
struct LeaseKeysAnswer {
    #[prost(bytes = "bytes", repeated, tag = "5")]
    keys: Vec<Bytes>,
}

/// The lookups in flight and waiting, per lease.
#[derive(Default)]
pub struct LeaseKeys {
    lanes: Arc<Mutex<HashMap<i64, Lane>>>,
}

/// A lease with a lookup in flight; `next` gathers the requests that arrive meanwhile (its answer's sender, taken
/// by the task once the lookup in flight is answered).
struct Lane {
    next: Option<watch::Sender<Option<Keys>>>,
}

// === impl LeaseKeys ===

impl LeaseKeys {
    /// The keys attached to `lease`, from a lookup sent after this call, waited for until `meta`'s deadline. The
    /// first request of a lookup lends it its metadata (`hasleader`), not its deadline.
    pub async fn get(&self, lease: i64, upstream: &Upstream, metrics: &Arc<Metrics>, meta: &CallMeta) -> Keys {
        metrics.lease_lookup_waits.inc();
        let mut answer = {
            let mut lanes = lock(&self.lanes);
            match lanes.get_mut(&lease) {
                // A lookup is in flight: join the next one (the first to join it makes it).
                Some(lane) => lane.next.get_or_insert_with(|| watch::channel(None).0).subscribe(),
                // None in flight: send one now.
                None => {
                    let (tx, rx) = watch::channel(None);
                    lanes.insert(lease, Lane { next: None });
                    let run = Run {
                        lanes: self.lanes.clone(),
                        lease,
                        upstream: upstream.clone(),
                        metrics: metrics.clone(),
                        meta: meta.with_timeout(Some(LOOKUP_TIMEOUT)),
                        finished: false,
                    };
                    tokio::spawn(run.lookups(tx));
                    rx
                }
            }
        };
        let answered = async {
            match answer.wait_for(Option::is_some).await {
                Ok(found) => found.clone().unwrap_or_else(|| Err(gone())),
                // The task that was to answer is gone (the runtime shuts down).
                Err(_) => Err(gone()),
            }
        };
        within(meta.timeout(), answered).await
    }
}

// === impl Found ===

impl Found {
    /// Whether `view`'s permissions allow `access` to every key found.
    ///
    /// # Errors
    ///
    /// [`Denied`] naming the first key (in etcd's order) that is not covered.
    pub fn check(&self, view: &Arc<View>, access: Access) -> Result<(), Denied> {
        let reached = lock(&self.verdicts)
            .iter()
            .find(|r| Arc::ptr_eq(&r.view, view) && r.access == access)
            .map(|r| r.verdict.clone());
        if let Some(verdict) = reached {
            return verdict;
        }
        let verdict = self.keys.iter().try_for_each(|key| view.permissions.check_key(access, key));
        lock(&self.verdicts).push(Reached { view: view.clone(), access, verdict: verdict.clone() });
        verdict
    }
}

/// Whether `view`'s permissions allow reading every key that etcd's `LeaseTimeToLiveResponse` in `answer` lists
/// (`None`), or why not. An answer that cannot be read is refused too.
pub fn unreadable_key_in(answer: &Framed, view: &View) -> Option<String> {
    let keys = match <LeaseKeysAnswer as prost::Message>::decode(answer.message_bytes()) {
        Ok(read) => read.keys,
        Err(e) => return Some(format!("etcd's answer could not be read: {e}")),
    };
    let denied = keys.iter().try_for_each(|key| view.permissions.check_key(Access::Read, key)).err()?;
    Some(format!("the lease has a key outside the grants: {}", denied.reason))
}

/// The task that sends a lease's lookups, one after the other, while requests wait for them.
struct Run {
    lanes: Arc<Mutex<HashMap<i64, Lane>>>,
    lease: i64,
    upstream: Upstream,
    metrics: Arc<Metrics>,
    meta: CallMeta,
    /// The lane was removed with no request waiting.
    finished: bool,
}

// === impl Run ===

impl Run {
    async fn lookups(mut self, mut tx: watch::Sender<Option<Keys>>) {
        loop {
            let keys = self.lookup().await;
            tx.send_replace(Some(keys));
            // Requests that arrived while this lookup was in flight wait for the next one: send it now.
            let mut lanes = lock(&self.lanes);
            match lanes.get_mut(&self.lease).and_then(|lane| lane.next.take()) {
                Some(next) => tx = next,
                None => {
                    lanes.remove(&self.lease);
                    self.finished = true;
                    return;
                }
            }
        }
    }

    async fn lookup(&self) -> Keys {
        self.metrics.lease_lookups.inc();
        let req = pb::LeaseTimeToLiveRequest { id: self.lease, keys: true };
        let answer: LeaseKeysAnswer = self.upstream.unary_decoded(methods::LEASE_TIME_TO_LIVE, req, &self.meta).await?;
        Ok(Arc::new(Found { keys: answer.keys, verdicts: Mutex::default() }))
    }
}

impl Drop for Run {
    /// A task dropped before it finished (its runtime shuts down) takes its lane along: the requests that joined the
    /// next lookup get an error instead of waiting for a task that will not send it.
    fn drop(&mut self) {
        if !self.finished {
            lock(&self.lanes).remove(&self.lease);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn gone() -> Status {
    Status::unavailable("etcd-guard: the lookup of the lease's keys was abandoned")
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    #[test]
    fn the_keys_of_etcds_answer_are_read_as_slices() -> Result<(), prost::DecodeError> {
        let keys = vec![b"b/one".to_vec(), Vec::new(), b"\x00\xff".to_vec()];
        let answer = pb::LeaseTimeToLiveResponse {
            header: Some(pb::ResponseHeader { cluster_id: 1, member_id: 2, revision: 3, raft_term: 4 }),
            id: 7,
            ttl: 60,
            granted_ttl: 60,
            keys: keys.clone(),
        };
        let read = LeaseKeysAnswer::decode(Bytes::from(answer.encode_to_vec()))?;
        assert_eq!(read.keys, keys);
        Ok(())
    }
}
