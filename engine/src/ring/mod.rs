//! A queue's io_uring and the memory its SQEs point into: the only place SQEs are
//! pushed. Setup, submission and reaping live here, with the per-tag protocol's two
//! commands; the batch protocol is in [`batch`], the SQEs a target pushes in [`io`],
//! the `user_data` encoding in [`tag`].

mod batch;
pub(crate) mod io;
pub(crate) mod tag;

use std::io as stdio;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};

use crate::buf::BufferMode;
use crate::sys::mmap::{PageKind, Region};
use crate::sys::shmem::ShmemBuf;
use crate::sys::uapi::{self, IoCmd};
use crate::sys::uring;
use batch::Batch;
pub(crate) use batch::{BatchRing, CommitOutcome};
pub(crate) use tag::Kind;

/// How a queue's ring was set up (reported at startup; `--ring` picks one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "kebab-case")]
pub enum RingMode {
    /// IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN.
    #[cfg_attr(feature = "clap", value(name = "defer", help = "SINGLE_ISSUER | DEFER_TASKRUN"))]
    DeferTaskrun,
    /// IORING_SETUP_COOP_TASKRUN.
    #[cfg_attr(feature = "clap", value(name = "coop", help = "COOP_TASKRUN"))]
    CoopTaskrun,
    // No task-run flags (no doc comment: it would become --help text).
    Plain,
}

/// As serialized: `defer-taskrun`, `coop-taskrun`, `plain`.
impl std::fmt::Display for RingMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RingMode::DeferTaskrun => "defer-taskrun",
            RingMode::CoopTaskrun => "coop-taskrun",
            RingMode::Plain => "plain",
        })
    }
}

/// A completion, decoded from its `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Cqe {
    pub(crate) kind: Kind,
    pub(crate) tag: u16,
    pub(crate) cookie: u16,
    pub(crate) res: i32,
    pub(crate) flags: u32,
}

/// Owns the ring and the buffers its SQEs point into.
///
/// Field order matters: `ring` is declared (and so dropped) before `bufs`, and the
/// reactor never lets go of the ring while a target SQE is in flight (it leaks the
/// buffers instead, [`QueueRing::abandon_buffers`]), so no SQE outlives the memory it names.
pub(crate) struct QueueRing {
    ring: IoUring,
    /// Per-tag buffers (copy mode only).
    bufs: Option<Region>,
    wake_fd: OwnedFd,
    /// Where the wake-up read lands. Leaked on purpose: a read may still be armed when
    /// the ring is closed, and the ring's teardown in the kernel is asynchronous.
    wake_buf: &'static mut u64,
    /// Per-tag timeout values for timers (read by the kernel at submission).
    timeouts: Vec<types::Timespec>,
    q_id: u16,
    depth: u16,
    buf_size: u32,
    mode: BufferMode,
    /// Copy mode: the per-tag buffers are registered as fixed buffers.
    fixed_bufs: bool,
    /// Zero-copy mode: the request's pages of each tag are in the buffer table.
    registered: Vec<bool>,
    ring_mode: RingMode,
    /// Buffer (un)registration commands in flight (their CQEs are handled here).
    aux_inflight: u32,
    /// UBLK_F_BATCH_IO: fetched-tag buffers and commit element arrays.
    batch: Option<Batch>,
    /// Target IO of at least this many bytes gets IOSQE_ASYNC (u32::MAX: none).
    offload_min: u32,
    /// Memory the target owns (`QueueSetup::alloc`), by `MemId`.
    owned: Vec<io::OwnedMem>,
    /// Registered files, the char device (slot 0) included.
    nr_files: u32,
    /// The next target SQE gets IOSQE_IO_LINK.
    link_pending: bool,
    /// The target's waker: its eventfd and where its read lands (leaked, as `wake_buf`).
    target_wake: Option<(OwnedFd, &'static mut u64)>,
    /// The ring's index among this thread's registered ring fds (None: not registered,
    /// `io_uring_enter` takes the fd).
    ring_index: Option<u32>,
    /// Shared memory registered with the device (UBLK_F_SHMEM_ZC), and the buffer-table
    /// slot of its first [`SHMEM_CHUNK`] (None: not in the table, plain reads and writes).
    shmem: Option<Arc<ShmemBuf>>,
    shmem_slot: Option<u16>,
    /// Per tag: where its request's data starts in the shared memory (None: the request
    /// is served the device's buffer mode's way).
    shared_at: Vec<Option<u32>>,
}

/// io_uring takes fixed buffers of at most 1 GiB: shared memory goes in the buffer
/// table in pieces of this size (an IO across two of them is a plain read or write).
const SHMEM_CHUNK: u64 = 1 << 30;

impl std::fmt::Debug for QueueRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueRing").field("q_id", &self.q_id).field("mode", &self.mode).finish()
    }
}

impl Drop for QueueRing {
    fn drop(&mut self) {
        // The registration holds a reference on the ring: let go of it, so that the ring
        // is closed when its field is dropped (below), before the buffers.
        if let Some(index) = self.ring_index.take()
            && let Err(e) = uring::unregister_ring_fd(&self.ring, index)
        {
            tracing::warn!(q_id = self.q_id, "unregistering the ring fd: {e}");
        }
        // The ring's teardown is asynchronous: commit arrays and fetch buffers the kernel
        // may still read or write are never freed.
        if let Some(b) = self.batch.take() {
            b.leak();
        }
    }
}

/// Builds the ring with `want`, or by default with COOP_TASKRUN (plain where the kernel
/// lacks it; the setup obtained is reported).
///
/// Why not DEFER_TASKRUN by default: a queue thread that slept in `io_uring_enter` is
/// woken by the first task-work item (a request delivered, a target IO done), and the
/// kernel then runs only as many deferred items as it waited for (one) before returning,
/// so the pass after every sleep handles one CQE and the rest waits for another enter.
/// COOP_TASKRUN runs everything pending on wake-up. Measured side by side (3 rounds,
/// QEMU TCG, 2 queues x 64), coop against defer: 7.2 auto-reg 4k randread/randwrite
/// qd64 x2 +10%/+13%, 16k mixed +5%, qd1 and 128k -2% (noise); 6.12 copy +4%/-3%, +7%,
/// +1%, -3%. `--ring defer` keeps the other setup for tuning studies.
fn build_ring(entries: u32, want: Option<RingMode>) -> stdio::Result<(IoUring, RingMode)> {
    let cq = entries * 2;
    let try_mode = |mode: RingMode| {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        match mode {
            RingMode::DeferTaskrun => _ = b.setup_single_issuer().setup_defer_taskrun(),
            RingMode::CoopTaskrun => _ = b.setup_coop_taskrun(),
            RingMode::Plain => {}
        }
        b.build(entries)
    };
    if let Some(mode) = want {
        return try_mode(mode).map(|r| (r, mode));
    }
    match try_mode(RingMode::CoopTaskrun) {
        Ok(r) => Ok((r, RingMode::CoopTaskrun)),
        Err(_) => Ok((try_mode(RingMode::Plain)?, RingMode::Plain)),
    }
}

/// How to set up a queue's ring and where its request data lives.
#[derive(Debug)]
pub(crate) struct RingSetup {
    /// Ring flags to use (None: the default, COOP_TASKRUN).
    pub(crate) ring: Option<RingMode>,
    pub(crate) mode: BufferMode,
    /// Copy mode: the per-tag buffer memory (depth * buf_size bytes); None otherwise.
    pub(crate) region: Option<Region>,
    /// UBLK_F_BATCH_IO: PREP/FETCH/COMMIT_IO_CMDS instead of per-tag commands.
    pub(crate) batch: bool,
    /// Target reads/writes of at least this many bytes get IOSQE_ASYNC.
    pub(crate) offload_min: Option<u32>,
    /// Sizes of the memory the target asked for (`QueueSetup::alloc`).
    pub(crate) owned: Vec<u32>,
    /// The target's waker eventfd (`QueueSetup::waker`), read by the ring.
    pub(crate) target_wake: Option<OwnedFd>,
    /// Shared memory registered with the device (UBLK_F_SHMEM_ZC).
    pub(crate) shmem: Option<Arc<ShmemBuf>>,
}

/// The shared memory stays out of the buffer table (a memlock limit, say): its IO then
/// uses plain reads and writes.
fn warn_shmem_not_fixed(q_id: u16, e: &stdio::Error) {
    tracing::warn!(
        q_id,
        "registering the shared memory as fixed buffers failed ({e}); its IO uses plain reads and writes"
    );
}

/// `-errno` of an io::Error (EIO when it has none).
pub(crate) fn errno_of(e: &stdio::Error) -> i32 {
    -e.raw_os_error().unwrap_or(libc::EIO)
}

impl QueueRing {
    /// Builds the ring for one queue: registers `/dev/ublkcN` (slot 0) and the target's
    /// files, and the buffer table: the per-tag buffers in copy mode (falling back to
    /// plain reads/writes if that fails, with a warning), an empty table of `depth`
    /// slots that the request pages are registered into in the zero-copy modes, and
    /// nothing in `none` (USER_COPY: target reads and writes are refused).
    pub(crate) fn new(
        q_id: u16,
        depth: u16,
        buf_size: u32,
        setup: RingSetup,
        wake_fd: OwnedFd,
        cdev: RawFd,
        files: &[RawFd],
    ) -> stdio::Result<Self> {
        let entries = (u32::from(depth) * 2).next_power_of_two().max(8);
        let (ring, ring_mode) = build_ring(entries, setup.ring)?;
        let mut all = vec![cdev];
        all.extend_from_slice(files);
        ring.submitter().register_files(&all)?;
        if setup.mode.needs_buffers() == setup.region.is_none() {
            return Err(stdio::Error::new(
                stdio::ErrorKind::InvalidInput,
                "copy mode needs a buffer region, and only it",
            ));
        }
        let mut fixed_bufs = false;
        // Shared memory in the table after the tags' slots (not read-only memory: the
        // table pins pages for writing).
        let chunks: Vec<libc::iovec> = match &setup.shmem {
            Some(sh) if !sh.map.read_only() && setup.mode.moves_data() => (0..sh.map.size().div_ceil(SHMEM_CHUNK))
                .map(|i| libc::iovec {
                    iov_base: sh.map.as_ptr().wrapping_add((i * SHMEM_CHUNK) as usize).cast(),
                    iov_len: (sh.map.size() - i * SHMEM_CHUNK).min(SHMEM_CHUNK) as usize,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut shmem_slot = None;
        match &setup.region {
            // `none` (USER_COPY): the target moves no data, so no buffer table either.
            None if !setup.mode.moves_data() => {}
            None => {
                ring.submitter().register_buffers_sparse(u32::from(depth) + chunks.len() as u32)?;
                if !chunks.is_empty() {
                    // SAFETY: the iovecs name the shared mapping, which `setup.shmem` (kept
                    // in this struct, dropped after the ring) holds mapped; the kernel pins it.
                    match unsafe { ring.submitter().register_buffers_update(u32::from(depth), &chunks, None) } {
                        Ok(()) => shmem_slot = Some(depth),
                        Err(e) => warn_shmem_not_fixed(q_id, &e),
                    }
                }
            }
            Some(region) => {
                if region.len() < usize::from(depth) * buf_size as usize {
                    return Err(stdio::Error::new(stdio::ErrorKind::InvalidInput, "buffer region too small"));
                }
                let iovecs: Vec<libc::iovec> = (0..depth)
                    .map(|t| libc::iovec {
                        // SAFETY: t < depth and the region holds depth * buf_size bytes (checked).
                        iov_base: unsafe { region.as_ptr().add(usize::from(t) * buf_size as usize) }.cast(),
                        iov_len: buf_size as usize,
                    })
                    .collect();
                let mut all = iovecs.clone();
                all.extend_from_slice(&chunks);
                // The iovecs name `setup.region` and `setup.shmem`, kept by this struct past
                // the ring (field order; leaked with IO in flight); the kernel pins them.
                // SAFETY: as just said.
                let mut with_shmem = unsafe { ring.submitter().register_buffers(&all) }.map(|()| !chunks.is_empty());
                if let Err(e) = &with_shmem
                    && !chunks.is_empty()
                {
                    warn_shmem_not_fixed(q_id, e);
                    // SAFETY: as above, the per-tag buffers alone.
                    with_shmem = unsafe { ring.submitter().register_buffers(&iovecs) }.map(|()| false);
                }
                match with_shmem {
                    Ok(shmem) => {
                        fixed_bufs = true;
                        shmem_slot = shmem.then_some(depth);
                    }
                    Err(e) => tracing::warn!(q_id, "registering fixed buffers failed ({e}); using plain reads/writes"),
                }
            }
        }
        let batch = if setup.batch { Some(Batch::new(&ring, depth, setup.mode)?) } else { None };
        let ring_index = match uring::register_ring_fd(&ring) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(q_id, "registering the ring fd failed ({e}); io_uring_enter takes the fd");
                None
            }
        };
        Ok(Self {
            ring,
            bufs: setup.region,
            wake_fd,
            wake_buf: Box::leak(Box::new(0)),
            // One timer slot per tag, and one for the queue.
            timeouts: vec![types::Timespec::new(); usize::from(depth) + 1],
            q_id,
            depth,
            buf_size,
            mode: setup.mode,
            fixed_bufs,
            registered: vec![false; usize::from(depth)],
            ring_mode,
            aux_inflight: 0,
            batch,
            offload_min: setup.offload_min.unwrap_or(u32::MAX),
            owned: setup.owned.iter().map(|&len| io::OwnedMem::new(len)).collect(),
            nr_files: u32::try_from(files.len() + 1).unwrap_or(u32::MAX),
            link_pending: false,
            target_wake: setup.target_wake.map(|fd| (fd, Box::leak(Box::new(0)))),
            ring_index,
            shmem: setup.shmem,
            shmem_slot,
            shared_at: vec![None; usize::from(depth)],
        })
    }

    pub(crate) fn ring_mode(&self) -> RingMode {
        self.ring_mode
    }

    /// Is the ring fd registered (see [`uring::register_ring_fd`])?
    pub(crate) fn ring_fd_registered(&self) -> bool {
        self.ring_index.is_some()
    }

    pub(crate) fn fixed_buffers(&self) -> bool {
        self.fixed_bufs || self.mode.is_zero_copy()
    }

    pub(crate) fn page_kind(&self) -> Option<PageKind> {
        self.bufs.as_ref().map(Region::kind)
    }

    /// The user address of `tag`'s buffer (copy mode), else null.
    fn buf_addr(&self, tag: u16) -> *mut u8 {
        match &self.bufs {
            // SAFETY: tag < depth (checked), so the offset stays inside the region.
            Some(r) if tag < self.depth => unsafe { r.as_ptr().add(usize::from(tag) * self.buf_size as usize) },
            _ => std::ptr::null_mut(),
        }
    }

    /// Makes room for `n` SQEs in a row (a linked pair must go in one submission).
    fn reserve(&mut self, n: usize) -> Result<(), i32> {
        let free = {
            let sq = self.ring.submission();
            sq.capacity() - sq.len()
        };
        if free < n {
            self.submit(0).map_err(|e| errno_of(&e))?;
        }
        Ok(())
    }

    /// Pushes one SQE, flushing the SQ to the kernel first if it is full.
    ///
    /// # Safety
    /// Every buffer the SQE points at must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<(), i32> {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.submit(0).map_err(|e| errno_of(&e))?;
        }
        Err(-libc::EBUSY)
    }

    /// A ublk IO command (`struct ublksrv_io_cmd`) for `tag` on the char device (slot 0).
    fn io_cmd(&self, op: u32, tag: u16, result: i32, addr: u64, kind: Kind) -> squeue::Entry {
        let cmd = IoCmd { q_id: self.q_id, tag, result, addr };
        let mut b = opcode::UringCmd16::new(types::Fixed(0), op).cmd(cmd.to_bytes());
        if self.mode == BufferMode::AutoReg && kind == Kind::Ublk {
            // struct ublk_auto_buf_reg in sqe->addr: buffer index = tag, no flags.
            b = b.addr(Some(u64::from(tag)));
        }
        b.build().user_data(tag::encode(kind, tag, 0))
    }

    /// Zero-copy mode: takes the request pages of `tag` out of the buffer table before
    /// the request is committed (no-op when they are not registered).
    fn unregister_request_buf(&mut self, tag: u16) -> Result<(), i32> {
        if !self.registered.get(usize::from(tag)).copied().unwrap_or(false) {
            return Ok(());
        }
        let sqe = self.io_cmd(uapi::IO_UNREGISTER_IO_BUF, tag, 0, u64::from(tag), Kind::Aux);
        // SAFETY: the command is inline and names no user memory.
        unsafe { self.push(&sqe) }?;
        self.aux_inflight += 1;
        self.registered[usize::from(tag)] = false;
        Ok(())
    }

    /// Zero-copy mode: puts the request pages of `tag` in the buffer table, linked
    /// before the SQE pushed next (the `chain` SQEs from this one go in one submission).
    /// No-op when registered.
    fn register_request_buf(&mut self, tag: u16, chain: usize) -> Result<(), i32> {
        if self.registered[usize::from(tag)] {
            return Ok(());
        }
        self.reserve(chain)?;
        let reg = self.io_cmd(uapi::IO_REGISTER_IO_BUF, tag, 0, u64::from(tag), Kind::Aux);
        // SAFETY: the command is inline and names no user memory.
        unsafe { self.push(&reg.flags(squeue::Flags::IO_LINK)) }?;
        self.aux_inflight += 1;
        self.registered[usize::from(tag)] = true;
        Ok(())
    }

    /// Arms an 8-byte read of eventfd `fd` into `buf`, completing as `kind`.
    ///
    /// # Safety
    /// `buf` must stay valid until the read completes, which may be after the ring is
    /// closed (leaked memory), and `fd` must stay open as long as the ring.
    unsafe fn push_eventfd_read(&mut self, fd: RawFd, buf: *mut u64, kind: Kind) -> Result<(), i32> {
        let sqe = opcode::Read::new(types::Fd(fd), buf.cast(), 8).build().user_data(tag::encode(kind, 0, 0));
        // SAFETY: forwarded from this function's contract.
        unsafe { self.push(&sqe) }
    }

    fn enter(&mut self, want: u32, timeout: Option<Duration>) -> stdio::Result<usize> {
        // SAFETY: every SQE queued names memory that outlives it (the push contracts).
        unsafe { uring::enter(&mut self.ring, self.ring_index, want, timeout) }
    }
}

/// What the reactor does with its ring (the per-tag protocol, the wake-up read,
/// submission and completion). The real one is [`QueueRing`]; the reactor's unit tests
/// drive a fake.
pub(crate) trait Ring {
    /// Where a target's SQEs go.
    fn sq(&mut self) -> &mut dyn io::TargetSq;
    /// Per-tag protocol: FETCH_REQ (`result` None) or COMMIT_AND_FETCH_REQ with `result`.
    fn push_ublk(&mut self, tag: u16, result: Option<i32>) -> Result<(), i32>;
    /// Per-tag protocol: COMMIT_AND_FETCH_REQ of a zone append that wrote at `sector`
    /// (the command's `zone_append_lba`).
    fn push_zone_append_commit(&mut self, tag: u16, result: i32, sector: u64) -> Result<(), i32>;
    /// Arms the wake-up read on the eventfd.
    fn push_wake(&mut self) -> Result<(), i32>;
    /// Arms the read on the target's waker eventfd (no-op without a waker).
    fn push_target_wake(&mut self) -> Result<(), i32>;
    /// What the last wake-up read returned (the sum of the values signalled).
    fn wake_value(&self) -> u64;
    /// Commands of the ring's own in flight (buffer (un)registration, batch commits
    /// queued or sent): the queue must not go away before they complete.
    fn busy(&self) -> bool;
    /// Submits everything queued, waiting for at least `want` completions. Returns the
    /// number of SQEs submitted.
    fn submit(&mut self, want: usize) -> stdio::Result<usize>;
    /// Like `submit(1)`, but waits at most `timeout` for a completion (0 on timeout).
    fn submit_wait_timeout(&mut self, timeout: Duration) -> stdio::Result<usize>;
    /// Moves all available completions into `out`, decoded.
    fn reap(&mut self, out: &mut Vec<Cqe>);
    /// The queue gives up with target IO possibly in flight: the memory it names is
    /// never freed.
    fn abandon_buffers(&mut self);
    /// User-copy mode: moves `len` bytes of request `tag`'s data between the kernel and
    /// the tag's buffer, a read of `/dev/ublkcN` (`to_kernel` false: a write's data,
    /// before the target) or a write to it (`to_kernel` true: a read's data, before the
    /// commit). Completes as [`Kind::UserCopy`] with the bytes moved.
    fn push_user_copy(&mut self, tag: u16, to_kernel: bool, len: u32) -> Result<(), i32>;
    /// Where request `tag`'s data is from now on: in the shared memory (UBLK_F_SHMEM_ZC)
    /// at descriptor address `addr` for `len` bytes, or (None) where the buffer mode
    /// puts it. `-EIO` for an address outside the registered buffer.
    fn set_shared(&mut self, tag: u16, at: Option<(u64, u32)>) -> Result<(), i32>;
}

impl Ring for QueueRing {
    fn sq(&mut self) -> &mut dyn io::TargetSq {
        self
    }

    fn busy(&self) -> bool {
        self.aux_inflight > 0 || self.batch.as_ref().is_some_and(Batch::busy)
    }

    /// The queue gives up with target IO possibly still in flight: the copy buffers it
    /// may read into or write from are never unmapped.
    fn abandon_buffers(&mut self) {
        if let Some(region) = self.bufs.take() {
            std::mem::forget(region);
        }
        // The shared mapping too: one reference never dropped keeps it mapped.
        if let Some(sh) = self.shmem.take() {
            std::mem::forget(sh);
        }
    }

    fn set_shared(&mut self, tag: u16, at: Option<(u64, u32)>) -> Result<(), i32> {
        let slot = self.shared_at.get_mut(usize::from(tag)).ok_or(-libc::EINVAL)?;
        *slot = None;
        let Some((addr, len)) = at else { return Ok(()) };
        let sh = self.shmem.as_ref().ok_or(-libc::EIO)?;
        let off = uapi::shmem_zc_offset(addr);
        if uapi::shmem_zc_index(addr) != sh.index || sh.range(u64::from(off), u64::from(len)).is_none() {
            return Err(-libc::EIO);
        }
        *slot = Some(off);
        Ok(())
    }

    /// Per-tag protocol: FETCH_REQ (`result` None) or COMMIT_AND_FETCH_REQ with
    /// `result` for `tag`. In zero-copy mode a registered request buffer is
    /// unregistered first.
    fn push_ublk(&mut self, tag: u16, result: Option<i32>) -> Result<(), i32> {
        let (op, res) = match result {
            None => (uapi::IO_FETCH_REQ, 0),
            Some(r) => {
                self.unregister_request_buf(tag)?;
                (uapi::IO_COMMIT_AND_FETCH_REQ, r)
            }
        };
        // Only copy mode names its buffer: with USER_COPY the kernel wants 0 there.
        let addr = if self.mode == BufferMode::Copy { self.buf_addr(tag) as u64 } else { 0 };
        let sqe = self.io_cmd(op, tag, res, addr, Kind::Ublk);
        // SAFETY: the command is inline; in copy mode `addr` is this tag's buffer inside
        // `self.bufs`, which outlives the ring; otherwise it is 0. Slot 0 is the char device.
        unsafe { self.push(&sqe) }
    }

    fn push_zone_append_commit(&mut self, tag: u16, result: i32, sector: u64) -> Result<(), i32> {
        self.unregister_request_buf(tag)?;
        let sqe = self.io_cmd(uapi::IO_COMMIT_AND_FETCH_REQ, tag, result, sector, Kind::Ublk);
        // SAFETY: the command is inline; `addr` carries the sector (zone_append_lba), no
        // memory. Slot 0 is the char device.
        unsafe { self.push(&sqe) }
    }

    fn push_user_copy(&mut self, tag: u16, to_kernel: bool, len: u32) -> Result<(), i32> {
        if self.mode != BufferMode::UserCopy || tag >= self.depth || len > self.buf_size {
            return Err(-libc::EINVAL);
        }
        let pos = uapi::user_copy_offset(self.q_id, tag);
        let ptr = self.buf_addr(tag);
        let fd = types::Fixed(0);
        // Plain reads and writes, never the fixed-buffer forms: the driver copies only
        // from and to user-backed iterators (a registered buffer's bvec gets EACCES).
        let sqe = if to_kernel {
            opcode::Write::new(fd, ptr, len).offset(pos).build()
        } else {
            opcode::Read::new(fd, ptr, len).offset(pos).build()
        };
        // SAFETY: `ptr..ptr+len` is inside this tag's buffer (len <= buf_size checked; user
        // copy has buffers), which lives as long as the ring (leaked if the ring goes with
        // the SQE in flight); slot 0 is the char device.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::UserCopy, tag, 0))) }
    }

    /// What the last wake-up read returned (the sum of the values signalled).
    fn wake_value(&self) -> u64 {
        *self.wake_buf
    }

    /// Arms the wake-up read on the eventfd.
    fn push_wake(&mut self) -> Result<(), i32> {
        let (fd, buf) = (self.wake_fd.as_raw_fd(), &raw mut *self.wake_buf);
        // SAFETY: `wake_buf` is leaked heap memory (valid forever); `wake_fd` is open
        // for the life of self, and the ring (declared first) is closed before it.
        unsafe { self.push_eventfd_read(fd, buf, Kind::Wake) }
    }

    /// Submits everything queued, waiting for at least `want` completions.
    fn push_target_wake(&mut self) -> Result<(), i32> {
        let Some((fd, buf)) = &mut self.target_wake else { return Ok(()) };
        let (fd, buf) = (fd.as_raw_fd(), &raw mut **buf);
        // SAFETY: as for the wake-up read: leaked buffer, eventfd open as long as the ring.
        unsafe { self.push_eventfd_read(fd, buf, Kind::Waker) }
    }

    fn submit(&mut self, want: usize) -> stdio::Result<usize> {
        let want = u32::try_from(want).unwrap_or(u32::MAX);
        loop {
            match self.enter(want, None) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                // CQ overflow backlog: reap first, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want > 0 => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Like `submit(1)`, but waits at most `timeout` for a completion (0 on timeout).
    fn submit_wait_timeout(&mut self, timeout: Duration) -> stdio::Result<usize> {
        loop {
            match self.enter(1, Some(timeout)) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EBUSY)) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves all available completions into `out`, decoded. Those of the ring's own
    /// commands (buffer registration) are handled here and not passed on.
    fn reap(&mut self, out: &mut Vec<Cqe>) {
        let q_id = self.q_id;
        let mut aux_done = 0;
        for c in self.ring.completion() {
            let Some((kind, tag, cookie)) = tag::decode(c.user_data()) else {
                tracing::error!(q_id, user_data = c.user_data(), "CQE with unknown user_data");
                continue;
            };
            if let Some(m) = tag::decode_mem(c.user_data())
                && let Some(owned) = self.owned.get_mut(usize::from(m))
            {
                owned.inflight -= 1;
            }
            if kind == Kind::Aux {
                aux_done += 1;
                if c.result() < 0 {
                    let e = stdio::Error::from_raw_os_error(-c.result());
                    tracing::error!(q_id, tag, "request buffer (un)registration failed: {e}");
                }
                continue;
            }
            out.push(Cqe { kind, tag, cookie, res: c.result(), flags: c.flags() });
        }
        self.aux_inflight -= aux_done;
    }
}

#[cfg(test)]
mod tests {
    use super::io::{Rw, TargetSq};
    use super::*;
    use crate::request::{FileSlot, Mem, MemId};

    /// A `none`-mode ring of depth 4 (the char device slot holds /dev/null) with the
    /// wake-up eventfd `wake`. These tests need io_uring, as the engine does: where it
    /// is missing they fail rather than pass without having run.
    fn none_ring(wake: OwnedFd) -> QueueRing {
        let null = std::fs::File::open("/dev/null").unwrap();
        let setup = RingSetup {
            ring: None,
            mode: BufferMode::NoData,
            region: None,
            batch: false,
            offload_min: None,
            owned: Vec::new(),
            target_wake: None,
            shmem: None,
        };
        QueueRing::new(0, 4, 4096, setup, wake, null.as_raw_fd(), &[])
            .expect("io_uring_setup (these tests need io_uring)")
    }

    /// Buffer mode `none`: no region, no buffer table, and target reads/writes are
    /// refused.
    #[test]
    fn none_mode_refuses_target_rw() {
        let mut sq = none_ring(crate::sys::eventfd().unwrap());
        assert!(sq.page_kind().is_none() && !sq.fixed_buffers());
        assert_eq!(sq.buf_addr(0), std::ptr::null_mut());
        for write in [false, true] {
            let rw = Rw { write, file: FileSlot(0), buf_off: 0, len: 512, offset: 0, rw_flags: 0 };
            assert_eq!(sq.rw(0, rw, 0), Err(-libc::EINVAL));
        }
        // A buffer region is refused in `none` mode.
        let region = Region::new(4 * 4096, false).unwrap();
        let setup = RingSetup {
            ring: None,
            mode: BufferMode::NoData,
            region: Some(region),
            batch: false,
            offload_min: None,
            owned: Vec::new(),
            target_wake: None,
            shmem: None,
        };
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = QueueRing::new(0, 4, 4096, setup, crate::sys::eventfd().unwrap(), null.as_raw_fd(), &[]).unwrap_err();
        assert_eq!(e.kind(), stdio::ErrorKind::InvalidInput);
    }

    /// CPU copies between a request's buffer (copy mode) and target memory, zeroing,
    /// and the checks: ranges, the buffer mode, memory named by an SQE in flight; and
    /// replacing a registered file (slot 0, the char device, is not the target's).
    #[test]
    fn copies_between_request_buffers_and_target_memory() {
        let null = std::fs::File::open("/dev/null").unwrap();
        let setup = RingSetup {
            ring: None,
            mode: BufferMode::Copy,
            region: Some(Region::new(4 * 4096, false).unwrap()),
            batch: false,
            offload_min: None,
            owned: vec![64],
            target_wake: None,
            shmem: None,
        };
        let mut sq =
            QueueRing::new(0, 4, 4096, setup, crate::sys::eventfd().unwrap(), null.as_raw_fd(), &[null.as_raw_fd()])
                .expect("io_uring_setup (these tests need io_uring)");
        let id = MemId(0);
        sq.mem(id).unwrap()[..8].copy_from_slice(b"abcdefgh");
        let owned = |off, len| Mem::Owned { id, off, len };
        // Owned -> request 2 at 100, back into owned at 32, and a zeroed middle.
        sq.copy(Some(2), Mem::Request { off: 100, len: 8 }, Some(owned(0, 8))).unwrap();
        sq.copy(Some(2), Mem::Request { off: 102, len: 2 }, None).unwrap();
        sq.copy(Some(2), owned(32, 8), Some(Mem::Request { off: 100, len: 8 })).unwrap();
        assert_eq!(&sq.mem(id).unwrap()[32..40], b"ab\0\0efgh");
        // Another tag's buffer is another place.
        sq.copy(Some(3), owned(48, 8), Some(Mem::Request { off: 100, len: 8 })).unwrap();
        assert_eq!(&sq.mem(id).unwrap()[48..56], &[0; 8]);
        // Overlapping copies within target memory move as memmove does.
        sq.copy(None, owned(1, 8), Some(owned(0, 8))).unwrap();
        assert_eq!(&sq.mem(id).unwrap()[..9], b"aabcdefgh");
        for (dst, src, want) in [
            (Mem::Request { off: 4090, len: 8 }, Some(owned(0, 8)), -libc::EINVAL),
            (owned(60, 8), None, -libc::EINVAL),
            (owned(0, 8), Some(owned(0, 4)), -libc::EINVAL),
            (Mem::Request { off: 0, len: 8 }, None, -libc::EINVAL),
        ] {
            let tag = if matches!(dst, Mem::Request { off: 0, .. }) { None } else { Some(1) };
            assert_eq!(sq.copy(tag, dst, src), Err(want), "{dst:?} {src:?}");
        }
        // Memory an SQE in flight names is busy.
        sq.owned[0].inflight = 1;
        assert_eq!(sq.copy(Some(1), Mem::Request { off: 0, len: 8 }, Some(owned(0, 8))), Err(-libc::EBUSY));
        sq.owned[0].inflight = 0;
        assert_eq!(sq.update_file(FileSlot(0), null.as_raw_fd()), Err(-libc::EINVAL));
        assert_eq!(sq.update_file(FileSlot(2), null.as_raw_fd()), Err(-libc::EINVAL));
        let other = std::fs::File::open("/dev/zero").unwrap();
        sq.update_file(FileSlot(1), other.as_raw_fd()).unwrap();
        // No request buffer in `none` mode.
        let mut none = none_ring(crate::sys::eventfd().unwrap());
        assert_eq!(none.copy(Some(0), Mem::Request { off: 0, len: 8 }, None), Err(-libc::EOPNOTSUPP));
    }

    /// The queue's own `io_uring_enter` (registered ring fd, EXT_ARG timeout): a wait
    /// with nothing in flight times out, and the wake-up read completes once the eventfd
    /// is signalled.
    #[test]
    fn enter_waits_and_completes() {
        let wake = crate::sys::eventfd().unwrap();
        let signal = wake.try_clone().unwrap();
        let mut sq = none_ring(wake);
        assert!(sq.ring_fd_registered(), "IORING_REGISTER_RING_FDS failed");
        assert_eq!(sq.ring_mode(), RingMode::CoopTaskrun);
        let mut cqes = Vec::new();
        // Nothing queued, nothing in flight: the wait ends at its timeout.
        assert_eq!(sq.submit_wait_timeout(Duration::from_millis(20)).unwrap(), 0);
        sq.reap(&mut cqes);
        assert!(cqes.is_empty());
        // The armed read is submitted (1 SQE) and waits; a signal completes it.
        sq.push_wake().unwrap();
        assert_eq!(sq.submit_wait_timeout(Duration::from_millis(20)).unwrap(), 1);
        use std::os::fd::AsFd;
        crate::sys::eventfd_add(signal.as_fd(), 5).unwrap();
        while cqes.is_empty() {
            sq.submit(1).unwrap();
            sq.reap(&mut cqes);
        }
        assert_eq!(cqes, [Cqe { kind: Kind::Wake, tag: 0, cookie: 0, res: 8, flags: cqes[0].flags }]);
        assert_eq!(sq.wake_value(), 5);
    }
}
