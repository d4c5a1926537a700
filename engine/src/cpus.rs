//! CPU lists (`0-3,8-11`) and their checks.

use crate::error::{Error, Result};

/// Parses a Linux cpulist: comma-separated CPUs and inclusive ranges, e.g.
/// `0-7`, `0,2,4`, `0-3,8-11`. Order is kept; duplicates are an error.
pub fn parse_cpulist(s: &str) -> Result<Vec<usize>> {
    let s = s.trim();
    if s.is_empty() {
        return Err(Error::Config("empty CPU list".into()));
    }
    let bad = |why: &str| Error::Config(format!("bad CPU list {s:?}: {why}"));
    let mut cpus = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let num = |t: &str| -> Result<usize> {
            t.trim().parse::<usize>().map_err(|_| bad(&format!("{t:?} is not a CPU number")))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => {
                let n = num(part)?;
                (n, n)
            }
        };
        if lo > hi {
            return Err(bad(&format!("range {part} is backwards")));
        }
        if hi >= 1 << 16 {
            return Err(bad(&format!("CPU {hi} is out of range")));
        }
        for cpu in lo..=hi {
            if cpus.contains(&cpu) {
                return Err(bad(&format!("CPU {cpu} is listed twice")));
            }
            cpus.push(cpu);
        }
    }
    Ok(cpus)
}

/// Formats CPUs as a compact cpulist (`0-3,8`).
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        out.push(if start == end { start.to_string() } else { format!("{start}-{end}") });
        i += 1;
    }
    out.join(",")
}

/// Checks that every CPU in `cpus` is one this process may run on.
pub fn check_available(cpus: &[usize], allowed: &[usize]) -> Result<()> {
    let bad: Vec<usize> = cpus.iter().copied().filter(|c| !allowed.contains(c)).collect();
    if !bad.is_empty() {
        let (noun, verb) = if bad.len() == 1 { ("CPU", "is") } else { ("CPUs", "are") };
        return Err(Error::Config(format!(
            "{noun} {} {verb} not available (this process may use CPUs {})",
            format_cpulist(&bad),
            format_cpulist(allowed)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_forms() {
        assert_eq!(parse_cpulist("0-7").unwrap(), (0..8).collect::<Vec<_>>());
        assert_eq!(parse_cpulist("0,2,4").unwrap(), [0, 2, 4]);
        assert_eq!(parse_cpulist("0-3,8-11").unwrap(), [0, 1, 2, 3, 8, 9, 10, 11]);
        assert_eq!(parse_cpulist(" 5 ").unwrap(), [5]);
        assert_eq!(parse_cpulist("3,1").unwrap(), [3, 1]);
    }

    #[test]
    fn rejects_bad_lists() {
        for bad in ["", " ", "a", "1-", "-1", "3-1", "1,,2", "1,1", "0-2,2", "99999", "1.5"] {
            let err = parse_cpulist(bad).unwrap_err().to_string();
            assert!(err.contains("CPU list"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn availability() {
        check_available(&[0, 1], &[0, 1, 2]).unwrap();
        let e = check_available(&[0, 9], &[0, 1, 2, 3]).unwrap_err().to_string();
        assert_eq!(e, "invalid configuration: CPU 9 is not available (this process may use CPUs 0-3)");
        let e = check_available(&[0, 4, 5, 6, 9], &[0, 1, 2, 3]).unwrap_err().to_string();
        assert_eq!(e, "invalid configuration: CPUs 4-6,9 are not available (this process may use CPUs 0-3)");
    }

    #[test]
    fn formats() {
        assert_eq!(format_cpulist(&[0, 1, 2, 3, 8, 10, 11]), "0-3,8,10-11");
        assert_eq!(format_cpulist(&[]), "");
    }

    proptest! {
        #[test]
        fn format_then_parse_roundtrips(set in proptest::collection::btree_set(0usize..300, 1..40)) {
            let v: Vec<usize> = set.into_iter().collect();
            prop_assert_eq!(parse_cpulist(&format_cpulist(&v)).unwrap(), v);
        }

        #[test]
        fn never_panics(s in "[0-9,\\- a]{0,20}") {
            let _ = parse_cpulist(&s);
        }
    }
}
