//! One client connection: the fixed-newstyle option haggling, then the transmission
//! phase with several requests in flight.
//!
//! The transmission phase runs as a reader and a writer joined in one task. The
//! reader parses requests, reads write payloads and hands each valid request to its
//! own spawned task, so that requests complete (and are answered) out of order, as
//! the protocol allows and as a volume spread over several nodes needs. Two
//! semaphores bound what one connection can make the server hold: a count of
//! requests in flight and a byte budget for payloads (a write's data from the moment
//! it is read, a read's data until it is written out). When either is exhausted the
//! reader stops reading and TCP pushes back on the client. Replies go through one
//! channel to the writer, which batches whatever is ready into one flush. Nothing
//! here holds a lock across an await, and no input can make it panic: every length
//! from the wire is checked before it sizes a buffer.

use super::proto::*;
use super::{Export, NbdError, Shared};
use crate::frontend::{check_range, BlockDevice, DeviceError};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

/// Longest option data read into memory; longer options are skipped and refused.
/// (An export name is at most 4096 bytes; every option we understand fits easily.)
const MAX_OPTION_DATA: u32 = 64 * 1024;

/// Resolves when `rx` holds `true`; never resolves if its sender is gone first.
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    if rx.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// How the handshake ended.
enum Handshake {
    /// Transmission on this export, with or without structured replies.
    Go {
        export: Arc<Export>,
        structured: bool,
    },
    /// The client sent NBD_OPT_ABORT.
    Abort,
}

/// Runs a whole session on `stream` until the client leaves, a protocol violation
/// ends it, or `stop` turns true.
pub(crate) async fn run<S>(
    shared: Arc<Shared>,
    mut stream: S,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = shared.config.handshake_timeout;
    let outcome = tokio::select! {
        r = tokio::time::timeout(limit, handshake(&shared, &mut stream)) => match r {
            Ok(r) => r,
            Err(_) => Err(NbdError::HandshakeTimeout(limit)),
        },
        () = stopped(&mut stop) => return Ok(()),
    };
    match outcome {
        Ok(Handshake::Abort) => {
            let _ = stream.shutdown().await;
            Ok(())
        }
        Ok(Handshake::Go { export, structured }) => {
            transmission(&shared, stream, export, structured, stop).await
        }
        Err(e) => {
            shared.handshake_failures.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
    }
}

fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS
        | TFLAG_SEND_FLUSH
        | TFLAG_SEND_FUA
        | TFLAG_SEND_TRIM
        | TFLAG_SEND_WRITE_ZEROES
        | TFLAG_CAN_MULTI_CONN;
    if structured {
        // Reads are always answered with one data chunk, so "don't fragment" holds.
        f |= TFLAG_SEND_DF;
    }
    if export.device.read_only() {
        f |= TFLAG_READ_ONLY;
    }
    f
}

fn len_u32(n: usize) -> Result<u32, NbdError> {
    u32::try_from(n).map_err(|_| NbdError::Protocol(format!("reply of {n} bytes too long")))
}

async fn option_reply<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply: u32,
    data: &[u8],
) -> Result<(), NbdError> {
    s.write_all(&option_reply_header(option, reply, len_u32(data.len())?))
        .await?;
    s.write_all(data).await?;
    Ok(())
}

async fn option_error<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    reply: u32,
    message: &str,
) -> Result<(), NbdError> {
    option_reply(
        s,
        option,
        reply,
        truncate_utf8(message, MAX_STRING).as_bytes(),
    )
    .await
}

/// Parses the data of NBD_OPT_INFO / NBD_OPT_GO: the export name and the list of
/// information requests.
fn parse_info_request(data: &[u8]) -> Result<(&str, Vec<u16>), &'static str> {
    let (len, rest) = data
        .split_first_chunk::<4>()
        .ok_or("option data too short")?;
    let len = usize::try_from(u32::from_be_bytes(*len)).map_err(|_| "name too long")?;
    if len > rest.len() {
        return Err("export name longer than the option data");
    }
    let (name, rest) = rest.split_at(len);
    if name.len() > MAX_STRING {
        return Err("export name longer than 4096 bytes");
    }
    let name = std::str::from_utf8(name).map_err(|_| "export name is not UTF-8")?;
    let (count, rest) = rest
        .split_first_chunk::<2>()
        .ok_or("missing information request count")?;
    let count = usize::from(u16::from_be_bytes(*count));
    if rest.len() != count * 2 {
        return Err("information request count does not match the option length");
    }
    let requests = rest
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Ok((name, requests))
}

async fn send_info<S: AsyncWrite + Unpin>(
    s: &mut S,
    option: u32,
    export: &Export,
    requests: &[u16],
    structured: bool,
) -> Result<(), NbdError> {
    let mut info = Vec::with_capacity(12);
    info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    info.extend_from_slice(&export.device.size_bytes().to_be_bytes());
    info.extend_from_slice(&transmission_flags(export, structured).to_be_bytes());
    option_reply(s, option, REP_INFO, &info).await?;
    // Sent whether or not it was asked for: the export enforces a minimum block size.
    let mut sizes = Vec::with_capacity(14);
    sizes.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    sizes.extend_from_slice(&export.min_block.to_be_bytes());
    sizes.extend_from_slice(&export.preferred_block.to_be_bytes());
    sizes.extend_from_slice(&export.max_block.to_be_bytes());
    option_reply(s, option, REP_INFO, &sizes).await?;
    if requests.contains(&INFO_NAME) {
        let mut b = INFO_NAME.to_be_bytes().to_vec();
        b.extend_from_slice(export.name.as_bytes());
        option_reply(s, option, REP_INFO, &b).await?;
    }
    if let (true, Some(d)) = (
        requests.contains(&INFO_DESCRIPTION),
        export.description.as_deref(),
    ) {
        let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
        b.extend_from_slice(d.as_bytes());
        option_reply(s, option, REP_INFO, &b).await?;
    }
    option_reply(s, option, REP_ACK, &[]).await
}

async fn handshake<S>(shared: &Shared, s: &mut S) -> Result<Handshake, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    s.write_all(&server_greeting()).await?;
    s.flush().await?;
    let client_flags = s.read_u32().await?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let mut structured = false;
    loop {
        let magic = s.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(NbdError::Protocol(format!(
                "option with magic {magic:#x} instead of IHAVEOPT"
            )));
        }
        let option = s.read_u32().await?;
        let len = s.read_u32().await?;
        if len > MAX_OPTION_DATA {
            if option == OPT_EXPORT_NAME {
                // This option cannot be answered with an error.
                return Err(NbdError::Protocol(format!(
                    "NBD_OPT_EXPORT_NAME with a {len}-byte name"
                )));
            }
            let skipped =
                tokio::io::copy(&mut (&mut *s).take(u64::from(len)), &mut tokio::io::sink())
                    .await?;
            if skipped < u64::from(len) {
                return Err(NbdError::Protocol("client closed inside an option".into()));
            }
            option_error(s, option, REP_ERR_INVALID, "option data too long").await?;
            s.flush().await?;
            continue;
        }
        // Bounded by MAX_OPTION_DATA above.
        let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
        s.read_exact(&mut data).await?;
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data);
                let Some(export) = shared.lookup(&name) else {
                    return Err(NbdError::UnknownExport(name.into_owned()));
                };
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.device.size_bytes().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&export, structured).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b).await?;
                s.flush().await?;
                return Ok(Handshake::Go { export, structured });
            }
            OPT_ABORT => {
                // Data, if any, is ignored as the protocol asks.
                option_reply(s, option, REP_ACK, &[]).await?;
                s.flush().await?;
                return Ok(Handshake::Abort);
            }
            OPT_LIST if !data.is_empty() => {
                option_error(s, option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await?;
            }
            OPT_LIST => {
                for export in shared.export_list() {
                    let mut b = len_u32(export.name.len())?.to_be_bytes().to_vec();
                    b.extend_from_slice(export.name.as_bytes());
                    if let Some(d) = &export.description {
                        b.extend_from_slice(d.as_bytes());
                    }
                    option_reply(s, option, REP_SERVER, &b).await?;
                }
                option_reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                option_error(
                    s,
                    option,
                    REP_ERR_INVALID,
                    "NBD_OPT_STRUCTURED_REPLY takes no data",
                )
                .await?;
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                option_reply(s, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(why) => option_error(s, option, REP_ERR_INVALID, why).await?,
                Ok((name, requests)) => match shared.lookup(name) {
                    None => {
                        let msg = format!("no export named {name:?}");
                        option_error(s, option, REP_ERR_UNKNOWN, &msg).await?;
                    }
                    Some(export) => {
                        send_info(s, option, &export, &requests, structured).await?;
                        if option == OPT_GO {
                            s.flush().await?;
                            return Ok(Handshake::Go { export, structured });
                        }
                    }
                },
            },
            _ => {
                let msg = format!("option {option} is not supported");
                option_error(s, option, REP_ERR_UNSUP, &msg).await?;
            }
        }
        s.flush().await?;
    }
}

/// What a request asks of the device once it has passed validation.
#[derive(Debug)]
enum Op {
    Read {
        offset: u64,
        len: u64,
    },
    Write {
        offset: u64,
        data: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        len: u64,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
    },
}

/// How a request ended.
#[derive(Debug)]
enum Outcome {
    Done,
    Data(Vec<u8>),
    Failed { errno: u32, message: String },
}

impl Outcome {
    fn failed(errno: u32, message: impl Into<String>) -> Self {
        Self::Failed {
            errno,
            message: message.into(),
        }
    }
}

/// One reply on its way to the writer; its permits return when it has been sent.
#[derive(Debug)]
struct Reply {
    handle: u64,
    /// The offset of a read (reads are answered differently from everything else).
    read_offset: Option<u64>,
    outcome: Outcome,
    _permits: Permits,
}

#[derive(Debug)]
struct Permits {
    _count: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Maps a device error to the protocol's errno; `writing` selects ENOSPC for writes
/// beyond the end (reads and trims beyond the end are EINVAL), as the protocol asks.
fn device_errno(e: &DeviceError, writing: bool) -> u32 {
    match e {
        DeviceError::OutOfRange { .. } if writing => ENOSPC,
        DeviceError::OutOfRange { .. } | DeviceError::Misaligned { .. } => EINVAL,
        DeviceError::ReadOnly => EPERM,
        DeviceError::NoSpace(_) => ENOSPC,
        DeviceError::Media(_) => EIO,
        DeviceError::Unavailable(_) => ESHUTDOWN,
    }
}

fn device_failure(e: &DeviceError, writing: bool) -> Outcome {
    Outcome::failed(device_errno(e, writing), e.to_string())
}

/// Checks a request's flags and range; the payload of a write has already been read.
fn validate(
    req: &Request,
    data: Option<Vec<u8>>,
    device: &dyn BlockDevice,
    structured: bool,
    max_payload: u32,
) -> Result<Op, Outcome> {
    let allowed = match req.kind {
        CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM => CMD_FLAG_FUA,
        other => return Err(Outcome::failed(EINVAL, format!("unknown command {other}"))),
    };
    if req.flags & !allowed != 0 {
        return Err(Outcome::failed(
            EINVAL,
            format!("flags {:#x} not valid for command {}", req.flags, req.kind),
        ));
    }
    let fua = req.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (req.offset, u64::from(req.length));
    let writing = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM);
    if writing && device.read_only() {
        return Err(Outcome::failed(EPERM, "the export is read-only"));
    }
    if req.kind == CMD_FLUSH {
        if offset != 0 || len != 0 {
            return Err(Outcome::failed(
                EINVAL,
                "flush with nonzero offset or length",
            ));
        }
        return Ok(Op::Flush);
    }
    if req.kind == CMD_READ && req.length > max_payload {
        return Err(Outcome::failed(
            EINVAL,
            format!(
                "read of {} bytes exceeds the maximum block size {max_payload}",
                req.length
            ),
        ));
    }
    check_range(device, offset, len)
        .map_err(|e| device_failure(&e, matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES)))?;
    Ok(match req.kind {
        CMD_READ => Op::Read { offset, len },
        CMD_WRITE => Op::Write {
            offset,
            data: data.unwrap_or_default(),
            fua,
        },
        CMD_TRIM => Op::Trim { offset, len, fua },
        _ => Op::WriteZeroes { offset, len, fua },
    })
}

async fn execute(export: &Export, op: Op) -> Outcome {
    let dev = &*export.device;
    let stats = &export.stats;
    match op {
        Op::Read { offset, len } => match dev.read(offset, len).await {
            Ok(d) if d.len() as u64 == len => {
                stats.read_bytes.fetch_add(len, Ordering::Relaxed);
                Outcome::Data(d)
            }
            Ok(d) => Outcome::failed(
                EIO,
                format!("device returned {} bytes for a {len}-byte read", d.len()),
            ),
            Err(e) => device_failure(&e, false),
        },
        Op::Write { offset, data, fua } => {
            let len = data.len() as u64;
            match dev.write(offset, data, fua).await {
                Ok(()) => {
                    stats.written_bytes.fetch_add(len, Ordering::Relaxed);
                    Outcome::Done
                }
                Err(e) => device_failure(&e, true),
            }
        }
        Op::Flush => match dev.flush().await {
            Ok(()) => Outcome::Done,
            Err(e) => device_failure(&e, true),
        },
        Op::Trim { offset, len, fua } => {
            let mut r = dev.discard(offset, len).await;
            if r.is_ok() && fua && dev.volatile_write_cache() {
                r = dev.flush().await;
            }
            match r {
                Ok(()) => Outcome::Done,
                Err(e) => device_failure(&e, false),
            }
        }
        Op::WriteZeroes { offset, len, fua } => match dev.write_zeroes(offset, len, fua).await {
            Ok(()) => Outcome::Done,
            Err(e) => device_failure(&e, true),
        },
    }
}

/// The reader's side of a connection in transmission.
struct Conn {
    export: Arc<Export>,
    structured: bool,
    max_payload: u32,
    tx: mpsc::Sender<Reply>,
    count: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
}

impl Conn {
    async fn permits(&self, bytes: u32) -> Result<Permits, NbdError> {
        let closed = |_| NbdError::Protocol("connection closing".into());
        let count = self.count.clone().acquire_owned().await.map_err(closed)?;
        let bytes = if bytes == 0 {
            None
        } else {
            Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(bytes)
                    .await
                    .map_err(closed)?,
            )
        };
        Ok(Permits {
            _count: count,
            _bytes: bytes,
        })
    }

    /// Validates the request and either answers it at once or starts it on its own task.
    async fn dispatch(
        &self,
        req: Request,
        data: Option<Vec<u8>>,
        permits: Permits,
    ) -> Result<(), NbdError> {
        let read_offset = (req.kind == CMD_READ).then_some(req.offset);
        let dev = &*self.export.device;
        match validate(&req, data, dev, self.structured, self.max_payload) {
            Err(outcome) => {
                let reply = Reply {
                    handle: req.handle,
                    read_offset,
                    outcome,
                    _permits: permits,
                };
                self.tx
                    .send(reply)
                    .await
                    .map_err(|_| NbdError::Protocol("reply writer gone".into()))
            }
            Ok(op) => {
                let export = self.export.clone();
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    let outcome = execute(&export, op).await;
                    let reply = Reply {
                        handle: req.handle,
                        read_offset,
                        outcome,
                        _permits: permits,
                    };
                    // A send fails only when the connection is already gone.
                    let _ = tx.send(reply).await;
                });
                Ok(())
            }
        }
    }
}

/// Reads a request header; `Ok(false)` on a clean end of stream before its first byte.
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8; REQUEST_LEN],
) -> Result<bool, NbdError> {
    let mut got = 0;
    while got < REQUEST_LEN {
        let n = rd.read(&mut buf[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(NbdError::Protocol(format!(
                "client closed after {got} bytes of a request header"
            )));
        }
        got += n;
    }
    Ok(true)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    conn: Conn,
    stop: &mut watch::Receiver<bool>,
    closed: &mut watch::Receiver<bool>,
) -> Result<(), NbdError> {
    loop {
        let mut header = [0u8; REQUEST_LEN];
        let more = tokio::select! {
            r = read_header(&mut rd, &mut header) => r?,
            () = stopped(stop) => return Ok(()),
            () = stopped(closed) => return Ok(()),
        };
        if !more {
            return Ok(());
        }
        let Some(req) = Request::parse(&header) else {
            return Err(NbdError::Protocol("request with a bad magic".into()));
        };
        conn.export.stats.requests.fetch_add(1, Ordering::Relaxed);
        match req.kind {
            CMD_DISC => return Ok(()),
            CMD_WRITE => {
                if req.length > conn.max_payload {
                    return Err(NbdError::Protocol(format!(
                        "write payload of {} bytes exceeds the maximum block size {}",
                        req.length, conn.max_payload
                    )));
                }
                let permits = conn.permits(req.length).await?;
                let len = usize::try_from(req.length)
                    .map_err(|_| NbdError::Protocol("write too long".into()))?;
                let mut data = vec![0u8; len];
                if let Err(e) = rd.read_exact(&mut data).await {
                    return Err(NbdError::Protocol(format!(
                        "client closed inside a {len}-byte write payload: {e}"
                    )));
                }
                conn.dispatch(req, Some(data), permits).await?;
            }
            kind => {
                let bytes = if kind == CMD_READ {
                    req.length.min(conn.max_payload)
                } else {
                    0
                };
                let permits = conn.permits(bytes).await?;
                conn.dispatch(req, None, permits).await?;
            }
        }
    }
}

async fn write_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    reply: Reply,
    structured: bool,
    export: &Export,
) -> std::io::Result<()> {
    let h = reply.handle;
    if let Outcome::Failed { .. } = reply.outcome {
        export.stats.errors.fetch_add(1, Ordering::Relaxed);
    }
    match (reply.outcome, reply.read_offset) {
        (Outcome::Data(d), Some(offset)) if structured => {
            // The payload is at most the maximum block size, far below 4 GiB.
            let len = u32::try_from(d.len() + 8).unwrap_or(u32::MAX);
            w.write_all(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                h,
                len,
            ))
            .await?;
            w.write_all(&offset.to_be_bytes()).await?;
            w.write_all(&d).await
        }
        (Outcome::Data(d), _) => {
            w.write_all(&simple_reply(h, 0)).await?;
            w.write_all(&d).await
        }
        (Outcome::Failed { errno, message }, _) if structured => {
            w.write_all(&structured_error(h, errno, &message)).await
        }
        (Outcome::Failed { errno, .. }, _) => w.write_all(&simple_reply(h, errno)).await,
        (Outcome::Done, _) => w.write_all(&simple_reply(h, 0)).await,
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Reply>,
    structured: bool,
    export: &Export,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(128 * 1024, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next {
            write_reply(&mut w, reply, structured, export).await?;
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await
}

/// Counts a connection as open for as long as it lives.
struct OpenConnection<'a>(&'a Export);

impl Drop for OpenConnection<'_> {
    fn drop(&mut self) {
        self.0.stats.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn transmission<S>(
    shared: &Shared,
    stream: S,
    export: Arc<Export>,
    structured: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    export.stats.connections.fetch_add(1, Ordering::Relaxed);
    let _open = OpenConnection(&export);
    let mut closed = export.closed.subscribe();
    let cfg = &shared.config;
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(cfg.max_in_flight);
    let conn = Conn {
        export: export.clone(),
        structured,
        max_payload: export.max_block,
        tx,
        count: Arc::new(Semaphore::new(cfg.max_in_flight)),
        bytes: Arc::new(Semaphore::new(
            usize::try_from(cfg.max_in_flight_bytes).unwrap_or(usize::MAX),
        )),
    };
    let reader = read_loop(rd, conn, &mut stop, &mut closed);
    let writer = write_loop(wr, rx, structured, &export);
    tokio::pin!(reader, writer);
    let mut read_result = None;
    let result = loop {
        tokio::select! {
            r = &mut reader, if read_result.is_none() => read_result = Some(r),
            w = &mut writer => {
                // The writer ends when every reply is out (the reader is done and no
                // request is in flight) or when the client stopped taking replies.
                break match (read_result, w) {
                    (Some(Err(e)), _) => Err(e),
                    (_, Err(e)) => Err(NbdError::Io(e)),
                    (Some(Ok(())), Ok(())) | (None, Ok(())) => Ok(()),
                };
            }
        }
    };
    if result.is_err() {
        export
            .stats
            .dropped_connections
            .fetch_add(1, Ordering::Relaxed);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::MemoryDevice;

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            kind,
            handle: 1,
            offset,
            length,
        }
    }

    fn errno(r: Result<Op, Outcome>) -> u32 {
        match r {
            Err(Outcome::Failed { errno, .. }) => errno,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn validation_maps_errors_as_the_protocol_asks() {
        let dev = MemoryDevice::new(1 << 20, 4096);
        let max = 1 << 16;
        let v = |r: Request| validate(&r, None, &dev, false, max);
        assert_eq!(errno(v(req(CMD_READ, 0, 512, 4096))), EINVAL);
        assert_eq!(errno(v(req(CMD_READ, 0, 1 << 20, 4096))), EINVAL);
        assert_eq!(errno(v(req(CMD_WRITE, 0, 1 << 20, 4096))), ENOSPC);
        assert_eq!(errno(v(req(CMD_WRITE_ZEROES, 0, 1 << 20, 4096))), ENOSPC);
        assert_eq!(errno(v(req(CMD_TRIM, 0, 1 << 20, 4096))), EINVAL);
        assert_eq!(errno(v(req(CMD_READ, 0, 0, max + 4096))), EINVAL);
        assert_eq!(errno(v(req(CMD_FLUSH, 0, 0, 4096))), EINVAL);
        assert_eq!(errno(v(req(99, 0, 0, 4096))), EINVAL);
        assert_eq!(errno(v(req(5, 0, 0, 4096))), EINVAL);
        // DF only with structured replies; NO_HOLE only on write-zeroes.
        assert_eq!(errno(v(req(CMD_READ, CMD_FLAG_DF, 0, 4096))), EINVAL);
        assert!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 4096), None, &dev, true, max).is_ok());
        assert_eq!(errno(v(req(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 4096))), EINVAL);
        assert!(v(req(
            CMD_WRITE_ZEROES,
            CMD_FLAG_NO_HOLE | CMD_FLAG_FUA,
            0,
            8192
        ))
        .is_ok());
        assert!(v(req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0)).is_ok());
        assert_eq!(errno(v(req(CMD_WRITE, 1 << 9, 0, 4096))), EINVAL);
        let ro = MemoryDevice::new(1 << 20, 4096).into_read_only();
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                errno(validate(&req(kind, 0, 0, 4096), None, &ro, false, max)),
                EPERM
            );
        }
        assert!(validate(&req(CMD_READ, 0, 0, 4096), None, &ro, false, max).is_ok());
    }

    #[test]
    fn device_errors_map_to_errno() {
        let oor = DeviceError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(device_errno(&oor, true), ENOSPC);
        assert_eq!(device_errno(&oor, false), EINVAL);
        assert_eq!(device_errno(&DeviceError::Media("x".into()), false), EIO);
        assert_eq!(
            device_errno(&DeviceError::NoSpace("x".into()), true),
            ENOSPC
        );
        assert_eq!(device_errno(&DeviceError::ReadOnly, true), EPERM);
        assert_eq!(
            device_errno(&DeviceError::Unavailable("x".into()), false),
            ESHUTDOWN
        );
    }

    #[test]
    fn info_request_parsing() {
        let mut d = 3u32.to_be_bytes().to_vec();
        d.extend_from_slice(b"vol");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_info_request(&d),
            Ok(("vol", vec![INFO_BLOCK_SIZE, INFO_NAME]))
        );
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        assert!(parse_info_request(&[0, 0, 0, 9, b'a']).is_err());
        assert!(parse_info_request(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(parse_info_request(&[]).is_err());
    }
}
