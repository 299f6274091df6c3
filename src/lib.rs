//! tandem: consistency groups for Kubernetes persistent volumes.
//!
//! - [`api`]: the custom resources (no I/O).
//! - [`controller`]: reconciles ConsistencyGroups and GroupSnapshots against the API server.
//! - [`agent`]: the node agent (freeze, snapshot, thaw).
//! - [`cli`]: `kubectl tandem` (the binary invoked as `kubectl-tandem`, or `tandem cli`).
//! - [`conditions`], [`events`], [`finalizer`]: small Kubernetes helpers both share.

pub mod agent;
pub mod api;
pub mod cli;
pub mod conditions;
pub mod controller;
pub mod events;
pub mod finalizer;
