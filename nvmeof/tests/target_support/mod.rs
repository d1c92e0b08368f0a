//! A deliberately low-level NVMe/TCP client for the target tests: it speaks PDUs
//! through the crate's codec but builds every command by hand, so tests can also send
//! what a well-behaved host never would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use nvmeof::backend::MemoryBackend;
use nvmeof::nvme::{
    property, AdminCommand, Completion, ConnectData, FabricsCommand, IdentifyCns, PropertySize,
    Sgl, Status, StatusCode, SubmissionEntry,
};
use nvmeof::target::{NamespaceConfig, SubsystemConfig, Target, TargetConfig};
use nvmeof::tcp::{
    CapsuleCmd, ConnectionParams, FrameError, H2CData, IcReq, Pdu, PduReader, PduWriter, Role,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

pub const SUBNQN: &str = "nqn.2026-11.io.test:sub1";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555";
pub const OTHER_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555";
pub const HOSTID: [u8; 16] = [7; 16];
pub const NS_BYTES: u64 = 16 << 20;

/// A target with one subsystem (one 16 MiB memory namespace, 512-byte blocks)
/// allowing HOSTNQN only.
pub async fn start_target() -> Target {
    start_target_with(|c| c).await
}

pub async fn start_target_with(f: impl FnOnce(TargetConfig) -> TargetConfig) -> Target {
    let mem = Arc::new(MemoryBackend::new(NS_BYTES, 512).unwrap());
    let sub = SubsystemConfig::new(SUBNQN)
        .namespace(NamespaceConfig::new(mem).id_seed("mem0"))
        .allow_host(HOSTNQN);
    let cfg = TargetConfig::new("127.0.0.1:0".parse().unwrap()).subsystem(sub);
    Target::start(f(cfg)).await.unwrap()
}

pub struct Client {
    pub r: PduReader<OwnedReadHalf>,
    pub w: PduWriter<OwnedWriteHalf>,
    pub p: ConnectionParams,
    pub maxh2cdata: u32,
    next_cid: u16,
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        Self::connect_digests(addr, false, false).await
    }

    pub async fn connect_digests(addr: SocketAddr, hdgst: bool, ddgst: bool) -> Client {
        let s = TcpStream::connect(addr).await.unwrap();
        let (r, w) = nvmeof::tcp::split(s).unwrap();
        let mut c = Client {
            r,
            w,
            p: ConnectionParams::initial(Role::Host),
            maxh2cdata: 0,
            next_cid: 1,
        };
        let req = IcReq {
            pfv: 0,
            hpda: 0,
            hdgst,
            ddgst,
            maxr2t: 0,
        };
        c.w.write_pdu(&Pdu::IcReq(req), &c.p).await.unwrap();
        let resp = match c.recv().await {
            Pdu::IcResp(r) => r,
            other => panic!("expected ICResp, got {other:?}"),
        };
        assert_eq!(resp.cpda, 0);
        assert_eq!(
            (resp.hdgst, resp.ddgst),
            (hdgst, ddgst),
            "digests granted as asked"
        );
        c.maxh2cdata = resp.maxh2cdata;
        c.p = ConnectionParams::negotiated(Role::Host, &req, &resp, 1 << 20);
        c
    }

    /// A client over an already-split stream (no ICReq sent).
    pub fn from_parts(
        r: PduReader<OwnedReadHalf>,
        w: PduWriter<OwnedWriteHalf>,
        p: ConnectionParams,
    ) -> Client {
        Client {
            r,
            w,
            p,
            maxh2cdata: 0,
            next_cid: 1,
        }
    }

    pub fn cid(&mut self) -> u16 {
        let c = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        c
    }

    pub async fn send(&mut self, pdu: Pdu) {
        self.w.write_pdu(&pdu, &self.p).await.unwrap();
    }

    pub async fn try_recv(&mut self) -> Result<Pdu, FrameError> {
        tokio::time::timeout(TIMEOUT, self.r.read_pdu(&self.p))
            .await
            .expect("timed out")
    }

    pub async fn recv(&mut self) -> Pdu {
        self.try_recv().await.unwrap()
    }

    /// Receive until the completion for `cid` (collecting C2H data for it).
    pub async fn wait(&mut self, cid: u16) -> (Completion, Vec<u8>) {
        let mut data = Vec::new();
        loop {
            match self.recv().await {
                Pdu::CapsuleResp(r) if r.cqe.cid == cid => return (r.cqe, data),
                Pdu::C2HData(d) if d.cccid == cid => {
                    assert_eq!(usize::try_from(d.datao).unwrap(), data.len());
                    data.extend_from_slice(&d.data);
                    if d.success {
                        let mut cqe = Completion::new(cid, Status::SUCCESS);
                        cqe.sqid = 0xFFFF;
                        return (cqe, data);
                    }
                }
                other => panic!("unexpected PDU while waiting for {cid}: {other:?}"),
            }
        }
    }

    /// Send a command with optional in-capsule data; `c2h` = buffer length for
    /// controller-to-host data.
    pub async fn submit(&mut self, mut sqe: SubmissionEntry, data: Option<Bytes>, c2h: u32) -> u16 {
        let cid = self.cid();
        sqe.cid = cid;
        let data = match data {
            Some(d) => {
                sqe.dptr = Sgl::in_capsule(u32::try_from(d.len()).unwrap());
                d
            }
            None => {
                sqe.dptr = Sgl::transport(c2h);
                Bytes::new()
            }
        };
        self.send(Pdu::CapsuleCmd(CapsuleCmd { sqe, data })).await;
        cid
    }

    pub async fn exec(
        &mut self,
        sqe: SubmissionEntry,
        data: Option<Bytes>,
        c2h: u32,
    ) -> (Completion, Vec<u8>) {
        let cid = self.submit(sqe, data, c2h).await;
        self.wait(cid).await
    }

    pub async fn fabrics_connect(
        &mut self,
        subnqn: &str,
        hostnqn: &str,
        qid: u16,
        sqsize: u16,
        cntlid: u16,
        kato_ms: u32,
    ) -> Completion {
        let sqe = FabricsCommand::Connect {
            recfmt: 0,
            qid,
            sqsize,
            cattr: 0,
            kato_ms,
        }
        .to_sqe(0);
        let cd = ConnectData {
            hostid: HOSTID,
            cntlid,
            subnqn: subnqn.into(),
            hostnqn: hostnqn.into(),
        };
        self.exec(sqe, Some(Bytes::copy_from_slice(&cd.encode())), 0)
            .await
            .0
    }

    pub async fn prop_get(&mut self, offset: u32, size: PropertySize) -> u64 {
        let sqe = FabricsCommand::PropertyGet { size, offset }.to_sqe(0);
        let (c, _) = self.exec(sqe, None, 0).await;
        assert!(
            c.status.is_success(),
            "property get {offset:#x}: {}",
            c.status
        );
        c.result64()
    }

    pub async fn prop_set(&mut self, offset: u32, value: u32) -> Completion {
        let sqe = FabricsCommand::PropertySet {
            size: PropertySize::Four,
            offset,
            value: value.into(),
        }
        .to_sqe(0);
        self.exec(sqe, None, 0).await.0
    }

    /// Admin Connect + enable; returns the controller id.
    pub async fn admin_setup(&mut self, subnqn: &str, kato_ms: u32) -> u16 {
        let c = self
            .fabrics_connect(subnqn, HOSTNQN, 0, 31, 0xFFFF, kato_ms)
            .await;
        assert!(c.status.is_success(), "admin connect: {}", c.status);
        let cntlid = u16::try_from(c.dw0 & 0xFFFF).unwrap();
        let cc = 1 | (6 << 16) | (4 << 20);
        assert!(self.prop_set(property::CC, cc).await.status.is_success());
        let csts = self.prop_get(property::CSTS, PropertySize::Four).await;
        assert_eq!(csts & 1, 1, "CSTS.RDY after enable");
        cntlid
    }

    pub async fn identify(&mut self, cns: IdentifyCns, nsid: u32) -> (Completion, Vec<u8>) {
        let sqe = AdminCommand::Identify {
            cns,
            nsid,
            cntid: 0,
        }
        .to_sqe(0);
        self.exec(sqe, None, 4096).await
    }

    /// Write through R2T: send the command without data and answer the R2T with
    /// H2CData PDUs of at most `chunk` bytes.
    pub async fn write_r2t(
        &mut self,
        mut sqe: SubmissionEntry,
        data: &[u8],
        chunk: usize,
    ) -> Completion {
        let cid = self.cid();
        sqe.cid = cid;
        sqe.dptr = Sgl::transport(u32::try_from(data.len()).unwrap());
        self.send(Pdu::CapsuleCmd(CapsuleCmd {
            sqe,
            data: Bytes::new(),
        }))
        .await;
        loop {
            match self.recv().await {
                Pdu::R2T(r) => {
                    assert_eq!(r.cccid, cid);
                    let start = usize::try_from(r.r2to).unwrap();
                    let end = start + usize::try_from(r.r2tl).unwrap();
                    let mut off = start;
                    while off < end {
                        let n = chunk.min(end - off);
                        let d = H2CData {
                            cccid: cid,
                            ttag: r.ttag,
                            datao: u32::try_from(off).unwrap(),
                            last: off + n == end,
                            data: Bytes::copy_from_slice(&data[off..off + n]),
                        };
                        self.send(Pdu::H2CData(d)).await;
                        off += n;
                    }
                }
                Pdu::CapsuleResp(r) if r.cqe.cid == cid => return r.cqe,
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Expect the target to end the connection (after an optional C2HTermReq).
    pub async fn expect_closed(&mut self) -> Option<nvmeof::tcp::TermReq> {
        let mut term = None;
        loop {
            match self.try_recv().await {
                Ok(Pdu::C2HTermReq(t)) => term = Some(t),
                Ok(other) => panic!("unexpected {other:?} before close"),
                Err(FrameError::Closed) => return term,
                Err(e) => panic!("unexpected error {e}"),
            }
        }
    }
}

/// Admin connection + I/O queue 1, ready for I/O.
pub async fn io_pair(addr: SocketAddr) -> (Client, Client, u16) {
    let mut a = Client::connect(addr).await;
    let cntlid = a.admin_setup(SUBNQN, 0).await;
    let mut q = Client::connect(addr).await;
    let c = q.fabrics_connect(SUBNQN, HOSTNQN, 1, 127, cntlid, 0).await;
    assert!(c.status.is_success(), "io connect: {}", c.status);
    (a, q, cntlid)
}

pub fn sc(c: &Completion) -> StatusCode {
    c.status.code
}
