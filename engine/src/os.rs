//! The few OS calls that targets and tools need but cannot make themselves: they
//! forbid `unsafe`, and neither rustix nor std has a safe wrapper for these.
//! Everything else (fallocate, the block-size ioctls, euid, signals to a pid) they
//! take from rustix or std directly.

/// `ioctl(BLKGETSIZE64)`: the size in bytes of an open block device.
pub use crate::sys::blk_size_bytes;

/// `ioctl(BLKDISCARD)`: discards a byte range of an open block device (synchronous).
pub use crate::sys::blk_discard;

/// `signal(SIGPIPE, SIG_DFL)`, for short-lived commands whose output may be piped.
pub use crate::sys::default_sigpipe;
