//! Hot reload: the policy, the listener's certificate, key, client CA and CRLs, and the upstream client
//! certificate, on SIGHUP (see `cli`) and when their files change. Open connections are not dropped.
//!
//! Each part is loaded in full before it replaces the old one; a part that fails to load is refused with a log
//! line and a metric, and the previous one stays in force.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
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
}

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
        Reloader { config, shared, acceptor, trust, trigger, stamps, config_stamp, config_bytes }
    }

    pub fn handle(&self) -> ReloadHandle {
        ReloadHandle(self.trigger.clone())
    }

    /// Reload on every trigger and every file change until `stop`.
    ///
    /// The files are read, parsed and checked on a blocking thread, not on the runtime that runs this task: a
    /// policy of 10,000 roles takes about a second to parse, and the accept loop, the metrics and health
    /// endpoints and the upstream probe share that runtime (a file that does not answer, such as a FIFO, would
    /// stop them for good). Putting the loaded parts in force is a swap. A shutdown does not wait for a round.
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let every = self.config.reload_check_interval;
        let mut reloader = self;
        loop {
            let requested = tokio::select! {
                _ = reloader.trigger.notified() => true,
                _ = sleep_or_forever(every) => false,
                _ = stop.changed() => return,
            };
            let round = tokio::task::spawn_blocking(move || {
                let changed = if requested {
                    info!("reload requested");
                    vec![Part::Policy, Part::Listener, Part::Upstream]
                } else {
                    reloader.changed_parts()
                };
                for part in changed {
                    reloader.reload(part);
                }
                reloader.note_config_change();
                reloader
            });
            reloader = tokio::select! {
                joined = round => match joined {
                    Ok(r) => r,
                    Err(e) => {
                        // Only a panic (a bug) ends up here; the parts in force stay.
                        error!(error = %e, "the reloader failed: no more reloads until etcd-guard restarts");
                        return;
                    }
                },
                // The round ends on its thread, or not at all: the shutdown does not wait for it (see `cli`).
                _ = stop.changed() => return,
            };
        }
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

    /// Load one part and put it in force, or keep the old one.
    pub fn reload(&self, part: Part) {
        let result = match part {
            // An editor or `cat >` empties the file before it writes the new one: a reload that comes in between
            // must not take every permission away (and cancel every watch): `load_in_force` refuses it.
            Part::Policy => match Policy::load_in_force(&self.config.policy_file) {
                Ok(p) => crate::server::check_issuers(&p, &self.config.tls).map(|()| {
                    for warning in p.warnings() {
                        warn!("{warning}");
                    }
                    self.shared.replace_policy(p)
                }),
                Err(e) => Err(e.to_string()),
            },
            Part::Listener => tls::server_config(&self.config.tls)
                .map(|tls| {
                    self.shared.metrics.listener(&tls);
                    // New handshakes first, then open connections (see `ClientTrust::watch`).
                    *self.acceptor.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = tls.acceptor.clone();
                    if !self.trust.replace(&tls) {
                        info!("client CA bundle and CRLs unchanged: open connections are not checked again");
                    }
                })
                .map_err(|e| e.to_string()),
            Part::Upstream => tls::upstream_connections(&self.config.upstream)
                .map(|tls| {
                    self.shared.metrics.certificates(&tls.expiries);
                    self.shared.upstream.replace(tls.channels)
                })
                .map_err(|e| e.to_string()),
        };
        let metrics = &self.shared.metrics;
        match result {
            Ok(()) => {
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
