//! The queue thread's io_uring and its buffers: the only place SQEs are pushed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};

use super::tag::{self, Kind};
use crate::buf::BufferMode;
use crate::sys::mmap::{PageKind, Region};
use crate::sys::uapi::{self, BatchIo, ElemHeader, IoCmd};
use crate::target::FileSlot;

/// How the ring was set up (reported at startup).
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

/// Owns the ring and the buffers its SQEs point into.
///
/// Field order matters: `ring` is declared (and so dropped) before `bufs`, and the
/// queue loop never returns while a target SQE is in flight, so no SQE outlives the
/// memory it names.
pub struct SqWriter {
    ring: IoUring,
    /// Per-tag buffers (copy mode only).
    bufs: Option<Region>,
    wake_fd: OwnedFd,
    /// Where the wake-up read lands. Leaked on purpose: a read may still be armed when
    /// the ring is closed, and the ring's teardown in the kernel is asynchronous.
    wake_buf: &'static mut u64,
    /// Per-tag timeout values for `push_timeout` (read by the kernel at submission).
    timeouts: Vec<types::Timespec>,
    q_id: u16,
    depth: u16,
    buf_size: u32,
    mode: BufferMode,
    /// Copy mode: the per-tag buffers are registered as fixed buffers.
    fixed_bufs: bool,
    /// Zero-copy mode: the request's pages of each tag are in the buffer table.
    registered: Vec<bool>,
    pub(crate) ring_mode: RingMode,
    /// Target SQEs pushed whose CQE has not been reaped.
    pub(crate) target_inflight: u32,
    /// Buffer (un)registration commands in flight.
    pub(crate) aux_inflight: u32,
    /// UBLK_F_BATCH_IO: fetched-tag buffers and commit element arrays.
    batch: Option<Batch>,
    /// Target IO of at least this many bytes gets IOSQE_ASYNC (u32::MAX: none).
    offload_min: u32,
    /// The ring's index among this thread's registered ring fds (None: not registered,
    /// `io_uring_enter` takes the fd).
    ring_index: Option<u32>,
}

/// The provided-buffer group the multishot FETCH_IO_CMDS picks its tag buffers from.
const FETCH_BGID: u16 = 0;
/// `IORING_URING_CMD_MULTISHOT` (sqe->uring_cmd_flags).
const URING_CMD_MULTISHOT: u32 = 1 << 1;
/// Bytes of one provided-buffer ring entry (`struct io_uring_buf`).
const BUF_RING_ENTRY: usize = 16;

// io_uring_register / io_uring_enter, for the registered ring fd (linux/io_uring.h).
const IORING_REGISTER_RING_FDS: libc::c_long = 20;
const IORING_UNREGISTER_RING_FDS: libc::c_long = 21;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_ENTER_EXT_ARG: u32 = 1 << 3;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;

/// `struct io_uring_rsrc_update`.
#[repr(C)]
struct RsrcUpdate {
    offset: u32,
    resv: u32,
    data: u64,
}

/// `struct io_uring_getevents_arg`.
#[repr(C)]
struct GeteventsArg {
    sigmask: u64,
    sigmask_sz: u32,
    min_wait_usec: u32,
    ts: u64,
}

/// `struct __kernel_timespec`.
#[repr(C)]
struct KernelTimespec {
    tv_sec: i64,
    tv_nsec: i64,
}

const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<RsrcUpdate>() == 16 && offset_of!(RsrcUpdate, data) == 8);
    assert!(size_of::<GeteventsArg>() == 24 && offset_of!(GeteventsArg, min_wait_usec) == 12);
    assert!(offset_of!(GeteventsArg, ts) == 16);
    assert!(size_of::<KernelTimespec>() == 16 && offset_of!(KernelTimespec, tv_nsec) == 8);
};

/// Registers the ring's own fd with this thread's io_uring context
/// (IORING_REGISTER_RING_FDS): `io_uring_enter` then takes the returned index with
/// IORING_ENTER_REGISTERED_RING, and skips the fd table lookup (and its reference
/// count) on every call. io-uring's `Submitter` keeps such a registration only for its
/// own lifetime, so the queue does its own enter.
fn register_ring_fd(ring: &IoUring) -> io::Result<u32> {
    let mut up = RsrcUpdate { offset: u32::MAX, resv: 0, data: ring.as_raw_fd() as u64 };
    match ring_fds(ring, IORING_REGISTER_RING_FDS, &mut up)? {
        1 => Ok(up.offset),
        _ => Err(io::Error::other("IORING_REGISTER_RING_FDS registered nothing")),
    }
}

/// IORING_(UN)REGISTER_RING_FDS `op` with one entry, `up` (the kernel writes the index
/// it picked into `up.offset` on registration). Returns the number of entries done.
fn ring_fds(ring: &IoUring, op: libc::c_long, up: &mut RsrcUpdate) -> io::Result<libc::c_long> {
    // SAFETY: one live, writable io_uring_rsrc_update is passed; the kernel keeps no
    // pointer to it past the call.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_register, ring.as_raw_fd(), op, std::ptr::from_mut(up), 1) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// UBLK_F_BATCH_IO state of one queue.
///
/// The fetch side: a provided-buffer ring of `nbufs` buffers of `tag_buf_bytes` each
/// (one region: ring entries, then the buffers). Each fetch CQE carries at least one
/// tag and at most `depth` tags are outstanding, so `nbufs >= depth` buffers never run
/// out as long as each is given back before the next `io_uring_enter` (it is).
///
/// The commit side: elements appended during a pass, sent as one COMMIT_IO_CMDS at its
/// end; each array sent stays in `inflight` (indexed by the SQE's cookie) until its CQE.
struct Batch {
    /// `ublk_batch_io.flags` of PREP and COMMIT (HAS_BUF_ADDR in copy mode only: the
    /// driver refuses it, EINVAL, for USER_COPY and the zero-copy modes).
    flags: u16,
    elem_bytes: usize,
    mem: Region,
    nbufs: u16,
    tag_buf_bytes: usize,
    /// Our copy of the ring's tail.
    tail: u16,
    pending: Vec<u8>,
    inflight: Vec<Option<Vec<u8>>>,
    /// Spare element arrays (reused to avoid an allocation per pass).
    spare: Vec<Vec<u8>>,
    /// Commit SQEs pushed whose CQE has not been reaped.
    commits_inflight: u32,
}

impl Batch {
    fn ring_bytes(&self) -> usize {
        (usize::from(self.nbufs) * BUF_RING_ENTRY).next_multiple_of(64)
    }

    fn buf_offset(&self, bid: u16) -> usize {
        self.ring_bytes() + usize::from(bid) * self.tag_buf_bytes
    }

    /// Puts buffer `bid` at the ring's tail and publishes the new tail.
    fn provide(&mut self, bid: u16) {
        let slot = usize::from(self.tail & (self.nbufs - 1)) * BUF_RING_ENTRY;
        let addr = self.mem.as_ptr() as u64 + self.buf_offset(bid) as u64;
        let len = self.tag_buf_bytes as u32;
        let ring = self.mem.as_mut_slice();
        ring[slot..slot + 8].copy_from_slice(&addr.to_ne_bytes());
        ring[slot + 8..slot + 12].copy_from_slice(&len.to_ne_bytes());
        ring[slot + 12..slot + 14].copy_from_slice(&bid.to_ne_bytes());
        self.tail = self.tail.wrapping_add(1);
        // The tail is the `resv` field of entry 0 (byte 14); the region is page aligned.
        let tail_ptr = self.mem.as_ptr().wrapping_add(14).cast::<u16>();
        // SAFETY: `tail_ptr` is inside the region, 2-byte aligned, and only read by the
        // kernel (atomically) and written by this thread.
        let tail = unsafe { std::sync::atomic::AtomicU16::from_ptr(tail_ptr) };
        tail.store(self.tail, std::sync::atomic::Ordering::Release);
    }
}

/// What a COMMIT_IO_CMDS completion meant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommitOutcome {
    /// Every element was taken (or the rest is queued again).
    Done,
    /// The kernel refused the element for `tag` (with `-errno`); it was dropped.
    Refused { tag: u16, errno: i32 },
}

/// Splits a commit's element array after its CQE: the elements to send again, and the
/// tag the kernel refused (the first element, when it took none) with its error.
pub(crate) fn commit_leftover(
    elems: &[u8],
    elem_bytes: usize,
    res: i32,
) -> (std::ops::Range<usize>, Option<(u16, i32)>) {
    match usize::try_from(res) {
        Ok(done) if done >= elems.len() => (elems.len()..elems.len(), None),
        // A partial commit: the element at `done` was refused; it is sent again (and is
        // then refused alone, with its error).
        Ok(done) => ((done - done % elem_bytes)..elems.len(), None),
        Err(_) => {
            let refused = uapi::batch_elem_tag(elems, 0).map(|t| (t, res));
            (elem_bytes.min(elems.len())..elems.len(), refused)
        }
    }
}

impl std::fmt::Debug for SqWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqWriter").field("q_id", &self.q_id).field("mode", &self.mode).finish()
    }
}

impl Drop for SqWriter {
    fn drop(&mut self) {
        // The registration holds a reference on the ring: let go of it, so that the ring
        // is closed when its field is dropped (below), before the buffers.
        if let Some(index) = self.ring_index.take() {
            let mut up = RsrcUpdate { offset: index, resv: 0, data: 0 };
            if let Err(e) = ring_fds(&self.ring, IORING_UNREGISTER_RING_FDS, &mut up) {
                tracing::warn!(q_id = self.q_id, "unregistering the ring fd: {e}");
            }
        }
        // The ring's teardown is asynchronous: commit arrays and fetch buffers the kernel
        // may still read or write are never freed.
        if let Some(b) = self.batch.take() {
            std::mem::forget(b.mem);
            for v in b.inflight.into_iter().flatten() {
                std::mem::forget(v);
            }
        }
        // Dropped with target IO in flight (an abort, a panic): the ring's teardown in
        // the kernel is asynchronous, so the buffers that IO uses must stay mapped.
        if self.target_inflight > 0 {
            self.abandon_buffers();
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
fn build_ring(entries: u32, want: Option<RingMode>) -> io::Result<(IoUring, RingMode)> {
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
pub struct RingSetup {
    /// Ring flags to use (None: the default, COOP_TASKRUN).
    pub ring: Option<RingMode>,
    pub mode: BufferMode,
    /// Copy mode: the per-tag buffer memory (depth * buf_size bytes); None otherwise.
    pub region: Option<Region>,
    /// UBLK_F_BATCH_IO: PREP/FETCH/COMMIT_IO_CMDS instead of per-tag commands.
    pub batch: bool,
    /// Target reads/writes of at least this many bytes get IOSQE_ASYNC.
    pub offload_min: Option<u32>,
}

impl SqWriter {
    /// Builds the ring for one queue: registers `/dev/ublkcN` (slot 0) and the target's
    /// files, and the buffer table: the per-tag buffers in copy mode (falling back to
    /// plain reads/writes if that fails, with a warning), an empty table of `depth`
    /// slots that the request pages are registered into in the zero-copy modes, and
    /// nothing in `none` (USER_COPY: target reads and writes are refused).
    pub fn new(
        q_id: u16,
        depth: u16,
        buf_size: u32,
        bufs: RingSetup,
        wake_fd: OwnedFd,
        cdev: RawFd,
        files: &[RawFd],
    ) -> io::Result<Self> {
        let entries = (u32::from(depth) * 2).next_power_of_two().max(8);
        let (ring, ring_mode) = build_ring(entries, bufs.ring)?;
        let mut all = vec![cdev];
        all.extend_from_slice(files);
        ring.submitter().register_files(&all)?;
        if bufs.mode.needs_buffers() == bufs.region.is_none() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "copy mode needs a buffer region, and only it"));
        }
        let mut fixed_bufs = false;
        match &bufs.region {
            // `none` (USER_COPY): the target moves no data, so no buffer table either.
            None if !bufs.mode.moves_data() => {}
            None => ring.submitter().register_buffers_sparse(u32::from(depth))?,
            Some(region) => {
                if region.len() < usize::from(depth) * buf_size as usize {
                    return Err(io::Error::new(io::ErrorKind::InvalidInput, "buffer region too small"));
                }
                let iovecs: Vec<libc::iovec> = (0..depth)
                    .map(|t| libc::iovec {
                        // SAFETY: t < depth and the region holds depth * buf_size bytes (checked).
                        iov_base: unsafe { region.as_ptr().add(usize::from(t) * buf_size as usize) }.cast(),
                        iov_len: buf_size as usize,
                    })
                    .collect();
                // SAFETY: the iovecs name memory owned by `bufs.region`, which this struct
                // keeps alive longer than the ring (field order); the kernel pins the pages.
                match unsafe { ring.submitter().register_buffers(&iovecs) } {
                    Ok(()) => fixed_bufs = true,
                    Err(e) => tracing::warn!(q_id, "registering fixed buffers failed ({e}); using plain reads/writes"),
                }
            }
        }
        let batch = if bufs.batch { Some(Self::setup_batch(&ring, depth, bufs.mode)?) } else { None };
        let ring_index = match register_ring_fd(&ring) {
            Ok(i) => Some(i),
            Err(e) => {
                tracing::warn!(q_id, "registering the ring fd failed ({e}); io_uring_enter takes the fd");
                None
            }
        };
        Ok(Self {
            ring,
            bufs: bufs.region,
            wake_fd,
            wake_buf: Box::leak(Box::new(0)),
            timeouts: vec![types::Timespec::new(); usize::from(depth)],
            q_id,
            depth,
            buf_size,
            mode: bufs.mode,
            fixed_bufs,
            registered: vec![false; usize::from(depth)],
            ring_mode,
            target_inflight: 0,
            aux_inflight: 0,
            batch,
            offload_min: bufs.offload_min.unwrap_or(u32::MAX),
            ring_index,
        })
    }

    /// Allocates and registers the provided-buffer ring for fetched tags.
    fn setup_batch(ring: &IoUring, depth: u16, mode: BufferMode) -> io::Result<Batch> {
        let nbufs = depth.next_power_of_two().max(8);
        let tag_buf_bytes = 2 * usize::from(depth.min(64));
        let ring_bytes = (usize::from(nbufs) * BUF_RING_ENTRY).next_multiple_of(64);
        let mem = Region::new(ring_bytes + usize::from(nbufs) * tag_buf_bytes, false)?;
        // SAFETY: the ring memory is page aligned (mmap), sized for `nbufs` entries, and
        // outlives the registration: it is never unmapped (see Drop), and the ring is
        // closed before anything else could reuse it.
        unsafe { ring.submitter().register_buf_ring_with_flags(mem.as_ptr() as u64, nbufs, FETCH_BGID, 0) }?;
        let flags = if mode == BufferMode::Copy { uapi::BATCH_F_HAS_BUF_ADDR } else { 0 };
        let mut b = Batch {
            flags,
            elem_bytes: uapi::batch_elem_bytes(flags),
            mem,
            nbufs,
            tag_buf_bytes,
            tail: 0,
            pending: Vec::new(),
            inflight: Vec::new(),
            spare: Vec::new(),
            commits_inflight: 0,
        };
        for bid in 0..nbufs {
            b.provide(bid);
        }
        Ok(b)
    }

    pub fn is_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// Commit elements queued or in flight (batch mode).
    pub(crate) fn commits_busy(&self) -> bool {
        self.batch.as_ref().is_some_and(|b| !b.pending.is_empty() || b.commits_inflight > 0)
    }

    /// The element for `tag`: buffer-table slot = tag (AUTO_BUF_REG), the buffer
    /// address in copy mode.
    fn batch_elem(&self, tag: u16, result: i32, out: &mut Vec<u8>, flags: u16) {
        let elem = ElemHeader { tag, buf_index: tag, result };
        uapi::push_batch_elem(out, flags, elem, self.buf_addr(tag) as u64);
    }

    fn batch_cmd(&self, op: u32, flags: u16, nr_elem: u16, elem_bytes: u8) -> opcode::UringCmd16 {
        let cmd = BatchIo { q_id: self.q_id, flags, nr_elem, elem_bytes, ..Default::default() };
        opcode::UringCmd16::new(types::Fixed(0), op).cmd(cmd.to_bytes())
    }

    /// PREP_IO_CMDS for every tag, waiting for its completion (nothing else may be in
    /// flight). Returns the command's result.
    pub fn prep_all(&mut self) -> Result<i32, i32> {
        let Some(b) = &self.batch else { return Err(-libc::EINVAL) };
        let flags = b.flags;
        let elem_bytes = b.elem_bytes;
        let mut elems = Vec::with_capacity(usize::from(self.depth) * elem_bytes);
        for tag in 0..self.depth {
            self.batch_elem(tag, 0, &mut elems, flags);
        }
        let sqe = self
            .batch_cmd(uapi::IO_PREP_IO_CMDS, flags, self.depth, elem_bytes as u8)
            .addr(Some(elems.as_ptr() as u64))
            .build()
            .user_data(tag::encode(Kind::Commit, 0, u16::MAX));
        // SAFETY: `elems` lives until the CQE is reaped below (the function waits for it).
        unsafe { self.push(&sqe) }?;
        let mut cqes = Vec::new();
        while cqes.is_empty() {
            self.submit(1).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
            self.reap(&mut cqes);
        }
        drop(elems);
        Ok(cqes[0].1)
    }

    /// Arms the multishot FETCH_IO_CMDS: tags arrive in buffers of group FETCH_BGID.
    pub fn push_fetch(&mut self) -> Result<(), i32> {
        let sqe = self
            .batch_cmd(uapi::IO_FETCH_IO_CMDS, 0, self.depth, 2)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(tag::encode(Kind::Fetch, 0, 0));
        // The builder has no multishot or buffer-group setter: patch the raw SQE
        // (uring_cmd_flags at byte 28, buf_group at byte 40 of struct io_uring_sqe).
        // SAFETY: `Entry` is `repr(C)` around the 64-byte `io_uring_sqe`, plain integers.
        let mut raw: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(sqe) };
        let cmd_flags = u32::from_ne_bytes([raw[28], raw[29], raw[30], raw[31]]) | URING_CMD_MULTISHOT;
        raw[28..32].copy_from_slice(&cmd_flags.to_ne_bytes());
        raw[40..42].copy_from_slice(&FETCH_BGID.to_ne_bytes());
        // SAFETY: any 64 bytes are a valid `io_uring_sqe` (integers and unions of them).
        let sqe = unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) };
        // SAFETY: the command names no memory but the registered buffer group, whose
        // memory is never freed while the ring exists.
        unsafe { self.push(&sqe) }
    }

    /// The tags of a fetch CQE (`res` bytes in buffer `flags >> 16`) into `out`; the
    /// buffer is given back to the ring.
    pub fn take_fetched(&mut self, res: i32, cqe_flags: u32, out: &mut Vec<u16>) {
        out.clear();
        let Some(b) = &mut self.batch else { return };
        let Some(bid) = io_uring::cqueue::buffer_select(cqe_flags) else { return };
        if bid >= b.nbufs {
            tracing::error!(q_id = self.q_id, bid, "fetch CQE names an unknown buffer");
            return;
        }
        let len = usize::try_from(res).unwrap_or(0).min(b.tag_buf_bytes);
        let off = b.buf_offset(bid);
        let bytes = &b.mem.as_slice()[off..off + len];
        out.extend(bytes.chunks_exact(2).map(|c| u16::from_ne_bytes([c[0], c[1]])));
        b.provide(bid);
    }

    /// Queues the commit of `tag` with `result` (sent at the end of the pass by
    /// `flush_commits`). In zero-copy mode a registered request buffer is unregistered first.
    pub fn queue_commit(&mut self, tag: u16, result: i32) -> Result<(), i32> {
        if self.registered.get(usize::from(tag)).copied().unwrap_or(false) {
            let sqe = self.io_cmd(uapi::IO_UNREGISTER_IO_BUF, tag, 0, u64::from(tag), Kind::Aux);
            // SAFETY: the command is inline and names no user memory.
            unsafe { self.push(&sqe) }?;
            self.aux_inflight += 1;
            self.registered[usize::from(tag)] = false;
        }
        let Some(b) = &mut self.batch else { return Err(-libc::EINVAL) };
        let flags = b.flags;
        let mut pending = std::mem::take(&mut b.pending);
        self.batch_elem(tag, result, &mut pending, flags);
        if let Some(b) = &mut self.batch {
            b.pending = pending;
        }
        Ok(())
    }

    /// Sends the queued commit elements as COMMIT_IO_CMDS (at most `depth` per SQE),
    /// calling `sent` with the element count of each command queued.
    pub fn flush_commits(&mut self, mut sent: impl FnMut(u16)) -> Result<(), i32> {
        loop {
            let Some(b) = &mut self.batch else { return Ok(()) };
            if b.pending.is_empty() {
                return Ok(());
            }
            let max = usize::from(self.depth) * b.elem_bytes;
            let mut elems = std::mem::take(&mut b.pending);
            if elems.len() > max {
                let mut rest = b.spare.pop().unwrap_or_default();
                rest.clear();
                rest.extend_from_slice(&elems[max..]);
                elems.truncate(max);
                b.pending = rest;
            } else {
                let mut next = b.spare.pop().unwrap_or_default();
                next.clear();
                b.pending = next;
            }
            let nr = (elems.len() / b.elem_bytes) as u16;
            let (flags, elem_bytes) = (b.flags, b.elem_bytes as u8);
            let slot = match b.inflight.iter().position(Option::is_none) {
                Some(i) => i,
                None => {
                    b.inflight.push(None);
                    b.inflight.len() - 1
                }
            };
            let addr = elems.as_ptr() as u64;
            b.inflight[slot] = Some(elems);
            b.commits_inflight += 1;
            let sqe = self
                .batch_cmd(uapi::IO_COMMIT_IO_CMDS, flags, nr, elem_bytes)
                .addr(Some(addr))
                .build()
                .user_data(tag::encode(Kind::Commit, 0, slot as u16));
            // SAFETY: the array is kept in `inflight[slot]` (a heap buffer that does not
            // move) until this SQE's CQE is reaped, and leaked if the ring goes first.
            unsafe { self.push(&sqe) }?;
            sent(nr);
        }
    }

    /// Handles a COMMIT_IO_CMDS completion: unconsumed elements are queued again.
    pub(crate) fn on_commit(&mut self, slot: u16, res: i32) -> CommitOutcome {
        let Some(b) = &mut self.batch else { return CommitOutcome::Done };
        let Some(elems) = b.inflight.get_mut(usize::from(slot)).and_then(Option::take) else {
            tracing::error!(q_id = self.q_id, slot, "completion of an unknown commit");
            return CommitOutcome::Done;
        };
        b.commits_inflight -= 1;
        let (again, refused) = commit_leftover(&elems, b.elem_bytes, res);
        if !again.is_empty() {
            b.pending.extend_from_slice(&elems[again]);
        }
        let mut elems = elems;
        elems.clear();
        b.spare.push(elems);
        match refused {
            Some((tag, errno)) => CommitOutcome::Refused { tag, errno },
            None => CommitOutcome::Done,
        }
    }

    pub fn fixed_buffers(&self) -> bool {
        self.fixed_bufs || self.mode.is_zero_copy()
    }
    pub fn page_kind(&self) -> Option<PageKind> {
        self.bufs.as_ref().map(Region::kind)
    }

    /// The user address of `tag`'s buffer (copy mode), else 0.
    fn buf_addr(&self, tag: u16) -> *mut u8 {
        match &self.bufs {
            // SAFETY: tag < depth (callers check), so the offset stays inside the region.
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
            self.submit(0).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
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
            self.submit(0).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
        }
        Err(-libc::EBUSY)
    }

    fn io_cmd(&self, op: u32, tag: u16, result: i32, addr: u64, kind: Kind) -> squeue::Entry {
        let cmd = IoCmd { q_id: self.q_id, tag, result, addr };
        let mut b = opcode::UringCmd16::new(types::Fixed(0), op).cmd(cmd.to_bytes());
        if self.mode == BufferMode::AutoReg && kind == Kind::Ublk {
            // struct ublk_auto_buf_reg in sqe->addr: buffer index = tag, no flags.
            b = b.addr(Some(u64::from(tag)));
        }
        b.build().user_data(tag::encode(kind, tag, 0))
    }

    /// FETCH_REQ (result None) or COMMIT_AND_FETCH_REQ (result Some) for `tag`. In
    /// zero-copy mode a registered request buffer is unregistered first.
    pub fn push_ublk(&mut self, tag: u16, result: Option<i32>) -> Result<(), i32> {
        if result.is_some() && self.registered.get(usize::from(tag)).copied().unwrap_or(false) {
            let sqe = self.io_cmd(uapi::IO_UNREGISTER_IO_BUF, tag, 0, u64::from(tag), Kind::Aux);
            // SAFETY: the command is inline and names no user memory.
            unsafe { self.push(&sqe) }?;
            self.aux_inflight += 1;
            self.registered[usize::from(tag)] = false;
        }
        let (op, res) = match result {
            None => (uapi::IO_FETCH_REQ, 0),
            Some(r) => (uapi::IO_COMMIT_AND_FETCH_REQ, r),
        };
        let sqe = self.io_cmd(op, tag, res, self.buf_addr(tag) as u64, Kind::Ublk);
        // SAFETY: the command is inline; in copy mode `addr` is this tag's buffer inside
        // `self.bufs`, which outlives the ring; otherwise it is 0. Slot 0 is the char device.
        unsafe { self.push(&sqe) }
    }

    /// What the last wake-up read returned (the sum of the values signalled).
    pub(crate) fn wake_value(&self) -> u64 {
        *self.wake_buf
    }

    /// Arms the wake-up read on the eventfd.
    pub fn push_wake(&mut self) -> Result<(), i32> {
        let ptr: *mut u64 = &raw mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), ptr.cast(), 8).build().user_data(tag::encode(
            Kind::Wake,
            0,
            0,
        ));
        // SAFETY: `wake_buf` is leaked heap memory (valid forever); `wake_fd` is open
        // for the life of self, and the ring (declared first) is closed before it.
        unsafe { self.push(&sqe) }
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn push_rw(
        &mut self,
        write: bool,
        tag: u16,
        file: FileSlot,
        buf_off: u32,
        len: u32,
        offset: u64,
        rw_flags: i32,
        cookie: u16,
    ) -> Result<(), i32> {
        // `none`: there is no buffer to read into or write from.
        if !self.mode.moves_data()
            || tag >= self.depth
            || u64::from(buf_off) + u64::from(len) > u64::from(self.buf_size)
        {
            return Err(-libc::EINVAL);
        }
        let fd = types::Fixed(file.0);
        let ud = tag::encode(Kind::Target, tag, cookie);
        let sqe = if self.mode.is_zero_copy() {
            if self.mode == BufferMode::ZeroCopy && !self.registered[usize::from(tag)] {
                // REGISTER_IO_BUF linked before the IO, both in one submission.
                self.reserve(2)?;
                let reg = self.io_cmd(uapi::IO_REGISTER_IO_BUF, tag, 0, u64::from(tag), Kind::Aux);
                // SAFETY: the command is inline and names no user memory.
                unsafe { self.push(&reg.flags(squeue::Flags::IO_LINK)) }?;
                self.aux_inflight += 1;
                self.registered[usize::from(tag)] = true;
            }
            // Buffer-table slot `tag` holds the request's pages; the address is an
            // offset into them.
            let at = std::ptr::without_provenance_mut::<u8>(buf_off as usize);
            if write {
                opcode::WriteFixed::new(fd, at, len, tag).offset(offset).rw_flags(rw_flags).build()
            } else {
                opcode::ReadFixed::new(fd, at, len, tag).offset(offset).rw_flags(rw_flags).build()
            }
        } else {
            // SAFETY: buf_off + len <= buf_size was checked: the range is inside this tag's buffer.
            let ptr = unsafe { self.buf_addr(tag).add(buf_off as usize) };
            match (write, self.fixed_bufs) {
                (false, true) => opcode::ReadFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
                (false, false) => opcode::Read::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
                (true, true) => opcode::WriteFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
                (true, false) => opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
            }
        };
        // Large IO goes to io-wq: its copy then runs on whichever CPU is free, not
        // serially in the queue thread (a single submitter loads a single queue).
        let sqe = if len >= self.offload_min { sqe.flags(squeue::Flags::ASYNC) } else { sqe };
        // Copy mode: the range is inside this tag's buffer (checked above), which lives as
        // long as the ring. Zero-copy modes: the kernel owns the registered request pages,
        // and the request is not committed (so they stay registered) until this CQE is reaped.
        // SAFETY: the data range is valid for the whole IO, as just said.
        unsafe { self.push(&sqe.user_data(ud)) }?;
        self.target_inflight += 1;
        Ok(())
    }

    pub(crate) fn push_fsync(&mut self, tag: u16, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        let sqe = opcode::Fsync::new(types::Fixed(file.0)).flags(flags).build();
        // SAFETY: fsync names no memory; the file is registered.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::Target, tag, cookie))) }?;
        self.target_inflight += 1;
        Ok(())
    }

    pub(crate) fn push_fallocate(
        &mut self,
        tag: u16,
        file: FileSlot,
        mode: i32,
        offset: u64,
        len: u64,
        cookie: u16,
    ) -> Result<(), i32> {
        let sqe = opcode::Fallocate::new(types::Fixed(file.0), len).offset(offset).mode(mode).build();
        // SAFETY: fallocate names no memory; the file is registered.
        unsafe { self.push(&sqe.user_data(tag::encode(Kind::Target, tag, cookie))) }?;
        self.target_inflight += 1;
        Ok(())
    }

    /// A timer for `tag`: completes (with -ETIME) after `after`. Names no memory past
    /// submission: the kernel copies the timespec when it prepares the SQE.
    pub(crate) fn push_timeout(&mut self, tag: u16, after: std::time::Duration, cookie: u16) -> Result<(), i32> {
        let Some(ts) = self.timeouts.get_mut(usize::from(tag)) else { return Err(-libc::EINVAL) };
        *ts = types::Timespec::new().sec(after.as_secs()).nsec(after.subsec_nanos());
        let ptr: *const types::Timespec = ts;
        let sqe = opcode::Timeout::new(ptr).count(0).build().user_data(tag::encode(Kind::Target, tag, cookie));
        // SAFETY: `ptr` is this tag's slot in `self.timeouts`, which is never resized and
        // lives as long as the ring; a tag has one timer at a time, so the slot is not
        // rewritten before the SQE is submitted (the kernel copies it then).
        unsafe { self.push(&sqe) }?;
        self.target_inflight += 1;
        Ok(())
    }

    /// The queue gives up with target IO possibly still in flight: the copy buffers it
    /// may read into or write from are never unmapped.
    pub(crate) fn abandon_buffers(&mut self) {
        if let Some(region) = self.bufs.take() {
            std::mem::forget(region);
        }
    }

    /// Is the ring fd registered (see [`register_ring_fd`])?
    pub fn ring_fd_registered(&self) -> bool {
        self.ring_index.is_some()
    }

    /// `io_uring_enter`: submits every queued SQE and, with `want` > 0, waits for that
    /// many completions (at most `timeout`). Returns the number of SQEs submitted.
    fn enter(&mut self, want: u32, timeout: Option<std::time::Duration>) -> io::Result<usize> {
        let (to_submit, mut flags) = {
            let sq = self.ring.submission();
            // A CQ overflow backlog or pending task work is only flushed by GETEVENTS.
            let get = want > 0 || sq.cq_overflow() || sq.taskrun();
            (sq.len() as u32, if get { IORING_ENTER_GETEVENTS } else { 0 })
        };
        let ts = timeout.map(|t| KernelTimespec {
            tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(t.subsec_nanos()),
        });
        let arg = ts.as_ref().map(|ts| GeteventsArg {
            sigmask: 0,
            sigmask_sz: 0,
            min_wait_usec: 0,
            ts: (&raw const *ts) as u64,
        });
        let (arg_ptr, arg_len) = match &arg {
            Some(a) => {
                flags |= IORING_ENTER_EXT_ARG;
                ((&raw const *a).cast::<libc::c_void>(), size_of::<GeteventsArg>())
            }
            None => (std::ptr::null(), 0),
        };
        let fd = match self.ring_index {
            Some(i) => {
                flags |= IORING_ENTER_REGISTERED_RING;
                i as libc::c_long
            }
            None => libc::c_long::from(self.ring.as_raw_fd()),
        };
        // SAFETY: every SQE queued names memory that outlives it (the push contracts);
        // `arg`, when given, is a live io_uring_getevents_arg pointing at a live timespec,
        // both read by the kernel during this call only.
        let r = unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, to_submit, want, flags, arg_ptr, arg_len) };
        if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
    }

    /// Submits everything queued, waiting for at least `want` completions.
    pub fn submit(&mut self, want: usize) -> io::Result<usize> {
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
    pub fn submit_wait_timeout(&mut self, timeout: std::time::Duration) -> io::Result<usize> {
        loop {
            match self.enter(1, Some(timeout)) {
                Ok(n) => return Ok(n),
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EBUSY)) => return Ok(0),
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves all available CQEs into `out` as (user_data, result).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32, u32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn elems(tags: &[u16], flags: u16) -> Vec<u8> {
        let mut v = Vec::new();
        for &tag in tags {
            uapi::push_batch_elem(&mut v, flags, ElemHeader { tag, buf_index: tag, result: 0 }, 0x1000);
        }
        v
    }

    /// Buffer mode `none`: no region, no buffer table, and target reads/writes are
    /// refused. Needs io_uring; skipped where the sandbox has none.
    /// A `none`-mode ring of depth 4 (the char device slot holds /dev/null) with the
    /// wake-up eventfd `wake`; None where the sandbox has no io_uring (the test is skipped).
    fn none_ring(wake: OwnedFd) -> Option<SqWriter> {
        let null = std::fs::File::open("/dev/null").unwrap();
        let setup = RingSetup { ring: None, mode: BufferMode::NoData, region: None, batch: false, offload_min: None };
        SqWriter::new(0, 4, 4096, setup, wake, null.as_raw_fd(), &[])
            .inspect_err(|e| eprintln!("no io_uring here ({e}): skipped"))
            .ok()
    }

    #[test]
    fn none_mode_refuses_target_rw() {
        let Ok(wake) = crate::sys::eventfd() else { return };
        let Some(mut sq) = none_ring(wake) else { return };
        assert!(sq.page_kind().is_none() && !sq.fixed_buffers());
        assert_eq!(sq.buf_addr(0), std::ptr::null_mut());
        for write in [false, true] {
            assert_eq!(sq.push_rw(write, 0, FileSlot(0), 0, 512, 0, 0, 0), Err(-libc::EINVAL));
        }
        assert_eq!(sq.target_inflight, 0);
        // A buffer region is refused in `none` mode.
        let Ok(wake) = crate::sys::eventfd() else { return };
        let region = Region::new(4 * 4096, false).unwrap();
        let setup =
            RingSetup { ring: None, mode: BufferMode::NoData, region: Some(region), batch: false, offload_min: None };
        let null = std::fs::File::open("/dev/null").unwrap();
        let e = SqWriter::new(0, 4, 4096, setup, wake, null.as_raw_fd(), &[]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    /// The queue's own `io_uring_enter` (registered ring fd, EXT_ARG timeout): a wait
    /// with nothing in flight times out, and the wake-up read completes once the eventfd
    /// is signalled. Needs io_uring; skipped where the sandbox has none.
    #[test]
    fn enter_waits_and_completes() {
        let Ok(wake) = crate::sys::eventfd() else { return };
        let signal = wake.try_clone().unwrap();
        let Some(mut sq) = none_ring(wake) else { return };
        assert!(sq.ring_fd_registered(), "IORING_REGISTER_RING_FDS failed");
        assert_eq!(sq.ring_mode, RingMode::CoopTaskrun);
        let mut cqes = Vec::new();
        // Nothing queued, nothing in flight: the wait ends at its timeout.
        assert_eq!(sq.submit_wait_timeout(std::time::Duration::from_millis(20)).unwrap(), 0);
        sq.reap(&mut cqes);
        assert!(cqes.is_empty());
        // The armed read is submitted (1 SQE) and waits; a signal completes it.
        sq.push_wake().unwrap();
        assert_eq!(sq.submit_wait_timeout(std::time::Duration::from_millis(20)).unwrap(), 1);
        use std::os::fd::AsFd;
        crate::sys::eventfd_add(signal.as_fd(), 5).unwrap();
        while cqes.is_empty() {
            sq.submit(1).unwrap();
            sq.reap(&mut cqes);
        }
        assert_eq!(cqes.len(), 1);
        assert_eq!(tag::decode(cqes[0].0).map(|(k, _, _)| k), Some(Kind::Wake));
        assert_eq!(cqes[0].1, 8);
        assert_eq!(sq.wake_value(), 5);
    }

    #[test]
    fn commit_leftovers() {
        for flags in [0, uapi::BATCH_F_HAS_BUF_ADDR] {
            let eb = uapi::batch_elem_bytes(flags);
            let v = elems(&[4, 5, 6], flags);
            // All taken.
            assert_eq!(commit_leftover(&v, eb, v.len() as i32), (v.len()..v.len(), None));
            // One taken: the rest goes again, starting with the one refused.
            assert_eq!(commit_leftover(&v, eb, eb as i32), (eb..v.len(), None));
            // None taken: the first is dropped (refused), the rest goes again.
            assert_eq!(commit_leftover(&v, eb, -libc::EBUSY), (eb..v.len(), Some((4, -libc::EBUSY))));
            let one = elems(&[9], flags);
            assert_eq!(commit_leftover(&one, eb, -libc::EINVAL), (eb..eb, Some((9, -libc::EINVAL))));
        }
    }
}
