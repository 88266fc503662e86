//! TLS, one home per concern:
//! - [`control`]: the operator's connections to SLIM's control APIs (nodes' controllers, channel
//!   managers): the material, the connector, failure causes classified where rustls reports them;
//! - [`registry`]: the material each object's settings name (Secrets, ConfigMaps, files, the
//!   operator's SVID), kept current;
//! - [`svid`]: the operator's own X.509-SVID from the Workload API;
//! - [`link`]: what a Subscription's link presents to the node it dials;
//! - [`secrets`]: the one place Secret and ConfigMap keys are read.
//!
//! The webhook's serving certificate lives with the webhook (`webhook::certs`), the issuer's CA
//! and keys with the issuer.

pub mod control;
pub mod link;
pub mod registry;
pub mod secrets;
pub mod svid;

pub use registry::{ControlTlsDefaults, ControlTlsRegistry};
