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
    /// Bytes the command reads.
    read_len: usize,
    /// Data received so far (in order, as NVMe/TCP requires).
    read: ReadBuf,
    received: usize,
    deadline: Instant,
}

/// Read data: a command answered by one C2HData keeps that PDU's buffer
/// (no copy); data in several PDUs is gathered.
enum ReadBuf {
    Empty,
    Whole(Bytes),
    Parts(BytesMut),
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
        conn.run(on_exit).await;
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
    let request = Request {
        sqe,
        data_out,
        read_len,
        name,
        reply,
    };
    let result = match q.tx.send(request).await {
        Ok(()) => match rx.await {
            Ok(r) => r,
            Err(_) => Err(HostError::Path(format!("queue {} went down", q.qid))),
        },
        Err(_) => Err(HostError::Path(format!("queue {} is down", q.qid))),
    };
    if matches!(result, Err(HostError::Path(_))) {
        // A dead queue fails instantly; yield so that a caller retrying in a
        // tight loop cannot starve the tasks that rebuild the association.
        tokio::task::yield_now().await;
    }
    result
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
    /// Header of the offending PDU when it decoded fine but broke the
    /// protocol (otherwise the reader's last rejected header is sent).
    header: Option<Bytes>,
}

impl From<HostError> for Fatal {
    fn from(error: HostError) -> Self {
        Fatal {
            error,
            term: None,
            header: None,
        }
    }
}

/// A well-formed PDU the connection state does not allow; `fei` is the byte
/// offset of the offending field for FES 01h.
fn violation(fes: FatalErrorStatus, fei: u32, what: String) -> Fatal {
    Fatal {
        error: HostError::Protocol(what),
        term: Some(FatalError { fes, fei }),
        header: None,
    }
}

impl<R, W> Conn<R, W>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    /// Serves until the connection ends, then reports how (first, before any
    /// teardown step can be delayed) and fails everything still pending.
    async fn run(mut self, on_exit: impl FnOnce(QueueExit)) {
        let exit = self.serve().await;
        let (failure, term, header) = match exit {
            Ok(()) => (None, None, None),
            Err(f) => (Some(f.error), f.term, f.header),
        };
        on_exit(match &failure {
            None => QueueExit::Closed,
            Some(e) => QueueExit::Failed(e.clone()),
        });
        if let Some(t) = term {
            let data = header.unwrap_or_else(|| Bytes::copy_from_slice(self.reader.last_header()));
            let pdu = Pdu::H2CTermReq(TermReq {
                fes: t.fes,
                fei: t.fei,
                data,
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
                    Ok(pdu) => {
                        let kept = pdu.clone();
                        if let Err(mut f) = self.on_pdu(pdu) {
                            if f.term.is_some() {
                                let hlen = kept.pdu_type().hlen();
                                f.header = kept.encode(&self.params).ok().map(|e| e.head.slice(..hlen));
                            }
                            return Err(f);
                        }
                    }
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
                header: None,
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
            read_len,
            read: ReadBuf::Empty,
            received: 0,
            deadline: Instant::now() + self.command_timeout,
        });
        Ok(())
    }

    /// The slot of an outstanding command; `fei` is where the PDU carries the
    /// command id (for the termination request if there is none).
    fn slot(&mut self, cid: u16, fei: u32, what: &str) -> Result<&mut Slot, Fatal> {
        self.slots
            .get_mut(usize::from(cid))
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                violation(
                    FatalErrorStatus::InvalidHeaderField,
                    fei,
                    format!("{what} for unknown command id {cid}"),
                )
            })
    }

    fn complete(&mut self, cid: u16, cqe: Completion) {
        if let Some(s) = self.slots.get_mut(usize::from(cid)).and_then(Option::take) {
            self.free.push(cid);
            let result = if cqe.status.is_success() && s.received != s.read_len {
                Err(HostError::Protocol(format!(
                    "{}: controller reported success after {} of {} data bytes",
                    s.name, s.received, s.read_len
                )))
            } else {
                let data = match s.read {
                    ReadBuf::Empty => Bytes::new(),
                    ReadBuf::Whole(b) => b,
                    ReadBuf::Parts(b) => b.freeze(),
                };
                Ok(Response { cqe, data })
            };
            let _ = s.reply.send(result);
        }
    }

    fn on_pdu(&mut self, pdu: Pdu) -> Result<(), Fatal> {
        match pdu {
            Pdu::CapsuleResp(r) => {
                self.slot(r.cqe.cid, 20, "response")?;
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
                    0,
                    format!("unexpected {:?}", other.pdu_type()),
                ))
            }
        }
        Ok(())
    }

    fn on_c2h(&mut self, d: C2HData) -> Result<(), Fatal> {
        let slot = self.slot(d.cccid, 8, "C2HData")?;
        let start = usize::try_from(d.datao).unwrap_or(usize::MAX);
        let end = start.saturating_add(d.data.len());
        if start != slot.received {
            return Err(violation(
                FatalErrorStatus::InvalidHeaderField,
                12,
                format!(
                    "C2HData at offset {start} for command {}, expected {} (data must arrive in order)",
                    d.cccid, slot.received
                ),
            ));
        }
        if end > slot.read_len {
            return Err(violation(
                FatalErrorStatus::DataOutOfRange,
                0,
                format!(
                    "C2HData {start}..{end} beyond the {} bytes of command {}",
                    slot.read_len, d.cccid
                ),
            ));
        }
        slot.read = match std::mem::replace(&mut slot.read, ReadBuf::Empty) {
            ReadBuf::Empty if d.data.len() == slot.read_len => ReadBuf::Whole(d.data),
            ReadBuf::Empty => {
                let mut b = BytesMut::with_capacity(slot.read_len);
                b.extend_from_slice(&d.data);
                ReadBuf::Parts(b)
            }
            ReadBuf::Whole(first) => {
                // Unreachable in practice (a whole buffer leaves no room), kept total.
                let mut b = BytesMut::with_capacity(slot.read_len);
                b.extend_from_slice(&first);
                b.extend_from_slice(&d.data);
                ReadBuf::Parts(b)
            }
            ReadBuf::Parts(mut b) => {
                b.extend_from_slice(&d.data);
                ReadBuf::Parts(b)
            }
        };
        slot.received = end;
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
        let slot = self.slot(r.cccid, 8, "R2T")?;
        let start = usize::try_from(r.r2to).unwrap_or(usize::MAX);
        let end = start.saturating_add(usize::try_from(r.r2tl).unwrap_or(usize::MAX));
        if end > slot.data_out.len() {
            return Err(violation(
                FatalErrorStatus::DataOutOfRange,
                0,
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

#[cfg(test)]
mod tests {
    //! The queue task against a scripted controller on an in-memory stream.

    use super::*;
    use crate::nvme::{AdminCommand, IoCommand, StatusCode};
    use crate::tcp::{CapsuleResp, IcResp};
    use tokio::io::{DuplexStream, ReadHalf, WriteHalf};

    type Ctl = (
        PduReader<ReadHalf<DuplexStream>>,
        PduWriter<WriteHalf<DuplexStream>>,
    );

    fn setup(depth: u16, timeout_ms: u64) -> QueueSetup {
        QueueSetup {
            addr: "127.0.0.1:1".parse().unwrap(),
            qid: 1,
            depth,
            kato_ms: 0,
            cntlid: 1,
            subnqn: "nqn.test:sub".into(),
            hostnqn: "nqn.test:host".into(),
            hostid: [1; 16],
            header_digest: true,
            data_digest: true,
            max_rx_data: 1 << 20,
            in_capsule: 4096,
            connect_timeout: Duration::from_secs(1),
            command_timeout: Duration::from_millis(timeout_ms),
        }
    }

    fn ctl_params() -> ConnectionParams {
        ConnectionParams {
            role: Role::Controller,
            hdgst: true,
            ddgst: true,
            cpda: 0,
            hpda: 0,
            maxh2cdata: 4096,
            max_rx_data: 1 << 20,
        }
    }

    /// Starts a queue against a scripted controller that has answered
    /// ICReq and Connect; returns the handle, the controller side and the
    /// channel that reports how the queue ended.
    async fn started(
        depth: u16,
        timeout_ms: u64,
    ) -> (QueueHandle, Ctl, tokio::sync::oneshot::Receiver<QueueExit>) {
        let (h, c) = tokio::io::duplex(1 << 20);
        let (hr, hw) = tokio::io::split(h);
        let (cr, cw) = tokio::io::split(c);
        let (mut hr, mut hw) = (PduReader::new(hr), PduWriter::new(hw));
        let (mut cr, mut cw) = (PduReader::new(cr), PduWriter::new(cw));
        let s = setup(depth, timeout_ms);
        let ctl = tokio::spawn(async move {
            let init = ConnectionParams::initial(Role::Controller);
            let Pdu::IcReq(req) = cr.read_pdu(&init).await.unwrap() else {
                panic!()
            };
            assert!(req.hdgst && req.ddgst);
            let resp = IcResp {
                pfv: 0,
                cpda: 0,
                hdgst: true,
                ddgst: true,
                maxh2cdata: 4096,
            };
            cw.write_pdu(&Pdu::IcResp(resp), &init).await.unwrap();
            let p = ctl_params();
            let Pdu::CapsuleCmd(c) = cr.read_pdu(&p).await.unwrap() else {
                panic!()
            };
            let FabricsCommand::Connect {
                qid, sqsize, cattr, ..
            } = FabricsCommand::parse(&c.sqe).unwrap()
            else {
                panic!()
            };
            assert_eq!(
                (qid, sqsize, cattr),
                (1, depth - 1, CATTR_DISABLE_SQ_FLOW_CONTROL)
            );
            assert!(c.sqe.dptr.is_in_capsule());
            assert_eq!(
                ConnectData::decode(&c.data).unwrap().hostnqn,
                "nqn.test:host"
            );
            let mut cqe = Completion::new(c.sqe.cid, Status::SUCCESS);
            cqe.dw0 = 1;
            cw.write_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }), &p)
                .await
                .unwrap();
            (cr, cw)
        });
        let mut params = initialize(&mut hr, &mut hw, &s).await.unwrap();
        params.max_rx_data = s.max_rx_data;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (q, cqe, _task) = start(s, hr, hw, params, move |e| {
            let _ = tx.send(e);
        })
        .await
        .unwrap();
        assert_eq!(cqe.dw0, 1);
        (q, ctl.await.unwrap(), rx)
    }

    fn read_sqe(blocks: u16) -> SubmissionEntry {
        IoCommand::Read {
            nsid: 1,
            slba: 0,
            nlb: blocks - 1,
            fua: false,
        }
        .to_sqe(0)
    }

    async fn next_cmd(c: &mut Ctl) -> CapsuleCmd {
        match c.0.read_pdu(&ctl_params()).await.unwrap() {
            Pdu::CapsuleCmd(c) => c,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn reads_whole_and_in_parts() {
        let (q, mut c, _exit) = started(4, 5000).await;
        let qq = q.clone();
        let r =
            tokio::spawn(async move { submit(&qq, read_sqe(2), Bytes::new(), 8192, "read").await });
        let cmd = next_cmd(&mut c).await;
        assert_eq!(cmd.sqe.dptr, Sgl::transport(8192));
        let p = ctl_params();
        let data: Vec<u8> = (0..8192u32).map(|i| i.to_le_bytes()[0]).collect();
        for (i, chunk) in data.chunks(4096).enumerate() {
            let last = i == 1;
            let pdu = Pdu::C2HData(C2HData {
                cccid: cmd.sqe.cid,
                datao: u32::try_from(i * 4096).unwrap(),
                last,
                success: last,
                data: Bytes::copy_from_slice(chunk),
            });
            c.1.write_pdu(&pdu, &p).await.unwrap();
        }
        let resp = r.await.unwrap().unwrap();
        assert_eq!(&resp.data[..], &data[..]);
        assert!(resp.cqe.status.is_success());

        // One C2HData, then a response capsule with an error status.
        let qq = q.clone();
        let r =
            tokio::spawn(async move { submit(&qq, read_sqe(1), Bytes::new(), 4096, "read").await });
        let cmd = next_cmd(&mut c).await;
        let pdu = Pdu::C2HData(C2HData {
            cccid: cmd.sqe.cid,
            datao: 0,
            last: true,
            success: false,
            data: Bytes::from(vec![9u8; 4096]),
        });
        c.1.write_pdu(&pdu, &p).await.unwrap();
        let cqe = Completion::new(cmd.sqe.cid, Status::new(StatusCode::UNRECOVERED_READ_ERROR));
        c.1.write_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }), &p)
            .await
            .unwrap();
        let resp = r.await.unwrap().unwrap();
        assert_eq!(resp.cqe.status.code, StatusCode::UNRECOVERED_READ_ERROR);
    }

    #[tokio::test]
    async fn large_write_follows_r2t_in_maxh2cdata_pieces() {
        let (q, mut c, _exit) = started(4, 5000).await;
        let data = Bytes::from(
            (0..20000u32)
                .map(|i| i.to_le_bytes()[1])
                .collect::<Vec<u8>>(),
        );
        let (qq, d2) = (q.clone(), data.clone());
        let sqe = IoCommand::Write {
            nsid: 1,
            slba: 0,
            nlb: 0,
            fua: false,
        }
        .to_sqe(0);
        let w = tokio::spawn(async move { submit(&qq, sqe, d2, 0, "write").await });
        let cmd = next_cmd(&mut c).await;
        assert!(
            cmd.data.is_empty(),
            "20000 bytes exceed the 4096 in-capsule limit"
        );
        assert_eq!(cmd.sqe.dptr, Sgl::transport(20000));
        let p = ctl_params();
        let mut got = vec![0u8; 20000];
        // Two R2Ts with different tags, the second range first.
        for (ttag, r2to, r2tl) in [(7u16, 10000u32, 10000u32), (8, 0, 10000)] {
            let r2t = Pdu::R2T(R2T {
                cccid: cmd.sqe.cid,
                ttag,
                r2to,
                r2tl,
            });
            c.1.write_pdu(&r2t, &p).await.unwrap();
            let mut off = r2to;
            loop {
                let Pdu::H2CData(d) = c.0.read_pdu(&p).await.unwrap() else {
                    panic!()
                };
                assert_eq!((d.cccid, d.ttag, d.datao), (cmd.sqe.cid, ttag, off));
                assert!(d.data.len() <= 4096);
                let o = usize::try_from(off).unwrap();
                got[o..o + d.data.len()].copy_from_slice(&d.data);
                off += u32::try_from(d.data.len()).unwrap();
                assert_eq!(d.last, off == r2to + r2tl);
                if d.last {
                    break;
                }
            }
        }
        assert_eq!(&got[..], &data[..]);
        let cqe = Completion::new(cmd.sqe.cid, Status::SUCCESS);
        c.1.write_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }), &p)
            .await
            .unwrap();
        assert!(w.await.unwrap().unwrap().cqe.status.is_success());
    }

    #[tokio::test]
    async fn never_exceeds_queue_depth() {
        let (q, mut c, _exit) = started(3, 5000).await;
        let mut reqs = Vec::new();
        for _ in 0..7 {
            let qq = q.clone();
            reqs.push(tokio::spawn(async move {
                submit(
                    &qq,
                    AdminCommand::KeepAlive.to_sqe(0),
                    Bytes::new(),
                    0,
                    "nop",
                )
                .await
            }));
        }
        let p = ctl_params();
        let mut done = 0;
        while done < 7 {
            // Collect what is outstanding: never more than the depth.
            let mut batch = vec![next_cmd(&mut c).await];
            while let Ok(Ok(Pdu::CapsuleCmd(cmd))) =
                tokio::time::timeout(Duration::from_millis(50), c.0.read_pdu(&p)).await
            {
                batch.push(cmd);
            }
            assert!(
                batch.len() <= 3,
                "{} commands outstanding at depth 3",
                batch.len()
            );
            let mut cids: Vec<u16> = batch.iter().map(|b| b.sqe.cid).collect();
            cids.dedup();
            assert_eq!(
                cids.len(),
                batch.len(),
                "command ids unique while outstanding"
            );
            for b in batch {
                let cqe = Completion::new(b.sqe.cid, Status::SUCCESS);
                c.1.write_pdu(&Pdu::CapsuleResp(CapsuleResp { cqe }), &p)
                    .await
                    .unwrap();
                done += 1;
            }
        }
        for r in reqs {
            assert!(r.await.unwrap().is_ok());
        }
    }

    async fn expect_term(c: &mut Ctl, fei: u32, first_byte: u8) {
        match c.0.read_pdu(&ctl_params()).await.unwrap() {
            Pdu::H2CTermReq(t) => {
                assert_eq!((t.fes, t.fei), (FatalErrorStatus::InvalidHeaderField, fei));
                assert_eq!(t.data[0], first_byte, "offending header echoed");
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn unknown_command_id_terminates_with_fes_and_offset() {
        let (q, mut c, exit) = started(4, 5000).await;
        let qq = q.clone();
        let r =
            tokio::spawn(async move { submit(&qq, read_sqe(1), Bytes::new(), 4096, "read").await });
        let cmd = next_cmd(&mut c).await;
        let bogus = Pdu::C2HData(C2HData {
            cccid: cmd.sqe.cid.wrapping_add(1),
            datao: 0,
            last: true,
            success: true,
            data: Bytes::from(vec![0u8; 16]),
        });
        c.1.write_pdu(&bogus, &ctl_params()).await.unwrap();
        expect_term(&mut c, 8, 0x07).await;
        let e = r.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), crate::host::ErrorKind::Path, "{e}");
        assert!(matches!(
            exit.await.unwrap(),
            QueueExit::Failed(HostError::Protocol(_))
        ));
        assert!(submit(&q, read_sqe(1), Bytes::new(), 4096, "read")
            .await
            .is_err());
    }

    #[tokio::test]
    async fn out_of_order_data_terminates() {
        let (q, mut c, _exit) = started(4, 5000).await;
        let qq = q.clone();
        let r =
            tokio::spawn(async move { submit(&qq, read_sqe(2), Bytes::new(), 8192, "read").await });
        let cmd = next_cmd(&mut c).await;
        let skip = Pdu::C2HData(C2HData {
            cccid: cmd.sqe.cid,
            datao: 4096,
            last: true,
            success: true,
            data: Bytes::from(vec![0u8; 4096]),
        });
        c.1.write_pdu(&skip, &ctl_params()).await.unwrap();
        expect_term(&mut c, 12, 0x07).await;
        assert!(r.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn silence_times_out() {
        let (q, mut c, exit) = started(4, 200).await;
        let started_at = Instant::now();
        let e = submit(&q, read_sqe(1), Bytes::new(), 4096, "read")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                HostError::Timeout {
                    command: "read",
                    ..
                }
            ),
            "{e}"
        );
        assert!(started_at.elapsed() < Duration::from_secs(2));
        let _ = next_cmd(&mut c).await;
        assert!(matches!(
            exit.await.unwrap(),
            QueueExit::Failed(HostError::Timeout { .. })
        ));
    }
}
