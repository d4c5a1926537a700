//! Human sizes: `4096`, `64K`, `512M`, `1G`, `2T` (binary units; `KiB`/`KB`/`k` accepted).

/// Parses a size in bytes. Rejects zero, junk and overflow with a clear message.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("bad size {s:?}: expected a number with an optional K/M/G/T suffix"));
    }
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}: number too large"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!("bad size {s:?}: unknown unit {unit:?} (use K, M, G or T)"));
        }
    };
    let v = n.checked_mul(1u64 << shift).ok_or_else(|| format!("bad size {s:?}: too large"))?;
    if v == 0 {
        return Err(format!("bad size {s:?}: must be greater than zero"));
    }
    Ok(v)
}

/// Formats bytes compactly (`1.0 GiB`).
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{bytes} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size(" 8 KB "), Ok(8 << 10));
    }

    #[test]
    fn rejects() {
        for bad in ["", "G", "0", "0G", "1X", "-1", "1.5G", "99999999999T", "18446744073709551616"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_size("1X").unwrap_err(), "bad size \"1X\": unknown unit \"X\" (use K, M, G or T)");
    }

    #[test]
    fn formats() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1 << 30), "1.0 GiB");
        assert_eq!(human(1536), "1.5 KiB");
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,12}") { let _ = parse_size(&s); }

        #[test]
        fn units_scale(n in 1u64..1_000_000, u in 0usize..4) {
            let (suffix, shift) = [("K", 10), ("M", 20), ("G", 30), ("T", 40)][u];
            prop_assert_eq!(parse_size(&format!("{n}{suffix}")), Ok(n << shift));
        }
    }
}
