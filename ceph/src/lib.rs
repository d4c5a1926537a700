//! A small binding to Ceph's C client libraries, librados and librbd (16.2 or newer),
//! for ubd-engine's `rbd` target: connect to a cluster, open an image, and run
//! asynchronous IO whose completions are signalled on an eventfd and collected on the
//! caller's thread ([`AioQueue`]).
//!
//! Why a binding of our own: the crates on crates.io are unmaintained (`ceph-rbd` 0.3.2
//! from 2019, `librbd-sys` 0.1 from 2016) or cover librados only (`ceph`). The libraries
//! are loaded at run time (`libloading`), so building needs no Ceph, and a machine
//! without it gets a one-line error naming the package to install.
//!
//! All the `unsafe` of the rbd target is here. The API is safe: data buffers of IO in
//! flight belong to the [`AioQueue`] (never to the caller) until librbd has finished
//! with them, so a request the caller gave up on (a timeout) cannot have librbd write
//! into memory that was reused.

mod ffi;

use std::ffi::{CString, c_char, c_int, c_void};
use std::fmt;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use ffi::{Api, CompT, ImageT, IoctxT, RadosT};

/// A failed librados/librbd call: what was done, and the errno it returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub what: String,
    /// Positive errno (0 for errors that have none, such as a missing library).
    pub errno: i32,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.errno == 0 {
            return f.write_str(&self.what);
        }
        let e = std::io::Error::from_raw_os_error(self.errno);
        // "No such file or directory (os error 2)" -> without the suffix.
        let text = e.to_string();
        let text = text.split(" (os error").next().unwrap_or(&text);
        write!(f, "{}: {text}", self.what)
    }
}

impl std::error::Error for Error {}

type Result<T> = std::result::Result<T, Error>;

fn check(r: c_int, what: impl FnOnce() -> String) -> Result<c_int> {
    if r < 0 { Err(Error { what: what(), errno: -r }) } else { Ok(r) }
}

fn cstr(s: &str, what: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error { what: format!("{what} {s:?} contains a NUL byte"), errno: libc::EINVAL })
}

fn api() -> Result<&'static Api> {
    ffi::api().map_err(|what| Error { what, errno: 0 })
}

/// librbd's version, e.g. (1, 16, 0) for Ceph 16.2. Loads the libraries.
pub fn rbd_version() -> Result<(i32, i32, i32)> {
    let api = api()?;
    let (mut a, mut b, mut c) = (0, 0, 0);
    // SAFETY: rbd_version writes three ints through the pointers, which point to locals.
    unsafe { (api.rbd_version)(&mut a, &mut b, &mut c) };
    Ok((a, b, c))
}

/// How to reach a cluster: what `rados_create2` and the configuration are given.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// The configuration file; `None`: `/etc/ceph/CLUSTER.conf`.
    pub conf: Option<PathBuf>,
    /// The client's id (`admin` for `client.admin`); `None`: `admin`.
    pub id: Option<String>,
    /// A keyring; `None`: what the configuration says.
    pub keyring: Option<PathBuf>,
    /// The cluster's name; `None`: `ceph`.
    pub cluster: Option<String>,
    /// How long connecting (reaching a monitor, authenticating) may take
    /// (`client_mount_timeout`).
    pub connect_timeout: Duration,
    /// More configuration, set after the file is read (`name`, `value`).
    pub extra: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            conf: None,
            id: None,
            keyring: None,
            cluster: None,
            connect_timeout: Duration::from_secs(10),
            extra: Vec::new(),
        }
    }
}

impl ClusterOptions {
    /// The configuration file used.
    pub fn conf_path(&self) -> PathBuf {
        self.conf
            .clone()
            .unwrap_or_else(|| format!("/etc/ceph/{}.conf", self.cluster.as_deref().unwrap_or("ceph")).into())
    }
}

/// A connected cluster handle (`rados_t`).
pub struct Rados {
    api: &'static Api,
    h: RadosT,
}

impl fmt::Debug for Rados {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rados").finish_non_exhaustive()
    }
}

// SAFETY: librados cluster handles are thread-safe once connected (the library locks
// internally; its own messenger threads use the handle); the binding only connects and
// shuts down through `&mut`/ownership.
unsafe impl Send for Rados {}
// SAFETY: as above: the calls made through `&Rados` (ioctx creation, monitor
// commands) may run concurrently from several threads.
unsafe impl Sync for Rados {}

impl Rados {
    /// Creates a handle, reads the configuration, and connects.
    pub fn connect(o: &ClusterOptions) -> Result<Arc<Self>> {
        let api = api()?;
        let conf = o.conf_path();
        if !conf.exists() {
            return Err(Error { what: format!("Ceph configuration {}", conf.display()), errno: libc::ENOENT });
        }
        if let Some(k) = &o.keyring
            && let Err(e) = std::fs::metadata(k)
        {
            return Err(Error { what: format!("keyring {}", k.display()), errno: e.raw_os_error().unwrap_or(0) });
        }
        let cluster = cstr(o.cluster.as_deref().unwrap_or("ceph"), "cluster name")?;
        let name = cstr(&format!("client.{}", o.id.as_deref().unwrap_or("admin")), "client id")?;
        let mut h: RadosT = ptr::null_mut();
        // SAFETY: rados_create2 writes a new handle through `h` (a local); the names are
        // NUL-terminated strings that librados copies; flags 0.
        let r = unsafe { (api.rados_create2)(&mut h, cluster.as_ptr(), name.as_ptr(), 0) };
        check(r, || "rados_create2".into())?;
        // Owned from here: dropped (rados_shutdown) on every error below.
        let me = Self { api, h };
        let path = cstr(&conf.to_string_lossy(), "configuration path")?;
        // SAFETY: the handle is live and not connected; the path is NUL-terminated.
        let r = unsafe { (api.rados_conf_read_file)(me.h, path.as_ptr()) };
        check(r, || format!("reading the Ceph configuration {}", conf.display()))?;
        let mut set = vec![
            // The error is ours to report, in one line; librados would also print its
            // own complaints (and its monitor hunting) on stderr.
            ("log_to_stderr".to_string(), "false".to_string()),
            ("err_to_stderr".to_string(), "false".to_string()),
            ("client_mount_timeout".to_string(), o.connect_timeout.as_secs().max(1).to_string()),
        ];
        if let Some(k) = &o.keyring {
            set.push(("keyring".into(), k.to_string_lossy().into_owned()));
        }
        set.extend(o.extra.iter().cloned());
        for (k, v) in &set {
            me.conf_set(k, v)?;
        }
        // SAFETY: the handle is live, configured and not yet connected.
        let r = unsafe { (api.rados_connect)(me.h) };
        let mon = |errno: i32| match errno {
            libc::ETIMEDOUT => " (no monitor answered: is the cluster up, and `mon host` right?)",
            libc::EACCES | libc::EPERM => " (authentication: check --id and --keyring)",
            _ => "",
        };
        if r < 0 {
            return Err(Error {
                what: format!("connecting to the Ceph cluster of {}{}", conf.display(), mon(-r)),
                errno: -r,
            });
        }
        Ok(Arc::new(me))
    }

    fn conf_set(&self, k: &str, v: &str) -> Result<()> {
        let (ck, cv) = (cstr(k, "option")?, cstr(v, "value")?);
        // SAFETY: the handle is live and not connected; both strings are NUL-terminated
        // and copied by librados.
        let r = unsafe { (self.api.rados_conf_set)(self.h, ck.as_ptr(), cv.as_ptr()) };
        if r == -libc::ENOENT {
            return Err(Error { what: format!("Ceph option {k}: no such option"), errno: 0 });
        }
        check(r, || format!("Ceph option {k} = {v}")).map(drop)
    }

    /// Sends one monitor command (JSON, e.g. `{"prefix": "osd new", "uuid": "..."}`)
    /// and returns its output; an error carries the monitor's status text.
    pub fn mon_command(&self, json: &str) -> Result<String> {
        let cmd = cstr(json, "command")?;
        let mut cmds = [cmd.as_ptr()];
        let (mut out, mut out_len, mut st, mut st_len) = (ptr::null_mut(), 0usize, ptr::null_mut(), 0usize);
        // SAFETY: the handle is connected; `cmds` holds one NUL-terminated string for
        // the call's duration; no input buffer (null, 0); librados allocates the output
        // and status buffers and writes their pointers and lengths into the locals.
        let r = unsafe {
            (self.api.rados_mon_command)(
                self.h,
                cmds.as_mut_ptr(),
                1,
                ptr::null(),
                0,
                &mut out,
                &mut out_len,
                &mut st,
                &mut st_len,
            )
        };
        let take = |p: *mut c_char, len: usize| -> String {
            if p.is_null() {
                return String::new();
            }
            // SAFETY: librados returned `p` as a buffer of `len` bytes, live until freed.
            let s = String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }).into_owned();
            // SAFETY: `p` came from rados_mon_command and is freed once, here.
            unsafe { (self.api.rados_buffer_free)(p) };
            s
        };
        let (out, st) = (take(out, out_len), take(st, st_len));
        check(r, || format!("monitor command {json}: {}", st.trim()))?;
        Ok(out)
    }
}

impl Drop for Rados {
    fn drop(&mut self) {
        // SAFETY: the handle is live and owned; every pool (ioctx) holds an Arc of it,
        // so none is left.
        unsafe { (self.api.rados_shutdown)(self.h) };
    }
}

/// An IO context on one pool (`rados_ioctx_t`).
pub struct Pool {
    rados: Arc<Rados>,
    io: IoctxT,
    name: String,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool").field("name", &self.name).finish_non_exhaustive()
    }
}

// SAFETY: an ioctx may be used from any thread (librados locks internally); it is only
// destroyed on drop, once no image (each holds an Arc of the pool) uses it.
unsafe impl Send for Pool {}
// SAFETY: as above; images opened concurrently on one ioctx is what librbd's own tools do.
unsafe impl Sync for Pool {}

impl Pool {
    /// Opens pool `name`.
    pub fn open(rados: &Arc<Rados>, name: &str) -> Result<Arc<Self>> {
        let c = cstr(name, "pool name")?;
        let mut io: IoctxT = ptr::null_mut();
        // SAFETY: the cluster handle is connected; `c` is NUL-terminated; librados writes
        // the new ioctx through `io` (a local).
        let r = unsafe { (rados.api.rados_ioctx_create)(rados.h, c.as_ptr(), &mut io) };
        check(r, || format!("pool {name}"))?;
        Ok(Arc::new(Self { rados: rados.clone(), io, name: name.into() }))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        // SAFETY: the ioctx is live and owned; no image uses it any more (each holds an
        // Arc of the pool).
        unsafe { (self.rados.api.rados_ioctx_destroy)(self.io) };
    }
}

/// What `rbd_stat` says of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStat {
    pub size: u64,
    pub object_size: u64,
    pub order: i32,
}

/// An open image (`rbd_image_t`).
pub struct Image {
    pool: Arc<Pool>,
    h: ImageT,
    name: String,
    read_only: bool,
    /// The eventfd librbd signals (a duplicate of the caller's), kept open while the
    /// image is.
    events: Option<OwnedFd>,
}

impl fmt::Debug for Image {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Image").field("name", &self.name).field("read_only", &self.read_only).finish_non_exhaustive()
    }
}

// SAFETY: an rbd image handle may be used from any thread (librbd serialises inside);
// the binding moves it to the queue thread that serves it, which alone uses it after.
unsafe impl Send for Image {}

impl Image {
    /// Opens image `name` of `pool`, at snapshot `snap` if given (read-only then), or
    /// read-only if asked.
    pub fn open(pool: &Arc<Pool>, name: &str, snap: Option<&str>, read_only: bool) -> Result<Self> {
        let api = pool.rados.api;
        let read_only = read_only || snap.is_some();
        let cname = cstr(name, "image name")?;
        let csnap = snap.map(|s| cstr(s, "snapshot name")).transpose()?;
        let snap_ptr = csnap.as_ref().map_or(ptr::null(), |s| s.as_ptr());
        let open = if read_only { api.rbd_open_read_only } else { api.rbd_open };
        let mut h: ImageT = ptr::null_mut();
        // SAFETY: the ioctx is live (the pool Arc is kept by the image); the names are
        // NUL-terminated (the snapshot's may be null: the head); librbd writes the image
        // handle through `h` (a local).
        let r = unsafe { open(pool.io, cname.as_ptr(), &mut h, snap_ptr) };
        let full = match snap {
            Some(s) => format!("{}/{name}@{s}", pool.name),
            None => format!("{}/{name}", pool.name),
        };
        check(r, || format!("image {full}"))?;
        Ok(Self { pool: pool.clone(), h, name: full, read_only, events: None })
    }

    /// `pool/image[@snap]`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn stat(&self) -> Result<ImageStat> {
        // SAFETY: ImageInfo is plain old data (integers and char arrays): all zeroes is valid.
        let mut info: ffi::ImageInfo = unsafe { std::mem::zeroed() };
        // SAFETY: the image is open; librbd fills at most `size_of::<ImageInfo>()` bytes
        // of `info`, a local of the layout of rbd_image_info_t (asserted in ffi).
        let r = unsafe { (self.pool.rados.api.rbd_stat)(self.h, &mut info, std::mem::size_of::<ffi::ImageInfo>()) };
        check(r, || format!("rbd_stat {}", self.name))?;
        Ok(ImageStat { size: info.size, object_size: info.obj_size, order: info.order })
    }

    /// The image's feature bits (`RBD_FEATURE_*`).
    pub fn features(&self) -> Result<u64> {
        let mut f = 0u64;
        // SAFETY: the image is open; librbd writes one u64 through the pointer (a local).
        let r = unsafe { (self.pool.rados.api.rbd_get_features)(self.h, &mut f) };
        check(r, || format!("rbd_get_features {}", self.name))?;
        Ok(f)
    }

    /// Has librbd write to eventfd `fd` whenever an IO of this image completes, and keep
    /// the completion for [`AioQueue::poll`]. The image keeps a duplicate of `fd`.
    fn notify(&mut self, fd: BorrowedFd<'_>) -> Result<()> {
        let fd = fd.try_clone_to_owned().map_err(|e| Error {
            what: "duplicating the completion eventfd".into(),
            errno: e.raw_os_error().unwrap_or(0),
        })?;
        // SAFETY: the image is open; `fd` is an eventfd that stays open as long as the
        // image (it is stored in it, and closed after rbd_close in drop).
        let r = unsafe {
            (self.pool.rados.api.rbd_set_image_notification)(self.h, fd.as_raw_fd(), ffi::EVENT_TYPE_EVENTFD)
        };
        check(r, || format!("rbd_set_image_notification {}", self.name))?;
        self.events = Some(fd);
        Ok(())
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: the handle is live and owned; IO of it that an AioQueue started has
        // completed (the queue waits in its own drop, which runs first: it owns the image).
        let r = unsafe { (self.pool.rados.api.rbd_close)(self.h) };
        if r < 0 {
            eprintln!("rbd_close {}: errno {}", self.name, -r);
        }
        // `events` closes after the image, when the fields drop.
    }
}

/// An asynchronous operation on an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reads `len` bytes at `off` into the queue's buffer for it.
    Read {
        off: u64,
        len: usize,
    },
    /// Writes `len` bytes at `off`, from the buffer the submit's `fill` wrote.
    Write {
        off: u64,
        len: usize,
    },
    Flush,
    Discard {
        off: u64,
        len: u64,
    },
    WriteZeroes {
        off: u64,
        len: u64,
    },
}

struct Slot {
    /// The completion while the op is in flight, else null.
    comp: CompT,
    /// Data of a read or write; librbd may use it while `comp` is in flight.
    buf: Vec<u8>,
    len: usize,
    user: u64,
}

/// One finished operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    /// What the submit was given.
    pub user: u64,
    /// librbd's return value: bytes for a read, 0 for the others, or `-errno`.
    pub res: i64,
    slot: u32,
}

/// Asynchronous IO of one image from one thread: ops start with [`submit`](Self::submit),
/// librbd signals their completion on the eventfd given at [`new`](Self::new) (no
/// callback runs on librbd's threads), and [`poll`](Self::poll) collects them on this
/// thread, several per call, with no lock or system call of the binding's per op.
pub struct AioQueue {
    image: Image,
    slots: Vec<Slot>,
    free: Vec<u32>,
    polled: Vec<CompT>,
    ready: std::collections::VecDeque<Done>,
    in_flight: usize,
}

impl fmt::Debug for AioQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AioQueue").field("image", &self.image).field("in_flight", &self.in_flight).finish()
    }
}

impl AioQueue {
    /// Serves `image`, its completions signalled on `events` (an eventfd).
    pub fn new(mut image: Image, events: BorrowedFd<'_>) -> Result<Self> {
        image.notify(events)?;
        Ok(Self {
            image,
            slots: Vec::new(),
            free: Vec::new(),
            polled: vec![ptr::null_mut(); 64],
            ready: std::collections::VecDeque::with_capacity(64),
            in_flight: 0,
        })
    }

    pub fn image(&self) -> &Image {
        &self.image
    }

    /// Ops started and not yet returned by [`poll`](Self::poll).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Starts `op`; `user` comes back in its [`Done`]. For a write, `fill` writes the
    /// data into the op's buffer first (an error from it is returned, nothing started).
    /// An error is `-errno`.
    pub fn submit(
        &mut self,
        op: Op,
        user: u64,
        fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), i32>,
    ) -> std::result::Result<(), i32> {
        if self.image.read_only && !matches!(op, Op::Read { .. } | Op::Flush) {
            return Err(-libc::EROFS);
        }
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                let i = u32::try_from(self.slots.len()).map_err(|_| -libc::ENOMEM)?;
                self.slots.push(Slot { comp: ptr::null_mut(), buf: Vec::new(), len: 0, user: 0 });
                i
            }
        };
        let r = self.start(idx, op, user, fill);
        match r {
            Ok(()) => self.in_flight += 1,
            Err(_) => self.free.push(idx),
        }
        r
    }

    fn start(
        &mut self,
        idx: u32,
        op: Op,
        user: u64,
        fill: impl FnOnce(&mut [u8]) -> std::result::Result<(), i32>,
    ) -> std::result::Result<(), i32> {
        let api = self.image.pool.rados.api;
        let h = self.image.h;
        let slot = &mut self.slots[idx as usize];
        let len = match op {
            Op::Read { len, .. } | Op::Write { len, .. } => len,
            _ => 0,
        };
        if slot.buf.len() < len {
            slot.buf.resize(len, 0);
        }
        if let Op::Write { .. } = op {
            fill(&mut slot.buf[..len])?;
        }
        let mut comp: CompT = ptr::null_mut();
        // SAFETY: no callback (librbd then only signals the image's eventfd); the
        // argument is the slot index, carried as a pointer-sized integer and never
        // dereferenced; librbd writes the new completion through `comp` (a local).
        let r = unsafe { (api.rbd_aio_create_completion)(idx as usize as *mut c_void, None, &mut comp) };
        if r < 0 {
            return Err(r);
        }
        let buf = slot.buf.as_mut_ptr();
        // SAFETY (for each call): the image is open; `comp` is a fresh completion, handed
        // to librbd; a read's or write's buffer is `len` bytes of the slot's heap buffer,
        // which is neither resized nor freed while the completion is in flight (the slot
        // is not reused before poll returns it, and drop waits for it); librbd writes a
        // read's data into it until it completes.
        let r = match op {
            // SAFETY: see above.
            Op::Read { off, len } => unsafe { (api.rbd_aio_read)(h, off, len, buf.cast::<c_char>(), comp) },
            // SAFETY: see above.
            Op::Write { off, len } => unsafe {
                (api.rbd_aio_write)(h, off, len, buf.cast_const().cast::<c_char>(), comp)
            },
            // SAFETY: see above (no buffer).
            Op::Flush => unsafe { (api.rbd_aio_flush)(h, comp) },
            // SAFETY: see above (no buffer).
            Op::Discard { off, len } => unsafe { (api.rbd_aio_discard)(h, off, len, comp) },
            Op::WriteZeroes { off, len } => {
                let len = usize::try_from(len).map_err(|_| -libc::EINVAL)?;
                // SAFETY: see above (no buffer; zero_flags and op_flags 0).
                unsafe { (api.rbd_aio_write_zeroes)(h, off, len, comp, 0, 0) }
            }
        };
        if r < 0 {
            // Not started: librbd did not take the completion.
            // SAFETY: `comp` is ours and was not handed over (the call failed).
            unsafe { (api.rbd_aio_release)(comp) };
            return Err(r);
        }
        let slot = &mut self.slots[idx as usize];
        slot.comp = comp;
        slot.len = len;
        slot.user = user;
        Ok(())
    }

    /// Collects the ops librbd finished since the last call; returns how many are ready
    /// for [`next`](Self::next). Call it when the eventfd was signalled.
    pub fn poll(&mut self) -> usize {
        let api = self.image.pool.rados.api;
        loop {
            let n_max = c_int::try_from(self.polled.len()).unwrap_or(c_int::MAX);
            // SAFETY: the image is open; librbd writes at most `n_max` completion pointers
            // into `polled`, which has room for that many.
            let n = unsafe { (api.rbd_poll_io_events)(self.image.h, self.polled.as_mut_ptr(), n_max) };
            let n = usize::try_from(n).unwrap_or(0);
            for i in 0..n {
                let comp = self.polled[i];
                // SAFETY: `comp` is a completion librbd returned as finished, not yet released.
                let idx = unsafe { (api.rbd_aio_get_arg)(comp) } as usize;
                // SAFETY: as above.
                let res = unsafe { (api.rbd_aio_get_return_value)(comp) } as i64;
                // SAFETY: as above; released once, here (the slot forgets it below).
                unsafe { (api.rbd_aio_release)(comp) };
                let Some(slot) = self.slots.get_mut(idx).filter(|s| s.comp == comp) else {
                    // Not one of ours: nothing to hand back.
                    continue;
                };
                slot.comp = ptr::null_mut();
                self.in_flight -= 1;
                self.ready.push_back(Done { user: slot.user, res, slot: idx as u32 });
            }
            if n < self.polled.len() {
                break;
            }
        }
        self.ready.len()
    }

    /// The next finished op, with a read's data (empty for other ops and for failed
    /// reads); the op's buffer is reused after `f` returns.
    pub fn next<R>(&mut self, f: impl FnOnce(Done, &[u8]) -> R) -> Option<R> {
        let d = self.ready.pop_front()?;
        let slot = &self.slots[d.slot as usize];
        let data = if d.res > 0 { &slot.buf[..slot.len.min(d.res as usize)] } else { &[][..] };
        let r = f(d, data);
        self.free.push(d.slot);
        Some(r)
    }
}

impl Drop for AioQueue {
    fn drop(&mut self) {
        // librbd still uses the buffers of ops in flight: wait for them (an OSD that
        // does not answer makes this wait), then take their completions back.
        let api = self.image.pool.rados.api;
        while self.in_flight > 0 {
            self.poll();
            if self.in_flight == 0 {
                break;
            }
            if let Some(s) = self.slots.iter().find(|s| !s.comp.is_null()) {
                // SAFETY: `s.comp` is in flight and not released (poll releases it only
                // after librbd returns it); waiting on it is allowed from any thread.
                unsafe { (api.rbd_aio_wait_for_complete)(s.comp) };
            }
            // The completion reaches the event queue just after it completes.
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Splits `POOL/IMAGE[@SNAP]` (rbd's own spelling; a pool is needed).
pub fn parse_image_spec(s: &str) -> std::result::Result<(String, String, Option<String>), String> {
    let (pool, rest) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected POOL/IMAGE[@SNAP]"))?;
    let (image, snap) = match rest.split_once('@') {
        Some((i, sn)) => (i, Some(sn)),
        None => (rest, None),
    };
    if pool.is_empty() || image.is_empty() || snap.is_some_and(str::is_empty) || image.contains('/') {
        return Err(format!("{s:?}: expected POOL/IMAGE[@SNAP]"));
    }
    if s.contains('\0') {
        return Err(format!("{s:?}: contains a NUL byte"));
    }
    Ok((pool.into(), image.into(), snap.map(Into::into)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_specs() {
        assert_eq!(parse_image_spec("rbd/img").unwrap(), ("rbd".into(), "img".into(), None));
        assert_eq!(parse_image_spec("p/i@s1").unwrap(), ("p".into(), "i".into(), Some("s1".into())));
        for bad in ["img", "/img", "rbd/", "rbd/img@", "a/b/c", "rbd/i\0"] {
            assert!(parse_image_spec(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn errors_read_as_one_line() {
        let e = Error { what: "image rbd/x".into(), errno: libc::ENOENT };
        assert_eq!(e.to_string(), "image rbd/x: No such file or directory");
        let e = Error { what: "cannot load librbd.so.1".into(), errno: 0 };
        assert_eq!(e.to_string(), "cannot load librbd.so.1");
    }

    #[test]
    fn conf_path_follows_the_cluster_name() {
        let o = ClusterOptions { cluster: Some("backup".into()), ..Default::default() };
        assert_eq!(o.conf_path(), PathBuf::from("/etc/ceph/backup.conf"));
        assert_eq!(ClusterOptions::default().conf_path(), PathBuf::from("/etc/ceph/ceph.conf"));
    }

    #[test]
    fn a_missing_configuration_is_named() {
        let o = ClusterOptions { conf: Some("/nonexistent/ceph.conf".into()), ..Default::default() };
        match Rados::connect(&o) {
            Err(e) => {
                assert!(e.to_string().contains("/nonexistent/ceph.conf") || e.to_string().contains("librbd1"), "{e}")
            }
            Ok(_) => panic!("connected without a configuration"),
        }
    }
}
