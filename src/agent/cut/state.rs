//! A cut's in-memory state: its phase, what it froze and made, and the status it publishes
//! (rendered from the phase, never kept beside it).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

use crate::agent::backend::SnapshotHandle;
use crate::agent::discovery::DevId;
use crate::agent::journal::{JournalEntry, Stage};
use crate::api::{CONDITION_READY, NodePhase, NodeSnapshotStatus, VolumeStatus};

use super::lifecycle::{self, Consistency, CutEvent, CutPhase};
use super::{CONDITION_DELETE_FAILED, CONDITION_JOURNAL_FAILED, CutRequest};

/// A filesystem this cut froze.
pub(super) struct FrozenFs {
    pub(super) target: usize,
    pub(super) superblock: DevId,
    pub(super) mount_point: PathBuf,
    pub(super) fd: OwnedFd,
}

pub(super) struct Frozen {
    pub(super) fs: Arc<FrozenFs>,
    /// A thread is thawing it right now (so it is thawed once, and stays listed until it is).
    pub(super) thawing: bool,
}

pub(super) struct CutState {
    pub(super) phase: CutPhase,
    /// The safety record (its stage is derived from `phase` when written).
    pub(super) entry: JournalEntry,
    pub(super) generation: Option<i64>,
    pub(super) release_after_cut: bool,
    pub(super) volumes: Vec<VolumeStatus>,
    /// Per freeze target: the volumes on it.
    pub(super) target_volumes: Vec<Vec<usize>>,
    pub(super) consistency: Option<Consistency>,
    /// Why the cut ended (the first decision's words).
    pub(super) end_message: Option<String>,
    pub(super) frozen: Vec<Frozen>,
    /// Per freeze target: None while its call is in flight, then whether it froze.
    pub(super) freezes: Vec<Option<Result<(), String>>>,
    pub(super) in_flight: usize,
    /// Snapshots made and not deleted, by volume index.
    pub(super) made: BTreeMap<usize, SnapshotHandle>,
    pub(super) first_freeze: Option<Instant>,
    pub(super) freeze_start: Option<MicroTime>,
    pub(super) window: Option<Duration>,
    pub(super) deadline: Option<Instant>,
    /// The status backed by the journal (what may be shown).
    pub(super) published: NodeSnapshotStatus,
    /// Conditions of problems being retried, by type.
    pub(super) problems: BTreeMap<&'static str, Condition>,
}

pub(super) fn now() -> Time {
    Time(jiff::Timestamp::now())
}

pub(super) use crate::conditions::condition;

impl CutState {
    pub(super) fn new(req: &CutRequest, generation: Option<i64>, boot_id: Option<String>) -> Self {
        CutState {
            phase: CutPhase::Planned,
            entry: JournalEntry {
                version: crate::agent::journal::JOURNAL_VERSION,
                key: req.key.clone(),
                namespace: req.namespace.clone(),
                name: req.name.clone(),
                group_snapshot: req.group_snapshot.clone(),
                boot_id,
                stage: Stage::Failed,
                frozen: Vec::new(),
                snapshots: Vec::new(),
                made: Vec::new(),
                report: None,
            },
            generation,
            release_after_cut: req.release_after_cut,
            volumes: Vec::new(),
            target_volumes: Vec::new(),
            consistency: None,
            end_message: None,
            frozen: Vec::new(),
            freezes: Vec::new(),
            in_flight: 0,
            made: BTreeMap::new(),
            first_freeze: None,
            freeze_start: None,
            window: None,
            deadline: None,
            published: NodeSnapshotStatus {
                observed_generation: generation,
                ..Default::default()
            },
            problems: BTreeMap::new(),
        }
    }

    /// A cut known only from the journal (an earlier run's, or after a restart).
    pub(super) fn from_journal(entry: JournalEntry) -> Self {
        let phase = lifecycle::recovered(entry.stage);
        let report = entry.report.clone().unwrap_or_default();
        // Entries of the first agents list only what they planned.
        let made_list = if entry.version == 0 {
            entry.snapshots.clone()
        } else {
            entry.made.clone()
        };
        let mut state = CutState {
            phase,
            generation: report.observed_generation,
            release_after_cut: false,
            volumes: report.volumes.clone(),
            target_volumes: Vec::new(),
            consistency: None,
            end_message: report.message.clone(),
            frozen: Vec::new(),
            freezes: Vec::new(),
            in_flight: 0,
            made: made_list.into_iter().enumerate().collect(),
            first_freeze: None,
            freeze_start: report.freeze_start.clone(),
            window: None,
            deadline: None,
            published: report,
            problems: BTreeMap::new(),
            entry,
        };
        if let Some(p) = phase.published() {
            state.published.phase = p;
        }
        for c in state.published.conditions.clone() {
            if c.type_ == CONDITION_DELETE_FAILED {
                state.problems.insert(CONDITION_DELETE_FAILED, c);
            }
        }
        state
            .published
            .conditions
            .retain(|c| c.type_ == CONDITION_READY);
        state
    }

    /// Applies an event; an illegal one is a bug, logged and ignored.
    pub(super) fn apply(&mut self, event: CutEvent) -> bool {
        match lifecycle::on(self.phase, event) {
            Ok(next) => {
                let changed = next != self.phase;
                self.phase = next;
                changed
            }
            Err(illegal) => {
                tracing::error!(key = %self.entry.key, %illegal, "ignored an event the cut's lifecycle does not allow");
                false
            }
        }
    }

    pub(super) fn problem(&mut self, type_: &'static str, reason: &str, message: String) {
        let previous: Vec<Condition> = self.problems.values().cloned().collect();
        let c = condition(&previous, type_, true, reason, message, self.generation);
        self.problems.insert(type_, c);
    }

    pub(super) fn solved(&mut self, type_: &str) {
        self.problems.remove(type_);
    }

    /// The status for `phase` from what the cut knows now.
    pub(super) fn render(&self, phase: NodePhase) -> NodeSnapshotStatus {
        let consistency = self
            .consistency
            .map(Consistency::describe)
            .unwrap_or("nothing was cut");
        let message = match phase {
            // A cut's own state never renders these: it begins only once asked to cut.
            NodePhase::Pending | NodePhase::Prepared => None,
            NodePhase::Cut => Some(format!(
                "snapshots cut, freeze held until release; {consistency}"
            )),
            NodePhase::Released if self.release_after_cut => {
                Some(format!("cut and released on this node; {consistency}"))
            }
            NodePhase::Released => Some(format!("released; {consistency}")),
            NodePhase::Aborted => self.end_message.clone(),
            NodePhase::Failed => self.end_message.as_ref().map(|m| {
                if m.contains("every volume is thawed") {
                    m.clone()
                } else {
                    format!("{m}; every volume is thawed and no snapshot is kept")
                }
            }),
        };
        let mut volumes = self.volumes.clone();
        if matches!(phase, NodePhase::Aborted | NodePhase::Failed) {
            for v in &mut volumes {
                v.snapshot_handle = None;
                if phase == NodePhase::Failed {
                    v.cut_time = None;
                }
            }
        }
        let ready = condition(
            &self.published.conditions,
            CONDITION_READY,
            phase == NodePhase::Released,
            &format!("{phase:?}"),
            message.clone().unwrap_or_default(),
            self.generation,
        );
        NodeSnapshotStatus {
            observed_generation: self.generation,
            phase,
            volumes,
            freeze_start: self.freeze_start.clone(),
            freeze_window_millis: self.window.and_then(|w| i64::try_from(w.as_millis()).ok()),
            message,
            conditions: vec![ready],
        }
    }

    /// Publishes what the current (journaled) phase justifies.
    pub(super) fn publish(&mut self) {
        if let Some(phase) = self.phase.published() {
            self.published = self.render(phase);
        }
    }

    /// The journal entry for a write in the current phase, with the report it would publish.
    pub(super) fn entry_to_write(&self) -> Option<JournalEntry> {
        let stage = self.phase.journal_stage()?;
        let mut entry = self.entry.clone();
        entry.stage = stage;
        entry.made = self.made.values().cloned().collect();
        let report_phase = match self.phase {
            CutPhase::Settling { outcome } => outcome.phase().published(),
            p => p.published(),
        };
        let mut report = report_phase.map_or_else(|| self.published.clone(), |p| self.render(p));
        // Problems other than the journal's own stay on record (a restart retries them).
        report.conditions.extend(
            self.problems
                .iter()
                .filter(|(t, _)| **t != CONDITION_JOURNAL_FAILED)
                .map(|(_, c)| c.clone()),
        );
        entry.report = Some(report);
        Some(entry)
    }

    pub(super) fn status(&self) -> NodeSnapshotStatus {
        let mut s = self.published.clone();
        s.conditions.extend(self.problems.values().cloned());
        s
    }
}
