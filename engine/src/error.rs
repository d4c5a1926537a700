//! Engine errors. Each variant carries what a one-line message needs.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
// Causes are part of each message (and not also a `source()`), so that a message
// printed with its chain does not repeat them.
pub enum Error {
    #[error(
        "ublk is not available: {} does not exist (the ublk_drv kernel module is not loaded: try \
         `modprobe ublk_drv`; on a kernel without ublk, tests/vm/try.sh runs ubd-engine in a VM)",
        path.display()
    )]
    NoUblk { path: PathBuf },

    #[error(
        "permission denied opening {}: run as root, or as a member of the group the udev rule gives it to (README: Unprivileged devices)",
        path.display()
    )]
    NotRoot { path: PathBuf },

    #[error("{cmd} of device {dev_id}: permission denied: the device belongs to {owner} (its {path} is not yours)")]
    NotYours { cmd: &'static str, dev_id: u32, owner: String, path: String },

    #[error("cannot open {}: {cause}", path.display())]
    Open { path: PathBuf, cause: io::Error },

    #[error("ublk control command {cmd} for device {dev} failed: {cause}")]
    Ctrl { cmd: &'static str, dev: String, cause: io::Error },

    #[error(
        "ublk control command {cmd} for device {dev} did not complete within {secs} s (the kernel is \
         waiting on IO in flight, or on a process that holds /dev/ublkc{dev} open)"
    )]
    CtrlTimeout { cmd: &'static str, dev: String, secs: u64 },

    #[error("device {dev_id} does not exist")]
    NoDevice { dev_id: u32 },

    #[error("{what}: {cause}")]
    Io { what: String, cause: io::Error },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("queue {q_id}: {msg}")]
    Queue { q_id: u16, msg: String },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), cause: source }
    }

    /// The errno behind this error, if it came from the kernel.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Open { cause, .. } | Error::Ctrl { cause, .. } | Error::Io { cause, .. } => cause.raw_os_error(),
            Error::NoDevice { .. } => Some(libc::ENODEV),
            Error::CtrlTimeout { .. } => Some(libc::ETIMEDOUT),
            Error::NotYours { .. } => Some(libc::EACCES),
            _ => None,
        }
    }
}
