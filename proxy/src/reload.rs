//! Hot reload: the policy, the listener's certificate, key, client CA and CRLs, and the upstream client
//! certificate, on SIGHUP (see `cli`) and when their files change. Open connections are not dropped.
//!
//! Each part is loaded in full before it replaces the old one; a part that fails to load is refused with a log
//! line and a metric, and the previous one stays in force.

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::config::Config;
use crate::metrics::ResultLabels;
use crate::policy::Policy;
use crate::service::Shared;
use crate::tls::{self, ClientTrust};

/// Reloads the parts of a running proxy.
pub struct Reloader {
    config: Config,
    shared: Arc<Shared>,
    acceptor: Arc<RwLock<tls::Acceptor>>,
    trust: Arc<ClientTrust>,
    trigger: Arc<Notify>,
    stamps: Vec<(Part, PathBuf, Option<Stamp>)>,
    /// The configuration file as it was at start (its stamp, and its bytes): it is not reloaded, and a change to
    /// it is worth a warning.
    config_stamp: Option<Stamp>,
    config_bytes: Option<Vec<u8>>,
    /// What the round in progress is reading, for the warnings of a slow round.
    loading: Arc<Loading>,
}

/// What the round in progress is reading now (a part and its files, the check for changes), if anything.
#[derive(Default)]
struct Loading(Mutex<Option<String>>);

/// How long a round may load before a warning says it is still loading.
const SLOW_ROUND: Duration = Duration::from_secs(30);

/// Asks a running proxy to reload everything now.
#[derive(Clone)]
pub struct ReloadHandle(Arc<Notify>);

/// What a file belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Policy,
    Listener,
    Upstream,
}

/// What identifies a file's content without reading it: modification time, length, inode (a Kubernetes Secret
/// volume replaces files by swapping a symlink, which changes the inode).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
    /// The inode's change time: a `chmod` that makes an unreadable file readable changes only this.
    changed: (i64, i64),
}

// === impl ReloadHandle ===

impl ReloadHandle {
    pub fn trigger(&self) {
        self.0.notify_one();
    }
}

// === impl Reloader ===

impl Reloader {
    pub fn new(
        config: Config,
        shared: Arc<Shared>,
        acceptor: Arc<RwLock<tls::Acceptor>>,
        trust: Arc<ClientTrust>,
    ) -> Reloader {
        let mut files = vec![(Part::Policy, config.policy_file.clone())];
        let t = &config.tls;
        for f in
            [&t.cert_file, &t.key_file, &t.client_ca_file].into_iter().chain(&t.crl_files).chain(t.issuers.values())
        {
            files.push((Part::Listener, f.clone()));
        }
        let u = &config.upstream;
        for f in [&u.ca_file, &u.cert_file, &u.key_file] {
            files.push((Part::Upstream, f.clone()));
        }
        let stamps = files.into_iter().map(|(part, path)| (part, path.clone(), stamp(&path))).collect();
        let (config_stamp, config_bytes) = (stamp(&config.origin), std::fs::read(&config.origin).ok());
        let trigger = Arc::new(Notify::new());
        let loading = Arc::default();
        Reloader { config, shared, acceptor, trust, trigger, stamps, config_stamp, config_bytes, loading }
    }

    pub fn handle(&self) -> ReloadHandle {
        ReloadHandle(self.trigger.clone())
    }

    /// Reload on every trigger and every file change until `stop`.
    ///
    /// The files are read, parsed and checked on a blocking thread, not on the runtime that runs this task: a
    /// policy of 10,000 roles takes about a second to parse, and the accept loop, the metrics and health
    /// endpoints and the upstream probe share that runtime (a file that does not answer, such as a FIFO or a hung
    /// network mount, would stop them for good). Putting the loaded parts in force is a swap. A shutdown does not
    /// wait for a round.
    ///
    /// One round at a time: a SIGHUP during a round is logged (a round that does not end holds back every later
    /// reload, so the operator is told which part it is still loading) and makes another round once it ends;
    /// `etcd_guard_reload_in_progress` is 1 meanwhile.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let every = self.config.reload_check_interval;
        let (trigger, loading) = (self.trigger.clone(), self.loading.clone());
        let in_progress = self.shared.metrics.reload_in_progress.clone();
        let mut reloader = self;
        loop {
            let requested = tokio::select! {
                _ = trigger.notified() => true,
                _ = sleep_or_forever(every) => false,
                _ = stop.changed() => return,
            };
            in_progress.set(1);
            let round = tokio::task::spawn_blocking(move || {
                // A panic (a bug) in any step ends the round as failed, not the reloads: the next round comes.
                if let Err(e) = unwound(|| {
                    reloader.round(requested);
                    Ok(())
                }) {
                    reloader.loading.set(None);
                    error!(error = %e, "reload failed; what was not yet put in force stays as it was");
                    reloader.shared.metrics.reloads.get_or_create(&ResultLabels { result: "failed" }).inc();
                }
                reloader
            });
            let mut told = false;
            let meanwhile = |waiting, after: Duration| {
                told = true;
                let loading = loading.get();
                let seconds = after.as_secs();
                match waiting {
                    Waiting::Requested => warn!(
                        loading,
                        seconds,
                        "reload requested while the previous reload is still loading its files: it runs when that \
                         one ends"
                    ),
                    Waiting::Slow => warn!(
                        loading,
                        seconds,
                        "a reload is still loading its files (a file that does not answer?); later reloads wait for it"
                    ),
                }
            };
            let started = tokio::time::Instant::now();
            // The round ends on its thread, or not at all: the shutdown does not wait for it (see `cli`).
            let Some((joined, again)) = wait_round(round, &trigger, &mut stop, meanwhile).await else {
                in_progress.set(0);
                return;
            };
            in_progress.set(0);
            reloader = match joined {
                Ok(r) => r,
                Err(e) => {
                    // Only if the blocking pool could not run the round at all (the round catches panics).
                    error!(error = %e, "the reloader failed: no more reloads until etcd-guard restarts");
                    return;
                }
            };
            if told {
                info!(seconds = started.elapsed().as_secs(), "the slow reload ended");
            }
            if again {
                trigger.notify_one();
            }
        }
    }

    /// One round: the parts asked for (all of them), or those whose files changed.
    fn round(&mut self, requested: bool) {
        let changed = if requested {
            info!("reload requested");
            vec![Part::Policy, Part::Listener, Part::Upstream]
        } else {
            self.loading.set(Some("checking the files for changes".to_owned()));
            self.changed_parts()
        };
        for part in changed {
            self.reload(part);
        }
        self.loading.set(Some(format!("the configuration file {}", self.config.origin.display())));
        self.note_config_change();
        self.loading.set(None);
    }

    /// A configuration file that changed since start is not applied (only the files it names are reloaded): say so
    /// once per change, or an edited `policy_file:` or listener setting would look applied after a SIGHUP.
    /// Only a change of its bytes counts: a `chmod`, or a Kubernetes ConfigMap update that swaps every file's
    /// inode, does not.
    fn note_config_change(&mut self) {
        let now = stamp(&self.config.origin);
        if now == self.config_stamp {
            return;
        }
        self.config_stamp = now;
        let bytes = std::fs::read(&self.config.origin).ok();
        if bytes != self.config_bytes {
            self.config_bytes = bytes;
            warn!(
                file = %self.config.origin.display(),
                "the configuration file changed; it is read only at start (a reload loads the policy and \
                 certificates it named then): restart etcd-guard to apply it"
            );
        }
    }

    /// The parts whose files changed since the last look.
    fn changed_parts(&mut self) -> Vec<Part> {
        let mut parts = Vec::new();
        for (part, path, old) in &mut self.stamps {
            let now = stamp(path);
            if now != *old {
                *old = now;
                if !parts.contains(part) {
                    info!(file = %path.display(), "file changed");
                    parts.push(*part);
                }
            }
        }
        parts
    }

    /// Load one part and put it in force, or keep the old one. A loader that panics (a bug) counts as a failed
    /// reload like any other: the part in force stays, and later reloads still happen.
    pub fn reload(&self, part: Part) {
        self.loading.set(Some(self.what(part)));
        let loaded = unwound(|| self.load(part));
        self.loading.set(None);
        let metrics = &self.shared.metrics;
        match loaded {
            Ok(loaded) => {
                self.put_in_force(loaded);
                match part {
                    Part::Policy => info!(part = ?part, file = %self.config.policy_file.display(), "reloaded"),
                    _ => info!(part = ?part, "reloaded"),
                }
                metrics.reloads.get_or_create(&ResultLabels { result: "ok" }).inc();
            }
            Err(e) => {
                error!(part = ?part, error = %e, "reload refused; the previous version stays in force");
                metrics.reloads.get_or_create(&ResultLabels { result: "failed" }).inc();
            }
        }
    }

    /// What loading `part` reads, for the warnings of a slow round.
    fn what(&self, part: Part) -> String {
        let files = |part| {
            let names: Vec<_> = self
                .stamps
                .iter()
                .filter(|(p, ..)| *p == part)
                .map(|(_, path, _)| path.display().to_string())
                .collect();
            names.join(", ")
        };
        match part {
            Part::Policy => format!("the policy {}", self.config.policy_file.display()),
            Part::Listener => format!("the listener's files ({})", files(Part::Listener)),
            Part::Upstream => format!("the upstream files ({})", files(Part::Upstream)),
        }
    }

    /// Read, parse and check one part, changing nothing.
    fn load(&self, part: Part) -> Result<Loaded, String> {
        match part {
            // An editor or `cat >` empties the file before it writes the new one: a reload that comes in between
            // must not take every permission away (and cancel every watch): `load_in_force` refuses it.
            Part::Policy => {
                let policy = Policy::load_in_force(&self.config.policy_file).map_err(|e| e.to_string())?;
                crate::server::check_issuers(&policy, &self.config.tls)?;
                for warning in policy.warnings() {
                    warn!("{warning}");
                }
                Ok(Loaded::Policy(Box::new(policy)))
            }
            Part::Listener => tls::server_config(&self.config.tls).map(Loaded::Listener).map_err(|e| e.to_string()),
            Part::Upstream => {
                tls::upstream_connections(&self.config.upstream).map(Loaded::Upstream).map_err(|e| e.to_string())
            }
        }
    }

    /// Put a loaded part in force (swaps, then the metrics that describe what is in force).
    fn put_in_force(&self, loaded: Loaded) {
        match loaded {
            Loaded::Policy(policy) => self.shared.replace_policy(*policy),
            Loaded::Listener(tls) => {
                // New handshakes first, then open connections (see `ClientTrust::watch`).
                *self.acceptor.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = tls.acceptor.clone();
                if !self.trust.replace(&tls) {
                    info!("client CA bundle and CRLs unchanged: open connections are not checked again");
                }
                self.shared.metrics.listener(&tls);
                // A new certificate may no longer cover the advertised addresses (checked at start too).
                for warning in tls.advertise_warnings(&self.config.tls.cert_file, &self.config.advertise_client_urls) {
                    warn!("{warning}");
                }
            }
            Loaded::Upstream(tls) => {
                self.shared.upstream.replace(tls.channels);
                self.shared.metrics.certificates(&tls.expiries);
            }
        }
    }
}

/// A part read, parsed and checked, not yet in force.
enum Loaded {
    Policy(Box<Policy>),
    Listener(tls::ServerTls),
    Upstream(tls::UpstreamTls),
}

// === impl Loading ===

impl Loading {
    fn set(&self, what: Option<String>) {
        *self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = what;
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

/// `load`'s result, or its panic as an error (the panic's message is logged by the panic hook too).
fn unwound<T>(load: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(load)) {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".to_string());
            Err(format!("the loader failed (a bug in etcd-guard; please report it): {message}"))
        }
    }
}

/// What happens while a round loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// A reload was requested (it runs once the round ends).
    Requested,
    /// The round has been loading for [`SLOW_ROUND`], twice that, four times, …
    Slow,
}

/// Wait for `round` to end, telling `meanwhile` of what happens meanwhile with the time since it began; `None` if
/// `stop` changes first. With the round's result: whether a reload was requested meanwhile.
async fn wait_round<T>(
    round: impl Future<Output = T>,
    trigger: &Notify,
    stop: &mut watch::Receiver<bool>,
    mut meanwhile: impl FnMut(Waiting, Duration),
) -> Option<(T, bool)> {
    let started = tokio::time::Instant::now();
    let mut again = false;
    let slow = tokio::time::sleep(SLOW_ROUND);
    tokio::pin!(round, slow);
    loop {
        tokio::select! {
            result = &mut round => return Some((result, again)),
            _ = trigger.notified() => {
                again = true;
                meanwhile(Waiting::Requested, started.elapsed());
            }
            _ = &mut slow => {
                meanwhile(Waiting::Slow, started.elapsed());
                slow.as_mut().reset(tokio::time::Instant::now() + started.elapsed());
            }
            _ = stop.changed() => return None,
        }
    }
}

async fn sleep_or_forever(every: Option<Duration>) {
    match every {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

fn stamp(path: &PathBuf) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (inode, changed) = {
        use std::os::unix::fs::MetadataExt;
        (m.ino(), (m.ctime(), m.ctime_nsec()))
    };
    #[cfg(not(unix))]
    let (inode, changed) = (0, (0, 0));
    Some(Stamp { modified: m.modified().ok(), len: m.len(), inode, changed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loader_that_panics_is_a_failed_reload() {
        assert_eq!(unwound(|| Ok(())), Ok(()));
        assert_eq!(unwound::<()>(|| Err("bad file".to_string())), Err("bad file".to_string()));
        let e = unwound::<()>(|| panic!("index out of bounds")).err().unwrap_or_default();
        assert!(e.contains("a bug in etcd-guard") && e.contains("index out of bounds"), "{e}");
        let part = 3;
        let e = unwound::<()>(|| panic!("part {part}")).err().unwrap_or_default();
        assert!(e.ends_with("part 3"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_round_is_told_of_at_doubling_intervals_and_a_request_meanwhile_is_kept() {
        let trigger = Arc::new(Notify::new());
        let (_stop_tx, mut stop) = watch::channel(false);
        let requester = trigger.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(45)).await;
            requester.notify_one();
        });
        let round = async {
            tokio::time::sleep(Duration::from_secs(250)).await;
            "done"
        };
        let mut told = Vec::new();
        let tell = |w, after: Duration| {
            told.push((w, after.as_secs()));
            assert!(told.len() < 10, "told again and again: {told:?}");
        };
        let waited = wait_round(round, &trigger, &mut stop, tell).await;
        assert_eq!(waited, Some(("done", true)));
        use Waiting::*;
        assert_eq!(told, [(Slow, 30), (Requested, 45), (Slow, 60), (Slow, 120), (Slow, 240)]);

        // A quick round: nothing to tell, nothing requested; a stop ends the wait.
        let quick = wait_round(async { 1 }, &trigger, &mut stop, |w, _| panic!("{w:?}")).await;
        assert_eq!(quick, Some((1, false)));
        let (stop_tx, mut stop) = watch::channel(false);
        let stopping = async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let _ = stop_tx.send(true);
        };
        tokio::spawn(stopping);
        let never = wait_round(std::future::pending::<()>(), &trigger, &mut stop, |_, _| {}).await;
        assert_eq!(never, None);
    }
}
