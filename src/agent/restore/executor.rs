//! The restore executor: the clone journal in memory and on disk, and the blocking I/O that makes,
//! attaches and deletes clones through [`CloneOps`] (the real backends, or a fake in unit tests).
//!
//! Rules of this shell:
//! - every change goes to the journal; the intent is durable before `create` runs, so every clone
//!   that may exist has a record;
//! - a journal write that fails keeps the change in memory, marks the entry behind (retried), and
//!   holds back `Cloned` (see [`super::lifecycle::status`]); deleting stays safe in any order;
//! - the bookkeeping lock is never held across a backend call; journal writes are serialised by a
//!   lock of their own, each writing the latest state;
//! - clones run on a thread of their own, never inside the cut engine's freeze path.

use crate::agent::lock;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::backend::clone::{
    self, CloneHandle, CloneInfo, CloneOptions, ClonePlan, Progress,
};
use crate::agent::backend::{BackendError, Deleted, SnapshotHandle};
use crate::agent::engine::{Engine, Notifier};
use crate::agent::journal::{Journal, JournalEntry, JournalError};

use super::journal::{
    CloneRecord, CloneState, MadeClone, Outcome, Problem, RestoreEntry, RestoreJournal,
    RestoreJournalError, Stage,
};
use super::lifecycle::{self, Journaled, ProgressMap};

/// The clone backends as the executor uses them.
pub trait CloneOps: Send + Sync {
    fn plan(
        &self,
        snapshot: &SnapshotHandle,
        namespace: &str,
        pv: &str,
        owner: &str,
    ) -> Result<ClonePlan, BackendError>;
    fn create(&self, plan: &ClonePlan, progress: Progress<'_>) -> Result<CloneInfo, BackendError>;
    fn attach(&self, handle: &CloneHandle) -> Result<CloneInfo, BackendError>;
    fn delete(&self, handle: &CloneHandle) -> Result<Deleted, BackendError>;
}

/// The real backends ([`crate::agent::backend::clone`]).
pub struct Backends(pub CloneOptions);

impl CloneOps for Backends {
    fn plan(
        &self,
        snapshot: &SnapshotHandle,
        namespace: &str,
        pv: &str,
        owner: &str,
    ) -> Result<ClonePlan, BackendError> {
        clone::plan(snapshot, namespace, pv, owner, &self.0)
    }
    fn create(&self, plan: &ClonePlan, progress: Progress<'_>) -> Result<CloneInfo, BackendError> {
        clone::create(plan, &self.0, progress)
    }
    fn attach(&self, handle: &CloneHandle) -> Result<CloneInfo, BackendError> {
        clone::attach(handle, &self.0)
    }
    fn delete(&self, handle: &CloneHandle) -> Result<Deleted, BackendError> {
        clone::delete(handle, &self.0)
    }
}

/// Errors of the executor itself.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Journal(#[from] RestoreJournalError),
    #[error(transparent)]
    CutJournal(#[from] JournalError),
}

/// What the watch loop sees of one restore.
#[derive(Debug, Clone)]
pub struct View {
    pub entry: RestoreEntry,
    /// Whether the entry in memory is what the journal holds.
    pub journaled: Journaled,
    /// A clone job of this run is in flight.
    pub running: bool,
    pub progress: ProgressMap,
}

/// One restore at start, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovered {
    /// Cloning was not finished: rolled back (or being rolled back, if a delete failed).
    RolledBack { key: String, complete: bool },
    /// Clones kept; `attached` of `total` are attached again.
    Kept {
        key: String,
        attached: usize,
        total: usize,
    },
    /// An entry that cannot be read; its file is kept for a person, and its NodeRestore is left
    /// as it is (never reported as lost, never finalized) until the file is repaired.
    Unreadable { key: String, error: String },
}

#[derive(Debug)]
struct Tracked {
    entry: RestoreEntry,
    journaled: Journaled,
    running: bool,
    /// Set to stop a job in flight (with the message to end with).
    cancel: Option<String>,
    progress: ProgressMap,
}

struct Inner {
    journal: RestoreJournal,
    cuts: Journal,
    ops: Arc<dyn CloneOps>,
    tracked: Mutex<HashMap<String, Tracked>>,
    /// Entries that could not be read at start, by key, with the error.
    unreadable: Mutex<HashMap<String, String>>,
    writing: Mutex<()>,
    on_change: Mutex<Option<Notifier>>,
    /// Test-only: a pause after each clone is made, so a test can kill the agent mid-restore.
    pause_between_clones: Option<Duration>,
}

/// The restores of this agent. Cheap to clone.
#[derive(Clone)]
pub struct Restores {
    inner: Arc<Inner>,
}

/// How often a copy in flight reports its progress at most.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// The test-only pause between clones: `TANDEM_TEST_ONLY_CLONE_PAUSE_MS`, read only by debug
/// builds (what `cargo test` runs); a release build never pauses.
fn test_only_pause() -> Option<Duration> {
    if cfg!(debug_assertions) {
        std::env::var("TANDEM_TEST_ONLY_CLONE_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
    } else {
        None
    }
}

fn now_rfc3339() -> String {
    jiff::Timestamp::now().to_string()
}

impl Restores {
    /// Opens the clone journal under the state directory whose lock `_lock` holds (one agent per
    /// state directory; the lock is the cut engine's, never a second flock), rolls back every
    /// restore whose cloning was not finished and attaches every clone kept. Blocking.
    pub fn start(
        _lock: &Engine,
        state_dir: &Path,
        ops: Arc<dyn CloneOps>,
    ) -> Result<(Restores, Vec<Recovered>), RestoreError> {
        Self::open(state_dir, ops, test_only_pause())
    }

    pub(crate) fn open(
        state_dir: &Path,
        ops: Arc<dyn CloneOps>,
        pause_between_clones: Option<Duration>,
    ) -> Result<(Restores, Vec<Recovered>), RestoreError> {
        let restores = Restores {
            inner: Arc::new(Inner {
                journal: RestoreJournal::open(state_dir)?,
                cuts: Journal::open(state_dir)?,
                ops,
                tracked: Mutex::new(HashMap::new()),
                unreadable: Mutex::new(HashMap::new()),
                writing: Mutex::new(()),
                on_change: Mutex::new(None),
                pause_between_clones,
            }),
        };
        let mut report = Vec::new();
        for (file_key, loaded) in restores.inner.journal.all()? {
            let mut entry = match loaded {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::error!(key = %file_key, error = %e, "a restore journal entry cannot be read; its NodeRestore is left alone until the file is repaired (the file is kept)");
                    lock(&restores.inner.unreadable).insert(file_key.clone(), e.to_string());
                    report.push(Recovered::Unreadable {
                        key: file_key,
                        error: e.to_string(),
                    });
                    continue;
                }
            };
            let key = entry.key.clone();
            let restarted = lifecycle::recovered(entry.stage);
            if let Some((stage, message)) = restarted {
                entry.stage = stage;
                entry.message = Some(message.to_string());
            }
            lock(&restores.inner.tracked).insert(
                key.clone(),
                Tracked {
                    entry,
                    journaled: if restarted.is_some() {
                        Journaled::Writing
                    } else {
                        Journaled::Yes
                    },
                    running: false,
                    cancel: None,
                    progress: ProgressMap::new(),
                },
            );
            if restarted.is_some() {
                restores.commit(&key, |_| {});
            }
            let stage = restores.view(&key).map(|v| v.entry.stage);
            match stage {
                Some(Stage::RollingBack { .. }) => {
                    let complete = restores.roll_back_now(&key);
                    report.push(Recovered::RolledBack { key, complete });
                }
                Some(Stage::Cloned) => {
                    let (attached, total) = restores.attach_all(&key);
                    report.push(Recovered::Kept {
                        key,
                        attached,
                        total,
                    });
                }
                _ => {}
            }
        }
        Ok((restores, report))
    }

    /// Registers the function called (from any thread, with the NodeRestore uid) whenever a
    /// restore changes on its own: a clone made, progress, a rollback done.
    pub fn set_change_notifier(&self, notifier: Notifier) {
        *lock(&self.inner.on_change) = Some(notifier);
    }

    fn changed(&self, key: &str) {
        if let Some(notify) = lock(&self.inner.on_change).as_ref() {
            notify(key);
        }
    }

    /// Why the journal entry of a restore could not be read at start (then nothing is known of
    /// its clones, and nothing may be decided for it).
    pub fn unreadable(&self, key: &str) -> Option<String> {
        lock(&self.inner.unreadable).get(key).cloned()
    }

    /// The restore as it stands.
    pub fn view(&self, key: &str) -> Option<View> {
        lock(&self.inner.tracked).get(key).map(|t| View {
            entry: t.entry.clone(),
            journaled: t.journaled,
            running: t.running,
            progress: t.progress.clone(),
        })
    }

    /// The cut journal entry of a NodeSnapshot uid (the engine's journal, read only).
    pub fn cut_entry(&self, node_snapshot_uid: &str) -> Result<Option<JournalEntry>, RestoreError> {
        Ok(self.inner.cuts.get(node_snapshot_uid)?)
    }

    /// Plans one clone.
    pub fn plan(
        &self,
        snapshot: &SnapshotHandle,
        namespace: &str,
        pv: &str,
        owner: &str,
    ) -> Result<ClonePlan, BackendError> {
        self.inner.ops.plan(snapshot, namespace, pv, owner)
    }

    /// Applies `change` to a restore and journals the result; a failed write marks it behind.
    fn commit(&self, key: &str, change: impl FnOnce(&mut RestoreEntry)) {
        let _writing = lock(&self.inner.writing);
        let entry = {
            let mut tracked = lock(&self.inner.tracked);
            let Some(t) = tracked.get_mut(key) else {
                return;
            };
            change(&mut t.entry);
            // Ahead of the journal until the write returns: nothing of it is durable yet.
            t.journaled = Journaled::Writing;
            t.entry.clone()
        };
        let written = self.inner.journal.write(&entry);
        if let Err(e) = &written {
            tracing::warn!(key, error = %e, "cannot write the clone journal; retried");
        }
        if let Some(t) = lock(&self.inner.tracked).get_mut(key) {
            t.journaled = if written.is_ok() {
                Journaled::Yes
            } else {
                Journaled::Failed
            };
        }
    }

    /// Retries the journal write of a restore whose last write failed. Returns whether it still
    /// fails.
    pub fn retry_journal(&self, key: &str) -> bool {
        if self
            .view(key)
            .is_some_and(|v| v.journaled == Journaled::Failed)
        {
            self.commit(key, |_| {});
        }
        self.view(key)
            .is_some_and(|v| v.journaled == Journaled::Failed)
    }

    /// Journals the intent (stage Cloning, every clone an intent) durably, then starts the clone
    /// job on a thread of its own. An intent that cannot be journaled is an error and nothing
    /// is made.
    pub fn begin(
        &self,
        key: &str,
        namespace: &str,
        name: &str,
        clones: Vec<CloneRecord>,
    ) -> Result<(), RestoreError> {
        let entry = RestoreEntry {
            version: 0,
            key: key.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
            stage: Stage::Cloning,
            message: None,
            clones,
        };
        {
            let _writing = lock(&self.inner.writing);
            if lock(&self.inner.tracked).contains_key(key) {
                return Ok(());
            }
            self.inner.journal.write(&entry)?;
            lock(&self.inner.tracked).insert(
                key.to_string(),
                Tracked {
                    entry,
                    journaled: Journaled::Yes,
                    running: true,
                    cancel: None,
                    progress: ProgressMap::new(),
                },
            );
        }
        let this = self.clone();
        let job_key = key.to_string();
        let spawned = std::thread::Builder::new()
            .name("tandem-clone".into())
            .spawn(move || this.run_job(&job_key));
        if let Err(e) = spawned {
            // Nothing was made: the next look sees Cloning without a job and rolls back.
            tracing::error!(key, error = %e, "cannot start the clone thread");
            if let Some(t) = lock(&self.inner.tracked).get_mut(key) {
                t.running = false;
            }
        }
        Ok(())
    }

    /// Asks a job in flight to stop between clones; it then rolls back with `message`.
    pub fn cancel(&self, key: &str, message: &str) {
        if let Some(t) = lock(&self.inner.tracked).get_mut(key)
            && t.running
            && t.cancel.is_none()
        {
            t.cancel = Some(message.to_string());
        }
    }

    fn cancelled(&self, key: &str) -> Option<String> {
        lock(&self.inner.tracked)
            .get(key)
            .and_then(|t| t.cancel.clone())
    }

    /// The clone job: every intent in order, then Cloned, or a rollback.
    fn run_job(&self, key: &str) {
        let end = self.make_clones(key);
        if let Some((outcome, message)) = end {
            self.commit(key, |e| {
                e.stage = Stage::RollingBack { outcome };
                e.message = Some(message);
            });
            self.changed(key);
            self.roll_back_now(key);
        }
        if let Some(t) = lock(&self.inner.tracked).get_mut(key) {
            t.running = false;
            t.progress.clear();
        }
        self.changed(key);
    }

    /// Makes every clone not made yet; None when all are made (and Cloned journaled), else how
    /// the restore ends.
    fn make_clones(&self, key: &str) -> Option<(Outcome, String)> {
        let todo: Vec<CloneRecord> = self
            .view(key)?
            .entry
            .clones
            .into_iter()
            .filter(|c| c.state == CloneState::Intent)
            .collect();
        for (i, record) in todo.iter().enumerate() {
            if let Some(message) = self.cancelled(key) {
                return Some((Outcome::Aborted, message));
            }
            let pv = record.persistent_volume.clone();
            let mut last: Option<Instant> = None;
            let mut progress = |copied: u64, total: u64| {
                if last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) && copied < total {
                    return;
                }
                last = Some(Instant::now());
                if let Some(t) = lock(&self.inner.tracked).get_mut(key) {
                    t.progress.insert(pv.clone(), (copied, total));
                }
                self.changed(key);
            };
            let made = self.inner.ops.create(&record.plan, &mut progress);
            match made {
                Ok(info) => {
                    tracing::info!(key, pv = %record.persistent_volume, path = %info.path.display(), "clone made");
                    self.commit(key, |e| {
                        if let Some(c) = e.clone_of_mut(&record.persistent_volume) {
                            c.state = CloneState::Made;
                            // What the clone's superblock says wins over the cut's report.
                            if info.filesystem.is_some() {
                                c.filesystem = info.filesystem.clone();
                            }
                            c.made = Some(MadeClone {
                                path: info.path,
                                block: info.block,
                                size_bytes: info.size_bytes,
                                method: info.method,
                                cloned_at: now_rfc3339(),
                            });
                        }
                    });
                    self.changed(key);
                }
                Err(e) => {
                    tracing::warn!(key, pv = %record.persistent_volume, error = %e, "clone failed; rolling back the restore");
                    let why = e.to_string();
                    self.commit(key, |e| {
                        if let Some(c) = e.clone_of_mut(&record.persistent_volume) {
                            c.state = CloneState::Failed;
                            c.message = Some(why.clone());
                        }
                    });
                    return Some((
                        Outcome::Failed,
                        format!(
                            "the clone for claim {} (volume {}) failed: {why}; every clone of this node's restore is deleted",
                            record.claim, record.persistent_volume
                        ),
                    ));
                }
            }
            if i + 1 < todo.len()
                && let Some(pause) = self.inner.pause_between_clones
            {
                tracing::warn!(key, ?pause, "test-only pause between clones");
                std::thread::sleep(pause);
            }
        }
        if let Some(message) = self.cancelled(key) {
            return Some((Outcome::Aborted, message));
        }
        self.commit(key, |e| {
            e.stage = Stage::Cloned;
            e.message = None;
        });
        tracing::info!(key, "every clone made");
        None
    }

    /// Deletes one clone; whether it is gone (or was never ours).
    fn delete_one(&self, key: &str, record: &CloneRecord) -> bool {
        let deleted = self.inner.ops.delete(&record.plan.handle);
        let gone = match &deleted {
            Ok(_) => true,
            // What is not marked as this restore's is left alone and counts as gone.
            Err(BackendError::NotOurs { .. }) => true,
            Err(_) => false,
        };
        if let Err(e) = &deleted {
            tracing::warn!(key, pv = %record.persistent_volume, error = %e, gone, "clone delete");
        }
        self.commit(key, |entry| {
            if let Some(c) = entry.clone_of_mut(&record.persistent_volume) {
                match deleted {
                    Ok(_) => {
                        c.state = CloneState::Deleted;
                        c.problem = None;
                    }
                    Err(e @ BackendError::NotOurs { .. }) => {
                        c.state = CloneState::Deleted;
                        c.problem = None;
                        c.message = Some(format!("not deleted: {e}"));
                    }
                    Err(e) => c.problem = Some(Problem::Delete(e.to_string())),
                }
            }
        });
        gone
    }

    /// Starts (or goes on with) rolling back: sets the stage unless already rolling back, deletes
    /// every clone that may exist. Returns whether the restore has ended. Blocking.
    pub fn roll_back(&self, key: &str, outcome: Outcome, message: &str) -> bool {
        if self.view(key).is_some_and(|v| {
            !matches!(
                v.entry.stage,
                Stage::RollingBack { .. } | Stage::Ended { .. }
            )
        }) {
            self.commit(key, |e| {
                e.stage = Stage::RollingBack { outcome };
                e.message = Some(message.to_string());
            });
        }
        self.roll_back_now(key)
    }

    fn roll_back_now(&self, key: &str) -> bool {
        let Some(view) = self.view(key) else {
            return true;
        };
        let Stage::RollingBack { outcome } = view.entry.stage else {
            return matches!(view.entry.stage, Stage::Ended { .. });
        };
        let mut complete = true;
        for record in view.entry.clones.iter().filter(|c| c.may_exist()) {
            complete &= self.delete_one(key, record);
        }
        if complete {
            self.commit(key, |e| e.stage = Stage::Ended { outcome });
            tracing::info!(key, ?outcome, "restore rolled back: no clone left");
        }
        complete
    }

    /// Deletes released clones. Returns whether all of them are gone. Blocking.
    pub fn release(&self, key: &str, pvs: &[String]) -> bool {
        let Some(view) = self.view(key) else {
            return true;
        };
        let mut complete = true;
        for pv in pvs {
            if let Some(record) = view.entry.clone_of(pv).filter(|c| c.may_exist()) {
                let gone = self.delete_one(key, record);
                if gone {
                    tracing::info!(key, %pv, "released clone deleted");
                }
                complete &= gone;
            }
        }
        complete
    }

    /// Attaches every made clone of a kept restore again (after a reboot: loop device and link,
    /// LV activation, bind mount). Returns (attached, total). Blocking.
    pub fn attach_all(&self, key: &str) -> (usize, usize) {
        let Some(view) = self.view(key) else {
            return (0, 0);
        };
        let made: Vec<&CloneRecord> = view
            .entry
            .clones
            .iter()
            .filter(|c| c.state == CloneState::Made)
            .collect();
        let mut attached = 0;
        for record in &made {
            let result = self.inner.ops.attach(&record.plan.handle);
            if let Err(e) = &result {
                tracing::warn!(key, pv = %record.persistent_volume, error = %e, "cannot attach a kept clone");
            } else {
                attached += 1;
            }
            self.commit(key, |entry| {
                if let Some(c) = entry.clone_of_mut(&record.persistent_volume) {
                    match result {
                        Ok(info) => {
                            c.problem = None;
                            if let Some(m) = c.made.as_mut() {
                                m.path = info.path;
                                m.block = info.block;
                                m.size_bytes = info.size_bytes;
                            }
                        }
                        Err(e) => c.problem = Some(Problem::Attach(e.to_string())),
                    }
                }
            });
        }
        (attached, made.len())
    }

    /// Whether a kept restore has clones whose attach failed (retry with [`Restores::attach_all`]).
    pub fn needs_attach(&self, key: &str) -> bool {
        self.view(key).is_some_and(|v| {
            v.entry.stage == Stage::Cloned
                && v.entry
                    .clones
                    .iter()
                    .any(|c| matches!(c.problem, Some(Problem::Attach(_))))
        })
    }

    /// Forgets a restore that holds nothing any more (its journal entry goes).
    pub fn forget(&self, key: &str) -> Result<(), RestoreError> {
        let _writing = lock(&self.inner.writing);
        if self
            .view(key)
            .is_some_and(|v| v.running || v.entry.holds_clones())
        {
            return Ok(());
        }
        self.inner.journal.remove(key)?;
        lock(&self.inner.tracked).remove(key);
        Ok(())
    }
}
