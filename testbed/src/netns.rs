//! One network namespace per storage node, so that a partition is a real link failure.
//!
//! Killing or stopping a process is not a partition: the kernel still answers for a
//! stopped process's socket and resets a dead one's. To make a node unreachable the
//! way a pulled cable does, each node runs in a namespace of its own, joined to the
//! host by a veth pair; `partition` sets the host end down, which removes the connected
//! route: an unreachable route kept behind it makes new connections fail with "no
//! route to host" (instead of leaking to the default gateway), and whatever
//! established connections send is dropped. Addresses are only ever taken from 10.77.SLOT.0/30, inside
//! namespaces the testbed creates. Slots are claimed atomically by `ip netns add`,
//! which fails if the name exists, so two testbeds on one machine do not collide.
//!
//! This needs root and a working `ip netns`; without them the cluster runs on
//! loopback and partition says it is unavailable and why.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::Error;

/// The namespace, interfaces and addresses of one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netns {
    /// Namespace name (`testbed-SLOT`).
    pub name: String,
    /// The slot: third octet of the /30.
    pub slot: u8,
    /// veth end in the host namespace (`tbSLOTh`).
    pub host_if: String,
    /// veth end inside the node's namespace (`tbSLOTn`).
    pub ns_if: String,
    /// Host end address (10.77.SLOT.1).
    pub host_ip: Ipv4Addr,
    /// Node end address (10.77.SLOT.2): what the node listens on.
    pub ns_ip: Ipv4Addr,
}

/// Metric of the unreachable route behind each node's connected route.
const FALLBACK_METRIC: &str = "4077";

fn ip<S: AsRef<str>>(args: &[S]) -> Result<String, Error> {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let out = Command::new("ip")
        .args(&args)
        .output()
        .map_err(|e| Error::Network(format!("running ip {}: {e}", args.join(" "))))?;
    if !out.status.success() {
        return Err(Error::Network(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Ok when namespaces can be used here, else why not.
pub fn available() -> Result<(), String> {
    // SAFETY: geteuid has no arguments and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "network namespaces need root (running as uid {euid}); nodes run on loopback"
        ));
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`ip netns list` failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
    }
}

impl Netns {
    fn for_slot(slot: u8) -> Netns {
        Netns {
            name: format!("testbed-{slot}"),
            slot,
            host_if: format!("tb{slot}h"),
            ns_if: format!("tb{slot}n"),
            host_ip: Ipv4Addr::new(10, 77, slot, 1),
            ns_ip: Ipv4Addr::new(10, 77, slot, 2),
        }
    }

    /// Claims a free slot and builds the namespace, the veth pair and the addresses.
    pub fn create() -> Result<Netns, Error> {
        for slot in 1..=254u8 {
            let n = Netns::for_slot(slot);
            if Path::new("/run/netns").join(&n.name).exists() {
                continue;
            }
            if let Err(e) = ip(&["netns", "add", &n.name]) {
                if Path::new("/run/netns").join(&n.name).exists() {
                    continue; // another testbed took it first
                }
                return Err(e);
            }
            if let Err(e) = n.wire() {
                n.destroy();
                return Err(e);
            }
            return Ok(n);
        }
        Err(Error::Network(
            "all 254 testbed namespace slots are taken (ip netns list)".into(),
        ))
    }

    fn wire(&self) -> Result<(), Error> {
        // A host interface of this name can only be left over from a crashed run of
        // the slot we now own.
        let _ = ip(&["link", "del", &self.host_if]);
        ip(&[
            "link",
            "add",
            &self.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.ns_if,
            "netns",
            &self.name,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", self.host_ip),
            "dev",
            &self.host_if,
        ])?;
        ip(&["link", "set", &self.host_if, "up"])?;
        ip(&[
            "-n",
            &self.name,
            "addr",
            "add",
            &format!("{}/30", self.ns_ip),
            "dev",
            &self.ns_if,
        ])?;
        ip(&["-n", &self.name, "link", "set", &self.ns_if, "up"])?;
        ip(&["-n", &self.name, "link", "set", "lo", "up"])?;
        // With the link down the kernel drops the connected route, and without this
        // the default route would carry the node's address off the machine (where a
        // gateway may well answer). An unreachable route behind the connected one
        // makes a partition fail fast and keeps the packets at home.
        let _ = ip(&self.fallback_route("del"));
        ip(&self.fallback_route("add"))?;
        Ok(())
    }

    fn fallback_route(&self, verb: &str) -> Vec<String> {
        let net = Ipv4Addr::new(10, 77, self.slot, 0);
        [
            "route",
            verb,
            "unreachable",
            &format!("{net}/30"),
            "metric",
            FALLBACK_METRIC,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// Removes the veth pair and the namespace (errors ignored: best effort cleanup).
    pub fn destroy(&self) {
        let _ = ip(&self.fallback_route("del"));
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }

    /// Sets the host end down (partition) or up (heal).
    pub fn set_link(&self, up: bool) -> Result<(), Error> {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }])?;
        Ok(())
    }

    /// Whether the host end is administratively up; `None` if it is gone.
    pub fn link_up(&self) -> Option<bool> {
        let out = ip(&["-o", "link", "show", "dev", &self.host_if]).ok()?;
        let flags = out.split('<').nth(1)?.split('>').next()?;
        Some(flags.split(',').any(|f| f == "UP"))
    }

    /// The command prefix that runs a program inside the namespace (`ip netns exec`
    /// execs in place, so the pid stays the program's).
    pub fn exec_prefix(&self) -> Vec<String> {
        vec![
            "ip".into(),
            "netns".into(),
            "exec".into(),
            self.name.clone(),
        ]
    }
}
