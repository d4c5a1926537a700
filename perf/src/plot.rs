//! PNG plots (plotters, bitmap backend). Text is drawn with ab_glyph from a
//! TrueType font read at run time: `$UBD_PERF_FONT`, else DejaVu Sans from
//! Debian's `fonts-dejavu-core` (/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, anyhow, bail};
use plotters::prelude::*;

use crate::stats::Cell;

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

const PALETTE: [RGBColor; 9] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(23, 190, 207),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// Loads and registers the font once; the error says which package to install.
pub fn ensure_font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let candidates: Vec<PathBuf> = std::env::var_os("UBD_PERF_FONT")
            .map(PathBuf::from)
            .into_iter()
            .chain(FONT_PATHS.iter().map(PathBuf::from))
            .collect();
        let path = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            "no TrueType font for plot text (apt-get install fonts-dejavu-core, or set UBD_PERF_FONT)".to_string()
        })?;
        let bytes = std::fs::read(path).map_err(|e| format!("cannot read font {}: {e}", path.display()))?;
        // plotters keeps fonts for the life of the process: leak one copy.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{} is not a usable TrueType font", path.display()))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn draw_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting failed: {e:?}")
}

/// One panel of horizontal bars: for each row, one bar per series value.
struct Panel<'a> {
    title: String,
    rows: Vec<(String, Vec<f64>)>,
    series: &'a [&'a str],
    log: bool,
    unit: &'a str,
}

type Chart<'a, X> = ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>;

/// Writes "name  value" at the left end of each row.
fn draw_labels<X: Ranged<ValueType = f64>>(c: &mut Chart<'_, X>, p: &Panel<'_>, x0: f64) -> Result<()> {
    for (i, (name, v)) in p.rows.iter().enumerate() {
        #[allow(clippy::cast_precision_loss)]
        let y = i as f64 + 0.5;
        let text = format!("{name}  {}{}", crate::report::human(v.first().copied().unwrap_or(0.0)), p.unit);
        c.draw_series(std::iter::once(Text::new(text, (x0, y), ("sans-serif", 13).into_font()))).map_err(draw_err)?;
    }
    Ok(())
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, p: &Panel<'_>) -> Result<()> {
    let n = p.rows.len().max(1);
    let k = p.series.len().max(1);
    let vals = p.rows.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| *v > 0.0);
    let max = vals.clone().fold(0.0_f64, f64::max).max(1.0) * 1.15;
    let min = vals.fold(f64::MAX, f64::min).min(max / 10.0).max(1e-3) / 2.0;
    #[allow(clippy::cast_precision_loss)]
    let (nf, kf) = (n as f64, k as f64);
    let mut b = ChartBuilder::on(area);
    b.caption(&p.title, ("sans-serif", 18)).margin(8).x_label_area_size(28).y_label_area_size(0);
    let bars = |i: usize, j: usize, v: f64, x0: f64| {
        #[allow(clippy::cast_precision_loss)]
        let (fi, fj) = (i as f64, j as f64);
        let h = 0.8 / kf;
        let y0 = fi + 0.1 + fj * h;
        Rectangle::new([(x0, y0), (v.max(x0), y0 + h * 0.9)], color(j).mix(0.75).filled())
    };
    if p.log {
        let mut c = b.build_cartesian_2d((min..max).log_scale(), nf..0.0).map_err(draw_err)?;
        c.configure_mesh().disable_y_mesh().y_labels(0).x_labels(6).draw().map_err(draw_err)?;
        for (j, name) in p.series.iter().enumerate() {
            let rects: Vec<_> =
                p.rows.iter().enumerate().filter_map(|(i, (_, v))| v.get(j).map(|&v| bars(i, j, v, min))).collect();
            c.draw_series(rects)
                .map_err(draw_err)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color(j).filled()));
        }
        draw_labels(&mut c, p, min * 1.05)?;
        if k > 1 {
            c.configure_series_labels()
                .border_style(BLACK)
                .background_style(WHITE.mix(0.8))
                .draw()
                .map_err(draw_err)?;
        }
    } else {
        let mut c = b.build_cartesian_2d(0.0..max, nf..0.0).map_err(draw_err)?;
        c.configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_labels(5)
            .x_label_formatter(&|x| crate::report::human(*x))
            .draw()
            .map_err(draw_err)?;
        for j in 0..p.series.len() {
            let rects: Vec<_> =
                p.rows.iter().enumerate().filter_map(|(i, (_, v))| v.get(j).map(|&v| bars(i, j, v, 0.0))).collect();
            c.draw_series(rects).map_err(draw_err)?;
        }
        draw_labels(&mut c, p, max * 0.01)?;
    }
    Ok(())
}

fn workloads(cells: &[Cell]) -> Vec<&str> {
    let mut w: Vec<&str> = Vec::new();
    for c in cells {
        if !w.contains(&c.workload.as_str()) {
            w.push(&c.workload);
        }
    }
    w
}

fn panels(path: &Path, panels: &[Panel<'_>]) -> Result<()> {
    if panels.is_empty() {
        bail!("nothing to plot");
    }
    ensure_font()?;
    let cols = if panels.len() > 1 { 2 } else { 1 };
    let rows = panels.len().div_ceil(cols);
    let per_row_h = panels.iter().map(|p| 90 + 28 * p.rows.len() * p.series.len().min(2)).max().unwrap_or(300);
    let w = u32::try_from(cols * 640)?;
    let h = u32::try_from(rows * per_row_h.max(260))?;
    let root = BitMapBackend::new(path, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let areas = root.split_evenly((rows, cols));
    for (a, p) in areas.iter().zip(panels) {
        draw_panel(a, p)?;
    }
    root.present().map_err(draw_err)?;
    Ok(())
}

/// iops.png: per workload, median IOPS per system; latency.png: per workload,
/// p50/p99/p99.9 completion latency per system (log scale, µs).
pub fn compare_plots(dir: &Path, cells: &[Cell]) -> Result<Vec<PathBuf>> {
    let one = ["IOPS"];
    let lat = ["p50", "p99", "p99.9"];
    let mut iops = Vec::new();
    let mut latency = Vec::new();
    for w in workloads(cells) {
        let cs: Vec<&Cell> = cells.iter().filter(|c| c.workload == w).collect();
        iops.push(Panel {
            title: format!("{w}: IOPS (median)"),
            rows: cs.iter().map(|c| (c.system.clone(), vec![c.iops])).collect(),
            series: &one,
            log: false,
            unit: "",
        });
        latency.push(Panel {
            title: format!("{w}: completion latency, µs (log)"),
            rows: cs.iter().map(|c| (c.system.clone(), vec![c.p50_us, c.p99_us, c.p999_us])).collect(),
            series: &lat,
            log: true,
            unit: " µs p50",
        });
    }
    let a = dir.join("iops.png");
    let b = dir.join("latency.png");
    panels(&a, &iops)?;
    panels(&b, &latency)?;
    Ok(vec![a, b])
}

/// A line plot: one line per series of (x, y) points, e.g. IOPS vs depth per mode.
pub fn lines(path: &Path, title: &str, x_desc: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    ensure_font()?;
    let pts = series.iter().flat_map(|(_, p)| p.iter().copied());
    let (x0, x1) = pts.clone().fold((f64::MAX, f64::MIN), |(a, b), (x, _)| (a.min(x), b.max(x)));
    let y1 = pts.fold(0.0_f64, |a, (_, y)| a.max(y)).max(1.0) * 1.1;
    if x0 > x1 {
        bail!("nothing to plot");
    }
    let (x0, x1) = if x0 == x1 { (x0 - 1.0, x1 + 1.0) } else { (x0, x1) };
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0.0..y1)
        .map_err(draw_err)?;
    c.configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .y_label_formatter(&|y| crate::report::human(*y))
        .draw()
        .map_err(draw_err)?;
    for (j, (name, p)) in series.iter().enumerate() {
        let col = color(j);
        c.draw_series(LineSeries::new(p.iter().copied(), col.stroke_width(2)))
            .map_err(draw_err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], col.stroke_width(2)));
        c.draw_series(p.iter().map(|&xy| Circle::new(xy, 3, col.filled()))).map_err(draw_err)?;
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_png(p: &Path) -> bool {
        std::fs::read(p).is_ok_and(|b| b.starts_with(b"\x89PNG") && b.len() > 2000)
    }

    #[test]
    fn compare_and_line_plots_are_pngs() {
        if let Err(e) = ensure_font() {
            eprintln!("SKIP compare_and_line_plots_are_pngs: {e}");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let r = crate::report::tests_support::results();
        let files = compare_plots(dir.path(), &r.cells).unwrap();
        assert_eq!(files.len(), 2);
        assert!(files.iter().all(|f| is_png(f)));
        let p = dir.path().join("sweep.png");
        let s = vec![("copy q2".to_string(), vec![(1.0, 10.0), (8.0, 50.0)]), ("zc".to_string(), vec![(1.0, 12.0)])];
        lines(&p, "IOPS vs depth", "depth", "IOPS", &s).unwrap();
        assert!(is_png(&p));
        lines(&p, "empty", "x", "y", &[]).unwrap_err();
        compare_plots(dir.path(), &[]).unwrap_err();
    }
}
