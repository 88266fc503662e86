//! `slim-operator`: makes SLIM (Secure Low-Latency Interactive Messaging) native to Kubernetes.
//!
//! - [`api`]: the CRD types (no IO);
//! - [`plan`]: pure planning, desired vs observed state into actions;
//! - [`slim`]: clients of the SLIM control APIs;
//! - [`tls`]: TLS to SLIM's control APIs (material, connector, failure causes, what objects name,
//!   the operator's SVID), link TLS, and the one place Secret and ConfigMap keys are read;
//! - [`engine`]: realising plans on SLIM (IO against SLIM only);
//! - [`controller`]: the Kubernetes wiring (reconcilers, status, events);
//! - [`webhook`], [`issuer`]: the identity side (sidecar injection, the SPIFFE issuer);
//! - [`leader`]: leader election;
//! - [`admin`], [`metrics`], [`telemetry`], [`serve`]: operating the binary;
//! - [`cli`]: the command line and settings; [`app`]: the composition root.
#![forbid(unsafe_code)]

pub mod admin;
pub mod api;
pub mod app;
pub mod cli;
pub mod controller;
pub mod engine;
pub mod issuer;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod rbac;
pub mod serve;
pub mod slim;
pub mod telemetry;
pub mod tls;
pub mod webhook;

pub use slim_k8s_common::backoff;
