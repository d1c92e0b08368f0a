//! The control API over its real Unix socket, around the engine's test double: every
//! refusal comes with the right gRPC code and a message that names the problem, and
//! the daemon's listeners and key file are deny-by-default.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

use common::api::expect_code;
use engine::api::proto;
use engine::api::proto::{
    exports_client::ExportsClient, nodes_client::NodesClient, profiles_client::ProfilesClient,
    volumes_client::VolumesClient,
};
use engine::api::service::{NodeAdminState, VolumeService};
use engine::api::testing::{connect_unix, MemoryVolumeService, TestDaemon};
use engine::daemon::{Config, DaemonError};
use tonic::Code;

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn node(name: &str, port: u16, domain: Option<&str>) -> proto::AddNodeRequest {
    proto::AddNodeRequest {
        name: name.into(),
        address: format!("127.0.0.1:{port}"),
        nqn: format!("nqn.2026-11.io.example:{name}"),
        domain: domain.map(str::to_owned),
        weight: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_code_and_reason() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let ch = connect_unix(d.handle.api_socket()).await?;
    let mut profiles = ProfilesClient::new(ch.clone());
    let mut nodes = NodesClient::new(ch.clone());
    let mut volumes = VolumesClient::new(ch.clone());
    let mut exports = ExportsClient::new(ch);

    // Profiles.
    expect_code(
        profiles
            .create(proto::CreateProfileRequest { source: None })
            .await,
        Code::InvalidArgument,
        "carries no profile",
    );
    let toml = |body: &str| proto::CreateProfileRequest {
        source: Some(proto::ProfileSource {
            source: Some(proto::profile_source::Source::Toml(body.into())),
        }),
    };
    expect_code(
        profiles
            .create(toml(
                "name = \"x\"\nprotection = \"none\"\nfailure_domain = \"node\"\n",
            ))
            .await,
        Code::InvalidArgument,
        "no schema_version",
    );
    expect_code(
        profiles
            .create(toml("schema_version = 1\nname = \"default\"\nprotection = \"none\"\nfailure_domain = \"node\"\n"))
            .await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_code(
        profiles
            .get(proto::GetProfileRequest { name: "zzz".into() })
            .await,
        Code::NotFound,
        "unknown profile \"zzz\"",
    );
    expect_code(
        profiles
            .delete(proto::DeleteProfileRequest { name: "zzz".into() })
            .await,
        Code::NotFound,
        "unknown profile",
    );
    let json = proto::UpdateProfileRequest {
        name: "scratch".into(),
        source: Some(proto::ProfileSource {
            source: Some(proto::profile_source::Source::Json(
                r#"{"schema_version":1,"name":"other","protection":"none","failure_domain":"node"}"#.into(),
            )),
        }),
    };
    expect_code(
        profiles.update(json).await,
        Code::InvalidArgument,
        "cannot be renamed",
    );

    // Nodes.
    expect_code(
        nodes.add(node("", 1, None)).await,
        Code::InvalidArgument,
        "node name \"\"",
    );
    expect_code(
        nodes.add(node("a", 0, None)).await,
        Code::InvalidArgument,
        "port",
    );
    expect_code(
        nodes.add(node("a", 1, Some("r1/r2"))).await,
        Code::InvalidArgument,
        "levels are rack/node",
    );
    nodes.add(node("a", 4420, Some("r1"))).await?;
    expect_code(
        nodes.add(node("a", 4421, None)).await,
        Code::AlreadyExists,
        "already registered",
    );
    let mut same = node("b", 4420, None);
    same.nqn = "nqn.2026-11.io.example:a".into();
    expect_code(
        nodes.add(same).await,
        Code::AlreadyExists,
        "already uses address",
    );
    nodes.add(node("b", 4422, Some("r1"))).await?;
    expect_code(
        nodes
            .drain(proto::DrainNodeRequest { name: "c".into() })
            .await,
        Code::NotFound,
        "no node named \"c\"",
    );
    nodes
        .remove(proto::RemoveNodeRequest { name: "b".into() })
        .await?;
    expect_code(
        nodes
            .drain(proto::DrainNodeRequest { name: "b".into() })
            .await,
        Code::FailedPrecondition,
        "cannot be drained",
    );
    let seen = d.service.nodes();
    assert_eq!(seen.len(), 2);
    assert_eq!(
        seen[1].state,
        NodeAdminState::Removed,
        "the engine got the removal"
    );

    // Volumes: one rack with an up node ("r1/a"; b is removed) is one failure domain.
    let create = |name: &str, profile: &str, size: u64| proto::CreateVolumeRequest {
        name: name.into(),
        profile: profile.into(),
        size_bytes: size,
    };
    expect_code(
        volumes.create(create("v", "nope", 4096)).await,
        Code::NotFound,
        "unknown profile \"nope\"",
    );
    expect_code(
        volumes.create(create("v", "fast", 4096)).await,
        Code::FailedPrecondition,
        "mirror:2 needs 2 failure domains at level node; the cluster has 1",
    );
    expect_code(
        volumes.create(create("v", "rack-mirror", 4096)).await,
        Code::FailedPrecondition,
        "mirror:3 needs 3 failure domains at level rack",
    );
    expect_code(
        volumes.create(create("v", "scratch", 4095)).await,
        Code::InvalidArgument,
        "multiple of 4096",
    );
    expect_code(
        volumes.create(create("v", "scratch", 0)).await,
        Code::InvalidArgument,
        "positive multiple",
    );
    expect_code(
        volumes.create(create("v", "", 4096)).await,
        Code::InvalidArgument,
        "needs a profile",
    );
    expect_code(
        volumes.create(create("a b", "scratch", 4096)).await,
        Code::InvalidArgument,
        "volume name",
    );
    let v = volumes
        .create(create("v", "scratch", 1 << 20))
        .await?
        .into_inner();
    assert_eq!(v.layout, "none");
    expect_code(
        volumes.create(create("v", "scratch", 1 << 20)).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_code(
        volumes
            .resize(proto::ResizeVolumeRequest {
                name: "v".into(),
                size_bytes: 4096,
            })
            .await,
        Code::InvalidArgument,
        "do not shrink",
    );
    expect_code(
        volumes
            .resize(proto::ResizeVolumeRequest {
                name: "w".into(),
                size_bytes: 1 << 21,
            })
            .await,
        Code::NotFound,
        "no volume named \"w\"",
    );
    expect_code(
        profiles
            .delete(proto::DeleteProfileRequest {
                name: "scratch".into(),
            })
            .await,
        Code::FailedPrecondition,
        "used by volume v",
    );

    // Exports.
    let add = |volume: &str, t: proto::ExportType, name: Option<&str>| proto::AddExportRequest {
        volume: volume.into(),
        r#type: t.into(),
        name: name.map(str::to_owned),
        read_only: false,
        allowed_hosts: Vec::new(),
    };
    expect_code(
        exports
            .add(add("v", proto::ExportType::Unspecified, None))
            .await,
        Code::InvalidArgument,
        "use nbd",
    );
    // vhost-user-blk is served on a socket under the configured directory.
    let e = exports
        .add(add("v", proto::ExportType::VhostUserBlk, Some("v-vhost")))
        .await
        .map(tonic::Response::into_inner);
    let e = e.expect("vhost-user-blk export");
    assert!(e.served && e.detail.contains("v-vhost.sock"), "{e:?}");
    exports
        .remove(proto::RemoveExportRequest {
            name: "v-vhost".into(),
        })
        .await
        .expect("remove the vhost-user-blk export");
    expect_code(
        exports
            .add(add("v", proto::ExportType::NvmeTcp, None))
            .await,
        Code::InvalidArgument,
        "needs at least one allowed host NQN",
    );
    let with_hosts = |t: proto::ExportType, hosts: &[&str]| proto::AddExportRequest {
        allowed_hosts: hosts.iter().map(|h| (*h).to_owned()).collect(),
        ..add("v", t, Some("v-nvme"))
    };
    expect_code(
        exports
            .add(with_hosts(proto::ExportType::NvmeTcp, &["not-an-nqn"]))
            .await,
        Code::InvalidArgument,
        "host NQN \"not-an-nqn\" is not valid",
    );
    expect_code(
        exports
            .add(with_hosts(proto::ExportType::Nbd, &["nqn.2014-08.a:b"]))
            .await,
        Code::InvalidArgument,
        "for nvme-tcp exports only",
    );
    expect_code(
        exports.add(add("w", proto::ExportType::Nbd, None)).await,
        Code::NotFound,
        "no volume named \"w\"",
    );
    expect_code(
        exports
            .add(add("v", proto::ExportType::Nbd, Some("x/y")))
            .await,
        Code::InvalidArgument,
        "export name",
    );
    exports.add(add("v", proto::ExportType::Nbd, None)).await?;
    expect_code(
        exports.add(add("v", proto::ExportType::Nbd, None)).await,
        Code::AlreadyExists,
        "already exists",
    );
    expect_code(
        volumes
            .delete(proto::DeleteVolumeRequest { name: "v".into() })
            .await,
        Code::FailedPrecondition,
        "in use by export v",
    );
    expect_code(
        exports
            .remove(proto::RemoveExportRequest { name: "zz".into() })
            .await,
        Code::NotFound,
        "no export named",
    );
    drop((profiles, nodes, volumes, exports));
    d.handle.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn api_socket_is_private_and_a_second_daemon_is_refused() -> TestResult {
    let dir = tempfile::tempdir()?;
    let d = TestDaemon::start(dir.path()).await?;
    let mode = std::fs::metadata(d.handle.api_socket())?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "socket mode {mode:o}");
    let kek = d.config.kek_path();
    let meta = std::fs::metadata(&kek)?;
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let data = std::fs::metadata(&d.config.data_dir)?.permissions().mode();
    assert_eq!(data & 0o777, 0o700);

    // The same configuration again: the live socket (or the locked store) refuses it.
    let second = engine::daemon::run(
        d.config.clone(),
        Arc::new(MemoryVolumeService::new(&d.config.cluster.levels)) as Arc<dyn VolumeService>,
    )
    .await;
    let e = second.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        e.contains("in use by another process") || e.contains("listens there"),
        "{e}"
    );
    d.handle.shutdown().await?;
    assert!(!d.config.api.socket.exists(), "socket removed at shutdown");
    Ok(())
}

#[tokio::test]
async fn key_file_and_listeners_are_deny_by_default() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut config = Config::for_tests(dir.path());
    // A key file others may read is refused.
    std::fs::create_dir_all(&config.data_dir)?;
    let kek = config.kek_path();
    std::fs::write(&kek, [7u8; 32])?;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o644))?;
    let service = || {
        Arc::new(MemoryVolumeService::new(&[
            "rack".to_owned(),
            "node".to_owned(),
        ])) as Arc<dyn VolumeService>
    };
    let e = engine::daemon::run(config.clone(), service()).await.err();
    assert!(
        matches!(&e, Some(DaemonError::Kek { problem, .. }) if problem.contains("chmod 600")),
        "{e:?}"
    );
    // A key of the wrong length is refused.
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600))?;
    std::fs::write(&kek, [7u8; 16])?;
    let e = engine::daemon::run(config.clone(), service()).await.err();
    assert!(
        matches!(&e, Some(DaemonError::Kek { problem, .. }) if problem.contains("16 bytes")),
        "{e:?}"
    );
    std::fs::write(&kek, [7u8; 32])?;
    // Non-loopback listeners need allow_remote.
    config.metrics.listen = Some("0.0.0.0:0".parse()?);
    let e = engine::daemon::run(config.clone(), service()).await.err();
    assert!(
        matches!(&e, Some(DaemonError::InvalidConfig(m)) if m.contains("allow_remote")),
        "{e:?}"
    );
    config.metrics.allow_remote = true;
    let d = engine::daemon::run(config.clone(), service()).await?;
    assert_eq!(
        std::fs::read(&kek)?,
        vec![7u8; 32],
        "an existing key is never rewritten"
    );
    d.shutdown().await?;
    Ok(())
}

#[tokio::test]
async fn the_control_api_also_listens_on_loopback_tcp_when_configured() -> TestResult {
    let dir = tempfile::tempdir()?;
    let mut config = Config::for_tests(dir.path());
    config.api.tcp = Some("127.0.0.1:0".parse()?);
    let d = TestDaemon::start_with(
        config,
        Arc::new(MemoryVolumeService::new(&[
            "rack".to_owned(),
            "node".to_owned(),
        ])),
    )
    .await?;
    let addr = d.handle.api_tcp().ok_or("no tcp")?;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect()
        .await?;
    let list = ProfilesClient::new(ch)
        .list(proto::ListProfilesRequest {})
        .await?
        .into_inner();
    assert!(list
        .profiles
        .iter()
        .any(|p| p.spec.as_ref().is_some_and(|s| s.name == "default")));
    d.handle.shutdown().await?;
    Ok(())
}
