//! The poller: moves frames between ports through the data plane in bounded turns.
//!
//! A turn handles at most a budget of received frames and reports the thread CPU
//! time it took, so that the owner (today a dedicated thread, later a storage
//! reactor) decides how often to call it: that is the CPU-share hook. The poller
//! never blocks inside a turn; `wait` is the separate, optional idle sleep for an
//! owner that has nothing else to do.

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use super::afpacket::{self, PortRx, PortTx, RingConfig};
use super::afxdp::{self, XdpConfig};
use super::dataplane::{Dataplane, NetError, PortConfig, Tx};
use super::switch::PortId;

/// What one turn did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TurnReport {
    /// Frames received and processed.
    pub frames: usize,
    /// Frames sent.
    pub sent: usize,
    /// Thread CPU time of the turn.
    pub cpu_ns: u64,
}

/// Totals since the poller started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollerStats {
    /// Turns run.
    pub turns: u64,
    /// Frames received.
    pub rx_frames: u64,
    /// Frames sent.
    pub tx_frames: u64,
    /// Frames not sent because a TX ring was full or the frame too long.
    pub tx_dropped: u64,
    /// I/O errors (the port carries on).
    pub io_errors: u64,
    /// CPU time spent in turns.
    pub cpu_ns: u64,
}

struct Port {
    id: PortId,
    rx: Box<dyn PortRx>,
}

/// The data plane plus its ports' I/O.
pub struct Poller {
    dp: Dataplane,
    rx: Vec<Port>,
    tx: Vec<(PortId, Box<dyn PortTx>)>,
    out: Vec<Tx>,
    start: Instant,
    next_port: usize,
    last_expire: u64,
    stats: PollerStats,
}

impl std::fmt::Debug for Poller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Poller")
            .field(
                "ports",
                &self
                    .rx
                    .iter()
                    .map(|p| (p.id, p.rx.kind()))
                    .collect::<Vec<_>>(),
            )
            .field("stats", &self.stats)
            .finish()
    }
}

/// Errors attaching ports.
#[derive(Debug, thiserror::Error)]
pub enum PollerError {
    /// Data plane configuration.
    #[error(transparent)]
    Config(#[from] NetError),
    /// Opening the device.
    #[error("opening port {0}: {1}")]
    Io(String, io::Error),
}

impl Poller {
    /// A poller around `dp` with no ports yet.
    pub fn new(dp: Dataplane) -> Self {
        Poller {
            dp,
            rx: Vec::new(),
            tx: Vec::new(),
            out: Vec::new(),
            start: Instant::now(),
            next_port: 0,
            last_expire: 0,
            stats: PollerStats::default(),
        }
    }

    /// Nanoseconds since the poller started: the data plane's clock.
    pub fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The data plane, for configuration and stats.
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dp
    }

    /// Totals.
    pub fn stats(&self) -> PollerStats {
        self.stats
    }

    /// (port, I/O kind) of every attached port.
    pub fn port_kinds(&self) -> Vec<(PortId, &'static str)> {
        self.rx.iter().map(|p| (p.id, p.rx.kind())).collect()
    }

    /// Adds a port to the data plane and attaches the given I/O to it.
    pub fn attach(
        &mut self,
        cfg: PortConfig,
        rx: Box<dyn PortRx>,
        tx: Box<dyn PortTx>,
    ) -> Result<PortId, PollerError> {
        let now = self.now();
        let id = self.dp.add_port(cfg, now)?;
        self.rx.push(Port { id, rx });
        self.tx.push((id, tx));
        Ok(id)
    }

    /// Adds a port whose I/O is AF_PACKET (TPACKET_V3) on the kernel device `cfg.name`.
    pub fn attach_device(
        &mut self,
        cfg: PortConfig,
        rings: RingConfig,
    ) -> Result<PortId, PollerError> {
        let (rx, tx) =
            afpacket::open(&cfg.name, rings).map_err(|e| PollerError::Io(cfg.name.clone(), e))?;
        self.attach(cfg, Box::new(rx), Box::new(tx))
    }

    /// Adds a port on the kernel device `cfg.name` with the fastest I/O the device
    /// allows: AF_XDP ([`afxdp`]) where it can be set up, AF_PACKET TPACKET_V3
    /// otherwise. Returns the port and, when it fell back, why AF_XDP was not used.
    pub fn attach_device_auto(
        &mut self,
        cfg: PortConfig,
        xdp: XdpConfig,
        rings: RingConfig,
    ) -> Result<(PortId, Option<String>), PollerError> {
        match afxdp::open(&cfg.name, xdp) {
            Ok((rx, tx, _mode)) => Ok((self.attach(cfg, Box::new(rx), Box::new(tx))?, None)),
            Err(e) => Ok((self.attach_device(cfg, rings)?, Some(e.to_string()))),
        }
    }

    /// Detaches a port and removes it from the data plane.
    pub fn detach(&mut self, id: PortId) -> Result<(), PollerError> {
        self.dp.remove_port(id)?;
        self.rx.retain(|p| p.id != id);
        self.tx.retain(|(p, _)| *p != id);
        Ok(())
    }

    /// Runs one turn: up to `budget` received frames, ports served round robin.
    pub fn turn(&mut self, budget: usize) -> TurnReport {
        let cpu0 = afpacket::thread_cpu_ns();
        let now = self.now();
        if now.saturating_sub(self.last_expire) >= 1_000_000_000 {
            self.dp.expire(now);
            self.last_expire = now;
        }
        let mut report = TurnReport::default();
        let n = self.rx.len();
        let Poller {
            dp,
            rx,
            tx,
            out,
            stats,
            ..
        } = self;
        let first = self.next_port;
        // Passes until the budget is used or the ports are drained; each pass offers
        // every port an equal share of what is left.
        loop {
            let before = report.frames;
            for k in 0..n {
                if report.frames >= budget {
                    break;
                }
                let port = &mut rx[(first + k) % n];
                let in_port = port.id;
                // An equal share of what is left, at least one frame.
                let share = ((budget - report.frames) / (n - k)).max(1);
                let got = port.rx.recv(share, &mut |frame| {
                    out.clear();
                    let _ = dp.process(in_port, frame, now, out);
                    for t in out.iter() {
                        if let Some((_, p)) = tx.iter_mut().find(|(id, _)| *id == t.port) {
                            match p.send(t.bytes(frame)) {
                                Ok(true) => report.sent += 1,
                                Ok(false) => stats.tx_dropped += 1,
                                Err(_) => stats.io_errors += 1,
                            }
                        }
                    }
                });
                match got {
                    Ok(g) => report.frames += g,
                    Err(_) => stats.io_errors += 1,
                }
            }
            if report.frames == before || report.frames >= budget {
                break;
            }
        }
        for (_, p) in tx.iter_mut() {
            if p.flush().is_err() {
                stats.io_errors += 1;
            }
        }
        self.next_port = if n == 0 { 0 } else { (self.next_port + 1) % n };
        report.cpu_ns = afpacket::thread_cpu_ns().saturating_sub(cpu0);
        self.stats.turns += 1;
        self.stats.rx_frames += u64::try_from(report.frames).unwrap_or(0);
        self.stats.tx_frames += u64::try_from(report.sent).unwrap_or(0);
        self.stats.cpu_ns += report.cpu_ns;
        report
    }

    /// Sleeps until a port has frames or `timeout_ms` passes (for an idle owner).
    pub fn wait(&self, timeout_ms: i32) -> io::Result<()> {
        let fds: Vec<RawFd> = self.rx.iter().filter_map(|p| p.rx.fd()).collect();
        if fds.is_empty() {
            std::thread::sleep(std::time::Duration::from_millis(
                u64::try_from(timeout_ms).unwrap_or(0),
            ));
            return Ok(());
        }
        afpacket::wait_readable(&fds, timeout_ms)
    }
}

/// The CPU-share hook: after a turn that used `cpu_ns`, leave the core to other work
/// for `cpu_ns * (1 - share) / share`, so that over time the poller uses at most
/// `share` of the core it runs on. A storage reactor schedules the next turn that
/// much later; a dedicated thread can sleep it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuShare {
    permille: u32,
}

impl CpuShare {
    /// A share in thousandths of a core, clamped to 1..=1000.
    pub fn permille(p: u32) -> CpuShare {
        CpuShare {
            permille: p.clamp(1, 1000),
        }
    }

    /// The share in thousandths.
    pub fn get(&self) -> u32 {
        self.permille
    }

    /// How long to stay away after a turn that used `cpu_ns`.
    pub fn pause_after(&self, cpu_ns: u64) -> std::time::Duration {
        let rest =
            u128::from(cpu_ns) * u128::from(1000 - self.permille) / u128::from(self.permille);
        std::time::Duration::from_nanos(u64::try_from(rest).unwrap_or(u64::MAX))
    }
}

/// In-memory port I/O, for tests and simulations: frames pushed into `inbox` are
/// received, frames sent land in `outbox`.
#[derive(Debug, Default, Clone)]
pub struct MemoryPort {
    /// Frames waiting to be received.
    pub inbox: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<Vec<u8>>>>,
    /// Frames sent.
    pub outbox: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
}

impl PortRx for MemoryPort {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut q = self
            .inbox
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?;
        let mut n = 0;
        while n < max {
            let Some(frame) = q.pop_front() else { break };
            f(&frame);
            n += 1;
        }
        Ok(n)
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    fn fd(&self) -> Option<RawFd> {
        None
    }
}

impl PortTx for MemoryPort {
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        self.outbox
            .lock()
            .map_err(|_| io::Error::other("poisoned"))?
            .push(frame.to_vec());
        Ok(true)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::dataplane::{DataplaneConfig, PortKind};
    use crate::net::packet::{build, MacAddr};
    use crate::net::switch::NetworkId;

    /// A poller that allows every frame, with memory ports "a" and "b" on VLAN 1, and
    /// a frame to feed into "a" (its destination is unknown, so it floods to "b").
    fn two_port_poller() -> (Poller, MemoryPort, MemoryPort, Vec<u8>) {
        let mut dp = Dataplane::new(DataplaneConfig {
            allow_non_ip: true,
            ..Default::default()
        });
        dp.add_rule(crate::net::rules::RuleSpec {
            priority: 0,
            action: crate::net::rules::Action::Allow,
            matches: Default::default(),
        });
        let mut p = Poller::new(dp);
        let a = MemoryPort::default();
        let b = MemoryPort::default();
        let cfg = |n: &str| PortConfig {
            name: n.into(),
            kind: PortKind::Access(NetworkId::Vlan(1)),
            rate_limit: None,
        };
        p.attach(cfg("a"), Box::new(a.clone()), Box::new(a.clone()))
            .unwrap();
        p.attach(cfg("b"), Box::new(b.clone()), Box::new(b.clone()))
            .unwrap();
        let f = build::ethernet(MacAddr([2; 6]), MacAddr([4; 6]), None, 0x88b5, &[0; 46]);
        (p, a, b, f)
    }

    #[test]
    fn cpu_share_pauses() {
        let s = CpuShare::permille(250);
        assert_eq!(
            s.pause_after(1_000_000),
            std::time::Duration::from_millis(3)
        );
        assert_eq!(
            CpuShare::permille(1000).pause_after(5),
            std::time::Duration::ZERO
        );
        assert_eq!(CpuShare::permille(0).get(), 1);
    }

    /// A poller with a never-ending supply of frames, run under a 25% share, uses
    /// no more than about a quarter of the wall time in CPU.
    #[test]
    fn the_share_holds_under_a_flood() {
        let (mut p, a, b, f) = two_port_poller();
        let share = CpuShare::permille(250);
        let start = std::time::Instant::now();
        let cpu0 = crate::net::afpacket::thread_cpu_ns();
        let mut frames = 0;
        while start.elapsed() < std::time::Duration::from_millis(400) {
            {
                let mut q = a.inbox.lock().unwrap();
                while q.len() < 256 {
                    q.push_back(f.clone());
                }
            }
            b.outbox.lock().unwrap().clear();
            let r = p.turn(128);
            frames += r.frames;
            std::thread::sleep(share.pause_after(r.cpu_ns));
        }
        let wall = start.elapsed().as_nanos();
        let cpu = u128::from(crate::net::afpacket::thread_cpu_ns() - cpu0);
        // The refill and bookkeeping above run on this thread too and are not part of
        // the turns, hence the margin.
        assert!(frames > 1000, "work was done ({frames} frames)");
        assert!(
            cpu * 1000 <= wall * 400,
            "CPU {cpu} ns over {wall} ns of wall time exceeds the share"
        );
    }

    #[test]
    fn turns_respect_the_budget_and_move_frames() {
        let (mut p, a, b, f) = two_port_poller();
        for _ in 0..10 {
            a.inbox.lock().unwrap().push_back(f.clone());
        }
        let r = p.turn(4);
        assert_eq!((r.frames, r.sent), (4, 4));
        assert_eq!(b.outbox.lock().unwrap().len(), 4);
        let r = p.turn(100);
        assert_eq!(r.frames, 6);
        assert_eq!(p.stats().rx_frames, 10);
        assert_eq!(p.port_kinds(), vec![(1, "memory"), (2, "memory")]);
        assert_eq!(b.outbox.lock().unwrap()[0], f);
    }
}
