//! The raw io_uring contact the `io-uring` crate does not cover: a registered ring fd
//! and the `io_uring_enter` that uses it, and SQE fields its builders have no setter for.

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use io_uring::{IoUring, squeue};

// io_uring_register / io_uring_enter (linux/io_uring.h).
const IORING_REGISTER_RING_FDS: libc::c_long = 20;
const IORING_UNREGISTER_RING_FDS: libc::c_long = 21;
const IORING_ENTER_GETEVENTS: u32 = 1 << 0;
const IORING_ENTER_EXT_ARG: u32 = 1 << 3;
const IORING_ENTER_REGISTERED_RING: u32 = 1 << 4;
/// `IORING_URING_CMD_MULTISHOT` (sqe->uring_cmd_flags).
const URING_CMD_MULTISHOT: u32 = 1 << 1;

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
    // The SQE fields patched by `uring_cmd_multishot`.
    assert!(size_of::<squeue::Entry>() == 64);
};

/// Registers the ring's own fd with this thread's io_uring context
/// (IORING_REGISTER_RING_FDS): [`enter`] then takes the returned index with
/// IORING_ENTER_REGISTERED_RING, and skips the fd table lookup (and its reference
/// count) on every call. io-uring's `Submitter` keeps such a registration only for its
/// own lifetime, so the queue does its own enter.
pub(crate) fn register_ring_fd(ring: &IoUring) -> io::Result<u32> {
    let mut up = RsrcUpdate { offset: u32::MAX, resv: 0, data: ring.as_raw_fd() as u64 };
    match ring_fds(ring, IORING_REGISTER_RING_FDS, &mut up)? {
        1 => Ok(up.offset),
        _ => Err(io::Error::other("IORING_REGISTER_RING_FDS registered nothing")),
    }
}

/// Undoes [`register_ring_fd`] (the registration holds a reference on the ring).
pub(crate) fn unregister_ring_fd(ring: &IoUring, index: u32) -> io::Result<()> {
    let mut up = RsrcUpdate { offset: index, resv: 0, data: 0 };
    ring_fds(ring, IORING_UNREGISTER_RING_FDS, &mut up).map(drop)
}

/// IORING_(UN)REGISTER_RING_FDS `op` with one entry, `up` (the kernel writes the index
/// it picked into `up.offset` on registration). Returns the number of entries done.
fn ring_fds(ring: &IoUring, op: libc::c_long, up: &mut RsrcUpdate) -> io::Result<libc::c_long> {
    // SAFETY: one live, writable io_uring_rsrc_update is passed; the kernel keeps no
    // pointer to it past the call.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_register, ring.as_raw_fd(), op, std::ptr::from_mut(up), 1) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// `io_uring_enter`: submits every queued SQE and, with `want` > 0, waits for that
/// many completions (at most `timeout`). `index` is the registered ring fd, if any.
/// Returns the number of SQEs submitted.
///
/// # Safety
/// Every SQE queued on `ring` must name memory that stays valid until its CQE is reaped.
pub(crate) unsafe fn enter(
    ring: &mut IoUring,
    index: Option<u32>,
    want: u32,
    timeout: Option<Duration>,
) -> io::Result<usize> {
    let (to_submit, mut flags) = {
        let sq = ring.submission();
        // A CQ overflow backlog or pending task work is only flushed by GETEVENTS.
        let get = want > 0 || sq.cq_overflow() || sq.taskrun();
        (sq.len() as u32, if get { IORING_ENTER_GETEVENTS } else { 0 })
    };
    let ts = timeout.map(|t| KernelTimespec {
        tv_sec: i64::try_from(t.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(t.subsec_nanos()),
    });
    let arg =
        ts.as_ref().map(|ts| GeteventsArg { sigmask: 0, sigmask_sz: 0, min_wait_usec: 0, ts: (&raw const *ts) as u64 });
    let (arg_ptr, arg_len) = match &arg {
        Some(a) => {
            flags |= IORING_ENTER_EXT_ARG;
            ((&raw const *a).cast::<libc::c_void>(), size_of::<GeteventsArg>())
        }
        None => (std::ptr::null(), 0),
    };
    let fd = match index {
        Some(i) => {
            flags |= IORING_ENTER_REGISTERED_RING;
            i as libc::c_long
        }
        None => libc::c_long::from(ring.as_raw_fd()),
    };
    // SAFETY: every SQE queued names memory that outlives it (this function's contract);
    // `arg`, when given, is a live io_uring_getevents_arg pointing at a live timespec,
    // both read by the kernel during this call only.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, to_submit, want, flags, arg_ptr, arg_len) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r as usize) }
}

/// Makes a uring_cmd SQE multishot, picking its buffers from group `bgid`: the
/// builder has no setter for either (uring_cmd_flags at byte 28, buf_group at byte 40
/// of struct io_uring_sqe).
pub(crate) fn uring_cmd_multishot(sqe: squeue::Entry, bgid: u16) -> squeue::Entry {
    // SAFETY: `Entry` is `repr(C)` around the 64-byte `io_uring_sqe` (size asserted
    // above), plain integers.
    let mut raw: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(sqe) };
    let cmd_flags = u32::from_ne_bytes([raw[28], raw[29], raw[30], raw[31]]) | URING_CMD_MULTISHOT;
    raw[28..32].copy_from_slice(&cmd_flags.to_ne_bytes());
    raw[40..42].copy_from_slice(&bgid.to_ne_bytes());
    // SAFETY: any 64 bytes are a valid `io_uring_sqe` (integers and unions of them).
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(raw) }
}
