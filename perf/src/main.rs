//! `ubd-perf`: fio comparisons, regression runs and tuning sweeps for ubd-engine.
#![forbid(unsafe_code)]

mod cmd;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "ubd-perf", version, about = "fio comparison, regression and tuning runs for ubd-engine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the workload matrix on every system and report medians and ratios to the kernel loop.
    Compare(CompareArgs),
    /// Run the matrix and compare with the stored baseline for this kernel and machine.
    Regress(RegressArgs),
    /// Run the engine over a grid of queues, depths, CPU lists and buffer modes.
    Sweep(SweepArgs),
}

/// Options every command takes.
#[derive(Debug, Args)]
pub struct Common {
    /// Backing device or file. Default: a brd RAM disk /dev/ram0 (loaded with modprobe brd).
    #[arg(long, value_name = "PATH")]
    backing: Option<PathBuf>,
    /// Let write workloads run on --backing (they destroy its contents).
    #[arg(long)]
    allow_write: bool,
    /// Size of the brd RAM disk made when --backing is not given.
    #[arg(long, value_name = "MIB", default_value_t = 512)]
    backing_mib: u64,
    /// fio runtime per cell, seconds.
    #[arg(long, value_name = "SEC", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    runtime: u32,
    /// fio ramp time per cell (not measured), seconds.
    #[arg(long, value_name = "SEC", default_value_t = 2)]
    ramp: u32,
    /// Rounds (repeats of every cell; systems are interleaved within a round).
    /// Default: 3 (compare, regress), 1 (sweep).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Workloads to run, by job file name (comma-separated). Default: every *.fio in --jobs-dir.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Directory of fio job files.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/jobs"))]
    jobs_dir: PathBuf,
    /// The ubd-engine binary. Default: next to ubd-perf, else on PATH.
    #[arg(long, value_name = "PATH")]
    engine: Option<PathBuf>,
    /// The rublk binary. Default: on PATH, else $UBD_PEERS/bin (perf/install-peers.sh).
    #[arg(long, value_name = "PATH")]
    rublk: Option<PathBuf>,
    /// Output directory. Default: perf/out/CMD-TIME (with --vm: $UBD_VM_SHARED/perf/CMD-TIME).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Run inside the test VM (tests/vm/run.sh), for hosts without ublk.
    #[arg(long)]
    vm: bool,
    /// Kernel for --vm: lts, newest or a version.
    #[arg(long, value_name = "K", default_value = "lts", requires = "vm")]
    kernel: String,
    /// fio's buffers in a hugetlbfs file for every system (the file the shmem system
    /// registers), not malloc: the systems then differ only in what the server does.
    #[arg(long)]
    fio_hugemem: bool,
}

#[derive(Debug, Args)]
pub struct MatrixArgs {
    #[command(flatten)]
    common: Common,
    /// Systems to run (comma-separated names; a trailing * matches a prefix). Default: all found.
    #[arg(long, value_name = "NAMES", value_delimiter = ',')]
    systems: Vec<String>,
    /// Queues of every ublk server.
    #[arg(long, value_name = "N", default_value_t = 2)]
    queues: u32,
    /// Queue depth of every ublk server.
    #[arg(long, value_name = "N", default_value_t = 64)]
    depth: u32,
    /// CPU list for the engine's queue threads (ubd-engine --cpus).
    #[arg(long, value_name = "LIST")]
    cpus: Option<String>,
    /// Measure an engine variant too (repeatable): NAME=ARGS adds SYSTEM@NAME after each
    /// engine system, run with the extra ubd-engine ARGS, e.g. batch='--io-protocol batch'.
    #[arg(long, value_name = "NAME=ARGS")]
    variant: Vec<String>,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    #[command(flatten)]
    m: MatrixArgs,
}

#[derive(Debug, Args)]
pub struct RegressArgs {
    #[command(flatten)]
    m: MatrixArgs,
    /// A cell regresses when its median IOPS is lower than the baseline's by more than PCT percent.
    #[arg(long, value_name = "PCT", default_value_t = 5.0)]
    threshold: f64,
    /// Record this run as the baseline instead of comparing.
    #[arg(long)]
    update: bool,
    /// Baseline directory.
    #[arg(long, value_name = "DIR", default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/baselines"))]
    baselines: PathBuf,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    #[command(flatten)]
    common: Common,
    /// Queue counts to try (comma-separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1,2")]
    queues: Vec<u32>,
    /// Queue depths to try (comma-separated).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "16,64,128")]
    depth: Vec<u32>,
    /// Threads per queue to try (comma-separated; `--threads`, UBLK_F_PER_IO_DAEMON, 6.16+).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "1")]
    threads: Vec<u32>,
    /// A CPU list to try (repeatable; `none` = no --cpus). Default: none.
    #[arg(long, value_name = "LIST")]
    cpus: Vec<String>,
    /// Buffer modes to try (comma-separated). Default: every mode the engine and kernel offer.
    #[arg(long, value_name = "MODES", value_delimiter = ',')]
    buffer_mode: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C or SIGTERM reach fio and the engine too (same process group); this
    // process stays to stop what it started (kloop, rublk) before exiting.
    if let Err(e) =
        ctrlc::set_handler(|| ubd_perf::runner::INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed))
    {
        eprintln!("warning: no SIGINT handler ({e}): an interrupt may leave devices behind");
    }
    let common = match &cli.cmd {
        Cmd::Compare(a) => &a.m.common,
        Cmd::Regress(a) => &a.m.common,
        Cmd::Sweep(a) => &a.common,
    };
    let result = if common.vm {
        vm::reexec(&cli.cmd)
    } else {
        match &cli.cmd {
            Cmd::Compare(a) => cmd::compare(a),
            Cmd::Regress(a) => cmd::regress(a),
            Cmd::Sweep(a) => cmd::sweep(a),
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
