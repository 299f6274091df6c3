//! Cutting the snapshots under the freeze: reflink clones in parallel, LVM and btrfs one after
//! another; what each create made is recorded as made at once, whatever happens next.

use std::sync::Arc;

use crate::agent::backend::{self, BackendError, BackendKind, BackendOptions, SnapshotHandle};
use crate::api::FreezePolicy;

use super::plan::Prepared;
use super::state::now;
use super::{Cut, CutRequest, Engine, lock};

/// Deletes a snapshot of a cut. What is at the handle's place but not marked as this cut's (a
/// planned name the cut never made, or what it made replaced since) is not this cut's to delete:
/// ours is gone either way, so that is done, not a failure to retry.
pub(super) fn delete_own(
    handle: &SnapshotHandle,
    options: &BackendOptions,
) -> Result<(), BackendError> {
    match backend::delete(handle, options) {
        Ok(_) => Ok(()),
        Err(e @ BackendError::NotOurs { .. }) => {
            tracing::warn!(%handle, error = %e, "not this cut's snapshot; left alone");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

impl Engine {
    /// Cuts every planned snapshot; records each one made. Returns the reason to fail, if any.
    pub(super) fn cut_snapshots(
        &self,
        req: &CutRequest,
        cut: &Arc<Cut>,
        prepared: &Prepared,
    ) -> Result<(), String> {
        let options = &self.inner.config.backend;
        let spawner = &self.inner.config.spawner;
        // Reflink clones are independent ioctls: run them in parallel. LVM serialises on its VG
        // lock and btrfs snapshots commit the filesystem: run those one after another.
        let (parallel, serial): (Vec<usize>, Vec<usize>) = (0..prepared.volumes.len())
            .partition(|&i| prepared.volumes[i].plan.backend == BackendKind::Reflink);
        let parallel_results: Vec<(usize, Result<backend::SnapshotInfo, BackendError>)> =
            std::thread::scope(|s| {
                let handles: Vec<_> = parallel
                    .iter()
                    .map(|&i| {
                        let plan = &prepared.volumes[i].plan;
                        let started = spawner
                            .scoped(s, "tandem-clone", move || backend::create(plan, options));
                        (i, started)
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|(i, h)| {
                        let result = match h {
                            Ok(h) => h.join().unwrap_or_else(|_| {
                                Err(BackendError::Parse {
                                    command: "clone thread".into(),
                                    why: "panicked".into(),
                                })
                            }),
                            // No thread: clone inline instead.
                            Err(_) => backend::create(&prepared.volumes[i].plan, options),
                        };
                        (i, result)
                    })
                    .collect()
            });
        let mut failure = None;
        for (i, result) in parallel_results {
            if let Some(msg) = self.record_snapshot(cut, prepared, i, result) {
                failure.get_or_insert(msg);
            }
        }
        if let Some(msg) = failure {
            return Err(msg);
        }
        for i in serial {
            let plan = &prepared.volumes[i].plan;
            let mut result = backend::create(plan, options);
            if let Err(BackendError::FrozenOriginBusy { .. }) = &result
                && req.freeze == FreezePolicy::BestEffort
            {
                // Degrade honestly: thaw this filesystem, let LVM suspend it itself, and say so.
                let sb = prepared.volumes[i].superblock;
                let why = result
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                self.thaw_one(cut, sb);
                result = backend::create(plan, options);
                let mut state = lock(&cut.state);
                for (j, v) in prepared.volumes.iter().enumerate() {
                    if v.superblock == sb && state.volumes[j].frozen {
                        state.volumes[j].frozen = false;
                        state.volumes[j].reason = Some(format!(
                            "thawed before its snapshot and snapshotted with LVM's own suspend, consistent on its own only: {why}"
                        ));
                    }
                }
            }
            if let Some(msg) = self.record_snapshot(cut, prepared, i, result) {
                return Err(msg);
            }
        }
        Ok(())
    }

    /// Records one snapshot result; returns a failure message.
    pub(super) fn record_snapshot(
        &self,
        cut: &Arc<Cut>,
        prepared: &Prepared,
        i: usize,
        result: Result<backend::SnapshotInfo, BackendError>,
    ) -> Option<String> {
        let Some(volume) = prepared.volumes.get(i) else {
            return Some("a snapshot thread failed".into());
        };
        let mut state = lock(&cut.state);
        match result {
            Ok(info) => {
                // What the create made (as it returned it: btrfs adds the subvolume id/uuid) is
                // journaled as made, whatever happens next.
                state.made.insert(i, info.handle.clone());
                if state.phase.is_over() {
                    // Aborted meanwhile (watchdog): this snapshot is void; the end deletes it.
                    return Some("aborted while cutting".into());
                }
                let v = &mut state.volumes[i];
                v.snapshot_handle = Some(info.handle.to_string());
                // A central member's snapshot is the controller's, cut later: no size or time here.
                if !matches!(info.handle, SnapshotHandle::RbdGroup { .. }) {
                    v.size_bytes = i64::try_from(info.size_bytes).ok();
                    v.cut_time = Some(now());
                }
                None
            }
            Err(e) => {
                state.volumes[i].reason = Some(e.to_string());
                Some(format!(
                    "snapshot of volume {} (claim {}) failed: {e}",
                    volume.request.persistent_volume, volume.request.claim
                ))
            }
        }
    }
}
