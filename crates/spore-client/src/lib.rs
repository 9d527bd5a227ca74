//! Client side of a Spore daemon, shared by the `spore` CLI and the benchmarks
//! (`spore-bench`): a blocking client of the daemon's HTTP API ([`Client`]), function
//! folders ([`read_manifest`], [`zip_function_dir`], [`Client::deploy_dir`]), and a daemon
//! run as a child process for the length of a command ([`ManagedDaemon`]). Every request is
//! signed with the caller's access key ([`signed`]).
//!
//! Linux only (the daemon is stopped with a signal). Errors are one enum per module; their
//! messages are the CLI's, printed with their causes.
#![forbid(unsafe_code)]

mod client;
mod daemon;
mod function_dir;
pub mod signed;

pub use client::{Client, ClientError, InvokeAnswer};
pub use daemon::{DaemonError, ManagedDaemon};
pub use function_dir::{read_manifest, zip_function_dir, FunctionDirError};
pub use signed::{default_data_dir, Http, RequestBuilder};
