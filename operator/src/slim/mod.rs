//! Clients of the SLIM APIs (IO) and the SLIM name model they share.

pub mod channel_manager;
pub mod name;
pub mod node;
pub mod pb;
pub mod pool;

pub use channel_manager::{ChannelManagerClient, ChannelManagerPool, CmError};
pub use name::{NameError, NameKey, SlimName};
pub use node::{
    ChangeOutcome, LinkConfig, NodeChange, NodeClient, NodeClientConfig, NodeError, NodeEvent, Observed, RouteRef,
};
pub use pool::NodePool;

#[cfg(test)]
pub(crate) mod fake_channel_manager;
#[cfg(test)]
pub(crate) mod fake_node;
#[cfg(test)]
pub(crate) mod loopback;
#[cfg(test)]
mod node_tests;
