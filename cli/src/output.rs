//! Output: aligned tables for people, JSON for scripts. The JSON shapes are part of
//! dpuctl's interface (docs/api.md): enums as lower-case strings, sizes in bytes.

use serde_json::{json, Value};

use crate::proto;
use crate::size::human;

/// Where results go.
#[derive(Debug)]
pub struct Output {
    json: bool,
}

pub(crate) fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                s.push_str(&format!("{c:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}

fn node_state(s: i32) -> &'static str {
    match proto::NodeState::try_from(s) {
        Ok(proto::NodeState::Up) => "up",
        Ok(proto::NodeState::Draining) => "draining",
        Ok(proto::NodeState::Removed) => "removed",
        _ => "unknown",
    }
}

fn volume_state(s: i32) -> &'static str {
    match proto::VolumeState::try_from(s) {
        Ok(proto::VolumeState::Healthy) => "healthy",
        Ok(proto::VolumeState::Degraded) => "degraded",
        Ok(proto::VolumeState::Rebuilding) => "rebuilding",
        _ => "unknown",
    }
}

fn export_type(t: i32) -> &'static str {
    match proto::ExportType::try_from(t) {
        Ok(proto::ExportType::Nbd) => "nbd",
        Ok(proto::ExportType::VhostUserBlk) => "vhost-user-blk",
        Ok(proto::ExportType::NvmeTcp) => "nvme-tcp",
        _ => "unknown",
    }
}

fn profile_json(p: &proto::Profile) -> Value {
    let s = p.spec.clone().unwrap_or_default();
    json!({
        "name": s.name,
        "protection": s.protection,
        "failure_domain": s.failure_domain,
        "compression": s.compression,
        "compression_unit": s.compression_unit,
        "encryption": s.encryption,
        "max_iops": s.max_iops,
        "max_bandwidth_mib_s": s.max_bandwidth_mib_s,
        "space_reservation": s.space_reservation,
        "satisfiable": p.satisfiable,
        "layout": p.layout,
        "resolution": p.resolution,
        "volumes": p.volumes,
        "toml": p.toml,
    })
}

fn node_json(n: &proto::Node) -> Value {
    json!({
        "name": n.name,
        "address": n.address,
        "nqn": n.nqn,
        "domain": n.domain,
        "weight": n.weight,
        "state": node_state(n.state),
        "reachable": n.reachable,
        "errors": n.errors,
        "last_error": n.last_error,
        "pieces": n.pieces,
    })
}

fn volume_json(v: &proto::Volume) -> Value {
    json!({
        "name": v.name,
        "profile": v.profile,
        "layout": v.layout,
        "size_bytes": v.size_bytes,
        "block_size": v.block_size,
        "state": volume_state(v.state),
        "pending_repairs": v.pending_repairs,
        "exports": v.exports,
    })
}

fn export_json(e: &proto::Export) -> Value {
    json!({
        "name": e.name,
        "volume": e.volume,
        "type": export_type(e.r#type),
        "read_only": e.read_only,
        "served": e.served,
        "detail": e.detail,
        "allowed_hosts": e.allowed_hosts,
        "nvme_address": e.nvme_address,
        "nvme_subnqn": e.nvme_subnqn,
    })
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

impl Output {
    /// JSON when `json`, tables otherwise.
    pub fn new(json: bool) -> Self {
        Self { json }
    }

    /// "profile gold deleted".
    pub fn done(&self, kind: &str, name: &str, what: &str) {
        if self.json {
            print_json(&json!({ "kind": kind, "name": name, "result": what }));
        } else {
            println!("{kind} {name} {what}");
        }
    }

    pub fn profile(&self, p: &proto::Profile, verb: &str) {
        if self.json {
            return print_json(&profile_json(p));
        }
        let name = p.spec.as_ref().map_or("", |s| s.name.as_str());
        if !verb.is_empty() {
            println!("profile {name} {verb}");
        }
        print!("{}", p.toml);
        if p.satisfiable {
            println!(
                "# resolves to {} on the registered nodes: {}",
                p.layout, p.resolution
            );
        } else {
            println!("# the cluster cannot satisfy it now: {}", p.resolution);
        }
        println!("# volumes using it: {}", p.volumes);
    }

    pub fn profiles(&self, list: &[proto::Profile]) {
        if self.json {
            return print_json(&Value::Array(list.iter().map(profile_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|p| {
                let s = p.spec.clone().unwrap_or_default();
                vec![
                    s.name,
                    s.protection,
                    s.failure_domain,
                    s.compression.unwrap_or_default(),
                    s.encryption.unwrap_or_default(),
                    if p.satisfiable {
                        p.layout.clone()
                    } else {
                        "unsatisfiable".into()
                    },
                    p.volumes.to_string(),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "PROTECTION",
                "DOMAIN",
                "COMPRESSION",
                "ENCRYPTION",
                "LAYOUT NOW",
                "VOLUMES",
            ],
            &rows,
        );
    }

    pub fn node(&self, n: &proto::Node, verb: &str) {
        if self.json {
            return print_json(&node_json(n));
        }
        println!("node {} {verb}", n.name);
        self.nodes(std::slice::from_ref(n));
    }

    pub fn nodes(&self, list: &[proto::Node]) {
        if self.json {
            return print_json(&Value::Array(list.iter().map(node_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|n| {
                vec![
                    n.name.clone(),
                    n.address.clone(),
                    n.domain.clone(),
                    n.weight.to_string(),
                    node_state(n.state).into(),
                    if n.reachable {
                        "yes".into()
                    } else {
                        "no".into()
                    },
                    n.errors.to_string(),
                    n.pieces.to_string(),
                    n.nqn.clone(),
                ]
            })
            .collect();
        table(
            &[
                "NAME",
                "ADDRESS",
                "DOMAIN",
                "WEIGHT",
                "STATE",
                "REACHABLE",
                "ERRORS",
                "PIECES",
                "NQN",
            ],
            &rows,
        );
    }

    pub fn volume(&self, v: &proto::Volume, verb: &str) {
        if self.json {
            return print_json(&volume_json(v));
        }
        if !verb.is_empty() {
            println!("volume {} {verb}", v.name);
        }
        self.volumes(std::slice::from_ref(v));
    }

    pub fn volumes(&self, list: &[proto::Volume]) {
        if self.json {
            return print_json(&Value::Array(list.iter().map(volume_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|v| {
                vec![
                    v.name.clone(),
                    human(v.size_bytes),
                    v.profile.clone(),
                    v.layout.clone(),
                    volume_state(v.state).into(),
                    v.pending_repairs.to_string(),
                    if v.exports.is_empty() {
                        "-".into()
                    } else {
                        v.exports.join(",")
                    },
                ]
            })
            .collect();
        table(
            &[
                "NAME", "SIZE", "PROFILE", "LAYOUT", "STATE", "REPAIRS", "EXPORTS",
            ],
            &rows,
        );
    }

    pub fn export(&self, e: &proto::Export, verb: &str) {
        if self.json {
            return print_json(&export_json(e));
        }
        println!("export {} {verb}", e.name);
        self.exports(std::slice::from_ref(e));
    }

    pub fn exports(&self, list: &[proto::Export]) {
        if self.json {
            return print_json(&Value::Array(list.iter().map(export_json).collect()));
        }
        let rows: Vec<Vec<String>> = list
            .iter()
            .map(|e| {
                vec![
                    e.name.clone(),
                    e.volume.clone(),
                    export_type(e.r#type).into(),
                    if e.read_only {
                        "ro".into()
                    } else {
                        "rw".into()
                    },
                    if e.served { "yes".into() } else { "no".into() },
                    e.detail.clone(),
                ]
            })
            .collect();
        table(
            &["NAME", "VOLUME", "TYPE", "MODE", "SERVED", "DETAIL"],
            &rows,
        );
    }

    pub fn status(&self, s: &proto::StatusResponse) {
        if self.json {
            return print_json(&json!({
                "health": s.health,
                "problems": s.problems,
                "version": s.version,
                "nodes_total": s.nodes_total,
                "nodes_up": s.nodes_up,
                "nodes_unreachable": s.nodes_unreachable,
                "volumes_total": s.volumes_total,
                "nodes": s.nodes.iter().map(node_json).collect::<Vec<_>>(),
                "degraded_volumes": s.degraded_volumes.iter().map(volume_json).collect::<Vec<_>>(),
                "rebuilds": s.rebuilds.iter().map(|r| json!({
                    "volume": r.volume,
                    "done_bytes": r.done_bytes,
                    "total_bytes": r.total_bytes,
                })).collect::<Vec<_>>(),
            }));
        }
        println!("health:  {}", s.health);
        println!(
            "nodes:   {} ({} up, {} unreachable)",
            s.nodes_total, s.nodes_up, s.nodes_unreachable
        );
        println!(
            "volumes: {} ({} degraded or rebuilding)",
            s.volumes_total,
            s.degraded_volumes.len()
        );
        println!("dpud:    {}", s.version);
        if !s.problems.is_empty() {
            println!("\nproblems:");
            for p in &s.problems {
                println!("  - {p}");
            }
        }
        if !s.rebuilds.is_empty() {
            println!("\nrebuilds:");
            let rows: Vec<Vec<String>> = s
                .rebuilds
                .iter()
                .map(|r| {
                    let pct = r
                        .done_bytes
                        .saturating_mul(100)
                        .checked_div(r.total_bytes)
                        .unwrap_or(100);
                    vec![
                        r.volume.clone(),
                        human(r.done_bytes),
                        human(r.total_bytes),
                        format!("{pct}%"),
                    ]
                })
                .collect();
            table(&["VOLUME", "DONE", "TOTAL", "PROGRESS"], &rows);
        }
        if !s.nodes.is_empty() {
            println!("\nnodes:");
            self.nodes(&s.nodes);
        }
    }
}
