//! Generated Workload API types (the proto has no package, hence `_.rs`).
#![allow(clippy::all, missing_docs)]

tonic::include_proto!("_");
