//! The three commands: compare, regress, sweep.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use indicatif::{ProgressBar, ProgressStyle};

use ubd_perf::baseline::{self, Baseline, MachineKey};
use ubd_perf::report::{self, Results, RunInfo, human};
use ubd_perf::runner::{self, Timing, Workload};
use ubd_perf::stats::{self, Sample};
use ubd_perf::systems::{self, EngineCaps, EngineOpts, Env, Kind, System};
use ubd_perf::{plot, systems::find_rublk};

use crate::{Common, CompareArgs, MatrixArgs, RegressArgs, SweepArgs};

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The output directory: --out, else a fresh one named after the command.
pub fn out_dir(c: &Common, cmd: &str) -> PathBuf {
    if let Some(o) = &c.out {
        return o.clone();
    }
    let name = format!("{cmd}-{}", now());
    if c.vm {
        let shared = std::env::var_os("UBD_VM_SHARED").map_or_else(|| PathBuf::from("/tmp/ubd-vm"), PathBuf::from);
        shared.join("perf").join(name)
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("out").join(name)
    }
}

/// The engine binary: --engine, else `ubd-engine` next to this binary, else on PATH.
pub fn engine_path(c: &Common) -> Option<PathBuf> {
    if let Some(e) = &c.engine {
        return Some(e.clone());
    }
    let sibling = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("ubd-engine")));
    let path = std::env::var_os("PATH").unwrap_or_default();
    sibling.into_iter().chain(std::env::split_paths(&path).map(|d| d.join("ubd-engine"))).find(|p| p.is_file())
}

/// What every command needs before measuring.
struct Setup {
    env: Env,
    caps: EngineCaps,
    workloads: Vec<Workload>,
    timing: Timing,
    rounds: u32,
    out: PathBuf,
    /// /dev/ublk-control is there.
    ublk: bool,
    /// The engine binary was found.
    engine: bool,
}

/// Checks fio, ublk and the engine, picks the workloads and prepares the backing.
/// `needs_engine`: fail when the engine or ublk is missing (else continue without).
fn setup(c: &Common, cmd: &str, default_rounds: u32, needs_engine: bool) -> Result<Setup> {
    runner::check_fio()?;
    let workloads = runner::load_workloads(&c.jobs_dir, &c.workloads)?;
    if let Some(b) = &c.backing
        && !c.allow_write
    {
        let mut writers = Vec::new();
        for w in &workloads {
            if w.writes()? {
                writers.push(w.name.as_str());
            }
        }
        if !writers.is_empty() {
            bail!(
                "workloads {} write to {} and destroy its contents: add --allow-write, or pick read-only --workloads",
                writers.join(", "),
                b.display()
            );
        }
    }
    let ublk = runner::check_ublk();
    let engine = engine_path(c);
    let caps = match (&ublk, &engine) {
        (Ok(()), Some(e)) => EngineCaps::probe(e)?,
        (Err(e), _) if needs_engine => bail!("{e}"),
        (_, None) if needs_engine => {
            bail!("ubd-engine binary not found (cargo build --release -p ubd-tools, or --engine PATH)")
        }
        _ => EngineCaps::default(),
    };
    if let (Ok(()), None) = (&ublk, &engine) {
        eprintln!("warning: ubd-engine binary not found (give --engine PATH); engine systems skipped");
    }
    let backing = runner::prepare_backing(c.backing.as_deref(), c.backing_mib)?;
    let backing_size = systems::size_of(&backing)?;
    let out = out_dir(c, cmd);
    let log_dir = out.join("logs");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("cannot create {}", log_dir.display()))?;
    let (ublk_ok, engine_ok) = (ublk.is_ok(), engine.is_some());
    let env = Env {
        engine: engine.unwrap_or_else(|| PathBuf::from("ubd-engine")),
        rublk: c.rublk.clone().or_else(find_rublk),
        ublksrv: systems::find_ublksrv(),
        backing,
        backing_size,
        log_dir,
        fio_iomem: if c.fio_hugemem { Some(format!("mmaphuge:{}", systems::shmem_file()?.display())) } else { None },
    };
    Ok(Setup {
        env,
        caps,
        workloads,
        timing: Timing { runtime: c.runtime, ramp: c.ramp },
        rounds: c.rounds.unwrap_or(default_rounds),
        out,
        ublk: ublk_ok,
        engine: engine_ok,
    })
}

/// First line of `BIN --version`, or empty.
fn version_of(bin: &Path) -> String {
    std::process::Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(|l| l.trim().to_string()))
        .unwrap_or_default()
}

fn sample_line(s: &Sample) -> String {
    let m = &s.metrics;
    let lat = m.main_side();
    format!(
        "r{} {} {}: {} IOPS, {:.1} MB/s, p50 {:.0} µs, p99 {:.0} µs",
        s.round + 1,
        s.system,
        s.workload,
        human(m.iops()),
        m.mbps(),
        lat.p50_ns / 1e3,
        lat.p99_ns / 1e3
    )
}

/// Runs the compare matrix and writes its files; shared by compare and regress.
fn measure(m: &MatrixArgs, cmd: &str) -> Result<(Results, PathBuf)> {
    let s = setup(&m.common, cmd, 3, false)?;
    let variants = m.variant.iter().map(|v| systems::parse_variant(v)).collect::<Result<Vec<_>>>()?;
    let mut all = systems::with_variants(
        systems::default_systems(&s.caps, s.env.rublk.is_some(), s.env.ublksrv.is_some()),
        &variants,
    );
    // The network systems run only when asked for (by name or prefix).
    let named =
        |x: &System| m.systems.iter().any(|p| p.strip_suffix('*').map_or(*p == x.name, |pre| x.name.starts_with(pre)));
    all.extend(systems::network_systems().into_iter().filter(|x| named(x)));
    // Drop what cannot run here, unless asked for by name (then it fails clearly).
    let asked = |x: &System| m.systems.contains(&x.name);
    all.retain(|x| (s.ublk || !x.needs_ublk() || asked(x)) && (s.engine || !x.name.starts_with("engine-") || asked(x)));
    let chosen = systems::select(all, &m.systems)?;
    if !s.ublk && m.systems.is_empty() {
        eprintln!("warning: ublk is not available here (try --vm): only raw and kloop run");
    }
    if chosen.iter().any(System::needs_ublk) {
        runner::check_ublk()?;
    }
    let eo = EngineOpts { queues: m.queues, depth: m.depth, cpus: m.cpus.clone(), threads: 1 };
    let total = s.rounds as usize * chosen.len() * s.workloads.len();
    let names: Vec<&str> = chosen.iter().map(|x| x.name.as_str()).collect();
    eprintln!(
        "ubd-perf {cmd}: {} workloads x [{}] x {} rounds on {} ({} s + {} s ramp each); output in {}",
        s.workloads.len(),
        names.join(", "),
        s.rounds,
        s.env.backing.display(),
        s.timing.runtime,
        s.timing.ramp,
        s.out.display()
    );
    let mut done = 0;
    let started = now();
    let samples = runner::run_matrix(&s.env, &eo, &chosen, &s.workloads, s.timing, s.rounds, &mut |x| {
        done += 1;
        eprintln!("[{done:>3}/{total}] {}", sample_line(x));
    })?;
    let results = Results {
        info: RunInfo {
            machine: MachineKey::current(),
            backing: s.env.backing.display().to_string(),
            backing_size: s.env.backing_size,
            runtime_s: s.timing.runtime,
            ramp_s: s.timing.ramp,
            rounds: s.rounds,
            queues: m.queues,
            depth: m.depth,
            cpus: m.cpus.clone(),
            systems: chosen.iter().map(|x| x.name.clone()).collect(),
            workloads: s.workloads.iter().map(|w| w.name.clone()).collect(),
            ublk_features: s.caps.features.clone(),
            started,
            fio_version: version_of(Path::new("fio")),
            engine_version: version_of(&s.env.engine),
        },
        cells: stats::summarize(&samples),
        samples,
    };
    report::write_all(&s.out, &results)?;
    if let Err(e) = plot::compare_plots(&s.out, &results.cells) {
        eprintln!("warning: no plots: {e:#}");
    }
    Ok((results, s.out))
}

pub fn compare(a: &CompareArgs) -> Result<ExitCode> {
    let (r, out) = measure(&a.m, "compare")?;
    print!("{}", report::markdown_tables(&r.cells));
    eprintln!("wrote {}/{{results.json,results.csv,report.md,iops.png,latency.png}}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// The regress table: one line per cell.
pub fn delta_table(c: &baseline::Comparison, threshold_pct: f64) -> String {
    let mut s = String::from("| workload | system | baseline IOPS | IOPS | change | |\n|---|---|---:|---:|---:|---|\n");
    for d in &c.deltas {
        let flag = if d.regressed { format!("REGRESSED (> {threshold_pct}%)") } else { "ok".into() };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:+.1}% | {flag} |",
            d.workload,
            d.system,
            human(d.baseline_iops),
            human(d.iops),
            d.change * 100.0
        );
    }
    for (w, sys) in &c.new_cells {
        let _ = writeln!(s, "| {w} | {sys} | – | | | not in baseline |");
    }
    if !c.missing_cells.is_empty() {
        let _ = writeln!(s, "\n{} baseline cells were not measured in this run.", c.missing_cells.len());
    }
    s
}

pub fn regress(a: &RegressArgs) -> Result<ExitCode> {
    if !(0.0..100.0).contains(&a.threshold) {
        bail!("--threshold {} must be a percentage from 0 to 100", a.threshold);
    }
    let key = MachineKey::current();
    // Fail before measuring when there is nothing to compare with.
    if !a.update {
        Baseline::load(&a.baselines, &key)?;
    }
    let (r, out) = measure(&a.m, "regress")?;
    let c = &a.m.common;
    if a.update {
        let b = Baseline::from_cells(key, c.runtime, r.info.rounds, &r.info.backing, &r.cells);
        let p =
            b.save(&a.baselines).with_context(|| format!("cannot write a baseline in {}", a.baselines.display()))?;
        print!("{}", report::markdown_tables(&r.cells));
        eprintln!("baseline written: {}", p.display());
        return Ok(ExitCode::SUCCESS);
    }
    let base = Baseline::load(&a.baselines, &key)?;
    let cmp = baseline::compare(&base, &r.cells, a.threshold / 100.0);
    let table = delta_table(&cmp, a.threshold);
    print!("{table}");
    std::fs::write(out.join("regress.md"), &table)?;
    std::fs::write(out.join("regress.json"), serde_json::to_string_pretty(&cmp)? + "\n")?;
    let bad = cmp.regressions().count();
    if bad > 0 {
        eprintln!(
            "error: {bad} of {} cells regressed by more than {}% against {}",
            cmp.deltas.len(),
            a.threshold,
            Baseline::path_in(&a.baselines, &base.key).display()
        );
        return Ok(ExitCode::from(3));
    }
    eprintln!("no regression beyond {}% in {} cells", a.threshold, cmp.deltas.len());
    Ok(ExitCode::SUCCESS)
}

/// One sweep configuration.
#[derive(Debug, Clone)]
struct Config {
    mode: Option<String>,
    eo: EngineOpts,
}

impl Config {
    fn label(&self) -> String {
        let cpus = self.eo.cpus.as_ref().map_or(String::new(), |c| format!(" cpus {c}"));
        format!(
            "{} q{}{} d{}{cpus}",
            self.mode.as_deref().unwrap_or("default"),
            self.eo.queues,
            self.threads(),
            self.eo.depth
        )
    }
    fn series(&self) -> String {
        let cpus = self.eo.cpus.as_ref().map_or(String::new(), |c| format!(" cpus {c}"));
        format!("{} q{}{}{cpus}", self.mode.as_deref().unwrap_or("default"), self.eo.queues, self.threads())
    }
    /// `x2` after the queue count for two threads per queue (q1x2); nothing for one.
    fn threads(&self) -> String {
        if self.eo.threads > 1 { format!("x{}", self.eo.threads) } else { String::new() }
    }
}

pub fn sweep(a: &SweepArgs) -> Result<ExitCode> {
    let s = setup(&a.common, "sweep", 1, true)?;
    let modes: Vec<Option<String>> = if a.buffer_mode.is_empty() {
        if s.caps.buffer_modes.is_empty() {
            vec![None]
        } else {
            s.caps.buffer_modes.iter().cloned().map(Some).collect()
        }
    } else {
        for m in &a.buffer_mode {
            if !s.caps.buffer_modes.contains(m) {
                bail!("buffer mode {m:?} is not available here (available: {})", s.caps.buffer_modes.join(", "));
            }
        }
        a.buffer_mode.iter().cloned().map(Some).collect()
    };
    let cpus: Vec<Option<String>> =
        if a.cpus.is_empty() { vec![None] } else { a.cpus.iter().map(|c| (c != "none").then(|| c.clone())).collect() };
    let mut grid = Vec::new();
    for m in &modes {
        for c in &cpus {
            for &t in &a.threads {
                for &q in &a.queues {
                    for &d in &a.depth {
                        let eo = EngineOpts { queues: q, depth: d, cpus: c.clone(), threads: t };
                        grid.push(Config { mode: m.clone(), eo });
                    }
                }
            }
        }
    }
    let total = grid.len() * s.workloads.len() * s.rounds as usize;
    eprintln!(
        "ubd-perf sweep: {} configurations x {} workloads x {} rounds; output in {}",
        grid.len(),
        s.workloads.len(),
        s.rounds,
        s.out.display()
    );
    let pb = ProgressBar::new(total as u64);
    pb.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}, ETA {eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let mut samples = Vec::new();
    let mut failed = Vec::new();
    for round in 0..s.rounds {
        for i in 0..grid.len() {
            runner::check_interrupted()?;
            let cfg = &grid[(i + round as usize) % grid.len()];
            let sys = System::new(&cfg.label(), Kind::EngineLoop { mode: cfg.mode.clone() });
            let running = match systems::start(&sys, &s.env, &cfg.eo) {
                Ok(r) => r,
                Err(e) => {
                    pb.inc(s.workloads.len() as u64);
                    pb.println(format!("{}: cannot start: {e:#}", sys.name));
                    failed.push(sys.name.clone());
                    continue;
                }
            };
            for w in &s.workloads {
                pb.set_message(format!("{} {}", sys.name, w.name));
                runner::check_interrupted()?;
                let metrics =
                    runner::run_fio(w, &running.dev, s.timing, running.iomem.as_deref().or(s.env.fio_iomem.as_deref()));
                runner::check_interrupted()?;
                let metrics = metrics?;
                let x = Sample { workload: w.name.clone(), system: sys.name.clone(), round, metrics };
                pb.inc(1);
                let line = format!("{} (ETA {}s)", sample_line(&x), pb.eta().as_secs());
                if pb.is_hidden() {
                    eprintln!("[{:>3}/{total}] {line}", pb.position())
                } else {
                    pb.println(line)
                }
                samples.push(x);
            }
            running.stop()?;
        }
    }
    pb.finish_and_clear();
    let cells = stats::summarize(&samples);
    std::fs::write(s.out.join("samples.json"), serde_json::to_string_pretty(&samples)? + "\n")?;
    let mut csv = String::from("workload,mode,queues,depth,cpus,iops_median,spread_pct,mbps,p50_us,p99_us,p999_us\n");
    let mut md = String::from("# ubd-perf sweep\n\n");
    for w in &s.workloads {
        let _ = writeln!(
            md,
            "### {}\n\n| config | IOPS | spread | MB/s | p50 µs | p99 µs |\n|---|---:|---:|---:|---:|---:|",
            w.name
        );
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        let mut best: Option<(&str, f64)> = None;
        for cfg in &grid {
            let Some(c) = cells.iter().find(|c| c.workload == w.name && c.system == cfg.label()) else { continue };
            let _ = writeln!(
                csv,
                "{},{},{},{},\"{}\",{:.0},{:.1},{:.1},{:.1},{:.1},{:.1}",
                w.name,
                cfg.mode.as_deref().unwrap_or("default"),
                cfg.eo.queues,
                cfg.eo.depth,
                cfg.eo.cpus.as_deref().unwrap_or(""),
                c.iops,
                c.spread * 100.0,
                c.mbps,
                c.p50_us,
                c.p99_us,
                c.p999_us
            );
            let _ = writeln!(
                md,
                "| {} | {} | {:.0}% | {:.1} | {:.0} | {:.0} |",
                c.system,
                human(c.iops),
                c.spread * 100.0,
                c.mbps,
                c.p50_us,
                c.p99_us
            );
            let name = cfg.series();
            let pt = (f64::from(cfg.eo.depth), c.iops);
            match series.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(pt),
                None => series.push((name, vec![pt])),
            }
            if best.is_none_or(|(_, b)| c.iops > b) {
                best = Some((&c.system, c.iops));
            }
        }
        if let Some((cfg, iops)) = best {
            let _ = writeln!(md, "\nBest for {}: **{cfg}** ({} IOPS)\n", w.name, human(iops));
            println!("best for {}: {cfg} ({} IOPS median)", w.name, human(iops));
        }
        let png = s.out.join(format!("sweep-{}.png", w.name));
        if let Err(e) = plot::lines(&png, &format!("{}: IOPS vs queue depth", w.name), "queue depth", "IOPS", &series) {
            eprintln!("warning: no plot: {e:#}");
        }
    }
    if !failed.is_empty() {
        let _ = writeln!(md, "Could not start: {}", failed.join("; "));
    }
    std::fs::write(s.out.join("sweep.csv"), csv)?;
    std::fs::write(s.out.join("sweep.md"), &md)?;
    print!("{}", md.trim_start_matches("# ubd-perf sweep\n\n"));
    eprintln!("wrote {}/{{sweep.csv,sweep.md,samples.json,sweep-*.png}}", s.out.display());
    Ok(if failed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// Used by `vm`: a path made absolute against the current directory.
pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}
