//! Exports made through the control API are served by dpud's NVMe/TCP front-end: the
//! `nvmeof` host library connects to the address and subsystem NQN the API reports,
//! a host outside the export's allow-list is refused, data written over NVMe/TCP
//! reads back identically through an NBD export of the same volume (and the other
//! way), and a removed export is gone while the NBD one carries on. A volume grown
//! with `volume resize` while a host is connected is announced to it with a
//! Namespace Attribute Changed event, after which Identify Namespace reports the new
//! size and the grown space takes I/O on the same association. The protocol itself
//! is tested in engine/tests/nvme_tcp_frontend.rs.

use std::time::Duration;

mod common;

use bytes::Bytes;
use common::api::{export, node_and_volume};
use common::nbd;
use engine::api::proto;
use engine::api::proto::{exports_client::ExportsClient, volumes_client::VolumesClient};
use engine::api::testing::{connect_unix, TestDaemon};
use nvmeof::host::{Controller, HostConfig};
use nvmeof::nvme::{AdminCommand, Feature, IdentifyCns, IdentifyNamespace, IoCommand, LogPageId};
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

/// Identify Namespace 1 now (the host library keeps the size it saw at connect).
async fn identify_blocks(c: &Controller) -> Result<u64, Box<dyn std::error::Error>> {
    let r = c
        .admin(
            AdminCommand::Identify {
                cns: IdentifyCns::NAMESPACE,
                nsid: 1,
                cntid: 0,
            },
            Bytes::new(),
            4096,
        )
        .await?;
    Ok(IdentifyNamespace::decode(&r.data)?.nsze)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn growing_an_exported_volume_notifies_nvme_tcp_hosts() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    node_and_volume(&ch, "n1", 4 << 20).await?;
    let mut volumes = VolumesClient::new(ch.clone());
    let e = ExportsClient::new(ch)
        .add(export(
            proto::ExportType::NvmeTcp,
            "v-nvme",
            false,
            vec![HOST.into()],
        ))
        .await?
        .into_inner();
    assert!(e.served, "{}", e.detail);
    let mut hc = HostConfig::new(e.nvme_address.parse()?, e.nvme_subnqn.clone());
    hc.hostnqn = HOST.into();
    let c = Controller::connect(hc.clone()).await?;
    assert_eq!(c.namespace(1).await?.blocks, 1024);
    assert_ne!(c.identify().await?.oaes & (1 << 8), 0, "OAES bit 8");
    // What the Linux host does: enable the notices it supports, post an AER.
    c.admin(
        AdminCommand::SetFeatures {
            nsid: 0,
            save: false,
            feature: Feature::AsyncEventConfig { mask: 1 << 8 },
        },
        Bytes::new(),
        0,
    )
    .await?;
    let aer = {
        let c = c.clone();
        tokio::spawn(async move {
            c.admin(AdminCommand::AsyncEventRequest, Bytes::new(), 0)
                .await
        })
    };
    let old = pattern(3, 8192);
    c.write(0, 1, 1022, Bytes::from(old.clone()), false).await?;

    volumes
        .resize(proto::ResizeVolumeRequest {
            name: "v".into(),
            size_bytes: 6 << 20,
        })
        .await?;
    let r = tokio::time::timeout(Duration::from_secs(10), aer).await???;
    assert_eq!(
        r.cqe.dw0, 0x0004_0002,
        "Notice: Namespace Attribute Changed, log page 04h"
    );
    let log = c
        .admin(
            AdminCommand::GetLogPage {
                nsid: 0xFFFF_FFFF,
                lid: LogPageId::CHANGED_NAMESPACES,
                lsp: 0,
                rae: false,
                numd: 1023,
                offset: 0,
            },
            Bytes::new(),
            4096,
        )
        .await?;
    assert_eq!(log.data[..8], [1, 0, 0, 0, 0, 0, 0, 0], "nsid 1 changed");
    assert_eq!(identify_blocks(&c).await?, 1536);

    // The grown space takes I/O on the same association; the old data is intact.
    let new = pattern(4, 16384);
    let write = IoCommand::Write {
        nsid: 1,
        slba: 1024,
        nlb: 3,
        fua: false,
    };
    c.io_raw(0, write, Bytes::from(new.clone()), 0).await?;
    let read = IoCommand::Read {
        nsid: 1,
        slba: 1022,
        nlb: 5,
        fua: false,
    };
    let back = c.io_raw(0, read, Bytes::new(), 24576).await?.data;
    assert!(
        back[..8192] == old[..],
        "the data before the old end is intact"
    );
    assert!(
        back[8192..] == new[..],
        "the grown space reads back what was written"
    );
    // A host connecting now sees the new size from the start.
    let c2 = Controller::connect(hc).await?;
    assert_eq!(c2.namespace(1).await?.blocks, 1536);
    assert!(
        c2.read(0, 1, 1026, 2).await?[..] == new[8192..],
        "a new host reads it too"
    );
    drop((c, c2));
    d.handle.shutdown().await?;
    Ok(())
}
