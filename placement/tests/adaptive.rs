//! Adaptive erasure coding (`ec:auto:FTT`) at every cluster size from 1 to 12 domains.
#![allow(clippy::unwrap_used)]

mod common;

use common::{map_of, Spec};
use placement::{adaptive, ClusterMap, Error, Layout, NodeState, Profile, Protection};

fn map_with(domains: usize) -> ClusterMap {
    // Two nodes per rack so the count is of racks, not nodes.
    let specs: Vec<Spec> = (0..domains)
        .flat_map(|r| {
            (0..2).map(move |i| Spec {
                path: format!("rack{r}/r{r}n{i}"),
                weight: 4,
                state: NodeState::Up,
            })
        })
        .collect();
    map_of(&["rack", "node"], &specs)
}

fn profile(ftt: u8) -> Profile {
    let mut p = placement::builtin_profiles().remove(0);
    p.protection = Protection::EcAuto { ftt };
    p.failure_domain = "rack".into();
    p
}

#[test]
fn ftt1_at_every_size_from_1_to_12() {
    for domains in 1..=12 {
        let r = profile(1).resolve(&map_with(domains));
        match domains {
            1 | 2 => {
                let e = r.unwrap_err();
                let m = e.to_string();
                assert!(matches!(e, Error::NotEnoughDomains(_)), "{domains}: {e:?}");
                assert!(
                    m.starts_with(&format!(
                        "ec:auto:1 needs 3 failure domains at level rack; the cluster has {domains} ("
                    )),
                    "{m}"
                );
                assert!(m.contains("mirror:2"), "{m}");
            }
            3..=5 => {
                let r = r.unwrap();
                assert_eq!(r.layout, Layout::ec(2, 1), "{domains}");
                assert!(
                    r.reason
                        .contains(&format!("{domains} usable failure domains")),
                    "{}",
                    r.reason
                );
            }
            _ => {
                let r = r.unwrap();
                assert_eq!(r.layout, Layout::ec(4, 1), "{domains}");
                assert!(r.reason.contains("4+1"), "{}", r.reason);
            }
        }
    }
}

#[test]
fn ftt2_at_every_size_from_1_to_12() {
    for domains in 1..=12 {
        let r = profile(2).resolve(&map_with(domains));
        if domains < 6 {
            let m = r.unwrap_err().to_string();
            assert!(
                m.starts_with(&format!(
                    "ec:auto:2 needs 6 failure domains at level rack; the cluster has {domains}"
                )),
                "{m}"
            );
            assert!(m.contains("mirror:3") && m.contains("ec:2+2"), "{m}");
        } else {
            let r = r.unwrap();
            assert_eq!(r.layout, Layout::ec(4, 2), "{domains}");
            assert!(r.reason.contains("4+2"), "{}", r.reason);
        }
    }
}

#[test]
fn adaptive_counts_only_usable_domains() {
    let mut map = map_with(6);
    assert_eq!(profile(1).resolve(&map).unwrap().layout, Layout::ec(4, 1));
    // One rack loses both nodes: 5 usable racks, so a new volume gets 2+1.
    map.set_state(&"r5n0".into(), NodeState::Down).unwrap();
    assert_eq!(profile(1).resolve(&map).unwrap().layout, Layout::ec(4, 1));
    map.set_state(&"r5n1".into(), NodeState::Out).unwrap();
    assert_eq!(profile(1).resolve(&map).unwrap().layout, Layout::ec(2, 1));
}

#[test]
fn table_matches_the_issue() {
    assert_eq!(adaptive(1, 2), None);
    assert_eq!(adaptive(1, 3).map(|x| x.0), Some(Layout::ec(2, 1)));
    assert_eq!(adaptive(1, 5).map(|x| x.0), Some(Layout::ec(2, 1)));
    assert_eq!(adaptive(1, 6).map(|x| x.0), Some(Layout::ec(4, 1)));
    assert_eq!(adaptive(2, 5), None);
    assert_eq!(adaptive(2, 6).map(|x| x.0), Some(Layout::ec(4, 2)));
    assert_eq!(adaptive(3, 12), None);
}
