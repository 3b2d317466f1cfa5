//! Worker threads: one single-threaded tokio runtime per thread, each serving its share of the client connections
//! with upstream connections of its own (as Envoy's workers do).
//!
//! A call is then read, checked, forwarded, answered and audited on one thread: no task wake-ups between threads
//! and no work stealing. Measured on a 2-core machine shared with etcd, a multi-threaded runtime spent 5–20 µs
//! more per request on those hand-offs than one thread (BENCHMARKS.md). Connections are given to the workers in
//! turn as they are accepted; one connection never uses more than one worker.

use std::cell::Cell;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The worker that runs on this thread, if this is a worker thread.
pub fn current_worker() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// Worker threads when the configuration does not say: half the cores this process may use (rounded up), since the
/// proxy usually shares its node with etcd (and kube-apiserver) and costs a fraction of etcd's CPU per call.
/// Measured on a 2-core machine shared with etcd (and the load generator), 8 client connections on one worker cost
/// the proxy 9–16 µs less per call than on two: each worker's upstream connection carries more calls per read and
/// write, and one thread wakes up instead of two (BENCHMARKS.md). On larger nodes "half" is reasoning, not a
/// measurement. `cores` is what [`std::thread::available_parallelism`] says (it counts a container's CPU quota).
pub fn default_worker_threads(cores: usize) -> usize {
    cores.div_ceil(2).max(1)
}

/// Running worker threads.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
}

// === impl Workers ===

impl Workers {
    /// Start `n` worker threads (at least one), each driving its own runtime until [`Workers::stop`].
    pub fn start(n: usize) -> std::io::Result<Workers> {
        let mut workers = Workers { handles: Vec::new(), stops: Vec::new(), threads: Vec::new() };
        for index in 0..n.max(1) {
            let (handle_tx, handle_rx) = std::sync::mpsc::channel();
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new().name(format!("etcd-guard-worker-{index}")).spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e));
                        return;
                    }
                };
                WORKER.with(|w| w.set(Some(index)));
                let _ = handle_tx.send(Ok(runtime.handle().clone()));
                // The runtime runs its tasks only while this thread waits in it. Dropping it afterwards cancels
                // what is left (the caller stops the workers once the connections are drained).
                runtime.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
            workers.threads.push(thread);
            workers.stops.push(stop_tx);
            let handle = handle_rx.recv().map_err(|_| std::io::Error::other("a worker thread ended while starting"))?;
            workers.handles.push(handle?);
        }
        Ok(workers)
    }

    /// One handle per worker, to spawn onto it.
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    /// Stop every worker (tasks still running are cancelled) and wait for the threads to end.
    pub fn stop(mut self) {
        for stop in std::mem::take(&mut self.stops) {
            let _ = stop.send(());
        }
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}

impl Drop for Workers {
    /// Workers not stopped explicitly are told to stop (not waited for).
    fn drop(&mut self) {
        for stop in std::mem::take(&mut self.stops) {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_worker_threads_are_half_the_cores_rounded_up() {
        let defaults: Vec<usize> = [0, 1, 2, 3, 4, 8, 64].into_iter().map(default_worker_threads).collect();
        assert_eq!(defaults, [1, 1, 1, 2, 2, 4, 32]);
    }

    #[test]
    fn tasks_run_on_their_worker_and_know_it() -> Result<(), Box<dyn std::error::Error>> {
        assert_eq!(current_worker(), None);
        let workers = Workers::start(2)?;
        let handles = workers.handles();
        for (i, h) in handles.iter().enumerate() {
            let (tx, rx) = std::sync::mpsc::channel();
            h.spawn(async move {
                let _ = tx.send((current_worker(), std::thread::current().name().map(str::to_string)));
            });
            let (worker, name) = rx.recv_timeout(std::time::Duration::from_secs(5))?;
            assert_eq!(worker, Some(i));
            assert_eq!(name, Some(format!("etcd-guard-worker-{i}")));
        }
        workers.stop();
        Ok(())
    }
}
