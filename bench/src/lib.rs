//! Keel's benchmarks. Every mode measures the raw device on the same file system in the same run
//! (unless `--no-baseline`) and reports its figures as ratios of that baseline.

#![allow(non_upper_case_globals)] // constants follow the engine's snake_case naming

pub mod broker_load;
pub mod cli;
pub mod cpu;
pub mod engine_load;
pub mod plot;
pub mod raw;
pub mod recovery;
pub mod report;

pub use cli::main;
