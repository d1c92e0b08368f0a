//! Port I/O over AF_PACKET with TPACKET_V3 memory-mapped rings.
//!
//! Every kernel device (a host representor on a DPU, a veth end in the testbed) can
//! do AF_PACKET, so this is the port type that always works; frames are read from
//! and written to rings shared with the kernel, without a system call per frame (one
//! `poll` when idle, one `send` kick per batch of transmits). AF_XDP
//! ([`super::afxdp`]) also avoids the kernel's skb path but needs XDP on the device
//! and serves one RX queue per socket; each port says which it uses
//! ([`PortRx::kind`]).
//!
//! Layouts follow `linux/if_packet.h` (TPACKET_V3): the RX ring is a list of blocks
//! the kernel fills with variable-size frames and hands over whole (when full or
//! after the retire timeout); the TX ring is a list of fixed-size frame slots.
//! Ownership of a block or slot passes through its status word, read with acquire
//! and written with release ordering, so the frame bytes are never read before the
//! kernel finished writing them and never handed over before we finished.
//!
//! Frames the kernel received with a VLAN tag stripped into metadata (VLAN
//! offload) get the tag put back, so the switch sees what was on the wire. Frames we
//! sent ourselves are ignored (`PACKET_IGNORE_OUTGOING` and a `PACKET_OUTGOING`
//! check), otherwise each port would read back its own output.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// Receiving side of a port.
pub trait PortRx: Send {
    /// Calls `f` on up to `max` received frames; returns how many. Never blocks.
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize>;
    /// "af_packet_v3", "af_xdp", "memory".
    fn kind(&self) -> &'static str;
    /// A descriptor that becomes readable when frames wait, for an idle poller.
    fn fd(&self) -> Option<RawFd>;
}

/// Sending side of a port.
pub trait PortTx: Send {
    /// Queues a frame; false when the ring is full (the frame is dropped).
    fn send(&mut self, frame: &[u8]) -> io::Result<bool>;
    /// Hands queued frames to the device.
    fn flush(&mut self) -> io::Result<()>;
}

const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const PACKET_TX_RING: libc::c_int = 13;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const TPACKET_V3: libc::c_int = 2;
const PACKET_MR_PROMISC: libc::c_ushort = 1;
const ETH_P_ALL: u16 = 0x0003;
const PACKET_OUTGOING: u8 = 4;

const TP_STATUS_KERNEL: u32 = 0;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const TP_STATUS_VLAN_TPID_VALID: u32 = 1 << 6;
const TP_STATUS_AVAILABLE: u32 = 0;
const TP_STATUS_SEND_REQUEST: u32 = 1;
const TP_STATUS_WRONG_FORMAT: u32 = 4;

/// sizeof(struct tpacket3_hdr), already TPACKET_ALIGNed; TX data starts here.
const TPACKET3_HDR: usize = 48;

#[repr(C)]
struct TpacketReq3 {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
    retire_blk_tov: u32,
    sizeof_priv: u32,
    feature_req_word: u32,
}

#[repr(C)]
struct PacketMreq {
    ifindex: libc::c_int,
    typ: libc::c_ushort,
    alen: libc::c_ushort,
    address: [u8; 8],
}

/// Ring geometry.
#[derive(Debug, Clone, Copy)]
pub struct RingConfig {
    /// RX block size (power of two, multiple of the page size).
    pub rx_block_size: u32,
    /// RX blocks.
    pub rx_blocks: u32,
    /// A partly filled RX block is handed over after this many milliseconds.
    pub rx_retire_ms: u32,
    /// TX slot size; frames longer than this minus 48 bytes are not sent.
    pub tx_frame_size: u32,
    /// TX block size.
    pub tx_block_size: u32,
    /// TX blocks.
    pub tx_blocks: u32,
}

impl Default for RingConfig {
    fn default() -> Self {
        RingConfig {
            rx_block_size: 1 << 18,
            rx_blocks: 16,
            rx_retire_ms: 1,
            tx_frame_size: 2048,
            tx_block_size: 1 << 18,
            tx_blocks: 4,
        }
    }
}

/// The socket and its mapping, shared by the RX and TX halves.
#[derive(Debug)]
struct Mapping {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this struct; the RX half only
// touches the RX ring's range and the TX half only the TX ring's, so moving either
// half to another thread cannot create overlapping access.
unsafe impl Send for Mapping {}
// SAFETY: see Send: the halves access disjoint ranges, and `Mapping` itself exposes
// no access to the memory.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len are exactly what mmap returned, and both halves holding an
        // Arc to this mapping are gone, so nothing points into it any more.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// The RX half of an AF_PACKET port.
#[derive(Debug)]
pub struct PacketRx {
    map: Arc<Mapping>,
    block_size: usize,
    blocks: usize,
    next_block: usize,
    scratch: Vec<u8>,
    /// Frames dropped because they were larger than what the ring captured.
    pub truncated: u64,
}

/// The TX half of an AF_PACKET port.
#[derive(Debug)]
pub struct PacketTx {
    map: Arc<Mapping>,
    offset: usize,
    frame_size: usize,
    frames_per_block: usize,
    block_size: usize,
    frames: usize,
    next: usize,
    pending: usize,
    /// Frames refused by the kernel (malformed or too long).
    pub wrong_format: u64,
}

fn last_err(what: &str, dev: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{dev}: {what}: {e}"))
}

fn setsockopt<T>(fd: RawFd, opt: libc::c_int, val: &T, what: &str, dev: &str) -> io::Result<()> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0);
    // SAFETY: `val` points to a live, properly sized T for the duration of the call.
    let r = unsafe { libc::setsockopt(fd, SOL_PACKET, opt, (val as *const T).cast(), len) };
    if r != 0 {
        return Err(last_err(what, dev));
    }
    Ok(())
}

/// Opens an AF_PACKET socket on device `dev` with TPACKET_V3 RX and TX rings, in
/// promiscuous mode. Needs CAP_NET_RAW.
pub fn open(dev: &str, rc: RingConfig) -> io::Result<(PacketRx, PacketTx)> {
    let cname = CString::new(dev)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device name has a NUL"))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(last_err("if_nametoindex", dev));
    }
    let ifindex =
        libc::c_int::try_from(ifindex).map_err(|_| io::Error::other("ifindex out of range"))?;
    // Protocol 0: receive nothing until bound, so the rings only ever see this device.
    // SAFETY: plain system call with constant arguments.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(last_err("socket(AF_PACKET)", dev));
    }
    // SAFETY: raw is a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let s = fd.as_raw_fd();
    setsockopt(s, PACKET_VERSION, &TPACKET_V3, "PACKET_VERSION", dev)?;
    // Older kernels lack it; the PACKET_OUTGOING check below covers them.
    let _ = setsockopt(
        s,
        PACKET_IGNORE_OUTGOING,
        &1 as &libc::c_int,
        "PACKET_IGNORE_OUTGOING",
        dev,
    );
    let rx_req = TpacketReq3 {
        block_size: rc.rx_block_size,
        block_nr: rc.rx_blocks,
        frame_size: 2048,
        frame_nr: rc.rx_block_size / 2048 * rc.rx_blocks,
        retire_blk_tov: rc.rx_retire_ms,
        sizeof_priv: 0,
        feature_req_word: 0,
    };
    setsockopt(s, PACKET_RX_RING, &rx_req, "PACKET_RX_RING", dev)?;
    let tx_req = TpacketReq3 {
        block_size: rc.tx_block_size,
        block_nr: rc.tx_blocks,
        frame_size: rc.tx_frame_size,
        frame_nr: rc.tx_block_size / rc.tx_frame_size * rc.tx_blocks,
        retire_blk_tov: 0,
        sizeof_priv: 0,
        feature_req_word: 0,
    };
    setsockopt(s, PACKET_TX_RING, &tx_req, "PACKET_TX_RING", dev)?;
    let to_usize = |v: u32| usize::try_from(v).map_err(|_| io::Error::other("ring size"));
    let rx_len = to_usize(rc.rx_block_size)? * to_usize(rc.rx_blocks)?;
    let tx_len = to_usize(rc.tx_block_size)? * to_usize(rc.tx_blocks)?;
    let len = rx_len + tx_len;
    // SAFETY: maps the rings the kernel just allocated for this socket; RX first, then
    // TX, as packet_mmap requires. The result is checked before use.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            s,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(last_err("mmap", dev));
    }
    let map = Arc::new(Mapping {
        fd,
        base: base.cast(),
        len,
    });
    let mreq = PacketMreq {
        ifindex,
        typ: PACKET_MR_PROMISC,
        alen: 0,
        address: [0; 8],
    };
    setsockopt(
        s,
        PACKET_ADD_MEMBERSHIP,
        &mreq,
        "PACKET_ADD_MEMBERSHIP",
        dev,
    )?;
    // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
    sll.sll_protocol = ETH_P_ALL.to_be();
    sll.sll_ifindex = ifindex;
    let sll_len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
    // SAFETY: sll is a valid sockaddr_ll of the given length.
    let r = unsafe { libc::bind(s, (&sll as *const libc::sockaddr_ll).cast(), sll_len) };
    if r != 0 {
        return Err(last_err("bind", dev));
    }
    let frame_size = to_usize(rc.tx_frame_size)?;
    let tx_block = to_usize(rc.tx_block_size)?;
    let rx = PacketRx {
        map: map.clone(),
        block_size: to_usize(rc.rx_block_size)?,
        blocks: to_usize(rc.rx_blocks)?,
        next_block: 0,
        scratch: Vec::with_capacity(65536),
        truncated: 0,
    };
    let tx = PacketTx {
        map,
        offset: rx_len,
        frame_size,
        frames_per_block: tx_block / frame_size,
        block_size: tx_block,
        frames: tx_block / frame_size * to_usize(rc.tx_blocks)?,
        next: 0,
        pending: 0,
        wrong_format: 0,
    };
    Ok((rx, tx))
}

/// Reads a u32 at `p + off`.
///
/// # Safety
/// `p + off .. p + off + 4` must lie inside the mapping and be 4-byte aligned.
unsafe fn rd32(p: *const u8, off: usize) -> u32 {
    // SAFETY: guaranteed by the caller; the ring is only read with plain loads here
    // after the status word was read with acquire ordering.
    unsafe { p.add(off).cast::<u32>().read_volatile() }
}

/// The status word at `p + off`.
///
/// # Safety
/// As [`rd32`], and the word is shared with the kernel only through atomic access.
unsafe fn status<'a>(p: *mut u8, off: usize) -> &'a AtomicU32 {
    // SAFETY: guaranteed by the caller; AtomicU32 has the layout of u32.
    unsafe { &*p.add(off).cast::<AtomicU32>() }
}

impl PortRx for PacketRx {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let mut n = 0;
        // Whole blocks only: a block is handed back once all its frames are consumed,
        // so a turn may exceed `max` by up to one block's frames minus one.
        while n < max {
            let boff = self.next_block * self.block_size;
            // SAFETY: boff is a block start inside the RX ring (next_block < blocks).
            let block = unsafe { self.map.base.add(boff) };
            // SAFETY: block_status is at offset 8 of the block descriptor.
            let st = unsafe { status(block, 8) };
            if st.load(Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            // SAFETY: num_pkts (12) and offset_to_first_pkt (16) are in the descriptor,
            // which the kernel finished writing before setting TP_STATUS_USER.
            let (num, first) = unsafe { (rd32(block, 12), rd32(block, 16)) };
            let mut off = usize::try_from(first).unwrap_or(usize::MAX);
            for _ in 0..num {
                if off.saturating_add(TPACKET3_HDR + 20) > self.block_size {
                    break;
                }
                // SAFETY: off + header lies within this block (checked above).
                let h = unsafe { block.add(off) };
                // SAFETY: tpacket3_hdr fields at fixed offsets inside the header.
                let (next, snaplen, len, tp_status, mac, tci, tpid) = unsafe {
                    (
                        rd32(h, 0),
                        rd32(h, 12),
                        rd32(h, 16),
                        rd32(h, 20),
                        h.add(24).cast::<u16>().read_volatile(),
                        rd32(h, 32),
                        h.add(36).cast::<u16>().read_volatile(),
                    )
                };
                // SAFETY: sll_pkttype of the sockaddr_ll that follows the header.
                let pkttype = unsafe { h.add(TPACKET3_HDR + 10).read_volatile() };
                let data_off = off + usize::from(mac);
                let snap = usize::try_from(snaplen).unwrap_or(usize::MAX);
                if data_off.saturating_add(snap) <= self.block_size && pkttype != PACKET_OUTGOING {
                    if snaplen < len {
                        self.truncated += 1;
                    } else {
                        // SAFETY: data_off..data_off + snap is inside the block (checked).
                        let data = unsafe { std::slice::from_raw_parts(block.add(data_off), snap) };
                        if tp_status & TP_STATUS_VLAN_VALID != 0 && data.len() >= 12 {
                            let tpid = if tp_status & TP_STATUS_VLAN_TPID_VALID != 0 {
                                tpid
                            } else {
                                0x8100
                            };
                            self.scratch.clear();
                            self.scratch.extend_from_slice(&data[..12]);
                            self.scratch.extend_from_slice(&tpid.to_be_bytes());
                            self.scratch.extend_from_slice(
                                &u16::try_from(tci & 0xffff).unwrap_or(0).to_be_bytes(),
                            );
                            self.scratch.extend_from_slice(&data[12..]);
                            f(&self.scratch);
                        } else {
                            f(data);
                        }
                        n += 1;
                    }
                }
                if next == 0 {
                    break;
                }
                off = off.saturating_add(usize::try_from(next).unwrap_or(usize::MAX));
            }
            st.store(TP_STATUS_KERNEL, Ordering::Release);
            self.next_block = (self.next_block + 1) % self.blocks;
        }
        Ok(n)
    }

    fn kind(&self) -> &'static str {
        "af_packet_v3"
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.map.fd.as_raw_fd())
    }
}

impl PacketTx {
    fn slot(&self, i: usize) -> usize {
        self.offset
            + (i / self.frames_per_block) * self.block_size
            + (i % self.frames_per_block) * self.frame_size
    }
}

impl PortTx for PacketTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if frame.len() > self.frame_size - TPACKET3_HDR {
            return Ok(false);
        }
        let off = self.slot(self.next);
        // SAFETY: off is a slot start inside the TX ring.
        let slot = unsafe { self.map.base.add(off) };
        // SAFETY: tp_status is at offset 20 of the slot's tpacket3_hdr.
        let st = unsafe { status(slot, 20) };
        let s = st.load(Ordering::Acquire);
        if s == TP_STATUS_WRONG_FORMAT {
            self.wrong_format += 1;
        } else if s != TP_STATUS_AVAILABLE {
            self.flush()?;
            if st.load(Ordering::Acquire) != TP_STATUS_AVAILABLE {
                return Ok(false);
            }
        }
        let len = u32::try_from(frame.len()).unwrap_or(0);
        // SAFETY: the slot is ours (status AVAILABLE or WRONG_FORMAT), and the frame fits
        // after the header (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(frame.as_ptr(), slot.add(TPACKET3_HDR), frame.len());
            slot.cast::<u32>().write_volatile(0); // tp_next_offset
            slot.add(12).cast::<u32>().write_volatile(len); // tp_snaplen
            slot.add(16).cast::<u32>().write_volatile(len); // tp_len
        }
        st.store(TP_STATUS_SEND_REQUEST, Ordering::Release);
        self.next = (self.next + 1) % self.frames;
        self.pending += 1;
        if self.pending >= 64 {
            self.flush()?;
        }
        Ok(true)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.pending = 0;
        // SAFETY: a zero-length send on our own socket: the kernel transmits the
        // slots marked SEND_REQUEST.
        let r = unsafe {
            libc::send(
                self.map.fd.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::WouldBlock {
                return Err(e);
            }
        }
        Ok(())
    }
}

/// Thread CPU time in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

/// Waits until one of `fds` is readable or `timeout_ms` passes.
pub fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<()> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: *fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let n = libc::nfds_t::try_from(p.len()).unwrap_or(0);
    // SAFETY: p is a valid array of n pollfd structures.
    let r = unsafe { libc::poll(p.as_mut_ptr(), n, timeout_ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}
