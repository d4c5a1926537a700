//! The subcommands.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{Pid, Signal};
use ubd_engine::{Control, DeviceOptions, DeviceStats, StartedDevice, Target, feature_names};

use crate::service;
use crate::size::{human, parse_size};
use crate::state::{self, DeviceState};
use crate::{DevArgs, Start};
use sd_notify::NotifyState;
use ubd_engine::BufferMode;
use ubd_targets::TargetSpec;

fn device_options(a: &DevArgs) -> Result<DeviceOptions> {
    let (cpus, queue_affinity) = match a.cpus.as_deref() {
        None | Some("any") => (None, false),
        Some("queue") => (None, true),
        Some(list) => (Some(ubd_engine::parse_cpulist(list)?), false),
    };
    // By default one queue per CPU given, or per `--threads` CPUs.
    let per_cpu = |c: &Vec<usize>| u16::try_from(c.len() / usize::from(a.threads.max(1))).unwrap_or(u16::MAX).max(1);
    let queues = a.queues.unwrap_or_else(|| cpus.as_ref().map_or(1, per_cpu));
    let max_io = parse_size(&a.max_io_size).map_err(anyhow::Error::msg).context("--max-io-size")?;
    let max_io = u32::try_from(max_io).context("--max-io-size is too large")?;
    let unprivileged = a.unprivileged || !ubd_engine::privileged();
    let recovery =
        a.recovery.unwrap_or(if unprivileged { ubd_engine::Recovery::Off } else { ubd_engine::Recovery::Reissue });
    let opts = DeviceOptions {
        queues,
        depth: a.depth,
        max_io_buf_bytes: max_io,
        dev_id: a.id,
        cpus,
        queue_affinity,
        huge_pages: !a.no_hugepages,
        buffer: a.buffer_mode,
        recovery,
        ring: a.ring.0,
        io_protocol: a.io_protocol,
        offload_min: match a.offload.as_str() {
            "off" => None,
            s => Some(
                parse_size(s)
                    .ok()
                    .and_then(|n| u32::try_from(n).ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(|| anyhow::anyhow!("--offload {s:?}: expected a size such as 64K, or off"))?,
            ),
        },
        stop_grace: Duration::from_secs(a.stop_timeout),
        partition_scan: true,
        read_only: a.read_only,
        unprivileged,
        threads: a.threads,
        shmem: a
            .shmem
            .as_deref()
            .map(|s| ubd_engine::ShmemOptions::parse(s, |v| parse_size(v).map_err(|e| e.to_string())))
            .transpose()?,
    };
    opts.validate()?;
    Ok(opts)
}

/// Refuses early, before touching the backing, when ublk cannot work here: no ublk, or
/// a caller who may not use it (root may; another user needs access to the control
/// device and a kernel with unprivileged devices).
pub(crate) fn preflight() -> Result<()> {
    if !Path::new(ubd_engine::CONTROL_PATH).exists() {
        return Err(ubd_engine::Error::NoUblk { path: ubd_engine::CONTROL_PATH.into() }.into());
    }
    if ubd_engine::privileged() {
        return Ok(());
    }
    let uid = rustix::process::geteuid().as_raw();
    let mut ctrl = Control::open().map_err(|e| match e {
        ubd_engine::Error::NotRoot { .. } => anyhow::anyhow!(
            "permission denied opening {} (uid {uid}): run as root, or as a member of the group the udev rule gives it to (README: Unprivileged devices)",
            ubd_engine::CONTROL_PATH
        ),
        e => e.into(),
    })?;
    if ctrl.features()? & ubd_engine::features::F_UNPRIVILEGED_DEV == 0 {
        bail!(
            "ubd-engine must run as root here (uid {uid}): devices of other users need the ublk feature UNPRIVILEGED_DEV (Linux 6.5+), which this kernel does not offer"
        );
    }
    Ok(())
}

pub fn serve_loop(a: &DevArgs, path: &Path, direct: ubd_targets::DirectIo, block_size: Option<u32>) -> Result<()> {
    let opts = device_options(a)?;
    preflight()?;
    let fault = fault_spec(a)?;
    let t = ubd_targets::LoopTarget::open(
        path,
        &ubd_targets::LoopOptions { direct, logical_block_size: block_size, read_only: a.read_only, size: None },
    )
    .map_err(|e| a.at_key("path", e))?;
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

/// `--size` and `--block-size` of a target without a backing (null, sockram), checked.
fn checked_size(size: &str, block_size: u32) -> Result<u64> {
    let size = parse_size(size).map_err(anyhow::Error::msg).context("--size")?;
    if !block_size.is_power_of_two() || block_size < 512 {
        bail!("--block-size {block_size} must be a power of two of at least 512");
    }
    if !size.is_multiple_of(u64::from(block_size)) {
        bail!("--size {size} bytes is not a multiple of the {block_size}-byte block size");
    }
    Ok(size)
}

pub fn serve_null(a: &DevArgs, size: &str, block_size: u32) -> Result<()> {
    let opts = device_options(a)?;
    let size = checked_size(size, block_size)?;
    let fault = fault_spec(a)?;
    preflight()?;
    let t = ubd_targets::NullTarget::new(size, block_size);
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

/// The socket-RAM test target (hidden subcommand `sockram`).
pub fn serve_sockram(a: &DevArgs, size: &str, block_size: u32) -> Result<()> {
    let opts = device_options(a)?;
    let size = checked_size(size, block_size)?;
    let fault = fault_spec(a)?;
    preflight()?;
    let t = ubd_targets::SockRamTarget::new(size, block_size).context("sockram")?;
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

/// `zoned`: the in-memory host-managed zoned target. `zones` is (conventional, max
/// open, max active).
pub fn serve_zoned(a: &DevArgs, size: &str, zone_size: &str, zones: (u32, u32, u32), block_size: u32) -> Result<()> {
    let mut opts = device_options(a)?;
    let size = checked_size(size, block_size)?;
    let zone_size = parse_size(zone_size).map_err(anyhow::Error::msg).context("--zone-size")?;
    let (conventional, max_open, max_active) = zones;
    let fault = fault_spec(a)?;
    let t = ubd_targets::ZonedTarget::new(&ubd_targets::ZonedOptions {
        size,
        zone_size,
        conventional,
        max_open,
        max_active,
        block_size,
    })
    .map_err(|e| anyhow::anyhow!("zoned: {e}"))?;
    preflight()?;
    // The scan at start would only read zeroes; the block layer reads the zones anyway.
    opts.partition_scan = false;
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

/// `nbd URI`: a client of an NBD server's export.
pub fn serve_nbd(
    a: &DevArgs,
    uri: &str,
    connections: Option<u16>,
    reconnect_timeout: u64,
    io_timeout: Option<u64>,
) -> Result<()> {
    let mut opts = device_options(a)?;
    if io_timeout == Some(0) {
        bail!("--io-timeout must be at least 1 second");
    }
    let fault = fault_spec(a)?;
    preflight()?;
    let nbd = ubd_targets::NbdOptions {
        connections,
        reconnect_timeout: Duration::from_secs(reconnect_timeout),
        io_timeout: io_timeout.map(Duration::from_secs),
        ..Default::default()
    };
    // One connection per queue: --connections sets the queue count.
    let queues = match (connections, a.queues) {
        (Some(0), _) => bail!("--connections must be at least 1"),
        (Some(n), Some(q)) if n != q => {
            bail!("--connections {n} and --queues {q} differ: each queue has one connection")
        }
        (Some(n), _) => n,
        (None, _) => opts.queues,
    };
    let t = ubd_targets::NbdTarget::open(uri, &nbd, queues).map_err(|e| a.at_key("uri", e))?;
    opts.queues = t.queues();
    // Requests no larger than the server takes (its NBD_INFO_BLOCK_SIZE maximum).
    opts.max_io_buf_bytes = ubd_targets::nbd::max_io_bytes(t.export(), opts.max_io_buf_bytes);
    // The partition scan at start would read over the network (and hang a recovery
    // whose server is gone).
    opts.partition_scan = false;
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

/// The `rbd` command's own options.
#[derive(Debug)]
pub struct RbdArgs {
    pub conf: Option<std::path::PathBuf>,
    pub id: Option<String>,
    pub keyring: Option<std::path::PathBuf>,
    pub cluster: Option<String>,
    pub io_timeout: Option<u64>,
    pub connect_timeout: u64,
    /// `--ceph-option NAME=VALUE`s.
    pub options: Vec<String>,
}

/// `rbd POOL/IMAGE[@SNAP]`: a Ceph RBD image through librbd.
pub fn serve_rbd(a: &DevArgs, image: &str, r: RbdArgs) -> Result<()> {
    let mut opts = device_options(a)?;
    if r.io_timeout == Some(0) {
        bail!("--io-timeout must be at least 1 second");
    }
    if r.connect_timeout == 0 {
        bail!("--connect-timeout must be at least 1 second");
    }
    match a.queues {
        Some(q) if q > 1 => bail!(
            "rbd: --queues {q}: an rbd device has one queue (librbd signals one eventfd per open image, and two handles of one image fight over its exclusive lock)"
        ),
        _ if opts.queues > 1 => {
            tracing::info!("rbd: one queue (librbd completes an image's IO through one eventfd)");
            opts.queues = 1;
        }
        _ => {}
    }
    let options = r
        .options
        .iter()
        .map(|o| match o.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.trim().to_string())),
            _ => Err(anyhow::anyhow!("--ceph-option {o:?}: expected NAME=VALUE (e.g. rbd_cache=false)")),
        })
        .collect::<Result<Vec<_>>>()?;
    let fault = fault_spec(a)?;
    preflight()?;
    let ro = ubd_targets::RbdOptions {
        options,
        conf: r.conf,
        id: r.id,
        keyring: r.keyring,
        cluster: r.cluster,
        io_timeout: r.io_timeout.map(Duration::from_secs),
        connect_timeout: Some(Duration::from_secs(r.connect_timeout)),
    };
    let t = ubd_targets::RbdTarget::open(image, &ro).map_err(|e| a.at_key("image", format!("rbd: {e}")))?;
    // The partition scan at start would read over the network.
    opts.partition_scan = false;
    let spec = t.spec();
    serve(with_faults(Arc::new(t), fault), spec, &opts, a, false)
}

fn fault_spec(a: &DevArgs) -> Result<Option<ubd_targets::FaultSpec>> {
    a.fault
        .as_deref()
        .map(|s| ubd_targets::FaultSpec::parse(s).map_err(|e| anyhow::anyhow!("--fault: {e}")))
        .transpose()
}

fn with_faults(t: Arc<dyn Target>, spec: Option<ubd_targets::FaultSpec>) -> Arc<dyn Target> {
    match spec {
        Some(spec) => Arc::new(ubd_targets::FaultTarget::new(t, spec)),
        None => t,
    }
}

/// `recover ID`: re-open the target recorded in the state file and take the device over.
/// `--fault` wraps it anew (faults of the dead daemon are not restored).
pub fn recover(a: &DevArgs, id: u32) -> Result<()> {
    preflight()?;
    // The kernel's word first: whether the device exists and is this caller's.
    Control::open()?.dev_info(id)?;
    let st = state::read(id).with_context(|| format!("device {id}"))?.with_context(|| {
        format!("device {id}: no state file {} (was it served by ubd-engine?)", state::path(id).display())
    })?;
    let target = st.target_spec.open()?;
    let mut opts = device_options(a)?;
    opts.dev_id = Some(id);
    serve(with_faults(target, fault_spec(a)?), st.target_spec, &opts, a, true)
}

/// The shared memory of device `id` as its state file records it (what `recover` maps
/// again, with the registration the kernel kept). A `--shmem` given must name that file.
fn recorded_shmem(
    id: u32,
    st: &DeviceState,
    given: Option<ubd_engine::ShmemOptions>,
) -> Result<Option<ubd_engine::ShmemOptions>> {
    let Some(r) = &st.shmem else { return Ok(given) };
    if let Some(g) = &given
        && g.path != r.path
    {
        bail!(
            "device {id} serves shared memory {}, not {}: recover it with that file (or without --shmem)",
            r.path.display(),
            g.path.display()
        );
    }
    Ok(Some(ubd_engine::ShmemOptions {
        path: r.path.clone(),
        size: Some(r.bytes),
        read_only: r.read_only,
        registered: Some(r.registration),
    }))
}

/// Serves a new device, or takes over an existing one (`recover`: always; `run`: when
/// the kernel still holds it; `--takeover`: from a daemon about to let go); `spec` (what
/// re-opens `target`, without its faults) goes into the state file for `recover`.
fn serve(target: Arc<dyn Target>, spec: TargetSpec, opts: &DeviceOptions, a: &DevArgs, recover: bool) -> Result<()> {
    let mut owned_opts = opts.clone();
    // Signals are blocked before any thread (the metrics server's) is started, so that
    // SIGTERM reaches the engine's wait loop and not a thread that would die of it.
    ubd_engine::block_stop_signals()?;
    let metrics = a.metrics.as_deref().map(crate::metrics::MetricsServer::start).transpose()?;
    let takeover = match a.start {
        Start::New if recover => opts.dev_id,
        Start::New => None,
        Start::NewOrRecover(id) => existing_device(id, &spec)?,
        Start::Takeover(id) => {
            existing_device(id, &spec)?.with_context(|| format!("device {id} does not exist: nothing to take over"))?;
            let st = state::read(id)?.with_context(|| format!("device {id}: no state file"))?;
            // `upgrade` waits for this line before the old daemon lets go.
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", service::prepared_line(id, std::process::id()));
            let _ = out.flush();
            drop(out);
            let deadline = opts.stop_grace + Duration::from_secs(30);
            service::wait_exit(st.pid, deadline)?;
            // The process may look gone (its main thread a zombie) while its other
            // threads still hold /dev/ublkcN: the kernel's word is that the device left
            // LIVE (quiesced, or failing IO) once the old daemon closed it.
            service::wait_not_live(id, deadline)?;
            Some(id)
        }
    };
    // A device taken over serves the shared memory its state file records.
    if let Some(id) = takeover
        && let Some(st) = state::read(id)?
    {
        owned_opts.shmem = recorded_shmem(id, &st, owned_opts.shmem.take())?;
    }
    let opts = &owned_opts;
    let describe = target.describe();
    let info = target.info().clone();
    let name = target.name();
    let mut dev_id = None;
    let on_started = |dev: &StartedDevice| {
        dev_id = Some(dev.dev_id);
        report_started(name, &describe, &info, dev, opts.read_only);
        let q0 = dev.queues.first();
        let st = DeviceState {
            dev_id: dev.dev_id,
            pid: dev.pid,
            target: name.into(),
            target_info: describe.clone(),
            target_spec: spec.clone(),
            block_path: dev.block_path.clone(),
            queues: dev.queues.iter().filter(|q| q.thread == 0).count().try_into().unwrap_or(u16::MAX),
            depth: dev.queue_depth,
            cpus: dev.queues.iter().map(|q| q.cpus.clone()).collect(),
            buffer_mode: dev.buffer_mode.to_string(),
            ring: q0.map(|q| q.ring),
            pages: q0.and_then(|q| q.pages).map(|p| p.to_string()),
            shmem: dev.shmem.clone(),
            argv: own_args(dev.dev_id),
            version: format!("ubd-engine {}", env!("CARGO_PKG_VERSION")),
        };
        if let Err(e) = state::write(&st) {
            tracing::warn!("cannot write state file {}: {e}", state::path(dev.dev_id).display());
        }
        if let Some(m) = &metrics {
            tracing::info!("metrics: http://{}/metrics", m.addr());
            m.set_labels(crate::metrics::DeviceLabels {
                dev_id: dev.dev_id,
                target: name.into(),
                buffer_mode: dev.buffer_mode.to_string(),
            });
        }
        // The device path is the one line on stdout, for scripts.
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{}", dev.block_path.display());
        let _ = out.flush();
        let status = format!("serving {} ({name})", dev.block_path.display());
        service::notify(&[NotifyState::MainPid(std::process::id()), NotifyState::Ready, NotifyState::Status(&status)]);
    };
    let on_tick = |stats: &DeviceStats| {
        if let Err(e) = state::write_stats(stats) {
            tracing::debug!("cannot write stats file: {e}");
        }
        if let Some(m) = &metrics {
            m.update(stats);
        }
        let status = format!(
            "serving /dev/ublkb{} ({name}): {:.0} IOPS, read {}/s, write {}/s",
            stats.dev_id,
            stats.iops,
            human(stats.read_bytes_per_s as u64),
            human(stats.write_bytes_per_s as u64)
        );
        service::notify(&[NotifyState::Status(&status)]);
    };
    let result = match takeover {
        None => ubd_engine::serve(target, opts, on_started, on_tick),
        Some(id) => ubd_engine::recover(id, target, opts, on_started, on_tick),
    };
    service::notify(&[NotifyState::Stopping]);
    // The state file goes with the device: one left for recovery keeps it.
    if let Some(id) = dev_id.filter(|id| !Control::list_ids().contains(id)) {
        state::remove(id);
    }
    let summary = result?;
    if summary.handed_over {
        tracing::info!("device {} handed over to a new daemon ({})", summary.dev_id, summary.reason);
        return Ok(());
    }
    let t = &summary.stats.total;
    let n = &t.counters;
    tracing::info!(
        "device {} stopped and deleted ({}): reads {} ({}), writes {} ({}), flushes {}, discards {}, write-zeroes {}, errors {}, {:.1} CQEs per pass, {:.1} SQEs per submit",
        summary.dev_id,
        summary.reason,
        n.reads,
        human(n.bytes_read),
        n.writes,
        human(n.bytes_written),
        n.flushes,
        n.discards,
        n.write_zeroes,
        n.errors,
        n.cqes_per_pass(),
        n.sqes_per_submit(),
    );
    if n.shmem_zc > 0 {
        tracing::info!(
            "shared memory: {} of {} reads and writes served from it with no copy",
            n.shmem_zc,
            n.reads + n.writes
        );
    }
    if let Some(b) = &n.batch {
        let (f, c) = (&b.requests_per_fetch, &b.elements_per_commit);
        tracing::info!(
            "batch io: {} fetch CQEs, {:.1} requests per fetch (max {}); {} commits, {:.1} elements per commit (max {})",
            f.count,
            f.mean(),
            f.max,
            c.count,
            c.mean(),
            c.max
        );
    }
    for (what, l) in [("read", &t.read_latency), ("write", &t.write_latency), ("other", &t.other_latency)] {
        if l.count > 0 {
            tracing::info!(
                "{what} latency (us, in engine+target): p50 {:.1} p99 {:.1} p99.9 {:.1} max {:.1} over {}",
                l.p50_us,
                l.p99_us,
                l.p999_us,
                l.max_us,
                l.count
            );
        }
    }
    Ok(())
}

/// `run`: whether device `id` already exists and is to be recovered rather than added.
/// It must be ours (a state file) and serve the same target as `spec`; whether its
/// daemon is gone the engine's recovery checks (a live one is refused).
fn existing_device(id: u32, spec: &TargetSpec) -> Result<Option<u32>> {
    let mut ctrl = Control::open()?;
    match ctrl.dev_info(id) {
        Err(ubd_engine::Error::NoDevice { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
        Ok(_) => {}
    }
    let st = state::read(id)?.with_context(|| {
        format!(
            "device {id} exists but no ubd-engine state file {} says what it serves: delete it (`ubd-engine del {id}`) or use another id",
            state::path(id).display()
        )
    })?;
    if st.target_spec != *spec {
        bail!(
            "device {id} exists and serves {}; the configuration says {}: not the same target (delete the device with `ubd-engine del {id}` to change it)",
            serde_json::to_string(&st.target_spec)?,
            serde_json::to_string(spec)?
        );
    }
    tracing::info!("device {id} exists (from process {}): recovering it", st.pid);
    Ok(Some(id))
}

/// This process's arguments, for `upgrade` to start its successor with (`--takeover`
/// left out: upgrade adds its own).
fn own_args(dev_id: u32) -> Vec<String> {
    let mut out = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--takeover" {
            args.next();
        } else if !a.starts_with("--takeover=") {
            out.push(a);
        }
    }
    // A device the kernel numbered: its successor must name it.
    if !out.iter().any(|a| a == "--id" || a.starts_with("--id=")) && out.first().is_none_or(|a| a != "recover") {
        out.insert(0, format!("--id={dev_id}"));
    }
    out
}

/// `udev-owner NAME`: for the udev rule, `UBD_OWNER_UID=` and `UBD_OWNER_GID=` of the
/// unprivileged device whose node is NAME (the kernel's word: GET_DEV_INFO2); nothing
/// for an ordinary device, whose nodes stay root's. Sends control commands only (never
/// opens the block device), so it cannot wait on the device it names.
pub fn udev_owner(name: &str) -> Result<()> {
    let id = node_device_id(name).with_context(|| format!("{name:?} is not a ublk device node (ublkcN, ublkbN)"))?;
    let mut ctrl = Control::open()?;
    if !ctrl.is_unprivileged(id) {
        return Ok(());
    }
    let info = ctrl.dev_info(id)?;
    println!("UBD_OWNER_UID={}\nUBD_OWNER_GID={}", info.owner_uid, info.owner_gid);
    Ok(())
}

/// The device id of a ublk node name: ublkc3, ublkb3 and ublkb3p1 are device 3's.
fn node_device_id(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("ublkc").or_else(|| name.strip_prefix("ublkb"))?;
    let digits = rest.find(|c: char| !c.is_ascii_digit()).map_or(rest, |i| &rest[..i]);
    let tail = &rest[digits.len()..];
    if digits.is_empty()
        || !(tail.is_empty()
            || (name.starts_with("ublkb")
                && tail.len() > 1
                && tail.starts_with('p')
                && tail[1..].bytes().all(|b| b.is_ascii_digit())))
    {
        return None;
    }
    digits.parse().ok()
}

/// `stats ID`: the live statistics a serving ubd-engine publishes every second.
pub fn stats(id: u32, json: bool) -> Result<()> {
    // The kernel's word on whether this caller may see the device (another user's
    // unprivileged device: EACCES, reported as such).
    Control::open()?.dev_info(id)?;
    let Some(st) = state::read(id)? else {
        bail!("device {id} is not served by a running ubd-engine (no {})", state::path(id).display());
    };
    let s = state::read_stats(id)
        .with_context(|| format!("device {id}: no statistics yet in {}", state::stats_path(id).display()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "device": st, "stats": s }))?);
        return Ok(());
    }
    println!(
        "device {id} ({} {}), pid {}, buffer mode {}, up {:.0} s: {:.0} IOPS, read {}/s, write {}/s (last second)",
        st.target,
        st.target_info.get("path").and_then(|p| p.as_str()).unwrap_or(""),
        st.pid,
        BufferMode::from_name(&st.buffer_mode).map_or(st.buffer_mode.as_str(), |m| m.label()),
        s.uptime_s,
        s.iops,
        human(s.read_bytes_per_s as u64),
        human(s.write_bytes_per_s as u64),
    );
    println!(
        "{:<6} {:>10} {:>10} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "QUEUE", "READS", "WRITES", "OTHER", "ERRORS", "SQE/SUB", "INFLIGHT", "RD p50us", "RD p99us", "WR p99us"
    );
    let rows = s.queues.iter().enumerate().map(|(i, q)| (i.to_string(), q)).chain([("total".to_string(), &s.total)]);
    for (name, q) in rows {
        let c = &q.counters;
        println!(
            "{:<6} {:>10} {:>10} {:>8} {:>7} {:>9.1} {:>9} {:>9.1} {:>9.1} {:>9.1}",
            name,
            c.reads,
            c.writes,
            c.flushes + c.discards + c.write_zeroes,
            c.errors,
            c.sqes_per_submit(),
            format!("{}/{}", c.inflight, c.inflight_max),
            q.read_latency.p50_us,
            q.read_latency.p99_us,
            q.write_latency.p99_us,
        );
    }
    if let Some(sh) = &st.shmem {
        let c = &s.total.counters;
        println!(
            "shared memory {}: {} of {} reads and writes served from it (no copy), {} in buffer mode {}",
            sh.path.display(),
            c.shmem_zc,
            c.reads + c.writes,
            (c.reads + c.writes).saturating_sub(c.shmem_zc),
            st.buffer_mode
        );
    }
    if s.total.counters.batch.is_some() {
        print_batch_stats(&s);
    }
    Ok(())
}

/// The batch protocol's table: requests per FETCH_IO_CMDS completion and elements
/// per COMMIT_IO_CMDS, per queue and in total.
fn print_batch_stats(s: &DeviceStats) {
    println!(
        "{:<6} {:>10} {:>9} {:>9} {:>10} {:>9} {:>9}",
        "QUEUE", "FETCHES", "REQ/FET", "MAX", "COMMITS", "ELEM/COM", "MAX"
    );
    let rows = s.queues.iter().enumerate().map(|(i, q)| (i.to_string(), q)).chain([("total".to_string(), &s.total)]);
    for (name, q) in rows {
        let Some(b) = &q.counters.batch else { continue };
        let (f, c) = (&b.requests_per_fetch, &b.elements_per_commit);
        println!(
            "{:<6} {:>10} {:>9.1} {:>9} {:>10} {:>9.1} {:>9}",
            name,
            f.count,
            f.mean(),
            f.max,
            c.count,
            c.mean(),
            c.max
        );
    }
}

fn report_started(
    name: &str,
    describe: &serde_json::Value,
    info: &ubd_engine::TargetInfo,
    dev: &StartedDevice,
    asked_read_only: bool,
) {
    let q0 = dev.queues.first();
    let cpus: Vec<String> =
        dev.queues.iter().map(|q| q.cpus.as_deref().map_or_else(|| "any".into(), ubd_engine::format_cpulist)).collect();
    let ring = q0.map_or_else(String::new, |q| {
        if q.ring_fd_registered { format!("{} (fd registered)", q.ring) } else { q.ring.to_string() }
    });
    // Several threads per queue (PER_IO_DAEMON): one report each.
    let nr_queues = dev.queues.iter().filter(|q| q.thread == 0).count().max(1);
    let threads = dev.queues.len() / nr_queues;
    let queues =
        if threads > 1 { format!("{nr_queues} queues x {threads} threads") } else { format!("{nr_queues} queues") };
    tracing::info!(
        "{} serving {name} {} ({}, {}-byte blocks): {queues} x depth {}, max IO {}, queue CPUs [{}], ring {ring}, io protocol {}",
        dev.block_path.display(),
        describe.get("path").and_then(|p| p.as_str()).unwrap_or(""),
        human(info.dev_size),
        info.logical_block_size,
        dev.queue_depth,
        human(u64::from(dev.max_io_buf_bytes)),
        cpus.join(" "),
        dev.io_protocol,
    );
    let buffers = match q0.and_then(|q| q.pages.map(|p| (p, q.fixed_buffers))) {
        Some((pages, fixed)) => format!("buffers {pages}{}", if fixed { " (registered)" } else { " (not registered)" }),
        None if dev.buffer_mode == BufferMode::NoData => format!("no buffers: {}", dev.buffer_mode.label()),
        None => "buffers: the requests' own pages (zero-copy)".into(),
    };
    tracing::info!("buffer mode {} ({}); {buffers}", dev.buffer_mode, dev.buffer_reason);
    if let Some(sh) = &dev.shmem {
        tracing::info!(
            "shared memory {} ({}, {}{}): registered as buffer {}; O_DIRECT IO from it is served with no copy, other IO in buffer mode {}",
            sh.path.display(),
            human(sh.bytes),
            serde_json::to_value(sh.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
            if sh.read_only { ", read-only: writes only" } else { "" },
            sh.registration.index,
            dev.buffer_mode
        );
    }
    if dev.recovered {
        tracing::info!("recovered device {}: took over from the dead daemon; in-flight IO re-issued", dev.dev_id);
    } else {
        tracing::info!("recovery on daemon death: {}", dev.recovery);
    }
    if dev.read_only {
        let why = match (asked_read_only, dev.recovered) {
            (true, _) => "--read-only",
            (false, true) => "as the device was created",
            (false, false) => "the target allows no writes",
        };
        tracing::info!("read-only device ({why}): writes fail with EROFS and never reach the target");
    }
    if let Some(direct) = describe.get("direct_io").and_then(serde_json::Value::as_bool) {
        tracing::info!("backing IO: {}", if direct { "O_DIRECT" } else { "buffered (page cache)" });
    }
    tracing::debug!("kernel ublk features: {}", feature_names(dev.kernel_features).join(" "));
}

pub fn features(json: bool) -> Result<()> {
    let mut ctrl = Control::open()?;
    let mask = ctrl.features()?;
    let names = feature_names(mask);
    if json {
        println!("{}", serde_json::json!({ "mask": format!("{mask:#x}"), "value": mask, "features": names }));
    } else {
        println!("ublk features {mask:#x}:");
        for n in names {
            println!("  {n}");
        }
    }
    Ok(())
}

#[derive(Debug, serde::Serialize)]
struct ListEntry {
    dev_id: u32,
    state: &'static str,
    queues: u16,
    depth: u16,
    max_io_buf_bytes: u32,
    pid: i32,
    /// Who created it (an unprivileged device belongs to them; flags then show UNPRIVILEGED_DEV).
    owner_uid: u32,
    owner_gid: u32,
    daemon_alive: bool,
    flags: Vec<String>,
    /// From GET_PARAMS (None before SET_PARAMS).
    size: Option<u64>,
    read_only: Option<bool>,
    target: Option<String>,
    target_info: Option<serde_json::Value>,
}

pub fn list(json: bool) -> Result<()> {
    let mut ctrl = Control::open()?;
    let mut entries = Vec::new();
    let mut others = 0;
    for id in Control::list_ids() {
        let info = match ctrl.dev_info(id) {
            Ok(i) => i,
            Err(ubd_engine::Error::NoDevice { .. }) => continue,
            // Another user's device (or, for a user, root's): not ours to show.
            Err(ubd_engine::Error::NotYours { .. }) => {
                others += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let st = state::read(id).unwrap_or_else(|e| {
            tracing::warn!("device {id}: {e:#}");
            None
        });
        let params = ctrl.get_params(id).ok().filter(|p| p.size_bytes() > 0);
        entries.push(ListEntry {
            dev_id: id,
            size: params.as_ref().map(|p| p.size_bytes()),
            read_only: params.as_ref().map(|p| p.read_only()),
            state: info.state_name(),
            queues: info.nr_hw_queues,
            depth: info.queue_depth,
            max_io_buf_bytes: info.max_io_buf_bytes,
            pid: info.ublksrv_pid,
            owner_uid: info.owner_uid,
            owner_gid: info.owner_gid,
            daemon_alive: live_process(info.ublksrv_pid).is_some(),
            flags: feature_names(info.flags),
            target: st.as_ref().map(|s| s.target.clone()),
            target_info: st.map(|s| s.target_info),
        });
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    let note = match others {
        0 => String::new(),
        1 => " (and 1 device of another user)".into(),
        n => format!(" (and {n} devices of other users)"),
    };
    if entries.is_empty() {
        println!("no ublk devices{note}");
        return Ok(());
    }
    println!(
        "{:<4} {:<8} {:>6} {:>6} {:>8} {:<4} {:>8} {:<6} TARGET",
        "ID", "STATE", "QUEUES", "DEPTH", "SIZE", "MODE", "PID", "DAEMON"
    );
    for e in entries {
        let target = match (&e.target, &e.target_info) {
            (Some(t), Some(i)) => format!("{t} {}", i.get("path").and_then(|p| p.as_str()).unwrap_or("")),
            _ => "-".into(),
        };
        let alive = if e.daemon_alive { "alive" } else { "dead" };
        let mode = match e.read_only {
            Some(true) => "ro",
            Some(false) => "rw",
            None => "-",
        };
        println!(
            "{:<4} {:<8} {:>6} {:>6} {:>8} {:<4} {:>8} {:<6} {}",
            e.dev_id,
            e.state,
            e.queues,
            e.depth,
            e.size.map_or_else(|| "-".into(), human),
            mode,
            e.pid,
            alive,
            target.trim()
        );
    }
    if others > 0 {
        println!("{}", note.trim().trim_start_matches('(').trim_end_matches(')').replacen("and ", "not shown: ", 1));
    }
    Ok(())
}

pub fn del(id: Option<u32>, all: bool, force: bool, yank: bool) -> Result<()> {
    let mut ctrl = Control::open()?;
    let ids = if all { Control::list_ids() } else { id.into_iter().collect() };
    for id in ids {
        del_one(&mut ctrl, id, force, yank)?;
        println!("deleted device {id}");
    }
    Ok(())
}

/// The process `pid`, if it exists (signal 0 checks; EPERM means it exists too).
pub(crate) fn live_process(pid: i32) -> Option<Pid> {
    // 0 and negative pids (process groups) are no daemon.
    let p = Pid::from_raw(pid.max(0))?;
    ubd_engine::pid_alive(pid).then_some(p)
}

/// Deletes device `id`. A device that is open (mounted, held by a process or a stacked
/// device) is left alone unless `yank`; one served by a live daemon needs `force` (or
/// `yank`) and is stopped by that daemon (SIGTERM: it cleans up after itself; with
/// `yank` a second signal makes it stop even if the device was opened meanwhile).
fn del_one(ctrl: &mut Control, id: u32, force: bool, yank: bool) -> Result<()> {
    let info = ctrl.dev_info(id)?;
    let holders = ubd_engine::device_holders(id);
    if !yank && !holders.is_empty() {
        bail!(
            "device {id} is in use ({}): not deleted (close it first, or --yank to remove it anyway)",
            holders.join(", ")
        );
    }
    let pid = info.ublksrv_pid;
    let me = std::process::id().cast_signed();
    let daemon = (pid != me && !info.is_dead()).then(|| live_process(pid)).flatten();
    if let Some(daemon) = daemon {
        if !force && !yank {
            bail!("device {id} is served by running process {pid}; stop that process, or use --force");
        }
        // A live daemon serves it: ask it to stop, so that it cleans up after itself.
        let signal = |sig| {
            rustix::process::kill_process(daemon, sig)
                .with_context(|| format!("signalling daemon {pid} of device {id}"))
        };
        signal(Signal::TERM)?;
        let start = Instant::now();
        let mut again = yank;
        // Deleted once the kernel has no such device, or (deleted while still open: the
        // number stays taken until the last user closes it) no char device.
        let char_dev = format!("/sys/class/ublk-char/ublkc{id}");
        loop {
            match ctrl.dev_info(id) {
                Err(ubd_engine::Error::NoDevice { .. }) => return Ok(()),
                Ok(_) if !Path::new(&char_dev).exists() => return Ok(()),
                Err(e) => return Err(e.into()),
                Ok(_) if start.elapsed() > Duration::from_secs(30) => {
                    let holders = ubd_engine::device_holders(id);
                    if holders.is_empty() {
                        bail!("device {id}: daemon {pid} did not remove it within 30 s");
                    }
                    bail!("device {id}: daemon {pid} did not remove it within 30 s: in use ({})", holders.join(", "));
                }
                // --yank: the daemon waits for a device in use to be closed; a second
                // stop signal stops it regardless.
                Ok(_) if again && start.elapsed() > Duration::from_millis(500) => {
                    signal(Signal::INT)?;
                    again = false;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
    let stopped = if yank { ctrl.stop_dev(id) } else { ctrl.safe_stop_dev(id) };
    if let Err(e) = stopped
        && e.raw_os_error() != Some(libc::ENODEV)
    {
        return Err(e.into());
    }
    // Yanked while open: DEL_DEV would wait for the users to close the dead device.
    let deleted = if holders.is_empty() { ctrl.del_dev(id) } else { ctrl.del_dev_nowait(id) };
    match deleted {
        Err(e) if e.raw_os_error() != Some(libc::ENODEV) => return Err(e.into()),
        _ => {}
    }
    state::remove(id);
    Ok(())
}

/// `resize ID SIZE [--force]`: the served device's capacity becomes SIZE (UPDATE_SIZE,
/// Linux 6.16+). Loop: a regular backing file grows first (sparse) and shrinks after the
/// device with --force; a block device backing must hold SIZE. Null: just the size.
/// The state file records the new size, so that `recover` re-opens the same device.
pub fn resize(id: u32, size: &str, force: bool) -> Result<()> {
    let new = parse_size(size).map_err(anyhow::Error::msg).context("SIZE")?;
    let mut ctrl = Control::open()?;
    ctrl.check_update_size(id)?;
    let params = ctrl.get_params(id)?;
    let (old, lbs) = (params.size_bytes(), params.logical_block_size());
    if new == 0 || !new.is_multiple_of(u64::from(lbs)) {
        bail!("size {new} bytes is not a positive multiple of device {id}'s {lbs}-byte block size");
    }
    if params.read_only() {
        bail!("device {id} is read-only: it cannot be resized");
    }
    let mut st = state::read(id)?
        .with_context(|| format!("device {id} is not served by ubd-engine (no {})", state::path(id).display()))?;
    if live_process(st.pid).is_none() {
        bail!("device {id}: its ubd-engine (pid {}) is not running", st.pid);
    }
    if new == old {
        println!("device {id} is already {} ({new} bytes)", human(new));
        return Ok(());
    }
    if new < old && !force {
        bail!(
            "shrinking device {id} from {} to {} cuts off the data past {new} bytes: use --force to do it",
            human(old),
            human(new)
        );
    }
    match &mut st.target_spec {
        TargetSpec::Loop { path, size: limit, .. } => {
            let path = path.clone();
            let meta = std::fs::metadata(&path).with_context(|| format!("backing {}", path.display()))?;
            if meta.file_type().is_file() {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .with_context(|| format!("cannot open backing {} to resize it", path.display()))?;
                // Grow the backing before the device, shrink it after: the device never
                // reaches past its backing's end.
                if new > meta.len() {
                    file.set_len(new).with_context(|| format!("growing {} to {new} bytes", path.display()))?;
                }
                ctrl.update_size(id, new)?;
                if new < meta.len() {
                    file.set_len(new).with_context(|| format!("shrinking {} to {new} bytes", path.display()))?;
                }
                *limit = None;
            } else {
                let file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
                let have = ubd_engine::os::blk_size_bytes(std::os::fd::AsFd::as_fd(&file))
                    .with_context(|| format!("BLKGETSIZE64 on {}", path.display()))?;
                if new > have {
                    bail!(
                        "{} holds {} ({have} bytes): it cannot back a {new}-byte device (grow it first)",
                        path.display(),
                        human(have)
                    );
                }
                ctrl.update_size(id, new)?;
                *limit = (new < have).then_some(new);
            }
        }
        TargetSpec::Null { size, .. } => {
            ctrl.update_size(id, new)?;
            *size = new;
        }
        _ => bail!("the {} target cannot be resized (loop and null can)", st.target),
    }
    if let Some(s) = st.target_info.get_mut("size") {
        *s = serde_json::json!(new);
    }
    state::write(&st).with_context(|| format!("device {id} is resized, but its state file was not updated"))?;
    println!("device {id}: {} -> {} ({new} bytes)", human(old), human(new));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(node_device_id("ublkc3"), Some(3));
        assert_eq!(node_device_id("ublkb12"), Some(12));
        assert_eq!(node_device_id("ublkb12p1"), Some(12));
        for bad in ["ublkc", "ublkc3p1", "ublkb3p", "ublkb3x", "ublk-control", "loop0", "ublkbp1"] {
            assert_eq!(node_device_id(bad), None, "{bad}");
        }
    }
}
