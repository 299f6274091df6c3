//! A restore's decisions as pure logic: from what the NodeRestore asks (its spec, whether it is
//! being deleted, the phase last published), what the clone journal says and whether a clone job
//! of this run is in flight, to the one thing to do next ([`decide`]); the status that follows
//! from a journal entry ([`status`]); where a restarted agent resumes ([`recovered`]); and how a
//! volume's member snapshot is found in the cut journal ([`member_snapshot`]).
//!
//! The rules it encodes:
//! - Nothing is cloned before the intent is journaled, and never twice: a NodeRestore with a
//!   journal entry is never begun again.
//! - All or nothing on the node: a restore whose cloning did not finish (a clone failed, it was
//!   aborted, the agent restarted) deletes every clone it may have made before it reports.
//! - Abort and deletion win over everything, except that a clone job in flight is asked to stop
//!   first (it stops between clones) and rolls back itself.
//! - The finalizer goes only once nothing of the restore may exist (the entry has ended).
//! - `Cloned` is published only once durably journaled: a restart must never roll back clones the
//!   controller was told exist.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::agent::backend::SnapshotHandle;
use crate::agent::journal::{self as cut_journal, JournalEntry};
use crate::api::{
    CONDITION_READY, CloneState as ApiCloneState, ClonedVolume, NodeRestoreAction,
    NodeRestorePhase, NodeRestoreStatus, RestoreVolume,
};
use crate::conditions::condition;

use super::journal::{CloneState, Outcome, Problem, RestoreEntry, Stage};

/// The message of a restore rolled back because the agent restarted while cloning.
pub const RESTARTED: &str = "the agent restarted while cloning; the restore is rolled back";
/// The message of a restore whose clone job stopped without finishing (not a restart).
pub const STOPPED: &str = "cloning stopped before it finished; the restore is rolled back";
/// The message of an abort asked by the controller.
pub const ABORTED: &str = "aborted by the controller: every clone of this node is deleted";
/// The message of a NodeRestore deleted before it ended.
pub const DELETED: &str = "the NodeRestore was deleted: every clone of this node is deleted";
/// The message of an abort that came before anything was cloned.
pub const ABORTED_BEFORE_START: &str = "aborted before this node cloned anything";
/// The message of a restore the agent has no record of although it was started.
pub const LOST: &str = "the agent has no record of these clones (its state directory was lost); whatever it made is not tracked any more";

/// Condition: a clone could not be deleted; the agent keeps it journaled and retries.
pub const CONDITION_DELETE_FAILED: &str = "DeleteFailed";
/// Condition: a kept clone could not be attached at start (loop device, LV, bind mount).
pub const CONDITION_ATTACH_FAILED: &str = "AttachFailed";
/// Condition: the clone journal could not be written; `Cloned` is not published until it is.
pub const CONDITION_JOURNAL_FAILED: &str = "JournalWriteFailed";

/// What the agent sees of one NodeRestore.
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// `metadata.deletionTimestamp` is set.
    pub deleting: bool,
    pub action: NodeRestoreAction,
    /// The spec's volumes (for `release`).
    pub volumes: &'a [RestoreVolume],
    /// The phase last published in status.
    pub published: NodeRestorePhase,
    /// The clone journal entry (in memory; durable unless being retried).
    pub entry: Option<&'a RestoreEntry>,
    /// A clone job of this run is in flight for this NodeRestore.
    pub running: bool,
}

/// The one thing to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Put the finalizer on, find every member snapshot, journal the intent and start cloning.
    Begin,
    /// A clone job is in flight and the restore must end: ask it to stop (it rolls back).
    Cancel,
    /// A clone job is in flight: report its progress.
    Wait,
    /// Delete these released clones and report them Deleted.
    Release(Vec<String>),
    /// Delete every clone that may exist (retried until all are gone), then end as `outcome`.
    RollBack { outcome: Outcome, message: String },
    /// Nothing of the restore may exist: drop the finalizer and forget the entry.
    Finalize,
    /// Started (published Cloning/Cloned) but not journaled here: report Failed ([`LOST`]).
    Lost,
    /// Aborted before anything was journaled: report Aborted ([`ABORTED_BEFORE_START`]).
    AbortedBeforeStart,
    /// Nothing to do; report what is known.
    Report,
}

/// The next step for a NodeRestore. Total: every input has an answer.
pub fn decide(o: &Observed<'_>) -> Next {
    let ending = o.deleting || o.action == NodeRestoreAction::Abort;
    let end_message = || if o.deleting { DELETED } else { ABORTED }.to_string();
    let Some(entry) = o.entry else {
        return if o.deleting {
            Next::Finalize
        } else if matches!(
            o.published,
            NodeRestorePhase::Failed | NodeRestorePhase::Aborted
        ) {
            Next::Report
        } else if o.action == NodeRestoreAction::Abort {
            Next::AbortedBeforeStart
        } else if o.published == NodeRestorePhase::Pending {
            Next::Begin
        } else {
            Next::Lost
        };
    };
    if o.running {
        return if ending && entry.stage == Stage::Cloning {
            Next::Cancel
        } else {
            Next::Wait
        };
    }
    match entry.stage {
        Stage::Cloning => Next::RollBack {
            outcome: if ending {
                Outcome::Aborted
            } else {
                Outcome::Failed
            },
            message: if ending {
                end_message()
            } else {
                STOPPED.to_string()
            },
        },
        Stage::Cloned if ending => Next::RollBack {
            outcome: Outcome::Aborted,
            message: end_message(),
        },
        Stage::Cloned => {
            let released: Vec<String> = o
                .volumes
                .iter()
                .filter(|v| v.release)
                .filter(|v| {
                    entry
                        .clone_of(&v.persistent_volume)
                        .is_some_and(|c| c.may_exist())
                })
                .map(|v| v.persistent_volume.clone())
                .collect();
            if released.is_empty() {
                Next::Report
            } else {
                Next::Release(released)
            }
        }
        Stage::RollingBack { outcome } => Next::RollBack {
            outcome,
            message: entry.message.clone().unwrap_or_else(end_message),
        },
        Stage::Ended { .. } if o.deleting => Next::Finalize,
        Stage::Ended { .. } => Next::Report,
    }
}

/// The stage an entry is in when an agent starts and finds it journaled, with the message to
/// report: cloning that was not finished is rolled back (no process makes those clones any more).
pub fn recovered(stage: Stage) -> Option<(Stage, &'static str)> {
    match stage {
        Stage::Cloning => Some((
            Stage::RollingBack {
                outcome: Outcome::Failed,
            },
            RESTARTED,
        )),
        _ => None,
    }
}

/// Per volume: bytes copied so far and the total, while a `Copy` runs.
pub type ProgressMap = HashMap<String, (u64, u64)>;

/// Whether an entry in memory is what the journal holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Journaled {
    Yes,
    /// A write is in flight.
    Writing,
    /// The last write failed; retried.
    Failed,
}

/// The status of a NodeRestore whose clones are journaled. `Cloned` is shown only once durable
/// (else as `Cloning`); a failed journal write is a condition.
pub fn status(
    entry: &RestoreEntry,
    progress: &ProgressMap,
    journaled: Journaled,
    previous: &[Condition],
    generation: Option<i64>,
) -> NodeRestoreStatus {
    let phase = match entry.stage {
        Stage::Cloned if journaled == Journaled::Yes => NodeRestorePhase::Cloned,
        Stage::Cloning | Stage::Cloned | Stage::RollingBack { .. } => NodeRestorePhase::Cloning,
        Stage::Ended {
            outcome: Outcome::Failed,
        } => NodeRestorePhase::Failed,
        Stage::Ended {
            outcome: Outcome::Aborted,
        } => NodeRestorePhase::Aborted,
    };
    let volumes = entry
        .clones
        .iter()
        .map(|c| {
            let made = c.made.as_ref().filter(|_| c.state == CloneState::Made);
            ClonedVolume {
                persistent_volume: c.persistent_volume.clone(),
                state: match c.state {
                    CloneState::Intent => ApiCloneState::Cloning,
                    CloneState::Made => ApiCloneState::Cloned,
                    CloneState::Failed => ApiCloneState::Failed,
                    CloneState::Deleted => ApiCloneState::Deleted,
                },
                method: c.made.as_ref().map(|m| m.method).unwrap_or_default(),
                backend: Some(c.plan.backend.name().to_string()),
                clone_handle: Some(c.plan.handle.to_string()),
                path: made.map(|m| m.path.to_string_lossy().into_owned()),
                block: made.is_some_and(|m| m.block),
                filesystem: c.filesystem.clone(),
                size_bytes: made.map(|m| i64::try_from(m.size_bytes).unwrap_or(i64::MAX)),
                copied_bytes: match (c.state, progress.get(&c.persistent_volume)) {
                    (CloneState::Intent, Some((copied, _))) => {
                        Some(i64::try_from(*copied).unwrap_or(i64::MAX))
                    }
                    _ => None,
                },
                cloned_at: made.and_then(|m| m.cloned_at.parse().ok().map(Time)),
                message: match &c.problem {
                    Some(Problem::Delete(e)) => Some(format!("cannot delete the clone: {e}")),
                    Some(Problem::Attach(e)) => Some(format!("cannot attach the clone: {e}")),
                    None => c.message.clone(),
                },
            }
        })
        .collect();
    let message = match entry.stage {
        Stage::RollingBack { .. } => Some(format!(
            "rolling back, deleting every clone: {}",
            entry
                .message
                .as_deref()
                .unwrap_or("the restore did not finish")
        )),
        _ => entry.message.clone(),
    };
    let (ready, reason, why) = match phase {
        NodeRestorePhase::Cloned => (true, "Cloned", "every clone exists".to_string()),
        NodeRestorePhase::Cloning if matches!(entry.stage, Stage::RollingBack { .. }) => {
            (false, "RollingBack", message.clone().unwrap_or_default())
        }
        NodeRestorePhase::Cloning => (false, "Cloning", "cloning".to_string()),
        NodeRestorePhase::Failed => (false, "Failed", message.clone().unwrap_or_default()),
        _ => (false, "Aborted", message.clone().unwrap_or_default()),
    };
    let mut conditions = vec![condition(
        previous,
        CONDITION_READY,
        ready,
        reason,
        why,
        generation,
    )];
    let problems = |delete: bool| -> Vec<String> {
        entry
            .clones
            .iter()
            .filter_map(|c| match (&c.problem, delete) {
                (Some(Problem::Delete(e)), true) | (Some(Problem::Attach(e)), false) => {
                    Some(format!("{}: {e}", c.persistent_volume))
                }
                _ => None,
            })
            .collect()
    };
    for (type_, delete, what) in [
        (
            CONDITION_DELETE_FAILED,
            true,
            "cannot delete clones (kept journaled, retried)",
        ),
        (
            CONDITION_ATTACH_FAILED,
            false,
            "cannot attach clones after the agent started (retried)",
        ),
    ] {
        let list = problems(delete);
        if !list.is_empty() {
            conditions.push(condition(
                previous,
                type_,
                true,
                type_,
                format!("{what}: {}", list.join("; ")),
                generation,
            ));
        }
    }
    if journaled == Journaled::Failed {
        conditions.push(condition(
            previous,
            CONDITION_JOURNAL_FAILED,
            true,
            CONDITION_JOURNAL_FAILED,
            "the clone journal cannot be written; retried".into(),
            generation,
        ));
    }
    NodeRestoreStatus {
        observed_generation: generation,
        phase,
        volumes,
        message,
        conditions,
    }
}

/// A status with no journal entry behind it: refused before anything was made, aborted before the
/// start, or lost.
pub fn status_without_clones(
    phase: NodeRestorePhase,
    message: &str,
    previous: &[Condition],
    generation: Option<i64>,
) -> NodeRestoreStatus {
    NodeRestoreStatus {
        observed_generation: generation,
        phase,
        volumes: Vec::new(),
        message: Some(message.to_string()),
        conditions: vec![condition(
            previous,
            CONDITION_READY,
            false,
            if phase == NodeRestorePhase::Aborted {
                "Aborted"
            } else {
                "Failed"
            },
            message.to_string(),
            generation,
        )],
    }
}

/// Checks the NodeSnapshot the volume names is the one whose cut it means (`found_uid`: the uid of
/// the NodeSnapshot of that name now, None when there is none).
pub fn check_node_snapshot(volume: &RestoreVolume, found_uid: Option<&str>) -> Result<(), String> {
    match found_uid {
        None => Err(format!(
            "the NodeSnapshot {} does not exist any more",
            volume.node_snapshot
        )),
        Some(uid) if uid != volume.node_snapshot_uid => Err(format!(
            "the NodeSnapshot {} is now another object (uid {uid}, not {}): it was recreated, and its cut is not the one restored",
            volume.node_snapshot, volume.node_snapshot_uid
        )),
        Some(_) => Ok(()),
    }
}

/// Finds a volume's member snapshot in the cut journal entry of its NodeSnapshot (`cut`: the
/// entry under `nodeSnapshotUid`): the handle the cut made for `sourceClaim`, owned by that cut,
/// of a cut that was released (its snapshots kept). Returns the handle and the filesystem.
pub fn member_snapshot(
    cut: Option<&JournalEntry>,
    volume: &RestoreVolume,
) -> Result<(SnapshotHandle, Option<String>), String> {
    let Some(cut) = cut else {
        return Err(format!(
            "this node has no snapshot of the NodeSnapshot {} (uid {}): it never cut it, or its snapshots were deleted",
            volume.node_snapshot, volume.node_snapshot_uid
        ));
    };
    if cut.key != volume.node_snapshot_uid {
        return Err(format!(
            "the cut journal entry is of uid {}, not {}",
            cut.key, volume.node_snapshot_uid
        ));
    }
    if cut.stage != cut_journal::Stage::Released {
        return Err(format!(
            "the cut of NodeSnapshot {} did not keep its snapshots (it is {:?})",
            volume.node_snapshot, cut.stage
        ));
    }
    let reported = cut
        .report
        .as_ref()
        .and_then(|r| r.volumes.iter().find(|v| v.claim == volume.source_claim));
    let Some(reported) = reported else {
        return Err(format!(
            "the cut of NodeSnapshot {} has no volume of claim {}",
            volume.node_snapshot, volume.source_claim
        ));
    };
    let Some(wanted) = reported.snapshot_handle.as_deref() else {
        return Err(format!(
            "the cut of NodeSnapshot {} made no snapshot of claim {}",
            volume.node_snapshot, volume.source_claim
        ));
    };
    let handle = cut
        .made
        .iter()
        .find(|h| h.to_string() == wanted)
        .ok_or_else(|| {
            format!(
                "the snapshot {wanted} of claim {} is not among those the cut of NodeSnapshot {} made and kept (deleted?)",
                volume.source_claim, volume.node_snapshot
            )
        })?;
    if handle.owner() != volume.node_snapshot_uid {
        return Err(format!(
            "the snapshot {wanted} belongs to {:?}, not to the NodeSnapshot uid {}",
            handle.owner(),
            volume.node_snapshot_uid
        ));
    }
    Ok((handle.clone(), reported.filesystem.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::journal::JOURNAL_VERSION;
    use crate::agent::restore::journal::{CloneRecord, MadeClone, tests::record};
    use crate::api::{CloneMethod, NodeSnapshotStatus, VolumeStatus};

    fn entry(stage: Stage, states: &[CloneState]) -> RestoreEntry {
        RestoreEntry {
            version: 1,
            key: "restore-uid".into(),
            namespace: "ns".into(),
            name: "r".into(),
            stage,
            message: None,
            clones: states
                .iter()
                .enumerate()
                .map(|(i, s)| made(record(&format!("pv-{i}"), *s)))
                .collect(),
        }
    }

    fn made(mut r: CloneRecord) -> CloneRecord {
        if r.state == CloneState::Made {
            r.made = Some(MadeClone {
                path: format!("/dev/tandem/{}", r.persistent_volume).into(),
                block: true,
                size_bytes: 64 << 20,
                method: CloneMethod::Clone,
                cloned_at: "2026-12-01T10:00:00Z".into(),
            });
        }
        r
    }

    fn vols(released: &[bool]) -> Vec<RestoreVolume> {
        released
            .iter()
            .enumerate()
            .map(|(i, r)| RestoreVolume {
                persistent_volume: format!("pv-{i}"),
                release: *r,
                ..Default::default()
            })
            .collect()
    }

    const CLONE: NodeRestoreAction = NodeRestoreAction::Clone;
    const ABORT: NodeRestoreAction = NodeRestoreAction::Abort;
    use CloneState::{Deleted as D, Failed as F, Intent as I, Made as M};
    use NodeRestorePhase as P;

    fn rollback(outcome: Outcome, message: &str) -> Next {
        Next::RollBack {
            outcome,
            message: message.into(),
        }
    }

    /// Every combination that matters: (deleting, action, released, published, entry, running).
    #[test]
    fn decisions() {
        let cloning = entry(Stage::Cloning, &[M, I]);
        let cloned = entry(Stage::Cloned, &[M, M]);
        let half_released = entry(Stage::Cloned, &[D, M]);
        let mut rolling = entry(
            Stage::RollingBack {
                outcome: Outcome::Failed,
            },
            &[M, F],
        );
        rolling.message = Some("clone of pv-1 failed".into());
        let failed = entry(
            Stage::Ended {
                outcome: Outcome::Failed,
            },
            &[D, F],
        );
        let aborted = entry(
            Stage::Ended {
                outcome: Outcome::Aborted,
            },
            &[D, D],
        );
        type Row<'a> = (
            bool,
            NodeRestoreAction,
            &'a [bool],
            NodeRestorePhase,
            Option<&'a RestoreEntry>,
            bool,
            Next,
        );
        let table: Vec<Row> = vec![
            // Nothing journaled.
            (false, CLONE, &[false], P::Pending, None, false, Next::Begin),
            (false, CLONE, &[false], P::Cloning, None, false, Next::Lost),
            (false, CLONE, &[false], P::Cloned, None, false, Next::Lost),
            (false, CLONE, &[false], P::Failed, None, false, Next::Report),
            (
                false,
                CLONE,
                &[false],
                P::Aborted,
                None,
                false,
                Next::Report,
            ),
            (
                false,
                ABORT,
                &[false],
                P::Pending,
                None,
                false,
                Next::AbortedBeforeStart,
            ),
            (
                false,
                ABORT,
                &[false],
                P::Cloned,
                None,
                false,
                Next::AbortedBeforeStart,
            ),
            (false, ABORT, &[false], P::Failed, None, false, Next::Report),
            (
                true,
                CLONE,
                &[false],
                P::Pending,
                None,
                false,
                Next::Finalize,
            ),
            (
                true,
                ABORT,
                &[false],
                P::Cloned,
                None,
                false,
                Next::Finalize,
            ),
            // A job in flight: asked to stop by an abort or a delete, else waited for.
            (
                false,
                CLONE,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                true,
                Next::Wait,
            ),
            (
                false,
                CLONE,
                &[true, true],
                P::Cloning,
                Some(&cloning),
                true,
                Next::Wait,
            ),
            (
                false,
                ABORT,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                true,
                Next::Cancel,
            ),
            (
                true,
                CLONE,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                true,
                Next::Cancel,
            ),
            // The job rolling back itself is waited for, abort or not.
            (
                false,
                ABORT,
                &[false, false],
                P::Cloning,
                Some(&rolling),
                true,
                Next::Wait,
            ),
            // Cloning journaled but no job: it stopped; rolled back.
            (
                false,
                CLONE,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                false,
                rollback(Outcome::Failed, STOPPED),
            ),
            (
                false,
                ABORT,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                false,
                rollback(Outcome::Aborted, ABORTED),
            ),
            (
                true,
                ABORT,
                &[false, false],
                P::Cloning,
                Some(&cloning),
                false,
                rollback(Outcome::Aborted, DELETED),
            ),
            // Cloned: kept, released one by one, or all deleted on abort / deletion.
            (
                false,
                CLONE,
                &[false, false],
                P::Cloned,
                Some(&cloned),
                false,
                Next::Report,
            ),
            (
                false,
                CLONE,
                &[false, true],
                P::Cloned,
                Some(&cloned),
                false,
                Next::Release(vec!["pv-1".into()]),
            ),
            (
                false,
                CLONE,
                &[true, true],
                P::Cloned,
                Some(&cloned),
                false,
                Next::Release(vec!["pv-0".into(), "pv-1".into()]),
            ),
            (
                false,
                CLONE,
                &[true, true],
                P::Cloned,
                Some(&half_released),
                false,
                Next::Release(vec!["pv-1".into()]),
            ),
            (
                false,
                CLONE,
                &[true, false],
                P::Cloned,
                Some(&half_released),
                false,
                Next::Report,
            ),
            (
                false,
                ABORT,
                &[false, false],
                P::Cloned,
                Some(&cloned),
                false,
                rollback(Outcome::Aborted, ABORTED),
            ),
            (
                true,
                CLONE,
                &[false, false],
                P::Cloned,
                Some(&cloned),
                false,
                rollback(Outcome::Aborted, DELETED),
            ),
            (
                true,
                CLONE,
                &[true, true],
                P::Cloned,
                Some(&half_released),
                false,
                rollback(Outcome::Aborted, DELETED),
            ),
            // Rolling back goes on with its own outcome and message, whatever is asked meanwhile.
            (
                false,
                CLONE,
                &[false, false],
                P::Cloning,
                Some(&rolling),
                false,
                rollback(Outcome::Failed, "clone of pv-1 failed"),
            ),
            (
                true,
                ABORT,
                &[false, false],
                P::Cloning,
                Some(&rolling),
                false,
                rollback(Outcome::Failed, "clone of pv-1 failed"),
            ),
            // Ended: reported; the finalizer goes with the deletion.
            (
                false,
                CLONE,
                &[false, false],
                P::Failed,
                Some(&failed),
                false,
                Next::Report,
            ),
            (
                false,
                ABORT,
                &[false, false],
                P::Aborted,
                Some(&aborted),
                false,
                Next::Report,
            ),
            (
                true,
                ABORT,
                &[false, false],
                P::Failed,
                Some(&failed),
                false,
                Next::Finalize,
            ),
            (
                true,
                CLONE,
                &[false, false],
                P::Aborted,
                Some(&aborted),
                false,
                Next::Finalize,
            ),
        ];
        for (i, (deleting, action, released, published, entry, running, want)) in
            table.into_iter().enumerate()
        {
            let volumes = vols(released);
            let o = Observed {
                deleting,
                action,
                volumes: &volumes,
                published,
                entry,
                running,
            };
            assert_eq!(decide(&o), want, "row {i}: {o:?}");
        }
    }

    /// Whatever is asked, a NodeRestore with an entry is never begun again, and nothing that may
    /// hold a clone is finalized.
    #[test]
    fn never_begun_twice_and_never_finalized_while_holding_clones() {
        let stages = [
            Stage::Cloning,
            Stage::Cloned,
            Stage::RollingBack {
                outcome: Outcome::Failed,
            },
            Stage::RollingBack {
                outcome: Outcome::Aborted,
            },
            Stage::Ended {
                outcome: Outcome::Failed,
            },
            Stage::Ended {
                outcome: Outcome::Aborted,
            },
        ];
        let phases = [P::Pending, P::Cloning, P::Cloned, P::Aborted, P::Failed];
        for stage in stages {
            for states in [[M, M], [M, I], [D, F], [D, D]] {
                let e = entry(stage, &states);
                for deleting in [false, true] {
                    for action in [CLONE, ABORT] {
                        for published in phases {
                            for running in [false, true] {
                                for released in [[false, false], [true, true]] {
                                    let volumes = vols(&released);
                                    let o = Observed {
                                        deleting,
                                        action,
                                        volumes: &volumes,
                                        published,
                                        entry: Some(&e),
                                        running,
                                    };
                                    let next = decide(&o);
                                    assert_ne!(next, Next::Begin, "{o:?}");
                                    if next == Next::Finalize {
                                        assert!(matches!(stage, Stage::Ended { .. }), "{o:?}");
                                    }
                                    if running {
                                        assert!(
                                            matches!(next, Next::Wait | Next::Cancel),
                                            "{o:?}: {next:?}"
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_restart_rolls_back_unfinished_cloning_and_keeps_the_rest() {
        assert_eq!(
            recovered(Stage::Cloning),
            Some((
                Stage::RollingBack {
                    outcome: Outcome::Failed
                },
                RESTARTED
            ))
        );
        for kept in [
            Stage::Cloned,
            Stage::RollingBack {
                outcome: Outcome::Aborted,
            },
            Stage::Ended {
                outcome: Outcome::Failed,
            },
        ] {
            assert_eq!(recovered(kept), None);
        }
    }

    #[test]
    fn status_follows_the_entry() {
        let none = ProgressMap::new();
        let s = status(
            &entry(Stage::Cloned, &[M, M]),
            &none,
            Journaled::Yes,
            &[],
            Some(3),
        );
        assert_eq!(s.phase, P::Cloned);
        assert_eq!(s.observed_generation, Some(3));
        assert!(s.volumes.iter().all(|v| {
            v.state == ApiCloneState::Cloned
                && v.block
                && v.path.is_some()
                && v.size_bytes == Some(64 << 20)
                && v.cloned_at.is_some()
                && v.backend.as_deref() == Some("reflink")
                && v.clone_handle
                    .as_deref()
                    .is_some_and(|h| h.starts_with("reflink:"))
                && v.filesystem.as_deref() == Some("xfs")
        }));
        assert_eq!(s.conditions[0].status, "True");

        // Not durable yet: never Cloned; a failed write is a condition, one in flight is not.
        let cloned = entry(Stage::Cloned, &[M, M]);
        let s = status(&cloned, &none, Journaled::Failed, &[], None);
        assert_eq!(s.phase, P::Cloning);
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_JOURNAL_FAILED)
        );
        let s = status(&cloned, &none, Journaled::Writing, &[], None);
        assert_eq!(s.phase, P::Cloning);
        assert_eq!(s.conditions.len(), 1);

        // Progress of a copy in flight.
        let progress = ProgressMap::from([("pv-1".to_string(), (10u64, 100u64))]);
        let s = status(
            &entry(Stage::Cloning, &[M, I]),
            &progress,
            Journaled::Yes,
            &[],
            None,
        );
        assert_eq!(s.phase, P::Cloning);
        assert_eq!(s.volumes[1].state, ApiCloneState::Cloning);
        assert_eq!(s.volumes[1].copied_bytes, Some(10));
        assert_eq!(s.volumes[1].path, None);
        assert_eq!(s.volumes[0].copied_bytes, None);

        // Rolling back with a delete that fails: Cloning, said why, DeleteFailed.
        let mut e = entry(
            Stage::RollingBack {
                outcome: Outcome::Aborted,
            },
            &[M, D],
        );
        e.message = Some(ABORTED.into());
        e.clones[0].problem = Some(Problem::Delete("EPERM".into()));
        let s = status(&e, &none, Journaled::Yes, &[], None);
        assert_eq!(s.phase, P::Cloning);
        assert!(s.message.as_deref().unwrap().contains("rolling back"));
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_DELETE_FAILED && c.message.contains("pv-0: EPERM"))
        );
        assert_eq!(s.volumes[1].state, ApiCloneState::Deleted);
        assert_eq!(s.volumes[1].path, None);
        assert!(s.volumes[0].message.as_deref().unwrap().contains("EPERM"));
        e.clones[0].problem = Some(Problem::Attach("no loop device".into()));
        let s = status(&e, &none, Journaled::Yes, &[], None);
        assert!(
            s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_ATTACH_FAILED)
        );
        assert!(
            !s.conditions
                .iter()
                .any(|c| c.type_ == CONDITION_DELETE_FAILED)
        );

        // Ended.
        let mut e = entry(
            Stage::Ended {
                outcome: Outcome::Failed,
            },
            &[D, F],
        );
        e.message = Some("clone of pv-1 failed: no space".into());
        let s = status(&e, &none, Journaled::Yes, &[], None);
        assert_eq!(s.phase, P::Failed);
        assert_eq!(s.volumes[1].state, ApiCloneState::Failed);
        assert_eq!(s.conditions.len(), 1);
        assert_eq!(s.conditions[0].reason, "Failed");
        let s = status(
            &entry(
                Stage::Ended {
                    outcome: Outcome::Aborted,
                },
                &[D, D],
            ),
            &none,
            Journaled::Yes,
            &[],
            None,
        );
        assert_eq!(s.phase, P::Aborted);
    }

    fn restore_volume() -> RestoreVolume {
        RestoreVolume {
            persistent_volume: "tandem-0123456789".into(),
            claim: "data-restored".into(),
            source_claim: "data".into(),
            source_persistent_volume: "pv-data".into(),
            node_snapshot: "snap-node-a".into(),
            node_snapshot_uid: "cut-uid".into(),
            release: false,
        }
    }

    fn cut_entry(stage: cut_journal::Stage) -> JournalEntry {
        let handle = |pv: &str, owner: &str| SnapshotHandle::Reflink {
            clone: format!("/pool/.tandem-snapshots/{pv}.img").into(),
            owner: owner.into(),
        };
        JournalEntry {
            version: JOURNAL_VERSION,
            key: "cut-uid".into(),
            namespace: "ns".into(),
            name: "snap-node-a".into(),
            group_snapshot: "snap".into(),
            boot_id: None,
            stage,
            frozen: Vec::new(),
            snapshots: vec![handle("data", "cut-uid"), handle("wal", "cut-uid")],
            made: vec![handle("data", "cut-uid"), handle("wal", "other-uid")],
            report: Some(NodeSnapshotStatus {
                volumes: ["data", "wal", "log"]
                    .iter()
                    .map(|c| VolumeStatus {
                        claim: c.to_string(),
                        filesystem: Some("ext4".into()),
                        snapshot_handle: (*c != "log").then(|| handle(c, "cut-uid").to_string()),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_member_snapshot_is_found_through_the_claim_and_the_handle() {
        let v = restore_volume();
        let cut = cut_entry(cut_journal::Stage::Released);
        let (h, fs) = member_snapshot(Some(&cut), &v).unwrap();
        assert_eq!(h.to_string(), "reflink:/pool/.tandem-snapshots/data.img");
        assert_eq!(h.owner(), "cut-uid");
        assert_eq!(fs.as_deref(), Some("ext4"));

        let refused = |cut: Option<&JournalEntry>, v: &RestoreVolume, needle: &str| {
            let e = member_snapshot(cut, v).unwrap_err();
            assert!(e.contains(needle), "{e:?} lacks {needle:?}");
        };
        refused(None, &v, "has no snapshot of the NodeSnapshot snap-node-a");
        refused(
            Some(&cut_entry(cut_journal::Stage::Aborted)),
            &v,
            "did not keep its snapshots",
        );
        refused(
            Some(&cut_entry(cut_journal::Stage::Freezing)),
            &v,
            "did not keep its snapshots",
        );
        let mut other = v.clone();
        other.source_claim = "nope".into();
        refused(Some(&cut), &other, "has no volume of claim nope");
        other.source_claim = "log".into();
        refused(Some(&cut), &other, "made no snapshot of claim log");
        // The report names a handle the cut did not make (or no longer has).
        let mut gone = cut.clone();
        gone.made.remove(0);
        refused(Some(&gone), &v, "not among those the cut");
        // A made handle of another owner is never cloned.
        other.source_claim = "wal".into();
        let mut foreign = cut.clone();
        foreign.made = vec![SnapshotHandle::Reflink {
            clone: "/pool/.tandem-snapshots/wal.img".into(),
            owner: "other-uid".into(),
        }];
        refused(Some(&foreign), &other, "belongs to \"other-uid\"");
        // A journal entry under another key.
        let mut wrong = cut.clone();
        wrong.key = "x".into();
        refused(Some(&wrong), &v, "not cut-uid");
    }

    #[test]
    fn the_node_snapshot_must_be_the_one_named() {
        let v = restore_volume();
        assert_eq!(check_node_snapshot(&v, Some("cut-uid")), Ok(()));
        assert!(
            check_node_snapshot(&v, None)
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            check_node_snapshot(&v, Some("new-uid"))
                .unwrap_err()
                .contains("recreated")
        );
    }
}
