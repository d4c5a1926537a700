//! `ubd-engine`: serve a ublk block device from userspace, and manage ublk devices.
#![forbid(unsafe_code)]

mod cmd;
mod size;
mod state;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(name = "ubd-engine", version, about = "Thread-per-core userspace block device engine (Linux ublk)")]
struct Cli {
    #[command(flatten)]
    dev: DevArgs,
    /// More logging (-v debug, -vv trace); UBD_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// How to shape a served device.
#[derive(Debug, Args)]
pub struct DevArgs {
    /// CPUs for the queue threads, e.g. 0-7, 0,2,4 or 0-3,8-11: queue i is pinned to the
    /// i-th CPU. `queue`: each queue thread pinned to the CPUs the kernel maps to its
    /// queue. Default (`any`): not pinned, the scheduler places them.
    #[arg(long, global = true, value_name = "LIST|queue|any")]
    cpus: Option<String>,
    /// Number of hardware queues (one thread each). Default: the number of --cpus, else 1.
    #[arg(long, global = true, value_name = "N")]
    queues: Option<u16>,
    /// Queue depth (requests in flight per queue), 1 to 4096.
    #[arg(long, global = true, value_name = "N", default_value_t = 128)]
    depth: u16,
    /// Device id (N in /dev/ublkbN). Default: the kernel picks one.
    #[arg(long, global = true, value_name = "N")]
    id: Option<u32>,
    /// Largest request size (and per-tag buffer size), e.g. 512K.
    #[arg(long, global = true, value_name = "SIZE", default_value = "512K")]
    max_io_size: String,
    /// Do not try hugepage-backed IO buffers.
    #[arg(long, global = true)]
    no_hugepages: bool,
    /// How request data moves: auto (fastest the kernel offers; none for null), copy
    /// (any kernel), zero-copy (REGISTER_IO_BUF, 6.15+), auto-reg (AUTO_BUF_REG, 6.16+),
    /// none (null only: no data moved, UBLK_F_USER_COPY, 6.5+).
    #[arg(long, global = true, value_enum, default_value_t = BufMode::Auto)]
    buffer_mode: BufMode,
    /// What happens when the daemon dies: reissue (the device stays; `recover` takes
    /// it over and re-issues in-flight IO), fail-io (IO fails until recovered, 6.13+), off.
    #[arg(long, global = true, value_enum, default_value_t = RecoveryArg::Reissue)]
    recovery: RecoveryArg,
    /// How queues fetch and commit requests: per-tag (FETCH/COMMIT_AND_FETCH per request,
    /// any kernel) or batch (UBLK_F_BATCH_IO: multishot fetch, batched commits, 7.0+).
    #[arg(long, global = true, value_enum, default_value_t = IoProtocolArg::PerTag)]
    io_protocol: IoProtocolArg,
    /// Target reads and writes of at least SIZE run on io_uring's worker threads
    /// (IOSQE_ASYNC), so their copies use other CPUs too; off runs all on the queue thread.
    #[arg(long, global = true, value_name = "SIZE|off", default_value = "off")]
    offload: String,
    /// io_uring setup of the queue rings (tuning): auto is coop (plain where the kernel lacks it).
    #[arg(long, global = true, value_enum, default_value_t = RingArg::Auto)]
    ring: RingArg,
    /// On stop, how long requests in flight may take before they are aborted (failed,
    /// or with recovery re-queued), in seconds.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    stop_timeout: u64,
    /// Inject faults (for testing): comma-separated delay=DUR, fail=PCT, range=OFF:LEN,
    /// ops=read|write|all, errno=NAME, stall=AFTER:DUR|inf, panic=N, seed=N.
    #[arg(long, global = true, value_name = "SPEC")]
    fault: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum IoProtocolArg {
    PerTag,
    Batch,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RingArg {
    Auto,
    /// SINGLE_ISSUER | DEFER_TASKRUN.
    Defer,
    /// COOP_TASKRUN.
    Coop,
    Plain,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RecoveryArg {
    Reissue,
    FailIo,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BufMode {
    Auto,
    Copy,
    ZeroCopy,
    AutoReg,
    None,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a file or block device (like the kernel loop driver).
    Loop {
        /// Backing file or block device.
        path: PathBuf,
        /// O_DIRECT on the backing: auto uses it when the backing allows.
        #[arg(long, value_enum, default_value_t = Direct::Auto)]
        direct: Direct,
        /// Logical block size in bytes (default: the backing's, or 512 for files).
        #[arg(long, value_name = "BYTES")]
        block_size: Option<u32>,
    },
    /// Serve a device that completes every request at once without storing data.
    Null {
        /// Device size, e.g. 1G (K/M/G/T suffixes).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Logical block size in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 512)]
        block_size: u32,
    },
    /// Take over a device whose ubd-engine died (kill -9, crash): the target is
    /// re-opened as recorded in /run/ubd-engine/ID.json, in-flight IO is re-issued.
    Recover {
        /// Device id.
        id: u32,
    },
    /// List ublk devices.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Stop and delete ublk devices (their serving process is asked to exit first).
    Del {
        /// Device id.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<u32>,
        /// Delete every ublk device.
        #[arg(long)]
        all: bool,
        /// Also delete devices whose serving process is alive (it is asked to stop).
        #[arg(long)]
        force: bool,
    },
    /// Live per-queue statistics of a device served by ubd-engine (updated every second).
    Stats {
        /// Device id.
        id: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show the ublk features of the running kernel.
    Features {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Direct {
    Auto,
    On,
    Off,
}

fn init_logging(verbose: u8) {
    use tracing_subscriber::EnvFilter;
    let default = match verbose {
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("UBD_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if matches!(cli.command, Command::List { .. } | Command::Features { .. } | Command::Stats { .. }) {
        ubd_engine::os::default_sigpipe();
    }
    let result = match cli.command {
        Command::Loop { path, direct, block_size } => {
            let direct = match direct {
                Direct::Auto => ubd_targets::DirectIo::Auto,
                Direct::On => ubd_targets::DirectIo::On,
                Direct::Off => ubd_targets::DirectIo::Off,
            };
            cmd::serve_loop(&cli.dev, &path, direct, block_size)
        }
        Command::Null { size, block_size } => cmd::serve_null(&cli.dev, &size, block_size),
        Command::List { json } => cmd::list(json),
        Command::Del { id, all, force } => cmd::del(id, all, force),
        Command::Features { json } => cmd::features(json),
        Command::Stats { id, json } => cmd::stats(id, json),
        Command::Recover { id } => cmd::recover(&cli.dev, id),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
