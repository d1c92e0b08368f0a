//! Fault injection on a running cluster: the failures the engine must survive.
//!
//! Each fault is the real thing, not a simulation inside our code: SIGKILL (a crash:
//! sockets reset, nothing flushed), SIGSTOP (a hang: the kernel still completes TCP
//! handshakes, but nothing answers), a link down on the node's veth (a partition:
//! packets vanish), and flipped bytes in a backing file (silent media corruption that
//! only checksums can catch). Corruption stays out of the first MiB of the file, where
//! node metadata lives, unless an offset is given, and prefers bytes that hold data
//! (SEEK_DATA), since flipping a hole only corrupts blocks nobody reads.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt as _;
use std::os::unix::io::AsRawFd as _;
use std::path::Path;

use rand::{Rng as _, SeedableRng as _};
use serde::Serialize;

use crate::cluster::{self, NetMode, State, RESERVED_BYTES};
use crate::procs::Liveness;
use crate::Error;

/// A signal fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGKILL.
    Kill,
    /// SIGSTOP.
    Stop,
    /// SIGCONT.
    Cont,
}

/// The name that means dpud rather than a storage node.
pub const DPUD: &str = "dpud";

/// Sends a signal fault to a node, or to dpud when `name` is `dpud`.
pub fn signal(state: &State, name: &str, sig: Signal) -> Result<String, Error> {
    let process = if name == DPUD {
        state.daemon.as_ref().map(|d| d.process).ok_or_else(|| {
            Error::Usage(format!(
                "this testbed has no dpud ({})",
                state.daemon_note.as_deref().unwrap_or("not started")
            ))
        })?
    } else {
        state
            .node(name)?
            .process
            .ok_or_else(|| Error::Process(format!("{name} is not running")))?
    };
    let p = Some(process)
        .filter(|p| p.liveness() != Liveness::Dead)
        .ok_or_else(|| {
            Error::Process(format!(
                "{name} is not running; `testbed fault restart {name}` starts it"
            ))
        })?;
    let (s, what) = match sig {
        Signal::Kill => (libc::SIGKILL, "killed (SIGKILL)"),
        Signal::Stop => (libc::SIGSTOP, "stopped (SIGSTOP)"),
        Signal::Cont => (libc::SIGCONT, "continued (SIGCONT)"),
    };
    p.signal(s)?;
    if sig == Signal::Kill && !p.wait_dead(std::time::Duration::from_secs(5)) {
        return Err(Error::Process(format!("{name} survived SIGKILL")));
    }
    Ok(format!("{name} (pid {}) {what}", p.pid))
}

/// Restarts a node on the same address and backing file, or dpud from its config.
pub fn restart(state: &mut State, name: &str) -> Result<String, Error> {
    if name == DPUD {
        let rec = state.daemon.as_ref().ok_or_else(|| {
            Error::Usage(format!(
                "this testbed has no dpud ({})",
                state.daemon_note.as_deref().unwrap_or("not started")
            ))
        })?;
        let new = crate::daemon::restart(rec)?;
        let pid = new.process.pid;
        state.daemon = Some(new);
        state.save()?;
        return Ok(format!("dpud restarted: pid {pid}"));
    }
    cluster::restart_node(state, name)?;
    let n = state.node(name)?;
    Ok(format!(
        "{name} restarted: pid {} on {}",
        n.pid.unwrap_or(0),
        n.address
    ))
}

/// Sets a node's link down (`partition`) or up (`heal`).
pub fn set_partition(state: &State, name: &str, partitioned: bool) -> Result<String, Error> {
    let node = state.node(name)?;
    let ns = match (state.network, &node.netns) {
        (NetMode::Netns, Some(ns)) => ns,
        _ => {
            return Err(Error::Network(format!(
                "partition is unavailable: this testbed runs its nodes on loopback ({}); \
                 it needs root and `ip netns` at `testbed up` time",
                state
                    .network_note
                    .as_deref()
                    .unwrap_or("no namespaces recorded")
            )))
        }
    };
    ns.set_link(!partitioned)?;
    Ok(if partitioned {
        format!("{name} partitioned: {} is down", ns.host_if)
    } else {
        format!("{name} healed: {} is up", ns.host_if)
    })
}

/// One flipped byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Flip {
    /// Byte offset in the backing file.
    pub offset: u64,
    /// The byte before.
    pub before: u8,
    /// The byte after (before XOR 0xFF).
    pub after: u8,
}

/// Where `corrupt` flips.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// `count` consecutive bytes from this offset.
    At(u64),
    /// `count` distinct random bytes past the reserved first MiB, in data regions when
    /// there are any; the seed makes it repeatable.
    Random {
        /// RNG seed.
        seed: u64,
    },
}

/// The data regions of a file from `from` on, as (start, end) pairs (SEEK_DATA/SEEK_HOLE).
pub fn data_regions(file: &std::fs::File, from: u64, len: u64) -> Result<Vec<(u64, u64)>, Error> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = from;
    while pos < len && out.len() < 1_000_000 {
        let p = libc::off_t::try_from(pos).map_err(|_| Error::Usage("offset too large".into()))?;
        // SAFETY: lseek on a descriptor we own; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, p, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data after pos (or SEEK_DATA unsupported)
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let (Ok(d), Ok(h)) = (u64::try_from(data), u64::try_from(hole)) else {
            break;
        };
        let h = h.min(len);
        if h <= d {
            break;
        }
        out.push((d, h));
        pos = h;
    }
    Ok(out)
}

/// Flips `count` bytes of `path` (XOR 0xFF, so each byte surely changes), syncs the
/// file and returns what it changed.
pub fn corrupt_file(path: &Path, count: u64, at: Where) -> Result<Vec<Flip>, Error> {
    if count == 0 {
        return Err(Error::Usage("--bytes must be at least 1".into()));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(Error::io(format!("reading {}", path.display())))?
        .len();
    let offsets: Vec<u64> = match at {
        Where::At(o) => {
            let end = o.checked_add(count).filter(|e| *e <= len).ok_or_else(|| {
                Error::Usage(format!(
                    "{count} bytes at offset {o} do not fit in {} ({len} bytes)",
                    path.display()
                ))
            })?;
            (o..end).collect()
        }
        Where::Random { seed } => {
            let mut regions = data_regions(&file, RESERVED_BYTES, len)?;
            if regions.is_empty() {
                // Nothing written past the metadata yet: anywhere past it.
                regions.push((RESERVED_BYTES, len));
            }
            let total: u64 = regions.iter().map(|(s, e)| e - s).sum();
            if total < count {
                return Err(Error::Usage(format!(
                    "only {total} bytes past the first MiB of {} to choose from",
                    path.display()
                )));
            }
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut set = BTreeSet::new();
            while u64::try_from(set.len()).unwrap_or(u64::MAX) < count {
                let mut r = rng.gen_range(0..total);
                for (s, e) in &regions {
                    if r < e - s {
                        set.insert(s + r);
                        break;
                    }
                    r -= e - s;
                }
            }
            set.into_iter().collect()
        }
    };
    let mut flips = Vec::with_capacity(offsets.len());
    for o in offsets {
        let mut b = [0u8; 1];
        file.read_exact_at(&mut b, o)
            .map_err(Error::io(format!("reading byte {o} of {}", path.display())))?;
        let after = b[0] ^ 0xff;
        file.write_all_at(&[after], o)
            .map_err(Error::io(format!("writing byte {o} of {}", path.display())))?;
        flips.push(Flip {
            offset: o,
            before: b[0],
            after,
        });
    }
    file.sync_data()
        .map_err(Error::io(format!("syncing {}", path.display())))?;
    Ok(flips)
}

/// `fault corrupt NODE`.
pub fn corrupt(state: &State, name: &str, count: u64, at: Where) -> Result<Vec<Flip>, Error> {
    let node = state.node(name)?;
    corrupt_file(&node.file, count, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn corrupt_at_offset_flips_exactly_those_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let orig: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &orig).unwrap();
        let flips = corrupt_file(&p, 3, Where::At(100)).unwrap();
        assert_eq!(
            flips.iter().map(|f| f.offset).collect::<Vec<_>>(),
            [100, 101, 102]
        );
        let now = std::fs::read(&p).unwrap();
        for (i, (a, b)) in orig.iter().zip(&now).enumerate() {
            if (100..103).contains(&i) {
                assert_eq!(*b, a ^ 0xff);
            } else {
                assert_eq!(a, b, "byte {i} changed");
            }
        }
        assert!(
            corrupt_file(&p, 2, Where::At(8191)).is_err(),
            "past the end"
        );
    }

    #[test]
    fn random_corruption_prefers_data_past_the_first_mib() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        // One written 64 KiB region at 40 MiB; the rest is a hole.
        let at = 40u64 << 20;
        f.write_all_at(&[7u8; 65536], at).unwrap();
        f.sync_all().unwrap();
        drop(f);
        let flips = corrupt_file(&p, 16, Where::Random { seed: 1 }).unwrap();
        assert_eq!(flips.len(), 16);
        let fs_has_seek_data = {
            let f = std::fs::File::open(&p).unwrap();
            data_regions(&f, RESERVED_BYTES, 64 << 20).unwrap().len() == 1
        };
        for fl in &flips {
            assert!(fl.offset >= RESERVED_BYTES);
            if fs_has_seek_data {
                assert!((at..at + 65536).contains(&fl.offset), "{fl:?} outside data");
                assert_eq!((fl.before, fl.after), (7, 0xf8));
            }
        }
        let again = corrupt_file(&p, 16, Where::Random { seed: 1 }).unwrap();
        assert_eq!(
            flips.iter().map(|f| f.offset).collect::<Vec<_>>(),
            again.iter().map(|f| f.offset).collect::<Vec<_>>(),
            "same seed, same offsets"
        );
    }
}
