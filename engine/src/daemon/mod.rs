//! Serving one device: add → queues armed → START_DEV → wait → stop → delete.
//!
//! Every path out of [`serve`], errors and panics included, stops and deletes the
//! device it added: nothing is left behind.

mod clock;
mod holders;
mod live;

use std::fs::OpenOptions;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::buf::{BufferChoice, BufferMode, resolve};
use crate::ctrl::{Control, params::build_params};
use crate::error::{Error, Result};
use crate::queue::{
    self,
    config::{IoProtocol, QueueConfig, QueueReport},
};
use crate::request::TargetInfo;
use crate::ring::RingMode;
use crate::sys::shmem::{SharedMap, ShmemBuf, ShmemKind};
use crate::sys::{self, features, uapi};
use crate::target::Target;
pub use clock::DeviceStats;
use clock::StatsClock;
pub use holders::{Holder, device_holders};
pub use live::HANDOFF_SIGNAL;
use live::{Live, OnExit, STOP_SIGNALS};

/// How to shape the device and its queues.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub queues: u16,
    pub depth: u16,
    /// Largest request, and the size of each tag's buffer.
    pub max_io_buf_bytes: u32,
    /// Requested device id; None lets the kernel choose.
    pub dev_id: Option<u32>,
    /// CPUs for the queue threads: queue i runs on `cpus[i % len]`. None: see
    /// `queue_affinity`.
    pub cpus: Option<Vec<usize>>,
    /// Without `cpus`: pin each queue thread to the CPUs whose IO the kernel maps to its
    /// queue (GET_QUEUE_AFFINITY), as ublksrv does. Off (the default): the threads are
    /// not pinned. Measured under QEMU on 2 CPUs (the fast-path issue), unpinned threads
    /// are 1.5-2x faster whenever fewer submitters than queues run (qd1, one fio job),
    /// since a submitter and its queue's server then share one CPU; about 4% slower
    /// with every CPU submitting.
    pub queue_affinity: bool,
    /// Try hugepage-backed buffers.
    pub huge_pages: bool,
    pub buffer: BufferChoice,
    pub recovery: Recovery,
    /// Queue ring flags (None: the default, COOP_TASKRUN), for tuning studies.
    pub ring: Option<RingMode>,
    /// Per-tag commands, or UBLK_F_BATCH_IO (7.0+).
    pub io_protocol: IoProtocol,
    /// Target reads and writes of at least this many bytes go to io_uring's worker
    /// threads (IOSQE_ASYNC) instead of running inline on the queue thread, so their
    /// data copies can run on other CPUs. None: everything runs inline.
    pub offload_min: Option<u32>,
    /// On stop, how long requests in flight may take to complete before the queues
    /// give up on them (the kernel then fails them, or re-queues them for recovery).
    pub stop_grace: Duration,
    /// Let the kernel scan the device for partitions when it starts. Off for network
    /// targets: the scan reads over the network, and a server that dies during it
    /// hangs the start (or a recovery). Off needs UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0+);
    /// older kernels scan anyway (logged).
    pub partition_scan: bool,
    /// A read-only device (UBLK_ATTR_READ_ONLY), whatever the target allows: the kernel
    /// refuses writes, and the queues fail any write, discard or write-zeroes that still
    /// arrives (a bio submitted past the block layer's check) with EROFS, so none
    /// reaches the target. A target that is read-only itself makes the device read-only
    /// without it.
    pub read_only: bool,
    /// Create an unprivileged device (UBLK_F_UNPRIVILEGED_DEV, Linux 6.5+): what a caller
    /// without CAP_SYS_ADMIN must ask for ([`privileged`] says whether this process has
    /// it). The device belongs to the caller's uid and gid; every command to it must name
    /// its char device, which the caller must be able to open (a udev rule hands it over);
    /// it is served in copy mode and cannot be recovered (the kernel allows neither
    /// zero-copy nor USER_RECOVERY for it). For a caller with CAP_SYS_ADMIN the kernel
    /// ignores it and creates an ordinary device.
    pub unprivileged: bool,
    /// Threads per queue (UBLK_F_PER_IO_DAEMON, Linux 6.16+): each has its own ring and
    /// serves a contiguous block of the queue's tags, so one queue's requests spread over
    /// several CPUs. 1: one thread per queue (any kernel).
    pub threads: u16,
    /// Shared memory for zero-copy IO (UBLK_F_SHMEM_ZC, Linux 7.1+).
    pub shmem: Option<ShmemOptions>,
}

/// Shared memory that the device's clients do their IO from (UBLK_F_SHMEM_ZC, Linux
/// 7.1+): a file both sides map `MAP_SHARED` (hugetlbfs, tmpfs, or a memfd through
/// `/proc/PID/fd/N`). The engine maps it and registers it with the device (REG_BUF);
/// an O_DIRECT request whose pages all lie in it reaches the queue with its data in
/// that mapping, which the target reads or writes directly: the kernel copies nothing
/// and registers nothing. Other requests take the device's buffer mode.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShmemOptions {
    pub path: PathBuf,
    /// Bytes to map (the file is created, or grown, to this size); None: the file's size.
    pub size: Option<u64>,
    /// Map and register it read-only (`UBLK_SHMEM_BUF_READ_ONLY`, a write-sealed memfd):
    /// only writes are served from it.
    pub read_only: bool,
    /// For `recover`: the device already has this memory registered (by the daemon
    /// that died). The file at `path` must be the one registered then.
    pub registered: Option<ShmemRegistration>,
}

/// A device's shared-memory registration, as `recover` needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShmemRegistration {
    /// The buffer index REG_BUF returned.
    pub index: u16,
    /// The file's (device, inode).
    pub file_id: (u64, u64),
}

/// The shared memory a device serves from, as started.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShmemReport {
    pub path: PathBuf,
    pub bytes: u64,
    pub kind: ShmemKind,
    pub read_only: bool,
    pub registration: ShmemRegistration,
}

impl ShmemOptions {
    /// Parses `PATH[,size=SIZE][,ro]`; `parse_size` reads SIZE (`64M`, `1G`...).
    pub fn parse(spec: &str, parse_size: impl Fn(&str) -> std::result::Result<u64, String>) -> Result<Self> {
        let mut parts = spec.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| Error::Config(format!("--shmem {spec:?}: expected PATH[,size=SIZE][,ro]")))?;
        let mut o = ShmemOptions { path: PathBuf::from(path), size: None, read_only: false, registered: None };
        for part in parts {
            match part.split_once('=') {
                Some(("size", v)) => {
                    o.size = Some(parse_size(v).map_err(|e| Error::Config(format!("--shmem size={v}: {e}")))?);
                }
                None if part == "ro" => o.read_only = true,
                _ => {
                    return Err(Error::Config(format!("--shmem: unknown option {part:?} (expected size=SIZE or ro)")));
                }
            }
        }
        Ok(o)
    }
}

/// Whether this process has CAP_SYS_ADMIN in its effective set, as the ublk driver
/// requires of a caller creating (or commanding) an ordinary device. Inside a user
/// namespace this is what the namespace grants, which the driver (checking the initial
/// namespace) may not honour: such a caller must ask for an unprivileged device.
pub fn privileged() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// What the kernel does with a device whose daemon dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Recovery {
    /// The device is removed with its daemon.
    Off,
    /// The device stays (queued IO waits); `recover` re-issues in-flight IO. (USER_RECOVERY_REISSUE)
    #[default]
    Reissue,
    /// The device stays; IO fails with EIO until a daemon recovers it. (USER_RECOVERY_FAIL_IO, 6.13+)
    FailIo,
}

impl Recovery {
    pub fn dev_flags(self) -> u64 {
        match self {
            Recovery::Off => 0,
            Recovery::Reissue => features::F_USER_RECOVERY | features::F_USER_RECOVERY_REISSUE,
            Recovery::FailIo => features::F_USER_RECOVERY | features::F_USER_RECOVERY_FAIL_IO,
        }
    }

    pub fn from_dev_flags(flags: u64) -> Self {
        if flags & features::F_USER_RECOVERY == 0 {
            Recovery::Off
        } else if flags & features::F_USER_RECOVERY_FAIL_IO != 0 {
            Recovery::FailIo
        } else {
            Recovery::Reissue
        }
    }

    /// As serialized: `off`, `reissue`, `fail-io`.
    pub fn name(self) -> &'static str {
        match self {
            Recovery::Off => "off",
            Recovery::Reissue => "reissue",
            Recovery::FailIo => "fail-io",
        }
    }
}

impl std::fmt::Display for Recovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The [`name`](Recovery::name)s, the default (`reissue`) first.
#[cfg(feature = "clap")]
impl clap::ValueEnum for Recovery {
    fn value_variants<'a>() -> &'a [Self] {
        &[Recovery::Reissue, Recovery::FailIo, Recovery::Off]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

impl Default for DeviceOptions {
    fn default() -> Self {
        Self {
            queues: 1,
            depth: 128,
            max_io_buf_bytes: 512 << 10,
            dev_id: None,
            cpus: None,
            queue_affinity: false,
            huge_pages: true,
            buffer: BufferChoice::Auto,
            recovery: Recovery::Reissue,
            ring: None,
            io_protocol: IoProtocol::PerTag,
            offload_min: None,
            stop_grace: Duration::from_secs(30),
            partition_scan: true,
            read_only: false,
            unprivileged: false,
            threads: 1,
            shmem: None,
        }
    }
}

impl DeviceOptions {
    pub fn validate(&self) -> Result<()> {
        if self.queues == 0 || self.queues > uapi::MAX_NR_QUEUES {
            return Err(Error::Config(format!(
                "queue count {} must be from 1 to {}",
                self.queues,
                uapi::MAX_NR_QUEUES
            )));
        }
        if self.depth == 0 || self.depth > uapi::MAX_QUEUE_DEPTH {
            return Err(Error::Config(format!(
                "queue depth {} must be from 1 to {} (the ublk driver's limit)",
                self.depth,
                uapi::MAX_QUEUE_DEPTH
            )));
        }
        if self.max_io_buf_bytes > uapi::MAX_IO_BUF_BYTES {
            return Err(Error::Config(format!(
                "max IO size {} exceeds ublk's {}",
                self.max_io_buf_bytes,
                uapi::MAX_IO_BUF_BYTES
            )));
        }
        if self.threads == 0 || self.threads > self.depth {
            return Err(Error::Config(format!(
                "{} threads per queue: from 1 to the queue depth ({}), each serving some of its tags",
                self.threads, self.depth
            )));
        }
        if let Some(id) = self.dev_id
            && id >= i32::MAX as u32
        {
            return Err(Error::Config(format!("device id {id} is out of range")));
        }
        if let Some(cpus) = &self.cpus {
            if cpus.is_empty() {
                return Err(Error::Config("empty CPU list".into()));
            }
            crate::cpus::check_available(cpus, &sys::allowed_cpus().map_err(|e| Error::io("sched_getaffinity", e))?)?;
        }
        Ok(())
    }
}

/// A device that has been started, as shown to the caller.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StartedDevice {
    pub dev_id: u32,
    pub block_path: PathBuf,
    pub char_path: PathBuf,
    /// Features the kernel offers (GET_FEATURES).
    pub kernel_features: u64,
    /// Flags the device was created with, as the kernel accepted them.
    pub dev_flags: u64,
    pub queue_depth: u16,
    pub max_io_buf_bytes: u32,
    pub queues: Vec<QueueReport>,
    pub pid: i32,
    pub buffer_mode: BufferMode,
    /// Why this buffer mode.
    pub buffer_reason: String,
    pub io_protocol: IoProtocol,
    pub recovery: Recovery,
    /// The device existed and this process took it over (`recover`).
    pub recovered: bool,
    /// Writes are refused ([`DeviceOptions::read_only`], or a read-only target).
    pub read_only: bool,
    /// The shared memory requests may be served from ([`DeviceOptions::shmem`]).
    pub shmem: Option<ShmemReport>,
}

/// Why serving ended, and the final counters.
#[derive(Debug, Clone)]
pub struct ServeSummary {
    pub dev_id: u32,
    pub reason: String,
    /// Over the whole life of the device.
    pub stats: DeviceStats,
    /// The device was quiesced from outside (QUIESCE_DEV, as `upgrade` does) and left in
    /// place for the daemon that takes it over, not deleted.
    pub handed_over: bool,
}

/// Blocks SIGINT/SIGTERM (and [`HANDOFF_SIGNAL`]) in the calling thread (and the threads
/// it spawns later), so that they are taken by [`serve`]'s wait loop rather than killing
/// the process. A stop signal this process inherited as ignored (a shell's background
/// job ignores SIGINT) gets its default action back first: an ignored signal is dropped
/// even while blocked, and the device could not be stopped by it.
pub fn block_stop_signals() -> Result<()> {
    sys::block_signals(&STOP_SIGNALS).map_err(|e| Error::io("blocking signals", e))?;
    sys::default_signals(&STOP_SIGNALS).map_err(|e| Error::io("resetting signal actions", e))
}

/// Creates the device for `target`, serves it until SIGINT/SIGTERM (or a queue
/// failure), then stops and deletes it. `on_started` runs once the block device exists;
/// `on_tick` gets the device's statistics about once a second while it serves.
pub fn serve(
    target: Arc<dyn Target>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&StartedDevice),
    on_tick: impl FnMut(&DeviceStats),
) -> Result<ServeSummary> {
    opts.validate()?;
    let read_only = opts.read_only || target.info().read_only;
    let params = build_params(&TargetInfo { read_only, ..target.info().clone() }, opts.max_io_buf_bytes)?;
    block_stop_signals()?;
    let mut ctrl = Control::open()?;
    let kernel_features = ctrl.features()?;
    let unprivileged = if opts.unprivileged { features::F_UNPRIVILEGED_DEV } else { 0 };
    if kernel_features & unprivileged != unprivileged {
        return Err(Error::Config(
            "a device for a user without CAP_SYS_ADMIN needs the ublk feature UNPRIVILEGED_DEV (Linux 6.5+), which this kernel does not offer: run as root".into(),
        ));
    }
    if unprivileged != 0 && opts.recovery != Recovery::Off {
        return Err(Error::Config(format!(
            "recovery {} needs a privileged device: the kernel does not let an unprivileged device outlive its daemon (no USER_RECOVERY with UNPRIVILEGED_DEV): use --recovery off, or run as root",
            opts.recovery
        )));
    }
    let per_io = if opts.threads > 1 { features::F_PER_IO_DAEMON } else { 0 };
    if per_io != 0 {
        if kernel_features & features::F_PER_IO_DAEMON == 0 {
            return Err(Error::Config(format!(
                "--threads {} needs the ublk feature PER_IO_DAEMON (Linux 6.16+), which this kernel does not offer",
                opts.threads
            )));
        }
        if opts.io_protocol == IoProtocol::Batch {
            return Err(Error::Config(
                "several threads per queue are served with io protocol per-tag (batch fetches are per queue here)"
                    .into(),
            ));
        }
    }
    let zoned = if target.info().zoned.is_some() { features::F_ZONED } else { 0 };
    if zoned != 0 {
        if kernel_features & features::F_ZONED == 0 {
            return Err(Error::Config(
                "a zoned device needs the ublk feature ZONED (Linux 6.6+), which this kernel does not offer".into(),
            ));
        }
        if unprivileged != 0 {
            return Err(Error::Config(
                "a zoned device needs buffer mode user-copy, which the kernel does not allow on an unprivileged device: run as root".into(),
            ));
        }
        if opts.io_protocol == IoProtocol::Batch {
            return Err(Error::Config(
                "a zoned device is served with io protocol per-tag: batch commits here carry no zone append sector"
                    .into(),
            ));
        }
    }
    let (mut buffer_mode, mut buffer_reason) = if unprivileged != 0 {
        crate::buf::resolve_unprivileged(opts.buffer)?
    } else if zoned != 0 {
        crate::buf::resolve_zoned(opts.buffer, kernel_features)?
    } else {
        resolve(opts.buffer, kernel_features, target.moves_data(), target.supports_zero_copy(), target.name())?
    };
    let shmem_map = match &opts.shmem {
        None => None,
        Some(o) => {
            check_shmem(o, kernel_features, &*target)?;
            if opts.buffer == BufferChoice::Auto && buffer_mode == BufferMode::AutoReg {
                buffer_mode = BufferMode::Copy;
                buffer_reason = "auto with shared memory: requests outside it are copied (auto-reg would register every request's pages, the shared ones too)".into();
            }
            Some(SharedMap::open(&o.path, o.size, o.read_only, uapi::SHMEM_BUF_MAX).map_err(Error::Config)?)
        }
    };
    let shmem_flag = if shmem_map.is_some() { features::F_SHMEM_ZC } else { 0 };
    let want_recovery = opts.recovery.dev_flags();
    let want_batch = if opts.io_protocol == IoProtocol::Batch { features::F_BATCH_IO } else { 0 };
    if kernel_features & want_batch != want_batch {
        return Err(Error::Config(format!(
            "io protocol batch needs the ublk feature BATCH_IO (Linux 7.0+), which this kernel does not offer (it offers: {})",
            features::feature_names(kernel_features).join(" ")
        )));
    }
    if kernel_features & want_recovery != want_recovery {
        return Err(Error::Config(format!(
            "recovery mode {:?} needs ublk features {} that this kernel does not offer",
            opts.recovery,
            features::feature_names(want_recovery & !kernel_features).join(" ")
        )));
    }
    // QUIESCE (6.16+) lets `upgrade` hand the device to a new daemon without killing this one.
    let quiesce = if want_recovery != 0 { kernel_features & features::F_QUIESCE } else { 0 };
    let no_scan = if opts.partition_scan {
        0
    } else if kernel_features & features::F_NO_AUTO_PART_SCAN != 0 {
        features::F_NO_AUTO_PART_SCAN
    } else {
        tracing::info!(
            "this kernel has no UBLK_F_NO_AUTO_PART_SCAN (Linux 7.0+): it scans the device for partitions at start"
        );
        0
    };
    let mut info = uapi::DevInfo {
        nr_hw_queues: opts.queues,
        queue_depth: opts.depth,
        max_io_buf_bytes: opts.max_io_buf_bytes,
        dev_id: opts.dev_id.unwrap_or(u32::MAX),
        ublksrv_pid: sys::getpid(),
        flags: features::F_CMD_IOCTL_ENCODE
            | buffer_mode.dev_flag()
            | want_recovery
            | want_batch
            | no_scan
            | quiesce
            | unprivileged
            | zoned
            | per_io
            | shmem_flag,
        ..Default::default()
    };
    ctrl.add_dev(&mut info).map_err(|e| match (e.raw_os_error(), opts.dev_id) {
        (Some(libc::EEXIST), Some(id)) => Error::Config(format!("device id {id} is already in use")),
        _ => e,
    })?;
    let mut live = Live::new(ctrl, info.dev_id, OnExit::Delete);
    tracing::debug!(dev_id = info.dev_id, ?info, "device added");
    let wanted = buffer_mode.dev_flag() | want_recovery | want_batch | per_io | shmem_flag;
    if info.flags & wanted != wanted {
        return Err(Error::Config(format!(
            "the kernel refused buffer mode {buffer_mode}, recovery {:?} or io protocol {} (device flags {:#x})",
            opts.recovery, opts.io_protocol, info.flags
        )));
    }
    if info.flags & features::F_UNPRIVILEGED_DEV != 0 {
        wait_for_access(info.dev_id)?;
    } else if unprivileged != 0 {
        tracing::info!(dev_id = info.dev_id, "the kernel made an ordinary device: this process has CAP_SYS_ADMIN");
    }
    live.ctrl.set_params(info.dev_id, &params)?;
    // Registered before the queues start: no request can be in flight yet.
    let shmem = match shmem_map {
        None => None,
        Some(map) => {
            let index = live.ctrl.reg_buf(info.dev_id, map.as_ptr(), map.size(), map.read_only())?;
            tracing::debug!(dev_id = info.dev_id, index, ?map, "shared memory registered");
            Some(Arc::new(ShmemBuf { map, index }))
        }
    };
    let setup = Setup { info, kernel_features, buffer_mode, buffer_reason, recovered: false, read_only, shmem };
    run(live, setup, target, opts, on_started, on_tick)
}

/// Takes over device `dev_id`, whose daemon died, for `target` (which must have the
/// device's geometry): START_USER_RECOVERY, fetch every tag again (batch devices: PREP_IO_CMDS
/// and a new FETCH_IO_CMDS), END_USER_RECOVERY,
/// then serve as [`serve`] does. Requests that were in flight are re-issued (or were
/// failed, with FAIL_IO). If recovery fails, the device is left as it was, recoverable.
pub fn recover(
    dev_id: u32,
    target: Arc<dyn Target>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&StartedDevice),
    on_tick: impl FnMut(&DeviceStats),
) -> Result<ServeSummary> {
    block_stop_signals()?;
    let mut ctrl = Control::open()?;
    let kernel_features = ctrl.features()?;
    let info = wait_recoverable(&mut ctrl, dev_id)?;
    let params = ctrl.get_params(dev_id)?;
    let size = target.info().dev_size;
    if params.basic.dev_sectors != size >> 9 {
        return Err(Error::Config(format!(
            "device {dev_id} has {} sectors but the target has {} ({} bytes): not the same backing",
            params.basic.dev_sectors,
            size >> 9,
            size
        )));
    }
    // Read-only comes from the device too; a target that can no longer write cannot
    // take over a writable device.
    let read_only = params.read_only();
    if target.info().read_only && !read_only {
        return Err(Error::Config(format!(
            "device {dev_id} is writable but the {} target is read-only now: it cannot serve it",
            target.name()
        )));
    }
    // The mode comes from the device (USER_COPY: `none`), whatever --buffer-mode says.
    let buffer_mode = BufferMode::from_dev_flags(info.flags, target.moves_data());
    if opts.threads > 1 && info.flags & features::F_PER_IO_DAEMON == 0 {
        return Err(Error::Config(format!(
            "device {dev_id} was created without PER_IO_DAEMON: it is served with one thread per queue (no --threads {})",
            opts.threads
        )));
    }
    if buffer_mode.is_zero_copy() && !target.supports_zero_copy() {
        return Err(Error::Config(format!(
            "device {dev_id} was created in buffer mode {buffer_mode}, which the {} target cannot serve",
            target.name()
        )));
    }
    if !buffer_mode.moves_data() && target.moves_data() {
        return Err(Error::Config(format!(
            "device {dev_id} was created in buffer mode none (no data moved), which the {} target cannot serve",
            target.name()
        )));
    }
    let shmem = recover_shmem(dev_id, info.flags, opts.shmem.as_ref())?;
    // The dead daemon's rings are torn down asynchronously; until they let go of
    // /dev/ublkcN the kernel answers EBUSY.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ctrl.start_user_recovery(dev_id) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            r => break r?,
        }
    }
    let live = Live::new(ctrl, dev_id, OnExit::Leave);
    let opts = DeviceOptions {
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
        max_io_buf_bytes: info.max_io_buf_bytes,
        dev_id: Some(dev_id),
        ..opts.clone()
    };
    opts.validate()?;
    let setup = Setup {
        info,
        kernel_features,
        buffer_mode,
        buffer_reason: "as the device was created".into(),
        recovered: true,
        read_only,
        shmem,
    };
    run(live, setup, target, &opts, on_started, on_tick)
}

/// Waits (up to 30 s: older kernels notice a dead daemon from a periodic monitor) for a
/// device whose daemon died to become recoverable.
fn wait_recoverable(ctrl: &mut Control, dev_id: u32) -> Result<uapi::DevInfo> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = ctrl.dev_info(dev_id)?;
        if info.flags & features::F_USER_RECOVERY == 0 {
            return Err(Error::Config(format!("device {dev_id} was created without recovery: it cannot be recovered")));
        }
        let alive = sys::pid_alive(info.ublksrv_pid);
        match info.state {
            uapi::DEV_QUIESCED | uapi::DEV_FAIL_IO if !alive => return Ok(info),
            uapi::DEV_LIVE | uapi::DEV_QUIESCED | uapi::DEV_FAIL_IO if alive => {
                return Err(Error::Config(format!(
                    "device {dev_id} is served by process {} which is still running",
                    info.ublksrv_pid
                )));
            }
            uapi::DEV_DEAD => return Err(Error::Config(format!("device {dev_id} is not started"))),
            _ if Instant::now() > deadline => {
                return Err(Error::Config(format!(
                    "device {dev_id} did not become recoverable (state {}) within 30 s",
                    info.state
                )));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Refuses shared memory where it cannot work: a kernel without SHMEM_ZC, read-only
/// memory for a target that would have to write into a write's buffer.
fn check_shmem(o: &ShmemOptions, kernel_features: u64, target: &dyn Target) -> Result<()> {
    if kernel_features & features::F_SHMEM_ZC == 0 {
        return Err(Error::Config(
            "--shmem needs the ublk feature SHMEM_ZC (Linux 7.1+), which this kernel does not offer".into(),
        ));
    }
    if o.read_only && (!target.supports_zero_copy() || target.info().zoned.is_some()) {
        return Err(Error::Config(format!(
            "--shmem {},ro: the {} target moves data through memory of its own, which read-only shared memory cannot be (use it without ro)",
            o.path.display(),
            target.name()
        )));
    }
    Ok(())
}

/// The shared memory of a device being recovered: the file registered by the daemon
/// that died (the kernel keeps the registration, and the pinned pages, while the
/// device exists), mapped again. Its index comes from the options (the state file).
fn recover_shmem(dev_id: u32, dev_flags: u64, o: Option<&ShmemOptions>) -> Result<Option<Arc<ShmemBuf>>> {
    let o = match (dev_flags & features::F_SHMEM_ZC != 0, o) {
        (false, None) => return Ok(None),
        (false, Some(o)) => {
            return Err(Error::Config(format!(
                "device {dev_id} was created without shared memory (no SHMEM_ZC): it cannot serve {}",
                o.path.display()
            )));
        }
        (true, None) => {
            return Err(Error::Config(format!(
                "device {dev_id} was created with shared memory (SHMEM_ZC): recovering it needs that file (--shmem)"
            )));
        }
        (true, Some(o)) => o,
    };
    let reg = o.registered.ok_or_else(|| {
        Error::Config(format!(
            "device {dev_id}: the index of its shared-memory registration is unknown (its state file names none)"
        ))
    })?;
    let map = SharedMap::open(&o.path, o.size, o.read_only, uapi::SHMEM_BUF_MAX).map_err(Error::Config)?;
    if map.dev_ino() != reg.file_id {
        return Err(Error::Config(format!(
            "shared memory {} is not the file device {dev_id} registered (another inode): the kernel still matches requests against that one's pages",
            o.path.display()
        )));
    }
    Ok(Some(Arc::new(ShmemBuf { map, index: reg.index })))
}

/// What `run` needs to know of the device it brings up.
struct Setup {
    info: uapi::DevInfo,
    kernel_features: u64,
    buffer_mode: BufferMode,
    buffer_reason: String,
    recovered: bool,
    read_only: bool,
    shmem: Option<Arc<ShmemBuf>>,
}

/// The common path: open the char device, start the queues, START_DEV (or
/// END_USER_RECOVERY), serve, tear down.
fn run(
    mut live: Live,
    setup: Setup,
    target: Arc<dyn Target>,
    opts: &DeviceOptions,
    on_started: impl FnOnce(&StartedDevice),
    mut on_tick: impl FnMut(&DeviceStats),
) -> Result<ServeSummary> {
    let Setup { info, kernel_features, buffer_mode, buffer_reason, recovered, read_only, shmem } = setup;
    let io_protocol = if info.flags & features::F_BATCH_IO != 0 { IoProtocol::Batch } else { IoProtocol::PerTag };
    // Several threads per queue only where the device has PER_IO_DAEMON (recover checks).
    let threads = if info.flags & features::F_PER_IO_DAEMON != 0 { opts.threads } else { 1 };
    let dev_id = info.dev_id;
    let char_path = PathBuf::from(format!("/dev/ublkc{dev_id}"));
    wait_for_node(&char_path)?;
    let cdev: Arc<OwnedFd> = Arc::new(open_char_dev(&char_path)?);
    live.cdev = Some(Arc::clone(&cdev));
    live.stop_grace = opts.stop_grace;
    live.recoverable = info.flags & features::F_USER_RECOVERY != 0;
    live.can_quiesce = live.recoverable && info.can_quiesce();
    // No TRY_STOP_DEV for unprivileged devices (the kernel answers EINVAL).
    live.safe_stop = kernel_features & features::F_SAFE_STOP_DEV != 0 && info.flags & features::F_UNPRIVILEGED_DEV == 0;
    if live.recoverable {
        queue::crash_on_queue_panic(dev_id);
    }
    let (tx, rx) = mpsc::channel();
    live.events = Some(rx);
    for q_id in 0..info.nr_hw_queues {
        // Without --cpus: the queue's CPUs as the kernel maps them (queue affinity), or none.
        let queue_cpus = match &opts.cpus {
            None if opts.queue_affinity => match live.ctrl.queue_affinity(dev_id, q_id) {
                Ok(set) if !set.is_empty() => Some(set),
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(q_id, "GET_QUEUE_AFFINITY failed ({e}); queue thread left unbound");
                    None
                }
            },
            _ => None,
        };
        for thread in 0..threads {
            // --cpus: thread k of queue q takes the (q * threads + k)-th CPU of the list.
            let cpus = match &opts.cpus {
                Some(list) => {
                    Some(vec![list[(usize::from(q_id) * usize::from(threads) + usize::from(thread)) % list.len()]])
                }
                None => queue_cpus.clone(),
            };
            let cfg = QueueConfig {
                dev_id,
                q_id,
                thread,
                threads,
                depth: info.queue_depth,
                buf_size: info.max_io_buf_bytes,
                cpus,
                huge_pages: opts.huge_pages,
                dev_size: target.info().dev_size,
                read_only,
                buffer_mode,
                ring: opts.ring,
                protocol: io_protocol,
                offload_min: opts.offload_min,
                shmem: shmem.clone(),
            };
            let handle = queue::spawn(cfg, Arc::clone(&target), Arc::clone(&cdev), tx.clone())?;
            live.queues.push(handle);
        }
    }
    drop(tx);
    // Only `live` and the queue threads may keep the char device open: DEL_DEV waits for the last close.
    drop(cdev);
    let reports = live.wait_ready()?;
    crate::hooks::pause(if recovered { "before-end-recovery" } else { "before-start" });
    if recovered {
        live.ctrl.end_user_recovery(dev_id, sys::getpid())?;
        // Recovered and serving: from now on a clean stop removes the device.
        live.on_exit = OnExit::Delete;
    } else {
        live.ctrl.start_dev(dev_id, sys::getpid())?;
    }
    live.started = true;
    let block_path = PathBuf::from(format!("/dev/ublkb{dev_id}"));
    wait_for_node(&block_path)?;
    let started = StartedDevice {
        dev_id,
        block_path,
        char_path,
        kernel_features,
        dev_flags: info.flags,
        queue_depth: info.queue_depth,
        max_io_buf_bytes: info.max_io_buf_bytes,
        queues: reports,
        pid: sys::getpid(),
        buffer_mode,
        buffer_reason,
        io_protocol,
        recovery: Recovery::from_dev_flags(info.flags),
        recovered,
        read_only,
        shmem: shmem.as_ref().map(|sh| ShmemReport {
            path: sh.map.path().to_path_buf(),
            bytes: sh.map.size(),
            kind: sh.map.kind(),
            read_only: sh.map.read_only(),
            registration: ShmemRegistration { index: sh.index, file_id: sh.map.dev_ino() },
        }),
    };
    on_started(&started);
    let mut clock = StatsClock::new(dev_id);
    let reason = live.wait_stop(&mut clock, &mut on_tick)?;
    let queue_stats = live.teardown()?;
    let stats = clock.sample(&queue_stats, true);
    Ok(ServeSummary { dev_id, reason, stats, handed_over: live.handed_over })
}

/// Opens `/dev/ublkcN`. The driver allows one opener at a time, and udev may hold the
/// node for a moment after it appears (EBUSY): that is retried for up to 10 s.
fn open_char_dev(path: &Path) -> Result<OwnedFd> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => return Ok(f.into()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(Error::Config(format!(
                    "{} is held open by another process (EBUSY for 10 s): is another ublk server using it?",
                    path.display()
                )));
            }
            Err(e) => return Err(Error::Open { path: path.into(), cause: e }),
        }
    }
}

/// Waits (up to 10 s) until this process may read and write the char device of its new
/// unprivileged device: the kernel creates it root-owned, and the udev rule shipped with
/// ubd-engine (`ubd-engine udev-owner`) gives it to the device's owner. Every later
/// command to the device needs that access.
fn wait_for_access(dev_id: u32) -> Result<()> {
    use rustix::fs::{Access, access};
    let path = crate::ctrl::char_path(dev_id);
    wait_for_node(Path::new(&path))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while access(path.as_str(), Access::READ_OK | Access::WRITE_OK).is_err() {
        if Instant::now() > deadline {
            return Err(Error::Config(format!(
                "{path} is still not yours 10 s after the device was created: is the udev rule for unprivileged devices installed (README: Unprivileged devices)? Root must delete device {dev_id}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn wait_for_node(path: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(Error::Config(format!("{} did not appear within 10 s", path.display())));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(v: &str) -> std::result::Result<u64, String> {
        match v {
            "64M" => Ok(64 << 20),
            _ => Err(format!("bad size {v:?}")),
        }
    }

    #[test]
    fn shmem_options_parse() {
        let o = ShmemOptions::parse("/dev/hugepages/buf", size).unwrap();
        assert_eq!((o.path, o.size, o.read_only), (PathBuf::from("/dev/hugepages/buf"), None, false));
        let o = ShmemOptions::parse("/dev/shm/b,size=64M,ro", size).unwrap();
        assert_eq!((o.size, o.read_only), (Some(64 << 20), true));
        for (bad, says) in [("", "expected PATH"), ("/x,size=1Q", "size=1Q"), ("/x,rw", "unknown option \"rw\"")] {
            let e = ShmemOptions::parse(bad, size).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
