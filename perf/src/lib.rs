//! ubd-engine performance toolkit: runs fio workloads against ubd-engine and its
//! peers on one backing device, and reports medians, spreads and ratios
//! (`compare`), regressions against a stored baseline (`regress`) and tuning
//! grids (`sweep`). The `ubd-perf` binary is the front end; see perf/README.md.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::exit))]

pub mod baseline;
pub mod fio;
pub mod plot;
pub mod report;
pub mod runner;
pub mod stats;
pub mod systems;
