//! Denials that got no record of their own (`audit.denial_records`): counted per identity and RPC, and written as
//! summary records (`"event":"summary"`, with their `count`). The counting is here; when summaries are written is
//! the limiter's business (`limits::Limiter::record_denial`, `Limiter::summaries_due`).

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tonic::Code;

use super::record::{Decision, Event, Record, Subject};

/// One identity's unrecorded denials, by RPC.
#[derive(Debug, Default)]
pub struct Unrecorded {
    groups: Vec<Group>,
}

/// Unrecorded denials of one RPC.
#[derive(Debug)]
struct Group {
    /// The first one's connection and identity, its code and reason.
    subject: Arc<Subject>,
    rpc: &'static str,
    code: Code,
    reason: String,
    count: u64,
    first: SystemTime,
    last: SystemTime,
    /// When the group was started (for [`Unrecorded::started_before`]).
    since: Instant,
}

// === impl Unrecorded ===

impl Unrecorded {
    /// Count `denial` instead of writing it.
    pub fn add(&mut self, denial: Record) {
        match self.groups.iter_mut().find(|g| g.rpc == denial.rpc) {
            Some(group) => {
                group.count = group.count.saturating_add(1);
                // Calls finish out of order: the earliest and latest arrival.
                group.first = group.first.min(denial.time);
                group.last = group.last.max(denial.time);
            }
            None => self.groups.push(Group {
                subject: denial.subject,
                rpc: denial.rpc,
                code: denial.code,
                reason: denial.reason,
                count: 1,
                first: denial.time,
                last: denial.time,
                since: Instant::now(),
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Whether a group was started before `instant`.
    pub fn started_before(&self, instant: Instant) -> bool {
        self.groups.iter().any(|g| g.since < instant)
    }

    /// The summary record of the oldest group, which is forgotten.
    pub fn take_one(&mut self) -> Option<Record> {
        (!self.groups.is_empty()).then(|| self.groups.remove(0).into_record())
    }

    /// The summary records of every group, which are forgotten.
    pub fn take_all(&mut self) -> Vec<Record> {
        self.groups.drain(..).map(Group::into_record).collect()
    }
}

// === impl Group ===

impl Group {
    fn into_record(self) -> Record {
        let Group { subject, rpc, code, reason, count, first, last, since: _ } = self;
        let noun = if count == 1 { "denial" } else { "denials" };
        Record {
            subject,
            time: first,
            rpc,
            event: Event::Summary { count, last },
            stream: None,
            ops: "[]".into(),
            decision: Decision::Deny,
            reason: format!(
                "{count} {noun} without a record of their own (over audit.denial_records); the first: {reason}"
            ),
            code,
            revision: None,
            latency_us: 0,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// A denied call's record (also for the limiter's tests).
    pub(crate) fn denial(subject: &Arc<Subject>, rpc: &'static str, code: Code, at: u64, reason: &str) -> Record {
        Record {
            subject: subject.clone(),
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
            rpc,
            event: Event::Call,
            stream: None,
            ops: "[{\"op\":\"range\",\"key\":\"/secret\"}]".into(),
            decision: Decision::Deny,
            reason: reason.into(),
            code,
            revision: None,
            latency_us: 7,
        }
    }

    #[test]
    fn denials_are_counted_per_rpc_and_taken_once() {
        let subject = Arc::new(Subject::proxy());
        let mut u = Unrecorded::default();
        assert!(u.is_empty());
        let range = "KV/Range";
        u.add(denial(&subject, range, Code::PermissionDenied, 11, "no binding matches this identity"));
        u.add(denial(&subject, range, Code::PermissionDenied, 12, "other"));
        // Finished after a later one: still the first.
        u.add(denial(&subject, range, Code::ResourceExhausted, 10, "too many"));
        u.add(denial(&subject, "KV/Put", Code::PermissionDenied, 13, "no binding"));
        assert!(u.started_before(Instant::now() + Duration::from_secs(1)));
        assert!(!u.started_before(Instant::now() - Duration::from_secs(1)));
        let first = u.take_one().expect("a group");
        assert_eq!(first.rpc, range);
        assert_eq!(first.time, SystemTime::UNIX_EPOCH + Duration::from_secs(10));
        assert_eq!(first.event, Event::Summary { count: 3, last: SystemTime::UNIX_EPOCH + Duration::from_secs(12) });
        assert_eq!(first.code, Code::PermissionDenied, "the code of the group's first record");
        assert_eq!(first.ops, "[]", "no key of one denial stands for the others");
        assert!(first.reason.starts_with("3 denials without a record"), "{}", first.reason);
        assert!(first.reason.ends_with("the first: no binding matches this identity"), "{}", first.reason);
        let rest = u.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].event, Event::Summary { count: 1, last: SystemTime::UNIX_EPOCH + Duration::from_secs(13) });
        assert!(u.is_empty() && u.take_one().is_none() && u.take_all().is_empty());

        let mut line = String::new();
        first.write_body(1, "0", &mut line);
        assert!(
            line.contains(",\"event\":\"summary\",\"count\":3,\"last_time\":\"1970-01-01T00:00:12.000000Z\","),
            "{line}"
        );
    }
}
