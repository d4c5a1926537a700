//! The raw kernel boundary: thin, checked wrappers over the system calls the engine
//! makes. No policy lives here.
//!
//! Most of them are [`rustix`] (safe, typed, direct system calls, no errno juggling).
//! Kept on libc, and why:
//! - signal masks and waits (`pthread_sigmask`, `sigtimedwait`) and `signal(SIGPIPE)`:
//!   rustix has them only in its unstable, `doc(hidden)` `runtime` module, which
//!   bypasses libc's reserved signals and is unsound in a process that has a libc.
//!
//! `BLKGETSIZE64` and `BLKDISCARD` go through `rustix::ioctl` with their opcodes spelt
//! out here (rustix has safe wrappers only for `BLKSSZGET` and `BLKPBSZGET`).

pub mod features;
pub mod mmap;
pub mod shmem;
pub mod uapi;
pub(crate) mod uring;

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use rustix::ioctl::{self, Getter, Setter, opcode};
use rustix::process::Pid;
use rustix::thread::CpuSet;

/// Turns a -1 return into the thread's `errno` as an `io::Error`.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

pub fn page_size() -> usize {
    rustix::param::page_size()
}

pub fn getpid() -> i32 {
    std::process::id().cast_signed()
}

pub fn gettid() -> i32 {
    rustix::thread::gettid().as_raw_pid()
}

/// CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> io::Result<Vec<usize>> {
    let set = rustix::thread::sched_getaffinity(None)?;
    Ok((0..CpuSet::MAX_CPU).filter(|&cpu| set.is_set(cpu)).collect())
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
    let mut set = CpuSet::new();
    for &cpu in cpus {
        if cpu >= CpuSet::MAX_CPU {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} out of range")));
        }
        set.set(cpu);
    }
    // `None` is the calling thread.
    rustix::thread::sched_setaffinity(None, &set)?;
    Ok(())
}

/// Marks the calling thread as an IO flusher (it serves writeback: reclaim must not
/// recurse into it), as `PR_SET_IO_FLUSHER` does.
pub fn set_io_flusher() -> io::Result<()> {
    rustix::process::configure_io_flusher_behavior(true)?;
    Ok(())
}

/// A non-blocking eventfd used to wake a queue thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    use rustix::event::EventfdFlags;
    Ok(rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?)
}

/// Adds `value` to an eventfd's counter.
pub fn eventfd_add(fd: BorrowedFd<'_>, value: u64) -> io::Result<()> {
    match rustix::io::write(fd, &value.to_ne_bytes())? {
        8 => Ok(()),
        n => Err(io::Error::new(io::ErrorKind::WriteZero, format!("eventfd write took {n} of 8 bytes"))),
    }
}

/// Stops the whole process (SIGSTOP) until a SIGCONT or SIGKILL.
///
/// Sent to the process: the kernel gives a process-directed signal to the calling
/// thread when it is the main one (as `raise` would); from another thread the group
/// stop reaches the caller a moment later.
#[cfg(feature = "test-hooks")]
pub fn stop_self() {
    // Cannot fail for our own pid and a valid signal.
    let _ = rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::STOP);
}

/// Ends the process at once with `status` (`_exit`: no destructors, no atexit
/// handlers, no unwinding), for a crash that must look like one.
pub fn exit_now(status: i32) -> ! {
    // SAFETY: _exit ends the process at once; nothing runs after it.
    unsafe { libc::_exit(status) }
}

/// Restores the default SIGPIPE action (the Rust runtime ignores it), so a report
/// piped into `head` ends quietly when the reader goes away instead of failing a write.
/// Only for short-lived commands: a serving daemon must not die of a closed stdout.
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition; no handler code runs in this process.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
}

/// The capacity of `/dev/ublkbN` as the kernel has it, in bytes (sysfs counts 512-byte
/// sectors). None when it cannot be read.
pub(crate) fn disk_bytes(dev_id: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/sys/block/ublkb{dev_id}/size")).ok()?;
    s.trim().parse::<u64>().ok()?.checked_mul(512)
}

/// Does a process with this pid exist and run? A zombie does not count: it has exited
/// (its files, `/dev/ublkcN` among them, are closed) and only waits for its parent to
/// reap it, which under systemd or another supervisor may take a moment.
pub fn pid_alive(pid: i32) -> bool {
    // (`Pid::from_raw` debug-asserts a non-negative pid: check the sign first.)
    let Some(p) = (pid > 0).then(|| Pid::from_raw(pid)).flatten() else { return false };
    // Signal 0 only checks for existence and permission (EPERM: it exists).
    let exists = match rustix::process::test_kill_process(p) {
        Ok(()) => true,
        Err(e) => e == rustix::io::Errno::PERM,
    };
    exists && !is_zombie(pid)
}

/// `/proc/PID/stat` says Z (zombie) or X (dead). Unreadable: not known to be one.
fn is_zombie(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // pid (comm) STATE ...: comm may hold spaces and parentheses, so look after the last ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    matches!(state, Some("Z" | "X"))
}

/// Gives `signals` their default action (undoing an inherited SIG_IGN). Meant for
/// signals that are blocked and taken with [`wait_signal`]: their default action never
/// runs then.
pub fn default_signals(signals: &[libc::c_int]) -> io::Result<()> {
    for &sig in signals {
        // SAFETY: installs SIG_DFL, no handler; `sig` is a valid, catchable signal number
        // (SIGINT/SIGTERM/SIGUSR1 here), for which signal(2) does not fail.
        if unsafe { libc::signal(sig, libc::SIG_DFL) } == libc::SIG_ERR {
            return Err(io::Error::last_os_error());
        }
    }
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

// Block device ioctls (linux/fs.h) that rustix has no wrapper for.
/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`, writes the size in bytes as a u64.
const BLKGETSIZE64: ioctl::Opcode = opcode::read::<u64>(0x12, 114);
/// `BLKDISCARD`: `_IO(0x12, 119)`, reads `{offset, len}` as two u64 through the pointer.
const BLKDISCARD: ioctl::Opcode = opcode::none(0x12, 119);

/// Size in bytes of an open block device.
pub fn blk_size_bytes(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: BLKGETSIZE64 is a getter whose kernel side writes exactly one u64.
    let get = unsafe { Getter::<BLKGETSIZE64, u64>::new() };
    // SAFETY: the opcode and operand type match (above); the fd is borrowed, so open.
    Ok(unsafe { ioctl::ioctl(fd, get) }?)
}

/// Discards `[offset, offset + len)` of an open block device (synchronous).
pub fn blk_discard(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: BLKDISCARD takes a pointer to `{offset, len}` (two u64) and only reads it.
    let discard = unsafe { Setter::<BLKDISCARD, [u64; 2]>::new([offset, len]) };
    // SAFETY: the opcode and operand type match (above); the fd is borrowed, so open.
    unsafe { ioctl::ioctl(fd, discard) }?;
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
        // A child that exited and is not reaped yet is a zombie: not alive.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id().cast_signed();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !is_zombie(pid) {
            assert!(std::time::Instant::now() < deadline, "child {pid} did not exit");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert!(!pid_alive(0));
        assert!(!pid_alive(-1));
        assert!(!pid_alive(i32::MAX));
        assert_eq!(getpid(), rustix::process::getpid().as_raw_pid());
        assert!(gettid() > 0);
        assert!(page_size().is_power_of_two());
    }

    #[test]
    fn block_ioctl_opcodes_match_linux_fs_h() {
        assert_eq!(u64::from(BLKGETSIZE64), 0x8008_1272);
        assert_eq!(u64::from(BLKDISCARD), 0x1277);
    }

    #[test]
    fn block_ioctls_on_a_regular_file_are_enotty() {
        use std::os::fd::AsFd;
        let path = std::env::temp_dir().join(format!("ubd-sys-test-{}", getpid()));
        let f = std::fs::File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let enotty = Some(libc::ENOTTY);
        assert_eq!(blk_size_bytes(f.as_fd()).unwrap_err().raw_os_error(), enotty);
        assert_eq!(blk_discard(f.as_fd(), 0, 4096).unwrap_err().raw_os_error(), enotty);
    }
}
