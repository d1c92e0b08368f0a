//! The control plane: dpud's gRPC API (package `dpu.control.v1`, `proto/`), the
//! validation and bookkeeping behind it, and the boundary to the volume engine.
//!
//! The API runs off the reactor cores on the daemon's control runtime. It owns the names
//! an operator deals in (profiles, nodes, exports) and keeps them in the local
//! [`crate::store`]; volumes belong to the engine and are reached only through
//! [`service::VolumeService`]. Changes are serialized by one async lock so that the
//! checks a change makes (a profile no volume uses, a volume no export serves) still
//! hold when it is applied; reads take no lock. Every refusal is a gRPC status whose
//! code says what kind of problem it is and whose message says what to do about it,
//! because `dpuctl` shows it to the operator verbatim (docs/api.md lists the codes).
//!
//! Listeners are deny-by-default: the Unix socket is created mode 0600 (only dpud's
//! user may call it) and TCP binds only to loopback unless the configuration says
//! otherwise (see [`crate::daemon`]).

pub mod net;
pub mod service;
pub mod testing;

mod server;

pub use server::{ApiError, ControlApi, ControlPlane, Frontends, ServedState};

/// The generated protobuf messages, clients and servers of `dpu.control.v1`.
#[allow(
    missing_docs,
    missing_debug_implementations,
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    clippy::cast_lossless
)]
pub mod proto {
    tonic::include_proto!("dpu.control.v1");
}

/// The API version this build serves (the protobuf package).
pub const API_PACKAGE: &str = "dpu.control.v1";
