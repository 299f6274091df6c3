//! tandem: consistency groups for Kubernetes persistent volumes.
//!
//! - [`api`]: the custom resources (no I/O).
//! - [`controller`]: reconciles ConsistencyGroups (and, later, GroupSnapshots) against the API server.

pub mod agent;
pub mod api;
pub mod controller;
pub mod finalizer;
