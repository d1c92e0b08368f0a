//! A volume served as a block device: the volume's owner task and the handle
//! front-ends call.
//!
//! The owner task runs on the volume's reactor and is the only code that touches the
//! [`Volume`]. Front-ends send requests through a channel; the task takes whatever is
//! queued (up to [`MAX_BATCH`]) and runs consecutive writes as one group commit
//! ([`Volume::write_batch`]): at queue depth 32 the writes of a batch share rows and one
//! seal, which is what brings the write amplification of small random writes down to
//! the layout's (k + m) / k. Flushes and zeroing run in arrival order between the
//! groups. A read is resolved against the map in its arrival order too (so a read
//! queued after a write sees it), then runs as its own task ([`Volume::plan_read`]):
//! many reads are in flight at once, and the owner only takes their results back
//! (unpinning segments, queueing repairs) when they finish.
//!
//! Between batches the task writes back repaired pieces and, when the volume's space
//! runs out, collects garbage and retries the writes once. When every handle is gone
//! (or on [`VolumeDevice::close`]) it flushes, checkpoints and releases the volume.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use super::{ReadDone, RebuildProgress, Volume, VolumeError, VolumeStats};
use crate::api::service::LatencyHistogram;
use crate::frontend::{check_range, BlockDevice, DeviceError, DeviceFuture, IoHints};

impl Default for DeviceCounters {
    fn default() -> Self {
        Self {
            reads: 0,
            writes: 0,
            read_bytes: 0,
            write_bytes: 0,
            flushes: 0,
            errors: 0,
            read_latency: LatencyHistogram::new(&LatencyHistogram::DEFAULT_BOUNDS),
            write_latency: LatencyHistogram::new(&LatencyHistogram::DEFAULT_BOUNDS),
            volume: VolumeStats::default(),
            degraded: false,
            pending_repairs: 0,
            rebuild: None,
            last_error: None,
            failure_log: FailureLog::default(),
        }
    }
}

/// Most requests taken from the queue at once.
pub const MAX_BATCH: usize = 64;
/// Queue length per volume.
const QUEUE: usize = 256;
/// Live share below which a segment is collected when space runs out.
const GC_THRESHOLD: f64 = 0.75;

/// Counters the owner task keeps for metrics.
#[derive(Debug, Clone)]
pub struct DeviceCounters {
    /// Reads completed.
    pub reads: u64,
    /// Writes (and write zeroes) completed.
    pub writes: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Read latency, from submission to completion.
    pub read_latency: LatencyHistogram,
    /// Write latency.
    pub write_latency: LatencyHistogram,
    /// The volume's own counters, as of the last batch.
    pub volume: VolumeStats,
    /// Whether reads needed reconstruction, repairs are pending or writes avoid nodes.
    pub degraded: bool,
    /// Repairs waiting.
    pub pending_repairs: u64,
    /// The rebuild started on this volume, if any (complete when no piece is left).
    pub rebuild: Option<RebuildProgress>,
    /// The last request failure, for status and logs.
    pub last_error: Option<String>,
    failure_log: FailureLog,
}

/// Rate limit of the failure log: a volume whose node is down fails every request
/// the same way, and one line per interval says as much as thousands.
const FAILURE_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone, Default)]
struct FailureLog {
    logged_at: Option<Instant>,
    unlogged: u64,
}

/// Counts a failed request and logs it (at most once per [`FAILURE_LOG_INTERVAL`],
/// with the number of failures not logged since).
fn record_failure(counters: &Mutex<DeviceCounters>, volume: &str, what: &str, e: &DeviceError) {
    record(counters, |c| {
        c.errors += 1;
        c.last_error = Some(format!("{what}: {e}"));
        let due = c
            .failure_log
            .logged_at
            .is_none_or(|t| t.elapsed() >= FAILURE_LOG_INTERVAL);
        if due {
            tracing::warn!(
                volume,
                request = what,
                error = %e,
                failures_not_logged = c.failure_log.unlogged,
                "request failed"
            );
            c.failure_log = FailureLog {
                logged_at: Some(Instant::now()),
                unlogged: 0,
            };
        } else {
            c.failure_log.unlogged += 1;
        }
    });
}

enum Request {
    Read(
        u64,
        u64,
        Instant,
        oneshot::Sender<Result<Vec<u8>, DeviceError>>,
    ),
    Write(
        u64,
        Vec<u8>,
        bool,
        Instant,
        oneshot::Sender<Result<(), DeviceError>>,
    ),
    Flush(oneshot::Sender<Result<(), DeviceError>>),
    Zeroes(
        u64,
        u64,
        bool,
        Instant,
        oneshot::Sender<Result<(), DeviceError>>,
    ),
    Rebuild(Vec<String>, u64, oneshot::Sender<Result<(), DeviceError>>),
    Gc(f64, usize, oneshot::Sender<Result<u64, DeviceError>>),
    Grow(u64, oneshot::Sender<Result<(), DeviceError>>),
    Close(oneshot::Sender<Result<(), DeviceError>>),
}

/// The handle front-ends use. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct VolumeDevice {
    name: String,
    /// Bytes; grows with [`VolumeDevice::grow`] (front-ends read it per connection).
    size: std::sync::atomic::AtomicU64,
    write_cache: bool,
    hints: IoHints,
    tx: mpsc::Sender<Request>,
    counters: Arc<Mutex<DeviceCounters>>,
    /// Nodes a rebuild was started off (see [`VolumeDevice::rebuild_nodes`]).
    rebuild_nodes: Mutex<Vec<String>>,
}

fn device_error(e: VolumeError) -> DeviceError {
    match e {
        VolumeError::OutOfRange {
            lba,
            blocks,
            capacity,
        } => DeviceError::OutOfRange {
            offset: lba.saturating_mul(4096),
            len: blocks.saturating_mul(4096),
            size: capacity.saturating_mul(4096),
        },
        VolumeError::BadLength { len } => DeviceError::Misaligned {
            offset: 0,
            len: len as u64,
            block_size: 4096,
        },
        VolumeError::NoSpace { reason } => DeviceError::NoSpace(reason),
        VolumeError::Media { .. } => DeviceError::Media(e.to_string()),
        other => DeviceError::Unavailable(other.to_string()),
    }
}

impl VolumeDevice {
    /// Starts the owner task of `volume` on the current runtime (call it on the
    /// volume's reactor) and returns the handle. `on_close` runs after the final
    /// checkpoint (the pool releases the volume there).
    pub fn spawn<F>(name: String, volume: Volume, on_close: F) -> Arc<Self>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let size = volume.config().blocks.saturating_mul(4096);
        let write_cache = volume.config().write_cache;
        let hints = hints(volume.config());
        let (tx, rx) = mpsc::channel(QUEUE);
        let counters = Arc::new(Mutex::new(DeviceCounters::default()));
        tokio::spawn(owner(
            name.clone(),
            volume,
            rx,
            Arc::clone(&counters),
            on_close,
        ));
        Arc::new(Self {
            name,
            size: std::sync::atomic::AtomicU64::new(size),
            write_cache,
            hints,
            tx,
            counters,
            rebuild_nodes: Mutex::new(Vec::new()),
        })
    }

    /// The volume's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A copy of the counters (cumulative since the volume was opened).
    pub fn counters(&self) -> DeviceCounters {
        self.counters.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Starts moving every piece on `nodes` elsewhere (see `Volume::start_rebuild`), at
    /// most `bytes_per_second` of rebuilt pieces, in steps between foreground requests.
    /// Returns once the rebuild is set up; progress shows in [`DeviceCounters::rebuild`]
    /// from then on.
    pub async fn rebuild(
        &self,
        nodes: Vec<String>,
        bytes_per_second: u64,
    ) -> Result<(), DeviceError> {
        self.call(|r| Request::Rebuild(nodes.clone(), bytes_per_second, r))
            .await?;
        if let Ok(mut all) = self.rebuild_nodes.lock() {
            for n in nodes {
                if !all.contains(&n) {
                    all.push(n);
                }
            }
        }
        Ok(())
    }

    /// The nodes the rebuilds started on this handle move pieces off.
    pub fn rebuild_nodes(&self) -> Vec<String> {
        self.rebuild_nodes
            .lock()
            .map(|n| n.clone())
            .unwrap_or_default()
    }

    /// Runs one garbage collection pass over at most `max_segments` segments whose live
    /// share is below `threshold` (see `Volume::collect_garbage`); returns the segments
    /// freed.
    pub async fn collect_garbage(
        &self,
        threshold: f64,
        max_segments: usize,
    ) -> Result<u64, DeviceError> {
        self.call(|r| Request::Gc(threshold, max_segments, r)).await
    }

    /// Grows the open volume to `bytes` (the pool has recorded the size). Requests
    /// already accepted are unaffected; connections made afterwards see the new size.
    pub async fn grow(&self, bytes: u64) -> Result<(), DeviceError> {
        let blocks = bytes / 4096;
        self.call(|r| Request::Grow(blocks, r)).await?;
        self.size.fetch_max(
            blocks.saturating_mul(4096),
            std::sync::atomic::Ordering::AcqRel,
        );
        Ok(())
    }

    /// Flushes, checkpoints and stops the owner task.
    pub async fn close(&self) -> Result<(), DeviceError> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Request::Close(tx)).await.is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }

    async fn call<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, DeviceError>>) -> Request,
    ) -> Result<T, DeviceError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| DeviceError::Unavailable(format!("volume {} is closed", self.name)))?;
        rx.await
            .map_err(|_| DeviceError::Unavailable(format!("volume {} stopped", self.name)))?
    }
}

impl BlockDevice for VolumeDevice {
    fn size_bytes(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::Acquire)
    }
    fn block_size(&self) -> u32 {
        4096
    }
    fn read_only(&self) -> bool {
        false
    }
    fn volatile_write_cache(&self) -> bool {
        self.write_cache
    }
    fn io_hints(&self) -> IoHints {
        self.hints
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        Box::pin(async move {
            check_range(self, offset, len)?;
            self.call(|r| Request::Read(offset / 4096, len / 4096, Instant::now(), r))
                .await
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            check_range(self, offset, data.len() as u64)?;
            self.call(|r| Request::Write(offset / 4096, data, fua, Instant::now(), r))
                .await
        })
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        Box::pin(async move { self.call(Request::Flush).await })
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            check_range(self, offset, len)?;
            self.call(|r| Request::Zeroes(offset / 4096, len / 4096, false, Instant::now(), r))
                .await
        })
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()> {
        Box::pin(async move {
            check_range(self, offset, len)?;
            self.call(|r| Request::Zeroes(offset / 4096, len / 4096, fua, Instant::now(), r))
                .await
        })
    }
}

/// What a volume's layout says about driving it fast: a write of whole, aligned
/// compression units becomes whole records (so a later aligned read opens one record
/// on one node), and a write of one row's data (k strips) fills a row by itself.
fn hints(c: &super::VolumeConfig) -> IoHints {
    let unit = u64::from(c.compression_unit);
    let k = u64::try_from(c.k).unwrap_or(1);
    IoHints {
        write_granularity: unit,
        io_boundary: unit,
        optimal_write_size: c.strip_size.saturating_mul(k) / 4096 * 4096,
    }
}

type PendingWrite = (
    u64,
    Vec<u8>,
    bool,
    Instant,
    oneshot::Sender<Result<(), DeviceError>>,
);

async fn owner<F>(
    name: String,
    mut volume: Volume,
    mut rx: mpsc::Receiver<Request>,
    counters: Arc<Mutex<DeviceCounters>>,
    on_close: F,
) where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let mut closing = None;
    // Reads run as their own tasks; each reports back here when it is done.
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<ReadDone>();
    let mut pace = Pace::default();
    loop {
        let due = pace.next;
        let first = tokio::select! {
            Some(done) = done_rx.recv() => {
                volume.finish_read(done);
                continue;
            }
            r = rx.recv() => match r {
                Some(r) => r,
                None => break,
            },
            () = tokio::time::sleep_until(due), if volume.rebuild_pending() => {
                pace.step(&mut volume).await;
                publish(&volume, &counters);
                continue;
            }
        };
        while let Ok(done) = done_rx.try_recv() {
            volume.finish_read(done);
        }
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut writes: Vec<PendingWrite> = Vec::new();
        for req in batch {
            if let Request::Write(lba, data, fua, at, reply) = req {
                writes.push((lba, data, fua, at, reply));
                continue;
            }
            if !writes.is_empty() {
                run_writes(
                    &name,
                    &mut volume,
                    std::mem::take(&mut writes),
                    &counters,
                    &mut done_rx,
                )
                .await;
            }
            match req {
                Request::Read(lba, blocks, at, reply) => match volume.plan_read(lba, blocks) {
                    Ok(plan) => {
                        let counters = Arc::clone(&counters);
                        let done_tx = done_tx.clone();
                        let name = name.clone();
                        tokio::spawn(async move {
                            let (r, done) = plan.execute().await;
                            let r = r.map_err(device_error);
                            match &r {
                                Ok(d) => record(&counters, |c| {
                                    c.reads += 1;
                                    c.read_bytes += d.len() as u64;
                                    c.read_latency.record(at.elapsed().as_secs_f64());
                                }),
                                Err(e) => record_failure(&counters, &name, "read", e),
                            }
                            let _gone = reply.send(r);
                            // The owner outlives every read it spawned (it waits for
                            // them before it stops), so this cannot fail.
                            let _sent = done_tx.send(done);
                        });
                    }
                    Err(e) => {
                        let e = device_error(e);
                        record_failure(&counters, &name, "read", &e);
                        let _gone = reply.send(Err(e));
                    }
                },
                Request::Flush(reply) => {
                    let r = volume.flush().await.map_err(device_error);
                    match &r {
                        Ok(()) => record(&counters, |c| c.flushes += 1),
                        Err(e) => record_failure(&counters, &name, "flush", e),
                    }
                    let _gone = reply.send(r);
                }
                Request::Zeroes(lba, blocks, fua, at, reply) => {
                    let r = volume
                        .write_zeroes(lba, blocks, fua)
                        .await
                        .map_err(device_error);
                    match &r {
                        Ok(()) => record(&counters, |c| {
                            c.writes += 1;
                            c.write_latency.record(at.elapsed().as_secs_f64());
                        }),
                        Err(e) => record_failure(&counters, &name, "write zeroes", e),
                    }
                    let _gone = reply.send(r);
                }
                Request::Gc(threshold, max, reply) => {
                    let r = volume
                        .collect_garbage(threshold, max)
                        .await
                        .map(|g| g.segments_freed)
                        .map_err(device_error);
                    let _gone = reply.send(r);
                }
                Request::Grow(blocks, reply) => {
                    let _gone = reply.send(volume.grow(blocks).map_err(device_error));
                }
                Request::Rebuild(nodes, rate, reply) => {
                    pace.rate = rate.max(1);
                    let r = volume.start_rebuild(&nodes).await.map_err(device_error);
                    // The caller reads the progress as soon as this returns (the
                    // supervisor closes a volume whose rebuild shows none).
                    publish(&volume, &counters);
                    let _gone = reply.send(r);
                }
                Request::Close(reply) => {
                    closing = Some(reply);
                    break;
                }
                Request::Write(..) => {}
            }
        }
        if !writes.is_empty() {
            run_writes(&name, &mut volume, writes, &counters, &mut done_rx).await;
        }
        if volume.pending_repairs() > 0 {
            volume.run_repairs().await;
        }
        // Under constant load the idle timer above never wins: take a step here when
        // one is due, so the rebuild progresses at its pace either way.
        if volume.rebuild_pending() && tokio::time::Instant::now() >= pace.next {
            pace.step(&mut volume).await;
        }
        publish(&volume, &counters);
        if closing.is_some() {
            break;
        }
    }
    volume.abandon_rebuild().await;
    // Every read spawned must be finished before the final checkpoint, so the
    // segments they pin are released with it.
    while volume.reads_in_flight() > 0 {
        match done_rx.recv().await {
            Some(done) => volume.finish_read(done),
            None => break,
        }
    }
    let r = volume.checkpoint(Vec::new()).await.map_err(device_error);
    publish(&volume, &counters);
    on_close.await;
    if let Some(reply) = closing {
        let _gone = reply.send(r);
    }
}

/// Copies the volume's own counters into the shared ones.
fn publish(volume: &Volume, counters: &Mutex<DeviceCounters>) {
    let stats = volume.stats();
    let degraded = volume.pending_repairs() > 0
        || !volume.avoided_nodes().is_empty()
        || volume.rebuild_pending();
    let pending = volume.pending_repairs() as u64;
    let rebuild = volume.rebuild_progress();
    record(counters, |c| {
        c.volume = stats;
        c.degraded = degraded;
        c.pending_repairs = pending;
        c.rebuild = rebuild;
    });
}

/// Bytes of rebuilt pieces per step: small enough that a foreground request waits at
/// most one step (one row group read from k nodes and written to one).
const REBUILD_STEP: u64 = 1 << 20;
/// Default rebuild pace when none was given.
const DEFAULT_REBUILD_RATE: u64 = 64 << 20;

/// When the next rebuild step may run: each step's bytes, at `rate` bytes per second,
/// push the next one back; a failed step waits a second.
#[derive(Debug)]
struct Pace {
    rate: u64,
    next: tokio::time::Instant,
}

impl Default for Pace {
    fn default() -> Self {
        Self {
            rate: DEFAULT_REBUILD_RATE,
            next: tokio::time::Instant::now(),
        }
    }
}

impl Pace {
    async fn step(&mut self, volume: &mut Volume) {
        let now = tokio::time::Instant::now();
        match volume.rebuild_step(REBUILD_STEP).await {
            Ok(bytes) => {
                // Precision loss only matters above 2^52 bytes.
                #[allow(clippy::cast_precision_loss)]
                let secs = bytes as f64 / self.rate.max(1) as f64;
                self.next = now + std::time::Duration::from_secs_f64(secs.min(60.0));
            }
            Err(e) => {
                tracing::warn!(error = %e, "rebuild step failed; retrying in 1 s");
                self.next = now + std::time::Duration::from_secs(1);
            }
        }
    }
}

fn record(counters: &Mutex<DeviceCounters>, f: impl FnOnce(&mut DeviceCounters)) {
    if let Ok(mut c) = counters.lock() {
        f(&mut c);
    }
}

async fn run_writes(
    name: &str,
    volume: &mut Volume,
    writes: Vec<PendingWrite>,
    counters: &Mutex<DeviceCounters>,
    done_rx: &mut mpsc::UnboundedReceiver<ReadDone>,
) {
    let reqs: Vec<(u64, &[u8], bool)> = writes
        .iter()
        .map(|(l, d, f, _, _)| (*l, d.as_slice(), *f))
        .collect();
    let mut results = volume.write_batch(&reqs).await;
    if results
        .iter()
        .any(|r| matches!(r, Err(VolumeError::NoSpace { .. })))
    {
        // Out of space: win some back and try the failed writes again, once. Segments
        // that reads in flight pin are freed only once those reads are done, so let
        // them finish first (they are short), then collect.
        while volume.reads_in_flight() > 0 {
            match done_rx.recv().await {
                Some(done) => volume.finish_read(done),
                None => break,
            }
        }
        let collected = volume.collect_garbage(GC_THRESHOLD, 4).await;
        let released = if volume.has_deferred_frees() {
            volume.checkpoint(Vec::new()).await
        } else {
            Ok(())
        };
        if collected.is_ok() && released.is_ok() {
            let again: Vec<usize> = (0..results.len())
                .filter(|&i| matches!(results[i], Err(VolumeError::NoSpace { .. })))
                .collect();
            let retry: Vec<(u64, &[u8], bool)> = again.iter().map(|&i| reqs[i]).collect();
            for (i, r) in again.into_iter().zip(volume.write_batch(&retry).await) {
                results[i] = r;
            }
        }
    }
    for ((_, data, _, at, reply), r) in writes.into_iter().zip(results) {
        let r = r.map_err(device_error);
        match &r {
            Ok(()) => record(counters, |c| {
                c.writes += 1;
                c.write_bytes += data.len() as u64;
                c.write_latency.record(at.elapsed().as_secs_f64());
            }),
            Err(e) => record_failure(counters, name, "write", e),
        }
        let _gone = reply.send(r);
    }
}
