//! Kubernetes wiring: the controllers ([`run`]), what reconciles share ([`context`]), their
//! errors ([`error`]) and caches ([`stores`]).

pub mod channel;
pub mod channel_status;
pub mod context;
pub mod error;
pub mod heal;
pub mod index;
pub mod member_watch;
pub mod pause;
pub mod run;
pub mod stores;
pub mod subscription;
pub mod subscription_status;

pub use context::{Context, ControllerConfig, DEFAULT_NODE_SELECTOR, error_policy};
pub(crate) use context::{patch_status, reconcile_finalized};
pub use error::Error;
pub use run::{ControllerFailure, Runtime, run, sole_leader};
pub use stores::{Caches, ResourceCollector, Stores};

/// Field manager for server-side apply, and the events' reporting controller.
pub const MANAGER: &str = "slim-operator";

#[cfg(test)]
mod tests;
