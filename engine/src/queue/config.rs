//! What a queue thread is told ([`QueueConfig`]) and what it tells the control thread
//! back ([`QueueEvent`], [`QueueReport`]).

use crate::buf::BufferMode;
use crate::ring::RingMode;
use crate::sys::mmap::PageKind;

/// What one queue thread needs to know.
#[derive(Debug, Clone)]
pub(crate) struct QueueConfig {
    pub(crate) dev_id: u32,
    pub(crate) q_id: u16,
    /// This thread's index among the queue's `threads` (UBLK_F_PER_IO_DAEMON): it
    /// serves the k-th contiguous block of depth / threads tags.
    pub(crate) thread: u16,
    pub(crate) threads: u16,
    pub(crate) depth: u16,
    /// Bytes per tag buffer (`max_io_buf_bytes`).
    pub(crate) buf_size: u32,
    /// CPUs to bind the thread to (None: leave unbound).
    pub(crate) cpus: Option<Vec<usize>>,
    /// Try hugepage-backed buffers.
    pub(crate) huge_pages: bool,
    pub(crate) dev_size: u64,
    /// Fail writes, discards and write-zeroes with EROFS (a read-only device).
    pub(crate) read_only: bool,
    pub(crate) buffer_mode: BufferMode,
    /// Ring flags (None: the default, COOP_TASKRUN).
    pub(crate) ring: Option<RingMode>,
    /// How requests are fetched and committed.
    pub(crate) protocol: IoProtocol,
    /// Target IO of at least this many bytes is punted to io_uring's workers.
    pub(crate) offload_min: Option<u32>,
    /// Shared memory registered with the device (UBLK_F_SHMEM_ZC).
    pub(crate) shmem: Option<std::sync::Arc<crate::sys::shmem::ShmemBuf>>,
}

/// How a queue fetches and commits requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IoProtocol {
    /// FETCH_REQ / COMMIT_AND_FETCH_REQ, one command per tag (every kernel).
    #[default]
    PerTag,
    /// UBLK_F_BATCH_IO (7.0+): one PREP_IO_CMDS, a multishot FETCH_IO_CMDS that
    /// delivers many tags per completion, one COMMIT_IO_CMDS per pass.
    Batch,
}

impl IoProtocol {
    /// The name `--io-protocol` takes.
    pub fn name(self) -> &'static str {
        match self {
            IoProtocol::PerTag => "per-tag",
            IoProtocol::Batch => "batch",
        }
    }
}

impl std::fmt::Display for IoProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The [`name`](IoProtocol::name)s.
#[cfg(feature = "clap")]
impl clap::ValueEnum for IoProtocol {
    fn value_variants<'a>() -> &'a [Self] {
        &[IoProtocol::PerTag, IoProtocol::Batch]
    }
    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.name()))
    }
}

/// How a queue came up, for the startup report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QueueReport {
    pub q_id: u16,
    /// The thread's index among its queue's threads (0 with one thread per queue).
    pub thread: u16,
    /// The queue thread's kernel thread id.
    pub tid: i32,
    /// CPUs it is bound to (None: not bound).
    pub cpus: Option<Vec<usize>>,
    pub ring: RingMode,
    /// The ring's fd is registered (IORING_REGISTER_RING_FDS).
    pub ring_fd_registered: bool,
    pub buffer_mode: BufferMode,
    /// Pages behind the per-tag buffers (copy mode; None in the other modes).
    pub pages: Option<PageKind>,
    /// The request buffers are io_uring fixed buffers.
    pub fixed_buffers: bool,
    /// The thread is marked PR_SET_IO_FLUSHER.
    pub io_flusher: bool,
}

/// Messages from queue threads to the control thread.
#[derive(Debug)]
pub(crate) enum QueueEvent {
    /// Every tag is fetched: START_DEV may go ahead.
    Ready(QueueReport),
    /// The thread ended; Err if it failed (before or after Ready).
    Exited { q_id: u16, result: Result<(), String> },
    /// The target panicked: the queue fails every request from now on.
    TargetFailed { q_id: u16, msg: String },
}
