//! Turning one descriptor chain posted by the guest into a request, or into the status
//! that refuses it.
//!
//! Everything here reads guest memory the guest may change at any time, so every address
//! and length is checked against the memory map before use, all arithmetic is checked,
//! and the chain is treated as a byte stream (virtio 1.x `ANY_LAYOUT`): the header may be
//! split over descriptors or share one with data. Nothing here panics on any chain; the
//! worst outcome is a refused request.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// virtio-blk addresses in 512-byte sectors whatever the block size.
pub(crate) const SECTOR: u64 = 512;
/// Bytes of the request header (type, reserved, sector).
pub(crate) const HEADER_BYTES: u64 = 16;
/// Bytes of one discard / write-zeroes range (sector, num_sectors, flags).
pub(crate) const RANGE_BYTES: u64 = 16;
/// More descriptors than this in one chain is refused (the queue size bounds a direct
/// chain, but an indirect table may hold up to 65535).
pub(crate) const MAX_DESCRIPTORS: usize = 1024;

/// Status codes as the byte the device writes.
pub(crate) const S_IOERR: u8 = status(VIRTIO_BLK_S_IOERR);
pub(crate) const S_UNSUPP: u8 = status(VIRTIO_BLK_S_UNSUPP);

const fn status(v: u32) -> u8 {
    // The spec's status values are 0..=6.
    (v & 0xff) as u8
}

/// What the device accepts; also what the config space advertises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Device size in bytes.
    pub size: u64,
    /// Logical block size; offsets and lengths must be whole blocks.
    pub block_size: u32,
    /// Refuse writes, discards and write-zeroes.
    pub read_only: bool,
    /// Largest payload of one read or write in bytes.
    pub max_io_bytes: u64,
    /// Largest range of one discard segment, in sectors.
    pub max_discard_sectors: u32,
    /// Most ranges in one discard request.
    pub max_discard_seg: u32,
    /// Largest range of one write-zeroes segment, in sectors.
    pub max_write_zeroes_sectors: u32,
    /// Most ranges in one write-zeroes request.
    pub max_write_zeroes_seg: u32,
}

/// A piece of guest memory the device writes into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A request ready for the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Op {
    /// Read `len` bytes at `offset` into `dest`.
    Read {
        offset: u64,
        len: u64,
        dest: Vec<Segment>,
    },
    /// Write `data` at `offset`.
    Write { offset: u64, data: Vec<u8> },
    /// Make completed writes durable.
    Flush,
    /// Write the device id (up to 20 bytes) into `dest`.
    GetId { dest: Vec<Segment> },
    /// Deallocate byte ranges (offset, len).
    Discard { ranges: Vec<(u64, u64)> },
    /// Zero byte ranges (offset, len); `unmap` says the guest allows deallocation.
    WriteZeroes {
        ranges: Vec<(u64, u64)>,
        unmap: bool,
    },
    /// Nothing to do (a read or write of zero bytes).
    Nothing,
}

/// One chain, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Parsed {
    /// The chain's head index, for the used ring.
    pub head: u16,
    /// Where the status byte goes; `None` when the chain has no usable status byte (the
    /// request is then returned with nothing written).
    pub status: Option<GuestAddress>,
    /// The request, or the status that refuses it.
    pub op: Result<Op, u8>,
    /// Why it was refused (for the log), when it was.
    pub reason: Option<&'static str>,
}

#[derive(Debug, Clone, Copy)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    write: bool,
}

/// Parses the chain whose descriptors `descs` yields (address, length, device-writable),
/// headed by `head`, against `mem`.
pub(crate) fn parse(
    head: u16,
    descs: impl Iterator<Item = (GuestAddress, u32, bool)>,
    mem: &GuestMemoryMmap,
    limits: &Limits,
) -> Parsed {
    let mut list = Vec::new();
    let mut too_many = false;
    for (addr, len, write) in descs {
        if list.len() >= MAX_DESCRIPTORS {
            too_many = true;
            break;
        }
        list.push(Desc { addr, len, write });
    }
    let status = status_byte(&list, mem);
    let refuse = |code: u8, why: &'static str| Parsed {
        head,
        status,
        op: Err(code),
        reason: Some(why),
    };
    if too_many {
        return refuse(S_IOERR, "more than 1024 descriptors in one chain");
    }
    if status.is_none() {
        return refuse(
            S_IOERR,
            "no device-writable status byte inside guest memory at the end of the chain",
        );
    }
    // Device-readable descriptors must all come before device-writable ones.
    if let Some(first_w) = list.iter().position(|d| d.write) {
        if list[first_w..].iter().any(|d| !d.write) {
            return refuse(S_IOERR, "a device-readable descriptor after a writable one");
        }
    }
    for d in &list {
        if d.len > 0 && !mem.check_range(d.addr, d.len as usize) {
            return refuse(S_IOERR, "a descriptor outside guest memory");
        }
    }
    let readable: Vec<Segment> = list
        .iter()
        .filter(|d| !d.write)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    let readable_bytes: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    let writable: Vec<Segment> = list
        .iter()
        .filter(|d| d.write)
        .map(|d| Segment {
            addr: d.addr,
            len: d.len,
        })
        .collect();
    // The last writable byte is the status; the rest is data-in.
    let writable_bytes: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
    let data_in = writable_bytes.saturating_sub(1);
    if readable_bytes < HEADER_BYTES {
        return refuse(S_IOERR, "request header shorter than 16 bytes");
    }
    let Some(header) = gather(mem, &readable, 0, HEADER_BYTES) else {
        return refuse(S_IOERR, "request header unreadable");
    };
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let data_out = readable_bytes - HEADER_BYTES;
    let op = match kind {
        VIRTIO_BLK_T_IN => {
            if data_out > 0 {
                Err((S_IOERR, "a read with device-readable data buffers"))
            } else if data_in == 0 {
                Ok(Op::Nothing)
            } else {
                check_io(sector, data_in, limits).map(|offset| Op::Read {
                    offset,
                    len: data_in,
                    dest: take(&writable, data_in),
                })
            }
        }
        VIRTIO_BLK_T_OUT => {
            if limits.read_only {
                Err((S_IOERR, "write to a read-only device"))
            } else if data_in > 0 {
                Err((S_IOERR, "a write with device-writable data buffers"))
            } else if data_out == 0 {
                Ok(Op::Nothing)
            } else {
                match check_io(sector, data_out, limits) {
                    Ok(offset) => match gather(mem, &readable, HEADER_BYTES, data_out) {
                        Some(data) => Ok(Op::Write { offset, data }),
                        None => Err((S_IOERR, "write data unreadable")),
                    },
                    Err(e) => Err(e),
                }
            }
        }
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if data_in == 0 {
                Err((S_IOERR, "GET_ID without a buffer"))
            } else {
                Ok(Op::GetId {
                    dest: take(&writable, data_in.min(u64::from(VIRTIO_BLK_ID_BYTES))),
                })
            }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if limits.read_only {
                Err((S_IOERR, "discard or write-zeroes on a read-only device"))
            } else {
                parse_ranges(mem, &readable, data_out, discard, limits)
            }
        }
        _ => Err((S_UNSUPP, "unsupported request type")),
    };
    match op {
        Ok(op) => Parsed {
            head,
            status,
            op: Ok(op),
            reason: None,
        },
        Err((code, why)) => refuse(code, why),
    }
}

/// The last byte of the last non-empty writable descriptor, if it is in guest memory and
/// the chain ends with writable descriptors.
fn status_byte(list: &[Desc], mem: &GuestMemoryMmap) -> Option<GuestAddress> {
    let last = list.iter().rev().find(|d| d.len > 0)?;
    if !last.write {
        return None;
    }
    let addr = last.addr.0.checked_add(u64::from(last.len) - 1)?;
    let addr = GuestAddress(addr);
    mem.check_range(addr, 1).then_some(addr)
}

/// Byte offset of an I/O of `len` bytes at `sector`, after every check.
fn check_io(sector: u64, len: u64, limits: &Limits) -> Result<u64, (u8, &'static str)> {
    if len > limits.max_io_bytes {
        return Err((S_IOERR, "request larger than the advertised maximum"));
    }
    let offset = sector
        .checked_mul(SECTOR)
        .ok_or((S_IOERR, "sector overflows a byte offset"))?;
    check_range(offset, len, limits)?;
    Ok(offset)
}

fn check_range(offset: u64, len: u64, limits: &Limits) -> Result<(), (u8, &'static str)> {
    let block = u64::from(limits.block_size.max(1));
    if offset % block != 0 || len % block != 0 {
        return Err((S_IOERR, "range not aligned to the block size"));
    }
    match offset.checked_add(len) {
        Some(end) if end <= limits.size => Ok(()),
        _ => Err((S_IOERR, "range beyond the end of the device")),
    }
}

fn parse_ranges(
    mem: &GuestMemoryMmap,
    readable: &[Segment],
    data_out: u64,
    discard: bool,
    limits: &Limits,
) -> Result<Op, (u8, &'static str)> {
    if data_out == 0 || data_out % RANGE_BYTES != 0 {
        return Err((S_IOERR, "range list is not whole 16-byte entries"));
    }
    let count = data_out / RANGE_BYTES;
    let (max_seg, max_sectors) = if discard {
        (limits.max_discard_seg, limits.max_discard_sectors)
    } else {
        (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
    };
    if count > u64::from(max_seg) {
        return Err((S_IOERR, "more ranges than advertised"));
    }
    let bytes =
        gather(mem, readable, HEADER_BYTES, data_out).ok_or((S_IOERR, "range list unreadable"))?;
    let mut ranges = Vec::new();
    let mut unmap = true;
    for entry in bytes.chunks_exact(16) {
        let sector = u64::from_le_bytes([
            entry[0], entry[1], entry[2], entry[3], entry[4], entry[5], entry[6], entry[7],
        ]);
        let sectors = u32::from_le_bytes([entry[8], entry[9], entry[10], entry[11]]);
        let flags = u32::from_le_bytes([entry[12], entry[13], entry[14], entry[15]]);
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err((S_UNSUPP, "unknown flag in a range"));
        }
        if discard && flags != 0 {
            return Err((S_UNSUPP, "unmap flag on a discard"));
        }
        unmap &= flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if sectors > max_sectors {
            return Err((S_IOERR, "range longer than advertised"));
        }
        if sectors == 0 {
            continue;
        }
        let offset = sector
            .checked_mul(SECTOR)
            .ok_or((S_IOERR, "sector overflows a byte offset"))?;
        let len = u64::from(sectors) * SECTOR;
        check_range(offset, len, limits)?;
        ranges.push((offset, len));
    }
    Ok(if discard {
        Op::Discard { ranges }
    } else {
        Op::WriteZeroes { ranges, unmap }
    })
}

/// Reads `len` bytes starting `skip` bytes into the concatenation of `segs`.
fn gather(mem: &GuestMemoryMmap, segs: &[Segment], skip: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = vec![0u8; usize::try_from(len).ok()?];
    let mut skip = skip;
    let mut done = 0usize;
    for s in segs {
        if done == out.len() {
            break;
        }
        let seg_len = u64::from(s.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let avail = usize::try_from(seg_len - skip).ok()?;
        let n = avail.min(out.len() - done);
        let addr = s.addr.0.checked_add(skip)?;
        mem.read_slice(&mut out[done..done + n], GuestAddress(addr))
            .ok()?;
        done += n;
        skip = 0;
    }
    (done == out.len()).then_some(out)
}

/// The first `len` bytes of `segs`, as segments.
fn take(segs: &[Segment], len: u64) -> Vec<Segment> {
    let mut left = len;
    let mut out = Vec::new();
    for s in segs {
        if left == 0 {
            break;
        }
        let n = u64::from(s.len).min(left);
        if n > 0 {
            // n <= s.len, a u32.
            out.push(Segment {
                addr: s.addr,
                len: u32::try_from(n).unwrap_or(s.len),
            });
        }
        left -= n;
    }
    out
}

/// Writes `data` into `dest` in order; returns the bytes written, or `None` if guest
/// memory refused a write.
pub(crate) fn scatter(mem: &GuestMemoryMmap, dest: &[Segment], data: &[u8]) -> Option<u64> {
    let mut done = 0usize;
    for s in dest {
        if done == data.len() {
            break;
        }
        let n = usize::try_from(s.len).ok()?.min(data.len() - done);
        mem.write_slice(&data[done..done + n], s.addr).ok()?;
        done += n;
    }
    u64::try_from(done).ok()
}
