//! The local store keeps profiles, nodes and exports across a daemon restart, and the
//! daemon hands them back to the engine and the front-ends at start. Volumes are not
//! stored locally (they live on the nodes), so the restart reuses the engine's state.

mod common;

use std::sync::Arc;

use common::api::export;
use engine::api::proto;
use engine::api::proto::{
    exports_client::ExportsClient, nodes_client::NodesClient, profiles_client::ProfilesClient,
    volumes_client::VolumesClient,
};
use engine::api::testing::{connect_unix, TestDaemon};
use engine::store::{ExportKind, Store};

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_nodes_and_exports_survive_a_restart() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let service = Arc::clone(&d.service);
    let config = d.config.clone();
    {
        let ch = connect_unix(d.handle.api_socket()).await?;
        let mut profiles = ProfilesClient::new(ch.clone());
        let mut nodes = NodesClient::new(ch.clone());
        let mut volumes = VolumesClient::new(ch.clone());
        let mut exports = ExportsClient::new(ch);
        profiles
            .create(proto::CreateProfileRequest {
                source: Some(proto::ProfileSource {
                    source: Some(proto::profile_source::Source::Spec(proto::ProfileSpec {
                        name: "gold".into(),
                        protection: "mirror:2".into(),
                        failure_domain: "rack".into(),
                        compression: Some("zstd:5".into()),
                        ..Default::default()
                    })),
                }),
            })
            .await?;
        profiles
            .delete(proto::DeleteProfileRequest {
                name: "scratch".into(),
            })
            .await?;
        for (i, rack) in ["r1", "r2"].iter().enumerate() {
            nodes
                .add(proto::AddNodeRequest {
                    name: format!("n{i}"),
                    address: format!("127.0.0.1:{}", 4420 + i),
                    nqn: format!("nqn.2026-11.io.example:n{i}"),
                    domain: Some((*rack).into()),
                    weight: Some(2),
                })
                .await?;
        }
        nodes
            .drain(proto::DrainNodeRequest { name: "n1".into() })
            .await?;
        nodes
            .add(proto::AddNodeRequest {
                name: "n2".into(),
                address: "127.0.0.1:4430".into(),
                nqn: "nqn.2026-11.io.example:n2".into(),
                domain: Some("r3".into()),
                weight: None,
            })
            .await?;
        volumes
            .create(proto::CreateVolumeRequest {
                name: "v".into(),
                profile: "gold".into(),
                size_bytes: 1 << 20,
            })
            .await?;
        exports
            .add(export(proto::ExportType::Nbd, "v-ro", true, Vec::new()))
            .await?;
        exports
            .add(export(
                proto::ExportType::NvmeTcp,
                "v-nvme",
                false,
                vec!["nqn.2014-08.org.nvmexpress:uuid:1".into()],
            ))
            .await?;
    }
    let before = service.nodes();
    d.handle.shutdown().await?;
    assert!(service.was_shut_down());

    // The file on its own holds what was written.
    {
        let store = Store::open(&config.store_path())?;
        let gold = store.profile("gold")?.ok_or("gold missing")?;
        assert_eq!(gold.compression.to_string(), "zstd:5");
        assert!(store.profile("scratch")?.is_none(), "deleted stays deleted");
        assert_eq!(store.nodes()?, before);
        let e = store.export("v-ro")?.ok_or("export missing")?;
        assert_eq!(
            (e.volume.as_str(), e.kind, e.read_only),
            ("v", ExportKind::Nbd, true)
        );
        let e = store.export("v-nvme")?.ok_or("nvme export missing")?;
        assert_eq!(e.kind, ExportKind::NvmeTcp);
        assert_eq!(e.allowed_hosts, vec!["nqn.2014-08.org.nvmexpress:uuid:1"]);
    }

    // A restarted daemon gives the engine the same node list and lists the same objects.
    let calls = service.set_nodes_calls();
    let d = TestDaemon::start_with(config, Arc::clone(&service)).await?;
    assert_eq!(service.set_nodes_calls(), calls + 1);
    assert_eq!(service.nodes(), before);
    let ch = connect_unix(d.handle.api_socket()).await?;
    let nodes = NodesClient::new(ch.clone())
        .list(proto::ListNodesRequest {})
        .await?
        .into_inner()
        .nodes;
    let states: Vec<(String, i32)> = nodes.iter().map(|n| (n.name.clone(), n.state)).collect();
    assert_eq!(
        states,
        vec![
            ("n0".into(), proto::NodeState::Up.into()),
            ("n1".into(), proto::NodeState::Draining.into()),
            ("n2".into(), proto::NodeState::Up.into()),
        ]
    );
    let exports = ExportsClient::new(ch.clone())
        .list(proto::ListExportsRequest {})
        .await?
        .into_inner()
        .exports;
    assert_eq!(exports.len(), 2);
    assert!(exports[1].read_only);
    // The NVMe/TCP export is served again after the restart, with its allow-list.
    assert_eq!(exports[0].name, "v-nvme");
    assert!(exports[0].served, "{}", exports[0].detail);
    assert_eq!(
        exports[0].allowed_hosts,
        vec!["nqn.2014-08.org.nvmexpress:uuid:1"]
    );
    assert_eq!(
        exports[0].nvme_subnqn,
        "nqn.2026-11.io.dpu-offload:export:v-nvme"
    );
    let v = VolumesClient::new(ch)
        .get(proto::GetVolumeRequest { name: "v".into() })
        .await?
        .into_inner();
    assert_eq!(v.exports, vec!["v-nvme".to_owned(), "v-ro".to_owned()]);
    d.handle.shutdown().await?;
    Ok(())
}
