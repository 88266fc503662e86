//! The contract between `slim-operator` and `slim-identity-agent`: what the operator writes and
//! the agent reads (its [`config`], the [`env`] names and [`paths`] the injector sets), the SPIFFE
//! issuer's HTTP API ([`issuer_api`]), and the SPIFFE Workload API as both speak it ([`workload`]:
//! the client, the generated types, the audience rules; [`x509`]: an X.509-SVID as files). Both
//! build on these, so neither side can drift from the other; neither depends on the other.
#![forbid(unsafe_code)]

pub mod config;
pub mod env;
pub mod issuer_api;
pub mod paths;
pub mod workload;
pub mod x509;
