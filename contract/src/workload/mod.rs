//! The SPIFFE Workload API: the generated types (client and server), the client, and the
//! audience rules a server applies and a caller can check first.

pub mod audiences;
pub mod client;
pub mod pb;

pub use client::{WorkloadClient, WorkloadError};
