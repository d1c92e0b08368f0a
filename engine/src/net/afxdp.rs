//! Port I/O over AF_XDP: frames go from the driver's XDP hook straight into memory
//! we own, skipping the kernel's skb allocation and protocol taps that AF_PACKET
//! pays for on every frame.
//!
//! Why both port types exist: AF_XDP needs an XDP program on the device and works per
//! RX queue, so it is used where the device has XDP (every driver since 4.18 through
//! the generic hook, native on veth, mlx5, ice, i40e, ...) and a single RX queue;
//! elsewhere (several RX queues, no AF_XDP in the kernel, no CAP_BPF) the port falls
//! back to [`super::afpacket`]. [`open`] says why when it refuses, and every port
//! reports which one it uses ([`super::afpacket::PortRx::kind`]).
//!
//! Pieces, all set up with raw system calls (no libbpf, no compiled BPF object in the
//! repository):
//! - the UMEM, an anonymous mapping cut into fixed frames: the first half receives,
//!   the second half transmits, so the RX and TX halves of a port never share a frame;
//! - four rings shared with the kernel (fill, RX, TX, completion), each a
//!   single-producer single-consumer queue whose indices are published with release
//!   and read with acquire ordering, so descriptor contents are visible before the
//!   index that hands them over;
//! - an XSKMAP with this socket at index 0 and a five-instruction XDP program,
//!   `return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS)`, attached through
//!   a BPF link, so the program goes away with the port (or the process) and a crashed
//!   dpud leaves no program behind on the device;
//! - a member socket of AF_PACKET that only holds the device in promiscuous mode
//!   (the switch must see frames for every MAC, as with the AF_PACKET port).
//!
//! Descriptors from the kernel are checked before use: an address or length that
//! leaves the RX half of the UMEM is counted and skipped, never dereferenced.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use super::afpacket::{PortRx, PortTx};

const AF_XDP: libc::c_int = 44;
const SOL_XDP: libc::c_int = 283;
const XDP_MMAP_OFFSETS: libc::c_int = 1;
const XDP_RX_RING: libc::c_int = 2;
const XDP_TX_RING: libc::c_int = 3;
const XDP_UMEM_REG: libc::c_int = 4;
const XDP_UMEM_FILL_RING: libc::c_int = 5;
const XDP_UMEM_COMPLETION_RING: libc::c_int = 6;
const XDP_OPTIONS: libc::c_int = 8;
const XDP_OPTIONS_ZEROCOPY: u32 = 1;
const XDP_PGOFF_RX_RING: libc::off_t = 0;
const XDP_PGOFF_TX_RING: libc::off_t = 0x8000_0000;
const XDP_UMEM_PGOFF_FILL_RING: libc::off_t = 0x1_0000_0000;
const XDP_UMEM_PGOFF_COMPLETION_RING: libc::off_t = 0x1_8000_0000;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_XSKMAP: u32 = 17;
const BPF_PROG_TYPE_XDP: u32 = 6;
const BPF_XDP: u32 = 37;
const XDP_FLAGS_SKB_MODE: u32 = 2;
const XDP_FLAGS_DRV_MODE: u32 = 4;
/// Size of `union bpf_attr` in the headers this was written against; the kernel
/// accepts any size as long as the bytes it does not know are zero.
const BPF_ATTR_LEN: usize = 144;

const SOL_PACKET: libc::c_int = 263;
const PACKET_ADD_MEMBERSHIP: libc::c_int = 1;
const PACKET_MR_PROMISC: libc::c_ushort = 1;

/// `struct xdp_desc`: 16 bytes (u64 address, u32 length, u32 options).
const DESC_LEN: usize = 16;
/// Fill and completion rings carry bare u64 UMEM addresses.
const ADDR_LEN: usize = 8;

/// Geometry of an AF_XDP port.
#[derive(Debug, Clone, Copy)]
pub struct XdpConfig {
    /// Entries of each of the four rings (power of two). The UMEM holds twice this
    /// many frames: one ring's worth for RX, one for TX.
    pub ring_entries: u32,
    /// UMEM frame size (power of two, 2048 up to the page size); frames longer than
    /// this are not sent.
    pub frame_size: u32,
}

impl Default for XdpConfig {
    fn default() -> Self {
        XdpConfig {
            ring_entries: 2048,
            frame_size: 2048,
        }
    }
}

/// How the XDP program and the socket ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XdpMode {
    /// The program runs in the driver (native XDP) rather than the generic skb hook.
    pub native: bool,
    /// The socket shares the driver's buffers (zero-copy) rather than copying.
    pub zero_copy: bool,
}

#[repr(C)]
struct UmemReg {
    addr: u64,
    len: u64,
    chunk_size: u32,
    headroom: u32,
    flags: u32,
    tx_metadata_len: u32,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct RingOffset {
    producer: u64,
    consumer: u64,
    desc: u64,
    flags: u64,
}

#[repr(C)]
#[derive(Default)]
struct MmapOffsets {
    rx: RingOffset,
    tx: RingOffset,
    fr: RingOffset,
    cr: RingOffset,
}

#[repr(C)]
struct SockaddrXdp {
    family: u16,
    flags: u16,
    ifindex: u32,
    queue_id: u32,
    shared_umem_fd: u32,
}

#[repr(C)]
struct PacketMreq {
    ifindex: libc::c_int,
    typ: libc::c_ushort,
    alen: libc::c_ushort,
    address: [u8; 8],
}

fn err(dev: &str, what: &str) -> io::Error {
    let e = io::Error::last_os_error();
    io::Error::new(e.kind(), format!("{dev}: {what}: {e}"))
}

fn unsupported(dev: &str, why: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, format!("{dev}: {why}"))
}

fn to_usize(v: u64) -> io::Result<usize> {
    usize::try_from(v).map_err(|_| io::Error::other("size does not fit in usize"))
}

fn sockopt_len<T>() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap_or(0)
}

fn set_opt<T>(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    val: &T,
    dev: &str,
    what: &str,
) -> io::Result<()> {
    // SAFETY: `val` is a live T and the length passed is its size.
    let r =
        unsafe { libc::setsockopt(fd, level, opt, (val as *const T).cast(), sockopt_len::<T>()) };
    if r != 0 {
        return Err(err(dev, what));
    }
    Ok(())
}

/// An anonymous or socket mapping, unmapped on drop.
#[derive(Debug)]
struct Mapping {
    base: *mut u8,
    len: usize,
}

// SAFETY: the mapping is memory owned by this struct alone; who may touch which part
// of it is decided by the ring and UMEM discipline documented on the users.
unsafe impl Send for Mapping {}
// SAFETY: as for Send; `Mapping` exposes no access to the memory by itself.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(
        len: usize,
        fd: RawFd,
        offset: libc::off_t,
        dev: &str,
        what: &str,
    ) -> io::Result<Mapping> {
        let (flags, fd) = if fd < 0 {
            (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
            )
        } else {
            (libc::MAP_SHARED | libc::MAP_POPULATE, fd)
        };
        // SAFETY: a fresh mapping at a kernel-chosen address; the result is checked.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(err(dev, what));
        }
        Ok(Mapping {
            base: base.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: base/len are what mmap returned; the owner is going away, so nothing
        // points into the mapping any more.
        unsafe {
            libc::munmap(self.base.cast(), self.len);
        }
    }
}

/// One of the four rings: indices shared with the kernel, descriptors after them.
#[derive(Debug)]
struct Ring {
    map: Mapping,
    producer: usize,
    consumer: usize,
    desc: usize,
    mask: u32,
    entries: u32,
    /// Our side's index (producer for fill/TX, consumer for RX/completion), ahead of
    /// the shared one until published.
    local: u32,
}

impl Ring {
    fn map(
        fd: RawFd,
        off: RingOffset,
        entries: u32,
        entry_len: usize,
        pgoff: libc::off_t,
        dev: &str,
        what: &str,
    ) -> io::Result<Ring> {
        let desc = to_usize(off.desc)?;
        let len = desc
            .checked_add(
                to_usize(u64::from(entries))?
                    .checked_mul(entry_len)
                    .ok_or_else(|| io::Error::other("ring size"))?,
            )
            .ok_or_else(|| io::Error::other("ring size"))?;
        let producer = to_usize(off.producer)?;
        let consumer = to_usize(off.consumer)?;
        if producer.checked_add(4).is_none_or(|e| e > len)
            || consumer.checked_add(4).is_none_or(|e| e > len)
            || producer % 4 != 0
            || consumer % 4 != 0
        {
            return Err(io::Error::other(format!(
                "{dev}: {what}: ring offsets out of the mapping"
            )));
        }
        let map = Mapping::new(len, fd, pgoff, dev, what)?;
        Ok(Ring {
            map,
            producer,
            consumer,
            desc,
            mask: entries - 1,
            entries,
            local: 0,
        })
    }

    fn index(&self, off: usize) -> &AtomicU32 {
        // SAFETY: `off` is the producer or consumer offset, checked at map time to be
        // 4-byte aligned and inside the mapping; the kernel accesses these words only
        // atomically, and AtomicU32 has the layout of u32.
        unsafe { &*self.map.base.add(off).cast::<AtomicU32>() }
    }

    fn producer(&self) -> &AtomicU32 {
        self.index(self.producer)
    }

    fn consumer(&self) -> &AtomicU32 {
        self.index(self.consumer)
    }

    /// Pointer to entry `i` (taken modulo the ring size) of `entry_len` bytes.
    fn entry(&self, i: u32, entry_len: usize) -> *mut u8 {
        let slot = usize::try_from(i & self.mask).unwrap_or(0);
        // SAFETY: slot < entries, and the mapping holds `entries` entries of
        // `entry_len` bytes after `desc` (checked in `map`).
        unsafe { self.map.base.add(self.desc + slot * entry_len) }
    }
}

/// What both halves of a port keep alive: the socket, the UMEM, the BPF objects.
#[derive(Debug)]
struct Shared {
    /// The BPF link; closing it detaches the program from the device.
    _link: OwnedFd,
    _prog: OwnedFd,
    _map: OwnedFd,
    /// Holds the device in promiscuous mode while open.
    _promisc: OwnedFd,
    socket: OwnedFd,
    umem: Mapping,
    frame_size: usize,
    rx_frames: u32,
}

/// The RX half of an AF_XDP port (owns the RX and fill rings, the UMEM's first half).
#[derive(Debug)]
pub struct XdpRx {
    shared: Arc<Shared>,
    rx: Ring,
    fill: Ring,
    /// Descriptors from the kernel that pointed outside the RX frames (skipped).
    pub invalid: u64,
}

/// The TX half (owns the TX and completion rings, the UMEM's second half).
#[derive(Debug)]
pub struct XdpTx {
    shared: Arc<Shared>,
    tx: Ring,
    completion: Ring,
    free: Vec<u64>,
    pending: u32,
    /// Frames not sent because they were longer than a UMEM frame.
    pub oversize: u64,
}

fn rx_queue_count(dev: &str) -> io::Result<usize> {
    let dir = format!("/sys/class/net/{dev}/queues");
    let n = std::fs::read_dir(&dir)
        .map_err(|e| io::Error::new(e.kind(), format!("{dir}: {e}")))?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("rx-"))
        .count();
    Ok(n)
}

fn bpf(cmd: libc::c_long, attr: &mut [u8; BPF_ATTR_LEN]) -> libc::c_long {
    // SAFETY: `attr` is a buffer of the size passed, laid out as `union bpf_attr`
    // for `cmd`, with every byte we do not set zero.
    unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            libc::c_uint::try_from(BPF_ATTR_LEN).unwrap_or(0),
        )
    }
}

fn put_u32(attr: &mut [u8; BPF_ATTR_LEN], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; BPF_ATTR_LEN], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

fn bpf_fd(r: libc::c_long, dev: &str, what: &str) -> io::Result<OwnedFd> {
    let fd = RawFd::try_from(r)
        .ok()
        .filter(|&fd| fd >= 0)
        .ok_or_else(|| err(dev, what))?;
    // SAFETY: the bpf system call just returned this descriptor to us alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One eBPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (src << 4) | (dst & 0x0f);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

/// `return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS);` for the map `map_fd`.
fn redirect_program(map_fd: RawFd) -> Vec<u8> {
    const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
    const LD_IMM64: u8 = 0x18; // BPF_LD | BPF_IMM | BPF_DW
    const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
    const CALL: u8 = 0x85; // BPF_JMP | BPF_CALL
    const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT
    const PSEUDO_MAP_FD: u8 = 1;
    const XDP_MD_RX_QUEUE_INDEX: i16 = 16;
    const XDP_PASS: i32 = 2;
    const FN_REDIRECT_MAP: i32 = 51;
    [
        insn(LDX_W, 2, 1, XDP_MD_RX_QUEUE_INDEX, 0),
        insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd),
        insn(0, 0, 0, 0, 0),
        insn(MOV64_K, 3, 0, 0, XDP_PASS),
        insn(CALL, 0, 0, 0, FN_REDIRECT_MAP),
        insn(EXIT, 0, 0, 0, 0),
    ]
    .concat()
}

/// The XSKMAP, the program and the link that steer `ifindex`'s frames to `xsk`.
fn attach_program(
    ifindex: u32,
    xsk: RawFd,
    dev: &str,
) -> io::Result<(OwnedFd, OwnedFd, OwnedFd, bool)> {
    let mut a = [0u8; BPF_ATTR_LEN];
    put_u32(&mut a, 0, BPF_MAP_TYPE_XSKMAP);
    put_u32(&mut a, 4, 4); // key: u32 queue index
    put_u32(&mut a, 8, 4); // value: socket fd
    put_u32(&mut a, 12, 1); // one queue
    let map = bpf_fd(bpf(BPF_MAP_CREATE, &mut a), dev, "BPF_MAP_CREATE(XSKMAP)")?;

    let key: u32 = 0;
    let value = u32::try_from(xsk).map_err(|_| io::Error::other("socket fd"))?;
    let mut a = [0u8; BPF_ATTR_LEN];
    put_u32(
        &mut a,
        0,
        u32::try_from(map.as_raw_fd()).map_err(|_| io::Error::other("map fd"))?,
    );
    put_u64(&mut a, 8, std::ptr::addr_of!(key) as u64);
    put_u64(&mut a, 16, std::ptr::addr_of!(value) as u64);
    if bpf(BPF_MAP_UPDATE_ELEM, &mut a) != 0 {
        return Err(err(dev, "BPF_MAP_UPDATE_ELEM(XSKMAP)"));
    }

    let code = redirect_program(map.as_raw_fd());
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let mut a = [0u8; BPF_ATTR_LEN];
    put_u32(&mut a, 0, BPF_PROG_TYPE_XDP);
    put_u32(&mut a, 4, u32::try_from(code.len() / 8).unwrap_or(0));
    put_u64(&mut a, 8, code.as_ptr() as u64);
    put_u64(&mut a, 16, license.as_ptr() as u64);
    put_u32(&mut a, 24, 1); // log level: the verifier says why if it refuses
    put_u32(&mut a, 28, u32::try_from(log.len()).unwrap_or(0));
    put_u64(&mut a, 32, log.as_mut_ptr() as u64);
    a[48..56].copy_from_slice(b"dpu_xsk\0");
    put_u32(&mut a, 68, BPF_XDP);
    let prog = bpf_fd(bpf(BPF_PROG_LOAD, &mut a), dev, "BPF_PROG_LOAD").map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        io::Error::new(
            e.kind(),
            format!(
                "{e}; verifier: {}",
                String::from_utf8_lossy(&log[..end]).trim()
            ),
        )
    })?;

    // Native XDP where the driver has it, the generic hook otherwise.
    let mut last = None;
    for (flags, native) in [(XDP_FLAGS_DRV_MODE, true), (XDP_FLAGS_SKB_MODE, false)] {
        let mut a = [0u8; BPF_ATTR_LEN];
        put_u32(
            &mut a,
            0,
            u32::try_from(prog.as_raw_fd()).map_err(|_| io::Error::other("prog fd"))?,
        );
        put_u32(&mut a, 4, ifindex);
        put_u32(&mut a, 8, BPF_XDP);
        put_u32(&mut a, 12, flags);
        match bpf_fd(bpf(BPF_LINK_CREATE, &mut a), dev, "BPF_LINK_CREATE(XDP)") {
            Ok(link) => return Ok((map, prog, link, native)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| err(dev, "BPF_LINK_CREATE(XDP)")))
}

/// An AF_PACKET socket that receives nothing and only holds `ifindex` promiscuous.
fn promiscuous(ifindex: u32, dev: &str) -> io::Result<OwnedFd> {
    // SAFETY: plain system call with constant arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(dev, "socket(AF_PACKET) for promiscuous mode"));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mreq = PacketMreq {
        ifindex: libc::c_int::try_from(ifindex).map_err(|_| io::Error::other("ifindex"))?,
        typ: PACKET_MR_PROMISC,
        alen: 0,
        address: [0; 8],
    };
    set_opt(
        fd.as_raw_fd(),
        SOL_PACKET,
        PACKET_ADD_MEMBERSHIP,
        &mreq,
        dev,
        "PACKET_ADD_MEMBERSHIP",
    )?;
    Ok(fd)
}

/// Opens an AF_XDP port on device `dev`: refuses (with the reason, error kind
/// `Unsupported`) a device with more than one RX queue or a kernel without AF_XDP.
/// Needs CAP_NET_ADMIN, CAP_NET_RAW and CAP_BPF (root).
pub fn open(dev: &str, cfg: XdpConfig) -> io::Result<(XdpRx, XdpTx, XdpMode)> {
    let entries = cfg.ring_entries;
    if !entries.is_power_of_two() || entries < 64 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "ring_entries must be a power of two >= 64",
        ));
    }
    if !cfg.frame_size.is_power_of_two() || cfg.frame_size < 2048 || cfg.frame_size > 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame_size must be 2048 or 4096",
        ));
    }
    let queues = rx_queue_count(dev)?;
    if queues != 1 {
        return Err(unsupported(
            dev,
            format!("{queues} RX queues; this port type serves exactly one (one socket per queue is not implemented)"),
        ));
    }
    let cname = CString::new(dev)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "device name has a NUL"))?;
    // SAFETY: cname is a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(err(dev, "if_nametoindex"));
    }

    // SAFETY: plain system call with constant arguments.
    let raw = unsafe { libc::socket(AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
            return Err(unsupported(
                dev,
                "the kernel has no AF_XDP (CONFIG_XDP_SOCKETS)".into(),
            ));
        }
        return Err(io::Error::new(
            e.kind(),
            format!("{dev}: socket(AF_XDP): {e}"),
        ));
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(raw) };
    let s = socket.as_raw_fd();

    let frame_size = usize::try_from(cfg.frame_size).map_err(|_| io::Error::other("frame size"))?;
    let total_frames = entries
        .checked_mul(2)
        .ok_or_else(|| io::Error::other("ring entries"))?;
    let umem_len = to_usize(u64::from(total_frames))?
        .checked_mul(frame_size)
        .ok_or_else(|| io::Error::other("UMEM size"))?;
    let umem = Mapping::new(umem_len, -1, 0, dev, "mmap(UMEM)")?;
    let reg = UmemReg {
        addr: umem.base as u64,
        len: u64::try_from(umem_len).map_err(|_| io::Error::other("UMEM size"))?,
        chunk_size: cfg.frame_size,
        headroom: 0,
        flags: 0,
        tx_metadata_len: 0,
    };
    set_opt(s, SOL_XDP, XDP_UMEM_REG, &reg, dev, "XDP_UMEM_REG")?;
    set_opt(
        s,
        SOL_XDP,
        XDP_UMEM_FILL_RING,
        &entries,
        dev,
        "XDP_UMEM_FILL_RING",
    )?;
    set_opt(
        s,
        SOL_XDP,
        XDP_UMEM_COMPLETION_RING,
        &entries,
        dev,
        "XDP_UMEM_COMPLETION_RING",
    )?;
    set_opt(s, SOL_XDP, XDP_RX_RING, &entries, dev, "XDP_RX_RING")?;
    set_opt(s, SOL_XDP, XDP_TX_RING, &entries, dev, "XDP_TX_RING")?;

    let mut off = MmapOffsets::default();
    let mut len = sockopt_len::<MmapOffsets>();
    // SAFETY: `off` is a live MmapOffsets and `len` its size; the kernel writes at
    // most `len` bytes.
    let r = unsafe {
        libc::getsockopt(
            s,
            SOL_XDP,
            XDP_MMAP_OFFSETS,
            std::ptr::addr_of_mut!(off).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(err(dev, "XDP_MMAP_OFFSETS"));
    }
    if len != sockopt_len::<MmapOffsets>() {
        return Err(unsupported(
            dev,
            "the kernel's AF_XDP ring layout predates ring flags (Linux < 5.4)".into(),
        ));
    }
    let rx = Ring::map(
        s,
        off.rx,
        entries,
        DESC_LEN,
        XDP_PGOFF_RX_RING,
        dev,
        "mmap(RX ring)",
    )?;
    let tx = Ring::map(
        s,
        off.tx,
        entries,
        DESC_LEN,
        XDP_PGOFF_TX_RING,
        dev,
        "mmap(TX ring)",
    )?;
    let mut fill = Ring::map(
        s,
        off.fr,
        entries,
        ADDR_LEN,
        XDP_UMEM_PGOFF_FILL_RING,
        dev,
        "mmap(fill ring)",
    )?;
    let completion = Ring::map(
        s,
        off.cr,
        entries,
        ADDR_LEN,
        XDP_UMEM_PGOFF_COMPLETION_RING,
        dev,
        "mmap(completion ring)",
    )?;

    // Every RX frame starts out with the kernel; TX frames are ours until sent.
    for i in 0..entries {
        let addr = u64::from(i) * u64::from(cfg.frame_size);
        // SAFETY: entry() points at a u64 slot inside the fill ring's mapping; the
        // kernel reads it only after the producer index below is published.
        unsafe { fill.entry(i, ADDR_LEN).cast::<u64>().write_unaligned(addr) };
    }
    fill.local = entries;
    fill.producer().store(entries, Ordering::Release);
    let free = (entries..total_frames)
        .rev()
        .map(|i| u64::from(i) * u64::from(cfg.frame_size))
        .collect();

    let sxdp = SockaddrXdp {
        family: u16::try_from(AF_XDP).unwrap_or(44),
        flags: 0, // zero-copy where the driver can, copy otherwise
        ifindex,
        queue_id: 0,
        shared_umem_fd: 0,
    };
    // SAFETY: sxdp is a valid sockaddr_xdp of the given length.
    let r = unsafe {
        libc::bind(
            s,
            std::ptr::addr_of!(sxdp).cast(),
            sockopt_len::<SockaddrXdp>(),
        )
    };
    if r != 0 {
        return Err(err(dev, "bind(AF_XDP)"));
    }
    let mut opts: u32 = 0;
    let mut len = sockopt_len::<u32>();
    // SAFETY: opts is a live u32 and len its size.
    let r = unsafe {
        libc::getsockopt(
            s,
            SOL_XDP,
            XDP_OPTIONS,
            std::ptr::addr_of_mut!(opts).cast(),
            &mut len,
        )
    };
    let zero_copy = r == 0 && opts & XDP_OPTIONS_ZEROCOPY != 0;

    let (map, prog, link, native) = attach_program(ifindex, s, dev)?;
    let promisc = promiscuous(ifindex, dev)?;
    let shared = Arc::new(Shared {
        _link: link,
        _prog: prog,
        _map: map,
        _promisc: promisc,
        socket,
        umem,
        frame_size,
        rx_frames: entries,
    });
    let rx = XdpRx {
        shared: shared.clone(),
        rx,
        fill,
        invalid: 0,
    };
    let tx = XdpTx {
        shared,
        tx,
        completion,
        free,
        pending: 0,
        oversize: 0,
    };
    Ok((rx, tx, XdpMode { native, zero_copy }))
}

impl XdpRx {
    /// The frame a descriptor names, if it lies wholly inside one RX frame.
    fn frame(&self, addr: u64, len: u32) -> Option<(usize, usize, u64)> {
        let sh = &self.shared;
        let fs = u64::try_from(sh.frame_size).ok()?;
        let index = addr / fs;
        let within = addr % fs;
        if index >= u64::from(sh.rx_frames) || within.checked_add(u64::from(len))? > fs {
            return None;
        }
        Some((
            usize::try_from(addr).ok()?,
            usize::try_from(len).ok()?,
            index * fs,
        ))
    }
}

impl PortRx for XdpRx {
    fn recv(&mut self, max: usize, f: &mut dyn FnMut(&[u8])) -> io::Result<usize> {
        let ready = self
            .rx
            .producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.rx.local);
        let n = ready
            .min(u32::try_from(max).unwrap_or(u32::MAX))
            .min(self.rx.entries);
        let mut delivered = 0;
        for _ in 0..n {
            let d = self.rx.entry(self.rx.local, DESC_LEN);
            // SAFETY: d points at a 16-byte descriptor inside the RX ring that the
            // kernel published (acquire load of the producer above) and will not
            // touch until we advance the consumer.
            let (addr, len) = unsafe {
                (
                    d.cast::<u64>().read_unaligned(),
                    d.add(8).cast::<u32>().read_unaligned(),
                )
            };
            self.rx.local = self.rx.local.wrapping_add(1);
            let Some((start, len, frame)) = self.frame(addr, len) else {
                // Not one of our RX frames: never read it, never hand it back.
                self.invalid += 1;
                continue;
            };
            // SAFETY: start..start+len lies inside one RX frame of the UMEM (checked
            // by `frame`), which the kernel filled and handed to us with this
            // descriptor; it gets the frame back only through the fill ring below.
            let bytes =
                unsafe { std::slice::from_raw_parts(self.shared.umem.base.add(start), len) };
            f(bytes);
            delivered += 1;
            // The frame goes back to the kernel. The fill ring has room: it holds
            // all RX frames and this one was out of it.
            let slot = self.fill.entry(self.fill.local, ADDR_LEN);
            // SAFETY: slot is a u64 entry of the fill ring that the kernel consumed
            // (we hold fewer than `entries` frames outside it).
            unsafe { slot.cast::<u64>().write_unaligned(frame) };
            self.fill.local = self.fill.local.wrapping_add(1);
        }
        if n > 0 {
            self.rx.consumer().store(self.rx.local, Ordering::Release);
            self.fill
                .producer()
                .store(self.fill.local, Ordering::Release);
        }
        Ok(delivered)
    }

    fn kind(&self) -> &'static str {
        "af_xdp"
    }

    fn fd(&self) -> Option<RawFd> {
        Some(self.shared.socket.as_raw_fd())
    }
}

impl XdpTx {
    /// Takes back the frames the kernel finished sending.
    fn reap(&mut self) {
        let done = self
            .completion
            .producer()
            .load(Ordering::Acquire)
            .wrapping_sub(self.completion.local);
        for _ in 0..done.min(self.completion.entries) {
            let e = self.completion.entry(self.completion.local, ADDR_LEN);
            // SAFETY: a u64 entry the kernel published (acquire above).
            let addr = unsafe { e.cast::<u64>().read_unaligned() };
            self.completion.local = self.completion.local.wrapping_add(1);
            let fs = u64::try_from(self.shared.frame_size).unwrap_or(u64::MAX);
            let rx_end = u64::from(self.shared.rx_frames) * fs;
            let total = u64::try_from(self.shared.umem.len).unwrap_or(0);
            // Only TX frames we handed out come back; anything else is ignored.
            if addr >= rx_end && addr < total && addr % fs == 0 {
                self.free.push(addr);
            }
        }
        if done > 0 {
            self.completion
                .consumer()
                .store(self.completion.local, Ordering::Release);
        }
    }

    fn kick(&self) -> io::Result<()> {
        // SAFETY: a zero-length send on our own socket; it only asks the kernel to
        // process the TX ring.
        let r = unsafe {
            libc::sendto(
                self.shared.socket.as_raw_fd(),
                std::ptr::null(),
                0,
                libc::MSG_DONTWAIT,
                std::ptr::null(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EAGAIN | libc::EBUSY | libc::ENOBUFS | libc::ENETDOWN) => {}
                _ => return Err(e),
            }
        }
        Ok(())
    }
}

impl PortTx for XdpTx {
    fn send(&mut self, frame: &[u8]) -> io::Result<bool> {
        if frame.len() > self.shared.frame_size {
            self.oversize += 1;
            return Ok(false);
        }
        if self.free.is_empty() {
            self.reap();
        }
        let in_ring = self
            .tx
            .local
            .wrapping_sub(self.tx.consumer().load(Ordering::Acquire));
        if in_ring >= self.tx.entries {
            return Ok(false);
        }
        let Some(addr) = self.free.pop() else {
            return Ok(false);
        };
        let start = usize::try_from(addr).map_err(|_| io::Error::other("UMEM address"))?;
        // SAFETY: addr is the start of a TX frame of the UMEM (only TX frames enter
        // `free`), frame.len() <= frame_size, and the kernel does not touch the frame
        // until its descriptor is published in `flush`.
        unsafe {
            std::ptr::copy_nonoverlapping(
                frame.as_ptr(),
                self.shared.umem.base.add(start),
                frame.len(),
            );
        }
        let d = self.tx.entry(self.tx.local, DESC_LEN);
        let len = u32::try_from(frame.len()).map_err(|_| io::Error::other("frame length"))?;
        // SAFETY: d is a free 16-byte descriptor of the TX ring (in_ring < entries).
        unsafe {
            d.cast::<u64>().write_unaligned(addr);
            d.add(8).cast::<u32>().write_unaligned(len);
            d.add(12).cast::<u32>().write_unaligned(0);
        }
        self.tx.local = self.tx.local.wrapping_add(1);
        self.pending += 1;
        Ok(true)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pending == 0 {
            return Ok(());
        }
        self.tx.producer().store(self.tx.local, Ordering::Release);
        self.pending = 0;
        // In copy mode the kernel sends a bounded batch per call: kick until the ring
        // is drained or a kick makes no progress.
        let mut last = self.tx.consumer().load(Ordering::Acquire);
        for _ in 0..64 {
            self.kick()?;
            let now = self.tx.consumer().load(Ordering::Acquire);
            if now == self.tx.local || now == last {
                break;
            }
            last = now;
        }
        self.reap();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirect_program_encodes_the_map_fd_and_helper() {
        let code = redirect_program(7);
        assert_eq!(code.len(), 6 * 8);
        // ld_imm64 r1 with the pseudo map fd source register and the fd as immediate.
        assert_eq!(&code[8..12], &[0x18, 0x11, 0, 0]);
        assert_eq!(
            i32::from_le_bytes([code[12], code[13], code[14], code[15]]),
            7
        );
        // call 51 (bpf_redirect_map), then exit.
        assert_eq!(code[32], 0x85);
        assert_eq!(
            i32::from_le_bytes([code[36], code[37], code[38], code[39]]),
            51
        );
        assert_eq!(code[40], 0x95);
    }

    #[test]
    fn bad_geometry_is_refused_before_any_system_call() {
        let e = open(
            "lo",
            XdpConfig {
                ring_entries: 100,
                frame_size: 2048,
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        let e = open(
            "lo",
            XdpConfig {
                ring_entries: 256,
                frame_size: 1000,
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }
}
