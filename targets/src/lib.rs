//! Targets for ubd-engine: `loop` (a file or block device), `null`, and the `fault`
//! injection wrapper.
#![forbid(unsafe_code)]

pub mod fault;
pub mod loop_target;
pub mod null;

pub use fault::{FaultSpec, FaultTarget};
pub use loop_target::{DirectIo, LoopOptions, LoopTarget};
pub use null::NullTarget;
