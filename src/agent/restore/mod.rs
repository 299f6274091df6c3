//! Restores on the agent's side: clone the member snapshots a NodeRestore names into writable
//! volumes, publish where each is, and delete them when the restore is aborted, released or
//! deleted. All or nothing on the node: a restore that cannot make every clone deletes what it
//! made before it reports `Failed`.
//!
//! - [`journal`]: the clone journal, `<state_dir>/restores/<NodeRestore uid>.json`, written before
//!   a clone is made and as each is made or deleted.
//! - [`lifecycle`]: the pure decisions (what to do next, the status, where a restart resumes,
//!   how a member snapshot is found in the cut journal).
//! - [`executor`]: the journal in memory and the blocking clone I/O, on threads of its own.
//! - [`watch`]: the NodeRestore watch loop.

pub mod executor;
pub mod journal;
pub mod lifecycle;
pub mod watch;

#[cfg(test)]
mod tests;

pub use executor::{Backends, CloneOps, Recovered, RestoreError, Restores};
