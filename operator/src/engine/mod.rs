//! Engines that realise planned state on SLIM (IO against SLIM, none against Kubernetes).

pub mod routes;

pub use routes::{NodeReport, NodeResult, RouteSync};
