//! An io_uring owned by one dedicated thread.
//!
//! tokio's reactor is epoll-based and O_DIRECT file I/O never shows up as "ready", so
//! rather than blocking a pool thread per request we hand requests to a thread that
//! keeps them all in flight in one ring. The async side sends an operation through a
//! channel and pokes an eventfd that the ring itself is reading, so the thread sleeps
//! in a single `io_uring_enter` whether it waits for new work or for completions.
//! Buffers travel with the operation and live in the thread while the kernel uses
//! them, so a caller that drops its future cannot free memory under the kernel.

use super::AlignedBuf;
use io_uring::{opcode, types, IoUring};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use tokio::sync::oneshot;

const RING_ENTRIES: u32 = 256;
/// In-flight I/O limit: one slot stays free for the eventfd read.
const MAX_IN_FLIGHT: usize = 240;
const WAKE: u64 = u64::MAX;

/// One operation for the ring thread.
pub(crate) enum Op {
    Read {
        offset: u64,
        buf: AlignedBuf,
        done: oneshot::Sender<io::Result<AlignedBuf>>,
    },
    Write {
        offset: u64,
        buf: AlignedBuf,
        done: oneshot::Sender<io::Result<()>>,
    },
    Fsync {
        done: oneshot::Sender<io::Result<()>>,
    },
}

struct InFlight {
    op: Op,
    /// Bytes already transferred (short reads/writes are resubmitted for the rest).
    done_bytes: usize,
}

/// Handle to the ring thread; dropping it stops the thread once its work drains.
#[derive(Debug)]
pub(crate) struct Ring {
    tx: Option<mpsc::Sender<Op>>,
    wake: Arc<Wake>,
}

#[derive(Debug)]
struct Wake {
    fd: OwnedFd,
    pending: AtomicBool,
}

impl Wake {
    fn poke(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local u64 to an eventfd we own.
            let _ = unsafe { libc::write(self.fd.as_raw_fd(), std::ptr::addr_of!(one).cast(), 8) };
        }
    }
}

impl Ring {
    /// Start a ring thread for `file`; the thread keeps the file open until it exits,
    /// so no queued operation can ever reach a closed (or reused) descriptor.
    pub(crate) fn start(file: Arc<std::fs::File>, name: &str) -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: plain eventfd creation; the return value is checked below.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor we own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(efd) };
        let wake = Arc::new(Wake {
            fd,
            pending: AtomicBool::new(false),
        });
        let (tx, rx) = mpsc::channel();
        let w2 = Arc::clone(&wake);
        std::thread::Builder::new()
            .name(format!("uring:{name}"))
            .spawn(move || run(ring, &file, rx, &w2))?;
        Ok(Self { tx: Some(tx), wake })
    }

    pub(crate) fn submit(&self, op: Op) -> Result<(), Op> {
        let Some(tx) = &self.tx else { return Err(op) };
        tx.send(op).map_err(|e| e.0)?;
        self.wake.poke();
        Ok(())
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Disconnect first, then poke, so the woken thread sees the disconnection.
        drop(self.tx.take());
        self.wake.pending.store(false, Ordering::Release);
        self.wake.poke();
    }
}

fn sqe_for(fd: RawFd, f: &mut InFlight, key: u64) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    let skip = f.done_bytes;
    match &mut f.op {
        Op::Read { offset, buf, .. } => {
            let rest = buf.len() - skip;
            // SAFETY (pointer arithmetic): skip <= len, so the result stays in bounds.
            let ptr = buf.as_mut_ptr().wrapping_add(skip);
            opcode::Read::new(fd, ptr, u32::try_from(rest).unwrap_or(u32::MAX))
                .offset(offset.saturating_add(u64::try_from(skip).unwrap_or(0)))
                .build()
                .user_data(key)
        }
        Op::Write { offset, buf, .. } => {
            let rest = buf.len() - skip;
            let ptr = buf.as_mut_ptr().wrapping_add(skip).cast_const();
            opcode::Write::new(fd, ptr, u32::try_from(rest).unwrap_or(u32::MAX))
                .offset(offset.saturating_add(u64::try_from(skip).unwrap_or(0)))
                .build()
                .user_data(key)
        }
        Op::Fsync { .. } => opcode::Fsync::new(fd)
            .flags(types::FsyncFlags::DATASYNC)
            .build()
            .user_data(key),
    }
}

fn finish(op: Op, res: io::Result<()>) {
    match op {
        Op::Read { buf, done, .. } => {
            let _ = done.send(res.map(|()| buf));
        }
        Op::Write { done, .. } | Op::Fsync { done } => {
            let _ = done.send(res);
        }
    }
}

fn run(mut ring: IoUring, file: &std::fs::File, rx: mpsc::Receiver<Op>, wake: &Wake) {
    let fd = file.as_raw_fd();
    let mut slots: Vec<Option<InFlight>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut backlog: VecDeque<InFlight> = VecDeque::new();
    let mut in_flight = 0usize;
    let mut closing = false;
    let mut wake_buf = Box::new([0u8; 8]);
    let mut wake_armed = false;
    let mut to_push: Vec<io_uring::squeue::Entry> = Vec::new();
    let mut cqes: Vec<(u64, i32)> = Vec::new();

    loop {
        // Take new work when woken.
        if !wake_armed && !closing {
            wake.pending.store(false, Ordering::Release);
            loop {
                match rx.try_recv() {
                    Ok(op) => backlog.push_back(InFlight { op, done_bytes: 0 }),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        closing = true;
                        break;
                    }
                }
            }
            if !closing {
                let e = opcode::Read::new(types::Fd(wake.fd.as_raw_fd()), wake_buf.as_mut_ptr(), 8)
                    .build()
                    .user_data(WAKE);
                to_push.push(e);
                wake_armed = true;
            }
        }
        while in_flight < MAX_IN_FLIGHT {
            let Some(mut f) = backlog.pop_front() else {
                break;
            };
            let idx = free.pop().unwrap_or_else(|| {
                slots.push(None);
                slots.len() - 1
            });
            let key = u64::try_from(idx).unwrap_or(0);
            to_push.push(sqe_for(fd, &mut f, key));
            slots[idx] = Some(f);
            in_flight += 1;
        }
        for e in to_push.drain(..) {
            // SAFETY: every buffer referenced by an SQE is owned by an InFlight in
            // `slots` (or is `wake_buf`, alive for the whole loop) and is not moved or
            // freed until its CQE has been reaped below.
            while unsafe { ring.submission().push(&e) }.is_err() {
                let _ = ring.submit();
            }
        }
        if closing && in_flight == 0 && backlog.is_empty() {
            // The WAKE read may still be armed; leave it: the ring is torn down with
            // the thread and the eventfd outlives it through `wake`.
            if !wake_armed {
                return;
            }
        }
        match ring.submit_and_wait(1) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => {
                // The ring is broken: fail everything and stop.
                tracing::error!("io_uring submit failed: {e}");
                for f in slots
                    .iter_mut()
                    .filter_map(Option::take)
                    .chain(backlog.drain(..))
                {
                    finish(f.op, Err(io::Error::new(e.kind(), e.to_string())));
                }
                return;
            }
        }
        cqes.extend(ring.completion().map(|c| (c.user_data(), c.result())));
        for (key, res) in cqes.drain(..) {
            if key == WAKE {
                wake_armed = false;
                if closing && in_flight == 0 {
                    return;
                }
                continue;
            }
            let Ok(idx) = usize::try_from(key) else {
                continue;
            };
            let Some(mut f) = slots.get_mut(idx).and_then(Option::take) else {
                continue;
            };
            free.push(idx);
            in_flight -= 1;
            if res < 0 {
                finish(f.op, Err(io::Error::from_raw_os_error(-res)));
                continue;
            }
            let n = usize::try_from(res).unwrap_or(0);
            let total = match &f.op {
                Op::Read { buf, .. } | Op::Write { buf, .. } => buf.len(),
                Op::Fsync { .. } => 0,
            };
            f.done_bytes = f.done_bytes.saturating_add(n);
            if f.done_bytes >= total {
                finish(f.op, Ok(()));
            } else if n == 0 {
                finish(f.op, Err(io::Error::from(io::ErrorKind::UnexpectedEof)));
            } else {
                // Short transfer: go again for the rest, ahead of new work.
                backlog.push_front(f);
            }
        }
        if closing && in_flight == 0 && backlog.is_empty() && !wake_armed {
            return;
        }
    }
}
