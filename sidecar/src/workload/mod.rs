//! The SPIFFE Workload API: generated types, the client, the server the agent gives its pod,
//! and a faithful fake of SPIRE's agent.

pub mod client;
#[cfg(feature = "dev")]
pub mod fake;
pub mod pb;
pub mod server;

pub use client::{WorkloadClient, WorkloadError};
