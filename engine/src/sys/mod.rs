//! The raw kernel boundary: thin, checked wrappers over libc. No policy lives here.

pub mod features;
pub mod mmap;
pub mod uapi;
pub(crate) mod uring;

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// Turns a -1 return into the thread's `errno` as an `io::Error`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

pub fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ps = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(ps).ok().filter(|&p| p > 0).unwrap_or(4096)
}

pub fn geteuid() -> u32 {
    // SAFETY: geteuid cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

pub fn getpid() -> i32 {
    std::process::id().cast_signed()
}

pub fn gettid() -> i32 {
    // SAFETY: gettid cannot fail and touches no memory of ours.
    unsafe { libc::gettid() }
}

/// CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size passed.
    cvt(unsafe { libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &raw mut set) })?;
    Ok(cpuset_to_vec(&set))
}

fn cpuset_to_vec(set: &libc::cpu_set_t) -> Vec<usize> {
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `cpu` is below CPU_SETSIZE, so CPU_ISSET stays inside the set.
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, set) })
        .collect()
}

/// Decodes a kernel cpumask given as raw bytes (as GET_QUEUE_AFFINITY returns it).
pub fn cpumask_bytes_to_vec(bytes: &[u8]) -> Vec<usize> {
    let mut cpus = Vec::new();
    for (i, byte) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if byte & (1 << bit) != 0 {
                cpus.push(i * 8 + bit);
            }
        }
    }
    cpus
}

/// Binds the calling thread to `cpus`.
pub fn set_thread_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} out of range")));
        }
        // SAFETY: `cpu` was checked to be below CPU_SETSIZE.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    cvt(unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set) })?;
    Ok(())
}

/// Marks the calling thread as an IO flusher (it serves writeback: reclaim must not
/// recurse into it), as `PR_SET_IO_FLUSHER` does.
pub fn set_io_flusher() -> io::Result<()> {
    const PR_SET_IO_FLUSHER: libc::c_int = 57;
    // SAFETY: prctl with integer arguments only; no memory is passed.
    cvt(unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) })?;
    Ok(())
}

/// A non-blocking eventfd used to wake a queue thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = cvt(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds `value` to an eventfd's counter.
pub fn eventfd_add(fd: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    // SAFETY: writes 8 bytes from a live local u64 to an open eventfd.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&raw const value).cast(), 8) };
    if n == 8 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Stops the whole process (SIGSTOP) until a SIGCONT or SIGKILL.
pub fn stop_self() {
    // SAFETY: raise has no memory-safety preconditions.
    unsafe { libc::raise(libc::SIGSTOP) };
}

/// Restores the default SIGPIPE action (the Rust runtime ignores it), so a report
/// piped into `head` ends quietly when the reader goes away instead of failing a write.
/// Only for short-lived commands: a serving daemon must not die of a closed stdout.
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition; no handler code runs in this process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// Does a process with this pid exist?
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub fn send_signal(pid: i32, sig: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes no pointers.
    cvt(unsafe { libc::kill(pid, sig) })?;
    Ok(())
}

/// Blocks `signals` in the calling thread; threads spawned after inherit the mask.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    let set = sigset(signals)?;
    // SAFETY: `set` is an initialised sigset; the old mask is not requested.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &raw const set, std::ptr::null_mut()) };
    if r == 0 { Ok(()) } else { Err(io::Error::from_raw_os_error(r)) }
}

fn sigset(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable sigset_t.
    cvt(unsafe { libc::sigemptyset(&raw mut set) })?;
    for &s in signals {
        // SAFETY: `set` is a valid sigset_t; an invalid signal number is an error return.
        cvt(unsafe { libc::sigaddset(&raw mut set, s) })?;
    }
    Ok(set)
}

/// Waits up to `timeout` for one of `signals` (which must be blocked). Returns it, or None.
pub fn wait_signal(signals: &[libc::c_int], timeout: Duration) -> io::Result<Option<libc::c_int>> {
    let set = sigset(signals)?;
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos().cast_signed()),
    };
    // SAFETY: `set` and `ts` are valid for the call; siginfo is not requested.
    let r = unsafe { libc::sigtimedwait(&raw const set, std::ptr::null_mut(), &raw const ts) };
    if r >= 0 {
        return Ok(Some(r));
    }
    match io::Error::last_os_error() {
        e if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => Ok(None),
        e => Err(e),
    }
}

// Block device ioctls (linux/fs.h).
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKPBSZGET: libc::c_ulong = 0x127b;
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// Size in bytes of an open block device.
pub fn blk_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer, which is a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKGETSIZE64, &raw mut size) })?;
    Ok(size)
}

/// Logical and physical block sizes of an open block device.
pub fn blk_block_sizes(fd: BorrowedFd<'_>) -> io::Result<(u32, u32)> {
    let mut logical: libc::c_int = 0;
    let mut physical: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one int to the pointer, which is a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKSSZGET, &raw mut logical) })?;
    // SAFETY: BLKPBSZGET writes one unsigned int to the pointer, which is a live local.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKPBSZGET, &raw mut physical) })?;
    Ok((logical.cast_unsigned(), physical))
}

/// Discards `[offset, offset + len)` of an open block device (synchronous).
pub fn blk_discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [offset, len];
    // SAFETY: BLKDISCARD reads two u64 from the pointer, a live local array.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), BLKDISCARD, range.as_ptr()) })?;
    Ok(())
}

/// `fallocate(2)` on an open file (synchronous).
pub fn fallocate(fd: BorrowedFd<'_>, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fallocate takes no pointers; the fd is borrowed, so it is open.
    cvt(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpumask_decoding() {
        assert_eq!(cpumask_bytes_to_vec(&[0b0000_0101, 0, 0b1000_0000]), [0, 2, 23]);
        assert!(cpumask_bytes_to_vec(&[0; 16]).is_empty());
    }

    #[test]
    fn this_thread_has_cpus_and_can_pin() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        // Pinning to what we already have must succeed; pinning to nothing must fail.
        std::thread::spawn(move || {
            set_thread_affinity(&cpus[..1]).unwrap();
            assert_eq!(allowed_cpus().unwrap(), &cpus[..1]);
            assert!(set_thread_affinity(&[]).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn eventfd_roundtrip_and_pid_checks() {
        let fd = eventfd().unwrap();
        use std::os::fd::AsFd;
        eventfd_add(fd.as_fd(), 1).unwrap();
        let mut buf = [0u8; 8];
        let f = std::fs::File::from(fd);
        use std::io::Read;
        (&f).read_exact(&mut buf).unwrap();
        assert_eq!(u64::from_ne_bytes(buf), 1);
        assert!(pid_alive(getpid()));
        assert!(!pid_alive(0));
        assert!(!pid_alive(i32::MAX));
    }
}
