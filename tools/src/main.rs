//! `ubd-engine`: serve a ublk block device from userspace, and manage ublk devices.
#![forbid(unsafe_code)]

mod cmd;
mod config;
mod docs;
mod metrics;
mod service;
mod size;
mod state;

use std::path::PathBuf;

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use ubd_engine::BufferChoice;
use ubd_engine::IoProtocol;
use ubd_engine::Recovery;
use ubd_engine::RingMode;
use ubd_targets::DirectIo;

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
    /// user-copy (UBLK_F_USER_COPY, 6.5+: data moved by reads and writes of /dev/ublkcN),
    /// none (null only: no data moved, UBLK_F_USER_COPY, 6.5+).
    #[arg(long, global = true, value_enum, default_value_t = BufferChoice::Auto)]
    buffer_mode: BufferChoice,
    /// What happens when the daemon dies: reissue (the device stays; `recover` takes
    /// it over and re-issues in-flight IO), fail-io (IO fails until recovered, 6.13+), off.
    /// Default: reissue; off for an unprivileged device (which the kernel never keeps).
    #[arg(long, global = true, value_enum)]
    recovery: Option<Recovery>,
    /// Threads per queue (UBLK_F_PER_IO_DAEMON, 6.16+): each with its own ring, serving
    /// a block of 1/N of the queue's tags, so one queue spreads over N CPUs.
    #[arg(long, global = true, value_name = "N", default_value_t = 1)]
    threads: u16,
    /// Shared memory for zero-copy IO (UBLK_F_SHMEM_ZC, 7.1+): a file (hugetlbfs, tmpfs,
    /// a memfd's /proc/PID/fd/N) that clients map MAP_SHARED and do O_DIRECT IO from;
    /// created (or grown) to SIZE if given; ro registers it read-only (writes only).
    #[arg(long, global = true, value_name = "PATH[,size=SIZE][,ro]")]
    shmem: Option<String>,
    /// Create an unprivileged device (UBLK_F_UNPRIVILEGED_DEV, 6.5+), owned by this uid.
    /// Implied when this process lacks CAP_SYS_ADMIN (not root); for root in a container
    /// whose capabilities the host does not honour.
    #[arg(long, global = true)]
    unprivileged: bool,
    /// How queues fetch and commit requests: per-tag (FETCH/COMMIT_AND_FETCH per request,
    /// any kernel) or batch (UBLK_F_BATCH_IO: multishot fetch, batched commits, 7.0+).
    #[arg(long, global = true, value_enum, default_value_t = IoProtocol::PerTag)]
    io_protocol: IoProtocol,
    /// Target reads and writes of at least SIZE run on io_uring's worker threads
    /// (IOSQE_ASYNC), so their copies use other CPUs too; off runs all on the queue thread.
    #[arg(long, global = true, value_name = "SIZE|off", default_value = "off")]
    offload: String,
    /// io_uring setup of the queue rings (tuning): auto is coop (plain where the kernel lacks it).
    #[arg(long, global = true, value_enum, default_value_t = RingChoice::AUTO)]
    ring: RingChoice,
    /// On stop, how long requests in flight may take before they are aborted (failed,
    /// or with recovery re-queued), in seconds.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 30)]
    stop_timeout: u64,
    /// Inject faults (for testing): comma-separated delay=DUR, fail=PCT, range=OFF:LEN,
    /// ops=read|write|all, errno=NAME, stall=AFTER:DUR|inf, panic=N, seed=N.
    #[arg(long, global = true, value_name = "SPEC")]
    fault: Option<String>,
    /// A read-only device (UBLK_ATTR_READ_ONLY): writes fail with EROFS; a loop backing
    /// is opened read-only. A backing or export that allows no writes gives a read-only
    /// device without it.
    #[arg(long, global = true)]
    read_only: bool,
    /// Serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9101).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    metrics: Option<String>,
    /// For `upgrade`: take device ID over from the daemon serving it, once it lets go.
    #[arg(long, global = true, hide = true, value_name = "ID")]
    takeover: Option<u32>,
    /// How to start: set by `run` and `--takeover`, not an option.
    #[arg(skip)]
    start: Start,
    /// The configuration entry this device comes from (`run`).
    #[arg(skip)]
    origin: Option<config::DeviceConfig>,
}

/// How a serving command brings its device up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Start {
    /// Add a new device.
    #[default]
    New,
    /// `run`: add device ID, or recover it if the kernel still holds it from a daemon
    /// that died (the state file must name the same target).
    NewOrRecover(u32),
    /// `--takeover ID` (`upgrade`): wait for the serving daemon to let go, then recover.
    Takeover(u32),
}

impl DevArgs {
    /// `e`, placed at the configuration line of `key` when the device comes from one.
    pub fn at_key(&self, key: &str, e: impl std::fmt::Display) -> anyhow::Error {
        match &self.origin {
            Some(o) => anyhow::anyhow!("{}: device {}: key `{key}`: {e}", o.at(key), o.id),
            None => anyhow::anyhow!("{e}"),
        }
    }
}

/// `--ring`: `auto` (None: the engine picks), or one of the [`RingMode`] values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingChoice(pub Option<RingMode>);

impl RingChoice {
    const AUTO: Self = Self(None);
}

impl ValueEnum for RingChoice {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            Self::AUTO,
            Self(Some(RingMode::DeferTaskrun)),
            Self(Some(RingMode::CoopTaskrun)),
            Self(Some(RingMode::Plain)),
        ]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        match self.0 {
            None => Some(clap::builder::PossibleValue::new("auto")),
            Some(mode) => mode.to_possible_value(),
        }
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a file or block device (like the kernel loop driver).
    Loop {
        /// Backing file or block device.
        path: PathBuf,
        /// O_DIRECT on the backing: auto uses it when the backing allows.
        #[arg(long, value_enum, default_value_t = DirectIo::Auto)]
        direct: DirectIo,
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
    /// An NBD server's export: nbd://HOST[:PORT][/EXPORT] or
    /// nbd+unix:///[EXPORT]?socket=PATH (nbdkit, qemu-nbd, nbd-server...). One
    /// connection per queue when the server allows several (NBD_FLAG_CAN_MULTI_CONN).
    Nbd {
        uri: String,
        /// Connections to the server, one per queue (default: --queues, or one if the
        /// server does not allow several).
        #[arg(long, value_name = "N")]
        connections: Option<u16>,
        /// How long requests wait for a lost connection to be re-made before they fail
        /// with EIO (the device stays, and works again when the server is back).
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        reconnect_timeout: u64,
        /// A request with no reply for this long fails with EIO and its connection is
        /// re-made (default: wait as long as it takes).
        #[arg(long, value_name = "SECS")]
        io_timeout: Option<u64>,
    },
    /// A Ceph RBD image through librbd: POOL/IMAGE, or POOL/IMAGE@SNAP (read-only).
    /// One queue; completions are collected on the queue thread (librbd's eventfd).
    Rbd {
        #[arg(value_name = "POOL/IMAGE[@SNAP]")]
        image: String,
        /// The cluster's configuration (default /etc/ceph/CLUSTER.conf).
        #[arg(long, value_name = "PATH")]
        conf: Option<std::path::PathBuf>,
        /// The Ceph client's id, as in client.ID (default admin). (`--id` is the device's.)
        #[arg(long, value_name = "NAME")]
        client_id: Option<String>,
        /// The client's keyring (default: what the configuration says).
        #[arg(long, value_name = "PATH")]
        keyring: Option<std::path::PathBuf>,
        /// The cluster's name (default ceph).
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// A request librbd has not finished in this long fails with ETIMEDOUT (default:
        /// wait as long as it takes).
        #[arg(long, value_name = "SECS")]
        io_timeout: Option<u64>,
        /// Reaching a monitor and authenticating give up after this long.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        connect_timeout: u64,
        /// A Ceph client option, set after the configuration file is read (repeatable),
        /// e.g. rbd_cache=false or debug_rbd=0/0. An unknown name is an error.
        #[arg(long = "ceph-option", value_name = "NAME=VALUE")]
        ceph_option: Vec<String>,
    },
    /// A test device: RAM served by an in-process thread over a socket (the target API
    /// for targets that are not a file, end to end). Its data dies with the process.
    #[command(hide = true)]
    Sockram {
        /// Device size, e.g. 64M.
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Logical block size in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 512)]
        block_size: u32,
    },
    /// A host-managed zoned device in memory (UBLK_F_ZONED, Linux 6.6+): sequential
    /// zones with write pointers, zone append, open/close/finish/reset and REPORT ZONES,
    /// open and active zone limits; served in buffer mode user-copy. Its data dies with
    /// the process.
    Zoned {
        /// Device size, e.g. 1G (a multiple of the zone size).
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// Zone size, a power of two from 64K, e.g. 64M.
        #[arg(long, value_name = "SIZE", default_value = "64M")]
        zone_size: String,
        /// Conventional (randomly writable) zones at the start of the device.
        #[arg(long, value_name = "N", default_value_t = 0)]
        conventional: u32,
        /// Zones that may be open at once (0: no limit).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_open: u32,
        /// Zones that may be open or closed at once (0: no limit).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_active: u32,
        /// Logical block size in bytes.
        #[arg(long, value_name = "BYTES", default_value_t = 4096)]
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
    /// Stop and delete ublk devices (their serving process is asked to exit first). A
    /// device that is open (mounted, held by a process) is refused, naming its holders.
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
        /// Remove the device even while it is open (mounted, or held by a process):
        /// its users get EIO. Without it an open device is never deleted.
        #[arg(long)]
        yank: bool,
    },
    /// Change a served device's size at once (UPDATE_SIZE, Linux 6.16+): a loop backing
    /// file grows with it; shrinking needs --force (it cuts off data).
    Resize {
        /// Device id.
        id: u32,
        /// The new size, e.g. 2G (K/M/G/T suffixes), a multiple of the block size.
        size: String,
        /// Shrink the device (and a backing file) even though data past SIZE is lost.
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
    /// For the udev rule (70-ubd-engine.rules): the owner of ublk node NAME (ublkcN,
    /// ublkbN, ublkbNpM) as UBD_OWNER_UID=/UBD_OWNER_GID= lines when it belongs to an
    /// unprivileged device; nothing for an ordinary device.
    UdevOwner {
        /// The kernel's name of the node (udev's %k).
        name: String,
    },
    /// Show the ublk features of the running kernel.
    Features {
        #[arg(long)]
        json: bool,
    },
    /// Serve device --id N of a configuration (TOML) in the foreground, as the systemd
    /// unit does. A device the kernel still holds from a daemon that died is recovered
    /// (its state file must name the same target) instead of added.
    Run {
        /// A configuration file, or a directory of *.toml files.
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Check a configuration: every device's keys and values, without starting any.
    CheckConfig {
        /// A configuration file, or a directory of *.toml files.
        #[arg(long, value_name = "PATH", default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Hand a served device to a new process of (possibly) another ubd-engine binary,
    /// losing no IO: the new one is started and checked first; then the old one lets go
    /// (QUIESCE_DEV on Linux 6.16+, else kill -9) and the new one recovers the device.
    Upgrade {
        /// Device id.
        id: u32,
        /// The binary to run (default: this one).
        #[arg(long, value_name = "PATH")]
        binary: Option<PathBuf>,
        /// How long the new process may take to get ready, and then to take over.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// Write the manual pages and the bash, zsh and fish completions into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
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
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_logging(cli.verbose);
    if matches!(cli.command, Command::List { .. } | Command::Features { .. } | Command::Stats { .. }) {
        ubd_engine::os::default_sigpipe();
    }
    if let Some(id) = cli.dev.takeover {
        cli.dev.start = Start::Takeover(id);
        cli.dev.id = Some(id);
    }
    let result = match cli.command {
        Command::Run { config } => run(&matches, &cli.dev, &config),
        command => dispatch(command, &cli.dev),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `run --config PATH --id N`: the device's command line comes from the configuration.
fn run(matches: &clap::ArgMatches, dev: &DevArgs, path: &std::path::Path) -> anyhow::Result<()> {
    use clap::parser::ValueSource;
    let cli = Cli::command();
    let sub = matches.subcommand_matches("run");
    for a in cli.get_arguments().filter(|a| a.is_global_set()) {
        let id = a.get_id().as_str();
        if ["id", "verbose", "takeover"].contains(&id) {
            continue;
        }
        let given = |m: &clap::ArgMatches| m.value_source(id) == Some(ValueSource::CommandLine);
        if given(matches) || sub.is_some_and(given) {
            anyhow::bail!(
                "run: --{}: a device's options come from its configuration ({})",
                a.get_long().unwrap_or(id),
                path.display()
            );
        }
    }
    let Some(id) = dev.id else { anyhow::bail!("run needs --id N: the device of the configuration to serve") };
    let dc = config::find(&cli, path, id)?;
    let parsed = Cli::try_parse_from(&dc.argv).map_err(|e| anyhow::anyhow!("{}: device {id}: {e}", dc.at("")))?;
    let mut d = parsed.dev;
    d.start = match dev.start {
        Start::Takeover(t) => Start::Takeover(t),
        _ => Start::NewOrRecover(id),
    };
    d.origin = Some(dc);
    dispatch(parsed.command, &d)
}

fn dispatch(command: Command, dev: &DevArgs) -> anyhow::Result<()> {
    let cli_dev = dev;
    match command {
        Command::Loop { path, direct, block_size } => cmd::serve_loop(cli_dev, &path, direct, block_size),
        Command::Null { size, block_size } => cmd::serve_null(cli_dev, &size, block_size),
        Command::Sockram { size, block_size } => cmd::serve_sockram(cli_dev, &size, block_size),
        Command::Zoned { size, zone_size, conventional, max_open, max_active, block_size } => {
            cmd::serve_zoned(cli_dev, &size, &zone_size, (conventional, max_open, max_active), block_size)
        }
        Command::Nbd { uri, connections, reconnect_timeout, io_timeout } => {
            cmd::serve_nbd(cli_dev, &uri, connections, reconnect_timeout, io_timeout)
        }
        Command::Rbd { image, conf, client_id, keyring, cluster, io_timeout, connect_timeout, ceph_option } => {
            let o = cmd::RbdArgs {
                conf,
                id: client_id,
                keyring,
                cluster,
                io_timeout,
                connect_timeout,
                options: ceph_option,
            };
            cmd::serve_rbd(cli_dev, &image, o)
        }
        Command::List { json } => cmd::list(json),
        Command::Del { id, all, force, yank } => cmd::del(id, all, force, yank),
        Command::Features { json } => cmd::features(json),
        Command::UdevOwner { name } => cmd::udev_owner(&name),
        Command::Stats { id, json } => cmd::stats(id, json),
        Command::Resize { id, size, force } => cmd::resize(id, &size, force),
        Command::Recover { id } => cmd::recover(cli_dev, id),
        Command::Run { .. } => anyhow::bail!("run: not from a configuration"),
        Command::CheckConfig { config } => {
            let devices = config::load(&Cli::command(), &config)?;
            for d in &devices {
                println!("device {} ({}:{}): {}", d.id, d.file.display(), d.line, config::shell_words(&d.argv[1..]));
            }
            if devices.is_empty() {
                println!("{}: no devices", config.display());
            }
            Ok(())
        }
        Command::Upgrade { id, binary, timeout } => service::upgrade(id, binary.as_deref(), timeout),
        Command::GenerateDocs { dir } => docs::generate(Cli::command(), &dir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use ubd_engine::BufferMode;

    fn dev(args: &[&str]) -> DevArgs {
        let argv = ["ubd-engine"].iter().chain(args).chain(&["list"]);
        Cli::try_parse_from(argv).unwrap().dev
    }

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// The udev rule calls `/usr/bin/ubd-engine udev-owner %k` (where the package puts
    /// the binary) and reads back the variables that subcommand prints.
    #[test]
    fn the_udev_rule_calls_this_cli() {
        let rule = include_str!("../../packaging/udev/70-ubd-engine.rules");
        assert_eq!(rule.matches(r#"IMPORT{program}="/usr/bin/ubd-engine udev-owner %k""#).count(), 2);
        assert!(rule.contains(r#"OWNER="$env{UBD_OWNER_UID}", GROUP="$env{UBD_OWNER_GID}""#));
        let cli = Cli::try_parse_from(["ubd-engine", "udev-owner", "ublkc3"]).unwrap();
        assert!(matches!(cli.command, Command::UdevOwner { ref name } if name == "ublkc3"));
        assert!(include_str!("cmd.rs").contains(r#""UBD_OWNER_UID={}\nUBD_OWNER_GID={}""#));
    }

    #[test]
    fn defaults() {
        let d = dev(&[]);
        assert_eq!(d.buffer_mode, BufferChoice::Auto);
        assert_eq!(d.recovery, None);
        assert_eq!(d.io_protocol, IoProtocol::PerTag);
        assert_eq!(d.ring, RingChoice(None));
        let Command::Loop { direct, .. } = Cli::try_parse_from(["ubd-engine", "loop", "x.img"]).unwrap().command else {
            panic!()
        };
        assert_eq!(direct, DirectIo::Auto);
    }

    #[test]
    fn values_map_to_the_engine_types() {
        for (v, want) in [
            ("auto", BufferChoice::Auto),
            ("copy", BufferChoice::Force(BufferMode::Copy)),
            ("zero-copy", BufferChoice::Force(BufferMode::ZeroCopy)),
            ("auto-reg", BufferChoice::Force(BufferMode::AutoReg)),
            ("user-copy", BufferChoice::Force(BufferMode::UserCopy)),
            ("none", BufferChoice::Force(BufferMode::NoData)),
        ] {
            assert_eq!(dev(&["--buffer-mode", v]).buffer_mode, want);
        }
        for (v, want) in [("reissue", Recovery::Reissue), ("fail-io", Recovery::FailIo), ("off", Recovery::Off)] {
            assert_eq!(dev(&["--recovery", v]).recovery, Some(want));
        }
        for (v, want) in [("per-tag", IoProtocol::PerTag), ("batch", IoProtocol::Batch)] {
            assert_eq!(dev(&["--io-protocol", v]).io_protocol, want);
        }
        for (v, want) in [
            ("auto", None),
            ("defer", Some(RingMode::DeferTaskrun)),
            ("coop", Some(RingMode::CoopTaskrun)),
            ("plain", Some(RingMode::Plain)),
        ] {
            assert_eq!(dev(&["--ring", v]).ring, RingChoice(want));
        }
        for (v, want) in [("auto", DirectIo::Auto), ("on", DirectIo::On), ("off", DirectIo::Off)] {
            let cli = Cli::try_parse_from(["ubd-engine", "loop", "--direct", v, "x.img"]).unwrap();
            assert!(matches!(cli.command, Command::Loop { direct, .. } if direct == want));
        }
        for bad in [["--ring", "defer-taskrun"], ["--buffer-mode", "no-data"], ["--recovery", "fail_io"]] {
            assert!(Cli::try_parse_from(["ubd-engine", bad[0], bad[1], "list"]).is_err(), "{bad:?}");
        }
    }

    /// `--id` is the device's everywhere; the Ceph client's is `--client-id`.
    #[test]
    fn device_id_and_ceph_client_id() {
        let cli = Cli::try_parse_from(["ubd-engine", "--id", "5", "rbd", "--client-id", "ubd", "rbd/img"]).unwrap();
        assert_eq!(cli.dev.id, Some(5));
        assert!(matches!(cli.command, Command::Rbd { client_id: Some(ref c), .. } if c == "ubd"));
        let cli = Cli::try_parse_from(["ubd-engine", "rbd", "rbd/img", "--id", "6"]).unwrap();
        assert_eq!(cli.dev.id, Some(6));
    }

    /// What the log and the state file print is what serde writes.
    #[test]
    fn display_names_are_the_serialized_ones() {
        let serialized = |v: serde_json::Value| v.as_str().unwrap().to_owned();
        for m in [RingMode::DeferTaskrun, RingMode::CoopTaskrun, RingMode::Plain] {
            assert_eq!(m.to_string(), serialized(serde_json::to_value(m).unwrap()));
        }
        assert_eq!(RingMode::CoopTaskrun.to_string(), "coop-taskrun");
        for r in [Recovery::Reissue, Recovery::FailIo, Recovery::Off] {
            assert_eq!(r.to_string(), serialized(serde_json::to_value(r).unwrap()));
        }
        assert_eq!(Recovery::FailIo.to_string(), "fail-io");
    }
}
