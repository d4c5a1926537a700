//! The target interface: what a backend (loop, null, ...) implements.
//!
//! A [`Target`] describes the device and opens one [`QueueTarget`] per queue thread.
//! A queue target handles requests asynchronously: it pushes its own SQEs onto the
//! queue's ring through [`IoCtx`] and returns [`Disposition::Pending`], and is called
//! back with each completion; or it finishes at once with [`Disposition::Done`].
//! The per-request path builds no `Error`: results are bytes done or `-errno`.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use crate::queue::ring::SqWriter;

/// Static properties of the device a target serves.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TargetInfo {
    /// Device size in bytes (a multiple of `logical_block_size`).
    pub dev_size: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub read_only: bool,
    pub rotational: bool,
    /// The backend has a volatile write cache: the kernel sends FLUSH (and FUA).
    pub volatile_cache: bool,
    /// DISCARD / WRITE_ZEROES support, if any.
    pub discard: Option<DiscardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiscardInfo {
    pub granularity: u32,
    pub max_discard_sectors: u32,
    pub max_write_zeroes_sectors: u32,
}

/// A device-wide target. Shared by all queue threads.
pub trait Target: Send + Sync + fmt::Debug {
    /// Short name (`loop`, `null`).
    fn name(&self) -> &'static str;
    fn info(&self) -> &TargetInfo;
    /// JSON description for `list` and the state file (backing path, IO mode...).
    fn describe(&self) -> serde_json::Value;
    /// Called on queue thread `q_id`, after it is pinned, before any request.
    fn open_queue(&self, q_id: u16, setup: &mut QueueSetup) -> io::Result<Box<dyn QueueTarget>>;
    /// Whether the target reads or writes request data. A target that never does
    /// (null) returns false: `--buffer-mode auto` then has the kernel move no data at
    /// all (buffer mode `none`, UBLK_F_USER_COPY), and [`IoCtx::read`]/[`IoCtx::write`]
    /// fail with `-EINVAL` in that mode.
    fn moves_data(&self) -> bool {
        true
    }
}

/// A per-queue-thread target instance.
pub trait QueueTarget {
    /// Starts `req`. Either finishes it now or pushes SQEs through `io` and returns Pending.
    fn submit(&mut self, req: &IoRequest, io: &mut IoCtx<'_>) -> Disposition;
    /// One of this request's SQEs completed with `res`. `cookie` is what was passed at push.
    fn complete(&mut self, req: &IoRequest, cookie: u16, res: i32, io: &mut IoCtx<'_>) -> Disposition;
}

/// What became of a request after a target call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Finished: bytes transferred (or 0) on success, `-errno` on failure.
    Done(i32),
    /// SQEs are in flight; `complete` will be called.
    Pending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Op {
    Read,
    Write,
    Flush,
    Discard,
    WriteZeroes,
}

/// A validated request, decoded from the kernel's descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoRequest {
    pub tag: u16,
    pub op: Op,
    /// `UBLK_IO_F_*` flags.
    pub flags: u32,
    /// Byte offset on the device.
    pub offset: u64,
    /// Length in bytes (0 for FLUSH).
    pub len: u64,
}

impl IoRequest {
    /// Forced unit access: the write must be durable when it completes.
    pub fn fua(&self) -> bool {
        self.flags & crate::sys::uapi::IO_F_FUA != 0
    }
    /// WRITE_ZEROES must not deallocate.
    pub fn no_unmap(&self) -> bool {
        self.flags & crate::sys::uapi::IO_F_NOUNMAP != 0
    }
}

/// Index of a file in the queue ring's registered file table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileSlot(pub(crate) u32);

/// Collects the files a queue target will use, to register them with the ring.
#[derive(Debug, Default)]
pub struct QueueSetup {
    pub(crate) fds: Vec<RawFd>,
}

impl QueueSetup {
    /// Registers `fd` with the queue's ring. The ring holds its own reference to the
    /// open file, so the caller may close `fd` afterwards.
    pub fn add_file(&mut self, fd: BorrowedFd<'_>) -> FileSlot {
        // Slot 0 is the ublk char device.
        let slot = FileSlot(u32::try_from(self.fds.len() + 1).unwrap_or(u32::MAX));
        self.fds.push(fd.as_raw_fd());
        slot
    }
}

/// The submission context of one request: its data buffer and the ring.
///
/// Every SQE pushed here carries the request's tag and the given cookie, and moves
/// data to or from this request's own buffer only, so a target needs no `unsafe`.
pub struct IoCtx<'a> {
    pub(crate) sq: &'a mut SqWriter,
    pub(crate) tag: u16,
}

impl fmt::Debug for IoCtx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IoCtx").field("tag", &self.tag).finish()
    }
}

impl IoCtx<'_> {
    /// Reads `len` bytes at file offset `offset` into the request buffer at `buf_off`.
    /// `-EINVAL` in buffer mode `none` (there is no buffer).
    pub fn read(&mut self, file: FileSlot, buf_off: u32, len: u32, offset: u64, cookie: u16) -> Result<(), i32> {
        self.sq.push_rw(false, self.tag, file, buf_off, len, offset, 0, cookie)
    }

    /// Writes `len` bytes of the request buffer at `buf_off` to file offset `offset`.
    /// `dsync` makes the write durable before it completes (RWF_DSYNC). `-EINVAL` in
    /// buffer mode `none`.
    pub fn write(
        &mut self,
        file: FileSlot,
        buf_off: u32,
        len: u32,
        offset: u64,
        dsync: bool,
        cookie: u16,
    ) -> Result<(), i32> {
        let flags = if dsync { libc::RWF_DSYNC } else { 0 };
        self.sq.push_rw(true, self.tag, file, buf_off, len, offset, flags, cookie)
    }

    pub fn fsync(&mut self, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        self.sq.push_fsync(self.tag, file, datasync, cookie)
    }

    /// A timer: completes with `-ETIME` after `after` (or `-ECANCELED` if the queue
    /// is torn down first). Fault injection uses it to delay and stall requests.
    pub fn sleep(&mut self, after: std::time::Duration, cookie: u16) -> Result<(), i32> {
        self.sq.push_timeout(self.tag, after, cookie)
    }

    pub fn fallocate(&mut self, file: FileSlot, mode: i32, offset: u64, len: u64, cookie: u16) -> Result<(), i32> {
        self.sq.push_fallocate(self.tag, file, mode, offset, len, cookie)
    }
}
