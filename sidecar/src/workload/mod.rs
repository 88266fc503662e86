//! The SPIFFE Workload API: the server the agent gives its pod and a faithful fake of SPIRE's
//! agent, here; the generated types and the client, in the contract crate.

#[cfg(feature = "dev")]
pub mod fake;
pub mod server;

pub use slim_identity_contract::workload::{WorkloadClient, WorkloadError, client, pb};
