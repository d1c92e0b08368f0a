//! Exports made through the control API are served by dpud's NVMe/TCP front-end: the
//! `nvmeof` host library connects to the address and subsystem NQN the API reports,
//! a host outside the export's allow-list is refused, data written over NVMe/TCP
//! reads back identically through an NBD export of the same volume (and the other
//! way), and a removed export is gone while the NBD one carries on. The protocol
//! itself is tested in engine/tests/nvme_tcp_frontend.rs.

mod common;

use bytes::Bytes;
use common::api::{export, node_and_volume};
use common::nbd;
use engine::api::proto;
use engine::api::proto::exports_client::ExportsClient;
use engine::api::testing::{connect_unix, TestDaemon};
use nvmeof::host::{Controller, HostConfig};
use tokio::net::UnixStream;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:12345678-0000-0000-0000-0000000000aa";

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
    node_and_volume(&ch, "n1", 4 << 20).await?;
    let mut exports = ExportsClient::new(ch);
    let e = exports
        .add(export(
            proto::ExportType::NvmeTcp,
            "v-nvme",
            false,
            vec![HOST.into()],
        ))
        .await?
        .into_inner();
    assert!(e.served, "{}", e.detail);
    assert_eq!(e.nvme_address, listen.to_string());
    assert_eq!(e.nvme_subnqn, "nqn.2026-11.io.dpu-offload:export:v-nvme");
    exports
        .add(export(proto::ExportType::Nbd, "v-nbd", false, Vec::new()))
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
    nbd::go_ok(&mut s, "v-nbd").await?;
    assert_eq!(
        nbd::request_ok(&mut s, 0, 16 * 4096, 64 * 1024, &[]).await?,
        a
    );
    // NBD -> NVMe/TCP.
    let b = pattern(2, 8192);
    nbd::request_ok(&mut s, 1, 1022 * 4096, 8192, &b).await?;
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
    assert_eq!(
        nbd::request_ok(&mut s, 0, 16 * 4096, 4096, &[]).await?,
        a[..4096]
    );
    drop((s, c, exports));
    d.handle.shutdown().await?;
    Ok(())
}
