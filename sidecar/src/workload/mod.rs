//! The SPIFFE Workload API: generated types, the client, and a faithful fake server.

pub mod client;
#[cfg(feature = "dev")]
pub mod fake;
pub mod pb;

pub use client::{WorkloadClient, WorkloadError};
