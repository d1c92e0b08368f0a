//! The request handler driven through virtio-queue's mock split queue over a real
//! `GuestMemoryMmap`, as a guest driver would post chains: good requests of every type,
//! then each kind of bad input, after which the same queue still serves good requests.
#![allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation
)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlkBackend;
use super::handler::{Counters, Handler, Mem, Vring};
use super::request::{S_IOERR, S_UNSUPP};
use super::*;
use crate::frontend::{BlockDevice, DeviceFuture, MemoryDevice};

const QSIZE: u16 = 64;
const MEM_BYTES: u64 = 0x100_0000; // 16 MiB of guest RAM at guest address 0
const DEV_BYTES: u64 = 1 << 20;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

/// A device whose reads wait until the test opens the gate.
#[derive(Debug)]
struct Gated {
    inner: MemoryDevice,
    gate: Notify,
}

impl BlockDevice for Gated {
    fn size_bytes(&self) -> u64 {
        self.inner.size_bytes()
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        Box::pin(async move {
            self.gate.notified().await;
            self.inner.read(offset, len).await
        })
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

struct Rig {
    rt: tokio::runtime::Runtime,
    mem: GuestMemoryMmap,
    atomic: Mem,
    vring: Vring,
    handler: Arc<Handler>,
    device: Arc<dyn BlockDevice>,
    call: EventFd,
    /// Next free descriptor index and data address.
    next_desc: u16,
    next_addr: u64,
    posted: u16,
    event_idx: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

fn rig_with(device: Arc<dyn BlockDevice>, config: VhostUserBlkConfig) -> Rig {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_BYTES as usize)]).unwrap();
    let atomic = GuestMemoryAtomic::new(mem.clone());
    let (desc, avail, used) = {
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), QSIZE);
        (vq.desc_table_addr(), vq.avail_addr(), vq.used_addr())
    };
    let vring = Vring::new(atomic.clone(), QSIZE).unwrap();
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(desc.0, avail.0, used.0).unwrap();
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    // SAFETY: dup returns a new descriptor that nothing else owns; File takes it over.
    let dup = unsafe { File::from_raw_fd(libc::dup(call.as_raw_fd())) };
    vring.set_call(Some(dup));
    let limits = limits(&*device, &config);
    let handler = Arc::new(Handler::new(
        Arc::clone(&device),
        limits,
        "dpud-vol0",
        1,
        Arc::new(Counters::default()),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    Rig {
        rt,
        mem,
        atomic,
        vring,
        handler,
        device,
        call,
        next_desc: 0,
        next_addr: 0x10_0000,
        posted: 0,
        event_idx: false,
        desc: desc.0,
        avail: avail.0,
        used: used.0,
    }
}

fn rig() -> Rig {
    rig_with(
        Arc::new(MemoryDevice::new(DEV_BYTES, 4096)),
        VhostUserBlkConfig::default(),
    )
}

fn header(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&kind.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = Vec::new();
    r.extend_from_slice(&sector.to_le_bytes());
    r.extend_from_slice(&sectors.to_le_bytes());
    r.extend_from_slice(&flags.to_le_bytes());
    r
}

/// A descriptor of a chain being built: where, how long, device-writable, and what to
/// put there first.
struct D {
    addr: Option<u64>,
    len: u32,
    write: bool,
    fill: Vec<u8>,
}

fn rd(bytes: Vec<u8>) -> D {
    D {
        addr: None,
        len: u32::try_from(bytes.len()).unwrap(),
        write: false,
        fill: bytes,
    }
}

fn wr(len: u32) -> D {
    D {
        addr: None,
        len,
        write: true,
        fill: vec![0xEE; len as usize],
    }
}

fn at(addr: u64, len: u32, write: bool) -> D {
    D {
        addr: Some(addr),
        len,
        write,
        fill: Vec::new(),
    }
}

impl Rig {
    fn alloc(&mut self, len: u32) -> u64 {
        let a = self.next_addr;
        self.next_addr += u64::from(len).div_ceil(4096).max(1) * 4096;
        a
    }

    /// Lays out the descriptors (data in fresh guest memory) and returns their addresses.
    fn place(&mut self, descs: &[D]) -> Vec<(u64, u32, bool)> {
        descs
            .iter()
            .map(|d| {
                let addr = match d.addr {
                    Some(a) => a,
                    None => {
                        let a = self.alloc(d.len);
                        self.mem.write_slice(&d.fill, GuestAddress(a)).unwrap();
                        a
                    }
                };
                (addr, d.len, d.write)
            })
            .collect()
    }

    /// Posts one chain in the descriptor table; returns the guest addresses used.
    fn post(&mut self, descs: &[D]) -> Vec<(u64, u32, bool)> {
        let placed = self.place(descs);
        let start = self.next_desc;
        let raw: Vec<RawDescriptor> = placed
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, write))| {
                let i = u16::try_from(i).unwrap();
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                if usize::from(i) + 1 < placed.len() {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, start + i + 1))
            })
            .collect();
        for (i, d) in raw.iter().enumerate() {
            self.store_desc(start + u16::try_from(i).unwrap(), *d);
        }
        self.publish(start);
        self.next_desc += u16::try_from(raw.len()).unwrap();
        placed
    }

    /// Writes descriptor `index` of the table. (The mock's own helpers re-create the
    /// rings, which zeroes their indexes; the rig lays the rings out with the mock once
    /// and then writes them the way a driver does.)
    fn store_desc(&self, index: u16, d: RawDescriptor) {
        let at = self.desc + 16 * u64::from(index % QSIZE);
        self.mem.write_obj(d, GuestAddress(at)).unwrap();
    }

    /// Makes the chain headed by `head` available, as a driver does.
    fn publish(&mut self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap();
        let slot = self.avail + 4 + 2 * u64::from(idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        self.posted += 1;
    }

    /// Posts one chain through an indirect table (as Linux does for most requests).
    fn post_indirect(&mut self, descs: &[D]) -> Vec<(u64, u32, bool)> {
        let placed = self.place(descs);
        let table = self.alloc(16 * u32::try_from(placed.len()).unwrap());
        for (i, &(addr, len, write)) in placed.iter().enumerate() {
            let i16 = u16::try_from(i).unwrap();
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if i + 1 < placed.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i16 + 1));
            self.mem
                .write_obj(d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let head = RawDescriptor::from(SplitDescriptor::new(
            table,
            16 * u32::try_from(placed.len()).unwrap(),
            VRING_DESC_F_INDIRECT as u16,
            0,
        ));
        let index = self.next_desc;
        self.store_desc(index, head);
        self.publish(index);
        self.next_desc += 1;
        placed
    }

    fn kick(&self) {
        let h = self.rt.handle().clone();
        self.handler
            .process_queue(0, &self.vring, &self.atomic, self.event_idx, &h);
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Waits until every posted chain is on the used ring; returns the last used element
    /// (head, len).
    fn wait_used(&self) -> (u32, u32) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.used_idx() != self.posted {
            assert!(
                Instant::now() < deadline,
                "used idx {} != posted {}",
                self.used_idx(),
                self.posted
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        let at = self.used + 4 + 8 * u64::from((self.posted - 1) % QSIZE);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn bytes(&self, addr: u64, len: u32) -> Vec<u8> {
        let mut v = vec![0; len as usize];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts, kicks, waits; returns (status byte, used len, placed descriptors).
    fn run(&mut self, descs: &[D]) -> (u8, u32, Vec<(u64, u32, bool)>) {
        let placed = self.post(descs);
        self.kick();
        let (_, len) = self.wait_used();
        let &(a, l, _) = placed.last().unwrap();
        (self.byte(a + u64::from(l) - 1), len, placed)
    }

    fn dev_read(&self, offset: u64, len: u64) -> Vec<u8> {
        self.rt.block_on(self.device.read(offset, len)).unwrap()
    }

    fn write_then_read_works(&mut self) {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let (st, len, _) = self.run(&[rd(header(T_OUT, 16)), rd(data.clone()), wr(1)]);
        assert_eq!((st, len), (0, 1), "write after bad input");
        let (st, len, placed) = self.run(&[rd(header(T_IN, 16)), wr(4096), wr(1)]);
        assert_eq!((st, len), (0, 4097), "read after bad input");
        assert_eq!(self.bytes(placed[1].0, 4096), data);
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn write_and_read_across_descriptors() {
    let mut r = rig();
    let data = pattern(7, 8192);
    let (st, len, _) = r.run(&[
        rd(header(T_OUT, 8)),
        rd(data[..3000].to_vec()),
        rd(data[3000..].to_vec()),
        wr(1),
    ]);
    assert_eq!((st, len), (0, 1));
    assert_eq!(r.dev_read(4096, 8192), data);
    let (st, len, placed) = r.run(&[rd(header(T_IN, 8)), wr(5000), wr(3192), wr(1)]);
    assert_eq!((st, len), (0, 8193));
    let mut back = r.bytes(placed[1].0, 5000);
    back.extend(r.bytes(placed[2].0, 3192));
    assert_eq!(back, data);
    let s = r.handler.in_flight(None);
    assert_eq!(s, 0);
}

#[test]
fn any_layout_header_with_data_and_status_with_data() {
    let mut r = rig();
    let data = pattern(3, 4096);
    let mut first = header(T_OUT, 0);
    first.extend_from_slice(&data);
    let (st, _, _) = r.run(&[rd(first), wr(1)]);
    assert_eq!(st, 0);
    // One writable descriptor holds the data and, as its last byte, the status.
    let (st, len, placed) = r.run(&[rd(header(T_IN, 0)), wr(4097)]);
    assert_eq!((st, len), (0, 4097));
    assert_eq!(r.bytes(placed[1].0, 4096), data);
}

#[test]
fn indirect_chains_work() {
    let mut r = rig();
    let data = pattern(9, 4096);
    let placed = r.post_indirect(&[rd(header(T_OUT, 24)), rd(data.clone()), wr(1)]);
    r.kick();
    r.wait_used();
    assert_eq!(r.byte(placed[2].0), 0);
    let placed = r.post_indirect(&[rd(header(T_IN, 24)), wr(4096), wr(1)]);
    r.kick();
    let (_, len) = r.wait_used();
    assert_eq!(len, 4097);
    assert_eq!(r.byte(placed[2].0), 0);
    assert_eq!(r.bytes(placed[1].0, 4096), data);
}

#[test]
fn flush_get_id_discard_and_write_zeroes() {
    let mut r = rig();
    let (st, len, _) = r.run(&[rd(header(T_FLUSH, 0)), wr(1)]);
    assert_eq!((st, len), (0, 1));

    let (st, len, placed) = r.run(&[rd(header(T_GET_ID, 0)), wr(20), wr(1)]);
    assert_eq!((st, len), (0, 21));
    let id = r.bytes(placed[1].0, 20);
    assert_eq!(&id[..9], b"dpud-vol0");
    assert!(id[9..].iter().all(|&b| b == 0), "{id:?}");

    // Fill 4 blocks, discard the 2nd, write-zeroes (with unmap) the 4th.
    let data = pattern(1, 16384);
    let (st, _, _) = r.run(&[rd(header(T_OUT, 0)), rd(data.clone()), wr(1)]);
    assert_eq!(st, 0);
    let mut list = range(8, 8, 0);
    list.extend(range(0, 0, 0)); // an empty range is accepted and ignored
    let (st, _, _) = r.run(&[rd(header(T_DISCARD, 0)), rd(list), wr(1)]);
    assert_eq!(st, 0);
    let (st, _, _) = r.run(&[rd(header(T_WRITE_ZEROES, 0)), rd(range(24, 8, 1)), wr(1)]);
    assert_eq!(st, 0);
    let back = r.dev_read(0, 16384);
    assert_eq!(back[..4096], data[..4096]);
    assert!(back[4096..8192].iter().all(|&b| b == 0));
    assert_eq!(back[8192..12288], data[8192..12288]);
    assert!(back[12288..].iter().all(|&b| b == 0));
}

#[test]
fn unsupported_requests_and_flags_get_unsupp() {
    let mut r = rig();
    let before = r.dev_read(0, 8192);
    r.rt.block_on(r.device.write(0, pattern(5, 8192), false))
        .unwrap();
    // The unmap flag on a discard, an unknown flag on write-zeroes, an unknown type.
    let (st, _, _) = r.run(&[rd(header(T_DISCARD, 0)), rd(range(0, 8, 1)), wr(1)]);
    assert_eq!(st, S_UNSUPP);
    let (st, _, _) = r.run(&[rd(header(T_WRITE_ZEROES, 0)), rd(range(0, 8, 2)), wr(1)]);
    assert_eq!(st, S_UNSUPP);
    let (st, _, _) = r.run(&[rd(header(99, 0)), wr(1)]);
    assert_eq!(st, S_UNSUPP);
    assert_eq!(r.dev_read(0, 8192), pattern(5, 8192), "nothing was zeroed");
    assert_ne!(before, pattern(5, 8192));
    r.write_then_read_works();
}

#[test]
fn descriptor_outside_guest_memory_fails_that_request() {
    let mut r = rig();
    // Data buffer past the end of guest RAM; a buffer straddling the end.
    let (st, len, _) = r.run(&[rd(header(T_IN, 0)), at(MEM_BYTES + 4096, 4096, true), wr(1)]);
    assert_eq!((st, len), (S_IOERR, 1));
    let (st, _, _) = r.run(&[
        rd(header(T_OUT, 0)),
        at(MEM_BYTES - 2048, 4096, false),
        wr(1),
    ]);
    assert_eq!(st, S_IOERR);
    // The header itself outside guest memory.
    let (st, _, _) = r.run(&[at(u64::MAX - 8, 16, false), wr(1)]);
    assert_eq!(st, S_IOERR);
    // A status byte outside guest memory: nothing can be written; returned with len 0.
    let placed = r.post(&[rd(header(T_FLUSH, 0)), at(MEM_BYTES, 1, true)]);
    r.kick();
    assert_eq!(r.wait_used().1, 0);
    assert_eq!(placed.len(), 2);
    assert_eq!(r.dev_read(0, 4096), vec![0; 4096]);
    r.write_then_read_works();
}

#[test]
fn malformed_chains_fail_that_request() {
    let mut r = rig();
    // No status descriptor at all (everything device-readable): returned with len 0.
    r.post(&[rd(header(T_OUT, 0)), rd(pattern(2, 4096))]);
    r.kick();
    assert_eq!(r.wait_used().1, 0);
    assert_eq!(r.dev_read(0, 4096), vec![0; 4096], "the write was not done");
    // A readable descriptor after a writable one.
    let (st, _, _) = r.run(&[rd(header(T_OUT, 0)), wr(8), rd(pattern(2, 4096)), wr(1)]);
    assert_eq!(st, S_IOERR);
    // Wrong direction: a read whose data buffer is device-readable, a write whose data
    // buffer is device-writable.
    let (st, _, _) = r.run(&[rd(header(T_IN, 0)), rd(vec![0; 4096]), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_OUT, 0)), wr(4096), wr(1)]);
    assert_eq!(st, S_IOERR);
    // Header shorter than 16 bytes.
    let (st, _, _) = r.run(&[rd(header(T_IN, 0)[..8].to_vec()), wr(4096), wr(1)]);
    assert_eq!(st, S_IOERR);
    // Sector whose byte offset overflows u64; a range past the end; misaligned.
    let (st, _, _) = r.run(&[rd(header(T_IN, u64::MAX / 256)), wr(4096), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_IN, DEV_BYTES / 512 - 4)), wr(4096), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_OUT, 1)), rd(pattern(2, 4096)), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_IN, 0)), wr(1000), wr(1)]);
    assert_eq!(st, S_IOERR);
    // A discard range whose sector overflows, and a range list that is not whole entries.
    let (st, _, _) = r.run(&[rd(header(T_DISCARD, 0)), rd(range(u64::MAX, 8, 0)), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_DISCARD, 0)), rd(vec![0; 10]), wr(1)]);
    assert_eq!(st, S_IOERR);
    // Descriptor lengths that sum past 4 GiB: the chain ends at the overflow, so it has
    // no status byte and comes back with len 0.
    r.post(&[rd(header(T_IN, 0)), at(0x20_0000, 0xFFFF_FFF8, true), wr(1)]);
    r.kick();
    assert_eq!(r.wait_used().1, 0);
    // A request larger than the advertised maximum.
    let big = VhostUserBlkConfig::default().max_io_bytes + 4096;
    let (st, _, _) = r.run(&[rd(header(T_IN, 0)), at(0x40_0000, big, true), wr(1)]);
    assert_eq!(st, S_IOERR);
    assert_eq!(r.dev_read(0, 8192), vec![0; 8192]);
    r.write_then_read_works();
}

#[test]
fn a_descriptor_loop_ends() {
    let mut r = rig();
    // Two descriptors pointing at each other, both readable: the chain ends after the
    // queue size's worth of descriptors, without a status byte.
    let h = r.alloc(16);
    r.mem
        .write_slice(&header(T_OUT, 0), GuestAddress(h))
        .unwrap();
    let a = RawDescriptor::from(SplitDescriptor::new(h, 16, VRING_DESC_F_NEXT as u16, 1));
    let b = RawDescriptor::from(SplitDescriptor::new(h, 16, VRING_DESC_F_NEXT as u16, 0));
    r.store_desc(0, a);
    r.store_desc(1, b);
    r.publish(0);
    r.next_desc = 2;
    r.kick();
    assert_eq!(r.wait_used(), (0, 0));
    r.write_then_read_works();
}

#[test]
fn read_only_device_refuses_writes() {
    let dev = MemoryDevice::new(DEV_BYTES, 4096);
    let mut r = rig_with(
        Arc::new(dev.into_read_only()),
        VhostUserBlkConfig::default(),
    );
    let (st, _, _) = r.run(&[rd(header(T_OUT, 0)), rd(pattern(4, 4096)), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_DISCARD, 0)), rd(range(0, 8, 0)), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, _, _) = r.run(&[rd(header(T_WRITE_ZEROES, 0)), rd(range(0, 8, 0)), wr(1)]);
    assert_eq!(st, S_IOERR);
    let (st, len, placed) = r.run(&[rd(header(T_IN, 0)), wr(4096), wr(1)]);
    assert_eq!((st, len), (0, 4097));
    assert_eq!(r.bytes(placed[1].0, 4096), vec![0; 4096]);
    let (st, _, _) = r.run(&[rd(header(T_FLUSH, 0)), wr(1)]);
    assert_eq!(st, 0);
    let c = &r.handler;
    assert_eq!(c.in_flight(None), 0);
}

#[test]
fn event_idx_signals_only_when_the_driver_asks() {
    let mut r = rig();
    r.event_idx = true;
    r.vring.set_queue_event_idx(true);
    // used_event lives after the avail ring; avail_event after the used ring.
    let used_event = GuestAddress(r.avail + 4 + 2 * u64::from(QSIZE));
    let avail_event = GuestAddress(r.used + 4 + 8 * u64::from(QSIZE));
    r.mem.write_obj(0u16, used_event).unwrap();
    let _ = r.call.read();
    r.run(&[rd(header(T_FLUSH, 0)), wr(1)]);
    // The device re-enabled notifications at the next avail index.
    assert_eq!(r.mem.read_obj::<u16>(avail_event).unwrap(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut signalled = false;
    while Instant::now() < deadline && !signalled {
        signalled = r.call.read().is_ok();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        signalled,
        "used idx crossed used_event 0: the driver must be signalled"
    );
    // The driver asks to hear only after the 10th used entry.
    r.mem.write_obj(10u16, used_event).unwrap();
    r.run(&[rd(header(T_FLUSH, 0)), wr(1)]);
    std::thread::sleep(Duration::from_millis(50));
    assert!(r.call.read().is_err(), "no signal before used_event");
    assert_eq!(r.mem.read_obj::<u16>(avail_event).unwrap(), 2);
}

#[test]
fn the_worker_never_waits_for_the_device() {
    let gated = Arc::new(Gated {
        inner: MemoryDevice::new(DEV_BYTES, 4096),
        gate: Notify::new(),
    });
    let mut r = rig_with(gated.clone(), VhostUserBlkConfig::default());
    let placed = r.post(&[rd(header(T_IN, 0)), wr(4096), wr(1)]);
    let t = Instant::now();
    r.kick();
    assert!(t.elapsed() < Duration::from_secs(1));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.used_idx(), 0, "completed before the device answered");
    assert_eq!(r.handler.in_flight(Some(0)), 1);
    assert!(!r.handler.wait_idle(Some(0), Duration::from_millis(20)));
    gated.gate.notify_one();
    r.wait_used();
    assert!(r.handler.wait_idle(Some(0), Duration::from_secs(5)));
    assert_eq!(r.byte(placed[2].0), 0);
}

#[test]
fn a_closed_connection_writes_no_guest_memory() {
    let gated = Arc::new(Gated {
        inner: MemoryDevice::new(DEV_BYTES, 4096),
        gate: Notify::new(),
    });
    let mut r = rig_with(gated.clone(), VhostUserBlkConfig::default());
    let placed = r.post(&[rd(header(T_IN, 0)), wr(4096), wr(1)]);
    r.kick();
    assert!(
        !r.handler.close(Duration::from_millis(20)),
        "one read in flight"
    );
    gated.gate.notify_one();
    assert!(r.handler.wait_idle(None, Duration::from_secs(5)));
    assert_eq!(r.used_idx(), 0);
    assert_eq!(r.byte(placed[2].0), 0xEE, "status byte untouched");
    assert_eq!(r.bytes(placed[1].0, 4096), vec![0xEE; 4096]);
}

#[test]
fn config_space_and_features() {
    let device: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(DEV_BYTES, 4096));
    let config = VhostUserBlkConfig::default();
    let handler = Arc::new(Handler::new(
        Arc::clone(&device),
        limits(&*device, &config),
        "x",
        4,
        Arc::new(Counters::default()),
    ));
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let b = BlkBackend::new(
        handler,
        mem.clone(),
        4,
        256,
        Vec::new(),
        false,
        Arc::default(),
    );
    let c = b.get_config(0, 60);
    let le32 = |at: usize| u32::from_le_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
    let capacity = u64::from_le_bytes(c[0..8].try_into().unwrap());
    assert_eq!(capacity, DEV_BYTES / 512);
    assert_eq!(le32(12), 254, "seg_max");
    assert!(u64::from(le32(8)) * u64::from(le32(12)) <= u64::from(config.max_io_bytes));
    assert_eq!(le32(20), 4096, "blk_size");
    assert_eq!(c[32], 0, "no volatile cache: write-through");
    assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4, "num_queues");
    assert_eq!(le32(36), (1 << 30) / 512, "max_discard_sectors");
    assert_eq!(le32(40), 16, "max_discard_seg");
    assert_eq!(le32(44), 8, "discard_sector_alignment");
    assert_eq!(le32(48), (1 << 30) / 512, "max_write_zeroes_sectors");
    assert_eq!(c[56], 1, "write_zeroes_may_unmap");
    // A read of part of the space, and past what this device fills.
    assert_eq!(b.get_config(20, 4), 4096u32.to_le_bytes());
    assert_eq!(b.get_config(60, 12), vec![0; 12]);
    assert!(b.set_config(0, &[1; 8]).is_err(), "capacity is read-only");
    assert!(b.set_config(32, &[1]).is_ok());
    assert_eq!(b.get_config(32, 1), [0], "still write-through");
    let f = b.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(b.queues_per_thread(), vec![1, 2, 4, 8]);

    let ro: Arc<dyn BlockDevice> = Arc::new(MemoryDevice::new(DEV_BYTES, 4096).into_read_only());
    let handler = Arc::new(Handler::new(
        Arc::clone(&ro),
        limits(&*ro, &config),
        "x",
        1,
        Arc::new(Counters::default()),
    ));
    let b = BlkBackend::new(handler, mem, 1, 256, Vec::new(), false, Arc::default());
    let f = b.features();
    assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(b.get_config(36, 4), vec![0; 4]);
}

#[test]
fn socket_accepts_again_after_a_disconnect_and_stops_cleanly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vol0.sock");
    let export = VhostUserBlkExport::start(
        "vol0",
        &path,
        Arc::new(MemoryDevice::new(DEV_BYTES, 4096)),
        VhostUserBlkConfig::default(),
        vec![rt.handle().clone()],
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let wait = |what: &str, f: &dyn Fn(VhostUserBlkStats) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f(export.stats()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", export.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    for n in 1..=3u64 {
        let c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        wait("connected", &|s| s.connections == n && s.connected);
        // A front-end that sends garbage and goes away.
        use std::io::Write as _;
        let _ = (&c).write_all(&[0xff; 7]);
        drop(c);
        wait("disconnected", &|s| !s.connected);
    }
    export.stop_and_wait();
    assert!(!path.exists(), "socket file removed");
}

/// A device whose size the test grows, as `VolumeDevice::grow` does (the bytes behind
/// it are there from the start).
#[derive(Debug)]
struct Growable {
    inner: MemoryDevice,
    size: std::sync::atomic::AtomicU64,
}

impl Growable {
    fn new(size: u64, room: u64) -> Self {
        Self {
            inner: MemoryDevice::new(room, 4096),
            size: size.into(),
        }
    }

    fn grow(&self, size: u64) {
        self.size.store(size, std::sync::atomic::Ordering::SeqCst);
    }
}

impl BlockDevice for Growable {
    fn size_bytes(&self) -> u64 {
        self.size.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read_only(&self) -> bool {
        false
    }
    fn volatile_write_cache(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, len: u64) -> DeviceFuture<'_, Vec<u8>> {
        self.inner.read(offset, len)
    }
    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> DeviceFuture<'_, ()> {
        self.inner.write(offset, data, fua)
    }
    fn flush(&self) -> DeviceFuture<'_, ()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> DeviceFuture<'_, ()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> DeviceFuture<'_, ()> {
        self.inner.write_zeroes(offset, len, fua)
    }
}

#[test]
fn requests_past_the_old_end_work_once_the_device_grew() {
    let dev = Arc::new(Growable::new(DEV_BYTES, 2 * DEV_BYTES));
    let mut r = rig_with(
        Arc::clone(&dev) as Arc<dyn BlockDevice>,
        VhostUserBlkConfig::default(),
    );
    let sector = DEV_BYTES / 512;
    let data = pattern(9, 4096);
    let (st, _, _) = r.run(&[rd(header(T_OUT, sector)), rd(data.clone()), wr(1)]);
    assert_eq!(st, S_IOERR, "past the end before the grow");
    dev.grow(2 * DEV_BYTES);
    // The same connection (handler) takes the grown range.
    let (st, _, _) = r.run(&[rd(header(T_OUT, sector)), rd(data.clone()), wr(1)]);
    assert_eq!(st, 0, "write past the old end after the grow");
    let (st, len, placed) = r.run(&[rd(header(T_IN, sector)), wr(4096), wr(1)]);
    assert_eq!((st, len), (0, 4097));
    assert_eq!(r.bytes(placed[1].0, 4096), data);
    let (st, _, _) = r.run(&[rd(header(T_IN, 2 * sector)), wr(4096), wr(1)]);
    assert_eq!(st, S_IOERR, "past the new end");
}

mod config_change {
    //! The export's config-change notice, seen by a vhost-user front-end (vhost's own
    //! front-end code, as a VMM would use it) over the export's socket.

    use std::os::fd::{AsRawFd, RawFd};
    use std::path::Path;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use vhost::vhost_user::message::VhostUserConfigFlags;
    use vhost::vhost_user::{
        Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
        VhostUserProtocolFeatures,
    };
    use vhost::VhostBackend;

    use super::{Growable, DEV_BYTES};
    use crate::frontend::vhost_user_blk::{CapacityNotice, VhostUserBlkConfig, VhostUserBlkExport};

    const VERSION_1: u64 = 1 << 32;
    const PROTOCOL_FEATURES: u64 = 1 << 30;

    /// The front-end's side of the backend request channel: counts notices.
    #[derive(Debug, Default)]
    struct Notices(AtomicU64);

    impl VhostUserFrontendReqHandler for Notices {
        fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(0)
        }
    }

    struct Vmm {
        frontend: Frontend,
        channel: Option<FrontendReqHandler<Notices>>,
        notices: Arc<Notices>,
    }

    impl Vmm {
        /// Connects and negotiates as QEMU does, with or without `BACKEND_REQ`, and
        /// reads the capacity as QEMU does when it creates the device.
        fn connect(path: &Path, backend_req: bool) -> Self {
            let mut vmm = Self::reconnect(path, backend_req);
            vmm.capacity();
            vmm
        }

        /// Connects and negotiates as a QEMU that reconnects does: no `GET_CONFIG`.
        fn reconnect(path: &Path, backend_req: bool) -> Self {
            let mut frontend = Frontend::connect(path, 1).unwrap();
            frontend.set_owner().unwrap();
            let offered = frontend.get_features().unwrap();
            assert_eq!(offered & PROTOCOL_FEATURES, PROTOCOL_FEATURES);
            frontend
                .set_features(VERSION_1 | PROTOCOL_FEATURES)
                .unwrap();
            let proto = frontend.get_protocol_features().unwrap();
            assert!(
                proto.contains(VhostUserProtocolFeatures::BACKEND_REQ),
                "{proto:?}"
            );
            // REPLY_ACK as QEMU negotiates it: the back-end must not wait for replies
            // to its notices (this front-end, like QEMU's main loop, handles one thing
            // at a time).
            assert!(
                proto.contains(VhostUserProtocolFeatures::REPLY_ACK),
                "{proto:?}"
            );
            let mut wanted =
                VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK;
            if backend_req {
                wanted |= VhostUserProtocolFeatures::BACKEND_REQ;
            }
            frontend.set_protocol_features(wanted).unwrap();
            let notices = Arc::new(Notices::default());
            let channel = backend_req.then(|| {
                let h = FrontendReqHandler::new(Arc::clone(&notices)).unwrap();
                frontend.set_backend_request_fd(&h.get_tx_raw_fd()).unwrap();
                h
            });
            let vmm = Self {
                frontend,
                channel,
                notices,
            };
            // A round trip: the back-end has taken every message above.
            vmm.frontend.get_features().unwrap();
            vmm
        }

        /// Sends the memory table, as QEMU does when it starts the device.
        fn start(&mut self) {
            let file = tempfile::tempfile().unwrap();
            file.set_len(1 << 20).unwrap();
            let ram = vm_memory::GuestMemoryMmap::<()>::from_ranges_with_files(&[(
                vm_memory::GuestAddress(0),
                1 << 20,
                Some(vm_memory::FileOffset::new(file, 0)),
            )])
            .unwrap();
            let region = vm_memory::GuestMemoryBackend::iter(&ram).next().unwrap();
            let info = vhost::VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
            self.frontend.set_mem_table(&[info]).unwrap();
            // A round trip: the back-end has handled the table.
            self.frontend.get_features().unwrap();
        }

        fn capacity(&mut self) -> u64 {
            let (_, c) = self
                .frontend
                .get_config(0, 8, VhostUserConfigFlags::empty(), &[0; 8])
                .unwrap();
            u64::from_le_bytes(c[..8].try_into().unwrap())
        }

        /// Handles one message of the backend channel if one comes within `wait`.
        fn take_notice(&mut self, wait: Duration) -> bool {
            let h = self.channel.as_mut().expect("a backend channel");
            if !readable(h.as_raw_fd(), wait) {
                return false;
            }
            h.handle_request().unwrap();
            true
        }
    }

    fn readable(fd: RawFd, wait: Duration) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: one valid pollfd that outlives the call; the count says one.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        n == 1 && p.revents & libc::POLLIN != 0
    }

    /// Runs `f` on a thread of its own and returns its result, failing the test when
    /// it takes over 5 s (a back-end waiting for a reply this front-end cannot send
    /// while it waits itself).
    fn finishes<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let t = std::thread::spawn(f);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !t.is_finished() {
            assert!(std::time::Instant::now() < deadline, "{what}: blocked");
            std::thread::sleep(Duration::from_millis(5));
        }
        t.join().unwrap()
    }

    /// `export.capacity_changed()`, within 5 s.
    fn changed(export: &Arc<VhostUserBlkExport>) -> CapacityNotice {
        let e = Arc::clone(export);
        finishes("capacity_changed", move || e.capacity_changed())
    }

    /// `vmm.start()`, within 5 s.
    fn start(vmm: Vmm) -> Vmm {
        finishes("SET_MEM_TABLE", move || {
            let mut vmm = vmm;
            vmm.start();
            vmm
        })
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn a_grown_device_is_announced_on_the_backend_channel() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.sock");
        let dev = Arc::new(Growable::new(DEV_BYTES, 4 * DEV_BYTES));
        let export = Arc::new(
            VhostUserBlkExport::start(
                "vol0",
                &path,
                Arc::clone(&dev) as _,
                VhostUserBlkConfig::default(),
                vec![rt.handle().clone()],
            )
            .unwrap(),
        );
        assert_eq!(changed(&export), CapacityNotice::NotConnected);

        let mut vmm = Vmm::connect(&path, true);
        assert_eq!(vmm.capacity(), DEV_BYTES / 512);
        assert!(!vmm.take_notice(Duration::from_millis(100)), "nothing yet");
        dev.grow(2 * DEV_BYTES);
        assert_eq!(changed(&export), CapacityNotice::Sent);
        assert!(
            vmm.take_notice(Duration::from_secs(5)),
            "no config-change notice"
        );
        assert_eq!(vmm.notices.0.load(Ordering::SeqCst), 1);
        // What QEMU does on the notice: read the config space again.
        assert_eq!(vmm.capacity(), 2 * DEV_BYTES / 512);

        // A front-end whose backend channel is gone: the send fails, the export and
        // the connection go on, and the new size is still what GET_CONFIG says.
        vmm.channel = None;
        dev.grow(3 * DEV_BYTES);
        assert!(matches!(changed(&export), CapacityNotice::Failed(_)));
        assert_eq!(vmm.capacity(), 3 * DEV_BYTES / 512);
        assert_eq!(changed(&export), CapacityNotice::NoChannel);
        drop(vmm);

        // A front-end that connects after the grow reads the new size, and hears of
        // the next one.
        let mut vmm = Vmm::connect(&path, true);
        assert_eq!(vmm.capacity(), 3 * DEV_BYTES / 512);
        dev.grow(4 * DEV_BYTES);
        assert_eq!(changed(&export), CapacityNotice::Sent);
        assert!(vmm.take_notice(Duration::from_secs(5)));
        assert_eq!(vmm.capacity(), 4 * DEV_BYTES / 512);
        drop(vmm);
        export.stop_and_wait();
    }

    #[test]
    fn a_front_end_with_an_old_capacity_is_told_when_it_starts_the_device() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.sock");
        let dev = Arc::new(Growable::new(DEV_BYTES, 4 * DEV_BYTES));
        let export = Arc::new(
            VhostUserBlkExport::start(
                "vol0",
                &path,
                Arc::clone(&dev) as _,
                VhostUserBlkConfig::default(),
                vec![rt.handle().clone()],
            )
            .unwrap(),
        );
        let disconnected = |export: &Arc<VhostUserBlkExport>| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while export.stats().connected {
                assert!(std::time::Instant::now() < deadline, "still connected");
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        let mut vmm = Vmm::connect(&path, true);
        assert_eq!(vmm.capacity(), DEV_BYTES / 512);
        let mut vmm = start(vmm);
        assert!(
            !vmm.take_notice(Duration::from_millis(100)),
            "capacity current"
        );
        drop(vmm);
        disconnected(&export);

        // Grown while QEMU was away; it reconnects without reading the config space.
        dev.grow(2 * DEV_BYTES);
        assert_eq!(changed(&export), CapacityNotice::NotConnected);
        let mut vmm = Vmm::reconnect(&path, true);
        assert!(
            !vmm.take_notice(Duration::from_millis(100)),
            "not before start"
        );
        let mut vmm = start(vmm);
        assert!(
            vmm.take_notice(Duration::from_secs(5)),
            "no notice at start"
        );
        assert_eq!(vmm.capacity(), 2 * DEV_BYTES / 512);
        drop(vmm);
        disconnected(&export);

        // Nothing changed since it read the capacity: no notice.
        let vmm = Vmm::reconnect(&path, true);
        let mut vmm = start(vmm);
        assert!(
            !vmm.take_notice(Duration::from_millis(200)),
            "a spare notice"
        );
        drop(vmm);
        export.stop_and_wait();
    }

    #[test]
    fn without_a_backend_channel_get_config_reports_the_new_size() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol0.sock");
        let dev = Arc::new(Growable::new(DEV_BYTES, 2 * DEV_BYTES));
        let export = Arc::new(
            VhostUserBlkExport::start(
                "vol0",
                &path,
                Arc::clone(&dev) as _,
                VhostUserBlkConfig::default(),
                vec![rt.handle().clone()],
            )
            .unwrap(),
        );
        let mut vmm = Vmm::connect(&path, false);
        assert_eq!(vmm.capacity(), DEV_BYTES / 512);
        dev.grow(2 * DEV_BYTES);
        assert_eq!(changed(&export), CapacityNotice::NoChannel);
        assert_eq!(vmm.capacity(), 2 * DEV_BYTES / 512);
        assert_eq!(vmm.notices.0.load(Ordering::SeqCst), 0);
        drop(vmm);
        export.stop_and_wait();
    }
}
