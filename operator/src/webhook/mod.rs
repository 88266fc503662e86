//! The mutating admission webhook that injects `slim-identity-agent` into pods that ask for it.
//!
//! - [`inject`]: pure decision and JSON patch;
//! - [`server`]: `POST /mutate` over TLS with a hot-swappable certificate;
//! - [`certs`]: the serving certificate, operator-managed (Secret + `caBundle`) or mounted.

pub mod certs;
pub mod inject;
pub mod run;
pub mod server;

pub use inject::{Decision, InjectorConfig, SocketSource, decide};
pub use server::{CertStore, WebhookState, router, serve_tls, serve_tls_on};

#[cfg(test)]
mod tests;
