//! Which volumes and profiles the current map cannot satisfy.
//!
//! Run after every map change (a node down, a rack drained) so the operator learns which
//! volumes lost the protection they asked for before a second failure makes it data loss.

use crate::error::Error;
use crate::map::ClusterMap;
use crate::place::Placer;
use crate::profile::{Layout, Profile, Resolved};

/// A volume to check: its profile and, once it has data, the layout it was written with
/// (adaptive EC fixes the layout when the volume is created; a later map change does not
/// change it).
#[derive(Debug, Clone, Copy)]
pub struct VolumeSpec<'a> {
    /// Volume id.
    pub volume: u64,
    /// Its profile.
    pub profile: &'a Profile,
    /// The layout its segments were written with, if any.
    pub layout: Option<Layout>,
}

/// The outcome for one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeCheck {
    /// Volume id.
    pub volume: u64,
    /// Its profile's name.
    pub profile: String,
    /// The layout new segments get, or why the map cannot place them.
    pub result: Result<Layout, Error>,
}

/// Checks every volume against the map.
#[must_use]
pub fn check_volumes(map: &ClusterMap, volumes: &[VolumeSpec<'_>]) -> Vec<VolumeCheck> {
    volumes
        .iter()
        .map(|v| {
            let result = match v.layout {
                None => v.profile.resolve(map).map(|r| r.layout),
                Some(layout) => v
                    .profile
                    .validate()
                    .and_then(|()| {
                        if map.level_index(&v.profile.failure_domain).is_none() {
                            return Err(Error::UnknownLevel {
                                profile: v.profile.name.clone(),
                                level: v.profile.failure_domain.clone(),
                                levels: map.levels().join(", "),
                            });
                        }
                        Placer::new(map, layout, &v.profile.failure_domain)
                    })
                    .map(|p| p.layout()),
            };
            VolumeCheck {
                volume: v.volume,
                profile: v.profile.name.clone(),
                result,
            }
        })
        .collect()
}

/// Resolves every profile on the map: what each would give a new volume, or why it can't.
#[must_use]
pub fn check_profiles(
    map: &ClusterMap,
    profiles: &[Profile],
) -> Vec<(String, Result<Resolved, Error>)> {
    profiles
        .iter()
        .map(|p| (p.name.clone(), p.resolve(map)))
        .collect()
}
