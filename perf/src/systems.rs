//! The systems measured side by side on one backing device: the backing itself,
//! the kernel loop driver, ubd-engine (loop per buffer mode, null) and peers
//! (rublk). Each is started, yields a block device, and is torn down on drop.

use std::io::{BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long a ublk server may take to show its device (TCG is slow).
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Device id used for rublk devices (high, to stay clear of the engine's).
pub const RUBLK_ID: u32 = 900;

/// What a system is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// The backing device itself (the ceiling).
    Raw,
    /// `losetup --direct-io=on` over the backing.
    KLoop,
    /// `ubd-engine loop`, with `--buffer-mode` when given.
    EngineLoop { mode: Option<String> },
    /// `ubd-engine --shmem FILE loop` (UBLK_F_SHMEM_ZC) with `--buffer-mode` when
    /// given, FILE on hugetlbfs; fio's buffers are in FILE (`--iomem=mmaphuge:FILE`).
    EngineShmem { mode: Option<String> },
    /// `ubd-engine null` of the backing's size.
    EngineNull,
    /// `rublk add loop`, `-z` (auto buffer registration) when set.
    RublkLoop { autoreg: bool },
    /// `rublk add null`, with `-u` (user copy: no data copied) or `-z` when given.
    RublkNull { flag: Option<&'static str> },
    /// ublksrv's `ublk add -t loop|null`.
    Ublksrv { target: &'static str },
    /// The kernel's NBD client (`nbd-client`, one connection per queue) of an nbdkit
    /// server (file plugin on a tmpfs image), over TCP on 127.0.0.1 or a Unix socket.
    KNbd { unix: bool },
    /// `ubd-engine nbd` of the same server.
    EngineNbd { unix: bool },
    /// The kernel's RBD client (`rbd device map`) of the image `UBD_PERF_RBD_IMAGE` on
    /// the cluster of `UBD_PERF_RBD_CONF` (perf/rbd.sh starts one in the VM).
    KRbd,
    /// `rbd-nbd map` of the same image (librbd behind nbd.ko); `lean`: with
    /// [`RBD_LEAN`] on its command line.
    RbdNbd { lean: bool },
    /// `ubd-engine rbd` of the same image (one queue); `lean`: with [`RBD_LEAN`] as
    /// `--ceph-option`s.
    EngineRbd { lean: bool },
}

/// The network systems (not in the default list: asked for by name, `knbd*`,
/// `engine-nbd*`), over one nbdkit server each started anew.
pub fn network_systems() -> Vec<System> {
    let mut v = Vec::new();
    for (t, unix) in [("tcp", false), ("unix", true)] {
        v.push(System::new(&format!("knbd-{t}"), Kind::KNbd { unix }));
        v.push(System::new(&format!("engine-nbd-{t}"), Kind::EngineNbd { unix }));
    }
    v.push(System::new("krbd", Kind::KRbd));
    v.push(System::new("rbd-nbd", Kind::RbdNbd { lean: false }));
    v.push(System::new("engine-rbd", Kind::EngineRbd { lean: false }));
    v.push(System::new("rbd-nbd-lean", Kind::RbdNbd { lean: true }));
    v.push(System::new("engine-rbd-lean", Kind::EngineRbd { lean: true }));
    v
}

/// librbd client settings that shed per-IO work for a block device the kernel already
/// caches: no librbd cache layer, and no in-memory gathering of debug log entries.
pub const RBD_LEAN: &[(&str, &str)] = &[
    ("rbd_cache", "false"),
    ("debug_rbd", "0/0"),
    ("debug_rados", "0/0"),
    ("debug_objecter", "0/0"),
    ("debug_ms", "0/0"),
    ("debug_monc", "0/0"),
    ("debug_objectcacher", "0/0"),
    ("debug_finisher", "0/0"),
    ("debug_auth", "0/0"),
    ("debug_journaler", "0/0"),
];

/// The cluster configuration and image of the rbd systems.
fn rbd_target() -> Result<(String, String)> {
    let conf = std::env::var("UBD_PERF_RBD_CONF").map_err(|_| {
        anyhow!("the rbd systems need a running Ceph cluster: UBD_PERF_RBD_CONF names its configuration (perf/rbd.sh sets one up)")
    })?;
    let image = std::env::var("UBD_PERF_RBD_IMAGE").unwrap_or_else(|_| "rbd/perf".into());
    Ok((conf, image))
}

/// The system a system's ratio is taken against: the kernel NBD client over the same
/// transport for the nbd systems, rbd-nbd for the rbd systems, the kernel loop driver
/// for the rest.
pub fn reference_of(system: &str) -> &'static str {
    let nbd = system.starts_with("knbd-") || system.starts_with("engine-nbd-");
    let rbd = system == "krbd" || system.starts_with("rbd-nbd") || system.starts_with("engine-rbd");
    match () {
        () if rbd => "rbd-nbd",
        () if nbd && system.contains("-tcp") => "knbd-tcp",
        () if nbd && system.contains("-unix") => "knbd-unix",
        () => "kloop",
    }
}

/// The port and image of the perf NBD server.
const NBD_PORT: u16 = 10899;

fn nbd_image() -> PathBuf {
    PathBuf::from("/dev/shm/ubd-perf-nbd.img")
}

/// A named system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    pub name: String,
    pub kind: Kind,
    /// Extra `ubd-engine` arguments (engine systems of a `--variant`).
    pub extra: Vec<String>,
}

impl System {
    pub fn new(name: &str, kind: Kind) -> Self {
        System { name: name.to_string(), kind, extra: Vec::new() }
    }

    /// Whether the system needs the ublk driver.
    pub fn needs_ublk(&self) -> bool {
        !matches!(self.kind, Kind::Raw | Kind::KLoop | Kind::KNbd { .. } | Kind::KRbd | Kind::RbdNbd { .. })
    }

    /// Whether the system is a network one (see [`network_systems`]).
    pub fn is_network(&self) -> bool {
        matches!(
            self.kind,
            Kind::KNbd { .. } | Kind::EngineNbd { .. } | Kind::KRbd | Kind::RbdNbd { .. } | Kind::EngineRbd { .. }
        )
    }
}

/// Engine options shared by the engine systems.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOpts {
    pub queues: u32,
    pub depth: u32,
    pub cpus: Option<String>,
    /// Threads per queue (`--threads`, UBLK_F_PER_IO_DAEMON); 1: not passed.
    pub threads: u32,
}

/// What the systems run on.
#[derive(Debug, Clone)]
pub struct Env {
    pub engine: PathBuf,
    pub rublk: Option<PathBuf>,
    /// ublksrv's `ublk` tool.
    pub ublksrv: Option<PathBuf>,
    pub backing: PathBuf,
    pub backing_size: u64,
    /// Where the servers' stderr goes.
    pub log_dir: PathBuf,
    /// fio's `iomem` for the systems that set none (None: malloc).
    pub fio_iomem: Option<String>,
}

/// What the engine binary offers: its buffer modes (empty when it has no
/// `--buffer-mode`) and the kernel's ublk feature names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineCaps {
    pub buffer_modes: Vec<String>,
    pub features: Vec<String>,
    /// `--shmem` (UBLK_F_SHMEM_ZC) is offered by the engine and the kernel.
    pub shmem: bool,
}

impl EngineCaps {
    /// Buffer modes available given `--help` text and the kernel's features:
    /// copy always; zero-copy with SUPPORT_ZERO_COPY; auto-reg with AUTO_BUF_REG;
    /// user-copy with USER_COPY (and an engine that has the mode).
    pub fn from_parts(help: &str, features: Vec<String>) -> Self {
        let mut buffer_modes = Vec::new();
        if help.contains("--buffer-mode") {
            buffer_modes.push("copy".to_string());
            if features.iter().any(|f| f == "SUPPORT_ZERO_COPY") {
                buffer_modes.push("zero-copy".to_string());
            }
            if features.iter().any(|f| f == "AUTO_BUF_REG") {
                buffer_modes.push("auto-reg".to_string());
            }
            if features.iter().any(|f| f == "USER_COPY") && help.contains("user-copy") {
                buffer_modes.push("user-copy".to_string());
            }
        }
        let shmem = help.contains("--shmem") && features.iter().any(|f| f == "SHMEM_ZC");
        EngineCaps { buffer_modes, features, shmem }
    }

    /// Asks the engine binary (`--help`, `features --json`).
    pub fn probe(engine: &Path) -> Result<Self> {
        let help = Command::new(engine)
            .arg("--help")
            .output()
            .with_context(|| format!("cannot run the engine {}", engine.display()))?;
        let out = Command::new(engine).args(["features", "--json"]).output()?;
        if !out.status.success() {
            bail!("{} features --json: {}", engine.display(), last_line(&String::from_utf8_lossy(&out.stderr)));
        }
        Ok(Self::from_parts(&String::from_utf8_lossy(&help.stdout), parse_features(&out.stdout)?))
    }

    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// The `features` list of `ubd-engine features --json`.
pub fn parse_features(json: &[u8]) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct F {
        features: Vec<String>,
    }
    let f: F = serde_json::from_slice(json).context("unexpected `features --json` output")?;
    Ok(f.features)
}

/// The default system list for this engine and peers.
pub fn default_systems(caps: &EngineCaps, rublk: bool, ublksrv: bool) -> Vec<System> {
    let mut v = vec![System::new("raw", Kind::Raw), System::new("kloop", Kind::KLoop)];
    if caps.buffer_modes.is_empty() {
        v.push(System::new("engine-loop", Kind::EngineLoop { mode: None }));
    }
    for m in &caps.buffer_modes {
        v.push(System::new(&format!("engine-loop-{m}"), Kind::EngineLoop { mode: Some(m.clone()) }));
    }
    if caps.shmem {
        // Requests outside the shared memory (none here) in copy, as `auto` picks.
        v.push(System::new("engine-loop-shmem-zc", Kind::EngineShmem { mode: None }));
    }
    v.push(System::new("engine-null", Kind::EngineNull));
    if rublk {
        v.push(System::new("rublk-loop", Kind::RublkLoop { autoreg: false }));
        if caps.has("AUTO_BUF_REG") {
            v.push(System::new("rublk-loop-autoreg", Kind::RublkLoop { autoreg: true }));
        }
        v.push(System::new("rublk-null", Kind::RublkNull { flag: None }));
        v.push(System::new("rublk-null-usercopy", Kind::RublkNull { flag: Some("-u") }));
        if caps.has("AUTO_BUF_REG") {
            v.push(System::new("rublk-null-autoreg", Kind::RublkNull { flag: Some("-z") }));
        }
    }
    if ublksrv {
        v.push(System::new("ublksrv-loop", Kind::Ublksrv { target: "loop" }));
        v.push(System::new("ublksrv-null", Kind::Ublksrv { target: "null" }));
    }
    v
}

/// An engine variant: `NAME=ARGS`, extra `ubd-engine` arguments (split at spaces).
pub fn parse_variant(s: &str) -> Result<(String, Vec<String>)> {
    let (name, args) = s.split_once('=').ok_or_else(|| anyhow!("--variant {s:?}: expected NAME=ARGS"))?;
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        bail!("--variant {s:?}: the name must be letters, digits, - or _");
    }
    let args: Vec<String> = args.split_whitespace().map(str::to_string).collect();
    if args.is_empty() {
        bail!("--variant {s:?}: no engine arguments after =");
    }
    Ok((name.to_string(), args))
}

/// After each engine system, the same system once per variant, named `SYSTEM@NAME`.
pub fn with_variants(all: Vec<System>, variants: &[(String, Vec<String>)]) -> Vec<System> {
    let mut v = Vec::with_capacity(all.len() * (1 + variants.len()));
    for s in all {
        let engine = matches!(s.kind, Kind::EngineLoop { .. } | Kind::EngineShmem { .. } | Kind::EngineNull);
        let copies: Vec<System> = if engine {
            variants
                .iter()
                .map(|(name, args)| System {
                    name: format!("{}@{name}", s.name),
                    kind: s.kind.clone(),
                    extra: args.clone(),
                })
                .collect()
        } else {
            Vec::new()
        };
        v.push(s);
        v.extend(copies);
    }
    v
}

/// Keeps the systems whose name matches one of `patterns` (exact, or a prefix
/// ending in `*`), in the given order; an unknown name is an error.
pub fn select(all: Vec<System>, patterns: &[String]) -> Result<Vec<System>> {
    if patterns.is_empty() {
        return Ok(all);
    }
    let matches = |p: &str, n: &str| p.strip_suffix('*').map_or(p == n, |pre| n.starts_with(pre));
    for p in patterns {
        if !all.iter().any(|s| matches(p, &s.name)) {
            let names: Vec<&str> = all.iter().map(|s| s.name.as_str()).collect();
            bail!("unknown system {p:?} (available here: {})", names.join(", "));
        }
    }
    Ok(all.into_iter().filter(|s| patterns.iter().any(|p| matches(p, &s.name))).collect())
}

/// The rublk binary: on PATH, else in the peers cache (perf/install-peers.sh).
pub fn find_rublk() -> Option<PathBuf> {
    let peers =
        std::env::var_os("UBD_PEERS").map_or_else(|| PathBuf::from("/var/cache/ubd-engine/peers"), PathBuf::from);
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).chain([peers.join("bin")]).map(|d| d.join("rublk")).find(|p| p.is_file())
}

/// ublksrv's `ublk` tool, when on PATH.
pub fn find_ublksrv() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join("ublk")).find(|p| p.is_file())
}

/// Size in bytes of a file or block device.
pub fn size_of(path: &Path) -> Result<u64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(f.seek(SeekFrom::End(0))?)
}

fn last_line(s: &str) -> String {
    s.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string()
}

/// Runs a short command, failing with its last stderr line.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot run {cmd:?}"))?;
    if !out.status.success() {
        bail!("{:?} failed: {}", cmd, last_line(&String::from_utf8_lossy(&out.stderr)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A started system: its device, torn down on drop.
#[derive(Debug)]
pub struct Running {
    pub dev: PathBuf,
    guard: Guard,
    /// fio's `iomem` for this system (the job files read `${IOMEM}`): None is malloc.
    pub iomem: Option<String>,
}

#[derive(Debug)]
enum Guard {
    None,
    Loop(PathBuf),
    Server(Child),
    /// A daemonized peer, stopped with `BIN del -n ID`.
    Daemon(PathBuf, u32),
    /// `nbd-client`'s device, disconnected with `nbd-client -d`.
    NbdClient(PathBuf),
    /// A client (engine or kernel) and then its nbdkit server.
    WithServer(Box<Guard>, Child),
    /// `rbd device unmap` (krbd) or `rbd-nbd unmap` of the device.
    RbdUnmap {
        nbd: bool,
        conf: String,
    },
}

impl Running {
    /// The process that serves the device, if one does (the engine, a peer's daemon,
    /// rbd-nbd; not a kernel client): its CPU time is measured over each run.
    pub fn server_pid(&self) -> Option<u32> {
        fn of(g: &Guard, dev: &Path) -> Option<u32> {
            match g {
                Guard::Server(c) => Some(c.id()),
                Guard::WithServer(client, _) => of(client, dev),
                // nbd.ko records the pid of the process that gave it the socket.
                Guard::RbdUnmap { nbd: true, .. } => {
                    let name = dev.file_name()?.to_string_lossy().into_owned();
                    std::fs::read_to_string(format!("/sys/block/{name}/pid")).ok()?.trim().parse().ok()
                }
                _ => None,
            }
        }
        of(&self.guard, &self.dev)
    }

    /// Stops the system, reporting a failure to stop cleanly.
    pub fn stop(mut self) -> Result<()> {
        let g = std::mem::replace(&mut self.guard, Guard::None);
        teardown(g, &self.dev)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let g = std::mem::replace(&mut self.guard, Guard::None);
        if let Err(e) = teardown(g, &self.dev) {
            eprintln!("warning: {e:#}");
        }
    }
}

fn teardown(g: Guard, dev: &Path) -> Result<()> {
    match g {
        Guard::None => Ok(()),
        Guard::Loop(l) => run(Command::new("losetup").arg("-d").arg(&l)).map(drop),
        Guard::Daemon(bin, id) => run(Command::new(&bin).args(["del", "-n", &id.to_string()])).map(drop),
        Guard::NbdClient(d) => run(Command::new("nbd-client").arg("-d").arg(&d)).map(drop),
        Guard::RbdUnmap { nbd: false, conf } => {
            run(Command::new("rbd").args(["-c", &conf, "device", "unmap", "-o", "noudev"]).arg(dev)).map(drop)
        }
        Guard::RbdUnmap { nbd: true, conf } => {
            run(Command::new("rbd-nbd").args(["-c", &conf, "unmap"]).arg(dev)).map(drop)
        }
        Guard::WithServer(client, server) => {
            let r = teardown(*client, dev);
            let s = teardown(Guard::Server(server), Path::new("nbdkit"));
            r.and(s)
        }
        Guard::Server(mut child) => {
            // SIGTERM through kill(1): this crate has no unsafe code for kill(2).
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(st) = child.try_wait()? {
                    if !st.success() {
                        bail!("server of {} exited with {st} after SIGTERM", dev.display());
                    }
                    return Ok(());
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("server of {} did not exit within 60 s of SIGTERM; killed", dev.display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Starts a foreground server that prints its device path as its first stdout line.
fn start_server(mut cmd: Command, log: &Path) -> Result<Running> {
    let log_file = std::fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file);
    let mut child = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let r = BufReader::new(stdout).read_line(&mut line).map(|_| line.trim().to_string());
        let _ = tx.send(r);
    });
    let fail = |child: &mut Child, why: String| -> anyhow::Error {
        let _ = child.kill();
        let _ = child.wait();
        let err = last_line(&std::fs::read_to_string(log).unwrap_or_default());
        anyhow!("{cmd:?} {why}: {err}")
    };
    match rx.recv_timeout(START_TIMEOUT) {
        Ok(Ok(p)) if !p.is_empty() => Ok(Running { dev: PathBuf::from(p), guard: Guard::Server(child), iomem: None }),
        Ok(_) => Err(fail(&mut child, "exited before starting".into())),
        Err(_) => Err(fail(&mut child, format!("printed no device within {} s", START_TIMEOUT.as_secs()))),
    }
}

fn wait_for_device(dev: &Path) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if std::fs::OpenOptions::new().read(true).open(dev).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{} did not appear within {} s", dev.display(), START_TIMEOUT.as_secs())
}

/// Bytes of the shared-memory file of the shmem systems: room for every job's buffers
/// (each fio job maps the file from its start: iodepth x block size, in 2 MiB pages).
const SHMEM_BYTES: u64 = 32 << 20;

/// The shared-memory file of the shmem systems, on a hugetlbfs mounted for them, with
/// enough huge pages reserved for it (the test VM reserves none), 32 MiB long.
pub fn shmem_file() -> Result<PathBuf> {
    let dir = PathBuf::from("/tmp/ubd-perf-huge");
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&dir.to_str().unwrap_or("")) && f.get(2) == Some(&"hugetlbfs")
    });
    if !mounted {
        let nr = "/proc/sys/vm/nr_hugepages";
        let have: u64 = std::fs::read_to_string(nr).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        let want = have + SHMEM_BYTES / (2 << 20);
        std::fs::write(nr, want.to_string()).with_context(|| format!("cannot write {nr}"))?;
        let got: u64 = std::fs::read_to_string(nr).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
        if got < want {
            bail!("cannot reserve {} huge pages for the shared memory (got {got} of {want})", want - have);
        }
        std::fs::create_dir_all(&dir)?;
        run(Command::new("mount").args(["-t", "hugetlbfs", "none"]).arg(&dir))?;
    }
    let file = dir.join("buf");
    let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&file)?;
    if f.metadata()?.len() < SHMEM_BYTES {
        f.set_len(SHMEM_BYTES).with_context(|| format!("cannot size {}", file.display()))?;
    }
    Ok(file)
}

/// Starts `sys` over `env.backing` with the engine options `eo`.
pub fn start(sys: &System, env: &Env, eo: &EngineOpts) -> Result<Running> {
    let log = env.log_dir.join(format!("{}.log", sys.name));
    let engine_cmd = |mode: Option<&str>| {
        let mut c = Command::new(&env.engine);
        c.args(&sys.extra);
        if let Some(cpus) = &eo.cpus {
            c.args(["--cpus", cpus]);
        }
        c.args(["--queues", &eo.queues.to_string(), "--depth", &eo.depth.to_string()]);
        if eo.threads > 1 {
            c.args(["--threads", &eo.threads.to_string()]);
        }
        if let Some(m) = mode {
            c.args(["--buffer-mode", m]);
        }
        c
    };
    let rublk = || env.rublk.clone().ok_or_else(|| anyhow!("rublk not found (run perf/install-peers.sh)"));
    let qd = |c: &mut Command| {
        c.args(["-n", &RUBLK_ID.to_string(), "-q", &eo.queues.to_string(), "-d", &eo.depth.to_string(), "--quiet"]);
    };
    match &sys.kind {
        Kind::Raw => Ok(Running { dev: env.backing.clone(), guard: Guard::None, iomem: None }),
        Kind::KLoop => {
            // The loop driver may be a module that nothing loaded yet (fresh VM).
            let _ = Command::new("modprobe").arg("loop").output();
            let out = run(Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(&env.backing))?;
            let dev = PathBuf::from(out.trim());
            let r = Running { dev: dev.clone(), guard: Guard::Loop(dev.clone()), iomem: None };
            // losetup falls back to buffered IO silently when the backing refuses O_DIRECT.
            let name = dev.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).is_ok_and(|d| d.trim() == "0") {
                eprintln!(
                    "warning: {} runs without direct IO (the backing refused it): kloop is buffered",
                    dev.display()
                );
            }
            Ok(r)
        }
        Kind::EngineLoop { mode } => {
            let mut c = engine_cmd(mode.as_deref());
            c.arg("loop").arg(&env.backing);
            start_server(c, &log)
        }
        Kind::EngineShmem { mode } => {
            let file = shmem_file()?;
            let mut c = engine_cmd(mode.as_deref());
            c.arg("--shmem").arg(format!("{},size={SHMEM_BYTES}", file.display()));
            c.arg("loop").arg(&env.backing);
            let mut r = start_server(c, &log)?;
            r.iomem = Some(format!("mmaphuge:{}", file.display()));
            Ok(r)
        }
        Kind::EngineNull => {
            let mut c = engine_cmd(None);
            c.args(["null", "--size", &env.backing_size.to_string()]);
            start_server(c, &log)
        }
        Kind::RublkLoop { autoreg } => {
            let bin = rublk()?;
            let mut c = Command::new(&bin);
            c.args(["add", "loop"]);
            qd(&mut c);
            c.arg("-f").arg(&env.backing);
            if *autoreg {
                c.arg("-z");
            }
            start_rublk(c, bin)
        }
        Kind::RublkNull { flag } => {
            let bin = rublk()?;
            let mut c = Command::new(&bin);
            c.args(["add", "null"]);
            qd(&mut c);
            c.args(flag);
            start_rublk(c, bin)
        }
        Kind::KNbd { unix } => {
            let sock = env.log_dir.join("nbdkit.sock");
            let server = start_nbdkit(env, unix.then_some(sock.as_path()))?;
            let dev = free_nbd_device()?;
            let mut c = Command::new("nbd-client");
            if *unix {
                c.arg("-unix").arg(&sock);
            } else {
                c.args(["127.0.0.1", &NBD_PORT.to_string()]);
            }
            c.arg(&dev).args(["-N", "", "-connections", &eo.queues.to_string(), "-block-size", "512"]);
            // Its guard owns the server from here: a failed start stops it too.
            let guard = Guard::WithServer(Box::new(Guard::None), server);
            let mut r = Running { dev: dev.clone(), guard, iomem: None };
            run(&mut c)?;
            if let Guard::WithServer(client, _) = &mut r.guard {
                **client = Guard::NbdClient(dev.clone());
            }
            // The kernel sizes the device once the connections are up.
            let deadline = Instant::now() + START_TIMEOUT;
            while size_of(&dev).unwrap_or(0) == 0 {
                if Instant::now() > deadline {
                    bail!("{} has no size after nbd-client", dev.display());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(r)
        }
        Kind::EngineNbd { unix } => {
            let sock = env.log_dir.join("nbdkit.sock");
            let server = start_nbdkit(env, unix.then_some(sock.as_path()))?;
            let uri = if *unix {
                format!("nbd+unix:///?socket={}", sock.display())
            } else {
                format!("nbd://127.0.0.1:{NBD_PORT}")
            };
            let mut c = engine_cmd(None);
            c.args(["nbd", &uri]);
            match start_server(c, &log) {
                Ok(mut r) => {
                    let client = std::mem::replace(&mut r.guard, Guard::None);
                    r.guard = Guard::WithServer(Box::new(client), server);
                    Ok(r)
                }
                Err(e) => {
                    let _ = teardown(Guard::Server(server), Path::new("nbdkit"));
                    Err(e)
                }
            }
        }
        Kind::KRbd => {
            let (conf, image) = rbd_target()?;
            let mut c = Command::new("rbd");
            c.args(["-c", &conf, "device", "map", "-o", "noudev", &image]);
            rbd_map(c, false, conf)
        }
        Kind::RbdNbd { lean } => {
            let (conf, image) = rbd_target()?;
            let _ = Command::new("modprobe").args(["nbd", "nbds_max=4"]).output();
            let mut c = Command::new("rbd-nbd");
            c.args(["-c", &conf, "map", &image]);
            if *lean {
                c.args(RBD_LEAN.iter().map(|(k, v)| format!("--{k}={v}")));
            }
            rbd_map(c, true, conf)
        }
        Kind::EngineRbd { lean } => {
            let (conf, image) = rbd_target()?;
            let mut c = Command::new(&env.engine);
            c.args(&sys.extra);
            if let Some(cpus) = &eo.cpus {
                c.args(["--cpus", cpus]);
            }
            // One queue: librbd completes an image's IO through one eventfd.
            c.args(["--queues", "1", "--depth", &(eo.depth * eo.queues).min(256).to_string()]);
            c.args(["rbd", "--conf", &conf, &image]);
            if *lean {
                c.args(RBD_LEAN.iter().map(|(k, v)| format!("--ceph-option={k}={v}")));
            }
            start_server(c, &log)
        }
        Kind::Ublksrv { target } => {
            let bin = env.ublksrv.clone().ok_or_else(|| anyhow!("ublksrv's ublk tool not found on PATH"))?;
            let mut c = Command::new(&bin);
            c.args(["add", "-t", target]);
            c.args(["-n", &RUBLK_ID.to_string(), "-q", &eo.queues.to_string(), "-d", &eo.depth.to_string()]);
            if *target == "loop" {
                c.arg("-f").arg(&env.backing);
            }
            start_rublk(c, bin)
        }
    }
}

/// Starts nbdkit's file plugin on the perf image (made once, the backing's size, on
/// tmpfs), on `sock` or 127.0.0.1:NBD_PORT, and waits until it listens.
fn start_nbdkit(env: &Env, sock: Option<&Path>) -> Result<Child> {
    let img = nbd_image();
    if systems_size(&img) != Some(env.backing_size) {
        run(Command::new("fallocate").args(["-l", &env.backing_size.to_string()]).arg(&img))?;
    }
    let mut c = Command::new("nbdkit");
    c.arg("-f");
    match sock {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            c.arg("-U").arg(p);
        }
        None => {
            c.args(["-i", "127.0.0.1", "-p", &NBD_PORT.to_string()]);
        }
    }
    c.arg("file").arg(&img);
    let log = std::fs::File::create(env.log_dir.join("nbdkit.log"))?;
    c.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    let mut child = c.spawn().context("cannot start nbdkit (install the nbdkit package)")?;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let up = match sock {
            Some(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
            None => std::net::TcpStream::connect(("127.0.0.1", NBD_PORT)).is_ok(),
        };
        if up {
            return Ok(child);
        }
        if let Some(st) = child.try_wait()? {
            bail!("nbdkit exited at start ({st}); see {}", env.log_dir.join("nbdkit.log").display());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nbdkit did not listen within {} s", START_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn systems_size(p: &Path) -> Option<u64> {
    std::fs::metadata(p).ok().map(|m| m.len())
}

/// The first /dev/nbdN that no client holds.
fn free_nbd_device() -> Result<PathBuf> {
    let _ = Command::new("modprobe").args(["nbd", "nbds_max=4"]).output();
    (0..16)
        .map(|i| (i, PathBuf::from(format!("/dev/nbd{i}"))))
        .find(|(i, p)| p.exists() && !Path::new(&format!("/sys/block/nbd{i}/pid")).exists())
        .map(|(_, p)| p)
        .ok_or_else(|| anyhow!("no free /dev/nbdN (is the nbd module there?)"))
}

/// Runs a map command that prints the device (`rbd device map`, `rbd-nbd map`) and
/// waits for the device; it is unmapped on teardown.
fn rbd_map(mut c: Command, nbd: bool, conf: String) -> Result<Running> {
    let out = run(&mut c)?;
    let dev = PathBuf::from(out.trim());
    let r = Running { dev: dev.clone(), guard: Guard::RbdUnmap { nbd, conf }, iomem: None };
    wait_for_device(&dev)?;
    Ok(r)
}

/// Starts a daemonizing peer (rublk, ublksrv) as device RUBLK_ID and waits for it.
fn start_rublk(mut c: Command, bin: PathBuf) -> Result<Running> {
    // A device left by an earlier interrupted run would make `add` fail.
    let _ = Command::new(&bin).args(["del", "-n", &RUBLK_ID.to_string()]).output();
    run(&mut c)?;
    let dev = PathBuf::from(format!("/dev/ublkb{RUBLK_ID}"));
    let r = Running { dev: dev.clone(), guard: Guard::Daemon(bin, RUBLK_ID), iomem: None };
    wait_for_device(&dev)?;
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[System]) -> Vec<&str> {
        v.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn modes_follow_help_and_features() {
        let old = EngineCaps::from_parts("--cpus --queues", vec!["AUTO_BUF_REG".into()]);
        assert!(old.buffer_modes.is_empty());
        assert_eq!(names(&default_systems(&old, false, false)), ["raw", "kloop", "engine-loop", "engine-null"]);
        let lts = EngineCaps::from_parts("--buffer-mode <MODE>", vec!["USER_COPY".into()]);
        assert_eq!(lts.buffer_modes, ["copy"]);
        let uc =
            EngineCaps::from_parts("--buffer-mode <MODE> [possible values: copy, user-copy]", vec!["USER_COPY".into()]);
        assert_eq!(uc.buffer_modes, ["copy", "user-copy"]);
        let f = parse_features(br#"{"features":["SUPPORT_ZERO_COPY","AUTO_BUF_REG"],"mask":"0x1"}"#).unwrap();
        let new = EngineCaps::from_parts("--buffer-mode <MODE>", f);
        assert_eq!(new.buffer_modes, ["copy", "zero-copy", "auto-reg"]);
        assert_eq!(
            names(&default_systems(&new, true, false)),
            [
                "raw",
                "kloop",
                "engine-loop-copy",
                "engine-loop-zero-copy",
                "engine-loop-auto-reg",
                "engine-null",
                "rublk-loop",
                "rublk-loop-autoreg",
                "rublk-null",
                "rublk-null-usercopy",
                "rublk-null-autoreg"
            ]
        );
        parse_features(b"nope").unwrap_err();
    }

    #[test]
    fn select_by_name_and_prefix() {
        let caps = EngineCaps::from_parts("--buffer-mode", vec![]);
        let all = default_systems(&caps, true, true);
        let s = select(all.clone(), &["kloop".into(), "rublk*".into()]).unwrap();
        assert_eq!(names(&s), ["kloop", "rublk-loop", "rublk-null", "rublk-null-usercopy"]);
        let s = select(all.clone(), &["ublksrv*".into()]).unwrap();
        assert_eq!(names(&s), ["ublksrv-loop", "ublksrv-null"]);
        assert_eq!(select(all.clone(), &[]).unwrap().len(), all.len());
        let e = select(all, &["nvme".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown system \"nvme\""), "{e}");
        assert!(!System::new("raw", Kind::Raw).needs_ublk());
        assert!(System::new("x", Kind::RublkNull { flag: None }).needs_ublk());
    }

    #[test]
    fn variants_follow_each_engine_system() {
        let v = parse_variant("off64=--offload 64K").unwrap();
        assert_eq!(v, ("off64".to_string(), vec!["--offload".to_string(), "64K".to_string()]));
        for bad in ["x", "=--a", "a b=--c", "n="] {
            parse_variant(bad).unwrap_err();
        }
        let caps = EngineCaps::from_parts("--buffer-mode", vec![]);
        let all = with_variants(default_systems(&caps, false, false), &[v]);
        assert_eq!(
            names(&all),
            ["raw", "kloop", "engine-loop-copy", "engine-loop-copy@off64", "engine-null", "engine-null@off64"]
        );
        assert_eq!(all[3].extra, ["--offload", "64K"]);
        assert!(all[2].extra.is_empty());
    }

    #[test]
    fn network_systems_and_their_references() {
        let n = network_systems();
        assert_eq!(
            names(&n),
            [
                "knbd-tcp",
                "engine-nbd-tcp",
                "knbd-unix",
                "engine-nbd-unix",
                "krbd",
                "rbd-nbd",
                "engine-rbd",
                "rbd-nbd-lean",
                "engine-rbd-lean"
            ]
        );
        assert!(n.iter().all(System::is_network));
        assert!(!n[0].needs_ublk() && n[1].needs_ublk());
        for (sys, want) in [
            ("engine-nbd-tcp", "knbd-tcp"),
            ("knbd-unix", "knbd-unix"),
            ("engine-nbd-unix@x", "knbd-unix"),
            ("krbd", "rbd-nbd"),
            ("engine-rbd", "rbd-nbd"),
            ("engine-loop-copy", "kloop"),
            ("rublk-null", "kloop"),
        ] {
            assert_eq!(reference_of(sys), want, "{sys}");
        }
    }

    #[test]
    fn size_of_a_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(12345).unwrap();
        assert_eq!(size_of(f.path()).unwrap(), 12345);
        size_of(Path::new("/no/such/x")).unwrap_err();
    }
}
