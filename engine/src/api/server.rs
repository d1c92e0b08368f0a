//! The control API's request handling: validation, the store, the engine, the
//! front-ends. See the parent module for the rules.

use std::fmt;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::frontend::BlockDevice;
use crate::store::{ExportKind, ExportRecord, Store, StoreError};

use super::proto;
use super::service::{
    cluster_map, ClusterStatus, NodeAdminState, NodeSpec, ServiceError, VolumeInfo, VolumeService,
    VolumeState,
};

/// Logical block size every volume size must be a multiple of.
const SIZE_UNIT: u64 = 4096;

/// The one error type of the control API; each variant is one gRPC status code.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong in itself.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named object does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is valid but the current state refuses it.
    #[error("{0}")]
    FailedPrecondition(String),
    /// In the API, not in this build yet.
    #[error("{0}")]
    Unimplemented(String),
    /// The engine refused or failed.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The local store failed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A bug.
    #[error("{0}")]
    Internal(String),
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Self {
        let msg = e.to_string();
        match e {
            ApiError::InvalidArgument(_) => Self::invalid_argument(msg),
            ApiError::NotFound(_) => Self::not_found(msg),
            ApiError::AlreadyExists(_) => Self::already_exists(msg),
            ApiError::FailedPrecondition(_) => Self::failed_precondition(msg),
            ApiError::Unimplemented(_) => Self::unimplemented(msg),
            ApiError::Service(s) => s.into(),
            ApiError::Store(_) | ApiError::Internal(_) => {
                tracing::error!(error = %msg, "control API internal error");
                Self::internal(msg)
            }
        }
    }
}

/// Whether a front-end serves an export now, and where or why not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedState {
    /// Served now.
    pub served: bool,
    /// Where to reach it, or why it is not served.
    pub detail: String,
}

/// The front-ends that serve exports; the daemon implements this over its NBD server.
pub trait Frontends: Send + Sync + fmt::Debug {
    /// Starts serving `export` from `device`.
    fn serve(&self, export: &ExportRecord, device: Arc<dyn BlockDevice>) -> Result<(), String>;
    /// Stops serving the export `name` (nothing if it is not served).
    fn unserve(&self, name: &str);
    /// Whether and where `export` is served.
    fn state(&self, export: &ExportRecord) -> ServedState;
    /// For an NVMe/TCP export being served: the listener (`host:port`) and the
    /// subsystem NQN a host connects to.
    fn nvme_target(&self, _export: &ExportRecord) -> Option<(String, String)> {
        None
    }
    /// The volume `volume` grew: tell the clients of its exports that can hear it (a
    /// vhost-user-blk config-change notice; an NVMe/TCP Namespace Attribute Changed
    /// event). May block briefly (socket writes); the control plane calls it off the
    /// async threads.
    fn volume_grown(&self, _volume: &str) {}
}

/// The control plane's state: the store, the engine and the front-ends.
#[derive(Debug)]
pub struct ControlPlane {
    store: Arc<Store>,
    service: Arc<dyn VolumeService>,
    frontends: Arc<dyn Frontends>,
    levels: Vec<String>,
    changes: tokio::sync::Mutex<()>,
}

fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ApiError::InvalidArgument(format!(
            "{what} name {name:?} is not valid: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit"
        )))
    }
}

fn check_size(size_bytes: u64) -> Result<(), ApiError> {
    if size_bytes == 0 || size_bytes % SIZE_UNIT != 0 {
        return Err(ApiError::InvalidArgument(format!(
            "size {size_bytes} bytes is not valid: a volume's size is a positive multiple of {SIZE_UNIT} bytes (such as 10GiB)"
        )));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("store task failed: {e}")))?
        .map_err(ApiError::from)
}

fn volume_state(s: VolumeState) -> proto::VolumeState {
    match s {
        VolumeState::Healthy => proto::VolumeState::Healthy,
        VolumeState::Degraded => proto::VolumeState::Degraded,
        VolumeState::Rebuilding => proto::VolumeState::Rebuilding,
    }
}

fn node_state(s: NodeAdminState) -> proto::NodeState {
    match s {
        NodeAdminState::Up => proto::NodeState::Up,
        NodeAdminState::Draining => proto::NodeState::Draining,
        NodeAdminState::Removed => proto::NodeState::Removed,
    }
}

fn export_kind(t: i32) -> Result<ExportKind, ApiError> {
    match proto::ExportType::try_from(t) {
        Ok(proto::ExportType::Nbd) => Ok(ExportKind::Nbd),
        Ok(proto::ExportType::VhostUserBlk) => Ok(ExportKind::VhostUserBlk),
        Ok(proto::ExportType::NvmeTcp) => Ok(ExportKind::NvmeTcp),
        Ok(proto::ExportType::Unspecified) | Err(_) => Err(ApiError::InvalidArgument(format!(
            "export type {t} is not valid: use nbd, vhost-user-blk or nvme-tcp"
        ))),
    }
}

/// NVMe/TCP exports are deny-by-default: they need at least one host NQN, each
/// one a valid NQN (ASCII, at most 223 bytes, `nqn.` form); other kinds take none.
fn check_allowed_hosts(kind: ExportKind, hosts: &[String]) -> Result<(), ApiError> {
    if kind != ExportKind::NvmeTcp {
        if hosts.is_empty() {
            return Ok(());
        }
        return Err(ApiError::InvalidArgument(format!(
            "allowed hosts are for nvme-tcp exports only, not {kind}"
        )));
    }
    if hosts.is_empty() {
        return Err(ApiError::InvalidArgument(
            "an nvme-tcp export needs at least one allowed host NQN (dpuctl export add VOLUME --type nvme-tcp --allow-host NQN; a Linux host's is in /etc/nvme/hostnqn)".into(),
        ));
    }
    for h in hosts {
        let ok = h.starts_with("nqn.") && h.len() <= 223 && h.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err(ApiError::InvalidArgument(format!(
                "host NQN {h:?} is not valid: an NQN starts with \"nqn.\", is printable ASCII without spaces and at most 223 bytes"
            )));
        }
    }
    Ok(())
}

fn export_type(k: ExportKind) -> proto::ExportType {
    match k {
        ExportKind::Nbd => proto::ExportType::Nbd,
        ExportKind::VhostUserBlk => proto::ExportType::VhostUserBlk,
        ExportKind::NvmeTcp => proto::ExportType::NvmeTcp,
    }
}

/// A profile from its source: a TOML or JSON document, or the fields (which go through
/// the same parser so the messages are the same).
fn parse_profile(source: Option<proto::ProfileSource>) -> Result<placement::Profile, ApiError> {
    let bad = |e: placement::Error| ApiError::InvalidArgument(e.to_string());
    match source.and_then(|s| s.source) {
        None => Err(ApiError::InvalidArgument(
            "the request carries no profile: send a TOML or JSON document or the fields".into(),
        )),
        Some(proto::profile_source::Source::Toml(t)) => {
            placement::Profile::from_toml(&t).map_err(bad)
        }
        Some(proto::profile_source::Source::Json(j)) => {
            placement::Profile::from_json(&j).map_err(bad)
        }
        Some(proto::profile_source::Source::Spec(s)) => {
            let mut doc = serde_json::Map::new();
            doc.insert(
                "schema_version".into(),
                placement::PROFILE_SCHEMA_VERSION.into(),
            );
            doc.insert("name".into(), s.name.into());
            doc.insert("protection".into(), s.protection.into());
            doc.insert("failure_domain".into(), s.failure_domain.into());
            let mut opt = |k: &str, v: Option<serde_json::Value>| {
                if let Some(v) = v {
                    doc.insert(k.into(), v);
                }
            };
            opt("compression", s.compression.map(Into::into));
            opt("compression_unit", s.compression_unit.map(Into::into));
            opt("encryption", s.encryption.map(Into::into));
            opt("max_iops", s.max_iops.map(Into::into));
            opt("max_bandwidth_mib_s", s.max_bandwidth_mib_s.map(Into::into));
            opt("space_reservation", s.space_reservation.map(Into::into));
            placement::Profile::from_json(&serde_json::Value::Object(doc).to_string()).map_err(bad)
        }
    }
}

fn profile_spec(p: &placement::Profile) -> proto::ProfileSpec {
    proto::ProfileSpec {
        name: p.name.clone(),
        protection: p.protection.to_string(),
        failure_domain: p.failure_domain.clone(),
        compression: Some(p.compression.to_string()),
        compression_unit: Some(format!("{}KiB", p.compression_unit / 1024)),
        encryption: Some(p.encryption.to_string()),
        max_iops: p.max_iops.map(std::num::NonZeroU64::get),
        max_bandwidth_mib_s: p.max_bandwidth_mib_s.map(std::num::NonZeroU64::get),
        space_reservation: Some(p.space_reservation.to_string()),
    }
}

impl ControlPlane {
    /// The control plane over `store` and `service`, with the cluster's failure-domain
    /// `levels` (outermost first, the last the node).
    #[must_use]
    pub fn new(
        store: Arc<Store>,
        service: Arc<dyn VolumeService>,
        frontends: Arc<dyn Frontends>,
        levels: Vec<String>,
    ) -> Self {
        Self {
            store,
            service,
            frontends,
            levels,
            changes: tokio::sync::Mutex::new(()),
        }
    }

    /// The engine behind the API.
    #[must_use]
    pub fn service(&self) -> &Arc<dyn VolumeService> {
        &self.service
    }

    /// Hands the stored node list to the engine and serves the stored exports; called once
    /// at start. An export whose volume the engine does not have (yet) is logged and left
    /// in the store.
    pub async fn restore(&self) -> Result<(), ApiError> {
        let _g = self.changes.lock().await;
        let store = Arc::clone(&self.store);
        let nodes = blocking(move || store.nodes()).await?;
        let n = nodes.len();
        self.service.set_nodes(nodes).await?;
        let store = Arc::clone(&self.store);
        let exports = blocking(move || store.exports()).await?;
        for e in &exports {
            match self.service.device(&e.volume).await {
                Ok(Some(device)) => {
                    if let Err(why) = self.frontends.serve(e, device) {
                        tracing::warn!(export = %e.name, volume = %e.volume, %why, "export not served");
                    }
                }
                Ok(None) => {
                    tracing::warn!(export = %e.name, volume = %e.volume, "export's volume not found; not served");
                }
                Err(err) => {
                    tracing::warn!(export = %e.name, volume = %e.volume, %err, "export's volume unavailable; not served");
                }
            }
        }
        tracing::info!(
            nodes = n,
            exports = exports.len(),
            "restored nodes and exports from the store"
        );
        Ok(())
    }

    /// The registered nodes as stored (for the metrics endpoint).
    pub async fn registered_nodes(&self) -> Result<Vec<NodeSpec>, ApiError> {
        self.nodes().await
    }

    async fn nodes(&self) -> Result<Vec<NodeSpec>, ApiError> {
        let store = Arc::clone(&self.store);
        blocking(move || store.nodes()).await
    }

    async fn exports(&self) -> Result<Vec<ExportRecord>, ApiError> {
        let store = Arc::clone(&self.store);
        blocking(move || store.exports()).await
    }

    async fn profile_message(
        &self,
        p: &placement::Profile,
        nodes: &[NodeSpec],
        volumes: &[VolumeInfo],
    ) -> proto::Profile {
        let (satisfiable, layout, resolution) =
            match cluster_map(&self.levels, nodes).and_then(|m| p.resolve(&m)) {
                Ok(r) => (true, r.layout.to_string(), r.reason),
                Err(e) => (false, String::new(), e.to_string()),
            };
        proto::Profile {
            spec: Some(profile_spec(p)),
            toml: p.to_toml(),
            satisfiable,
            layout,
            resolution,
            volumes: u32::try_from(volumes.iter().filter(|v| v.profile == p.name).count())
                .unwrap_or(u32::MAX),
        }
    }

    async fn profile_by_name(&self, name: &str) -> Result<placement::Profile, ApiError> {
        let store = Arc::clone(&self.store);
        let n = name.to_owned();
        match blocking(move || store.profile(&n)).await? {
            Some(p) => Ok(p),
            None => {
                let store = Arc::clone(&self.store);
                let known: Vec<String> = blocking(move || store.profiles())
                    .await?
                    .into_iter()
                    .map(|p| p.name)
                    .collect();
                Err(ApiError::NotFound(format!(
                    "unknown profile {name:?}; the profiles are: {} (dpuctl profile list)",
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                )))
            }
        }
    }

    // ------------------------------------------------------------ profiles

    async fn create_profile(
        &self,
        source: Option<proto::ProfileSource>,
    ) -> Result<proto::Profile, ApiError> {
        let profile = parse_profile(source)?;
        let _g = self.changes.lock().await;
        let store = Arc::clone(&self.store);
        let name = profile.name.clone();
        if blocking(move || store.profile(&name)).await?.is_some() {
            return Err(ApiError::AlreadyExists(format!(
                "a profile named {:?} already exists; change it with dpuctl profile edit",
                profile.name
            )));
        }
        let store = Arc::clone(&self.store);
        let p = profile.clone();
        blocking(move || store.put_profile(&p)).await?;
        tracing::info!(profile = %profile.name, "profile created");
        let nodes = self.nodes().await?;
        let volumes = self.service.list_volumes().await?;
        Ok(self.profile_message(&profile, &nodes, &volumes).await)
    }

    async fn list_profiles(&self) -> Result<Vec<proto::Profile>, ApiError> {
        let store = Arc::clone(&self.store);
        let profiles = blocking(move || store.profiles()).await?;
        let nodes = self.nodes().await?;
        let volumes = self.service.list_volumes().await?;
        let mut out = Vec::with_capacity(profiles.len());
        for p in &profiles {
            out.push(self.profile_message(p, &nodes, &volumes).await);
        }
        Ok(out)
    }

    async fn get_profile(&self, name: &str) -> Result<proto::Profile, ApiError> {
        let p = self.profile_by_name(name).await?;
        let nodes = self.nodes().await?;
        let volumes = self.service.list_volumes().await?;
        Ok(self.profile_message(&p, &nodes, &volumes).await)
    }

    async fn update_profile(
        &self,
        name: &str,
        source: Option<proto::ProfileSource>,
    ) -> Result<proto::Profile, ApiError> {
        let profile = parse_profile(source)?;
        if profile.name != name {
            return Err(ApiError::InvalidArgument(format!(
                "the new document names profile {:?} but the profile being changed is {name:?}; profiles cannot be renamed (create a new one instead)",
                profile.name
            )));
        }
        let _g = self.changes.lock().await;
        self.profile_by_name(name).await?;
        let store = Arc::clone(&self.store);
        let p = profile.clone();
        blocking(move || store.put_profile(&p)).await?;
        tracing::info!(profile = %name, "profile updated");
        let nodes = self.nodes().await?;
        let volumes = self.service.list_volumes().await?;
        Ok(self.profile_message(&profile, &nodes, &volumes).await)
    }

    async fn delete_profile(&self, name: &str) -> Result<(), ApiError> {
        let _g = self.changes.lock().await;
        self.profile_by_name(name).await?;
        let users: Vec<String> = self
            .service
            .list_volumes()
            .await?
            .into_iter()
            .filter(|v| v.profile == name)
            .map(|v| v.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "profile {name:?} is used by volume{} {}; delete {} first",
                if users.len() == 1 { "" } else { "s" },
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )));
        }
        let store = Arc::clone(&self.store);
        let n = name.to_owned();
        blocking(move || store.delete_profile(&n)).await?;
        tracing::info!(profile = %name, "profile deleted");
        Ok(())
    }

    // ------------------------------------------------------------ nodes

    fn node_message(spec: &NodeSpec, status: &ClusterStatus) -> proto::Node {
        let seen = status.nodes.iter().find(|s| s.name == spec.name);
        proto::Node {
            name: spec.name.clone(),
            address: spec.address.clone(),
            nqn: spec.nqn.clone(),
            domain: spec.domain.clone(),
            weight: spec.weight,
            state: node_state(spec.state).into(),
            reachable: seen.is_some_and(|s| s.reachable),
            errors: seen.map_or(0, |s| s.errors),
            last_error: seen.and_then(|s| s.last_error.clone()).unwrap_or_default(),
            pieces: seen.map_or(0, |s| s.pieces),
        }
    }

    async fn status_or_empty(&self) -> ClusterStatus {
        match self.service.status().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "engine status unavailable");
                ClusterStatus::default()
            }
        }
    }

    /// Applies a new node list: checks it with placement, hands it to the engine, then
    /// stores the one changed node (restoring the engine's list if the store fails).
    async fn apply_nodes(
        &self,
        old: Vec<NodeSpec>,
        new: Vec<NodeSpec>,
        changed: NodeSpec,
    ) -> Result<(), ApiError> {
        cluster_map(&self.levels, &new).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        self.service.set_nodes(new).await?;
        let store = Arc::clone(&self.store);
        if let Err(e) = blocking(move || store.put_node(&changed)).await {
            if let Err(back) = self.service.set_nodes(old).await {
                tracing::error!(error = %back, "could not restore the engine's node list after a store failure");
            }
            return Err(e);
        }
        Ok(())
    }

    async fn add_node(&self, req: proto::AddNodeRequest) -> Result<proto::Node, ApiError> {
        check_name("node", &req.name)?;
        let upper = self.levels.len().saturating_sub(1);
        let domain = match req.domain.as_deref() {
            None | Some("") => {
                let mut parts = vec![req.name.as_str(); upper];
                parts.push(&req.name);
                parts.join("/")
            }
            Some(d) => {
                let parts: Vec<&str> = d.split('/').collect();
                if parts.len() != upper
                    || parts
                        .iter()
                        .any(|p| p.is_empty() || p.chars().any(char::is_whitespace))
                {
                    return Err(ApiError::InvalidArgument(format!(
                        "domain {d:?} is not valid: the cluster's failure-domain levels are {}, so a node's domain is {upper} non-empty component{} above the node, separated by '/' (such as {:?})",
                        self.levels.join("/"),
                        if upper == 1 { "" } else { "s" },
                        self.levels[..upper].iter().map(|l| format!("{l}1")).collect::<Vec<_>>().join("/")
                    )));
                }
                format!("{d}/{}", req.name)
            }
        };
        let spec = NodeSpec {
            name: req.name.clone(),
            address: req.address,
            nqn: req.nqn,
            domain,
            weight: req.weight.unwrap_or(1),
            state: NodeAdminState::Up,
        };
        let _g = self.changes.lock().await;
        let old = self.nodes().await?;
        if let Some(existing) = old.iter().find(|n| n.name == spec.name) {
            if existing.state != NodeAdminState::Removed {
                return Err(ApiError::AlreadyExists(format!(
                    "a node named {:?} is already registered (state {}); remove it first or pick another name",
                    spec.name, existing.state
                )));
            }
        }
        if let Some(clash) = old.iter().find(|n| {
            n.name != spec.name
                && n.state != NodeAdminState::Removed
                && n.address == spec.address
                && n.nqn == spec.nqn
        }) {
            return Err(ApiError::AlreadyExists(format!(
                "node {:?} already uses address {} and NQN {}",
                clash.name, spec.address, spec.nqn
            )));
        }
        let mut new: Vec<NodeSpec> = old
            .iter()
            .filter(|n| n.name != spec.name)
            .cloned()
            .collect();
        new.push(spec.clone());
        new.sort_by(|a, b| a.name.cmp(&b.name));
        self.apply_nodes(old, new, spec.clone()).await?;
        tracing::info!(node = %spec.name, address = %spec.address, domain = %spec.domain, "node added");
        let status = self.status_or_empty().await;
        Ok(Self::node_message(&spec, &status))
    }

    async fn set_node_state(
        &self,
        name: &str,
        state: NodeAdminState,
    ) -> Result<proto::Node, ApiError> {
        let _g = self.changes.lock().await;
        let old = self.nodes().await?;
        let Some(mut spec) = old.iter().find(|n| n.name == name).cloned() else {
            return Err(ApiError::NotFound(format!(
                "there is no node named {name:?} (dpuctl node list)"
            )));
        };
        if state == NodeAdminState::Draining && spec.state == NodeAdminState::Removed {
            return Err(ApiError::FailedPrecondition(format!(
                "node {name:?} is removed; a removed node cannot be drained"
            )));
        }
        spec.state = state;
        let new: Vec<NodeSpec> = old
            .iter()
            .map(|n| {
                if n.name == name {
                    spec.clone()
                } else {
                    n.clone()
                }
            })
            .collect();
        self.apply_nodes(old, new, spec.clone()).await?;
        tracing::info!(node = %name, %state, "node state changed");
        let status = self.status_or_empty().await;
        Ok(Self::node_message(&spec, &status))
    }

    async fn list_nodes(&self) -> Result<Vec<proto::Node>, ApiError> {
        let nodes = self.nodes().await?;
        let status = self.status_or_empty().await;
        Ok(nodes
            .iter()
            .map(|n| Self::node_message(n, &status))
            .collect())
    }

    // ------------------------------------------------------------ volumes

    fn volume_message(
        v: &VolumeInfo,
        status: &ClusterStatus,
        exports: &[ExportRecord],
    ) -> proto::Volume {
        let seen = status.volumes.iter().find(|s| s.name == v.name);
        proto::Volume {
            name: v.name.clone(),
            profile: v.profile.clone(),
            layout: v.layout.clone(),
            size_bytes: v.size_bytes,
            block_size: v.block_size,
            state: volume_state(seen.map_or(v.state, |s| s.state)).into(),
            pending_repairs: seen.map_or(0, |s| s.pending_repairs),
            exports: exports
                .iter()
                .filter(|e| e.volume == v.name)
                .map(|e| e.name.clone())
                .collect(),
        }
    }

    async fn volume_info(&self, name: &str) -> Result<VolumeInfo, ApiError> {
        self.service
            .list_volumes()
            .await?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "there is no volume named {name:?} (dpuctl volume list)"
                ))
            })
    }

    async fn one_volume(&self, v: &VolumeInfo) -> Result<proto::Volume, ApiError> {
        let status = self.status_or_empty().await;
        let exports = self.exports().await?;
        Ok(Self::volume_message(v, &status, &exports))
    }

    async fn create_volume(
        &self,
        req: proto::CreateVolumeRequest,
    ) -> Result<proto::Volume, ApiError> {
        check_name("volume", &req.name)?;
        check_size(req.size_bytes)?;
        if req.profile.is_empty() {
            return Err(ApiError::InvalidArgument(
                "a volume needs a profile (dpuctl profile list shows them)".into(),
            ));
        }
        let _g = self.changes.lock().await;
        let profile = self.profile_by_name(&req.profile).await?;
        let info = self
            .service
            .create_volume(&req.name, profile, req.size_bytes)
            .await?;
        tracing::info!(volume = %info.name, profile = %info.profile, layout = %info.layout, size = info.size_bytes, "volume created");
        self.one_volume(&info).await
    }

    async fn list_volumes(&self) -> Result<Vec<proto::Volume>, ApiError> {
        let volumes = self.service.list_volumes().await?;
        let status = self.status_or_empty().await;
        let exports = self.exports().await?;
        Ok(volumes
            .iter()
            .map(|v| Self::volume_message(v, &status, &exports))
            .collect())
    }

    async fn get_volume(&self, name: &str) -> Result<proto::Volume, ApiError> {
        let v = self.volume_info(name).await?;
        self.one_volume(&v).await
    }

    async fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<proto::Volume, ApiError> {
        check_size(size_bytes)?;
        let _g = self.changes.lock().await;
        let v = self.volume_info(name).await?;
        if size_bytes < v.size_bytes {
            return Err(ApiError::InvalidArgument(format!(
                "volume {name:?} is {} bytes; volumes grow but do not shrink (asked for {size_bytes} bytes)",
                v.size_bytes
            )));
        }
        if size_bytes == v.size_bytes {
            return self.one_volume(&v).await;
        }
        let info = self.service.resize_volume(name, size_bytes).await?;
        tracing::info!(volume = %name, size = size_bytes, "volume resized");
        // The notices are socket writes; a stuck peer does not hold the reply up.
        let frontends = Arc::clone(&self.frontends);
        let volume = name.to_owned();
        let notify = tokio::task::spawn_blocking(move || frontends.volume_grown(&volume));
        match tokio::time::timeout(std::time::Duration::from_secs(5), notify).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(volume = %name, error = %e, "telling the front-ends a volume grew failed");
            }
            Err(_) => {
                tracing::warn!(volume = %name, "telling the front-ends a volume grew takes over 5 s; not waited for");
            }
        }
        self.one_volume(&info).await
    }

    async fn delete_volume(&self, name: &str) -> Result<(), ApiError> {
        let _g = self.changes.lock().await;
        self.volume_info(name).await?;
        let users: Vec<String> = self
            .exports()
            .await?
            .into_iter()
            .filter(|e| e.volume == name)
            .map(|e| e.name)
            .collect();
        if !users.is_empty() {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {name:?} is in use by export{} {}; remove {} first (dpuctl export remove NAME)",
                if users.len() == 1 { "" } else { "s" },
                users.join(", "),
                if users.len() == 1 { "it" } else { "them" }
            )));
        }
        self.service.delete_volume(name).await?;
        tracing::info!(volume = %name, "volume deleted");
        Ok(())
    }

    // ------------------------------------------------------------ exports

    fn export_message(&self, e: &ExportRecord) -> proto::Export {
        let state = self.frontends.state(e);
        let (nvme_address, nvme_subnqn) = self.frontends.nvme_target(e).unwrap_or_default();
        proto::Export {
            name: e.name.clone(),
            volume: e.volume.clone(),
            r#type: export_type(e.kind).into(),
            read_only: e.read_only,
            served: state.served,
            detail: state.detail,
            allowed_hosts: e.allowed_hosts.clone(),
            nvme_address,
            nvme_subnqn,
        }
    }

    async fn add_export(&self, req: proto::AddExportRequest) -> Result<proto::Export, ApiError> {
        check_name("volume", &req.volume)?;
        let kind = export_kind(req.r#type)?;
        let name = req
            .name
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| req.volume.clone());
        check_name("export", &name)?;
        check_allowed_hosts(kind, &req.allowed_hosts)?;
        let _g = self.changes.lock().await;
        let store = Arc::clone(&self.store);
        let n = name.clone();
        if let Some(existing) = blocking(move || store.export(&n)).await? {
            return Err(ApiError::AlreadyExists(format!(
                "an export named {name:?} already exists (it serves volume {:?}); pick another with --name",
                existing.volume
            )));
        }
        let device = self.service.device(&req.volume).await?.ok_or_else(|| {
            ApiError::NotFound(format!(
                "there is no volume named {:?} (dpuctl volume list)",
                req.volume
            ))
        })?;
        let record = ExportRecord {
            name,
            volume: req.volume,
            kind,
            read_only: req.read_only,
            allowed_hosts: req.allowed_hosts,
        };
        let store = Arc::clone(&self.store);
        let r = record.clone();
        blocking(move || store.put_export(&r)).await?;
        if let Err(why) = self.frontends.serve(&record, device) {
            let store = Arc::clone(&self.store);
            let n = record.name.clone();
            blocking(move || store.delete_export(&n)).await?;
            return Err(ApiError::FailedPrecondition(format!(
                "export {:?} could not be served: {why}",
                record.name
            )));
        }
        tracing::info!(export = %record.name, volume = %record.volume, kind = %record.kind, read_only = record.read_only, "export added");
        Ok(self.export_message(&record))
    }

    async fn list_exports(&self) -> Result<Vec<proto::Export>, ApiError> {
        Ok(self
            .exports()
            .await?
            .iter()
            .map(|e| self.export_message(e))
            .collect())
    }

    async fn remove_export(&self, name: &str) -> Result<(), ApiError> {
        let _g = self.changes.lock().await;
        let store = Arc::clone(&self.store);
        let n = name.to_owned();
        if !blocking(move || store.delete_export(&n)).await? {
            return Err(ApiError::NotFound(format!(
                "there is no export named {name:?} (dpuctl export list)"
            )));
        }
        self.frontends.unserve(name);
        tracing::info!(export = %name, "export removed");
        Ok(())
    }

    // ------------------------------------------------------------ status

    async fn cluster_status(&self) -> Result<proto::StatusResponse, ApiError> {
        let status = self.service.status().await?;
        let nodes = self.nodes().await?;
        let volumes = self.service.list_volumes().await?;
        let exports = self.exports().await?;
        let mut problems = Vec::new();
        let live: Vec<&NodeSpec> = nodes
            .iter()
            .filter(|n| n.state != NodeAdminState::Removed)
            .collect();
        let mut unreachable = 0u32;
        for n in &live {
            let seen = status.nodes.iter().find(|s| s.name == n.name);
            if !seen.is_some_and(|s| s.reachable) {
                unreachable += 1;
                problems.push(format!(
                    "node {} ({}) is not reachable{}",
                    n.name,
                    n.address,
                    seen.and_then(|s| s.last_error.as_ref())
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ));
            }
        }
        let mut degraded = Vec::new();
        for v in &volumes {
            let msg = Self::volume_message(v, &status, &exports);
            if msg.state != i32::from(proto::VolumeState::Healthy) {
                problems.push(format!(
                    "volume {} is {} ({} repairs pending)",
                    v.name,
                    status
                        .volumes
                        .iter()
                        .find(|s| s.name == v.name)
                        .map_or(v.state, |s| s.state),
                    msg.pending_repairs
                ));
                degraded.push(msg);
            }
        }
        let health = if problems.is_empty() {
            "healthy"
        } else {
            "degraded"
        };
        let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Ok(proto::StatusResponse {
            health: health.into(),
            problems,
            nodes_total: count(live.len()),
            nodes_up: count(
                live.iter()
                    .filter(|n| n.state == NodeAdminState::Up)
                    .count(),
            ),
            nodes_unreachable: unreachable,
            volumes_total: count(volumes.len()),
            nodes: nodes
                .iter()
                .map(|n| Self::node_message(n, &status))
                .collect(),
            degraded_volumes: degraded,
            rebuilds: status
                .rebuilds
                .iter()
                .map(|r| proto::Rebuild {
                    volume: r.volume.clone(),
                    done_bytes: r.done_bytes,
                    total_bytes: r.total_bytes,
                })
                .collect(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }
}

/// The gRPC services over a [`ControlPlane`]; add them to a tonic server with
/// [`ControlApi::router`].
#[derive(Debug, Clone)]
pub struct ControlApi(pub Arc<ControlPlane>);

impl ControlApi {
    /// A tonic router with every service of `dpu.control.v1`.
    #[must_use]
    pub fn router(
        &self,
        builder: &mut tonic::transport::Server,
    ) -> tonic::transport::server::Router {
        builder
            .add_service(proto::profiles_server::ProfilesServer::new(self.clone()))
            .add_service(proto::nodes_server::NodesServer::new(self.clone()))
            .add_service(proto::volumes_server::VolumesServer::new(self.clone()))
            .add_service(proto::exports_server::ExportsServer::new(self.clone()))
            .add_service(proto::cluster_server::ClusterServer::new(self.clone()))
    }
}

type Rpc<T> = Result<Response<T>, Status>;

fn reply<T>(r: Result<T, ApiError>) -> Rpc<T> {
    r.map(Response::new).map_err(Status::from)
}

#[tonic::async_trait]
impl proto::profiles_server::Profiles for ControlApi {
    async fn create(&self, r: Request<proto::CreateProfileRequest>) -> Rpc<proto::Profile> {
        reply(self.0.create_profile(r.into_inner().source).await)
    }
    async fn list(
        &self,
        _r: Request<proto::ListProfilesRequest>,
    ) -> Rpc<proto::ListProfilesResponse> {
        reply(
            self.0
                .list_profiles()
                .await
                .map(|profiles| proto::ListProfilesResponse { profiles }),
        )
    }
    async fn get(&self, r: Request<proto::GetProfileRequest>) -> Rpc<proto::Profile> {
        reply(self.0.get_profile(&r.into_inner().name).await)
    }
    async fn update(&self, r: Request<proto::UpdateProfileRequest>) -> Rpc<proto::Profile> {
        let r = r.into_inner();
        reply(self.0.update_profile(&r.name, r.source).await)
    }
    async fn delete(
        &self,
        r: Request<proto::DeleteProfileRequest>,
    ) -> Rpc<proto::DeleteProfileResponse> {
        reply(
            self.0
                .delete_profile(&r.into_inner().name)
                .await
                .map(|()| proto::DeleteProfileResponse {}),
        )
    }
}

#[tonic::async_trait]
impl proto::nodes_server::Nodes for ControlApi {
    async fn add(&self, r: Request<proto::AddNodeRequest>) -> Rpc<proto::Node> {
        reply(self.0.add_node(r.into_inner()).await)
    }
    async fn list(&self, _r: Request<proto::ListNodesRequest>) -> Rpc<proto::ListNodesResponse> {
        reply(
            self.0
                .list_nodes()
                .await
                .map(|nodes| proto::ListNodesResponse { nodes }),
        )
    }
    async fn remove(&self, r: Request<proto::RemoveNodeRequest>) -> Rpc<proto::Node> {
        reply(
            self.0
                .set_node_state(&r.into_inner().name, NodeAdminState::Removed)
                .await,
        )
    }
    async fn drain(&self, r: Request<proto::DrainNodeRequest>) -> Rpc<proto::Node> {
        reply(
            self.0
                .set_node_state(&r.into_inner().name, NodeAdminState::Draining)
                .await,
        )
    }
}

#[tonic::async_trait]
impl proto::volumes_server::Volumes for ControlApi {
    async fn create(&self, r: Request<proto::CreateVolumeRequest>) -> Rpc<proto::Volume> {
        reply(self.0.create_volume(r.into_inner()).await)
    }
    async fn list(
        &self,
        _r: Request<proto::ListVolumesRequest>,
    ) -> Rpc<proto::ListVolumesResponse> {
        reply(
            self.0
                .list_volumes()
                .await
                .map(|volumes| proto::ListVolumesResponse { volumes }),
        )
    }
    async fn get(&self, r: Request<proto::GetVolumeRequest>) -> Rpc<proto::Volume> {
        reply(self.0.get_volume(&r.into_inner().name).await)
    }
    async fn resize(&self, r: Request<proto::ResizeVolumeRequest>) -> Rpc<proto::Volume> {
        let r = r.into_inner();
        reply(self.0.resize_volume(&r.name, r.size_bytes).await)
    }
    async fn delete(
        &self,
        r: Request<proto::DeleteVolumeRequest>,
    ) -> Rpc<proto::DeleteVolumeResponse> {
        reply(
            self.0
                .delete_volume(&r.into_inner().name)
                .await
                .map(|()| proto::DeleteVolumeResponse {}),
        )
    }
}

#[tonic::async_trait]
impl proto::exports_server::Exports for ControlApi {
    async fn add(&self, r: Request<proto::AddExportRequest>) -> Rpc<proto::Export> {
        reply(self.0.add_export(r.into_inner()).await)
    }
    async fn list(
        &self,
        _r: Request<proto::ListExportsRequest>,
    ) -> Rpc<proto::ListExportsResponse> {
        reply(
            self.0
                .list_exports()
                .await
                .map(|exports| proto::ListExportsResponse { exports }),
        )
    }
    async fn remove(
        &self,
        r: Request<proto::RemoveExportRequest>,
    ) -> Rpc<proto::RemoveExportResponse> {
        reply(
            self.0
                .remove_export(&r.into_inner().name)
                .await
                .map(|()| proto::RemoveExportResponse {}),
        )
    }
}

#[tonic::async_trait]
impl proto::cluster_server::Cluster for ControlApi {
    async fn status(&self, _r: Request<proto::StatusRequest>) -> Rpc<proto::StatusResponse> {
        reply(self.0.cluster_status().await)
    }
}
