//! The NVMe/TCP host (initiator): the engine's way to reach storage nodes.
//!
//! A [`Controller`] is one association with one NVM subsystem: an admin queue
//! and N I/O queues, each its own TCP connection with its own queue depth (so
//! that each engine reactor can own one queue, as the NVMe driver does). A
//! supervisor task sends keep-alives and, after any path failure, tears the
//! whole association down and builds a new one with exponential backoff.
//!
//! Failure policy: commands outstanding on a failed path are *failed*, not
//! retried, with [`ErrorKind::Path`]. Whether a write that was in flight was
//! applied is unknowable, and only the engine knows whether re-sending it is
//! safe (it is, for the engine's whole-block writes of immutable data) or
//! whether to go to another replica instead. Commands submitted while the
//! association is being rebuilt wait for it, up to the command timeout.

mod discovery;
mod error;
mod queue;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

pub use discovery::discover;
pub use error::{ErrorKind, HostError};
pub use queue::Response;
use queue::{QueueExit, QueueHandle, QueueSetup};

use crate::nvme::identify::decode_active_ns_list;
use crate::nvme::{
    property, AdminCommand, CapRegister, CcRegister, CstsRegister, DsmRange, FabricsCommand,
    Feature, IdentifyCns, IdentifyController, IdentifyNamespace, IoCommand, PropertySize,
    VsRegister,
};

/// How to reconnect after a path failure.
#[derive(Debug, Clone, Copy)]
pub struct ReconnectPolicy {
    /// Delay before the first attempt.
    pub initial_delay: Duration,
    /// Upper bound of the doubling delay.
    pub max_delay: Duration,
    /// Give up (the handle becomes closed) after trying this long; `None`
    /// tries forever.
    pub give_up_after: Option<Duration>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            give_up_after: Some(Duration::from_secs(600)),
        }
    }
}

/// Everything needed to connect to one subsystem.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// Controller address.
    pub addr: SocketAddr,
    /// Subsystem NQN.
    pub subnqn: String,
    /// This host's NQN.
    pub hostnqn: String,
    /// This host's identifier.
    pub hostid: [u8; 16],
    /// Number of I/O queues to ask for (the controller may grant fewer).
    pub io_queues: u16,
    /// Commands outstanding per I/O queue.
    pub queue_depth: u16,
    /// Ask for the header digest.
    pub header_digest: bool,
    /// Ask for the data digest.
    pub data_digest: bool,
    /// Keep-alive timeout sent in Connect; zero disables keep-alive.
    pub keep_alive: Duration,
    /// TCP connect and ICReq/ICResp timeout.
    pub connect_timeout: Duration,
    /// Per-command timeout; on expiry the association is reset.
    pub command_timeout: Duration,
    /// How long a new command waits for an association that is being re-established
    /// before it fails with [`ErrorKind::Path`]; `None` waits up to `command_timeout`.
    /// A caller that can serve the request elsewhere (the volume engine reconstructs
    /// from other nodes) sets a short wait, so a dead node costs no latency.
    pub reconnect_wait: Option<Duration>,
    /// Largest transfer this host issues in one command (also capped by MDTS).
    pub max_transfer: u32,
    /// Reconnect behaviour.
    pub reconnect: ReconnectPolicy,
}

impl HostConfig {
    /// Defaults: a random host identity, one I/O queue of depth 32, no
    /// digests, 5 s keep-alive (Linux's default), 30 s command timeout.
    pub fn new(addr: SocketAddr, subnqn: impl Into<String>) -> Self {
        let hostid: [u8; 16] = rand::random();
        HostConfig {
            addr,
            subnqn: subnqn.into(),
            hostnqn: format!("nqn.2014-08.org.nvmexpress:uuid:{}", uuid_text(&hostid)),
            hostid,
            io_queues: 1,
            queue_depth: 32,
            header_digest: false,
            data_digest: false,
            keep_alive: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(30),
            reconnect_wait: None,
            max_transfer: 1 << 20,
            reconnect: ReconnectPolicy::default(),
        }
    }
}

fn uuid_text(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// What the host knows about one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    /// Namespace id.
    pub nsid: u32,
    /// Logical block size in bytes.
    pub block_size: u32,
    /// Size in logical blocks.
    pub blocks: u64,
    /// The full Identify Namespace data.
    pub identify: IdentifyNamespace,
}

/// One live association.
#[derive(Debug)]
struct Session {
    generation: u64,
    admin: QueueHandle,
    io: Vec<QueueHandle>,
    identify: IdentifyController,
    cap: CapRegister,
    vs: VsRegister,
    cntlid: u16,
    namespaces: Vec<NamespaceInfo>,
    /// Largest transfer per command.
    max_transfer: u32,
    tasks: Vec<JoinHandle<()>>,
}

impl Session {
    fn abort(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Connected(Arc<Session>),
    Reconnecting,
    Closed(String),
}

#[derive(Debug)]
struct Inner {
    config: HostConfig,
    state: watch::Receiver<State>,
    /// Dropping the last handle ends the supervisor.
    stop: mpsc::Sender<()>,
    reconnects: AtomicUsize,
}

/// A connected controller (cheap to clone; all clones share the association).
#[derive(Debug, Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

/// Where queue tasks report their failure: the supervisor's channel (with the
/// generation they belong to) and the published state, which the failing
/// task itself flips to `Reconnecting` at once so that no caller is handed a
/// dead association while the supervisor catches up.
#[derive(Debug, Clone)]
struct FailureTx {
    tx: mpsc::UnboundedSender<(u64, HostError)>,
    state: Option<Arc<watch::Sender<State>>>,
}

impl Controller {
    /// Connects: admin queue, controller enable, Identify, Set Features
    /// (number of queues), namespaces, then the I/O queues.
    pub async fn connect(config: HostConfig) -> Result<Controller, HostError> {
        if config.queue_depth < 2 || config.io_queues == 0 {
            return Err(HostError::InvalidRequest(
                "need at least one I/O queue and a queue depth of at least 2".into(),
            ));
        }
        let (tx, fail_rx) = mpsc::unbounded_channel();
        let (state_tx, state_rx) = watch::channel(State::Reconnecting);
        let state_tx = Arc::new(state_tx);
        let fail_tx = FailureTx {
            tx,
            state: Some(Arc::clone(&state_tx)),
        };
        let session = Arc::new(establish(&config, 1, &fail_tx).await?);
        state_tx.send_replace(State::Connected(Arc::clone(&session)));
        let (stop_tx, stop_rx) = mpsc::channel(1);
        let inner = Arc::new(Inner {
            config: config.clone(),
            state: state_rx,
            stop: stop_tx,
            reconnects: AtomicUsize::new(0),
        });
        tokio::spawn(supervise(
            config,
            state_tx,
            session,
            fail_tx,
            fail_rx,
            stop_rx,
            Arc::downgrade(&inner),
        ));
        Ok(Controller { inner })
    }

    async fn session(&self) -> Result<Arc<Session>, HostError> {
        let wait = self
            .inner
            .config
            .reconnect_wait
            .unwrap_or(self.inner.config.command_timeout);
        let deadline = tokio::time::Instant::now() + wait;
        let mut rx = self.inner.state.clone();
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                State::Connected(s) => return Ok(s),
                State::Closed(why) => return Err(HostError::Closed(why)),
                State::Reconnecting => {}
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(HostError::Closed("controller handle stopped".into())),
                Err(_) => return Err(HostError::Path("still reconnecting".into())),
            }
        }
    }

    /// Identify Controller data of the current association.
    pub async fn identify(&self) -> Result<IdentifyController, HostError> {
        Ok(self.session().await?.identify.clone())
    }

    /// Controller id of the current association.
    pub async fn cntlid(&self) -> Result<u16, HostError> {
        Ok(self.session().await?.cntlid)
    }

    /// CAP and VS as read at connect time.
    pub async fn registers(&self) -> Result<(CapRegister, VsRegister), HostError> {
        let s = self.session().await?;
        Ok((s.cap, s.vs))
    }

    /// Active namespaces as identified at connect time.
    pub async fn namespaces(&self) -> Result<Vec<NamespaceInfo>, HostError> {
        Ok(self.session().await?.namespaces.clone())
    }

    /// One namespace.
    pub async fn namespace(&self, nsid: u32) -> Result<NamespaceInfo, HostError> {
        let s = self.session().await?;
        ns_info(&s, nsid).cloned()
    }

    /// Number of I/O queues granted.
    pub async fn io_queue_count(&self) -> Result<usize, HostError> {
        Ok(self.session().await?.io.len())
    }

    /// Largest transfer per command in bytes (MDTS and the host cap).
    pub async fn max_transfer(&self) -> Result<u32, HostError> {
        Ok(self.session().await?.max_transfer)
    }

    /// How many times the association was rebuilt after a failure.
    pub fn reconnect_count(&self) -> usize {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Sends an admin command; `read_len` bytes are read back. Returns the
    /// completion (error statuses become [`HostError::Status`]).
    pub async fn admin(
        &self,
        cmd: AdminCommand,
        data_out: Bytes,
        read_len: u32,
    ) -> Result<Response, HostError> {
        if read_len > ADMIN_MAX_READ {
            return Err(HostError::InvalidRequest(format!(
                "admin reads are limited to {ADMIN_MAX_READ} bytes, asked for {read_len}"
            )));
        }
        let s = self.session().await?;
        checked(
            queue::submit(&s.admin, cmd.to_sqe(0), data_out, read_len, "admin").await?,
            "admin",
        )
    }

    /// Sends an I/O command exactly as given, without the range and size checks the
    /// typed methods make (for tests of a controller's own checks); `data_out` is the
    /// host-to-controller data, `read_len` the bytes read back.
    pub async fn io_raw(
        &self,
        queue: usize,
        cmd: IoCommand,
        data_out: Bytes,
        read_len: u32,
    ) -> Result<Response, HostError> {
        if read_len > self.max_transfer().await? {
            return Err(HostError::InvalidRequest(format!(
                "read of {read_len} bytes exceeds the transfer limit"
            )));
        }
        let s = self.session().await?;
        checked(
            queue::submit(io_queue(&s, queue), cmd.to_sqe(0), data_out, read_len, "io").await?,
            "io",
        )
    }

    /// Reads `blocks` logical blocks at `slba` through I/O queue `queue`
    /// (taken modulo the number of queues).
    pub async fn read(
        &self,
        queue: usize,
        nsid: u32,
        slba: u64,
        blocks: u32,
    ) -> Result<Bytes, HostError> {
        let s = self.session().await?;
        let (nlb, bytes) = io_size(&s, nsid, slba, blocks)?;
        let sqe = IoCommand::Read {
            nsid,
            slba,
            nlb,
            fua: false,
        }
        .to_sqe(0);
        let r = queue::submit(io_queue(&s, queue), sqe, Bytes::new(), bytes, "read").await?;
        Ok(checked(r, "read")?.data)
    }

    /// Writes `data` (whole logical blocks) at `slba`. With `fua` the data is
    /// durable when this returns even with a volatile write cache.
    pub async fn write(
        &self,
        queue: usize,
        nsid: u32,
        slba: u64,
        data: Bytes,
        fua: bool,
    ) -> Result<(), HostError> {
        let s = self.session().await?;
        let ns = ns_info(&s, nsid)?;
        let bs = usize::try_from(ns.block_size).unwrap_or(usize::MAX);
        if data.is_empty() || data.len() % bs != 0 {
            return Err(HostError::InvalidRequest(format!(
                "write of {} bytes is not a positive multiple of the {bs}-byte block",
                data.len()
            )));
        }
        let blocks = u32::try_from(data.len() / bs)
            .map_err(|_| HostError::InvalidRequest("write too large".into()))?;
        let (nlb, _) = io_size(&s, nsid, slba, blocks)?;
        let sqe = IoCommand::Write {
            nsid,
            slba,
            nlb,
            fua,
        }
        .to_sqe(0);
        checked(
            queue::submit(io_queue(&s, queue), sqe, data, 0, "write").await?,
            "write",
        )?;
        Ok(())
    }

    /// Flushes the namespace's volatile write cache.
    pub async fn flush(&self, queue: usize, nsid: u32) -> Result<(), HostError> {
        let s = self.session().await?;
        ns_info(&s, nsid)?;
        let sqe = IoCommand::Flush { nsid }.to_sqe(0);
        checked(
            queue::submit(io_queue(&s, queue), sqe, Bytes::new(), 0, "flush").await?,
            "flush",
        )?;
        Ok(())
    }

    /// Writes zeroes to `blocks` blocks (optionally deallocating them).
    pub async fn write_zeroes(
        &self,
        queue: usize,
        nsid: u32,
        slba: u64,
        blocks: u32,
        deallocate: bool,
    ) -> Result<(), HostError> {
        let s = self.session().await?;
        let nlb = lba_range(&s, nsid, slba, blocks)?;
        let sqe = IoCommand::WriteZeroes {
            nsid,
            slba,
            nlb,
            deallocate,
            fua: false,
        }
        .to_sqe(0);
        let r = queue::submit(io_queue(&s, queue), sqe, Bytes::new(), 0, "write zeroes").await?;
        checked(r, "write zeroes")?;
        Ok(())
    }

    /// Deallocates (trims) the given ranges with Dataset Management.
    pub async fn deallocate(
        &self,
        queue: usize,
        nsid: u32,
        ranges: &[DsmRange],
    ) -> Result<(), HostError> {
        let s = self.session().await?;
        let ns = ns_info(&s, nsid)?;
        if ranges.is_empty() || ranges.len() > crate::nvme::io::DSM_MAX_RANGES {
            return Err(HostError::InvalidRequest(format!(
                "{} ranges (1..=256)",
                ranges.len()
            )));
        }
        for r in ranges {
            let end = r.slba.checked_add(u64::from(r.nlb));
            if end.is_none_or(|e| e > ns.blocks) {
                return Err(HostError::InvalidRequest(format!(
                    "range {}+{} beyond the {} blocks of namespace {nsid}",
                    r.slba, r.nlb, ns.blocks
                )));
            }
        }
        let nr = u8::try_from(ranges.len() - 1).unwrap_or(u8::MAX);
        let sqe = IoCommand::DatasetManagement {
            nsid,
            nr,
            idr: false,
            idw: false,
            deallocate: true,
        }
        .to_sqe(0);
        let data = Bytes::from(DsmRange::encode_list(ranges));
        let r = queue::submit(io_queue(&s, queue), sqe, data, 0, "deallocate").await?;
        checked(r, "deallocate")?;
        Ok(())
    }

    /// Shuts the controller down (CC.SHN normal, wait for CSTS.SHST) and
    /// closes every connection. Other clones see the handle closed.
    pub async fn shutdown(self) -> Result<(), HostError> {
        let s = self.session().await?;
        let cc = CcRegister {
            en: true,
            shn: 1,
            iosqes: 6,
            iocqes: 4,
            ..Default::default()
        };
        let r = property_set(&s.admin, property::CC, cc.to_u32()).await;
        if r.is_ok() {
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                match property_get(&s.admin, property::CSTS, PropertySize::Four).await {
                    Ok(v)
                        if CstsRegister::from_u32(u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0))
                            .shst
                            == 2 =>
                    {
                        break
                    }
                    Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                    Err(_) => break,
                }
            }
        }
        // Stop the supervisor (no keep-alive, no reconnect); it marks the
        // handle closed for every clone and ends the queues.
        let _ = self.inner.stop.try_send(());
        s.abort();
        r.map(|_| ())
    }
}

fn checked(r: Response, command: &'static str) -> Result<Response, HostError> {
    if r.cqe.status.is_success() {
        Ok(r)
    } else {
        Err(HostError::Status {
            command,
            status: r.cqe.status,
        })
    }
}

fn io_queue(s: &Session, queue: usize) -> &QueueHandle {
    &s.io[queue % s.io.len()]
}

fn ns_info(s: &Session, nsid: u32) -> Result<&NamespaceInfo, HostError> {
    s.namespaces
        .iter()
        .find(|n| n.nsid == nsid)
        .ok_or_else(|| HostError::InvalidRequest(format!("namespace {nsid} is not active")))
}

/// Checks an LBA range against the namespace and returns NLB (0's based).
fn lba_range(s: &Session, nsid: u32, slba: u64, blocks: u32) -> Result<u16, HostError> {
    let ns = ns_info(s, nsid)?;
    if blocks == 0 || blocks > 65536 {
        return Err(HostError::InvalidRequest(format!(
            "{blocks} blocks (1..=65536)"
        )));
    }
    let end = slba.checked_add(u64::from(blocks));
    if end.is_none_or(|e| e > ns.blocks) {
        return Err(HostError::InvalidRequest(format!(
            "blocks {slba}+{blocks} beyond the {} blocks of namespace {nsid}",
            ns.blocks
        )));
    }
    Ok(u16::try_from(blocks - 1).unwrap_or(u16::MAX))
}

/// Range and transfer-size checks for a data command: (NLB, bytes).
fn io_size(s: &Session, nsid: u32, slba: u64, blocks: u32) -> Result<(u16, u32), HostError> {
    let nlb = lba_range(s, nsid, slba, blocks)?;
    let bs = ns_info(s, nsid)?.block_size;
    let bytes = blocks
        .checked_mul(bs)
        .filter(|b| *b <= s.max_transfer)
        .ok_or_else(|| {
            HostError::InvalidRequest(format!(
                "{blocks} blocks of {bs} bytes exceed the {}-byte transfer limit",
                s.max_transfer
            ))
        })?;
    Ok((nlb, bytes))
}

async fn property_get(q: &QueueHandle, offset: u32, size: PropertySize) -> Result<u64, HostError> {
    let sqe = FabricsCommand::PropertyGet { size, offset }.to_sqe(0);
    let r = checked(
        queue::submit(q, sqe, Bytes::new(), 0, "property get").await?,
        "property get",
    )?;
    Ok(r.cqe.result64())
}

async fn property_set(q: &QueueHandle, offset: u32, value: u32) -> Result<(), HostError> {
    let sqe = FabricsCommand::PropertySet {
        size: PropertySize::Four,
        offset,
        value: value.into(),
    }
    .to_sqe(0);
    checked(
        queue::submit(q, sqe, Bytes::new(), 0, "property set").await?,
        "property set",
    )?;
    Ok(())
}

async fn admin_cmd(
    q: &QueueHandle,
    cmd: AdminCommand,
    read_len: u32,
    name: &'static str,
) -> Result<Response, HostError> {
    checked(
        queue::submit(q, cmd.to_sqe(0), Bytes::new(), read_len, name).await?,
        name,
    )
}

fn setup_for(
    config: &HostConfig,
    qid: u16,
    depth: u16,
    cntlid: u16,
    in_capsule: u32,
    max_rx: u32,
) -> QueueSetup {
    QueueSetup {
        addr: config.addr,
        qid,
        depth,
        kato_ms: u32::try_from(config.keep_alive.as_millis()).unwrap_or(u32::MAX),
        cntlid,
        subnqn: config.subnqn.clone(),
        hostnqn: config.hostnqn.clone(),
        hostid: config.hostid,
        header_digest: config.header_digest,
        data_digest: config.data_digest,
        max_rx_data: max_rx,
        in_capsule,
        connect_timeout: config.connect_timeout,
        command_timeout: config.command_timeout,
    }
}

/// Admin queue depth (as Linux: 32).
const ADMIN_DEPTH: u16 = 32;
/// Largest admin data transfer this host accepts (and so its receive limit
/// on the admin queue).
const ADMIN_MAX_READ: u32 = 64 * 1024;
/// In-capsule data every controller accepts on the admin queue (8 KiB).
const ADMIN_IN_CAPSULE: u32 = 8192;

fn reporter(fail: &FailureTx, generation: u64) -> impl FnOnce(QueueExit) + Send + 'static {
    let fail = fail.clone();
    move |exit| {
        if let QueueExit::Failed(e) = exit {
            if let Some(state) = &fail.state {
                state.send_if_modified(|st| match st {
                    State::Connected(s) if s.generation == generation => {
                        *st = State::Reconnecting;
                        true
                    }
                    _ => false,
                });
            }
            let _ = fail.tx.send((generation, e));
        }
    }
}

/// Connects the admin queue and enables the controller. Shared with discovery.
async fn bring_up(
    config: &HostConfig,
    generation: u64,
    fail: &FailureTx,
) -> Result<
    (
        QueueHandle,
        JoinHandle<()>,
        u16,
        CapRegister,
        VsRegister,
        IdentifyController,
    ),
    HostError,
> {
    let setup = setup_for(
        config,
        0,
        ADMIN_DEPTH,
        0xFFFF,
        ADMIN_IN_CAPSULE,
        ADMIN_MAX_READ,
    );
    let (admin, cqe, task) = queue::open(setup, reporter(fail, generation)).await?;
    let result = async {
        if !cqe.status.is_success() {
            return Err(HostError::Setup(format!(
                "admin connect to {} refused: {}",
                config.subnqn, cqe.status
            )));
        }
        let cntlid = u16::try_from(cqe.dw0 & 0xFFFF).unwrap_or(0);
        let cap =
            CapRegister::from_u64(property_get(&admin, property::CAP, PropertySize::Eight).await?);
        let vs = VsRegister::from_u32(
            u32::try_from(
                property_get(&admin, property::VS, PropertySize::Four).await? & 0xFFFF_FFFF,
            )
            .unwrap_or(0),
        );
        let cc = CcRegister {
            en: true,
            css: 0,
            mps: 0,
            ams: 0,
            shn: 0,
            iosqes: 6,
            iocqes: 4,
        };
        property_set(&admin, property::CC, cc.to_u32()).await?;
        let ready_within = Duration::from_millis(500 * u64::from(cap.to.max(2)));
        let until = Instant::now() + ready_within;
        loop {
            let v = property_get(&admin, property::CSTS, PropertySize::Four).await?;
            let csts = CstsRegister::from_u32(u32::try_from(v & 0xFFFF_FFFF).unwrap_or(0));
            if csts.cfs {
                return Err(HostError::Setup(
                    "controller fatal status after enable".into(),
                ));
            }
            if csts.rdy {
                break;
            }
            if Instant::now() > until {
                return Err(HostError::Setup(format!(
                    "CSTS.RDY not set within {ready_within:?}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let r = admin_cmd(
            &admin,
            AdminCommand::Identify {
                cns: IdentifyCns::CONTROLLER,
                nsid: 0,
                cntid: 0,
            },
            4096,
            "identify controller",
        )
        .await?;
        let id = IdentifyController::decode(&r.data)
            .map_err(|e| HostError::Protocol(format!("identify controller: {e}")))?;
        if id.cntlid != cntlid {
            return Err(HostError::Setup(format!(
                "identify reports controller {} but connect returned {cntlid}",
                id.cntlid
            )));
        }
        if id.icdoff != 0 {
            return Err(HostError::Setup(format!(
                "ICDOFF {} is not supported",
                id.icdoff
            )));
        }
        Ok((cntlid, cap, vs, id))
    }
    .await;
    match result {
        Ok((cntlid, cap, vs, id)) => Ok((admin, task, cntlid, cap, vs, id)),
        Err(e) => {
            task.abort();
            Err(e)
        }
    }
}

/// Builds a complete association.
async fn establish(
    config: &HostConfig,
    generation: u64,
    fail: &FailureTx,
) -> Result<Session, HostError> {
    let (admin, admin_task, cntlid, cap, vs, id) = bring_up(config, generation, fail).await?;
    let mut tasks = vec![admin_task];
    let result = async {
        if id.sgls & 3 == 0 {
            return Err(HostError::Setup("controller does not support SGLs".into()));
        }
        let mdts = id.max_transfer_bytes(4096).unwrap_or(u64::MAX);
        let max_transfer =
            u32::try_from(mdts.min(u64::from(config.max_transfer))).unwrap_or(u32::MAX);
        let want = config.io_queues - 1;
        let r = admin_cmd(
            &admin,
            AdminCommand::SetFeatures {
                nsid: 0,
                save: false,
                feature: Feature::NumberOfQueues {
                    nsqr: want,
                    ncqr: want,
                },
            },
            0,
            "set features (number of queues)",
        )
        .await?;
        let granted_sq = u16::try_from(r.cqe.dw0 & 0xFFFF).unwrap_or(0);
        let granted_cq = u16::try_from(r.cqe.dw0 >> 16).unwrap_or(0);
        let queues = config
            .io_queues
            .min(granted_sq.saturating_add(1))
            .min(granted_cq.saturating_add(1));
        let r = admin_cmd(
            &admin,
            AdminCommand::Identify {
                cns: IdentifyCns::ACTIVE_NAMESPACES,
                nsid: 0,
                cntid: 0,
            },
            4096,
            "identify active namespaces",
        )
        .await?;
        let ids = decode_active_ns_list(&r.data).map_err(|e| HostError::Protocol(e.to_string()))?;
        let mut namespaces = Vec::new();
        for nsid in ids {
            let r = admin_cmd(
                &admin,
                AdminCommand::Identify {
                    cns: IdentifyCns::NAMESPACE,
                    nsid,
                    cntid: 0,
                },
                4096,
                "identify namespace",
            )
            .await?;
            let ns = IdentifyNamespace::decode(&r.data)
                .map_err(|e| HostError::Protocol(e.to_string()))?;
            let Some(block_size) = ns.block_size() else {
                tracing::warn!(nsid, "namespace with unusable LBA format skipped");
                continue;
            };
            namespaces.push(NamespaceInfo {
                nsid,
                block_size,
                blocks: ns.nsze,
                identify: ns,
            });
        }
        // Depth: what was asked, within MQES+1 and MAXCMD.
        let mut depth = config.queue_depth.min(cap.mqes.saturating_add(1));
        if id.maxcmd > 0 {
            depth = depth.min(id.maxcmd);
        }
        let in_capsule = id.in_capsule_data_size();
        let max_rx = max_transfer.max(4096);
        let opens = (1..=queues).map(|qid| {
            let setup = setup_for(config, qid, depth, cntlid, in_capsule, max_rx);
            queue::open(setup, reporter(fail, generation))
        });
        let mut io = Vec::new();
        let mut err = None;
        for r in futures_join_all(opens).await {
            match r {
                Ok((h, cqe, task)) => {
                    tasks.push(task);
                    if cqe.status.is_success() {
                        io.push(h);
                    } else {
                        err = Some(HostError::Setup(format!(
                            "I/O queue connect refused: {}",
                            cqe.status
                        )));
                    }
                }
                Err(e) => err = Some(e),
            }
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok((io, namespaces, max_transfer))
    }
    .await;
    match result {
        Ok((io, namespaces, max_transfer)) => Ok(Session {
            generation,
            admin,
            io,
            identify: id,
            cap,
            vs,
            cntlid,
            namespaces,
            max_transfer,
            tasks,
        }),
        Err(e) => {
            for t in &tasks {
                t.abort();
            }
            Err(e)
        }
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        match h.await {
            Ok(v) => out.push(v),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

async fn supervise(
    config: HostConfig,
    state: Arc<watch::Sender<State>>,
    first: Arc<Session>,
    fail_tx: FailureTx,
    mut fail_rx: mpsc::UnboundedReceiver<(u64, HostError)>,
    mut stop: mpsc::Receiver<()>,
    inner: std::sync::Weak<Inner>,
) {
    let kato = config.keep_alive;
    let ka_period = if kato.is_zero() {
        Duration::from_secs(3600)
    } else {
        kato / 2
    };
    let mut ka = tokio::time::interval(ka_period);
    ka.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generation = 1u64;
    // The association this task owns (the published state may already say
    // Reconnecting: a failing queue flips it itself).
    let mut live: Option<Arc<Session>> = Some(first);
    loop {
        let failure: Option<HostError> = tokio::select! {
            _ = stop.recv() => None,
            f = fail_rx.recv() => match f {
                Some((g, e)) if g == generation => Some(e),
                Some(_) => continue,
                None => None,
            },
            _ = ka.tick(), if !kato.is_zero() => {
                let Some(s) = live.clone() else { continue };
                match admin_cmd(&s.admin, AdminCommand::KeepAlive, 0, "keep alive").await {
                    Ok(_) => continue,
                    Err(e) => Some(e),
                }
            }
        };
        let Some(failure) = failure else {
            if let Some(s) = live.take() {
                s.abort();
            }
            state.send_replace(State::Closed(
                "controller handle dropped or shut down".into(),
            ));
            return;
        };
        tracing::warn!(addr = %config.addr, subnqn = %config.subnqn, error = %failure, "path failure; reconnecting");
        if let Some(s) = live.take() {
            s.abort();
        }
        state.send_replace(State::Reconnecting);
        let started = Instant::now();
        let mut delay = config.reconnect.initial_delay;
        loop {
            tokio::select! {
                _ = stop.recv() => {
                    state.send_replace(State::Closed("controller handle dropped".into()));
                    return;
                }
                _ = tokio::time::sleep(delay) => {}
            }
            generation += 1;
            match establish(&config, generation, &fail_tx).await {
                Ok(s) => {
                    tracing::info!(addr = %config.addr, generation, "reconnected");
                    // Counted before publishing, so whoever sees the new
                    // association also sees the count.
                    if let Some(i) = inner.upgrade() {
                        i.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    let s = Arc::new(s);
                    live = Some(Arc::clone(&s));
                    state.send_replace(State::Connected(s));
                    ka.reset();
                    break;
                }
                Err(e) => {
                    tracing::warn!(addr = %config.addr, error = %e, ?delay, "reconnect failed");
                    if config
                        .reconnect
                        .give_up_after
                        .is_some_and(|g| started.elapsed() > g)
                    {
                        state.send_replace(State::Closed(format!("gave up reconnecting: {e}")));
                        return;
                    }
                    delay = (delay * 2).min(config.reconnect.max_delay);
                }
            }
        }
    }
}

/// Connects to a controller with a raw admin queue only (no I/O queues), as
/// discovery needs. Returns the admin queue, its task and Identify data.
pub(crate) async fn admin_only(
    config: &HostConfig,
) -> Result<(QueueHandleGuard, IdentifyController), HostError> {
    let (tx, _fail_rx) = mpsc::unbounded_channel();
    let fail_tx = FailureTx { tx, state: None };
    let (admin, task, _cntlid, _cap, _vs, id) = bring_up(config, 0, &fail_tx).await?;
    Ok((QueueHandleGuard { q: admin, task }, id))
}

/// An admin queue whose task ends when this is dropped.
#[derive(Debug)]
pub(crate) struct QueueHandleGuard {
    q: QueueHandle,
    task: JoinHandle<()>,
}

impl QueueHandleGuard {
    pub(crate) async fn admin(
        &self,
        cmd: AdminCommand,
        read_len: u32,
        name: &'static str,
    ) -> Result<Response, HostError> {
        admin_cmd(&self.q, cmd, read_len, name).await
    }
}

impl Drop for QueueHandleGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[doc(hidden)]
pub mod fuzz_support {
    //! Drives one queue task with a scripted controller stream (used by the
    //! `host_queue` fuzz target and its regression replay).

    use std::time::Duration;

    use bytes::Bytes;
    use tokio::io::AsyncWriteExt;

    use super::queue::{self, QueueSetup};
    use crate::nvme::{AdminCommand, Completion, IoCommand, Status};
    use crate::tcp::{CapsuleResp, ConnectionParams, IcResp, Pdu, PduReader, PduWriter, Role};

    /// See [`crate::fuzzing::host_queue`]. Returns the outcome of the read,
    /// the write and the keep-alive, or `None` if the queue never started.
    pub async fn run_queue_against(
        script: Bytes,
    ) -> Option<Vec<Result<super::Response, super::HostError>>> {
        let (h, c) = tokio::io::duplex(1 << 16);
        let (hr, hw) = tokio::io::split(h);
        let (cr, cw) = tokio::io::split(c);
        let setup = QueueSetup {
            addr: ([127, 0, 0, 1], 1).into(),
            qid: 1,
            depth: 4,
            kato_ms: 0,
            cntlid: 1,
            subnqn: "nqn.fuzz:sub".into(),
            hostnqn: "nqn.fuzz:host".into(),
            hostid: [0; 16],
            header_digest: false,
            data_digest: false,
            max_rx_data: 64 * 1024,
            in_capsule: 4096,
            connect_timeout: Duration::from_secs(1),
            // Short: inputs that stall the queue cost one timeout each.
            command_timeout: Duration::from_millis(200),
        };
        // The controller: a valid ICResp and Connect response, then the fuzz
        // bytes, while draining what the host sends so that it never blocks
        // on a full pipe.
        let controller = tokio::spawn(async move {
            let init = ConnectionParams::initial(Role::Controller);
            let mut r = PduReader::new(cr);
            let mut w = PduWriter::new(cw);
            let Ok(Pdu::IcReq(_)) = r.read_pdu(&init).await else {
                return;
            };
            let icresp = IcResp {
                pfv: 0,
                cpda: 0,
                hdgst: false,
                ddgst: false,
                maxh2cdata: 4096,
            };
            if w.write_pdu(&Pdu::IcResp(icresp), &init).await.is_err() {
                return;
            }
            let p = ConnectionParams {
                max_rx_data: 64 * 1024,
                ..init
            };
            let Ok(Pdu::CapsuleCmd(connect)) = r.read_pdu(&p).await else {
                return;
            };
            let mut cqe = Completion::new(connect.sqe.cid, Status::SUCCESS);
            cqe.dw0 = 1;
            if w.write_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }), &p)
                .await
                .is_err()
            {
                return;
            }
            let drain = tokio::spawn(async move {
                while r.read_pdu(&p).await.is_ok() {}
                let _ = tokio::io::copy(r.get_mut(), &mut tokio::io::sink()).await;
            });
            // Let the host submit its commands before the script arrives.
            for _ in 0..64 {
                tokio::task::yield_now().await;
            }
            let _ = w.get_mut().write_all(&script).await;
            // End of script: the controller closes its side, so every input
            // ends promptly (the stall path is covered by a unit test).
            let _ = w.get_mut().shutdown().await;
            let _ = drain.await;
        });
        let (mut hr, mut hw) = (PduReader::new(hr), PduWriter::new(hw));
        let Ok(params) = queue::initialize(&mut hr, &mut hw, &setup).await else {
            controller.abort();
            return None;
        };
        let started = queue::start(setup, hr, hw, params, |_| {}).await;
        let outcome = match started {
            Ok((q, _, task)) => {
                let read = IoCommand::Read {
                    nsid: 1,
                    slba: 0,
                    nlb: 1,
                    fua: false,
                }
                .to_sqe(0);
                let write = IoCommand::Write {
                    nsid: 1,
                    slba: 0,
                    nlb: 4,
                    fua: false,
                }
                .to_sqe(0);
                let ka = AdminCommand::KeepAlive.to_sqe(0);
                let r = queue::submit(&q, read, Bytes::new(), 8192, "read");
                let w = queue::submit(&q, write, Bytes::from(vec![7u8; 10_000]), 0, "write");
                let k = queue::submit(&q, ka, Bytes::new(), 0, "keep alive");
                let all = async { tokio::join!(r, w, k) };
                let done = tokio::time::timeout(Duration::from_secs(5), all).await;
                task.abort();
                let Ok((r, w, k)) = done else {
                    panic!("outstanding commands neither completed nor failed");
                };
                Some(vec![r, w, k])
            }
            Err(_) => None,
        };
        controller.abort();
        outcome
    }
}
