//! ubd-engine: a thread-per-core userspace block device engine over Linux ublk.
//!
//! - [`sys`]: the raw kernel boundary (UAPI mirror, mmaps, syscalls).
//! - [`ctrl`]: the control plane on `/dev/ublk-control`.
//! - [`queue`]: the per-queue reactor (one pinned thread and one io_uring each).
//! - [`target`]: the interface backends implement.
//! - [`daemon`]: the lifecycle of a served device.
//! - [`os`]: the OS calls that targets and tools cannot make safely themselves.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr, clippy::exit)
)]

pub mod buf;
pub mod cpus;
pub mod ctrl;
pub mod daemon;
pub mod error;
pub mod os;
pub mod queue;
pub mod sys;
pub mod target;

pub use error::{Error, Result};
