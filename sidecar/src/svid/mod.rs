//! SVIDs into files: X.509 rendering and JWT validation and bundle formats. Pure.

pub mod jwt;
pub mod x509;
