//! The queue thread's io_uring and its per-tag buffers: the only place SQEs are pushed.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, opcode, squeue, types};

use super::tag::{self, Kind};
use crate::sys::mmap::Region;
use crate::sys::uapi::{self, IoCmd};
use crate::target::FileSlot;

/// How the ring was set up (reported at startup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RingMode {
    /// IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN.
    DeferTaskrun,
    /// IORING_SETUP_COOP_TASKRUN.
    CoopTaskrun,
    Plain,
}

/// Owns the ring and the buffers its SQEs point into.
///
/// Field order matters: `ring` is declared (and so dropped) before `bufs`, and the
/// queue loop never returns while a target SQE is in flight, so no SQE outlives the
/// memory it names.
pub struct SqWriter {
    ring: IoUring,
    bufs: Region,
    wake_fd: OwnedFd,
    wake_buf: Box<u64>,
    q_id: u16,
    depth: u16,
    buf_size: u32,
    fixed_bufs: bool,
    pub(crate) mode: RingMode,
    /// Target SQEs pushed whose CQE has not been reaped.
    pub(crate) target_inflight: u32,
    /// SQEs pushed since the last submit.
    pub(crate) queued: u32,
    pub(crate) submits: u64,
    pub(crate) submitted: u64,
}

impl std::fmt::Debug for SqWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqWriter").field("q_id", &self.q_id).field("mode", &self.mode).finish()
    }
}

fn build_ring(entries: u32) -> io::Result<(IoUring, RingMode)> {
    let cq = entries * 2;
    if let Ok(r) = IoUring::builder().setup_single_issuer().setup_defer_taskrun().setup_cqsize(cq).build(entries) {
        return Ok((r, RingMode::DeferTaskrun));
    }
    if let Ok(r) = IoUring::builder().setup_coop_taskrun().setup_cqsize(cq).build(entries) {
        return Ok((r, RingMode::CoopTaskrun));
    }
    Ok((IoUring::builder().setup_cqsize(cq).build(entries)?, RingMode::Plain))
}

impl SqWriter {
    /// Builds the ring for one queue: registers `/dev/ublkcN` (slot 0) and the target's
    /// files, and tries to register the per-tag buffers as fixed buffers.
    pub fn new(
        q_id: u16,
        depth: u16,
        buf_size: u32,
        bufs: Region,
        wake_fd: OwnedFd,
        cdev: RawFd,
        files: &[RawFd],
    ) -> io::Result<Self> {
        let entries = (u32::from(depth) * 2).next_power_of_two().max(8);
        let (ring, mode) = build_ring(entries)?;
        let mut all = vec![cdev];
        all.extend_from_slice(files);
        ring.submitter().register_files(&all)?;
        let iovecs: Vec<libc::iovec> = (0..depth)
            .map(|t| libc::iovec {
                // SAFETY: t < depth and the region holds depth * buf_size bytes.
                iov_base: unsafe { bufs.as_ptr().add(usize::from(t) * buf_size as usize) }.cast(),
                iov_len: buf_size as usize,
            })
            .collect();
        // SAFETY: the iovecs name memory owned by `bufs`, which this struct keeps alive
        // longer than the ring (field order); the kernel pins the pages it registers.
        let fixed_bufs = match unsafe { ring.submitter().register_buffers(&iovecs) } {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(q_id, "registering fixed buffers failed ({e}); using plain reads/writes");
                false
            }
        };
        Ok(Self {
            ring,
            bufs,
            wake_fd,
            wake_buf: Box::new(0),
            q_id,
            depth,
            buf_size,
            fixed_bufs,
            mode,
            target_inflight: 0,
            queued: 0,
            submits: 0,
            submitted: 0,
        })
    }

    pub fn fixed_buffers(&self) -> bool {
        self.fixed_bufs
    }
    pub fn page_kind(&self) -> crate::sys::mmap::PageKind {
        self.bufs.kind()
    }

    fn buf_addr(&self, tag: u16) -> *mut u8 {
        debug_assert!(tag < self.depth);
        // SAFETY: tag < depth (callers check), so the offset stays inside the region.
        unsafe { self.bufs.as_ptr().add(usize::from(tag) * self.buf_size as usize) }
    }

    /// Pushes one SQE, flushing the SQ to the kernel first if it is full.
    ///
    /// # Safety
    /// Every buffer the SQE points at must stay valid until its CQE is reaped.
    unsafe fn push(&mut self, sqe: &squeue::Entry) -> Result<(), i32> {
        for _ in 0..2 {
            // SAFETY: forwarded from this function's contract.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.queued += 1;
                return Ok(());
            }
            self.submit(0).map_err(|e| -e.raw_os_error().unwrap_or(libc::EIO))?;
        }
        Err(-libc::EBUSY)
    }

    /// FETCH_REQ (result None) or COMMIT_AND_FETCH_REQ (result Some) for `tag`.
    pub fn push_ublk(&mut self, tag: u16, result: Option<i32>) -> Result<(), i32> {
        let (op, res) = match result {
            None => (uapi::IO_FETCH_REQ, 0),
            Some(r) => (uapi::IO_COMMIT_AND_FETCH_REQ, r),
        };
        let cmd = IoCmd { q_id: self.q_id, tag, result: res, addr: self.buf_addr(tag) as u64 };
        let sqe = opcode::UringCmd16::new(types::Fixed(0), op).cmd(cmd.to_bytes()).build().user_data(tag::encode(
            Kind::Ublk,
            tag,
            0,
        ));
        // SAFETY: the command is inline; `addr` is this tag's buffer inside `self.bufs`,
        // which outlives the ring. Slot 0 is the registered char device.
        unsafe { self.push(&sqe) }
    }

    /// Arms the wake-up read on the eventfd.
    pub fn push_wake(&mut self) -> Result<(), i32> {
        let ptr: *mut u64 = &raw mut *self.wake_buf;
        let sqe = opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), ptr.cast(), 8).build().user_data(tag::encode(
            Kind::Wake,
            0,
            0,
        ));
        // SAFETY: `wake_buf` is heap memory owned by self (stable address), dropped after
        // the ring; `wake_fd` is open for the life of self.
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
        if tag >= self.depth || u64::from(buf_off) + u64::from(len) > u64::from(self.buf_size) {
            return Err(-libc::EINVAL);
        }
        // SAFETY: buf_off + len <= buf_size was checked, so the range is inside this tag's buffer.
        let ptr = unsafe { self.buf_addr(tag).add(buf_off as usize) };
        let fd = types::Fixed(file.0);
        let ud = tag::encode(Kind::Target, tag, cookie);
        let sqe = match (write, self.fixed_bufs) {
            (false, true) => opcode::ReadFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
            (false, false) => opcode::Read::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
            (true, true) => opcode::WriteFixed::new(fd, ptr, len, tag).offset(offset).rw_flags(rw_flags).build(),
            (true, false) => opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
        };
        // SAFETY: the range is inside this tag's buffer (checked above), which lives as
        // long as the ring; the request stays in the target until this CQE is reaped.
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

    /// Submits everything queued, waiting for at least `want` completions.
    pub fn submit(&mut self, want: usize) -> io::Result<usize> {
        loop {
            match self.ring.submit_and_wait(want) {
                Ok(n) => {
                    self.submits += 1;
                    self.submitted += n as u64;
                    self.queued = 0;
                    return Ok(n);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && want > 0 => {
                    // CQ overflow backlog: reap first, then submit again.
                    return Ok(0);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Moves all available CQEs into `out` as (user_data, result).
    pub fn reap(&mut self, out: &mut Vec<(u64, i32)>) {
        out.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
    }
}
