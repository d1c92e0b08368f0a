//! The network module inside dpud: one poller task on a storage reactor, run under a
//! CPU share, and the control side that validates, applies and persists changes.
//!
//! Why a task and a channel: the poller owns the data plane (ports, rules, tunnels,
//! connection table) and is the only code that touches it, exactly like a volume's
//! owner task, so the frame path takes no lock. Configuration changes and stats
//! requests travel to it as messages and are applied between turns; a rule change
//! therefore never disturbs tracked connections (docs/network.md).
//!
//! Why a share per period: the poller runs on a reactor next to the volumes' owner
//! tasks (DESIGN, "Threading"). It yields to them after every slice of work, and once
//! it has used `cpu_share` of the current period (10 ms) in thread CPU time it sleeps
//! until the next period, so storage always gets the rest of the core; storage tasks
//! are cooperative (tokio's budget), so the poller, woken every period, always gets
//! its slice too. The CPU it used is measured around every stretch it runs (thread CPU
//! clock), and storage's is the reactors' thread CPU minus that.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::afpacket::{thread_cpu_ns, RingConfig};
use super::afxdp::XdpConfig;
use super::config::{
    port_kind, rate_limit, rule_spec, tunnel_config, NetConfigError, NetDoc, PortDoc, RuleDoc,
    TunnelDoc,
};
use super::conntrack::Conn;
use super::dataplane::{Dataplane, DataplaneConfig, PortConfig, Stats};
use super::poller::{MemoryPort, Poller, PollerStats};
use super::share::{Next, ReactorClock, Throttle};
use super::switch::PortId;
use crate::reactor::{ReactorHandles, Reactors};
use crate::store::Store;

/// Length of a share period.
pub const SHARE_PERIOD: Duration = Duration::from_millis(10);
/// Frames per turn.
const TURN_BUDGET: usize = 64;
/// How long an idle poller sleeps before it looks at its ports again.
const IDLE_SLEEP: Duration = Duration::from_millis(1);
/// How long after its last frame the poller keeps looking (yielding between looks)
/// before it sleeps: a TCP flow's next segment usually comes within this, and the
/// timer's 1 ms granularity would otherwise cap a window-limited flow.
const IDLE_SPIN: Duration = Duration::from_micros(500);

/// A CPU share in thousandths, written as a fraction in dpud's TOML (`0.3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "f64", into = "f64")]
pub struct Share(u16);

impl Share {
    /// The share in thousandths (1..=1000).
    #[must_use]
    pub fn permille(self) -> u16 {
        self.0
    }
}

impl TryFrom<f64> for Share {
    type Error = String;
    fn try_from(v: f64) -> Result<Self, String> {
        if !(v > 0.0 && v <= 1.0) {
            return Err(format!(
                "net.cpu_share = {v} is not valid: a fraction of the reactor's core above 0 and at most 1, such as 0.3"
            ));
        }
        let permille = (v * 1000.0).round().clamp(1.0, 1000.0);
        // In 1..=1000 by the clamp, so the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        Ok(Share(permille as u16))
    }
}

impl From<Share> for f64 {
    fn from(s: Share) -> f64 {
        f64::from(s.0) / 1000.0
    }
}

/// Which socket family a port uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PortIo {
    /// AF_XDP where it can be set up on the device, AF_PACKET otherwise.
    #[default]
    Auto,
    /// AF_PACKET with TPACKET_V3 rings on every port.
    AfPacket,
}

/// `[net]` in dpud's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetSettings {
    /// The share of its reactor's core the network poller may use in each 10 ms period
    /// while it has work (0 < share <= 1). Storage gets the rest.
    pub cpu_share: Share,
    /// The reactor (0-based) the poller runs on.
    pub reactor: usize,
    /// Port I/O: `auto` (AF_XDP where the device allows it, else AF_PACKET TPACKET_V3)
    /// or `af_packet` (always AF_PACKET).
    pub port_io: PortIo,
    /// Tests only (not settable in the file): ports get in-memory I/O instead of
    /// AF_PACKET, so the control plane can be tested without devices or root.
    #[serde(skip)]
    pub memory_ports: bool,
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            cpu_share: Share(500),
            reactor: 0,
            port_io: PortIo::Auto,
            memory_ports: false,
        }
    }
}

/// CPU and work counters the poller task keeps (read without asking it).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Thread CPU time the poller task used, in ns.
    pub cpu_ns: AtomicU64,
    /// Periods in which the poller used its whole share and slept.
    pub throttled: AtomicU64,
    /// Turns run.
    pub turns: AtomicU64,
}

/// A port as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortView {
    /// The stored configuration.
    pub doc: PortDoc,
    /// Data-plane id.
    pub id: Option<PortId>,
    /// `af_packet_v3`, `memory`, or `down: <why>` when the device could not be opened
    /// at start.
    pub io: String,
}

/// A snapshot of the module.
#[derive(Debug, Clone)]
pub struct NetSnapshot {
    /// The data plane's counters.
    pub stats: Stats,
    /// The poller's totals.
    pub poller: PollerStats,
    /// Port and tunnel names by data-plane id.
    pub names: HashMap<PortId, String>,
    /// I/O kind by port name.
    pub io: HashMap<String, String>,
}

/// What the net task does for the control side.
enum Cmd {
    AddPort(
        PortDoc,
        bool,
        oneshot::Sender<Result<String, NetConfigError>>,
    ),
    RemovePort(String, oneshot::Sender<Result<(), NetConfigError>>),
    AddRule(RuleDoc, oneshot::Sender<Result<(), NetConfigError>>),
    RemoveRule(u64, oneshot::Sender<Result<(), NetConfigError>>),
    MoveRule(u64, i32, oneshot::Sender<Result<(), NetConfigError>>),
    AddTunnel(TunnelDoc, oneshot::Sender<Result<(), NetConfigError>>),
    Connections(oneshot::Sender<(Vec<Conn>, u64)>),
    Flush(Option<u64>, oneshot::Sender<usize>),
    Snapshot(oneshot::Sender<NetSnapshot>),
}

/// The network module as the control plane sees it.
#[derive(Debug)]
pub struct NetControl {
    tx: mpsc::Sender<Cmd>,
    doc: tokio::sync::Mutex<NetDoc>,
    store: Arc<Store>,
    counters: Arc<NetCounters>,
    settings: NetSettings,
    /// The storage reactors, when the engine has them (CPU accounting).
    storage: Option<ReactorHandles>,
    /// Whether the poller runs on one of `storage`'s reactors.
    shares_storage: bool,
    /// A reactor of its own when the engine has none (the test double).
    _own: Option<Reactors>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn gone() -> NetConfigError {
    NetConfigError::Unavailable("the network module has stopped".into())
}

impl NetControl {
    /// Starts the poller on reactor `settings.reactor` of `storage` (or on a reactor of
    /// its own when there are none), loads the stored configuration and applies it. A
    /// port whose device cannot be opened is kept (listed as down) so that its rules
    /// still apply once it is re-added.
    pub async fn start(
        settings: NetSettings,
        storage: Option<ReactorHandles>,
        store: Arc<Store>,
    ) -> Result<Arc<Self>, NetConfigError> {
        let (handle, own, shares_storage) = match storage.as_ref().filter(|r| !r.is_empty()) {
            Some(r) => {
                let h = r.handle(settings.reactor).ok_or_else(|| {
                    NetConfigError::Invalid(format!(
                        "net.reactor = {} but dpud runs {} reactor{} (0 to {})",
                        settings.reactor,
                        r.len(),
                        if r.len() == 1 { "" } else { "s" },
                        r.len() - 1
                    ))
                })?;
                (h, None, true)
            }
            None => {
                let own = Reactors::start(1)
                    .map_err(|e| NetConfigError::Internal(format!("network reactor: {e}")))?;
                let h = own
                    .shared()
                    .handle(0)
                    .ok_or_else(|| NetConfigError::Internal("network reactor missing".into()))?;
                (h, Some(own), false)
            }
        };
        let s2 = Arc::clone(&store);
        let doc = tokio::task::spawn_blocking(move || s2.net_config())
            .await
            .map_err(|e| NetConfigError::Internal(e.to_string()))?
            .map_err(|e| NetConfigError::Internal(e.to_string()))?
            .unwrap_or_else(NetDoc::new);
        let counters = Arc::new(NetCounters::default());
        let (tx, rx) = mpsc::channel(64);
        let task = NetTask {
            poller: Poller::new(Dataplane::new(DataplaneConfig::default())),
            ids: HashMap::new(),
            io: HashMap::new(),
            memory: settings.memory_ports,
            port_io: settings.port_io,
            counters: Arc::clone(&counters),
            share: settings.cpu_share,
        };
        let join = handle.spawn(task.run(rx));
        let this = Arc::new(Self {
            tx,
            doc: tokio::sync::Mutex::new(NetDoc::new()),
            store,
            counters,
            settings,
            storage,
            shares_storage,
            _own: own,
            task: std::sync::Mutex::new(Some(join)),
        });
        this.restore(doc).await?;
        Ok(this)
    }

    async fn restore(&self, doc: NetDoc) -> Result<(), NetConfigError> {
        let mut cur = self.doc.lock().await;
        for p in &doc.ports {
            match self.ask(|tx| Cmd::AddPort(p.clone(), true, tx)).await? {
                Ok(io) => tracing::info!(port = %p.name, %io, "network port attached"),
                Err(e) => {
                    tracing::warn!(port = %p.name, error = %e, "stored network port not attached")
                }
            }
        }
        for t in &doc.tunnels {
            if let Err(e) = self.ask(|tx| Cmd::AddTunnel(t.clone(), tx)).await? {
                tracing::warn!(tunnel = %t.name, error = %e, "stored VXLAN tunnel not restored");
            }
        }
        for r in &doc.rules {
            if let Err(e) = self.ask(|tx| Cmd::AddRule(r.clone(), tx)).await? {
                tracing::warn!(rule = r.id, error = %e, "stored firewall rule not restored");
            }
        }
        tracing::info!(
            ports = doc.ports.len(),
            tunnels = doc.tunnels.len(),
            rules = doc.rules.len(),
            "network configuration restored"
        );
        *cur = doc;
        Ok(())
    }

    async fn ask<T>(
        &self,
        cmd: impl FnOnce(oneshot::Sender<T>) -> Cmd,
    ) -> Result<T, NetConfigError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(cmd(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    async fn persist(&self, doc: &NetDoc) -> Result<(), NetConfigError> {
        let store = Arc::clone(&self.store);
        let doc = doc.clone();
        tokio::task::spawn_blocking(move || store.put_net_config(&doc))
            .await
            .map_err(|e| NetConfigError::Internal(e.to_string()))?
            .map_err(|e| NetConfigError::Internal(format!("saving the network configuration: {e}")))
    }

    /// The settings it runs with.
    #[must_use]
    pub fn settings(&self) -> &NetSettings {
        &self.settings
    }

    /// Adds a port (opens its device) and stores it.
    pub async fn add_port(&self, p: PortDoc) -> Result<PortView, NetConfigError> {
        let mut doc = self.doc.lock().await;
        doc.check_port(&p)?;
        if !self.settings.memory_ports
            && !std::path::Path::new("/sys/class/net")
                .join(&p.name)
                .exists()
        {
            return Err(NetConfigError::NotFound(format!(
                "no network device named {:?} on this machine (ip link show)",
                p.name
            )));
        }
        let io = self.ask(|tx| Cmd::AddPort(p.clone(), false, tx)).await??;
        let mut next = doc.clone();
        next.ports.push(p.clone());
        if let Err(e) = self.persist(&next).await {
            let _ = self.ask(|tx| Cmd::RemovePort(p.name.clone(), tx)).await;
            return Err(e);
        }
        *doc = next;
        Ok(PortView {
            doc: p,
            id: None,
            io,
        })
    }

    /// Removes a port no rule or tunnel names.
    pub async fn remove_port(&self, name: &str) -> Result<(), NetConfigError> {
        self.remove(name, false).await
    }

    /// Removes a tunnel no rule names.
    pub async fn remove_tunnel(&self, name: &str) -> Result<(), NetConfigError> {
        self.remove(name, true).await
    }

    async fn remove(&self, name: &str, tunnel: bool) -> Result<(), NetConfigError> {
        let mut doc = self.doc.lock().await;
        doc.check_remove(name, tunnel)?;
        let mut next = doc.clone();
        next.ports.retain(|p| p.name != name);
        next.tunnels.retain(|t| t.name != name);
        self.persist(&next).await?;
        *doc = next;
        self.ask(|tx| Cmd::RemovePort(name.to_owned(), tx))
            .await??;
        Ok(())
    }

    /// Ports with their I/O kind.
    pub async fn ports(&self) -> Result<Vec<PortView>, NetConfigError> {
        let doc = self.doc.lock().await.clone();
        let snap = self.snapshot().await?;
        let ids: HashMap<&str, PortId> =
            snap.names.iter().map(|(id, n)| (n.as_str(), *id)).collect();
        Ok(doc
            .ports
            .into_iter()
            .map(|p| PortView {
                id: ids.get(p.name.as_str()).copied(),
                io: snap
                    .io
                    .get(&p.name)
                    .cloned()
                    .unwrap_or_else(|| "down".into()),
                doc: p,
            })
            .collect())
    }

    /// Tunnels as stored.
    pub async fn tunnels(&self) -> Vec<TunnelDoc> {
        self.doc.lock().await.tunnels.clone()
    }

    /// Rules as stored, in evaluation order (priority, id).
    pub async fn rules(&self) -> Vec<RuleDoc> {
        let mut r = self.doc.lock().await.rules.clone();
        r.sort_by_key(|r| (r.priority, r.id));
        r
    }

    /// Adds a rule (applies to new connections) and returns it with its id.
    pub async fn add_rule(&self, mut r: RuleDoc) -> Result<RuleDoc, NetConfigError> {
        let mut doc = self.doc.lock().await;
        r.id = doc.next_rule_id;
        doc.check_rule(&r)?;
        self.ask(|tx| Cmd::AddRule(r.clone(), tx)).await??;
        let mut next = doc.clone();
        next.next_rule_id = r.id.saturating_add(1);
        next.rules.push(r.clone());
        if let Err(e) = self.persist(&next).await {
            let _ = self.ask(|tx| Cmd::RemoveRule(r.id, tx)).await;
            return Err(e);
        }
        *doc = next;
        Ok(r)
    }

    fn no_rule(id: u64) -> NetConfigError {
        NetConfigError::NotFound(format!(
            "no firewall rule with id {id} (dpuctl net fw rule list)"
        ))
    }

    /// Deletes a rule: new connections no longer match it; established ones stay.
    pub async fn delete_rule(&self, id: u64) -> Result<RuleDoc, NetConfigError> {
        let mut doc = self.doc.lock().await;
        let Some(r) = doc.rules.iter().find(|r| r.id == id).cloned() else {
            return Err(Self::no_rule(id));
        };
        let mut next = doc.clone();
        next.rules.retain(|r| r.id != id);
        self.persist(&next).await?;
        *doc = next;
        self.ask(|tx| Cmd::RemoveRule(id, tx)).await??;
        Ok(r)
    }

    /// Gives a rule another priority.
    pub async fn move_rule(&self, id: u64, priority: i32) -> Result<RuleDoc, NetConfigError> {
        let mut doc = self.doc.lock().await;
        let mut next = doc.clone();
        let Some(r) = next.rules.iter_mut().find(|r| r.id == id) else {
            return Err(Self::no_rule(id));
        };
        r.priority = priority;
        let moved = r.clone();
        self.persist(&next).await?;
        *doc = next;
        self.ask(|tx| Cmd::MoveRule(id, priority, tx)).await??;
        Ok(moved)
    }

    /// Adds a VXLAN tunnel and stores it.
    pub async fn add_tunnel(&self, t: TunnelDoc) -> Result<TunnelDoc, NetConfigError> {
        let mut doc = self.doc.lock().await;
        doc.check_tunnel(&t)?;
        self.ask(|tx| Cmd::AddTunnel(t.clone(), tx)).await??;
        let mut next = doc.clone();
        next.tunnels.push(t.clone());
        if let Err(e) = self.persist(&next).await {
            let _ = self.ask(|tx| Cmd::RemovePort(t.name.clone(), tx)).await;
            return Err(e);
        }
        *doc = next;
        Ok(t)
    }

    /// Tracked connections and the data plane's clock (ns) they were read at.
    pub async fn connections(&self) -> Result<(Vec<Conn>, u64), NetConfigError> {
        self.ask(Cmd::Connections).await
    }

    /// Cuts tracked connections (all, or those one rule opened); returns how many.
    pub async fn flush(&self, rule: Option<u64>) -> Result<usize, NetConfigError> {
        self.ask(|tx| Cmd::Flush(rule, tx)).await
    }

    /// Counters of everything.
    pub async fn snapshot(&self) -> Result<NetSnapshot, NetConfigError> {
        self.ask(Cmd::Snapshot).await
    }

    /// (network CPU seconds, storage CPU seconds) since start: the poller task's thread
    /// CPU time, and the storage reactors' thread CPU time minus the poller's share of it.
    #[must_use]
    pub fn cpu_seconds(&self) -> (f64, f64) {
        let net = self.counters.cpu_ns.load(Ordering::Relaxed);
        let storage = self.storage.as_ref().map_or(0, |r| {
            let all = r.cpu_ns();
            if self.shares_storage {
                all.saturating_sub(net)
            } else {
                all
            }
        });
        (ns_to_s(net), ns_to_s(storage))
    }

    /// Periods in which the poller used its whole share.
    #[must_use]
    pub fn throttled_periods(&self) -> u64 {
        self.counters.throttled.load(Ordering::Relaxed)
    }

    /// Turns the poller ran.
    #[must_use]
    pub fn turns(&self) -> u64 {
        self.counters.turns.load(Ordering::Relaxed)
    }

    /// Stops the poller (its ports close).
    pub async fn shutdown(&self) {
        let join = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(j) = join {
            j.abort();
            let _ = j.await;
        }
    }
}

/// Nanoseconds as seconds (exact below 2^53 ns, about 104 days of CPU).
#[allow(clippy::cast_precision_loss)]
fn ns_to_s(ns: u64) -> f64 {
    ns as f64 / 1e9
}

struct NetTask {
    poller: Poller,
    /// Port and tunnel ids by name.
    ids: HashMap<String, PortId>,
    /// I/O kind by port name.
    io: HashMap<String, String>,
    memory: bool,
    port_io: PortIo,
    counters: Arc<NetCounters>,
    share: Share,
}

impl NetTask {
    /// Attaches a port. A device that cannot be opened is an error, except while
    /// restoring (`keep_down`): then the port is attached without I/O, listed as down,
    /// so the rules that name it still load.
    fn add_port(&mut self, p: &PortDoc, keep_down: bool) -> Result<String, NetConfigError> {
        let cfg = PortConfig {
            name: p.name.clone(),
            kind: port_kind(&p.mode)?,
            rate_limit: rate_limit(p)?,
        };
        let attach = |poller: &mut Poller, cfg: PortConfig| {
            let m = MemoryPort::default();
            poller
                .attach(cfg, Box::new(m.clone()), Box::new(m))
                .map_err(|e| NetConfigError::Invalid(e.to_string()))
        };
        let (id, io) = if self.memory {
            (attach(&mut self.poller, cfg)?, "memory".to_owned())
        } else {
            let attached = match self.port_io {
                PortIo::AfPacket => self
                    .poller
                    .attach_device(cfg.clone(), RingConfig::default())
                    .map(|id| (id, "af_packet_v3".to_owned())),
                PortIo::Auto => self
                    .poller
                    .attach_device_auto(cfg.clone(), XdpConfig::default(), RingConfig::default())
                    .map(|(id, why)| match why {
                        None => (id, "af_xdp".to_owned()),
                        Some(why) => (id, format!("af_packet_v3 (no AF_XDP: {why})")),
                    }),
            };
            match attached {
                Ok(v) => v,
                Err(super::poller::PollerError::Io(dev, e)) if keep_down => {
                    (attach(&mut self.poller, cfg)?, format!("down: cannot open {dev}: {e}"))
                }
                Err(super::poller::PollerError::Io(dev, e)) => {
                    return Err(NetConfigError::Precondition(format!(
                        "cannot open network device {dev:?} with AF_PACKET: {e} (dpud needs CAP_NET_RAW and the device must be up to carry traffic)"
                    )))
                }
                Err(e) => return Err(NetConfigError::Invalid(e.to_string())),
            }
        };
        self.ids.insert(p.name.clone(), id);
        self.io.insert(p.name.clone(), io.clone());
        Ok(io)
    }

    fn remove(&mut self, name: &str) -> Result<(), NetConfigError> {
        let id = self
            .ids
            .remove(name)
            .ok_or_else(|| NetConfigError::NotFound(format!("no port or tunnel named {name:?}")))?;
        self.io.remove(name);
        self.poller
            .detach(id)
            .map_err(|e| NetConfigError::Internal(e.to_string()))
    }

    fn add_rule(&mut self, r: &RuleDoc) -> Result<(), NetConfigError> {
        let spec = rule_spec(r, |n| self.ids.get(n).copied())?;
        self.poller
            .dataplane()
            .add_rule_with_id(r.id, spec)
            .map_err(|e| NetConfigError::Internal(e.to_string()))
    }

    fn add_tunnel(&mut self, t: &TunnelDoc) -> Result<(), NetConfigError> {
        let uplink = *self.ids.get(&t.uplink).ok_or_else(|| {
            NetConfigError::NotFound(format!("no uplink port named {:?}", t.uplink))
        })?;
        let cfg = tunnel_config(t, uplink)?;
        let id = self
            .poller
            .dataplane()
            .add_tunnel(cfg)
            .map_err(|e| NetConfigError::Precondition(e.to_string()))?;
        self.ids.insert(t.name.clone(), id);
        Ok(())
    }

    fn handle(&mut self, cmd: Cmd) {
        // A dropped receiver means the caller went away; nothing to tell.
        match cmd {
            Cmd::AddPort(p, keep_down, tx) => {
                let _ = tx.send(self.add_port(&p, keep_down));
            }
            Cmd::RemovePort(n, tx) => {
                let _ = tx.send(self.remove(&n));
            }
            Cmd::AddRule(r, tx) => {
                let _ = tx.send(self.add_rule(&r));
            }
            Cmd::RemoveRule(id, tx) => {
                let r = self
                    .poller
                    .dataplane()
                    .remove_rule(id)
                    .map(|_| ())
                    .map_err(|e| NetConfigError::NotFound(e.to_string()));
                let _ = tx.send(r);
            }
            Cmd::MoveRule(id, prio, tx) => {
                let r = self
                    .poller
                    .dataplane()
                    .move_rule(id, prio)
                    .map_err(|e| NetConfigError::NotFound(e.to_string()));
                let _ = tx.send(r);
            }
            Cmd::AddTunnel(t, tx) => {
                let _ = tx.send(self.add_tunnel(&t));
            }
            Cmd::Connections(tx) => {
                let now = self.poller.now();
                let _ = tx.send((self.poller.dataplane().connections(), now));
            }
            Cmd::Flush(rule, tx) => {
                let n = self
                    .poller
                    .dataplane()
                    .flush_conntrack(|c| rule.is_none() || c.rule == rule);
                let _ = tx.send(n);
            }
            Cmd::Snapshot(tx) => {
                let names = self.ids.iter().map(|(n, id)| (*id, n.clone())).collect();
                let _ = tx.send(NetSnapshot {
                    stats: self.poller.dataplane().stats(),
                    poller: self.poller.stats(),
                    names,
                    io: self.io.clone(),
                });
            }
        }
    }

    /// The poller loop: turns, yielding to storage after each slice, sleeping out the
    /// rest of a period once the share is used, idling when there is nothing to do.
    /// Periods are measured on the reactor's own clock ([`ReactorClock`]), so the share
    /// is of the CPU the reactor gets, not of the wall time.
    async fn run(mut self, mut rx: mpsc::Receiver<Cmd>) {
        let mut clock = ReactorClock::for_this_thread();
        if !clock.measures_waits() {
            tracing::warn!(
                "no /proc/thread-self/schedstat: the network CPU share is measured against wall time, which overstates it on an oversubscribed machine"
            );
        }
        let mut throttle = Throttle::new(self.share, SHARE_PERIOD, clock.now_ns());
        let counters = Arc::clone(&self.counters);
        let mut mark = thread_cpu_ns();
        let mut last_frame = tokio::time::Instant::now();
        // CPU since `mark`, added to the counters and charged to the period.
        let account = |mark: u64, throttle: &mut Throttle| {
            let d = thread_cpu_ns().saturating_sub(mark);
            counters.cpu_ns.fetch_add(d, Ordering::Relaxed);
            throttle.charge(d);
        };
        loop {
            loop {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return,
                }
            }
            throttle.roll(clock.now_ns());
            let r = self.poller.turn(TURN_BUDGET);
            self.counters.turns.fetch_add(1, Ordering::Relaxed);
            if r.frames == 0 && last_frame.elapsed() < IDLE_SPIN && throttle.has_room() {
                account(mark, &mut throttle);
                tokio::task::yield_now().await;
                mark = thread_cpu_ns();
                continue;
            }
            if r.frames == 0 {
                account(mark, &mut throttle);
                tokio::select! {
                    cmd = rx.recv() => match cmd {
                        Some(c) => { mark = thread_cpu_ns(); self.handle(c); account(mark, &mut throttle); }
                        None => return,
                    },
                    () = tokio::time::sleep(IDLE_SLEEP) => {}
                }
                mark = thread_cpu_ns();
                throttle.left();
                continue;
            }
            last_frame = tokio::time::Instant::now();
            account(mark, &mut throttle);
            mark = thread_cpu_ns();
            match throttle.after_work() {
                Next::Run => {}
                Next::Yield => {
                    tokio::task::yield_now().await;
                    mark = thread_cpu_ns();
                }
                Next::Sleep { until } => {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    // Storage runs meanwhile; the reactor's clock stands still while the
                    // kernel keeps the thread waiting, so this may take several sleeps.
                    loop {
                        let now = clock.now_ns();
                        if now >= until {
                            break;
                        }
                        tokio::select! {
                            cmd = rx.recv() => match cmd {
                                Some(c) => { let m = thread_cpu_ns(); self.handle(c); account(m, &mut throttle); }
                                None => return,
                            },
                            () = tokio::time::sleep(Duration::from_nanos(until - now)) => {}
                        }
                    }
                    mark = thread_cpu_ns();
                }
            }
        }
    }
}
