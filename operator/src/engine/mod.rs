//! Engines that realise planned state on SLIM (IO against SLIM, none against Kubernetes).

pub mod channel;
pub mod routes;

pub use channel::{ChannelEngine, ChannelReport, ChannelSync, ParticipantReport};
pub use routes::{NodeReport, NodeResult, RouteSync};
