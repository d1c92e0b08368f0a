//! Reading and writing whole PDUs on a byte stream.
//!
//! The reader keeps every partial read in its own buffer, so `read_pdu` is
//! cancel safe (it can sit in a `select!` next to a timer) and a PDU's bytes
//! are never lost. It checks the common header against this end's limits
//! before it reserves room for the PDU, so a peer cannot make it allocate more
//! than PLEN allows. The writer queues encoded PDUs and sends them with
//! vectored writes, so a batch of responses costs one system call and data
//! buffers are never copied.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::PduError;
use super::params::ConnectionParams;
use super::pdu::{decode_common_header, decode_pdu, Pdu, COMMON_HEADER_LEN};

/// Failure to read or write a PDU.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the connection at a PDU boundary.
    #[error("connection closed by peer")]
    Closed,
    /// The peer closed the connection in the middle of a PDU.
    #[error("connection closed mid-PDU ({have} of {needed} bytes)")]
    Truncated {
        /// Bytes received of the PDU.
        have: usize,
        /// Bytes the PDU needed (8 until the header is known).
        needed: usize,
    },
    /// The PDU was malformed. Unless [`PduError::fatal`] is `None` the stream
    /// is no longer usable and the connection must be terminated.
    #[error(transparent)]
    Pdu(#[from] PduError),
}

const READ_CHUNK: usize = 64 * 1024;

/// Reads PDUs from a stream.
#[derive(Debug)]
pub struct PduReader<R> {
    inner: R,
    buf: BytesMut,
    last_header: Bytes,
}

impl<R: AsyncRead + Unpin> PduReader<R> {
    /// Wraps a stream.
    pub fn new(inner: R) -> Self {
        PduReader {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
            last_header: Bytes::new(),
        }
    }

    /// The header bytes (up to HLEN, at most 128) of the last PDU rejected,
    /// for the data field of the termination request.
    pub fn last_header(&self) -> &[u8] {
        &self.last_header
    }

    fn keep_header(&mut self) {
        let hl = usize::from(self.buf[2])
            .clamp(COMMON_HEADER_LEN, 128)
            .min(self.buf.len());
        self.last_header = Bytes::copy_from_slice(&self.buf[..hl]);
    }

    /// Reads one PDU. Cancel safe.
    pub async fn read_pdu(&mut self, p: &ConnectionParams) -> Result<Pdu, FrameError> {
        loop {
            if self.buf.len() >= COMMON_HEADER_LEN {
                let ch = match decode_common_header(&self.buf, p) {
                    Ok(ch) => ch,
                    Err(e) => {
                        self.keep_header();
                        return Err(e.into());
                    }
                };
                let plen = usize::try_from(ch.plen).unwrap_or(usize::MAX);
                if self.buf.len() >= plen {
                    let pdu_bytes = self.buf.split_to(plen).freeze();
                    return match decode_pdu(&pdu_bytes, p) {
                        Ok((pdu, _)) => Ok(pdu),
                        Err(e) => {
                            let hl = usize::from(ch.hlen).clamp(COMMON_HEADER_LEN, 128);
                            self.last_header = pdu_bytes.slice(..hl.min(pdu_bytes.len()));
                            Err(e.into())
                        }
                    };
                }
                // PLEN passed the limit checks: room for the whole PDU is bounded.
                self.buf.reserve(plen - self.buf.len());
            } else {
                self.buf.reserve(READ_CHUNK);
            }
            let n = self.inner.read_buf(&mut self.buf).await?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Err(FrameError::Closed);
                }
                let needed = if self.buf.len() >= COMMON_HEADER_LEN {
                    usize::try_from(u32::from_le_bytes([
                        self.buf[4],
                        self.buf[5],
                        self.buf[6],
                        self.buf[7],
                    ]))
                    .unwrap_or(usize::MAX)
                } else {
                    COMMON_HEADER_LEN
                };
                return Err(FrameError::Truncated {
                    have: self.buf.len(),
                    needed,
                });
            }
        }
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}

/// Writes PDUs to a stream, batching queued PDUs into vectored writes.
#[derive(Debug)]
pub struct PduWriter<W> {
    inner: W,
    queue: VecDeque<Bytes>,
}

/// Most buffers handed to one vectored write.
const MAX_IOV: usize = 64;

impl<W: AsyncWrite + Unpin> PduWriter<W> {
    /// Wraps a stream.
    pub fn new(inner: W) -> Self {
        PduWriter {
            inner,
            queue: VecDeque::new(),
        }
    }

    /// Encodes a PDU and queues it; nothing is sent until [`Self::flush`].
    pub fn queue(&mut self, pdu: &Pdu, p: &ConnectionParams) -> Result<(), PduError> {
        let e = pdu.encode(p)?;
        self.queue.push_back(e.head);
        if !e.data.is_empty() {
            self.queue.push_back(e.data);
        }
        if let Some(d) = e.ddgst {
            self.queue.push_back(Bytes::copy_from_slice(&d));
        }
        Ok(())
    }

    /// Bytes queued and not yet written.
    pub fn pending(&self) -> usize {
        self.queue.iter().map(Bytes::len).sum()
    }

    /// Writes everything queued. Progress is kept if the future is dropped.
    pub async fn flush(&mut self) -> io::Result<()> {
        while !self.queue.is_empty() {
            let n = {
                let iov: Vec<IoSlice<'_>> = self
                    .queue
                    .iter()
                    .take(MAX_IOV)
                    .map(|b| IoSlice::new(b))
                    .collect();
                self.inner.write_vectored(&iov).await?
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "socket accepted no bytes",
                ));
            }
            let mut left = n;
            while left > 0 {
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                if front.len() <= left {
                    left -= front.len();
                    self.queue.pop_front();
                } else {
                    front.advance(left);
                    left = 0;
                }
            }
        }
        self.inner.flush().await
    }

    /// Queues one PDU and flushes.
    pub async fn write_pdu(&mut self, pdu: &Pdu, p: &ConnectionParams) -> Result<(), FrameError> {
        self.queue(pdu, p)?;
        self.flush().await?;
        Ok(())
    }

    /// Shuts down the write side of the stream.
    pub async fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown().await
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

/// Splits a TCP stream into a PDU reader and writer (with TCP_NODELAY set:
/// NVMe/TCP is request/response and must not wait for Nagle).
pub fn split(
    stream: tokio::net::TcpStream,
) -> io::Result<(
    PduReader<tokio::net::tcp::OwnedReadHalf>,
    PduWriter<tokio::net::tcp::OwnedWriteHalf>,
)> {
    stream.set_nodelay(true)?;
    let (r, w) = stream.into_split();
    Ok((PduReader::new(r), PduWriter::new(w)))
}
