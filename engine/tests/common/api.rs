//! The control API as the api_* tests drive it: one node and one volume "v" to
//! export, export requests, and checking a refusal.

use engine::api::proto;
use engine::api::proto::{nodes_client::NodesClient, volumes_client::VolumesClient};
use tonic::transport::Channel;
use tonic::Code;

type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Adds node `node` (at 127.0.0.1:4420, NQN `nqn.2026-11.io.example:<node>`) and
/// creates volume "v" of `size_bytes` with the "scratch" profile.
pub async fn node_and_volume(ch: &Channel, node: &str, size_bytes: u64) -> Res<()> {
    NodesClient::new(ch.clone())
        .add(proto::AddNodeRequest {
            name: node.into(),
            address: "127.0.0.1:4420".into(),
            nqn: format!("nqn.2026-11.io.example:{node}"),
            domain: None,
            weight: None,
        })
        .await?;
    VolumesClient::new(ch.clone())
        .create(proto::CreateVolumeRequest {
            name: "v".into(),
            profile: "scratch".into(),
            size_bytes,
        })
        .await?;
    Ok(())
}

/// A request to export volume "v" as `name`.
pub fn export(
    kind: proto::ExportType,
    name: &str,
    read_only: bool,
    allowed_hosts: Vec<String>,
) -> proto::AddExportRequest {
    proto::AddExportRequest {
        volume: "v".into(),
        r#type: kind.into(),
        name: Some(name.into()),
        read_only,
        allowed_hosts,
    }
}

/// Asserts that `r` is refused with `code` and a message containing `needle`.
pub fn expect_code<T: std::fmt::Debug>(r: Result<T, tonic::Status>, code: Code, needle: &str) {
    match r {
        Ok(v) => panic!("expected {code:?} ({needle}), got {v:?}"),
        Err(s) => {
            assert_eq!(s.code(), code, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        }
    }
}
