//! Exports made through the control API are served by dpud's NBD front-end: a raw
//! NBD client (fixed newstyle, NBD_OPT_GO, simple replies) writes through one export
//! and reads through a read-only one, an unknown or removed export is refused, and the
//! NBD counters reach the metrics endpoint. Peers (nbdinfo, qemu-img, fio) are tested
//! against the NBD server itself in engine/tests/nbd_*.rs.

mod common;

use common::api::{export, node_and_volume};
use common::nbd;
use engine::api::proto;
use engine::api::proto::{exports_client::ExportsClient, volumes_client::VolumesClient};
use engine::api::testing::{connect_unix, TestDaemon};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_are_served_over_nbd() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let nbd_sock = d.handle.nbd_socket().ok_or("no NBD socket")?.to_owned();
    let ch = connect_unix(d.handle.api_socket()).await?;
    node_and_volume(&ch, "n1", 1 << 20).await?;
    let mut exports = ExportsClient::new(ch);
    let add = |name: &str, ro: bool| export(proto::ExportType::Nbd, name, ro, Vec::new());
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
    let (size, flags) = nbd::go_ok(&mut rw, "v").await?;
    assert_eq!(size, 1 << 20);
    assert_eq!(flags & 2, 0, "read-write export");
    let (err, _) = nbd::request(&mut rw, 1, 8192, 4096, &[0x5a; 4096]).await?;
    assert_eq!(err, 0);
    let mut ro = UnixStream::connect(&nbd_sock).await?;
    let (_, flags) = nbd::go_ok(&mut ro, "v-ro").await?;
    assert_ne!(flags & 2, 0, "NBD_FLAG_READ_ONLY on the read-only export");
    let (err, data) = nbd::request(&mut ro, 0, 8192, 4096, &[]).await?;
    assert_eq!(err, 0);
    assert_eq!(
        data,
        vec![0x5a; 4096],
        "the read-only export sees the write"
    );
    let (err, _) = nbd::request(&mut ro, 1, 0, 4096, &[1; 4096]).await?;
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
    let (size, _) = nbd::go_ok(&mut grown, "v").await?;
    assert_eq!(size, 2 << 20);
    let (err, data) = nbd::request(&mut grown, 0, 8192, 4096, &[]).await?;
    assert_eq!((err, data), (0, vec![0x5a; 4096]));
    // The grown space takes writes; the connection made before the resize carries on
    // (the volume grew in place, the export was not closed under it).
    let end = (2 << 20) - 4096;
    let (err, _) = nbd::request(&mut grown, 1, end, 4096, &[0x77; 4096]).await?;
    assert_eq!(err, 0, "write at the new end");
    let (err, data) = nbd::request(&mut grown, 0, end, 4096, &[]).await?;
    assert_eq!((err, data), (0, vec![0x77; 4096]));
    let (err, _) = nbd::request(&mut rw, 1, 12288, 4096, &[0x6b; 4096]).await?;
    assert_eq!(err, 0, "the pre-resize connection still writes");
    let (err, data) = nbd::request(&mut rw, 0, 8192, 8192, &[]).await?;
    assert_eq!(err, 0, "the pre-resize connection still reads");
    assert_eq!(data[..4096], [0x5a; 4096]);
    assert_eq!(data[4096..], [0x6b; 4096]);
    drop(grown);

    // Unknown and removed exports are refused.
    let mut c = UnixStream::connect(&nbd_sock).await?;
    assert!(nbd::go(&mut c, "nope").await?.is_err());
    drop(rw);
    exports
        .remove(proto::RemoveExportRequest { name: "v".into() })
        .await?;
    let mut c = UnixStream::connect(&nbd_sock).await?;
    assert!(
        nbd::go(&mut c, "v").await?.is_err(),
        "removed export no longer served"
    );
    drop((ro, c, exports));
    d.handle.shutdown().await?;
    assert!(!nbd_sock.exists(), "NBD socket removed at shutdown");
    Ok(())
}
