//! Test harness: real SLIM nodes and apps on 127.0.0.1, started from the PyPI `slim-bindings`
//! package (a full node, controller API included, in one Python process).
//!
//! The Python interpreter comes from `SLIM_PYTHON`, else `$SLIM_CACHE/venv/bin/python`
//! (`SLIM_CACHE` defaults to `~/.cache/slim-k8s`); `scripts/test.sh` installs it there.

pub mod apps;
pub mod chart_install;
pub mod control_plane;
pub mod identity;
pub mod issuer;
pub mod node;
pub mod operator;
pub mod pki;
pub mod processes;
pub mod soak;
pub mod tools;
pub mod webhook;

use std::path::PathBuf;
use std::time::Duration;

pub use apps::{Groups, SlimApp, spire_identity};
pub use processes::{APP_SECRET, ChannelManager, SlimNode, channel_manager_binary, unimplemented_grpc_on};
pub use tools::*;

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("no Python with slim-bindings at {0}: run scripts/test.sh once (it creates the venv), or set SLIM_PYTHON")]
    NoPython(PathBuf),
    #[error("no SLIM channel manager at {0}: run scripts/test.sh once (it builds it), or set SLIM_CHANNEL_MANAGER")]
    NoChannelManager(PathBuf),
    #[error("starting {what}: {source}")]
    Spawn { what: String, source: std::io::Error },
    #[error("{what} did not come up within {timeout:?}; its output: {output}")]
    NotReady { what: String, timeout: Duration, output: String },
    #[error("no {name} binary at {path}: build the workspace (cargo build --workspace), or set {env}")]
    NoBinary { name: &'static str, env: &'static str, path: PathBuf },
    #[error("no {tool} at {path}: run scripts/test.sh once (it installs it), or set {env}")]
    NoTool { tool: &'static str, env: &'static str, path: PathBuf },
    #[error("{command} failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("the app exited while we waited for its line {waiting_for:?}; its output: {output}")]
    Exited { waiting_for: String, output: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Setup(String),
}
