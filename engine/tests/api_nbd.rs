//! Exports made through the control API are served by dpud's NBD front-end: a raw
//! NBD client (fixed newstyle, NBD_OPT_GO, simple replies) writes through one export
//! and reads through a read-only one, an unknown or removed export is refused, and the
//! NBD counters reach the metrics endpoint. Peers (nbdinfo, qemu-img, fio) are tested
//! against the NBD server itself in engine/tests/nbd_*.rs.

use engine::api::proto;
use engine::api::proto::{
    exports_client::ExportsClient, nodes_client::NodesClient, volumes_client::VolumesClient,
};
use engine::api::testing::{connect_unix, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type TestResult = Result<(), Box<dyn std::error::Error>>;
type Res<T> = Result<T, Box<dyn std::error::Error>>;

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake and NBD_OPT_GO; Ok((size, transmission flags)) or Err(reply type).
async fn go(s: &mut UnixStream, name: &str) -> Res<Result<(u64, u16), u32>> {
    let mut greet = [0u8; 18];
    s.read_exact(&mut greet).await?;
    assert_eq!(&greet[..8], b"NBDMAGIC");
    s.write_u32(3).await?; // fixed newstyle, no zeroes
    s.write_u64(IHAVEOPT).await?;
    s.write_u32(OPT_GO).await?;
    s.write_u32(u32::try_from(4 + name.len() + 2)?).await?;
    s.write_u32(u32::try_from(name.len())?).await?;
    s.write_all(name.as_bytes()).await?;
    s.write_u16(0).await?;
    let mut export = None;
    loop {
        let _magic = s.read_u64().await?;
        let _opt = s.read_u32().await?;
        let kind = s.read_u32().await?;
        let len = s.read_u32().await?;
        let mut data = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut data).await?;
        if kind & (1 << 31) != 0 {
            return Ok(Err(kind));
        }
        if kind == REP_INFO && data.len() == 12 && data[..2] == [0, 0] {
            let size = u64::from_be_bytes(data[2..10].try_into()?);
            let flags = u16::from_be_bytes(data[10..12].try_into()?);
            export = Some((size, flags));
        }
        if kind == REP_ACK {
            return Ok(Ok(export.ok_or("no NBD_INFO_EXPORT before ACK")?));
        }
    }
}

/// One request; returns (error, read data).
async fn request(
    s: &mut UnixStream,
    cmd: u16,
    offset: u64,
    len: u32,
    data: &[u8],
) -> Res<(u32, Vec<u8>)> {
    s.write_u32(REQUEST_MAGIC).await?;
    s.write_u16(0).await?;
    s.write_u16(cmd).await?;
    s.write_u64(42).await?;
    s.write_u64(offset).await?;
    s.write_u32(len).await?;
    s.write_all(data).await?;
    assert_eq!(s.read_u32().await?, SIMPLE_REPLY_MAGIC);
    let error = s.read_u32().await?;
    assert_eq!(s.read_u64().await?, 42);
    let mut out = Vec::new();
    if cmd == 0 && error == 0 {
        out = vec![0u8; usize::try_from(len)?];
        s.read_exact(&mut out).await?;
    }
    Ok((error, out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_served_over_nbd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let nbd_sock = d.handle.nbd_socket().ok_or("no NBD socket")?.to_owned();
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
            size_bytes: 1 << 20,
        })
        .await?;
    let mut exports = ExportsClient::new(ch);
    let add = |name: &str, ro: bool| proto::AddExportRequest {
        volume: "v".into(),
        r#type: proto::ExportType::Nbd.into(),
        name: Some(name.into()),
        read_only: ro,
        allowed_hosts: Vec::new(),
    };
    let e = exports.add(add("v", false)).await?.into_inner();
    assert!(e.served, "{}", e.detail);
    assert!(
        e.detail
            .contains(&format!("nbd+unix:///v?socket={}", nbd_sock.display())),
        "{}",
        e.detail
    );
    exports.add(add("v-ro", true)).await?;

    let mut rw = UnixStream::connect(&nbd_sock).await?;
    let (size, flags) = go(&mut rw, "v")
        .await?
        .map_err(|t| format!("GO refused: {t:#x}"))?;
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & 2, 0, "read-write export");
    let (err, _) = request(&mut rw, 1, 8192, 4096, &[0x5a; 4096]).await?;
    assert_eq!(err, 0);
    let mut ro = UnixStream::connect(&nbd_sock).await?;
    let (_, flags) = go(&mut ro, "v-ro")
        .await?
        .map_err(|t| format!("GO refused: {t:#x}"))?;
    assert_ne!(flags & 2, 0, "NBD_FLAG_READ_ONLY on the read-only export");
    let (err, data) = request(&mut ro, 0, 8192, 4096, &[]).await?;
    assert_eq!(err, 0);
    assert_eq!(
        data,
        vec![0x5a; 4096],
        "the read-only export sees the write"
    );
    let (err, _) = request(&mut ro, 1, 0, 4096, &[1; 4096]).await?;
    assert_ne!(err, 0, "a write to the read-only export fails");

    // The NBD counters reach /metrics.
    let addr = d.handle.metrics_addr().ok_or("no metrics")?;
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    assert!(
        body.contains("dpud_nbd_written_bytes_total{export=\"v\"} 4096"),
        "{body}"
    );
    assert!(
        body.contains("dpud_nbd_read_bytes_total{export=\"v-ro\"} 4096"),
        "{body}"
    );
    assert!(
        body.contains("dpud_nbd_connections{export=\"v\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("dpud_volume_writes_total{volume=\"v\"} 1"),
        "{body}"
    );

    // A resized volume: a new connection sees the new size and the old bytes.
    VolumesClient::new(connect_unix(d.handle.api_socket()).await?)
        .resize(proto::ResizeVolumeRequest {
            name: "v".into(),
            size_bytes: 2 << 20,
        })
        .await?;
    let mut grown = UnixStream::connect(&nbd_sock).await?;
    let (size, _) = go(&mut grown, "v")
        .await?
        .map_err(|t| format!("GO refused: {t:#x}"))?;
    assert_eq!(size, 2 << 20);
    let (err, data) = request(&mut grown, 0, 8192, 4096, &[]).await?;
    assert_eq!((err, data), (0, vec![0x5a; 4096]));
    // The grown space takes writes; the connection made before the resize carries on
    // (the volume grew in place, the export was not closed under it).
    let end = (2 << 20) - 4096;
    let (err, _) = request(&mut grown, 1, end, 4096, &[0x77; 4096]).await?;
    assert_eq!(err, 0, "write at the new end");
    let (err, data) = request(&mut grown, 0, end, 4096, &[]).await?;
    assert_eq!((err, data), (0, vec![0x77; 4096]));
    let (err, _) = request(&mut rw, 1, 12288, 4096, &[0x6b; 4096]).await?;
    assert_eq!(err, 0, "the pre-resize connection still writes");
    let (err, data) = request(&mut rw, 0, 8192, 8192, &[]).await?;
    assert_eq!(err, 0, "the pre-resize connection still reads");
    assert_eq!(data[..4096], [0x5a; 4096]);
    assert_eq!(data[4096..], [0x6b; 4096]);
    drop(grown);

    // Unknown and removed exports are refused.
    let mut c = UnixStream::connect(&nbd_sock).await?;
    assert!(go(&mut c, "nope").await?.is_err());
    drop(rw);
    exports
        .remove(proto::RemoveExportRequest { name: "v".into() })
        .await?;
    let mut c = UnixStream::connect(&nbd_sock).await?;
    assert!(
        go(&mut c, "v").await?.is_err(),
        "removed export no longer served"
    );
    drop((ro, c, exports));
    d.handle.shutdown().await?;
    assert!(!nbd_sock.exists(), "NBD socket removed at shutdown");
    Ok(())
}
