//! Sizes as operators write them: `4096`, `512MiB`, `10GiB`, `10G`, `1.5TiB` is not
//! accepted (whole numbers only, so the byte count is exact), `100GB` (powers of 1000).

/// Parses a size into bytes.
pub fn parse(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "{s:?} is not a size: write a whole number with an optional unit, such as 10GiB"
        ));
    }
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "T" | "TiB" => 1 << 40,
        "P" | "PiB" => 1 << 50,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "PB" => 1_000_000_000_000_000,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {s:?}: use B, KiB, MiB, GiB, TiB, PiB (or K, M, G, T, P), or KB, MB, GB, TB, PB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A byte count in the largest binary unit that divides it exactly (or two decimals).
pub fn human(bytes: u64) -> String {
    const UNITS: [(&str, u64); 5] = [
        ("PiB", 1 << 50),
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (name, size) in UNITS {
        if bytes >= size {
            if bytes % size == 0 {
                return format!("{}{name}", bytes / size);
            }
            let whole = bytes / size;
            let hundredths = (bytes % size) * 100 / size;
            return format!("{whole}.{hundredths:02}{name}");
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse("4096"), Ok(4096));
        assert_eq!(parse("10GiB"), Ok(10 << 30));
        assert_eq!(parse("10G"), Ok(10 << 30));
        assert_eq!(parse("1 TiB"), Ok(1 << 40));
        assert_eq!(parse("100GB"), Ok(100_000_000_000));
        assert!(parse("1.5GiB").is_err());
        assert!(parse("GiB").is_err());
        assert!(parse("10XB").is_err());
        assert!(parse("99999999999PiB").is_err());
        assert_eq!(human(10 << 30), "10GiB");
        assert_eq!(human(1536 << 20), "1.50GiB");
        assert_eq!(human(512), "512B");
    }
}
