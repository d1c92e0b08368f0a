//! One NVMe/TCP connection = one queue.
//!
//! The reader side of the socket runs here: it answers ICReq, decodes every PDU,
//! tracks R2T transfers and hands commands out; a separate writer task owns the
//! socket's write half and batches whatever is ready into one vectored write. I/O
//! commands run as their own tasks and answer through the writer's channel as they
//! finish, so many commands are in flight per queue and complete out of order.
//! Admin and Fabrics commands run inline because they change controller state that
//! later commands depend on.
//!
//! A protocol violation ends the connection with a C2HTermReq naming the fatal error;
//! nothing a peer sends can panic the target or touch another connection.

use super::admin;
use super::state::{Controller, Subsystem, SubsystemKind, TeardownReason};
use super::{io, Reply, Shared};
use crate::nvme::fabrics::NQN_MAX_LEN;
use crate::nvme::{
    admin_opcode, fctype, AdminCommand, Completion, ConnectData, FabricsCommand, IoCommand,
    SglType, Status, StatusCode, SubmissionEntry, CONNECT_DATA_SIZE,
};
use crate::tcp::{
    C2HData, CapsuleCmd, CapsuleResp, ConnectionParams, FatalError, FatalErrorStatus, FrameError,
    H2CData, IcResp, Pdu, PduError, PduReader, PduType, PduWriter, Role, TermReq, R2T,
};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, watch};

/// How long a new connection may take to send its ICReq.
const ICREQ_TIMEOUT: Duration = Duration::from_secs(30);
/// Asynchronous Event Requests held at once (Identify Controller AERL + 1).
const AER_LIMIT: usize = 4;
/// Flush the writer at least every this many queued bytes.
const WRITE_BATCH: usize = 512 * 1024;

/// Messages to the writer task.
enum Out {
    /// A command's completion, with its C2H data if any.
    Complete {
        cqe: Completion,
        data: Option<Bytes>,
        success_flag: bool,
    },
    /// Ask for a write's data.
    R2T(R2T),
    /// Fatal error: send the C2HTermReq and close.
    Term(TermReq),
    /// Flush and close (after Disconnect or controller teardown).
    Close,
}

struct Writer<W> {
    w: PduWriter<W>,
    params: ConnectionParams,
    rx: mpsc::UnboundedReceiver<Out>,
    outstanding: Arc<AtomicUsize>,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    fn queue(&mut self, m: Out) -> bool {
        let r = match m {
            Out::Complete {
                cqe,
                data,
                success_flag,
            } => {
                self.outstanding.fetch_sub(1, Ordering::AcqRel);
                let mut r = Ok(());
                let mut need_resp = true;
                if let Some(d) = data.filter(|d| !d.is_empty()) {
                    let success = success_flag && cqe.status.is_success();
                    need_resp = !success;
                    r = self.w.queue(
                        &Pdu::C2HData(C2HData {
                            cccid: cqe.cid,
                            datao: 0,
                            last: true,
                            success,
                            data: d,
                        }),
                        &self.params,
                    );
                }
                if need_resp && r.is_ok() {
                    r = self
                        .w
                        .queue(&Pdu::CapsuleResp(CapsuleResp { cqe }), &self.params);
                }
                r
            }
            Out::R2T(r) => self.w.queue(&Pdu::R2T(r), &self.params),
            Out::Term(t) => {
                let _ = self.w.queue(&Pdu::C2HTermReq(t), &self.params);
                return false;
            }
            Out::Close => return false,
        };
        if let Err(e) = r {
            tracing::warn!("cannot encode PDU: {e}");
        }
        true
    }

    async fn run(mut self) {
        loop {
            let Some(first) = self.rx.recv().await else {
                break;
            };
            let mut open = self.queue(first);
            while open && self.w.pending() < WRITE_BATCH {
                match self.rx.try_recv() {
                    Ok(m) => open = self.queue(m),
                    Err(_) => break,
                }
            }
            if self.w.flush().await.is_err() {
                break;
            }
            if !open {
                break;
            }
        }
        let _ = self.w.flush().await;
        let _ = self.w.shutdown().await;
    }
}

/// An R2T transfer in progress.
struct Transfer {
    sqe: SubmissionEntry,
    buf: BytesMut,
    total: usize,
    failed: bool,
}

/// What this connection is bound to after Connect.
struct Binding {
    qid: u16,
    ctrl: Arc<Controller>,
    /// SQ size (1-based).
    depth: usize,
    sqflow_disabled: bool,
    teardown: watch::Receiver<Option<TeardownReason>>,
    io_reset: Option<watch::Receiver<u64>>,
}

/// Why the read loop stopped.
enum Stop {
    /// Peer closed or socket error: nothing more to send.
    Gone,
    /// We decided to close (Disconnect, teardown, shutdown): flush and close.
    Close,
    /// Protocol error: terminate with this.
    Fatal(FatalError, Bytes),
}

struct Conn {
    shared: Arc<Shared>,
    local: SocketAddr,
    params: ConnectionParams,
    tx: mpsc::UnboundedSender<Out>,
    outstanding: Arc<AtomicUsize>,
    binding: Option<Binding>,
    sqhd: u16,
    transfers: HashMap<u16, Transfer>,
    next_ttag: u16,
    aers: Vec<u16>,
}

/// Serve one connection until it closes.
pub(crate) async fn serve<R, W>(
    shared: Arc<Shared>,
    mut reader: PduReader<R>,
    mut writer: PduWriter<W>,
    local: SocketAddr,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut shutdown = shared.shutdown.clone();
    let initial = ConnectionParams::initial(Role::Controller);
    // Initialization: ICReq -> ICResp.
    let first = tokio::select! {
        r = tokio::time::timeout(ICREQ_TIMEOUT, reader.read_pdu(&initial)) => r,
        _ = super::shutdown_signalled(&mut shutdown) => return,
    };
    let req = match first {
        Err(_) => {
            tracing::debug!("no ICReq within {ICREQ_TIMEOUT:?}");
            return;
        }
        Ok(Ok(Pdu::IcReq(req))) => req,
        Ok(Ok(other)) => {
            tracing::debug!("first PDU is {:?}, not ICReq", other.pdu_type());
            let t = TermReq {
                fes: FatalErrorStatus::SequenceError,
                fei: 0,
                data: Bytes::copy_from_slice(reader.last_header()),
            };
            let _ = writer.write_pdu(&Pdu::C2HTermReq(t), &initial).await;
            let _ = writer.shutdown().await;
            return;
        }
        Ok(Err(e)) => {
            terminate_on_error(&e, &reader, &mut writer, &initial).await;
            return;
        }
    };
    let l = &shared.limits;
    let resp = IcResp {
        pfv: 0,
        cpda: 0,
        hdgst: req.hdgst && l.allow_header_digest,
        ddgst: req.ddgst && l.allow_data_digest,
        maxh2cdata: l.maxh2cdata,
    };
    if writer
        .write_pdu(&Pdu::IcResp(resp), &initial)
        .await
        .is_err()
    {
        return;
    }
    let max_rx = l.admin_in_capsule.max(l.io_in_capsule).max(l.maxh2cdata);
    let params = ConnectionParams::negotiated(Role::Controller, &req, &resp, max_rx);

    let (tx, rx) = mpsc::unbounded_channel();
    let outstanding = Arc::new(AtomicUsize::new(0));
    let writer_task = tokio::spawn(
        Writer {
            w: writer,
            params,
            rx,
            outstanding: Arc::clone(&outstanding),
        }
        .run(),
    );
    let mut conn = Conn {
        shared: Arc::clone(&shared),
        local,
        params,
        tx,
        outstanding,
        binding: None,
        sqhd: 0,
        transfers: HashMap::new(),
        next_ttag: 0,
        aers: Vec::new(),
    };
    let stop = conn.run(&mut reader, &mut shutdown).await;
    match stop {
        Stop::Gone => {}
        Stop::Close => {
            conn.abort_aers();
            let _ = conn.tx.send(Out::Close);
        }
        Stop::Fatal(fe, header) => {
            tracing::info!("terminating connection: {:?} (FEI {})", fe.fes, fe.fei);
            let _ = conn.tx.send(Out::Term(TermReq {
                fes: fe.fes,
                fei: fe.fei,
                data: header,
            }));
        }
    }
    conn.unbind();
    drop(conn);
    let _ = writer_task.await;
}

async fn terminate_on_error<R, W>(
    e: &FrameError,
    reader: &PduReader<R>,
    writer: &mut PduWriter<W>,
    p: &ConnectionParams,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if let FrameError::Pdu(pe) = e {
        if let Some(fe) = pe.fatal() {
            let t = TermReq {
                fes: fe.fes,
                fei: fe.fei,
                data: Bytes::copy_from_slice(reader.last_header()),
            };
            let _ = writer.write_pdu(&Pdu::C2HTermReq(t), p).await;
        }
    }
    let _ = writer.shutdown().await;
}

async fn changed_opt<T>(rx: Option<watch::Receiver<T>>) {
    match rx {
        Some(mut rx) => {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Resolves when the connection must stop: `Close` on shutdown, teardown or reset,
/// `Gone` when the writer (and so the socket) is gone.
async fn stop_signal(
    mut shutdown: watch::Receiver<bool>,
    teardown: Option<watch::Receiver<Option<TeardownReason>>>,
    io_reset: Option<watch::Receiver<u64>>,
    tx: mpsc::UnboundedSender<Out>,
) -> Stop {
    tokio::select! {
        _ = super::shutdown_signalled(&mut shutdown) => Stop::Close,
        _ = changed_opt(teardown) => Stop::Close,
        _ = changed_opt(io_reset) => Stop::Close,
        _ = tx.closed() => Stop::Gone,
    }
}

/// Resolves when `ctrl` queues an asynchronous event; never without a controller.
async fn event_queued(ctrl: Option<&Controller>) {
    match ctrl {
        Some(c) => c.event_queued().await,
        None => std::future::pending().await,
    }
}

fn fatal(fes: FatalErrorStatus, fei: u32, header: &[u8]) -> Stop {
    Stop::Fatal(FatalError { fes, fei }, Bytes::copy_from_slice(header))
}

impl Conn {
    async fn run<R: AsyncRead + Unpin>(
        &mut self,
        reader: &mut PduReader<R>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Stop {
        // One long-lived future watches every reason to stop (target shutdown,
        // controller teardown, controller reset, writer gone); building it per PDU
        // would register and deregister four waiters for every command.
        let stop = stop_signal(shutdown.clone(), None, None, self.tx.clone());
        tokio::pin!(stop);
        let mut bound = false;
        // The controller whose asynchronous events this connection reports: set once
        // it is bound as an admin queue (I/O queues never wait for events).
        let mut events: Option<Arc<Controller>> = None;
        loop {
            if !bound {
                if let Some(b) = &self.binding {
                    bound = true;
                    stop.set(stop_signal(
                        shutdown.clone(),
                        Some(b.teardown.clone()),
                        b.io_reset.clone(),
                        self.tx.clone(),
                    ));
                    if b.qid == 0 {
                        events = Some(Arc::clone(&b.ctrl));
                    }
                }
            }
            let params = self.params;
            let pdu = {
                // An event wakes the loop without dropping the half-read PDU.
                let read = reader.read_pdu(&params);
                tokio::pin!(read);
                loop {
                    tokio::select! {
                        r = &mut read => break r,
                        s = &mut stop => return s,
                        () = event_queued(events.as_deref()) => self.report_events(),
                    }
                }
            };
            let pdu = match pdu {
                Ok(p) => p,
                Err(FrameError::Pdu(PduError::DataDigest {
                    pdu_type, cccid, ..
                })) => {
                    if let Some(stop) =
                        self.data_digest_error(pdu_type, cccid, reader.last_header())
                    {
                        return stop;
                    }
                    continue;
                }
                Err(FrameError::Pdu(e)) => {
                    tracing::debug!("bad PDU: {e}");
                    let fe = e.fatal().unwrap_or(FatalError {
                        fes: FatalErrorStatus::InvalidHeaderField,
                        fei: 0,
                    });
                    return Stop::Fatal(fe, Bytes::copy_from_slice(reader.last_header()));
                }
                Err(FrameError::Closed) => return Stop::Gone,
                Err(e) => {
                    tracing::debug!("connection read: {e}");
                    return Stop::Gone;
                }
            };
            let r = match pdu {
                Pdu::CapsuleCmd(c) => self.capsule(c, reader.last_header()),
                Pdu::H2CData(d) => self.h2c_data(d, reader.last_header()),
                Pdu::H2CTermReq(t) => {
                    tracing::info!(
                        "host terminated the connection: {:?} (FEI {})",
                        t.fes,
                        t.fei
                    );
                    return Stop::Gone;
                }
                other => {
                    // ICReq again (every other host-to-controller type is handled above).
                    tracing::debug!("unexpected {:?}", other.pdu_type());
                    return fatal(FatalErrorStatus::SequenceError, 0, reader.last_header());
                }
            };
            if let Some(stop) = r {
                return stop;
            }
        }
    }

    fn complete(&self, cid: u16, reply: Reply) {
        let cqe = self.cqe(cid, &reply);
        let success_flag = self.shared.limits.c2h_success
            && self.binding.as_ref().is_some_and(|b| b.sqflow_disabled);
        let _ = self.tx.send(Out::Complete {
            cqe,
            data: reply.data,
            success_flag,
        });
    }

    fn cqe(&self, cid: u16, reply: &Reply) -> Completion {
        let (qid, sqhd) = match &self.binding {
            Some(b) if b.sqflow_disabled => (b.qid, 0xFFFF),
            Some(b) => (b.qid, self.sqhd),
            None => (0, self.sqhd),
        };
        Completion {
            dw0: reply.dw0,
            dw1: reply.dw1,
            sqhd,
            sqid: qid,
            cid,
            phase: false,
            status: reply.status,
        }
    }

    fn data_digest_error(&mut self, t: PduType, cccid: u16, header: &[u8]) -> Option<Stop> {
        let status = Reply::status(Status::new(StatusCode::TRANSIENT_TRANSPORT_ERROR));
        match t {
            PduType::CapsuleCmd => {
                if let Some(s) = self.admit(header) {
                    return Some(s);
                }
                self.complete(cccid, status);
                None
            }
            PduType::H2CData => {
                // The header was sound (its digest, if any, checked): take TTAG,
                // DATAO, DATAL and LAST from it to keep the transfer in step.
                if header.len() < 20 {
                    return Some(fatal(FatalErrorStatus::InvalidHeaderField, 0, header));
                }
                let ttag = u16::from_le_bytes([header[10], header[11]]);
                let datal = u32::from_le_bytes([header[16], header[17], header[18], header[19]]);
                let last = header[1] & crate::tcp::flags::LAST_PDU != 0;
                let Some(tr) = self.transfers.get_mut(&ttag) else {
                    return Some(fatal(FatalErrorStatus::InvalidHeaderField, 10, header));
                };
                if tr.sqe.cid != cccid {
                    return Some(fatal(FatalErrorStatus::InvalidHeaderField, 8, header));
                }
                tr.failed = true;
                let Ok(n) = usize::try_from(datal) else {
                    return Some(fatal(FatalErrorStatus::DataOutOfRange, 0, header));
                };
                let new_len = tr.buf.len().saturating_add(n);
                if new_len > tr.total {
                    return Some(fatal(FatalErrorStatus::DataOutOfRange, 0, header));
                }
                tr.buf.resize(new_len, 0);
                if last || new_len == tr.total {
                    self.transfers.remove(&ttag);
                    self.complete(cccid, status);
                }
                None
            }
            _ => Some(fatal(FatalErrorStatus::InvalidHeaderField, 0, header)),
        }
    }

    /// Count a new command against the SQ size. A host that submits more commands
    /// than its queue holds has broken flow control: the connection is terminated
    /// (as SPDK's target does) rather than letting it queue without bound.
    fn admit(&mut self, header: &[u8]) -> Option<Stop> {
        let depth = self
            .binding
            .as_ref()
            .map_or(usize::from(self.shared.limits.queue_depth), |b| b.depth);
        let n = self.outstanding.fetch_add(1, Ordering::AcqRel);
        if n >= depth {
            tracing::info!("queue depth {depth} exceeded: terminating connection");
            return Some(fatal(FatalErrorStatus::SequenceError, 0, header));
        }
        let d = u16::try_from(depth).unwrap_or(u16::MAX);
        self.sqhd = if self.sqhd.saturating_add(1) >= d {
            0
        } else {
            self.sqhd + 1
        };
        None
    }

    fn capsule(&mut self, c: CapsuleCmd, header: &[u8]) -> Option<Stop> {
        if let Some(s) = self.admit(header) {
            return Some(s);
        }
        let sqe = c.sqe;
        let is_admin_q = self.binding.as_ref().is_none_or(|b| b.qid == 0);
        let h2c = wants_h2c(&sqe, is_admin_q);
        let l = &self.shared.limits;
        let sgl = sqe.dptr;
        let in_capsule_max = if is_admin_q {
            l.admin_in_capsule
        } else {
            l.io_in_capsule
        };
        let reject = |s: StatusCode| Reply::status(Status::new(s).dnr());
        if sgl.length == 0 && c.data.is_empty() {
            // No data phase: whatever kind of (empty) descriptor the host used.
            return self.dispatch(sqe, Bytes::new(), 0);
        }
        if sqe.psdt != SubmissionEntry::PSDT_SGL {
            self.complete(sqe.cid, reject(StatusCode::INVALID_FIELD));
            return None;
        }
        if sgl.is_in_capsule() {
            if sgl.address != 0 {
                self.complete(sqe.cid, reject(StatusCode::SGL_OFFSET_INVALID));
                return None;
            }
            let len = usize::try_from(sgl.length).unwrap_or(usize::MAX);
            if sgl.length > in_capsule_max || c.data.len() < len || !h2c {
                self.complete(sqe.cid, reject(StatusCode::DATA_SGL_LENGTH_INVALID));
                return None;
            }
            return self.dispatch(sqe, c.data.slice(..len), 0);
        }
        if !c.data.is_empty() {
            // Data in the capsule that the SGL does not describe.
            self.complete(sqe.cid, reject(StatusCode::DATA_SGL_LENGTH_INVALID));
            return None;
        }
        if sgl.sgl_type != SglType::TransportDataBlock {
            self.complete(sqe.cid, reject(StatusCode::SGL_TYPE_INVALID));
            return None;
        }
        if sgl.length > l.max_transfer {
            self.complete(sqe.cid, reject(StatusCode::DATA_SGL_LENGTH_INVALID));
            return None;
        }
        if !h2c || sgl.length == 0 {
            return self.dispatch(sqe, Bytes::new(), sgl.length);
        }
        // Data the host holds: ask for it with an R2T tagged by a transfer tag of ours.
        let ttag = self.alloc_ttag();
        let total = usize::try_from(sgl.length).unwrap_or(0);
        self.transfers.insert(
            ttag,
            Transfer {
                sqe,
                buf: BytesMut::with_capacity(total),
                total,
                failed: false,
            },
        );
        let _ = self.tx.send(Out::R2T(R2T {
            cccid: sqe.cid,
            ttag,
            r2to: 0,
            r2tl: sgl.length,
        }));
        None
    }

    fn alloc_ttag(&mut self) -> u16 {
        loop {
            let t = self.next_ttag;
            self.next_ttag = self.next_ttag.wrapping_add(1);
            if t != 0xFFFF && !self.transfers.contains_key(&t) {
                return t;
            }
        }
    }

    fn h2c_data(&mut self, d: H2CData, header: &[u8]) -> Option<Stop> {
        let Some(tr) = self.transfers.get_mut(&d.ttag) else {
            return Some(fatal(FatalErrorStatus::InvalidHeaderField, 10, header));
        };
        if tr.sqe.cid != d.cccid {
            return Some(fatal(FatalErrorStatus::InvalidHeaderField, 8, header));
        }
        if d.data.len() > usize::try_from(self.params.maxh2cdata).unwrap_or(usize::MAX) {
            return Some(fatal(FatalErrorStatus::DataLimitExceeded, 0, header));
        }
        let datao = usize::try_from(d.datao).unwrap_or(usize::MAX);
        if datao != tr.buf.len() || datao.saturating_add(d.data.len()) > tr.total {
            return Some(fatal(FatalErrorStatus::DataOutOfRange, 0, header));
        }
        tr.buf.extend_from_slice(&d.data);
        let done = tr.buf.len() == tr.total;
        if d.last != done {
            return Some(fatal(FatalErrorStatus::SequenceError, 0, header));
        }
        if !done {
            return None;
        }
        let tr = self.transfers.remove(&d.ttag)?;
        if tr.failed {
            self.complete(
                tr.sqe.cid,
                Reply::status(Status::new(StatusCode::TRANSIENT_TRANSPORT_ERROR)),
            );
            return None;
        }
        self.dispatch(tr.sqe, tr.buf.freeze(), 0)
    }

    fn dispatch(&mut self, sqe: SubmissionEntry, data: Bytes, c2h_len: u32) -> Option<Stop> {
        if sqe.opcode == admin_opcode::FABRICS {
            return self.fabrics(sqe, &data);
        }
        let Some(b) = &self.binding else {
            self.complete(
                sqe.cid,
                Reply::status(Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr()),
            );
            return None;
        };
        let ctrl = Arc::clone(&b.ctrl);
        let qid = b.qid;
        ctrl.note_traffic();
        if !ctrl.is_ready() {
            self.complete(
                sqe.cid,
                Reply::status(Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr()),
            );
            return None;
        }
        if qid == 0 {
            let reply = match AdminCommand::parse(&sqe) {
                Ok(AdminCommand::AsyncEventRequest) => {
                    // Completes at once with an event already queued; else held until
                    // one is (see `report_events`) or the queue goes away.
                    if self.aers.len() >= AER_LIMIT {
                        Reply::status(Status::new(StatusCode::AER_LIMIT_EXCEEDED).dnr())
                    } else {
                        self.aers.push(sqe.cid);
                        self.report_events();
                        return None;
                    }
                }
                Ok(cmd) => admin::execute(&self.shared, &ctrl, cmd, c2h_len, self.local),
                Err(e) => Reply::status(e.status()),
            };
            if !reply.status.is_success() {
                ctrl.log_error(0, sqe.cid, reply.status, sqe.nsid, 0);
            }
            self.complete(sqe.cid, reply);
            return None;
        }
        if ctrl.subsys.kind == SubsystemKind::Discovery {
            self.complete(
                sqe.cid,
                Reply::status(Status::new(StatusCode::INVALID_OPCODE).dnr()),
            );
            return None;
        }
        let io = &ctrl.subsys.io;
        io.commands.fetch_add(1, Ordering::Relaxed);
        let cmd = match IoCommand::parse(&sqe) {
            Ok(c) => c,
            Err(e) => {
                io.errors.fetch_add(1, Ordering::Relaxed);
                ctrl.log_error(qid, sqe.cid, e.status(), sqe.nsid, 0);
                self.complete(sqe.cid, Reply::status(e.status()));
                return None;
            }
        };
        let success_flag = self.shared.limits.c2h_success
            && self.binding.as_ref().is_some_and(|b| b.sqflow_disabled);
        let sqhd = self.cqe(sqe.cid, &Reply::ok()).sqhd;
        let max_transfer = self.shared.limits.max_transfer;
        let mut fut = Box::pin(async move {
            let reply = io::execute(&ctrl, cmd, data, c2h_len, max_transfer).await;
            if !reply.status.is_success() {
                ctrl.subsys.io.errors.fetch_add(1, Ordering::Relaxed);
                let slba = u64::from(sqe.cdw10) | (u64::from(sqe.cdw11) << 32);
                ctrl.log_error(qid, sqe.cid, reply.status, sqe.nsid, slba);
            }
            let cqe = Completion {
                dw0: reply.dw0,
                dw1: reply.dw1,
                sqhd,
                sqid: qid,
                cid: sqe.cid,
                phase: false,
                status: reply.status,
            };
            Out::Complete {
                cqe,
                data: reply.data,
                success_flag,
            }
        });
        // Backends that finish synchronously (memory, and every argument error)
        // complete right here; only commands that really wait get a task, so the
        // common memory-backed case costs no spawn and no cross-thread wakeup.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        match fut.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(out) => {
                let _ = self.tx.send(out);
            }
            std::task::Poll::Pending => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let out = fut.await;
                    let _ = tx.send(out);
                });
            }
        }
        None
    }

    fn fabrics(&mut self, sqe: SubmissionEntry, data: &Bytes) -> Option<Stop> {
        let cmd = match FabricsCommand::parse(&sqe) {
            Ok(c) => c,
            Err(e) => {
                self.complete(sqe.cid, Reply::status(e.status()));
                return None;
            }
        };
        match cmd {
            FabricsCommand::Connect {
                recfmt,
                qid,
                sqsize,
                cattr,
                kato_ms,
            } => {
                let reply = self.connect(data, recfmt, qid, sqsize, cattr, kato_ms);
                self.complete(sqe.cid, reply);
                None
            }
            _ if self.binding.is_none() => {
                self.complete(
                    sqe.cid,
                    Reply::status(Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr()),
                );
                None
            }
            FabricsCommand::Disconnect { .. } => {
                self.complete(sqe.cid, Reply::ok());
                Some(Stop::Close)
            }
            FabricsCommand::PropertyGet { size, offset } => {
                let reply = match &self.binding {
                    Some(b) if b.qid == 0 => {
                        admin::property_get(&self.shared, &b.ctrl, size, offset)
                    }
                    _ => Reply::status(Status::new(StatusCode::INVALID_QUEUE_TYPE).dnr()),
                };
                self.complete(sqe.cid, reply);
                None
            }
            FabricsCommand::PropertySet {
                size,
                offset,
                value,
            } => {
                let reply = match &self.binding {
                    Some(b) if b.qid == 0 => admin::property_set(&b.ctrl, size, offset, value),
                    _ => Reply::status(Status::new(StatusCode::INVALID_QUEUE_TYPE).dnr()),
                };
                self.complete(sqe.cid, reply);
                None
            }
        }
    }

    fn connect(
        &mut self,
        data: &Bytes,
        recfmt: u16,
        qid: u16,
        sqsize: u16,
        cattr: u8,
        kato_ms: u32,
    ) -> Reply {
        // DW0 of a Connect Invalid Parameters status: IATTR (bit 16: in the data,
        // not the SQE) and IPO (byte offset of the bad field).
        let invalid = |in_data: bool, offset: u32| {
            let mut r = Reply::status(Status::new(StatusCode::CONNECT_INVALID_PARAMETERS).dnr());
            r.dw0 = (u32::from(in_data) << 16) | offset;
            r
        };
        if self.binding.is_some() {
            return Reply::status(Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr());
        }
        if recfmt != 0 {
            return Reply::status(Status::new(StatusCode::CONNECT_INCOMPATIBLE_FORMAT).dnr());
        }
        if data.len() < CONNECT_DATA_SIZE {
            return Reply::status(Status::new(StatusCode::DATA_SGL_LENGTH_INVALID).dnr());
        }
        let Ok(cd) = ConnectData::decode(data) else {
            return Reply::status(Status::new(StatusCode::DATA_SGL_LENGTH_INVALID).dnr());
        };
        if cd.hostnqn.is_empty() || cd.hostnqn.len() > NQN_MAX_LEN {
            return invalid(true, u32::from(ConnectData::HOSTNQN_OFFSET));
        }
        let subsys: Arc<Subsystem> = if cd.subnqn == crate::nvme::DISCOVERY_NQN {
            Arc::clone(&self.shared.discovery)
        } else {
            match self.shared.subsystem(&cd.subnqn) {
                Some(s) => s,
                None => {
                    tracing::info!(subnqn = %cd.subnqn, "connect to unknown subsystem");
                    return invalid(true, u32::from(ConnectData::SUBNQN_OFFSET));
                }
            }
        };
        if !subsys.host_allowed(&cd.hostnqn) {
            tracing::info!(subnqn = %cd.subnqn, hostnqn = %cd.hostnqn, "host not allowed");
            let mut r = Reply::status(Status::new(StatusCode::CONNECT_INVALID_HOST).dnr());
            r.dw0 = (1 << 16) | u32::from(ConnectData::HOSTNQN_OFFSET);
            return r;
        }
        let l = &self.shared.limits;
        // SQSIZE is 0's based; CDW11 starts at SQE byte 44.
        if sqsize == 0 || u32::from(sqsize) >= u32::from(l.queue_depth) {
            return invalid(false, 44);
        }
        let depth = usize::from(sqsize) + 1;
        let sqflow_disabled = cattr & (1 << 2) != 0;
        if qid == 0 {
            let max_io = if subsys.kind == SubsystemKind::Discovery {
                0
            } else {
                l.max_io_queues
            };
            let Some(ctrl) =
                subsys.create_controller(cd.hostnqn.clone(), cd.hostid, kato_ms, max_io)
            else {
                return Reply::status(Status::new(StatusCode::CONNECT_CONTROLLER_BUSY));
            };
            tracing::info!(
                cntlid = ctrl.cntlid,
                subnqn = %subsys.nqn,
                hostnqn = %cd.hostnqn,
                kato_ms,
                "admin queue connected"
            );
            tokio::spawn(Arc::clone(&ctrl).keep_alive_watchdog());
            let mut r = Reply::ok();
            r.dw0 = u32::from(ctrl.cntlid);
            self.binding = Some(Binding {
                qid: 0,
                teardown: ctrl.subscribe_teardown(),
                io_reset: None,
                ctrl,
                depth,
                sqflow_disabled,
            });
            return r;
        }
        // An I/O queue joins the controller the admin Connect created.
        if subsys.kind == SubsystemKind::Discovery {
            return Reply::status(Status::new(StatusCode::INVALID_QUEUE_TYPE).dnr());
        }
        let Some(ctrl) = subsys.controller(cd.cntlid) else {
            return invalid(true, u32::from(ConnectData::CNTLID_OFFSET));
        };
        if ctrl.hostnqn != cd.hostnqn || ctrl.hostid != cd.hostid {
            return invalid(true, u32::from(ConnectData::HOSTNQN_OFFSET));
        }
        if !ctrl.is_ready() {
            return Reply::status(Status::new(StatusCode::COMMAND_SEQUENCE_ERROR).dnr());
        }
        if qid > ctrl.granted_io_queues() {
            // QID is the upper half of CDW10 (SQE byte 42).
            return invalid(false, 42);
        }
        if !ctrl.add_io_queue(qid) {
            return invalid(false, 42);
        }
        let mut r = Reply::ok();
        r.dw0 = u32::from(ctrl.cntlid);
        self.binding = Some(Binding {
            qid,
            teardown: ctrl.subscribe_teardown(),
            io_reset: Some(ctrl.subscribe_io_reset()),
            ctrl,
            depth,
            sqflow_disabled,
        });
        r
    }

    /// Complete held AERs with queued asynchronous events, oldest first on both sides.
    fn report_events(&mut self) {
        let Some(ctrl) = self.binding.as_ref().map(|b| Arc::clone(&b.ctrl)) else {
            return;
        };
        while !self.aers.is_empty() {
            let Some(dw0) = ctrl.take_event() else { break };
            let cid = self.aers.remove(0);
            tracing::debug!(
                cntlid = ctrl.cntlid,
                dw0 = format_args!("{dw0:#010x}"),
                "asynchronous event reported"
            );
            let mut r = Reply::ok();
            r.dw0 = dw0;
            self.complete(cid, r);
        }
    }

    /// Complete held AERs as aborted before the queue goes away.
    fn abort_aers(&mut self) {
        for cid in std::mem::take(&mut self.aers) {
            self.complete(
                cid,
                Reply::status(Status::new(StatusCode::ABORTED_SQ_DELETION)),
            );
        }
    }

    /// Detach from the controller: an admin queue takes its controller with it.
    fn unbind(&mut self) {
        let Some(b) = self.binding.take() else { return };
        if b.qid == 0 {
            b.ctrl.teardown(TeardownReason::AdminGone);
        } else {
            b.ctrl.remove_io_queue(b.qid);
        }
    }
}

/// Whether a command moves data from host to controller.
fn wants_h2c(sqe: &SubmissionEntry, admin_queue: bool) -> bool {
    if sqe.opcode == admin_opcode::FABRICS {
        return matches!(sqe.fctype(), fctype::CONNECT | fctype::AUTH_SEND);
    }
    if admin_queue {
        // Opcode bits 1:0 = 01b: host to controller (none of ours, but honour it).
        sqe.opcode & 3 == 1
    } else {
        matches!(sqe.opcode, 0x01 | 0x09) || sqe.opcode & 3 == 1
    }
}
