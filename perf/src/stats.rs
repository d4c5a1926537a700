//! Repeated measurements: median, spread, ratios, and the per-cell summary of a run.

use serde::{Deserialize, Serialize};

use crate::fio::Metrics;

/// The median of `xs` (mean of the two middle values for an even count); `None`
/// when empty. NaNs sort last.
pub fn median(xs: &[f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// Smallest and largest value; `None` when empty.
pub fn min_max(xs: &[f64]) -> Option<(f64, f64)> {
    let first = *xs.first()?;
    Some(xs.iter().fold((first, first), |(lo, hi), &x| (lo.min(x), hi.max(x))))
}

/// (max - min) / median, as a fraction; 0 for fewer than two values or a zero median.
pub fn spread(xs: &[f64]) -> f64 {
    match (min_max(xs), median(xs)) {
        (Some((lo, hi)), Some(m)) if m > 0.0 => (hi - lo) / m,
        _ => 0.0,
    }
}

/// `a / b`, or `None` when `b` is not positive.
pub fn ratio(a: f64, b: f64) -> Option<f64> {
    (b > 0.0 && a.is_finite()).then(|| a / b)
}

/// Relative change from `base` to `now` (-0.10 = 10% lower); `None` when `base`
/// is not positive.
pub fn change(base: f64, now: f64) -> Option<f64> {
    ratio(now, base).map(|r| r - 1.0)
}

/// One measurement: a workload on a system in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub workload: String,
    pub system: String,
    pub round: u32,
    pub metrics: Metrics,
}

/// The medians of one (workload, system) cell over its rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    pub workload: String,
    pub system: String,
    /// Rounds measured.
    pub n: usize,
    pub iops: f64,
    pub iops_min: f64,
    pub iops_max: f64,
    /// (max - min) / median of IOPS.
    pub spread: f64,
    pub mbps: f64,
    /// Latencies of the main direction (see `Metrics::main_side`), µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Median IOPS over the reference's in the same workload: the kernel loop driver
    /// (`kloop`), or for an nbd system the kernel NBD client over the same transport
    /// (see [`reference_of`](crate::systems::reference_of)).
    pub ratio_kloop: Option<f64>,
    /// Median CPU µs per IO of the serving process (see `Metrics::server_cpu_us_per_io`).
    #[serde(default)]
    pub cpu_us_per_io: Option<f64>,
}

/// Summarises samples into cells, in first-seen order of workloads and systems.
pub fn summarize(samples: &[Sample]) -> Vec<Cell> {
    let mut keys: Vec<(&str, &str)> = Vec::new();
    for s in samples {
        let k = (s.workload.as_str(), s.system.as_str());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    let mut cells: Vec<Cell> = keys
        .iter()
        .map(|&(w, sys)| {
            let ms: Vec<&Metrics> =
                samples.iter().filter(|s| s.workload == w && s.system == sys).map(|s| &s.metrics).collect();
            let col = |f: &dyn Fn(&Metrics) -> f64| -> Vec<f64> { ms.iter().map(|m| f(m)).collect() };
            let iops = col(&|m| m.iops());
            let (lo, hi) = min_max(&iops).unwrap_or_default();
            let med = |f: &dyn Fn(&Metrics) -> f64| median(&col(f)).unwrap_or_default();
            Cell {
                workload: w.to_string(),
                system: sys.to_string(),
                n: ms.len(),
                iops: median(&iops).unwrap_or_default(),
                iops_min: lo,
                iops_max: hi,
                spread: spread(&iops),
                mbps: med(&|m| m.mbps()),
                p50_us: med(&|m| m.main_side().p50_ns / 1e3),
                p99_us: med(&|m| m.main_side().p99_ns / 1e3),
                p999_us: med(&|m| m.main_side().p999_ns / 1e3),
                ratio_kloop: None,
                cpu_us_per_io: median(&ms.iter().filter_map(|m| m.server_cpu_us_per_io).collect::<Vec<_>>()),
            }
        })
        .collect();
    let refs: Vec<(String, String, f64)> =
        cells.iter().map(|c| (c.workload.clone(), c.system.clone(), c.iops)).collect();
    for c in &mut cells {
        let reference = crate::systems::reference_of(&c.system);
        c.ratio_kloop = refs
            .iter()
            .find(|(w, sys, _)| *w == c.workload && sys == reference)
            .and_then(|(_, _, r)| ratio(c.iops, *r));
    }
    cells
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fio::Side;

    #[test]
    fn median_odd_even_empty() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
    }

    #[test]
    fn spread_and_ratio() {
        assert_eq!(min_max(&[2.0, 9.0, 4.0]), Some((2.0, 9.0)));
        assert!((spread(&[90.0, 100.0, 110.0]) - 0.2).abs() < 1e-12);
        assert_eq!(spread(&[7.0]), 0.0);
        assert_eq!(spread(&[0.0, 0.0]), 0.0);
        assert_eq!(ratio(50.0, 100.0), Some(0.5));
        assert_eq!(ratio(50.0, 0.0), None);
        assert_eq!(change(100.0, 90.0).map(|c| (c * 1e9).round() / 1e9), Some(-0.1));
        assert_eq!(change(0.0, 90.0), None);
    }

    fn sample(w: &str, sys: &str, round: u32, iops: f64, p99_ns: f64) -> Sample {
        let side = Side { iops, bw_bytes: iops * 4096.0, ios: 100, p99_ns, ..Side::default() };
        Sample {
            workload: w.into(),
            system: sys.into(),
            round,
            metrics: Metrics { read: side, write: Side::default(), server_cpu_us_per_io: None },
        }
    }

    #[test]
    fn cells_take_medians_and_ratios_to_kloop() {
        let s = vec![
            sample("rr", "kloop", 0, 100.0, 1000.0),
            sample("rr", "engine", 0, 150.0, 3000.0),
            sample("rr", "kloop", 1, 120.0, 2000.0),
            sample("rr", "engine", 1, 90.0, 1000.0),
            sample("rr", "kloop", 2, 110.0, 3000.0),
            sample("rr", "engine", 2, 165.0, 2000.0),
            sample("sw", "engine", 0, 10.0, 1.0),
        ];
        let cells = summarize(&s);
        assert_eq!(cells.len(), 3);
        let e = &cells[1];
        assert_eq!((e.workload.as_str(), e.system.as_str(), e.n), ("rr", "engine", 3));
        assert_eq!(e.iops, 150.0);
        assert_eq!((e.iops_min, e.iops_max), (90.0, 165.0));
        assert!((e.spread - 0.5).abs() < 1e-12);
        assert_eq!(e.p99_us, 2.0);
        assert!((e.mbps - 150.0 * 4096.0 / 1e6).abs() < 1e-9);
        assert_eq!(e.ratio_kloop, Some(150.0 / 110.0));
        assert_eq!(cells[0].ratio_kloop, Some(1.0));
        // No kloop in that workload: no ratio.
        assert_eq!(cells[2].ratio_kloop, None);
    }
}
