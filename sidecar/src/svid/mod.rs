//! SVIDs into files: X.509 rendering, JWT validation and bundle formats, Kubernetes
//! service-account tokens. Pure.

pub mod jwt;
pub mod kubernetes;
pub use slim_identity_contract::x509;

#[cfg(all(test, feature = "dev"))]
mod properties;
