//! `slim-identity-agent`: a spiffe-helper-compatible SPIFFE identity sidecar for SLIM apps.
//!
//! It reads X.509-SVIDs, JWT-SVIDs and JWT bundles from the SPIFFE Workload API (a SPIRE agent
//! socket) and keeps them as files: written atomically, validated before they are written,
//! refreshed before expiry, and restored when something else changes them. Without SPIRE it
//! can also take the pod's Kubernetes service-account token as its JWT identity
//! (`identity_source: kubernetes`).
#![forbid(unsafe_code)]

pub mod agent;
mod changes;
pub mod cli;
pub use slim_identity_contract::config;
#[cfg(feature = "dev")]
pub mod dev;
pub mod health;
pub mod hooks;
pub mod issuer;
pub mod kubernetes;
pub mod output;
pub mod svid;
pub mod verify;
pub mod workload;
