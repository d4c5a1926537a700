//! ubd-engine: a thread-per-core userspace block device engine over Linux ublk.
//!
//! A device is served by a [`Target`]: it describes the device ([`TargetInfo`]) and
//! opens one [`QueueTarget`] per hardware queue. Each queue runs on its own thread with
//! one io_uring that carries both the ublk commands and the target's own IO: a queue
//! target gets each request ([`IoRequest`]) and either finishes it at once or pushes
//! SQEs through its [`IoCtx`] and is called back as they complete. Targets need no
//! `unsafe`: every SQE they push moves data only to or from the request's own buffer.
//!
//! [`serve`] creates a device for a target and serves it until SIGINT/SIGTERM;
//! [`recover`] takes over a device whose daemon died. [`Control`] is the control
//! device for listing, inspecting and deleting devices.
//!
//! # A minimal target
//!
//! A device that reads back zeroes and forgets what is written (the engine's `null`
//! target does this without touching data at all):
//!
//! ```no_run
//! use std::sync::Arc;
//! use ubd_engine::{
//!     DeviceOptions, Disposition, IoCtx, IoRequest, QueueSetup, QueueTarget, Target, TargetInfo,
//! };
//!
//! #[derive(Debug)]
//! struct Forgetful(TargetInfo);
//!
//! impl Target for Forgetful {
//!     fn name(&self) -> &'static str {
//!         "forgetful"
//!     }
//!     fn info(&self) -> &TargetInfo {
//!         &self.0
//!     }
//!     fn describe(&self) -> serde_json::Value {
//!         serde_json::json!({ "size": self.0.dev_size })
//!     }
//!     fn open_queue(&self, _setup: &mut QueueSetup) -> std::io::Result<Box<dyn QueueTarget>> {
//!         Ok(Box::new(ForgetfulQueue))
//!     }
//! }
//!
//! struct ForgetfulQueue;
//!
//! impl QueueTarget for ForgetfulQueue {
//!     fn submit(&mut self, req: &IoRequest, _io: &mut IoCtx<'_>) -> Disposition {
//!         // Every request succeeds at once: reads and writes "transfer" their length.
//!         Disposition::Done(i32::try_from(req.len).unwrap_or(-libc::EIO))
//!     }
//!     fn complete(&mut self, _req: &IoRequest, _cookie: u16, _res: i32, _io: &mut IoCtx<'_>) -> Disposition {
//!         unreachable!("this target pushes no SQEs")
//!     }
//! }
//!
//! let info = TargetInfo {
//!     dev_size: 1 << 30,
//!     logical_block_size: 512,
//!     physical_block_size: 4096,
//!     read_only: false,
//!     rotational: false,
//!     volatile_cache: false,
//!     discard: None,
//!     zoned: None,
//! };
//! let summary = ubd_engine::serve(
//!     Arc::new(Forgetful(info)),
//!     &DeviceOptions::default(),
//!     |dev| println!("{}", dev.block_path.display()),
//!     |_stats| {},
//! )?;
//! println!("stopped: {}", summary.reason);
//! # Ok::<(), ubd_engine::Error>(())
//! ```
//!
//! # Layers
//!
//! One way, each using only those above it in this list: `sys` (the kernel boundary:
//! UAPI mirror, mmaps, raw io_uring calls), `request` (what targets and the engine
//! exchange), `ring` (a queue's io_uring: setup, the per-tag and batch protocols, the
//! SQEs a target pushes), `target` (the trait targets implement), `queue` (the reactor
//! and its thread, statistics), `ctrl` (the control device), `daemon` (a device's
//! lifecycle). Only what this page re-exports is public.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr, clippy::exit)
)]

mod buf;
mod cpus;
mod ctrl;
mod daemon;
mod error;
mod hooks;
pub mod os;
mod queue;
mod request;
mod ring;
mod sys;
mod target;

pub use buf::{BufferChoice, BufferMode};
pub use cpus::{format_cpulist, parse_cpulist};
pub use ctrl::{CONTROL_PATH, Control, char_path};
pub use daemon::{
    DeviceOptions, DeviceStats, HANDOFF_SIGNAL, Holder, Recovery, ServeSummary, ShmemOptions, ShmemRegistration,
    ShmemReport, StartedDevice, block_stop_signals, device_holders, privileged, recover, serve,
};
pub use error::{Error, Result};
pub use queue::config::{IoProtocol, QueueReport};
pub use queue::stats::{BatchCounters, Counters, ErrnoCounts, LatencySummary, SizeCounter, StatsSnapshot};
pub use request::{DiscardInfo, FileSlot, IoRequest, Mem, MemId, Op, TargetInfo, ZonedInfo};
pub use ring::RingMode;
pub use sys::features::{self, feature_names};
pub use sys::mmap::PageKind;
/// Whether a process runs (exists and is no zombie): how the engine judges a device's daemon.
pub use sys::pid_alive;
pub use sys::shmem::ShmemKind;
pub use sys::uapi::DevInfo;
pub use target::{Disposition, IoCtx, QueueSetup, QueueTarget, Target, Waker};
