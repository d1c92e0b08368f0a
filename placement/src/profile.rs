//! Storage profiles: what an operator asks of a volume, in the vSAN storage-policy sense.
//!
//! A profile is written by people (TOML) and by tools (JSON), kept for years and shown
//! back in error messages, so its document form is a versioned schema with plain string
//! values (`"ec:4+2"`, `"zstd:3"`, `"32KiB"`) and no unknown fields: a typo must be an
//! error, not a silently ignored setting. The schema is documented in `docs/profiles.md`.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{DomainShortage, Error};
use crate::map::ClusterMap;

/// The profile schema version this build reads and writes.
pub const PROFILE_SCHEMA_VERSION: u32 = 1;

/// IOPS limits count I/O in units of this many bytes (as vSAN does): a 64 KiB write costs
/// two, a 4 KiB write one.
pub const IOPS_UNIT_BYTES: u64 = 32 * 1024;

/// The IOPS cost of one I/O of `len` bytes: `ceil(len / 32 KiB)`, at least 1.
#[must_use]
pub fn iops_cost(len: u64) -> u64 {
    len.div_ceil(IOPS_UNIT_BYTES).max(1)
}

/// How a volume's data survives node failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// One copy; any failure loses data.
    None,
    /// `copies` full copies on distinct failure domains (2 to 4).
    Mirror {
        /// Number of copies.
        copies: u8,
    },
    /// Reed-Solomon with `data` data strips and `parity` parity strips (1..=16, 1..=4).
    Ec {
        /// Data strips (K).
        data: u8,
        /// Parity strips (M).
        parity: u8,
    },
    /// The widest erasure code the cluster can hold that survives `ftt` failures.
    EcAuto {
        /// Failures to tolerate (1 or 2).
        ftt: u8,
    },
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::Mirror { copies } => write!(f, "mirror:{copies}"),
            Self::Ec { data, parity } => write!(f, "ec:{data}+{parity}"),
            Self::EcAuto { ftt } => write!(f, "ec:auto:{ftt}"),
        }
    }
}

fn bad_protection(value: &str, problem: impl Into<String>, fix: impl Into<String>) -> Error {
    Error::InvalidField {
        field: "protection",
        value: value.to_owned(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

impl FromStr for Protection {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        const FORMS: &str =
            "Write one of none, mirror:N (N from 2 to 4), ec:K+M (K from 1 to 16, M from 1 to 4) or ec:auto:FTT (FTT 1 or 2).";
        if s == "none" {
            return Ok(Self::None);
        }
        if let Some(ftt) = s.strip_prefix("ec:auto:") {
            return match ftt.parse::<u8>() {
                Ok(ftt @ 1..=2) => Ok(Self::EcAuto { ftt }),
                Ok(_) => Err(bad_protection(
                    s,
                    "adaptive erasure coding tolerates 1 or 2 failures",
                    "Use ec:auto:1 or ec:auto:2, or a fixed ec:K+M with M up to 4.",
                )),
                Err(_) => Err(bad_protection(
                    s,
                    "the number of failures to tolerate after ec:auto: is not a number",
                    "Use ec:auto:1 or ec:auto:2.",
                )),
            };
        }
        if let Some(n) = s.strip_prefix("mirror:") {
            return match n.parse::<u8>() {
                Ok(copies @ 2..=4) => Ok(Self::Mirror { copies }),
                Ok(_) => Err(bad_protection(
                    s,
                    "a mirror keeps 2 to 4 copies",
                    "Use mirror:2, mirror:3 or mirror:4, or none for a single copy.",
                )),
                Err(_) => Err(bad_protection(
                    s,
                    "the number of copies after mirror: is not a number",
                    "Use mirror:2, mirror:3 or mirror:4.",
                )),
            };
        }
        if let Some(km) = s.strip_prefix("ec:") {
            let Some((k, m)) = km.split_once('+') else {
                return Err(bad_protection(
                    s,
                    "an erasure code is written K+M",
                    "Write it as ec:K+M, such as ec:4+2, or ec:auto:1.",
                ));
            };
            let (Ok(data), Ok(parity)) = (k.parse::<u8>(), m.parse::<u8>()) else {
                return Err(bad_protection(
                    s,
                    "K and M must be whole numbers",
                    "Write it as ec:K+M, such as ec:4+2.",
                ));
            };
            if !(1..=16).contains(&data) {
                return Err(bad_protection(
                    s,
                    format!("K = {data} data strips is outside 1 to 16"),
                    "Use K from 1 to 16.",
                ));
            }
            if !(1..=4).contains(&parity) {
                return Err(bad_protection(
                    s,
                    format!("M = {parity} parity strips is outside 1 to 4"),
                    "Use M from 1 to 4 (ec:K+0 is protection none).",
                ));
            }
            return Ok(Self::Ec { data, parity });
        }
        Err(bad_protection(s, "it is not a known protection", FORMS))
    }
}

/// A concrete stripe layout: what a segment is actually written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Layout {
    /// Data pieces (K; 1 for mirrors and `none`).
    pub data: u8,
    /// Parity pieces (M; copies - 1 for mirrors; 0 for `none`).
    pub parity: u8,
    /// Whether the extra pieces are full copies rather than Reed-Solomon parity.
    pub mirror: bool,
}

impl Layout {
    /// Erasure code K+M.
    #[must_use]
    pub const fn ec(data: u8, parity: u8) -> Self {
        Self {
            data,
            parity,
            mirror: false,
        }
    }

    /// `copies` full copies.
    #[must_use]
    pub const fn mirror(copies: u8) -> Self {
        Self {
            data: 1,
            parity: copies.saturating_sub(1),
            mirror: true,
        }
    }

    /// A single copy.
    #[must_use]
    pub const fn single() -> Self {
        Self {
            data: 1,
            parity: 0,
            mirror: false,
        }
    }

    /// Number of pieces per stripe (K+M, or copies).
    #[must_use]
    pub fn pieces(&self) -> usize {
        usize::from(self.data) + usize::from(self.parity)
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.mirror {
            write!(f, "mirror:{}", self.pieces())
        } else if self.parity == 0 && self.data == 1 {
            f.write_str("none")
        } else {
            write!(f, "ec:{}+{}", self.data, self.parity)
        }
    }
}

/// Compression of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Compression {
    /// Stored as written.
    Off,
    /// zstd at a level from 1 to 19.
    Zstd {
        /// Compression level.
        level: u8,
    },
    /// LZ4 (fast, lower ratio).
    Lz4,
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Zstd { level } => write!(f, "zstd:{level}"),
            Self::Lz4 => f.write_str("lz4"),
        }
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        let bad = |problem: &str, fix: &str| Error::InvalidField {
            field: "compression",
            value: s.to_owned(),
            problem: problem.to_owned(),
            fix: fix.to_owned(),
        };
        match s {
            "off" => Ok(Self::Off),
            "lz4" => Ok(Self::Lz4),
            "zstd" => Err(bad(
                "zstd needs a level",
                "Write zstd:LEVEL with a level from 1 to 19, such as zstd:3.",
            )),
            _ => match s.strip_prefix("zstd:").map(str::parse::<u8>) {
                Some(Ok(level @ 1..=19)) => Ok(Self::Zstd { level }),
                Some(_) => Err(bad(
                    "the zstd level must be a whole number from 1 to 19",
                    "Use zstd:1 (fastest) to zstd:19 (smallest); zstd:3 is a good default.",
                )),
                None => Err(bad(
                    "it is not a known compression",
                    "Write off, lz4 or zstd:LEVEL (such as zstd:3).",
                )),
            },
        }
    }
}

/// Encryption of records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encryption {
    /// Nodes hold plaintext.
    Off,
    /// AES-256-GCM with a per-volume key.
    Aes256Gcm,
}

impl fmt::Display for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Off => "off",
            Self::Aes256Gcm => "aes-256-gcm",
        })
    }
}

impl FromStr for Encryption {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "off" => Ok(Self::Off),
            "aes-256-gcm" => Ok(Self::Aes256Gcm),
            _ => Err(Error::InvalidField {
                field: "encryption",
                value: s.to_owned(),
                problem: "it is not a known encryption".into(),
                fix: "Write off or aes-256-gcm.".into(),
            }),
        }
    }
}

/// Whether a volume's space is set aside when it is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SpaceReservation {
    /// Space is taken as data is written.
    Thin,
    /// The volume's full size (times the protection overhead) is reserved at creation.
    Thick,
}

impl fmt::Display for SpaceReservation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Thin => "thin",
            Self::Thick => "thick",
        })
    }
}

impl FromStr for SpaceReservation {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "thin" => Ok(Self::Thin),
            "thick" => Ok(Self::Thick),
            _ => Err(Error::InvalidField {
                field: "space_reservation",
                value: s.to_owned(),
                problem: "it is neither thin nor thick".into(),
                fix: "Write thin (space taken as data is written) or thick (reserved at creation)."
                    .into(),
            }),
        }
    }
}

/// Smallest and largest compression unit, in bytes.
pub const MIN_COMPRESSION_UNIT: u32 = 4 * 1024;
/// Largest compression unit, in bytes.
pub const MAX_COMPRESSION_UNIT: u32 = 128 * 1024;

fn parse_unit(s: &str) -> Result<u32, Error> {
    let bad = |problem: &str| Error::InvalidField {
        field: "compression_unit",
        value: s.to_owned(),
        problem: problem.to_owned(),
        fix: "Use 4KiB, 8KiB, 16KiB, 32KiB, 64KiB or 128KiB.".to_owned(),
    };
    let Some(kib) = s.strip_suffix("KiB").and_then(|n| n.parse::<u32>().ok()) else {
        return Err(bad("it is not a size written as a number of KiB"));
    };
    let bytes = kib.saturating_mul(1024);
    if !(MIN_COMPRESSION_UNIT..=MAX_COMPRESSION_UNIT).contains(&bytes) {
        return Err(bad("it is outside 4KiB to 128KiB"));
    }
    if !bytes.is_power_of_two() {
        return Err(bad("it is not a power of two"));
    }
    Ok(bytes)
}

/// A storage profile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Name: 1 to 64 of `a-z 0-9 - _ .`, starting with a letter or digit.
    pub name: String,
    /// Protection scheme.
    pub protection: Protection,
    /// The failure-domain level at which pieces of a stripe must differ (a level of the
    /// cluster map, such as `node` or `rack`).
    pub failure_domain: String,
    /// Compression.
    pub compression: Compression,
    /// Compression unit in bytes: a power of two from 4 KiB to 128 KiB.
    pub compression_unit: u32,
    /// Encryption.
    pub encryption: Encryption,
    /// IOPS limit, in 32 KiB units ([`iops_cost`]); none means unlimited.
    pub max_iops: Option<NonZeroU64>,
    /// Bandwidth limit in MiB/s; none means unlimited.
    pub max_bandwidth_mib_s: Option<NonZeroU64>,
    /// Thin or thick.
    pub space_reservation: SpaceReservation,
}

/// The document form: all strings and numbers, checked by [`Profile::from_doc`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileDoc {
    schema_version: Option<u32>,
    name: String,
    protection: String,
    failure_domain: String,
    #[serde(default = "default_compression")]
    compression: String,
    #[serde(default = "default_unit")]
    compression_unit: String,
    #[serde(default = "default_encryption")]
    encryption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    checksums: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_iops: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_bandwidth_mib_s: Option<u64>,
    #[serde(default = "default_reservation")]
    space_reservation: String,
}

fn default_compression() -> String {
    "off".into()
}
fn default_unit() -> String {
    "32KiB".into()
}
fn default_encryption() -> String {
    "aes-256-gcm".into()
}
fn default_reservation() -> String {
    "thin".into()
}

impl From<&Profile> for ProfileDoc {
    fn from(p: &Profile) -> Self {
        Self {
            schema_version: Some(PROFILE_SCHEMA_VERSION),
            name: p.name.clone(),
            protection: p.protection.to_string(),
            failure_domain: p.failure_domain.clone(),
            compression: p.compression.to_string(),
            compression_unit: format!("{}KiB", p.compression_unit / 1024),
            encryption: p.encryption.to_string(),
            checksums: None,
            max_iops: p.max_iops.map(NonZeroU64::get),
            max_bandwidth_mib_s: p.max_bandwidth_mib_s.map(NonZeroU64::get),
            space_reservation: p.space_reservation.to_string(),
        }
    }
}

const SYNTAX_FIX: &str =
    "Correct the field named there; the fields and their values are listed in docs/profiles.md.";

impl Profile {
    /// Parses and checks a profile written in TOML.
    pub fn from_toml(text: &str) -> Result<Self, Error> {
        let doc: ProfileDoc = toml::from_str(text).map_err(|e| Error::Syntax {
            what: "profile",
            format: "TOML",
            detail: e.message().trim_end().to_owned() + &crate::map::span_note(text, e.span()),
            fix: SYNTAX_FIX.into(),
        })?;
        Self::from_doc(doc)
    }

    /// Parses and checks a profile written in JSON.
    pub fn from_json(text: &str) -> Result<Self, Error> {
        let doc: ProfileDoc = serde_json::from_str(text).map_err(|e| Error::Syntax {
            what: "profile",
            format: "JSON",
            detail: e.to_string(),
            fix: SYNTAX_FIX.into(),
        })?;
        Self::from_doc(doc)
    }

    /// The profile as TOML (every field written, limits only when set).
    #[must_use]
    pub fn to_toml(&self) -> String {
        toml::to_string(&ProfileDoc::from(self)).unwrap_or_default()
    }

    /// The profile as pretty JSON.
    #[must_use]
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(&ProfileDoc::from(self)).unwrap_or_default()
    }

    fn from_doc(doc: ProfileDoc) -> Result<Self, Error> {
        if doc.schema_version != Some(PROFILE_SCHEMA_VERSION) {
            return Err(Error::SchemaVersion {
                what: "profile",
                found: doc
                    .schema_version
                    .map_or_else(|| "none".to_owned(), |v| v.to_string()),
                supported: PROFILE_SCHEMA_VERSION,
                fix: format!(
                    "Add schema_version = {PROFILE_SCHEMA_VERSION} to the profile and write its fields as docs/profiles.md describes."
                ),
            });
        }
        if let Some(c) = &doc.checksums {
            if c != "crc32c" {
                return Err(Error::InvalidField {
                    field: "checksums",
                    value: c.clone(),
                    problem: "checksums are always on and always crc32c".into(),
                    fix: "Remove the field, or write checksums = \"crc32c\".".into(),
                });
            }
        }
        let nonzero = |field: &'static str, v: Option<u64>| match v {
            None => Ok(None),
            Some(v) => NonZeroU64::new(v)
                .map(Some)
                .ok_or_else(|| Error::InvalidField {
                    field,
                    value: "0".into(),
                    problem: "a limit of 0 would stop all I/O".into(),
                    fix: "Remove the field for no limit, or set a positive number.".into(),
                }),
        };
        let profile = Self {
            name: doc.name,
            protection: doc.protection.parse()?,
            failure_domain: doc.failure_domain,
            compression: doc.compression.parse()?,
            compression_unit: parse_unit(&doc.compression_unit)?,
            encryption: doc.encryption.parse()?,
            max_iops: nonzero("max_iops", doc.max_iops)?,
            max_bandwidth_mib_s: nonzero("max_bandwidth_mib_s", doc.max_bandwidth_mib_s)?,
            space_reservation: doc.space_reservation.parse()?,
        };
        profile.validate()?;
        Ok(profile)
    }

    /// Checks what can be checked without a cluster map (a profile built in code skips
    /// the parser, so this repeats the range checks).
    pub fn validate(&self) -> Result<(), Error> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
            && self
                .name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if !name_ok {
            return Err(Error::InvalidField {
                field: "name",
                value: self.name.clone(),
                problem: "a profile name is 1 to 64 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit".into(),
                fix: "Rename it, such as \"gold\" or \"ec-4-2-rack\".".into(),
            });
        }
        // Round-trip the protection through its text form, which holds the range checks.
        self.protection.to_string().parse::<Protection>()?;
        self.compression.to_string().parse::<Compression>()?;
        parse_unit(&format!("{}KiB", self.compression_unit / 1024))?;
        if self.compression_unit % 1024 != 0 {
            return Err(Error::InvalidField {
                field: "compression_unit",
                value: format!("{} bytes", self.compression_unit),
                problem: "it is not a whole number of KiB".into(),
                fix: "Use 4KiB, 8KiB, 16KiB, 32KiB, 64KiB or 128KiB.".into(),
            });
        }
        if self.failure_domain.is_empty()
            || self.failure_domain.contains('/')
            || self.failure_domain.chars().any(char::is_whitespace)
        {
            return Err(Error::InvalidField {
                field: "failure_domain",
                value: self.failure_domain.clone(),
                problem: "it must name one level of the cluster map, such as node or rack".into(),
                fix: "Write a single level name without '/' or spaces, such as failure_domain = \"node\".".into(),
            });
        }
        Ok(())
    }

    /// Chooses the layout this profile gets on `map`, checking that the map can hold it.
    /// For `ec:auto:FTT` it picks the widest scheme the usable failure domains allow and
    /// says why.
    pub fn resolve(&self, map: &ClusterMap) -> Result<Resolved, Error> {
        self.validate()?;
        let level = map
            .level_index(&self.failure_domain)
            .ok_or_else(|| Error::UnknownLevel {
                profile: self.name.clone(),
                level: self.failure_domain.clone(),
                levels: map.levels().join(", "),
            })?;
        let (usable, unusable) = map.domains(level);
        let have = usable.len();
        let (layout, reason) = match self.protection {
            Protection::None => (
                Layout::single(),
                "protection none keeps one copy and tolerates no failure".to_owned(),
            ),
            Protection::Mirror { copies } => (
                Layout::mirror(copies),
                format!("protection mirror:{copies} is fixed by the profile"),
            ),
            Protection::Ec { data, parity } => (
                Layout::ec(data, parity),
                format!("protection ec:{data}+{parity} is fixed by the profile"),
            ),
            Protection::EcAuto { ftt } => match adaptive(ftt, have) {
                Some((layout, why)) => (
                    layout,
                    format!(
                        "ec:auto:{ftt} chose {}+{}: the cluster has {have} usable failure domains at level {}, and {why}",
                        layout.data, layout.parity, self.failure_domain
                    ),
                ),
                None => {
                    let (needed, hint) = if ftt == 1 {
                        (3, "use mirror:2 (2 domains) for one failure".to_owned())
                    } else {
                        (
                            6,
                            "use mirror:3 (3 domains) or ec:2+2 (4 domains) for two failures"
                                .to_owned(),
                        )
                    };
                    return Err(Error::NotEnoughDomains(Box::new(DomainShortage {
                        protection: self.protection.to_string(),
                        needed,
                        level: self.failure_domain.clone(),
                        usable,
                        unusable,
                        hint: Some(hint),
                    })));
                }
            },
        };
        if layout.pieces() > have {
            return Err(Error::NotEnoughDomains(Box::new(DomainShortage {
                protection: self.protection.to_string(),
                needed: layout.pieces(),
                level: self.failure_domain.clone(),
                usable,
                unusable,
                hint: None,
            })));
        }
        Ok(Resolved {
            layout,
            level,
            reason,
        })
    }
}

/// The adaptive EC table: for FTT 1, 2+1 on 3 to 5 domains and 4+1 from 6; for FTT 2,
/// 4+2 from 6. `None` if the domains are too few.
#[must_use]
pub fn adaptive(ftt: u8, domains: usize) -> Option<(Layout, &'static str)> {
    match (ftt, domains) {
        (1, 3..=5) => Some((
            Layout::ec(2, 1),
            "3 to 5 domains hold 2+1 (1.5x raw space) with a spare domain to rebuild into from 4",
        )),
        (1, 6..) => Some((
            Layout::ec(4, 1),
            "6 or more domains hold 4+1 (1.25x raw space) with a spare domain to rebuild into",
        )),
        (2, 6..) => Some((
            Layout::ec(4, 2),
            "6 or more domains hold 4+2 (1.5x raw space)",
        )),
        _ => None,
    }
}

/// What a profile resolves to on a given map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The stripe layout.
    pub layout: Layout,
    /// Index of the failure-domain level in the map's levels.
    pub level: usize,
    /// Why this layout (for adaptive EC: the domain count and the rule that applied).
    pub reason: String,
}

/// The built-in profiles, with the reasoning in `docs/profiles.md`.
#[must_use]
pub fn builtin_profiles() -> Vec<Profile> {
    let base = |name: &str, protection, compression, unit_kib: u32| Profile {
        name: name.to_owned(),
        protection,
        failure_domain: "node".to_owned(),
        compression,
        compression_unit: unit_kib * 1024,
        encryption: Encryption::Aes256Gcm,
        max_iops: None,
        max_bandwidth_mib_s: None,
        space_reservation: SpaceReservation::Thin,
    };
    vec![
        base(
            "default",
            Protection::EcAuto { ftt: 1 },
            Compression::Zstd { level: 3 },
            32,
        ),
        base(
            "fast",
            Protection::Mirror { copies: 2 },
            Compression::Lz4,
            16,
        ),
        base(
            "durable",
            Protection::EcAuto { ftt: 2 },
            Compression::Zstd { level: 3 },
            32,
        ),
        Profile {
            failure_domain: "rack".to_owned(),
            ..base(
                "rack-mirror",
                Protection::Mirror { copies: 3 },
                Compression::Lz4,
                16,
            )
        },
        base("scratch", Protection::None, Compression::Off, 32),
    ]
}
