//! Engine errors. Each variant carries what a one-line message needs.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(
        "ublk is not available: {path} does not exist (the ublk_drv kernel module is not loaded; \
         try `modprobe ublk_drv`, or run inside the test VM: tests/vm/run.sh -- ubd-engine ...)"
    )]
    NoUblk { path: PathBuf },

    #[error("permission denied opening {path}: ubd-engine must run as root")]
    NotRoot { path: PathBuf },

    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },

    #[error("ublk control command {cmd} for device {dev} failed: {source}")]
    Ctrl { cmd: &'static str, dev: String, source: io::Error },

    #[error("device {dev_id} does not exist")]
    NoDevice { dev_id: u32 },

    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },

    #[error("invalid configuration: {0}")]
    Config(String),

    #[error("queue {q_id}: {msg}")]
    Queue { q_id: u16, msg: String },
}

impl Error {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io { what: what.into(), source }
    }

    /// The errno behind this error, if it came from the kernel.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            Error::Open { source, .. } | Error::Ctrl { source, .. } | Error::Io { source, .. } => source.raw_os_error(),
            Error::NoDevice { .. } => Some(libc::ENODEV),
            _ => None,
        }
    }
}
