//! The SQEs a target pushes: reads and writes between a file and the request's own
//! buffer, sends and receives between a socket and the request buffer or memory the
//! target owns, fsync, fallocate, timers. [`TargetSq`] is the seam between the target
//! API's `IoCtx` and the ring (the reactor's tests put a fake behind it).

use std::ptr::NonNull;
use std::time::Duration;

use io_uring::{opcode, squeue, types};

use super::{Kind, QueueRing, tag};
use crate::buf::BufferMode;
use crate::request::{FileSlot, Mem, MemId};

/// Who an SQE belongs to: its completion goes to that request's `complete`, or to the
/// queue target's `queue_complete`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    Request(u16),
    Queue,
}

/// A read or write between a registered file and the request's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Rw {
    pub(crate) write: bool,
    pub(crate) file: FileSlot,
    /// Offset in the request buffer.
    pub(crate) buf_off: u32,
    pub(crate) len: u32,
    /// Offset in the file.
    pub(crate) offset: u64,
    /// `RWF_*` flags.
    pub(crate) rw_flags: i32,
}

/// A send or receive on a registered socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Sock {
    pub(crate) send: bool,
    pub(crate) file: FileSlot,
    pub(crate) mem: Mem,
    /// `MSG_*` flags.
    pub(crate) flags: i32,
}

/// The SQEs a target may push; each completion comes back to the owner with `cookie`.
/// Errors are `-errno`.
pub(crate) trait TargetSq {
    fn rw(&mut self, tag: u16, rw: Rw, cookie: u16) -> Result<(), i32>;
    fn sock(&mut self, owner: Owner, io: Sock, cookie: u16) -> Result<(), i32>;
    fn fsync(&mut self, owner: Owner, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32>;
    fn fallocate(&mut self, owner: Owner, file: FileSlot, range: (i32, u64, u64), cookie: u16) -> Result<(), i32>;
    /// Completes with `-ETIME` after `after`.
    fn timeout(&mut self, owner: Owner, after: Duration, cookie: u16) -> Result<(), i32>;
    /// The next SQE pushed is linked to the one pushed after it (IOSQE_IO_LINK).
    fn link_next(&mut self) -> Result<(), i32>;
    /// Target memory `id`, unless an SQE in flight names it.
    fn mem(&mut self, id: MemId) -> Option<&mut [u8]>;
    /// Copies `src` to `dst` (zeroes `dst` if `src` is None); `Mem::Request` is request
    /// `tag`'s buffer, which the caller has checked is the target's with no SQE in
    /// flight. Target memory named by an SQE in flight is `-EBUSY`.
    fn copy(&mut self, tag: Option<u16>, dst: Mem, src: Option<Mem>) -> Result<(), i32>;
    /// Points registered file `file` at `fd` (IORING_REGISTER_FILES_UPDATE); SQEs in
    /// flight keep the file they were pushed with.
    fn update_file(&mut self, file: FileSlot, fd: std::os::fd::RawFd) -> Result<(), i32>;
    /// Bytes `0..len` of request `tag`'s buffer (buffer mode copy), for a target that
    /// moves the data itself. The caller checked that no SQE of the request is in flight.
    fn request_buf(&mut self, tag: u16, len: u32) -> Result<&mut [u8], i32>;
}

/// Memory a target owns, allocated with the ring and named by its SQEs.
pub(crate) struct OwnedMem {
    ptr: NonNull<u8>,
    len: usize,
    /// SQEs in flight that name it (the kernel may read or write it meanwhile).
    pub(super) inflight: u32,
}

impl OwnedMem {
    pub(super) fn new(len: u32) -> Self {
        let b: Box<[u8]> = vec![0u8; len.max(1) as usize].into_boxed_slice();
        let len = b.len();
        let ptr = NonNull::new(Box::into_raw(b).cast::<u8>()).unwrap_or(NonNull::dangling());
        Self { ptr, len, inflight: 0 }
    }

    /// The pointer and length of `off..off + len`, or EINVAL past the end.
    fn range(&self, off: u32, len: u32) -> Result<*mut u8, i32> {
        if u64::from(off) + u64::from(len) > self.len as u64 {
            return Err(-libc::EINVAL);
        }
        Ok(self.ptr.as_ptr().wrapping_add(off as usize))
    }
}

impl Drop for OwnedMem {
    fn drop(&mut self) {
        // With an SQE still in flight the kernel may write here after the ring closes
        // (its teardown is asynchronous): such memory is never freed.
        if self.inflight == 0 {
            let raw = std::ptr::slice_from_raw_parts_mut(self.ptr.as_ptr(), self.len);
            // SAFETY: `raw` is the Box<[u8]> leaked in `new`, freed once, here; nothing
            // names it any more (no SQE in flight, and `mem` borrows end with &mut self).
            drop(unsafe { Box::from_raw(raw) });
        }
    }
}

impl QueueRing {
    /// The user_data kind and tag of an SQE of `owner`.
    fn owned_by(owner: Owner) -> (Kind, u16) {
        match owner {
            Owner::Request(tag) => (Kind::Target, tag),
            Owner::Queue => (Kind::QueueIo, 0),
        }
    }

    /// Pushes a target SQE (linked to the next one if asked), naming target memory `mem`.
    fn push_target(&mut self, sqe: squeue::Entry, owner: Owner, cookie: u16, mem: Option<MemId>) -> Result<(), i32> {
        let (kind, tag) = Self::owned_by(owner);
        let sqe = if std::mem::take(&mut self.link_pending) { sqe.flags(squeue::Flags::IO_LINK) } else { sqe };
        let sqe = sqe.user_data(tag::encode_mem(kind, tag, cookie, mem.map(|m| m.0)));
        // SAFETY: the callers' contract: what the SQE names lives until its CQE is reaped
        // (request buffers and target memory live as long as the ring, and are leaked if
        // it goes with the SQE in flight).
        unsafe { self.push(&sqe) }?;
        if let Some(m) = mem {
            self.owned[usize::from(m.0)].inflight += 1;
        }
        Ok(())
    }
}

impl QueueRing {
    /// Where bytes `off..off + len` of request `tag`'s data are in memory of ours: in the
    /// shared memory for a SHMEM_ZC request, else in the tag's buffer (copy and user-copy
    /// modes; `-EOPNOTSUPP` in the others). `writing`: the caller will write there, which
    /// read-only shared memory refuses (`-EROFS`).
    fn request_addr(&self, tag: u16, off: u32, len: u32, writing: bool) -> Result<*mut u8, i32> {
        if tag >= self.depth || u64::from(off) + u64::from(len) > u64::from(self.buf_size) {
            return Err(-libc::EINVAL);
        }
        if let Some(at) = self.shared_at[usize::from(tag)] {
            let sh = self.shmem.as_ref().ok_or(-libc::EIO)?;
            if writing && sh.map.read_only() {
                return Err(-libc::EROFS);
            }
            return sh.range(u64::from(at) + u64::from(off), u64::from(len)).ok_or(-libc::EIO);
        }
        if !self.mode.needs_buffers() {
            return Err(-libc::EOPNOTSUPP);
        }
        Ok(self.buf_addr(tag).wrapping_add(off as usize))
    }

    /// A target read or write of a SHMEM_ZC request: on the shared memory, with the fixed
    /// form where the range is inside one of its buffer-table pieces.
    fn shared_rw(&self, tag: u16, at: u32, rw: Rw) -> Result<squeue::Entry, i32> {
        let Rw { write, file, buf_off, len, offset, rw_flags } = rw;
        let ptr = self.request_addr(tag, buf_off, len, !write)?;
        let start = u64::from(at) + u64::from(buf_off);
        let piece = start / super::SHMEM_CHUNK;
        let fixed = self
            .shmem_slot
            .filter(|_| len == 0 || (start + u64::from(len) - 1) / super::SHMEM_CHUNK == piece)
            .and_then(|slot| u16::try_from(u64::from(slot) + piece).ok());
        let fd = types::Fixed(file.0);
        Ok(match (write, fixed) {
            (false, Some(i)) => opcode::ReadFixed::new(fd, ptr, len, i).offset(offset).rw_flags(rw_flags).build(),
            (false, None) => opcode::Read::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
            (true, Some(i)) => opcode::WriteFixed::new(fd, ptr, len, i).offset(offset).rw_flags(rw_flags).build(),
            (true, None) => opcode::Write::new(fd, ptr, len).offset(offset).rw_flags(rw_flags).build(),
        })
    }

    /// The address of `mem` for a CPU copy: request `tag`'s buffer (copy mode) or
    /// target memory that no SQE in flight names.
    fn copy_addr(&self, tag: Option<u16>, mem: Mem, writing: bool) -> Result<(*mut u8, u32), i32> {
        match mem {
            Mem::Request { off, len } => {
                let tag = tag.ok_or(-libc::EINVAL)?;
                Ok((self.request_addr(tag, off, len, writing)?, len))
            }
            Mem::Owned { id, off, len } => {
                let m = self.owned.get(usize::from(id.0)).ok_or(-libc::EINVAL)?;
                if m.inflight > 0 {
                    return Err(-libc::EBUSY);
                }
                Ok((m.range(off, len)?, len))
            }
        }
    }
}

impl TargetSq for QueueRing {
    fn rw(&mut self, tag: u16, rw: Rw, cookie: u16) -> Result<(), i32> {
        let Rw { write, file, buf_off, len, offset, rw_flags } = rw;
        // `none`: there is no buffer to read into or write from.
        if !self.mode.moves_data()
            || tag >= self.depth
            || u64::from(buf_off) + u64::from(len) > u64::from(self.buf_size)
        {
            return Err(-libc::EINVAL);
        }
        let fd = types::Fixed(file.0);
        let sqe = if let Some(at) = self.shared_at[usize::from(tag)] {
            // SHMEM_ZC: the data is in the shared memory, nothing registered per request.
            self.shared_rw(tag, at, rw)?
        } else if self.mode.is_zero_copy() {
            if self.mode == BufferMode::ZeroCopy {
                // REGISTER_IO_BUF linked before the IO, both in one submission (with
                // the SQE this one is linked to, if any).
                self.register_request_buf(tag, if self.link_pending { 3 } else { 2 })?;
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
        // long as the ring; shared memory: inside the mapping, which lives as long as the
        // ring (leaked with it if IO is in flight). Zero-copy modes: the kernel owns the registered request pages,
        // and the request is not committed (so they stay registered) until this CQE is reaped.
        self.push_target(sqe, Owner::Request(tag), cookie, None)
    }

    fn sock(&mut self, owner: Owner, io: Sock, cookie: u16) -> Result<(), i32> {
        let (ptr, len, mem) = match io.mem {
            Mem::Request { off, len } => {
                let Owner::Request(tag) = owner else { return Err(-libc::EINVAL) };
                // Copy and user-copy modes (and shared memory) have request data in memory
                // of ours; a receive writes it.
                (self.request_addr(tag, off, len, !io.send)?, len, None)
            }
            Mem::Owned { id, off, len } => {
                let m = self.owned.get(usize::from(id.0)).ok_or(-libc::EINVAL)?;
                (m.range(off, len)?, len, Some(id))
            }
        };
        let fd = types::Fixed(io.file.0);
        let sqe = if io.send {
            opcode::Send::new(fd, ptr.cast_const(), len).flags(io.flags).build()
        } else {
            opcode::Recv::new(fd, ptr, len).flags(io.flags).build()
        };
        // The range is inside this tag's buffer or the target memory (checked), which
        // live as long as the ring.
        self.push_target(sqe, owner, cookie, mem)
    }

    fn fsync(&mut self, owner: Owner, file: FileSlot, datasync: bool, cookie: u16) -> Result<(), i32> {
        let flags = if datasync { types::FsyncFlags::DATASYNC } else { types::FsyncFlags::empty() };
        // Names no memory; the file is registered.
        self.push_target(opcode::Fsync::new(types::Fixed(file.0)).flags(flags).build(), owner, cookie, None)
    }

    fn fallocate(&mut self, owner: Owner, file: FileSlot, range: (i32, u64, u64), cookie: u16) -> Result<(), i32> {
        let (mode, offset, len) = range;
        let sqe = opcode::Fallocate::new(types::Fixed(file.0), len).offset(offset).mode(mode).build();
        // Names no memory; the file is registered.
        self.push_target(sqe, owner, cookie, None)
    }

    /// Names no memory past submission: the kernel copies the timespec when it
    /// prepares the SQE. Each request, and the queue, has one timer slot.
    fn timeout(&mut self, owner: Owner, after: Duration, cookie: u16) -> Result<(), i32> {
        let slot = match owner {
            Owner::Request(tag) => usize::from(tag),
            Owner::Queue => usize::from(self.depth),
        };
        let Some(ts) = self.timeouts.get_mut(slot) else { return Err(-libc::EINVAL) };
        *ts = types::Timespec::new().sec(after.as_secs()).nsec(after.subsec_nanos());
        let ptr: *const types::Timespec = ts;
        // `ptr` is a slot in `self.timeouts`, which is never resized and lives as long as
        // the ring; one timer per slot at a time, so it is not rewritten before the SQE
        // is submitted (the kernel copies it then).
        self.push_target(opcode::Timeout::new(ptr).count(0).build(), owner, cookie, None)
    }

    fn link_next(&mut self) -> Result<(), i32> {
        // The pair must go to the kernel in one submission.
        self.reserve(2)?;
        self.link_pending = true;
        Ok(())
    }

    fn mem(&mut self, id: MemId) -> Option<&mut [u8]> {
        let m = self.owned.get_mut(usize::from(id.0))?;
        if m.inflight > 0 {
            return None;
        }
        // SAFETY: the memory is the live allocation of `m` (`len` bytes); no SQE in flight
        // names it, so the kernel does not touch it, and the &mut borrow of self keeps it
        // unique until it ends.
        Some(unsafe { std::slice::from_raw_parts_mut(m.ptr.as_ptr(), m.len) })
    }

    fn copy(&mut self, tag: Option<u16>, dst: Mem, src: Option<Mem>) -> Result<(), i32> {
        let (to, len) = self.copy_addr(tag, dst, true)?;
        match src {
            Some(src) => {
                let (from, n) = self.copy_addr(tag, src, false)?;
                if n != len {
                    return Err(-libc::EINVAL);
                }
                // The request's buffer while the request is the target's with no SQE in
                // flight (the caller's check): neither the kernel nor an SQE touches it.
                // SAFETY: both ranges are inside live memory of this ring (copy_addr), the
                // request buffer as above or target memory no SQE names; `copy` allows overlap.
                unsafe { std::ptr::copy(from.cast_const(), to, len as usize) };
            }
            // SAFETY: as above, for the one range.
            None => unsafe { std::ptr::write_bytes(to, 0, len as usize) },
        }
        Ok(())
    }

    fn request_buf(&mut self, tag: u16, len: u32) -> Result<&mut [u8], i32> {
        // Writable: a read's data is written there (read-only shared memory refuses).
        let (ptr, len) = self.copy_addr(Some(tag), Mem::Request { off: 0, len }, true)?;
        // SAFETY: `0..len` is inside request `tag`'s live buffer (copy_addr, mode copy); no SQE
        // of the request is in flight (the caller's check), so nothing else touches it, and
        // the &mut borrow of self keeps the slice unique until it ends.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, len as usize) })
    }

    fn update_file(&mut self, file: FileSlot, fd: std::os::fd::RawFd) -> Result<(), i32> {
        // Slot 0 is the ublk char device, never a target's.
        if file.0 == 0 || file.0 >= self.nr_files {
            return Err(-libc::EINVAL);
        }
        match self.ring.submitter().register_files_update(file.0, &[fd]) {
            Ok(1) => Ok(()),
            Ok(_) => Err(-libc::EIO),
            Err(e) => Err(super::errno_of(&e)),
        }
    }
}
