//! Exports made through the control API are served by dpud's NVMe/TCP front-end: the
//! `nvmeof` host library connects to the address and subsystem NQN the API reports,
//! a host outside the export's allow-list is refused, data written over NVMe/TCP
//! reads back identically through an NBD export of the same volume (and the other
//! way), and a removed export is gone while the NBD one carries on. The protocol
//! itself is tested in engine/tests/nvme_tcp_frontend.rs.

use bytes::Bytes;
use engine::api::proto;
use engine::api::proto::{
    exports_client::ExportsClient, nodes_client::NodesClient, volumes_client::VolumesClient,
};
use engine::api::testing::{connect_unix, TestDaemon};
use nvmeof::host::{Controller, HostConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-0000000000aa";

/// NBD fixed-newstyle handshake with NBD_OPT_GO for `name`.
async fn nbd_go(s: &mut UnixStream, name: &str) -> Res<()> {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await?;
    s.write_u32(3).await?;
    s.write_u64(0x4948_4156_454f_5054).await?;
    s.write_u32(7).await?;
    s.write_u32(u32::try_from(4 + name.len() + 2)?).await?;
    s.write_u32(u32::try_from(name.len())?).await?;
    s.write_all(name.as_bytes()).await?;
    s.write_u16(0).await?;
    loop {
        let _magic = s.read_u64().await?;
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut data).await?;
        if kind & (1 << 31) != 0 {
            return Err(format!("GO refused: {kind:#x}").into());
        }
        if kind == 1 {
            return Ok(());
        }
    }
}

/// One NBD request (0 read, 1 write); returns the read data.
async fn nbd(s: &mut UnixStream, cmd: u16, offset: u64, len: u32, data: &[u8]) -> Res<Vec<u8>> {
    s.write_u32(0x2560_9513).await?;
    s.write_u16(0).await?;
    s.write_u16(cmd).await?;
    s.write_u64(7).await?;
    s.write_u64(offset).await?;
    s.write_u32(len).await?;
    s.write_all(data).await?;
    assert_eq!(s.read_u32().await?, 0x6744_6698);
    let error = s.read_u32().await?;
    assert_eq!(s.read_u64().await?, 7);
    if error != 0 {
        return Err(format!("NBD error {error}").into());
    }
    let mut out = Vec::new();
    if cmd == 0 {
        out = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut out).await?;
    }
    Ok(out)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i * 31 + usize::from(seed) * 7) % 251).unwrap_or(0))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nvme_tcp_exports_through_the_api_share_data_with_nbd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let listen = d.handle.nvme_tcp().ok_or("no NVMe/TCP listener")?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    NodesClient::new(ch.clone())
        .add(proto::AddNodeRequest {
            name: "n1".into(),
            address: "127.0.0.1:4420".into(),
            nqn: "nqn.2026-11.io.example:n1".into(),
            domain: None,
            weight: None,
        })
        .await?;
    VolumesClient::new(ch.clone())
        .create(proto::CreateVolumeRequest {
            name: "v".into(),
            profile: "scratch".into(),
            size_bytes: 4 << 20,
        })
        .await?;
    let mut exports = ExportsClient::new(ch);
    let e = exports
        .add(proto::AddExportRequest {
            volume: "v".into(),
            r#type: proto::ExportType::NvmeTcp.into(),
            name: Some("v-nvme".into()),
            read_only: false,
            allowed_hosts: vec![HOST.into()],
        })
        .await?
        .into_inner();
    assert!(e.served, "{}", e.detail);
    assert_eq!(e.nvme_address, listen.to_string());
    assert_eq!(e.nvme_subnqn, "nqn.2026-11.io.dpu-offload:export:v-nvme");
    exports
        .add(proto::AddExportRequest {
            volume: "v".into(),
            r#type: proto::ExportType::Nbd.into(),
            name: Some("v-nbd".into()),
            read_only: false,
            allowed_hosts: Vec::new(),
        })
        .await?;

    let mut hc = HostConfig::new(e.nvme_address.parse()?, e.nvme_subnqn.clone());
    hc.hostnqn = HOST.into();
    hc.io_queues = 2;
    let c = Controller::connect(hc.clone()).await?;
    let ns = c.namespace(1).await?;
    assert_eq!((ns.block_size, ns.blocks), (4096, 1024));

    // NVMe/TCP -> NBD.
    let a = pattern(1, 64 * 1024);
    c.write(0, 1, 16, Bytes::from(a.clone()), false).await?;
    let mut s = UnixStream::connect(d.handle.nbd_socket().ok_or("no NBD socket")?).await?;
    nbd_go(&mut s, "v-nbd").await?;
    assert_eq!(nbd(&mut s, 0, 16 * 4096, 64 * 1024, &[]).await?, a);
    // NBD -> NVMe/TCP.
    let b = pattern(2, 8192);
    nbd(&mut s, 1, 1022 * 4096, 8192, &b).await?;
    assert_eq!(&c.read(1, 1, 1022, 2).await?[..], &b[..]);

    // A host outside the allow-list.
    let mut other = hc.clone();
    other.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-0000000000bb".into();
    let err = Controller::connect(other)
        .await
        .err()
        .ok_or("outsider got in")?;
    assert!(err.to_string().contains("connect invalid host"), "{err}");

    // Removing the NVMe/TCP export ends it; NBD carries on.
    exports
        .remove(proto::RemoveExportRequest {
            name: "v-nvme".into(),
        })
        .await?;
    let err = Controller::connect(hc)
        .await
        .err()
        .ok_or("removed export still served")?;
    assert!(
        err.to_string().contains("connect invalid parameters"),
        "{err}"
    );
    assert_eq!(nbd(&mut s, 0, 16 * 4096, 4096, &[]).await?, a[..4096]);
    drop((s, c, exports));
    d.handle.shutdown().await?;
    Ok(())
}
