//! One volume exported through all three front-ends at once (NVMe/TCP, vhost-user-blk
//! and NBD), each driven by a real client of its protocol: the `nvmeof` host library,
//! a vhost-user front-end that plays QEMU's part (it negotiates features, shares its
//! "guest RAM" file with dpud, lays out a split virtqueue and posts virtio-blk
//! requests), and NBD over the Unix socket. Data written through any one of them
//! must read back identically through the other two: the front-ends agree on offsets,
//! block sizes and the volume behind them, and none of them caches or reorders what
//! another one wrote. Each front-end's protocol is tested on its own elsewhere
//! (nvme_tcp_frontend.rs, frontend::vhost_user_blk::tests, nbd_*.rs).
//!
//! Then growth: `volume resize` of a volume under two vhost-user front-ends, one with
//! the backend request channel QEMU sets up and one without, reaches the first as a
//! config-change notice and both as the new capacity, and the grown range works.

mod common;

use std::fs::File;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::api::{export, node_and_volume};
use common::nbd;
use engine::api::proto;
use engine::api::proto::{exports_client::ExportsClient, volumes_client::VolumesClient};
use engine::api::testing::{connect_unix, TestDaemon};
use nvmeof::host::{Controller, HostConfig};
use tokio::net::UnixStream;
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
    VhostUserProtocolFeatures,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes as _, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-0000000000cc";
const VOLUME_BYTES: u64 = 4 << 20;
const BLOCK: u64 = 4096;

// ---------------------------------------------------------------------------------
// A vhost-user front-end with one split virtqueue, one request in flight at a time.

const QSIZE: u16 = 16;
const RAM_BYTES: usize = 8 << 20;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const HDR: u64 = 0x4000;
const STATUS: u64 = 0x4100;
const DATA: u64 = 0x10_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
const VHOST_USER_F_PROTOCOL_FEATURES: u64 = 1 << 30;

struct Virtio {
    frontend: Frontend,
    ram: GuestMemoryMmap,
    kick: EventFd,
    _call: EventFd,
    /// Requests posted so far (the avail index).
    posted: u16,
    /// The backend request channel, when `BACKEND_REQ` was negotiated.
    channel: Option<FrontendReqHandler<ConfigNotices>>,
    notices: std::sync::Arc<ConfigNotices>,
}

/// What the front-end's side of the backend request channel received.
#[derive(Debug, Default)]
struct ConfigNotices(std::sync::atomic::AtomicU64);

impl VhostUserFrontendReqHandler for ConfigNotices {
    fn handle_config_change(&self) -> vhost::vhost_user::HandlerResult<u64> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(0)
    }
}

impl Virtio {
    /// Connects as QEMU would: features, the "guest RAM" (a file both processes map),
    /// then queue 0's size, base, addresses, eventfds, and enables it.
    fn connect(socket: &std::path::Path) -> Res<Self> {
        Self::connect_with(socket, false)
    }

    /// `connect`, and with `backend_req` the backend request channel QEMU sets up
    /// (`BACKEND_REQ` negotiated, `SET_BACKEND_REQ_FD`).
    fn connect_with(socket: &std::path::Path, backend_req: bool) -> Res<Self> {
        let file: File = tempfile::tempfile()?;
        file.set_len(u64::try_from(RAM_BYTES)?)?;
        let ram = GuestMemoryMmap::<()>::from_ranges_with_files(&[(
            GuestAddress(0),
            RAM_BYTES,
            Some(FileOffset::new(file, 0)),
        )])?;
        let region = ram.iter().next().ok_or("no RAM region")?;
        let info = VhostUserMemoryRegionInfo::from_guest_region(region)?;
        // The front-end gives ring addresses in its own address space, as QEMU does.
        let va = |gpa: u64| info.userspace_addr + gpa;

        let mut frontend = Frontend::connect(socket, 1)?;
        frontend.set_owner()?;
        let offered = frontend.get_features()?;
        let wanted = VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES;
        if offered & wanted != wanted {
            return Err(format!("features {offered:#x} lack {wanted:#x}").into());
        }
        frontend.set_features(wanted)?;
        let proto = frontend.get_protocol_features()?;
        let mut wanted = VhostUserProtocolFeatures::CONFIG;
        if backend_req {
            // As QEMU negotiates them.
            wanted |= VhostUserProtocolFeatures::BACKEND_REQ | VhostUserProtocolFeatures::REPLY_ACK;
        }
        if !proto.contains(wanted) {
            return Err(format!("protocol features {proto:?} lack {wanted:?}").into());
        }
        frontend.set_protocol_features(wanted)?;
        let notices = std::sync::Arc::new(ConfigNotices::default());
        let channel = if backend_req {
            let h = FrontendReqHandler::new(std::sync::Arc::clone(&notices))?;
            frontend.set_backend_request_fd(&h.get_tx_raw_fd())?;
            Some(h)
        } else {
            None
        };
        frontend.set_mem_table(&[info])?;
        let kick = EventFd::new(0)?;
        let call = EventFd::new(0)?;
        frontend.set_vring_num(0, QSIZE)?;
        frontend.set_vring_base(0, 0)?;
        frontend.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: QSIZE,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: va(DESC),
                used_ring_addr: va(USED),
                avail_ring_addr: va(AVAIL),
                log_addr: None,
            },
        )?;
        frontend.set_vring_kick(0, &kick)?;
        frontend.set_vring_call(0, &call)?;
        frontend.set_vring_enable(0, true)?;
        Ok(Self {
            frontend,
            ram,
            kick,
            _call: call,
            posted: 0,
            channel,
            notices,
        })
    }

    /// Handles the messages waiting on the backend request channel (within `wait` for
    /// the first); returns how many config-change notices have arrived in all.
    fn take_notices(&mut self, wait: Duration) -> Res<u64> {
        use std::os::fd::AsRawFd as _;
        let h = self.channel.as_mut().ok_or("no backend request channel")?;
        let mut timeout = i32::try_from(wait.as_millis())?;
        loop {
            let mut p = libc::pollfd {
                fd: h.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that outlives the call; the count says one.
            let n = unsafe { libc::poll(&mut p, 1, timeout) };
            if n != 1 || p.revents & libc::POLLIN == 0 {
                break;
            }
            h.handle_request()?;
            timeout = 0;
        }
        Ok(self.notices.0.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// The disk's capacity in 512-byte sectors, from the config space.
    fn capacity(&mut self) -> Res<u64> {
        let (_, payload) =
            self.frontend
                .get_config(0, 8, VhostUserConfigFlags::empty(), &[0u8; 8])?;
        let bytes: [u8; 8] = payload
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or("short config space")?;
        Ok(u64::from_le_bytes(bytes))
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) -> Res<()> {
        let at = GuestAddress(DESC + u64::from(i) * 16);
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.ram.write_slice(&d, at)?;
        Ok(())
    }

    /// One request: header, then (for reads and writes) `len` bytes at DATA, then the
    /// status byte; waits for the used ring and returns the status.
    fn request(&mut self, kind: u32, sector: u64, len: u32, device_writes: bool) -> Res<u8> {
        let mut h = Vec::with_capacity(16);
        h.extend_from_slice(&kind.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend_from_slice(&sector.to_le_bytes());
        self.ram.write_slice(&h, GuestAddress(HDR))?;
        self.ram.write_obj(0xEEu8, GuestAddress(STATUS))?;
        self.desc(0, HDR, 16, F_NEXT, 1)?;
        let data_flags = if device_writes { F_WRITE } else { 0 };
        self.desc(1, DATA, len, data_flags | F_NEXT, 2)?;
        self.desc(2, STATUS, 1, F_WRITE, 0)?;
        // Publish head 0, then the index, as a driver does.
        let slot = AVAIL + 4 + u64::from(self.posted % QSIZE) * 2;
        self.ram.write_obj(0u16, GuestAddress(slot))?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.posted = self.posted.wrapping_add(1);
        self.ram.write_obj(self.posted, GuestAddress(AVAIL + 2))?;
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.kick.write(1)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            let used: u16 = self.ram.read_obj(GuestAddress(USED + 2))?;
            if used == self.posted {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("request {} never completed", self.posted).into());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        Ok(self.ram.read_obj(GuestAddress(STATUS))?)
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        self.ram.write_slice(data, GuestAddress(DATA))?;
        let status = self.request(1, offset / 512, u32::try_from(data.len())?, false)?;
        if status != 0 {
            return Err(format!("virtio write at {offset}: status {status}").into());
        }
        Ok(())
    }

    fn read(&mut self, offset: u64, len: u32) -> Res<Vec<u8>> {
        let mut out = vec![0u8; usize::try_from(len)?];
        self.ram.write_slice(&out, GuestAddress(DATA))?;
        let status = self.request(0, offset / 512, len, true)?;
        if status != 0 {
            return Err(format!("virtio read at {offset}: status {status}").into());
        }
        self.ram.read_slice(&mut out, GuestAddress(DATA))?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 131 + usize::from(seed) * 17 + i / 4096) % 253).unwrap_or(0))
        .collect()
}

/// The three clients of one volume and what the volume should hold.
struct Clients {
    nvme: Controller,
    virtio: Virtio,
    nbd: UnixStream,
    model: Vec<u8>,
}

impl Clients {
    fn record(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        let start = usize::try_from(offset)?;
        self.model
            .get_mut(start..start + data.len())
            .ok_or("write past the model")?
            .copy_from_slice(data);
        Ok(())
    }

    async fn write_nvme(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        self.nvme
            .write(1, 1, offset / BLOCK, Bytes::copy_from_slice(data), false)
            .await?;
        self.record(offset, data)
    }

    fn write_virtio(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        tokio::task::block_in_place(|| self.virtio.write(offset, data))?;
        self.record(offset, data)
    }

    async fn write_nbd(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        nbd::request_ok(&mut self.nbd, 1, offset, u32::try_from(data.len())?, data).await?;
        self.record(offset, data)
    }

    async fn read_nvme(&mut self, offset: u64, len: u32) -> Res<Vec<u8>> {
        let blocks = u32::try_from(u64::from(len) / BLOCK)?;
        Ok(self.nvme.read(0, 1, offset / BLOCK, blocks).await?.to_vec())
    }

    fn read_virtio(&mut self, offset: u64, len: u32) -> Res<Vec<u8>> {
        tokio::task::block_in_place(|| self.virtio.read(offset, len))
    }

    async fn read_nbd(&mut self, offset: u64, len: u32) -> Res<Vec<u8>> {
        nbd::request_ok(&mut self.nbd, 0, offset, len, &[]).await
    }

    /// Reads `len` bytes at `offset` through all three and compares each with the
    /// model, naming the front-end that differs.
    async fn check(&mut self, what: &str, offset: u64, len: u32) -> Res<()> {
        let start = usize::try_from(offset)?;
        let want = self
            .model
            .get(start..start + usize::try_from(len)?)
            .ok_or("range past the model")?
            .to_vec();
        let got = [
            ("NVMe/TCP", self.read_nvme(offset, len).await?),
            ("vhost-user-blk", self.read_virtio(offset, len)?),
            ("NBD", self.read_nbd(offset, len).await?),
        ];
        for (name, bytes) in got {
            if bytes != want {
                let at = bytes.iter().zip(&want).position(|(a, b)| a != b);
                return Err(format!(
                    "{what}: {name} read {len} bytes at {offset} that differ from what was \
                     written (first difference at byte {at:?})"
                )
                .into());
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_written_through_one_front_end_reads_back_through_the_others() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    node_and_volume(&ch, "n1", VOLUME_BYTES).await?;
    let exports = ExportsClient::new(ch);
    let add = |t: proto::ExportType, name: &str, hosts: Vec<String>| {
        let req = export(t, name, false, hosts);
        let mut ex = exports.clone();
        async move { ex.add(req).await.map(tonic::Response::into_inner) }
    };
    let nv = add(proto::ExportType::NvmeTcp, "v-nvme", vec![HOST.into()]).await?;
    let vh = add(proto::ExportType::VhostUserBlk, "v-vhost", Vec::new()).await?;
    let nb = add(proto::ExportType::Nbd, "v-nbd", Vec::new()).await?;
    assert!(nv.served && vh.served && nb.served, "{nv:?} {vh:?} {nb:?}");

    let mut hc = HostConfig::new(nv.nvme_address.parse()?, nv.nvme_subnqn.clone());
    hc.hostnqn = HOST.into();
    hc.io_queues = 2;
    let nvme = Controller::connect(hc).await?;
    let ns = nvme.namespace(1).await?;
    assert_eq!((ns.block_size, ns.blocks), (4096, VOLUME_BYTES / BLOCK));
    let socket = d
        .config
        .vhost_user_blk
        .socket_dir
        .clone()
        .ok_or("no vhost-user-blk directory")?
        .join("v-vhost.sock");
    let mut virtio = tokio::task::block_in_place(|| Virtio::connect(&socket))?;
    assert_eq!(
        tokio::task::block_in_place(|| virtio.capacity())?,
        VOLUME_BYTES / 512
    );
    let mut nbd_sock = UnixStream::connect(d.handle.nbd_socket().ok_or("no NBD socket")?).await?;
    nbd::go_ok(&mut nbd_sock, "v-nbd").await?;
    let mut c = Clients {
        nvme,
        virtio,
        nbd: nbd_sock,
        model: vec![0u8; usize::try_from(VOLUME_BYTES)?],
    };

    // NVMe/TCP -> vhost-user-blk and NBD: one write through R2T (64 KiB), one
    // in-capsule (4 KiB), one at the volume's last block.
    c.write_nvme(16 * BLOCK, &pattern(1, 64 << 10)).await?;
    c.write_nvme(100 * BLOCK, &pattern(2, 4096)).await?;
    c.write_nvme(VOLUME_BYTES - BLOCK, &pattern(3, 4096))
        .await?;
    c.check("NVMe/TCP writes", 16 * BLOCK, 64 << 10).await?;
    c.check("NVMe/TCP in-capsule write", 100 * BLOCK, 4096)
        .await?;
    c.check("NVMe/TCP write at the end", VOLUME_BYTES - BLOCK, 4096)
        .await?;

    // vhost-user-blk -> NVMe/TCP and NBD: a fresh range, then one overlapping what
    // NVMe/TCP wrote (the second half of its 64 KiB and beyond).
    c.write_virtio(600 * BLOCK, &pattern(4, 128 << 10))?;
    c.write_virtio(24 * BLOCK, &pattern(5, 32 << 10))?;
    c.check("vhost-user-blk write", 600 * BLOCK, 128 << 10)
        .await?;
    c.check(
        "vhost-user-blk overwrite of NVMe/TCP data",
        8 * BLOCK,
        64 << 10,
    )
    .await?;

    // NBD -> both, over what each of them wrote last.
    c.write_nbd(620 * BLOCK, &pattern(6, 16 << 10)).await?;
    c.check(
        "NBD overwrite of vhost-user-blk data",
        596 * BLOCK,
        64 << 10,
    )
    .await?;

    // And NVMe/TCP over vhost-user-blk's data, read through vhost-user-blk.
    c.write_nvme(610 * BLOCK, &pattern(7, 8192)).await?;
    c.check(
        "NVMe/TCP overwrite of vhost-user-blk data",
        600 * BLOCK,
        128 << 10,
    )
    .await?;

    // The whole volume, 128 KiB at a time (NVMe/TCP's largest transfer): every byte
    // the same through all three, including the never-written zeroes.
    let mut offset = 0;
    while offset < VOLUME_BYTES {
        c.check("whole volume", offset, 128 << 10).await?;
        offset += 128 << 10;
    }

    drop(c);
    d.handle.shutdown().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grown_volume_reaches_vhost_user_front_ends_with_and_without_a_backend_channel(
) -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    node_and_volume(&ch, "n1", VOLUME_BYTES).await?;
    let mut volumes = VolumesClient::new(ch.clone());
    let mut exports = ExportsClient::new(ch);
    let dir = d
        .config
        .vhost_user_blk
        .socket_dir
        .clone()
        .ok_or("no vhost-user-blk directory")?;
    for name in ["v-qemu", "v-old"] {
        let e = exports
            .add(export(
                proto::ExportType::VhostUserBlk,
                name,
                false,
                Vec::new(),
            ))
            .await?
            .into_inner();
        assert!(e.served, "{e:?}");
    }
    // "v-qemu" negotiates BACKEND_REQ as QEMU does; "v-old" is a front-end without it.
    let (mut qemu, mut old) = tokio::task::block_in_place(|| -> Res<(Virtio, Virtio)> {
        let mut qemu = Virtio::connect_with(&dir.join("v-qemu.sock"), true)?;
        let mut old = Virtio::connect_with(&dir.join("v-old.sock"), false)?;
        assert_eq!(qemu.capacity()?, VOLUME_BYTES / 512);
        assert_eq!(old.capacity()?, VOLUME_BYTES / 512);
        assert_eq!(qemu.take_notices(Duration::from_millis(50))?, 0);
        qemu.write(VOLUME_BYTES - BLOCK, &pattern(1, 4096))?;
        Ok((qemu, old))
    })?;

    let grown = 2 * VOLUME_BYTES;
    let t = Instant::now();
    volumes
        .resize(proto::ResizeVolumeRequest {
            name: "v".into(),
            size_bytes: grown,
        })
        .await?;
    // Notices ask for no reply: the resize does not wait for the front-end (which
    // answers nothing until it is polled below).
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the resize took {:?}",
        t.elapsed()
    );
    tokio::task::block_in_place(|| -> Res<()> {
        // The resize returns once the notices are out.
        assert_eq!(
            qemu.take_notices(Duration::from_secs(5))?,
            1,
            "one config-change notice"
        );
        assert_eq!(qemu.capacity()?, grown / 512, "GET_CONFIG after the notice");
        assert_eq!(old.capacity()?, grown / 512, "GET_CONFIG without a channel");
        // The grown range on the connections made before the resize: written through
        // one, read back through the other, and the old last block kept.
        let past = VOLUME_BYTES + 64 * BLOCK;
        qemu.write(past, &pattern(2, 64 << 10))?;
        assert_eq!(old.read(past, 64 << 10)?, pattern(2, 64 << 10));
        old.write(grown - BLOCK, &pattern(3, 4096))?;
        assert_eq!(qemu.read(grown - BLOCK, 4096)?, pattern(3, 4096));
        assert_eq!(old.read(VOLUME_BYTES - BLOCK, 4096)?, pattern(1, 4096));
        assert_eq!(qemu.take_notices(Duration::from_millis(50))?, 1, "no more");
        Ok(())
    })?;

    drop((qemu, old));
    d.handle.shutdown().await?;
    Ok(())
}
