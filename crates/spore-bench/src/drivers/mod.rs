//! The drivers behind `spore bench` and `spore demo`: each finds or starts a daemon, deploys
//! what it measures through [`spore_client`], runs the measurement modules of this crate,
//! then writes and prints the results. The `spore` binary only parses the command line and
//! calls them.
//!
//! They run inside the `spore` binary: the daemons and shims they start are its own
//! executable (`std::env::current_exe`) run as `spore serve` and `spore shim`. They never
//! link the daemon's crates; they talk to it over HTTP.
//!
//! Errors: the drivers are the CLI's commands moved out of the binary, so they return
//! `anyhow::Result` (each step adds context, and the CLI prints the whole chain), unlike the
//! measurement modules, which return [`crate::BenchError`].

use std::path::PathBuf;

pub mod bench;
pub mod dag;
pub mod demo;
pub mod first_call;
pub mod load;
pub mod xpu;

mod report;
mod setup;
mod shim;

/// Options most benchmarks share.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Samples per series (what a sample is depends on the benchmark).
    pub n: usize,
    /// Where results go (under `<out>/<bench>/`).
    pub out: PathBuf,
    /// Folder of sample functions (or, for `dag`, of the DAG functions and DAG files).
    pub functions: PathBuf,
}

/// Which snapshots the snapshot benchmarks take and restore, as given on the command line.
#[derive(Debug, Clone)]
pub struct SnapshotSelection {
    /// Sample functions, comma-separated folder names under the functions folder.
    pub only: String,
    /// Codecs, comma-separated (`raw`, `lz4`, `zstd-N`).
    pub codecs: String,
    /// Skip the series with the page cache dropped (they also need root).
    pub warm_cache_only: bool,
}
