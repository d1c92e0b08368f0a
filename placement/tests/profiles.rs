//! Profiles: parsing, every validation error, built-ins, adaptive EC, and the documents in
//! docs/profiles.md.
#![allow(clippy::unwrap_used)]

mod common;

use common::{racks, Spec};
use placement::{
    builtin_profiles, iops_cost, ClusterMap, Compression, Encryption, Error, Layout, NodeState,
    Profile, Protection, SpaceReservation,
};

const GOOD: &str = r#"
schema_version = 1
name = "gold"
protection = "ec:4+2"
failure_domain = "rack"
compression = "zstd:3"
compression_unit = "32KiB"
encryption = "aes-256-gcm"
max_iops = 20000
max_bandwidth_mib_s = 800
space_reservation = "thick"
"#;

/// The error from `GOOD` with one line replaced (or removed when `new` is empty).
fn with(old_prefix: &str, new: &str) -> Error {
    let text: String = GOOD
        .lines()
        .map(|l| if l.starts_with(old_prefix) { new } else { l })
        .collect::<Vec<_>>()
        .join("\n");
    Profile::from_toml(&text).expect_err(&format!("{new:?} should be rejected"))
}

fn msg(e: &Error) -> String {
    e.to_string()
}

/// Every message is a sentence that says what is wrong and then how to fix it.
fn assert_sentence(m: &str) {
    assert!(m.ends_with('.'), "not a full sentence: {m}");
    assert!(m.len() > 40, "too terse: {m}");
}

#[test]
fn good_profile_parses_with_every_field() {
    let p = Profile::from_toml(GOOD).unwrap();
    assert_eq!(p.name, "gold");
    assert_eq!(p.protection, Protection::Ec { data: 4, parity: 2 });
    assert_eq!(p.failure_domain, "rack");
    assert_eq!(p.compression, Compression::Zstd { level: 3 });
    assert_eq!(p.compression_unit, 32 * 1024);
    assert_eq!(p.encryption, Encryption::Aes256Gcm);
    assert_eq!(p.max_iops.map(|v| v.get()), Some(20000));
    assert_eq!(p.max_bandwidth_mib_s.map(|v| v.get()), Some(800));
    assert_eq!(p.space_reservation, SpaceReservation::Thick);
}

#[test]
fn defaults_apply_to_optional_fields() {
    let p = Profile::from_toml(
        "schema_version = 1\nname = \"m\"\nprotection = \"mirror:2\"\nfailure_domain = \"node\"\n",
    )
    .unwrap();
    assert_eq!(p.compression, Compression::Off);
    assert_eq!(p.compression_unit, 32 * 1024);
    assert_eq!(p.encryption, Encryption::Aes256Gcm);
    assert_eq!(p.space_reservation, SpaceReservation::Thin);
    assert!(p.max_iops.is_none() && p.max_bandwidth_mib_s.is_none());
}

#[test]
fn toml_and_json_round_trip() {
    let mut all = builtin_profiles();
    all.push(Profile::from_toml(GOOD).unwrap());
    for p in all {
        assert_eq!(
            Profile::from_toml(&p.to_toml()).unwrap(),
            p,
            "{}",
            p.to_toml()
        );
        assert_eq!(
            Profile::from_json(&p.to_json()).unwrap(),
            p,
            "{}",
            p.to_json()
        );
        assert!(p.to_toml().contains("schema_version = 1"));
    }
}

#[test]
fn syntax_errors_say_where() {
    let e = Profile::from_toml("schema_version = 1\nname = \n").unwrap_err();
    assert!(matches!(e, Error::Syntax { format: "TOML", .. }), "{e:?}");
    assert!(msg(&e).contains("line 2"), "{e}");
    assert_sentence(&msg(&e));
    let e = Profile::from_json("{\"schema_version\": 1,").unwrap_err();
    assert!(matches!(e, Error::Syntax { format: "JSON", .. }), "{e:?}");
    assert!(msg(&e).contains("docs/profiles.md"), "{e}");
}

#[test]
fn unknown_fields_are_rejected() {
    let e = Profile::from_toml(&format!("{GOOD}\ncompresion = \"lz4\"\n")).unwrap_err();
    assert!(matches!(e, Error::Syntax { .. }), "{e:?}");
    assert!(msg(&e).contains("compresion"), "{e}");
    let p = Profile::from_toml(GOOD).unwrap();
    let json = p.to_json().replacen('{', "{\"replicas\": 3,", 1);
    let e = Profile::from_json(&json).unwrap_err();
    assert!(msg(&e).contains("replicas"), "{e}");
    assert_sentence(&msg(&e));
}

#[test]
fn missing_required_field_is_named() {
    let e = with("name", "");
    assert!(matches!(e, Error::Syntax { .. }), "{e:?}");
    assert!(msg(&e).contains("`name`"), "{e}");
}

#[test]
fn schema_version_missing_or_unsupported() {
    let e = with("schema_version", "");
    assert!(
        matches!(&e, Error::SchemaVersion { found, .. } if found == "none"),
        "{e:?}"
    );
    assert!(msg(&e).contains("Add schema_version = 1"), "{e}");
    let e = with("schema_version", "schema_version = 2");
    assert!(
        matches!(&e, Error::SchemaVersion { found, supported: 1, .. } if found == "2"),
        "{e:?}"
    );
    assert_sentence(&msg(&e));
}

fn assert_field(e: &Error, field: &str, fix_contains: &str) {
    match e {
        Error::InvalidField { field: f, fix, .. } => {
            assert_eq!(*f, field, "{e}");
            assert!(
                fix.contains(fix_contains),
                "fix {fix:?} lacks {fix_contains:?}"
            );
        }
        other => panic!("expected InvalidField for {field}, got {other:?}"),
    }
    assert_sentence(&msg(e));
}

#[test]
fn protection_errors() {
    let cases = [
        ("raid5", "ec:K+M"),
        ("mirror:1", "mirror:2"),
        ("mirror:5", "mirror:4"),
        ("mirror:two", "mirror:2"),
        ("ec:4", "ec:K+M"),
        ("ec:a+b", "ec:4+2"),
        ("ec:0+1", "1 to 16"),
        ("ec:17+2", "1 to 16"),
        ("ec:4+0", "protection none"),
        ("ec:4+5", "1 to 4"),
        ("ec:auto:0", "ec:auto:1"),
        ("ec:auto:3", "ec:auto:2"),
        ("ec:auto:x", "ec:auto:1"),
    ];
    for (value, fix) in cases {
        let e = with("protection", &format!("protection = \"{value}\""));
        assert_field(&e, "protection", fix);
        assert!(msg(&e).contains(value), "{e}");
    }
    for ok in [
        "none",
        "mirror:2",
        "mirror:4",
        "ec:1+1",
        "ec:16+4",
        "ec:auto:1",
        "ec:auto:2",
    ] {
        let p = Profile::from_toml(&GOOD.replace("\"ec:4+2\"", &format!("\"{ok}\""))).unwrap();
        assert_eq!(p.protection.to_string(), ok);
    }
}

#[test]
fn compression_errors() {
    for (value, fix) in [
        ("zstd", "zstd:3"),
        ("zstd:0", "zstd:1"),
        ("zstd:20", "zstd:19"),
        ("gzip", "lz4"),
    ] {
        assert_field(
            &with("compression =", &format!("compression = \"{value}\"")),
            "compression",
            fix,
        );
    }
}

#[test]
fn compression_unit_errors() {
    for value in ["2KiB", "256KiB", "48KiB", "32k", "32768"] {
        assert_field(
            &with(
                "compression_unit",
                &format!("compression_unit = \"{value}\""),
            ),
            "compression_unit",
            "4KiB, 8KiB",
        );
    }
    for ok in [4u32, 8, 16, 32, 64, 128] {
        let p = Profile::from_toml(&GOOD.replace("\"32KiB\"", &format!("\"{ok}KiB\""))).unwrap();
        assert_eq!(p.compression_unit, ok * 1024);
    }
    let mut p = Profile::from_toml(GOOD).unwrap();
    p.compression_unit = 32 * 1024 + 512;
    assert_field(&p.validate().unwrap_err(), "compression_unit", "32KiB");
}

#[test]
fn encryption_checksums_and_reservation_errors() {
    assert_field(
        &with("encryption", "encryption = \"aes-128-cbc\""),
        "encryption",
        "aes-256-gcm",
    );
    assert_field(
        &with("encryption", "checksums = \"off\""),
        "checksums",
        "Remove the field",
    );
    Profile::from_toml(&format!("{GOOD}checksums = \"crc32c\"\n")).unwrap();
    assert_field(
        &with("space_reservation", "space_reservation = \"lazy\""),
        "space_reservation",
        "thin",
    );
}

#[test]
fn zero_limits_are_rejected() {
    assert_field(
        &with("max_iops", "max_iops = 0"),
        "max_iops",
        "Remove the field",
    );
    assert_field(
        &with("max_bandwidth_mib_s", "max_bandwidth_mib_s = 0"),
        "max_bandwidth_mib_s",
        "positive",
    );
    let e = with("max_iops", "max_iops = -5");
    assert!(matches!(e, Error::Syntax { .. }), "{e:?}");
}

#[test]
fn name_and_failure_domain_errors() {
    for bad in ["", "Gold", "gold!", "-x", &"a".repeat(65)] {
        assert_field(
            &with("name", &format!("name = \"{bad}\"")),
            "name",
            "Rename",
        );
    }
    for bad in ["", "dc/rack", "my rack"] {
        assert_field(
            &with("failure_domain", &format!("failure_domain = \"{bad}\"")),
            "failure_domain",
            "single level",
        );
    }
}

#[test]
fn iops_are_counted_in_32k_units() {
    assert_eq!(iops_cost(0), 1);
    assert_eq!(iops_cost(512), 1);
    assert_eq!(iops_cost(32 * 1024), 1);
    assert_eq!(iops_cost(32 * 1024 + 1), 2);
    assert_eq!(iops_cost(128 * 1024), 4);
}

fn four_racks() -> ClusterMap {
    racks(&[vec![1, 1], vec![1, 1], vec![1, 1], vec![1, 1]])
}

#[test]
fn not_enough_domains_message_matches_the_issue() {
    let map = {
        let mut specs = Vec::new();
        for r in 1..=4 {
            specs.push(Spec {
                path: format!("rack{r}/node{r}"),
                weight: 1,
                state: NodeState::Up,
            });
        }
        common::map_of(&["rack", "node"], &specs)
    };
    let p = Profile::from_toml(GOOD).unwrap();
    let e = p.resolve(&map).unwrap_err();
    let m = msg(&e);
    assert!(
        m.starts_with(
            "ec:4+2 needs 6 failure domains at level rack; the cluster has 4 (rack1, rack2, rack3, rack4)."
        ),
        "{m}"
    );
    assert!(m.contains("Add 2 more rack failure domains"), "{m}");
    assert_sentence(&m);
}

#[test]
fn domains_without_up_nodes_are_named_but_not_counted() {
    let mut map = four_racks();
    for n in ["r3n0", "r3n1"] {
        map.set_state(&n.into(), NodeState::Down).unwrap();
    }
    let mut p = Profile::from_toml(GOOD).unwrap();
    p.protection = Protection::Mirror { copies: 4 };
    let m = msg(&p.resolve(&map).unwrap_err());
    assert!(m.contains("the cluster has 3 (rack0, rack1, rack2)"), "{m}");
    assert!(
        m.contains("no up node with a non-zero weight: rack3"),
        "{m}"
    );
    map.set_weight(&"r3n0".into(), 0).unwrap();
    map.set_state(&"r3n0".into(), NodeState::Up).unwrap();
    assert!(p.resolve(&map).is_err(), "weight 0 must not count");
    map.set_weight(&"r3n0".into(), 5).unwrap();
    assert_eq!(p.resolve(&map).unwrap().layout, Layout::mirror(4));
}

#[test]
fn unknown_level_is_explained() {
    let map = four_racks();
    let mut p = Profile::from_toml(GOOD).unwrap();
    p.failure_domain = "host".into();
    let e = p.resolve(&map).unwrap_err();
    assert!(matches!(e, Error::UnknownLevel { .. }), "{e:?}");
    let m = msg(&e);
    assert!(
        m.contains("no level \"host\" (its levels are rack, node)"),
        "{m}"
    );
    assert_sentence(&m);
}

#[test]
fn builtins_are_valid_and_resolve_on_a_small_cluster() {
    let map = common::map_of(
        &["rack", "node"],
        &(0..6)
            .map(|i| Spec {
                path: format!("rack{}/n{i}", i % 3),
                weight: 10,
                state: NodeState::Up,
            })
            .collect::<Vec<_>>(),
    );
    let names: Vec<String> = builtin_profiles().into_iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        ["default", "fast", "durable", "rack-mirror", "scratch"]
    );
    for p in builtin_profiles() {
        p.validate().unwrap();
        let r = p.resolve(&map).unwrap();
        assert!(!r.reason.is_empty());
    }
}

/// Every ```toml block in docs/profiles.md is a valid profile; every ```json block too.
#[test]
fn documented_examples_parse() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/profiles.md"))
        .unwrap();
    let mut count = 0;
    for (fence, parse) in [
        (
            "```toml\n",
            Profile::from_toml as fn(&str) -> Result<Profile, Error>,
        ),
        ("```json\n", Profile::from_json),
    ] {
        for block in doc.split(fence).skip(1) {
            let body = block.split("```").next().unwrap();
            parse(body).unwrap_or_else(|e| panic!("documented example fails: {e}\n{body}"));
            count += 1;
        }
    }
    assert!(
        count >= 3,
        "expected the documented examples, found {count}"
    );
}
