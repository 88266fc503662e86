//! Clients of the SLIM APIs (IO) and the SLIM name model they share (their TLS: [`crate::tls`]).

pub mod batch;
pub mod channel_manager;
pub mod model;
pub mod name;
pub mod node;
pub mod pb;
pub mod pool;
pub mod wording;

pub use channel_manager::{ChannelManagerClient, ChannelManagerPool, CmError};
pub use model::{
    ChangeItem, ChangeOutcome, ItemFailure, LinkConfig, NodeChange, NodeError, NodeEvent, NodeStats, Observed, RouteRef,
};
pub use name::{NameError, NameKey, SlimName};
pub use node::{NodeClient, NodeClientConfig};
pub use pool::{ClientCollector, ClientPool, NodePool};

#[cfg(test)]
pub(crate) mod fake_channel_manager;
#[cfg(test)]
pub(crate) mod fake_node;
#[cfg(test)]
pub(crate) mod loopback;
#[cfg(test)]
mod node_tests;
