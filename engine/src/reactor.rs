//! Reactors: one thread per configured core, each running its own single-threaded
//! executor (DESIGN, "Threading").
//!
//! A volume is owned by one reactor for its whole life: its actor task (see
//! `engine::volume::device`) is spawned there and never migrates, so the volume's state
//! needs no lock and its work stays on one core's caches. Front-ends and the control
//! plane run elsewhere and reach a volume only through its channel. Volumes are
//! spread over the reactors round-robin.
//!
//! Deviation from the design card, written down in docs/architecture.md: the NVMe/TCP
//! connections to the nodes are shared by all reactors (one per node, created by the
//! control runtime) rather than one queue pair per reactor per node.

use std::future::Future;
use std::os::unix::thread::JoinHandleExt as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// Why the reactors could not start.
#[derive(Debug, thiserror::Error)]
pub enum ReactorError {
    /// A reactor thread or its runtime could not be created.
    #[error("starting reactor {index}: {reason}")]
    Start {
        /// Which reactor.
        index: usize,
        /// Why.
        reason: String,
    },
}

/// The reactor threads. Dropping this stops them (their tasks are cancelled).
#[derive(Debug)]
pub struct Reactors {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<JoinHandle<()>>,
    clocks: Vec<libc::clockid_t>,
    next: AtomicUsize,
}

/// Cheap clones of the reactors' runtime handles and CPU clocks, for work that shares
/// the reactors with storage (the network module's poller) and for CPU accounting.
#[derive(Debug, Clone)]
pub struct ReactorHandles {
    handles: Vec<Handle>,
    clocks: Vec<libc::clockid_t>,
}

impl ReactorHandles {
    /// The runtime of reactor `index`, if there is one.
    #[must_use]
    pub fn handle(&self, index: usize) -> Option<Handle> {
        self.handles.get(index).cloned()
    }

    /// Number of reactors.
    #[must_use]
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// CPU time (user + system) every reactor thread has used since it started, in
    /// nanoseconds (0 once a thread has ended).
    #[must_use]
    pub fn cpu_ns(&self) -> u64 {
        self.clocks.iter().map(|c| clock_ns(*c)).sum()
    }
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into; a clock of a thread that ended
    // makes the call fail (EINVAL), which is answered with 0.
    let r = unsafe { libc::clock_gettime(clock, &mut ts) };
    if r != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec)
        .unwrap_or(0)
        .saturating_mul(1_000_000_000)
        .saturating_add(u64::try_from(ts.tv_nsec).unwrap_or(0))
}

fn thread_clock(thread: &JoinHandle<()>) -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: the pthread_t belongs to a thread that has not been joined (we hold its
    // JoinHandle), and clock is a valid place to write the clock id.
    let r = unsafe { libc::pthread_getcpuclockid(thread.as_pthread_t(), &mut clock) };
    (r == 0).then_some(clock)
}

impl Reactors {
    /// Starts `count` reactors (at least one).
    pub fn start(count: usize) -> Result<Self, ReactorError> {
        let mut handles = Vec::new();
        let mut stops = Vec::new();
        let mut threads = Vec::new();
        let mut clocks = Vec::new();
        for index in 0..count.max(1) {
            let runtime = Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| ReactorError::Start {
                    index,
                    reason: e.to_string(),
                })?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            let thread = std::thread::Builder::new()
                .name(format!("dpud-reactor-{index}"))
                .spawn(move || {
                    // Runs the reactor's tasks until told to stop (or the sender drops).
                    let _stopped = runtime.block_on(stopped);
                })
                .map_err(|e| ReactorError::Start {
                    index,
                    reason: e.to_string(),
                })?;
            if let Some(c) = thread_clock(&thread) {
                clocks.push(c);
            }
            threads.push(thread);
        }
        Ok(Self {
            handles,
            stops,
            threads,
            clocks,
            next: AtomicUsize::new(0),
        })
    }

    /// Clones of the runtime handles and CPU clocks.
    #[must_use]
    pub fn shared(&self) -> ReactorHandles {
        ReactorHandles {
            handles: self.handles.clone(),
            clocks: self.clocks.clone(),
        }
    }

    /// Number of reactors.
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether there are none (never: `start` makes at least one).
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Every reactor's runtime, in index order (front-ends spread connections over
    /// them).
    pub fn handles(&self) -> Vec<Handle> {
        self.handles.clone()
    }

    /// The next reactor in round-robin order.
    pub fn pick(&self) -> Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len().max(1);
        self.handles[i].clone()
    }

    /// Runs `future` on the next reactor and returns its output.
    pub async fn run<F>(&self, future: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.pick().spawn(future).await.ok()
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            // A reactor that already stopped has nothing to be told.
            let _sent = stop.send(());
        }
        for t in self.threads.drain(..) {
            // A panicked reactor has already reported its panic.
            let _joined = t.join();
        }
    }
}
