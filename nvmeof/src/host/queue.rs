//! One queue pair: one TCP connection, one task that owns it.
//!
//! The task owns the socket halves and the command table, so nothing on the
//! I/O path takes a lock: callers hand it requests through a bounded channel
//! and get the completion back through a oneshot. It accepts a new request
//! only when a command id is free, which keeps the queue depth the controller
//! granted (exceeding it gets a host disconnected by SPDK). When anything goes
//! wrong with the connection the task fails every outstanding and queued
//! request with a path error and reports the failure; it never retries by
//! itself, because only the controller-level supervisor knows whether the
//! association is still valid.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::error::HostError;
use crate::nvme::{
    Completion, ConnectData, FabricsCommand, Sgl, Status, SubmissionEntry, CONNECT_DATA_SIZE,
};
use crate::tcp::{
    self, C2HData, CapsuleCmd, ConnectionParams, FatalError, FatalErrorStatus, FrameError, H2CData,
    IcReq, Pdu, PduError, PduReader, PduWriter, Role, TermReq, R2T,
};

/// Connect attribute: SQ flow control disabled.
const CATTR_DISABLE_SQ_FLOW_CONTROL: u8 = 1 << 2;

/// A command for the queue task.
#[derive(Debug)]
pub(crate) struct Request {
    pub sqe: SubmissionEntry,
    /// Data the host sends with the command.
    pub data_out: Bytes,
    /// Bytes the command reads from the controller.
    pub read_len: u32,
    /// Name for error messages.
    pub name: &'static str,
    pub reply: oneshot::Sender<Result<Response, HostError>>,
}

/// A completed command: its completion entry and any data read.
#[derive(Debug, Clone)]
pub struct Response {
    /// The completion entry (for C2HData with SUCCESS, synthesized).
    pub cqe: Completion,
    /// Data read from the controller.
    pub data: Bytes,
}

/// Everything one connection needs to know.
#[derive(Debug, Clone)]
pub(crate) struct QueueSetup {
    pub addr: SocketAddr,
    pub qid: u16,
    /// Commands outstanding at most (the Connect SQSIZE is this minus one).
    pub depth: u16,
    pub kato_ms: u32,
    pub cntlid: u16,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub header_digest: bool,
    pub data_digest: bool,
    /// Largest data this end accepts in one PDU.
    pub max_rx_data: u32,
    /// Largest data sent in-capsule; more goes through R2T.
    pub in_capsule: u32,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
}

/// Handle to a running queue.
#[derive(Debug, Clone)]
pub(crate) struct QueueHandle {
    pub tx: mpsc::Sender<Request>,
    pub qid: u16,
}

struct Slot {
    reply: oneshot::Sender<Result<Response, HostError>>,
    name: &'static str,
    /// Data still owed to R2Ts (empty once sent in-capsule).
    data_out: Bytes,
    read: BytesMut,
    received: usize,
    deadline: Instant,
}

/// Why a queue task ended.
#[derive(Debug)]
pub(crate) enum QueueExit {
    /// Every handle was dropped.
    Closed,
    /// The connection failed.
    Failed(HostError),
}

/// Opens the connection, runs ICReq/ICResp and Fabrics Connect, and starts
/// the queue task. Returns the handle, the Connect completion and the task.
pub(crate) async fn open(
    setup: QueueSetup,
    on_exit: impl FnOnce(QueueExit) + Send + 'static,
) -> Result<(QueueHandle, Completion, tokio::task::JoinHandle<()>), HostError> {
    let stream = tokio::time::timeout(
        setup.connect_timeout,
        tokio::net::TcpStream::connect(setup.addr),
    )
    .await
    .map_err(|_| HostError::Path(format!("connect to {} timed out", setup.addr)))?
    .map_err(|e| HostError::Path(format!("connect to {}: {e}", setup.addr)))?;
    let (mut reader, mut writer) =
        tcp::split(stream).map_err(|e| HostError::Path(format!("socket setup: {e}")))?;
    let params = tokio::time::timeout(
        setup.connect_timeout,
        initialize(&mut reader, &mut writer, &setup),
    )
    .await
    .map_err(|_| HostError::Path("ICReq/ICResp timed out".into()))??;
    start(setup, reader, writer, params, on_exit).await
}

/// Exchanges ICReq/ICResp and returns the negotiated parameters.
pub(crate) async fn initialize<R, W>(
    reader: &mut PduReader<R>,
    writer: &mut PduWriter<W>,
    setup: &QueueSetup,
) -> Result<ConnectionParams, HostError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let initial = ConnectionParams::initial(Role::Host);
    let req = IcReq {
        pfv: 0,
        hpda: 0,
        hdgst: setup.header_digest,
        ddgst: setup.data_digest,
        maxr2t: 0,
    };
    writer
        .write_pdu(&Pdu::IcReq(req), &initial)
        .await
        .map_err(frame_err)?;
    let resp = match reader.read_pdu(&initial).await.map_err(frame_err)? {
        Pdu::IcResp(r) => r,
        Pdu::C2HTermReq(t) => {
            return Err(HostError::Path(format!(
                "controller refused ICReq: {:?}",
                t.fes
            )))
        }
        other => {
            return Err(HostError::Protocol(format!(
                "expected ICResp, got {:?}",
                other.pdu_type()
            )))
        }
    };
    if resp.hdgst != setup.header_digest || resp.ddgst != setup.data_digest {
        return Err(HostError::Setup(format!(
            "digest negotiation: asked header={} data={}, controller answered header={} data={}",
            setup.header_digest, setup.data_digest, resp.hdgst, resp.ddgst
        )));
    }
    Ok(ConnectionParams::negotiated(
        Role::Host,
        &req,
        &resp,
        setup.max_rx_data,
    ))
}

/// Starts the queue task on an initialized connection and sends Connect.
pub(crate) async fn start<R, W>(
    setup: QueueSetup,
    reader: PduReader<R>,
    writer: PduWriter<W>,
    params: ConnectionParams,
    on_exit: impl FnOnce(QueueExit) + Send + 'static,
) -> Result<(QueueHandle, Completion, tokio::task::JoinHandle<()>), HostError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let depth = setup.depth.max(1);
    let (tx, rx) = mpsc::channel(usize::from(depth) * 2);
    let conn = Conn {
        reader,
        writer,
        params,
        slots: (0..depth).map(|_| None).collect(),
        free: (0..depth).rev().collect(),
        rx,
        in_capsule: usize::try_from(setup.in_capsule).unwrap_or(usize::MAX),
        command_timeout: setup.command_timeout,
    };
    let task = tokio::spawn(async move {
        let exit = conn.run().await;
        on_exit(exit);
    });
    let handle = QueueHandle { tx, qid: setup.qid };
    let connect = FabricsCommand::Connect {
        recfmt: 0,
        qid: setup.qid,
        sqsize: depth - 1,
        // I/O queues ask for SQ flow control to be disabled: this host never
        // reads SQHD, and it lets the controller use the C2HData SUCCESS flag.
        cattr: if setup.qid == 0 {
            0
        } else {
            CATTR_DISABLE_SQ_FLOW_CONTROL
        },
        kato_ms: if setup.qid == 0 { setup.kato_ms } else { 0 },
    };
    let data = ConnectData {
        hostid: setup.hostid,
        cntlid: setup.cntlid,
        subnqn: setup.subnqn.clone(),
        hostnqn: setup.hostnqn.clone(),
    };
    let r = submit(
        &handle,
        connect.to_sqe(0),
        Bytes::copy_from_slice(&data.encode()[..CONNECT_DATA_SIZE]),
        0,
        "connect",
    )
    .await;
    match r {
        Ok(resp) => Ok((handle, resp.cqe, task)),
        Err(e) => {
            task.abort();
            Err(e)
        }
    }
}

/// Sends a request and waits for its completion (any status).
pub(crate) async fn submit(
    q: &QueueHandle,
    sqe: SubmissionEntry,
    data_out: Bytes,
    read_len: u32,
    name: &'static str,
) -> Result<Response, HostError> {
    let (reply, rx) = oneshot::channel();
    q.tx.send(Request {
        sqe,
        data_out,
        read_len,
        name,
        reply,
    })
    .await
    .map_err(|_| HostError::Path(format!("queue {} is down", q.qid)))?;
    rx.await
        .map_err(|_| HostError::Path(format!("queue {} went down", q.qid)))?
}

fn frame_err(e: FrameError) -> HostError {
    match e {
        FrameError::Pdu(p) => HostError::Protocol(p.to_string()),
        other => HostError::Path(other.to_string()),
    }
}

struct Conn<R, W> {
    reader: PduReader<R>,
    writer: PduWriter<W>,
    params: ConnectionParams,
    slots: Vec<Option<Slot>>,
    free: Vec<u16>,
    rx: mpsc::Receiver<Request>,
    in_capsule: usize,
    command_timeout: Duration,
}

/// Ends the connection: the error for the outstanding commands and, for
/// protocol violations, the termination request to send first.
struct Fatal {
    error: HostError,
    term: Option<FatalError>,
}

impl From<HostError> for Fatal {
    fn from(error: HostError) -> Self {
        Fatal { error, term: None }
    }
}

fn violation(fes: FatalErrorStatus, what: String) -> Fatal {
    Fatal {
        error: HostError::Protocol(what),
        term: Some(FatalError { fes, fei: 0 }),
    }
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    async fn run(mut self) -> QueueExit {
        let exit = self.serve().await;
        let (failure, term) = match exit {
            Ok(()) => (None, None),
            Err(f) => (Some(f.error), f.term),
        };
        if let Some(t) = term {
            let pdu = Pdu::H2CTermReq(TermReq {
                fes: t.fes,
                fei: t.fei,
                data: Bytes::copy_from_slice(self.reader.last_header()),
            });
            // Best effort: the connection is being dropped either way.
            let _ = tokio::time::timeout(
                Duration::from_millis(100),
                self.writer.write_pdu(&pdu, &self.params),
            )
            .await;
        }
        let err = failure
            .clone()
            .unwrap_or_else(|| HostError::Closed("queue closed".into()));
        for slot in self.slots.iter_mut() {
            if let Some(s) = slot.take() {
                let _ = s.reply.send(Err(path_error(&err)));
            }
        }
        self.rx.close();
        while let Ok(r) = self.rx.try_recv() {
            let _ = r.reply.send(Err(path_error(&err)));
        }
        let _ = self.writer.shutdown().await;
        match failure {
            None => QueueExit::Closed,
            Some(e) => QueueExit::Failed(e),
        }
    }

    async fn serve(&mut self) -> Result<(), Fatal> {
        let tick_every =
            (self.command_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let can_take = !self.free.is_empty();
            let pending = self.writer.pending() > 0;
            tokio::select! {
                r = self.reader.read_pdu(&self.params) => match r {
                    Ok(pdu) => self.on_pdu(pdu)?,
                    Err(FrameError::Pdu(e)) => return Err(self.on_bad_pdu(e)),
                    Err(e) => return Err(HostError::Path(e.to_string()).into()),
                },
                req = self.rx.recv(), if can_take => match req {
                    Some(req) => {
                        self.submit(req)?;
                        while !self.free.is_empty() {
                            match self.rx.try_recv() {
                                Ok(req) => self.submit(req)?,
                                Err(_) => break,
                            }
                        }
                    }
                    None => {
                        if self.free.len() == self.slots.len() {
                            return Ok(());
                        }
                        // Handles gone but commands outstanding: wait for them.
                        self.rx.close();
                    }
                },
                r = self.writer.flush(), if pending => {
                    r.map_err(|e| HostError::Path(format!("send: {e}")))?;
                }
                _ = tick.tick() => self.check_timeouts()?,
            }
        }
    }

    fn on_bad_pdu(&mut self, e: PduError) -> Fatal {
        match e.fatal() {
            Some(t) => Fatal {
                error: HostError::Protocol(e.to_string()),
                term: Some(t),
            },
            None => HostError::Protocol(e.to_string()).into(),
        }
    }

    fn check_timeouts(&mut self) -> Result<(), Fatal> {
        let now = Instant::now();
        let expired = self
            .slots
            .iter_mut()
            .filter(|s| s.as_ref().is_some_and(|s| s.deadline <= now))
            .filter_map(Option::take)
            .collect::<Vec<_>>();
        if expired.is_empty() {
            return Ok(());
        }
        let mut name = "command";
        for s in expired {
            name = s.name;
            let _ = s.reply.send(Err(HostError::Timeout {
                command: s.name,
                after: self.command_timeout,
            }));
        }
        // The controller may still answer those command ids; the only safe
        // way to reuse them is a new association.
        Err(HostError::Timeout {
            command: name,
            after: self.command_timeout,
        }
        .into())
    }

    fn submit(&mut self, req: Request) -> Result<(), Fatal> {
        let Some(cid) = self.free.pop() else {
            let _ = req.reply.send(Err(HostError::Path("queue full".into())));
            return Ok(());
        };
        let mut sqe = req.sqe;
        sqe.cid = cid;
        sqe.psdt = SubmissionEntry::PSDT_SGL;
        let out_len = req.data_out.len();
        let (capsule_data, data_out) = if out_len == 0 {
            sqe.dptr = if req.read_len > 0 {
                Sgl::transport(req.read_len)
            } else {
                Sgl::null()
            };
            (Bytes::new(), Bytes::new())
        } else {
            let len = u32::try_from(out_len).map_err(|_| {
                HostError::InvalidRequest(format!("{out_len} bytes is too large for one command"))
            });
            let len = match len {
                Ok(l) => l,
                Err(e) => {
                    self.free.push(cid);
                    let _ = req.reply.send(Err(e));
                    return Ok(());
                }
            };
            if out_len <= self.in_capsule {
                sqe.dptr = Sgl::in_capsule(len);
                (req.data_out, Bytes::new())
            } else {
                sqe.dptr = Sgl::transport(len);
                (Bytes::new(), req.data_out)
            }
        };
        let read_len = usize::try_from(req.read_len).unwrap_or(0);
        let pdu = Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: capsule_data,
        });
        self.writer
            .queue(&pdu, &self.params)
            .map_err(HostError::from)?;
        self.slots[usize::from(cid)] = Some(Slot {
            reply: req.reply,
            name: req.name,
            data_out,
            read: if read_len > 0 {
                BytesMut::zeroed(read_len)
            } else {
                BytesMut::new()
            },
            received: 0,
            deadline: Instant::now() + self.command_timeout,
        });
        Ok(())
    }

    fn slot(&mut self, cid: u16, what: &str) -> Result<&mut Slot, Fatal> {
        self.slots
            .get_mut(usize::from(cid))
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                violation(
                    FatalErrorStatus::InvalidHeaderField,
                    format!("{what} for unknown command id {cid}"),
                )
            })
    }

    fn complete(&mut self, cid: u16, cqe: Completion) {
        if let Some(s) = self.slots.get_mut(usize::from(cid)).and_then(Option::take) {
            self.free.push(cid);
            let result = if cqe.status.is_success() && s.received != s.read.len() {
                Err(HostError::Protocol(format!(
                    "{}: controller reported success after {} of {} data bytes",
                    s.name,
                    s.received,
                    s.read.len()
                )))
            } else {
                Ok(Response {
                    cqe,
                    data: s.read.freeze(),
                })
            };
            let _ = s.reply.send(result);
        }
    }

    fn on_pdu(&mut self, pdu: Pdu) -> Result<(), Fatal> {
        match pdu {
            Pdu::CapsuleResp(r) => {
                self.slot(r.cqe.cid, "response")?;
                self.complete(r.cqe.cid, r.cqe);
            }
            Pdu::C2HData(d) => self.on_c2h(d)?,
            Pdu::R2T(r) => self.on_r2t(r)?,
            Pdu::C2HTermReq(t) => {
                return Err(HostError::Path(format!(
                    "controller terminated the connection: {:?} (fei {})",
                    t.fes, t.fei
                ))
                .into())
            }
            other => {
                return Err(violation(
                    FatalErrorStatus::InvalidHeaderField,
                    format!("unexpected {:?}", other.pdu_type()),
                ))
            }
        }
        Ok(())
    }

    fn on_c2h(&mut self, d: C2HData) -> Result<(), Fatal> {
        let slot = self.slot(d.cccid, "C2HData")?;
        let start = usize::try_from(d.datao).unwrap_or(usize::MAX);
        let end = start.saturating_add(d.data.len());
        if end > slot.read.len() {
            return Err(violation(
                FatalErrorStatus::DataOutOfRange,
                format!(
                    "C2HData {start}..{end} beyond the {} bytes of command {}",
                    slot.read.len(),
                    d.cccid
                ),
            ));
        }
        slot.read[start..end].copy_from_slice(&d.data);
        slot.received += d.data.len();
        if d.success {
            let cqe = Completion::new(d.cccid, Status::SUCCESS);
            self.complete(d.cccid, cqe);
        }
        Ok(())
    }

    fn on_r2t(&mut self, r: R2T) -> Result<(), Fatal> {
        let maxh2c = usize::try_from(self.params.maxh2cdata)
            .unwrap_or(usize::MAX)
            .max(4096);
        let slot = self.slot(r.cccid, "R2T")?;
        let start = usize::try_from(r.r2to).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(r.r2tl).unwrap_or(usize::MAX));
        if end > slot.data_out.len() {
            return Err(violation(
                FatalErrorStatus::DataOutOfRange,
                format!(
                    "R2T {start}..{end} beyond the {} bytes of command {}",
                    slot.data_out.len(),
                    r.cccid
                ),
            ));
        }
        let data = slot.data_out.clone();
        let mut off = start;
        while off < end {
            let n = (end - off).min(maxh2c);
            let pdu = Pdu::H2CData(H2CData {
                cccid: r.cccid,
                ttag: r.ttag,
                datao: u32::try_from(off).unwrap_or(u32::MAX),
                last: off + n == end,
                data: data.slice(off..off + n),
            });
            self.writer
                .queue(&pdu, &self.params)
                .map_err(HostError::from)?;
            off += n;
        }
        Ok(())
    }
}

fn path_error(cause: &HostError) -> HostError {
    match cause {
        HostError::Closed(m) => HostError::Closed(m.clone()),
        other => HostError::Path(format!("connection lost: {other}")),
    }
}
