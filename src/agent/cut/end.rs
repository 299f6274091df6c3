//! The end of a cut: thaws (each entry leaves the frozen list only after its own FITHAW
//! returned), void snapshots deleted, kept ones made durable, the end journaled and only then
//! published; release, abort, the watchdog and finalize all end here. Nothing in this file waits
//! for a journal write before a thaw.

use std::sync::Arc;
use std::time::Duration;

use crate::agent::backend::{self, SnapshotHandle};
use crate::agent::discovery::DevId;
use crate::agent::freeze::Thawed;
use crate::api::{NodeSnapshotStatus, VolumeStatus};

use super::executor;
use super::lifecycle::{CutEvent, CutPhase, Outcome};
use super::snapshots::delete_own;
use super::state::FrozenFs;
use super::{
    CONDITION_DELETE_FAILED, CONDITION_FREEZE_IN_FLIGHT, CONDITION_JOURNAL_FAILED,
    CONDITION_THAW_FAILED, Cut, Engine, EngineError, lock,
};

impl Engine {
    /// Thaws one filesystem of a cut early (the LVM EBUSY degradation).
    pub(super) fn thaw_one(&self, cut: &Arc<Cut>, superblock: DevId) {
        let claimed: Vec<Arc<FrozenFs>> = {
            let mut state = lock(&cut.state);
            state
                .frozen
                .iter_mut()
                .filter(|f| f.fs.superblock == superblock && !f.thawing)
                .map(|f| {
                    f.thawing = true;
                    f.fs.clone()
                })
                .collect()
        };
        self.thaw_claimed(cut, claimed);
    }

    /// A failure before anything was frozen.
    pub(super) fn fail_planned(&self, cut: &Arc<Cut>, volumes: Vec<VolumeStatus>, message: String) {
        {
            let mut state = lock(&cut.state);
            state.volumes = volumes;
            if state.end_message.is_none() {
                state.end_message = Some(message);
            }
            state.apply(CutEvent::Fail);
        }
        self.end(cut);
    }

    /// Thaw everything, delete the snapshots, phase Failed.
    pub(super) fn fail(&self, cut: &Arc<Cut>, message: String) {
        {
            let mut state = lock(&cut.state);
            if !state.phase.is_over() {
                state.end_message = Some(message);
            }
            state.apply(CutEvent::Fail);
        }
        self.end(cut);
    }

    /// Drives a cut that is over to its durable end, logging (and keeping as conditions) what
    /// has to be retried.
    pub(super) fn end(&self, cut: &Arc<Cut>) {
        if let Err(e) = self.settle(cut) {
            tracing::warn!(key = %cut.key, error = %e, "the cut's end is not durable yet; retrying later");
        }
    }

    /// Thaws what is claimed here and takes each entry off the frozen list once its own thaw
    /// returned; a failed thaw stays listed (and is retried).
    pub(super) fn thaw_claimed(&self, cut: &Arc<Cut>, claimed: Vec<Arc<FrozenFs>>) {
        if claimed.is_empty() {
            return;
        }
        let ops = self.inner.config.freeze_ops.as_ref();
        let results = executor::thaw_all(
            &claimed,
            |f| (&f.fd, f.mount_point.as_path()),
            ops,
            &self.inner.config.spawner,
        );
        let mut state = lock(&cut.state);
        let mut failed = Vec::new();
        for (fs, result) in claimed.iter().zip(results) {
            match result {
                Ok(how) => {
                    if how == Thawed::WasNotFrozen {
                        tracing::warn!(mount = %fs.mount_point.display(), "was not frozen any more when thawed (someone else thawed it)");
                    }
                    state.frozen.retain(|f| !Arc::ptr_eq(&f.fs, fs));
                }
                Err(e) => {
                    tracing::error!(mount = %fs.mount_point.display(), error = %e, "THAW FAILED; retrying");
                    failed.push(format!("{}: {e}", fs.mount_point.display()));
                    for f in state.frozen.iter_mut().filter(|f| Arc::ptr_eq(&f.fs, fs)) {
                        f.thawing = false;
                    }
                }
            }
        }
        if failed.is_empty() {
            if state.frozen.iter().all(|f| f.thawing) {
                state.solved(CONDITION_THAW_FAILED);
            }
        } else {
            state.problem(
                CONDITION_THAW_FAILED,
                "ThawFailed",
                format!(
                    "cannot thaw {}; the agent keeps retrying",
                    failed.join("; ")
                ),
            );
        }
        if state.frozen.is_empty()
            && let Some(start) = state.first_freeze
        {
            state.window = Some(start.elapsed());
        }
    }

    /// Claims and thaws every frozen filesystem not being thawed already.
    pub(super) fn thaw_everything(&self, cut: &Arc<Cut>) {
        let claimed: Vec<Arc<FrozenFs>> = {
            let mut state = lock(&cut.state);
            if !matches!(state.phase, CutPhase::Thawing { .. }) {
                return;
            }
            state
                .frozen
                .iter_mut()
                .filter(|f| !f.thawing)
                .map(|f| {
                    f.thawing = true;
                    f.fs.clone()
                })
                .collect()
        };
        self.thaw_claimed(cut, claimed);
    }

    /// Moves a cut that is over towards its durable end: thaw (retried a few times), delete void
    /// snapshots, make kept ones durable, journal the end, publish it. Safe to call from any
    /// thread, any number of times; the thaw never waits for another thread's journal write.
    pub(super) fn settle(&self, cut: &Arc<Cut>) -> Result<(), EngineError> {
        // Thaw first, without the settling lock: a stalled journal write elsewhere must not hold
        // up a thaw.
        for attempt in 0..3u32 {
            self.thaw_everything(cut);
            let retry = {
                let state = lock(&cut.state);
                state.problems.contains_key(CONDITION_THAW_FAILED)
                    && matches!(state.phase, CutPhase::Thawing { .. })
            };
            if !retry {
                break;
            }
            std::thread::sleep(Duration::from_millis(50 << attempt));
        }
        self.note_thawed(cut);

        let _one = lock(&cut.settling);
        let mut notify = false;
        loop {
            self.thaw_everything(cut);
            self.note_thawed(cut);
            let (phase, void) = {
                let state = lock(&cut.state);
                let void: Vec<(usize, SnapshotHandle)> = match state.phase {
                    CutPhase::Settling {
                        outcome: Outcome::Aborted | Outcome::Failed,
                    } => state.made.iter().map(|(i, h)| (*i, h.clone())).collect(),
                    _ => Vec::new(),
                };
                (state.phase, void)
            };
            let outcome = match phase {
                CutPhase::Settling { outcome } => outcome,
                // An ended cut whose void snapshots could not all be deleted: retry, and journal
                // what is left.
                CutPhase::Aborted | CutPhase::Failed => {
                    let left: Vec<(usize, SnapshotHandle)> = lock(&cut.state)
                        .made
                        .iter()
                        .map(|(i, h)| (*i, h.clone()))
                        .collect();
                    if !left.is_empty() {
                        self.delete_void(cut, left);
                        if let Some(entry) = lock(&cut.state).entry_to_write() {
                            self.inner.journal.write(&entry)?;
                        }
                        notify = true;
                    }
                    break;
                }
                _ => break,
            };
            if !void.is_empty() {
                self.delete_void(cut, void);
            }
            if outcome == Outcome::Released {
                let kept: Vec<SnapshotHandle> = lock(&cut.state).made.values().cloned().collect();
                for h in &kept {
                    if let Err(e) = backend::persist(h) {
                        tracing::warn!(handle = %h, error = %e, "could not make a snapshot durable");
                    }
                }
            }
            let Some(entry) = lock(&cut.state).entry_to_write() else {
                break;
            };
            match self.inner.journal.write(&entry) {
                Ok(()) => {
                    let mut state = lock(&cut.state);
                    state.solved(CONDITION_JOURNAL_FAILED);
                    if state.phase == phase {
                        state.entry = entry;
                        state.apply(CutEvent::EndJournaled);
                        state.publish();
                        notify = true;
                    }
                    // Otherwise the phase moved on while writing (an abort): write again.
                }
                Err(e) => {
                    let mut state = lock(&cut.state);
                    state.problem(
                        CONDITION_JOURNAL_FAILED,
                        "JournalWriteFailed",
                        format!(
                            "the volumes are thawed, but the agent cannot record it in its journal ({e}); the status is updated once it can"
                        ),
                    );
                    drop(state);
                    self.changed(&cut.key);
                    return Err(e.into());
                }
            }
        }
        if notify {
            self.changed(&cut.key);
        }
        Ok(())
    }

    /// Once nothing can be frozen any more: the lifecycle's AllThawed, the watchdog told, the
    /// superblocks free for other cuts.
    pub(super) fn note_thawed(&self, cut: &Arc<Cut>) {
        let mut state = lock(&cut.state);
        let in_flight = state.in_flight > 0;
        if let CutPhase::Thawing {
            freezes_in_flight: true,
            ..
        } = state.phase
        {
            let mounts: Vec<String> = state
                .freezes
                .iter()
                .zip(&state.entry.frozen)
                .filter(|(r, _)| r.is_none())
                .map(|(_, rec)| rec.mount_point.display().to_string())
                .collect();
            let message = format!(
                "the cut is over, but FIFREEZE of {} has not returned yet; it is thawed the moment it does",
                mounts.join(", ")
            );
            state.problem(CONDITION_FREEZE_IN_FLIGHT, "FreezeInFlight", message);
        }
        if !in_flight {
            state.solved(CONDITION_FREEZE_IN_FLIGHT);
        }
        let thawed = matches!(
            state.phase,
            CutPhase::Thawing {
                freezes_in_flight: false,
                ..
            }
        ) && state.frozen.is_empty()
            && state.apply(CutEvent::AllThawed);
        let over = !state.phase.may_be_frozen();
        drop(state);
        if thawed || over {
            cut.thawed.set();
            self.release_superblocks(&cut.key);
        }
    }

    /// Deletes void snapshots; each leaves `made` only once its delete succeeded.
    pub(super) fn delete_void(&self, cut: &Arc<Cut>, void: Vec<(usize, SnapshotHandle)>) {
        let mut failed = Vec::new();
        let mut deleted = Vec::new();
        for (i, h) in void {
            match delete_own(&h, &self.inner.config.backend) {
                Ok(()) => deleted.push(i),
                Err(e) => {
                    tracing::error!(handle = %h, error = %e, "could not delete a void snapshot; retrying later");
                    failed.push(format!("{h}: {e}"));
                }
            }
        }
        let mut state = lock(&cut.state);
        for i in deleted {
            state.made.remove(&i);
        }
        if failed.is_empty() {
            state.solved(CONDITION_DELETE_FAILED);
        } else {
            state.problem(
                CONDITION_DELETE_FAILED,
                "DeleteFailed",
                format!(
                    "cannot delete {}; the agent keeps them journaled and retries",
                    failed.join("; ")
                ),
            );
        }
    }

    /// Thaws a held cut and keeps its snapshots (`Release`).
    pub fn release(&self, key: &str) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        let Some(cut) = self.find(key)? else {
            return Ok(None);
        };
        {
            let mut state = lock(&cut.state);
            if state.phase == CutPhase::Held {
                state.apply(CutEvent::Release);
            }
        }
        self.end(&cut);
        Ok(Some(lock(&cut.state).status()))
    }

    /// Thaws (if held) and deletes the snapshots (`Abort`, the watchdog, or a failure elsewhere in
    /// the group). Also turns a released cut into an aborted one.
    pub fn abort(
        &self,
        key: &str,
        message: &str,
    ) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        let Some(cut) = self.find(key)? else {
            return Ok(None);
        };
        {
            let mut state = lock(&cut.state);
            let before = state.phase.outcome();
            state.apply(CutEvent::Abort);
            if before != Some(Outcome::Aborted)
                && before != Some(Outcome::Failed)
                && state.phase.outcome() == Some(Outcome::Aborted)
            {
                state.end_message = Some(message.to_string());
            }
        }
        self.end(&cut);
        Ok(Some(lock(&cut.state).status()))
    }

    /// Aborts every cut that still holds a freeze (on shutdown).
    pub fn abort_all_held(&self, message: &str) {
        let held: Vec<String> = lock(&self.inner.cuts)
            .iter()
            .filter(|(_, c)| lock(&c.state).phase.may_be_frozen())
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            if let Err(e) = self.abort(&key, message) {
                tracing::error!(key, error = %e, "abort on shutdown could not update the journal");
            }
        }
    }

    /// Called by the watchdog at the deadline.
    pub(super) fn watchdog_fired(&self, key: &str, timeout: Duration) {
        let message = format!(
            "the freeze lasted freezeTimeoutSeconds ({}s) without a release: the agent's watchdog thawed the volumes and deleted the snapshots",
            timeout.as_secs()
        );
        match self.abort(key, &message) {
            Ok(_) => tracing::warn!(key, "watchdog thawed a freeze that was held too long"),
            Err(e) => {
                tracing::error!(key, error = %e, "watchdog abort could not update the journal (volumes are thawed)")
            }
        }
        self.changed(key);
        if let Some(notify) = lock(&self.inner.notifier).as_ref() {
            notify(key);
        }
    }

    /// The NodeSnapshot is going away: thaw if held, delete the snapshots unless `retain`, and
    /// forget the cut. A delete that fails keeps the cut journaled (and the caller keeps its
    /// finalizer): the error says what to retry.
    pub fn finalize(&self, key: &str, retain: bool) -> Result<(), EngineError> {
        let Some(cut) = self.find(key)? else {
            return Ok(());
        };
        if !lock(&cut.state).phase.is_over() {
            self.abort(
                key,
                "the NodeSnapshot was deleted while its freeze was held",
            )?;
        }
        self.settle(&cut)?;
        let void: Vec<(usize, SnapshotHandle)> = {
            let mut state = lock(&cut.state);
            if !matches!(
                state.phase,
                CutPhase::Released
                    | CutPhase::Aborted
                    | CutPhase::Failed
                    | CutPhase::Deleting { .. }
            ) {
                let why: Vec<String> = state.problems.values().map(|c| c.message.clone()).collect();
                return Err(EngineError::NotSettled {
                    key: key.into(),
                    why: if why.is_empty() {
                        format!("{:?}", state.phase)
                    } else {
                        why.join("; ")
                    },
                });
            }
            state.apply(CutEvent::Finalize { retain });
            match state.phase {
                CutPhase::Deleting { keep: false } => {
                    state.made.iter().map(|(i, h)| (*i, h.clone())).collect()
                }
                _ => Vec::new(),
            }
        };
        if !void.is_empty() {
            self.delete_void(&cut, void);
        }
        let remaining = {
            let state = lock(&cut.state);
            match state.phase {
                CutPhase::Deleting { keep: false } if !state.made.is_empty() => state
                    .problems
                    .get(CONDITION_DELETE_FAILED)
                    .map(|c| c.message.clone()),
                _ => None,
            }
        };
        if let Some(problems) = remaining {
            // Keep what is left journaled for the retry (and for a restart).
            let entry = {
                let state = lock(&cut.state);
                let mut entry = state.entry.clone();
                entry.made = state.made.values().cloned().collect();
                let mut report = state.status();
                report
                    .conditions
                    .retain(|c| c.type_ != CONDITION_JOURNAL_FAILED);
                entry.report = Some(report);
                entry
            };
            if let Err(e) = self.inner.journal.write(&entry) {
                tracing::warn!(key, error = %e, "cannot journal the snapshots left to delete");
            }
            self.changed(key);
            return Err(EngineError::DeleteFailed {
                key: key.into(),
                problems,
            });
        }
        self.inner.journal.remove(key)?;
        lock(&cut.state).apply(CutEvent::Deleted);
        lock(&self.inner.cuts).remove(key);
        Ok(())
    }
}
