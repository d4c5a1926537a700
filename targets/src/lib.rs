//! Targets for ubd-engine: `loop` (a file or block device) and `null`.
#![forbid(unsafe_code)]

pub mod loop_target;
pub mod null;

pub use loop_target::{DirectIo, LoopOptions, LoopTarget};
pub use null::NullTarget;
