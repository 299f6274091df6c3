//! The cut / release / abort engine: everything the agent does to volumes, as a plain blocking Rust
//! API that the watch loop (and the one-shot mode, and the tests) drive.
//!
//! A cut: resolve every volume and plan its snapshot (fail before freezing anything, [`plan`]),
//! arm the watchdog, journal the intent, `syncfs` every filesystem in parallel while writes still
//! flow, FIFREEZE them all in parallel ([`executor`]), cut the snapshots, then either thaw at once
//! (`releaseAfterCut`) or hold the freeze until [`Engine::release`] / [`Engine::abort`] or the
//! watchdog's deadline.
//!
//! Where a cut stands is one [`lifecycle::CutPhase`], moved only by [`lifecycle::on`]. The rules
//! of the shell around it:
//! - the cut's lock is never held across I/O (journal, backend, ioctl): the watchdog's thaw only
//!   ever waits for bookkeeping;
//! - a filesystem is registered for thawing the moment its own FIFREEZE returns, and one that
//!   returns after the cut was abandoned is thawed at once;
//! - an entry leaves the frozen list only after its own FITHAW returned;
//! - a phase is published only once journaled; a failed journal write, thaw or delete becomes a
//!   condition and is retried ([`Engine::retry`]), never only logged.

pub mod lifecycle;

mod executor;
mod plan;
mod recovery;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

use crate::api::{CONDITION_READY, FreezePolicy, NodePhase, NodeSnapshotStatus, VolumeStatus};

use super::backend::{self, BackendError, BackendKind, BackendOptions, SnapshotHandle};
use super::discovery::{self, DevId};
use super::freeze::{Guardrails, Thawed};
use super::journal::{FrozenRecord, Journal, JournalEntry, JournalError, Stage};
use super::watchdog::{self, ThawSignal};

pub use executor::{FreezeOps, KernelOps, Spawner, identity_of};
use executor::{FreezeSink, NotFrozen};
use lifecycle::{Consistency, CutEvent, CutPhase, Outcome};
use plan::{FreezeTarget, Prepared};

/// Condition: a FITHAW failed; the agent retries it.
pub const CONDITION_THAW_FAILED: &str = "ThawFailed";
/// Condition: the journal could not be written; nothing newer is published until it is.
pub const CONDITION_JOURNAL_FAILED: &str = "JournalWriteFailed";
/// Condition: a snapshot could not be deleted; the agent keeps it journaled and retries.
pub const CONDITION_DELETE_FAILED: &str = "DeleteFailed";
/// Condition: the cut is over but a FIFREEZE call has not returned yet; it is thawed the moment
/// it does.
pub const CONDITION_FREEZE_IN_FLIGHT: &str = "FreezeInFlight";

/// A volume to cut, as the watch loop found it.
#[derive(Debug, Clone)]
pub struct VolumeRequest {
    pub claim: String,
    pub persistent_volume: String,
    /// The volume's mount point (or block device node in block mode) on this node.
    pub path: PathBuf,
}

/// One NodeSnapshot's request.
#[derive(Debug, Clone)]
pub struct CutRequest {
    /// A unique key: the NodeSnapshot's uid.
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub group_snapshot: String,
    pub freeze: FreezePolicy,
    pub freeze_timeout: Duration,
    pub release_after_cut: bool,
    pub volumes: Vec<VolumeRequest>,
}

/// Errors of the engine itself (volume problems end up in the status instead).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error(transparent)]
    Discovery(#[from] discovery::DiscoveryError),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "another tandem agent{holder} is using the state directory {path} (it holds {path}/lock): two agents on one node would thaw and delete each other's cuts"
    )]
    Locked { path: PathBuf, holder: String },
    #[error(
        "cannot delete the snapshots of {key}: {problems}; they stay journaled and are retried"
    )]
    DeleteFailed { key: String, problems: String },
    #[error("the cut {key} has not ended durably yet: {why}")]
    NotSettled { key: String, why: String },
}

/// Called (from the watchdog's thread) with a cut's key after the watchdog aborted it; also the
/// type of the change notifier.
pub type AbortNotifier = Box<dyn Fn(&str) + Send + Sync>;

/// The engine's configuration.
#[derive(Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub backend: BackendOptions,
    /// /sys/dev/block (a parameter so unit tests can point elsewhere).
    pub sysfs_block: PathBuf,
    /// The freeze, thaw and flush calls ([`KernelOps`]; injectable for fault tests).
    pub freeze_ops: Arc<dyn FreezeOps>,
    /// Starts the engine's threads (injectable for fault tests).
    pub spawner: Spawner,
}

impl std::fmt::Debug for EngineConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineConfig")
            .field("state_dir", &self.state_dir)
            .field("backend", &self.backend)
            .field("sysfs_block", &self.sysfs_block)
            .field("spawner", &self.spawner)
            .finish_non_exhaustive()
    }
}

impl EngineConfig {
    /// The defaults for a state directory.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        let state_dir = state_dir.into();
        EngineConfig {
            backend: BackendOptions {
                thick_cow_size: "1G".into(),
                btrfs_mount_dir: state_dir.join("btrfs"),
            },
            sysfs_block: "/sys/dev/block".into(),
            state_dir,
            freeze_ops: Arc::new(KernelOps),
            spawner: Spawner::default(),
        }
    }
}

/// The engine. Cheap to clone; all clones share the state.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    journal: Journal,
    guard: Guardrails,
    config: EngineConfig,
    boot_id: Option<String>,
    /// Held for the engine's lifetime: one agent per state directory.
    _lock: File,
    /// Superblocks frozen by a cut of this agent, and by which cut: one freeze per filesystem.
    held: Mutex<HashMap<DevId, String>>,
    cuts: Mutex<HashMap<String, Arc<Cut>>>,
    notifier: Mutex<Option<AbortNotifier>>,
    on_change: Mutex<Option<AbortNotifier>>,
}

/// A cut in memory.
pub(crate) struct Cut {
    key: String,
    /// Bookkeeping only: never held across a syscall or any I/O.
    state: Mutex<CutState>,
    /// One settling (delete, persist, journal write) at a time; never needed to thaw.
    settling: Mutex<()>,
    /// Set once nothing of the cut can be frozen any more (the watchdog stops waiting).
    thawed: Arc<ThawSignal>,
}

/// A filesystem this cut froze.
struct FrozenFs {
    target: usize,
    superblock: DevId,
    mount_point: PathBuf,
    fd: OwnedFd,
}

struct Frozen {
    fs: Arc<FrozenFs>,
    /// A thread is thawing it right now (so it is thawed once, and stays listed until it is).
    thawing: bool,
}

struct CutState {
    phase: CutPhase,
    /// The safety record (its stage is derived from `phase` when written).
    entry: JournalEntry,
    generation: Option<i64>,
    release_after_cut: bool,
    volumes: Vec<VolumeStatus>,
    /// Per freeze target: the volumes on it.
    target_volumes: Vec<Vec<usize>>,
    consistency: Option<Consistency>,
    /// Why the cut ended (the first decision's words).
    end_message: Option<String>,
    frozen: Vec<Frozen>,
    /// Per freeze target: None while its call is in flight, then whether it froze.
    freezes: Vec<Option<Result<(), String>>>,
    in_flight: usize,
    /// Snapshots made and not deleted, by volume index.
    made: BTreeMap<usize, SnapshotHandle>,
    first_freeze: Option<Instant>,
    freeze_start: Option<MicroTime>,
    window: Option<Duration>,
    deadline: Option<Instant>,
    /// The status backed by the journal (what may be shown).
    published: NodeSnapshotStatus,
    /// Conditions of problems being retried, by type.
    problems: BTreeMap<&'static str, Condition>,
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Locks, ignoring poisoning: a panicked thread must never keep the agent from thawing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A condition whose lastTransitionTime moves only when its status does (like the controller's
/// `conditions::condition`, which is private to the controller).
fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    observed_generation: Option<i64>,
) -> Condition {
    let status = if status { "True" } else { "False" }.to_string();
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(now);
    Condition {
        type_: type_.to_string(),
        status,
        reason: reason.to_string(),
        message,
        observed_generation,
        last_transition_time,
    }
}

impl CutState {
    fn new(req: &CutRequest, generation: Option<i64>, boot_id: Option<String>) -> Self {
        CutState {
            phase: CutPhase::Planned,
            entry: JournalEntry {
                version: super::journal::JOURNAL_VERSION,
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
    fn from_journal(entry: JournalEntry) -> Self {
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
    fn apply(&mut self, event: CutEvent) -> bool {
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

    fn problem(&mut self, type_: &'static str, reason: &str, message: String) {
        let previous: Vec<Condition> = self.problems.values().cloned().collect();
        let c = condition(&previous, type_, true, reason, message, self.generation);
        self.problems.insert(type_, c);
    }

    fn solved(&mut self, type_: &str) {
        self.problems.remove(type_);
    }

    /// The status for `phase` from what the cut knows now.
    fn render(&self, phase: NodePhase) -> NodeSnapshotStatus {
        let consistency = self
            .consistency
            .map(Consistency::describe)
            .unwrap_or("nothing was cut");
        let message = match phase {
            NodePhase::Pending => None,
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
    fn publish(&mut self) {
        if let Some(phase) = self.phase.published() {
            self.published = self.render(phase);
        }
    }

    /// The journal entry for a write in the current phase, with the report it would publish.
    fn entry_to_write(&self) -> Option<JournalEntry> {
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

    fn status(&self) -> NodeSnapshotStatus {
        let mut s = self.published.clone();
        s.conditions.extend(self.problems.values().cloned());
        s
    }
}

/// Reads the boot id: no freeze survives a reboot, so an entry of another boot froze nothing
/// that is still frozen.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
}

/// Takes `<state_dir>/lock` exclusively (never blocking) and writes this process's pid into it.
fn lock_state_dir(state_dir: &Path) -> Result<File, EngineError> {
    use std::io::{Read, Seek, Write};
    let path = state_dir.join("lock");
    let io_err = |source| EngineError::StateDir {
        path: path.clone(),
        source,
    };
    let mut file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err)?;
    if let Err(e) = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(EngineError::Locked {
                path: state_dir.into(),
                holder: if pid.is_empty() {
                    String::new()
                } else {
                    format!(" (pid {pid})")
                },
            });
        }
        return Err(io_err(e.into()));
    }
    let _ = file.set_len(0);
    let _ = file.rewind();
    let _ = write!(file, "{}", std::process::id());
    Ok(file)
}

/// What [`Engine::begin`] found.
pub(crate) enum Begun {
    /// Already known (in memory or journaled): reported as it stands, never cut twice.
    Known(NodeSnapshotStatus),
    New(Arc<Cut>),
}

impl Engine {
    /// Takes the state directory's lock, opens the journal and thaws (and cleans up) whatever an
    /// unfinished entry says may still be frozen: what a crashed or killed agent left behind.
    pub fn start(config: EngineConfig) -> Result<(Engine, Vec<JournalEntry>), EngineError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| EngineError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let lock = lock_state_dir(&config.state_dir)?;
        let journal = Journal::open(&config.state_dir)?;
        let mounts = discovery::read_mountinfo()?;
        let guard = Guardrails {
            root_fs: discovery::superblock_of(Path::new("/"), &mounts)?,
            state_dir: config.state_dir.clone(),
            state_dir_fs: discovery::superblock_of(&config.state_dir, &mounts)?,
        };
        let engine = Engine {
            inner: Arc::new(Inner {
                journal,
                guard,
                config,
                boot_id: boot_id(),
                _lock: lock,
                held: Mutex::new(HashMap::new()),
                cuts: Mutex::new(HashMap::new()),
                notifier: Mutex::new(None),
                on_change: Mutex::new(None),
            }),
        };
        let recovered = recovery::recover(&engine, &mounts)?;
        Ok((engine, recovered))
    }

    /// Registers the function the watchdog calls after it aborted a cut.
    pub fn set_abort_notifier(&self, notifier: AbortNotifier) {
        *lock(&self.inner.notifier) = Some(notifier);
    }

    /// Registers the function called (from any thread, with the cut's key) whenever a cut's status
    /// changes without a call of the caller's own: the watchdog, a late freeze, a retry.
    pub fn set_change_notifier(&self, notifier: AbortNotifier) {
        *lock(&self.inner.on_change) = Some(notifier);
    }

    fn changed(&self, key: &str) {
        if let Some(notify) = lock(&self.inner.on_change).as_ref() {
            notify(key);
        }
    }

    /// The guard rails in force.
    pub fn guardrails(&self) -> &Guardrails {
        &self.inner.guard
    }

    /// A cut by key: in memory, or loaded from the journal.
    fn find(&self, key: &str) -> Result<Option<Arc<Cut>>, EngineError> {
        if let Some(cut) = lock(&self.inner.cuts).get(key).cloned() {
            return Ok(Some(cut));
        }
        let Some(entry) = self.inner.journal.get(key)? else {
            return Ok(None);
        };
        let cut = Arc::new(Cut {
            key: key.to_string(),
            state: Mutex::new(CutState::from_journal(entry)),
            settling: Mutex::new(()),
            thawed: Arc::new(ThawSignal::new()),
        });
        cut.thawed.set();
        Ok(Some(
            lock(&self.inner.cuts)
                .entry(key.to_string())
                .or_insert(cut)
                .clone(),
        ))
    }

    /// The last status of a cut this agent knows (in memory or in the journal): what is journaled,
    /// plus a condition for every problem being retried.
    pub fn status(&self, key: &str) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        Ok(self.find(key)?.map(|cut| lock(&cut.state).status()))
    }

    /// The exact freeze window of a thawed cut of this run (the status rounds it to milliseconds).
    pub fn freeze_window(&self, key: &str) -> Option<Duration> {
        let cut = lock(&self.inner.cuts).get(key).cloned()?;
        lock(&cut.state).window
    }

    /// When a held cut's watchdog fires, while anything of the cut may be frozen.
    pub fn deadline(&self, key: &str) -> Option<Instant> {
        let cut = lock(&self.inner.cuts).get(key).cloned()?;
        let state = lock(&cut.state);
        if state.phase.may_be_frozen() {
            state.deadline
        } else {
            None
        }
    }

    /// Whether a cut has a problem being retried (a thaw, a journal write or a delete), so the
    /// caller should call [`Engine::retry`] again later.
    pub fn needs_retry(&self, key: &str) -> bool {
        let Some(cut) = lock(&self.inner.cuts).get(key).cloned() else {
            return false;
        };
        let state = lock(&cut.state);
        !state.problems.is_empty()
            || matches!(
                state.phase,
                CutPhase::Thawing { .. } | CutPhase::Settling { .. }
            )
            || (matches!(state.phase, CutPhase::Aborted | CutPhase::Failed)
                && !state.made.is_empty())
    }

    /// Retries what failed of a cut's end: thaws, snapshot deletes, the journal write.
    pub fn retry(&self, key: &str) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        let Some(cut) = self.find(key)? else {
            return Ok(None);
        };
        if let Err(e) = self.settle(&cut) {
            tracing::warn!(key, error = %e, "retry of the cut's end failed; will retry again");
        }
        Ok(Some(lock(&cut.state).status()))
    }

    /// Freezes, cuts and (if asked) thaws. Idempotent: a cut this agent already made or recorded is
    /// reported as it stands, never cut twice. Blocking.
    pub fn cut(
        &self,
        req: &CutRequest,
        generation: Option<i64>,
    ) -> Result<NodeSnapshotStatus, EngineError> {
        match self.begin(req, generation)? {
            Begun::Known(status) => Ok(status),
            Begun::New(cut) => {
                self.run(req, &cut);
                Ok(lock(&cut.state).status())
            }
        }
    }

    /// Registers a new cut (Planned), or reports the known one. Cheap: the caller may run the
    /// cut itself on another thread and report [`Engine::status`] meanwhile.
    pub(crate) fn begin(
        &self,
        req: &CutRequest,
        generation: Option<i64>,
    ) -> Result<Begun, EngineError> {
        if let Some(cut) = self.find(&req.key)? {
            return Ok(Begun::Known(lock(&cut.state).status()));
        }
        let cut = Arc::new(Cut {
            key: req.key.clone(),
            state: Mutex::new(CutState::new(req, generation, self.inner.boot_id.clone())),
            settling: Mutex::new(()),
            thawed: Arc::new(ThawSignal::new()),
        });
        let mut cuts = lock(&self.inner.cuts);
        if let Some(known) = cuts.get(&req.key) {
            return Ok(Begun::Known(lock(&known.state).status()));
        }
        cuts.insert(req.key.clone(), cut.clone());
        Ok(Begun::New(cut))
    }

    /// Runs a registered cut as far as it goes (held, or ended).
    pub(crate) fn run(&self, req: &CutRequest, cut: &Arc<Cut>) {
        // 1. Resolve and plan every volume before anything is frozen.
        let mounts = match discovery::read_mountinfo() {
            Ok(m) => m,
            Err(e) => return self.fail_planned(cut, Vec::new(), e.to_string()),
        };
        let prepared = match plan::prepare(
            req,
            &mounts,
            &self.inner.guard,
            &self.inner.config.backend,
            &self.inner.config.sysfs_block,
        ) {
            Ok(p) => p,
            Err(failure) => return self.fail_planned(cut, failure.volumes, failure.message),
        };
        let targets = prepared.freeze_targets();
        self.freeze_and_cut(req, cut, &prepared, &targets);
        self.changed(&req.key);
    }

    /// Steps 2-6 of a cut, from a plan.
    fn freeze_and_cut(
        &self,
        req: &CutRequest,
        cut: &Arc<Cut>,
        prepared: &Prepared,
        targets: &[FreezeTarget],
    ) {
        let statuses: Vec<VolumeStatus> =
            prepared.volumes.iter().map(|v| v.status.clone()).collect();

        // 2. One freeze per filesystem: reserve the superblocks or fail clearly. The message
        // names only the requester's own volume, never the other cut.
        if let Some(conflict) = self.reserve(&req.key, targets) {
            let who = targets
                .iter()
                .find(|t| t.superblock == conflict)
                .map(|t| t.describe(prepared))
                .unwrap_or_default();
            return self.fail_planned(
                cut,
                statuses,
                format!(
                    "{who}: its filesystem is already frozen by another cut of this agent; one freeze per filesystem at a time"
                ),
            );
        }

        // 3. Arm the watchdog, then journal the intent, before the first freeze.
        let ops = self.inner.config.freeze_ops.clone();
        {
            let mut state = lock(&cut.state);
            state.volumes = statuses.clone();
            state.target_volumes = targets.iter().map(|t| t.volumes.clone()).collect();
            state.entry.snapshots = prepared
                .volumes
                .iter()
                .map(|v| v.plan.handle.clone())
                .collect();
            state.freezes = vec![None; targets.len()];
        }
        let identities: Vec<_> = targets
            .iter()
            .map(|t| ops.identity(&t.mount.mount_point))
            .collect();
        {
            let mut state = lock(&cut.state);
            state.entry.frozen = targets
                .iter()
                .zip(identities)
                .map(|(t, identity)| FrozenRecord {
                    mount_point: t.mount.mount_point.clone(),
                    superblock: t.superblock,
                    identity,
                    not_ours: false,
                })
                .collect();
        }
        if !targets.is_empty() {
            let deadline = Instant::now() + req.freeze_timeout;
            lock(&cut.state).deadline = Some(deadline);
            let engine = self.clone();
            let key = req.key.clone();
            let timeout = req.freeze_timeout;
            if let Err(e) = watchdog::arm(deadline, cut.thawed.clone(), move || {
                engine.watchdog_fired(&key, timeout)
            }) {
                return self.fail_planned(
                    cut,
                    statuses,
                    format!("cannot start the watchdog thread, so nothing was frozen: {e}"),
                );
            }
        }
        // Under the settling lock, so an end journaled meanwhile (the watchdog, an abort) can
        // never be overwritten by this intent.
        let written = {
            let _one = lock(&cut.settling);
            let intent = {
                let mut state = lock(&cut.state);
                (state.phase == CutPhase::Planned).then(|| {
                    let mut entry = state.entry.clone();
                    entry.stage = Stage::Freezing;
                    entry.report = Some(state.render(NodePhase::Pending));
                    state.entry.stage = Stage::Freezing;
                    entry
                })
            };
            intent.map(|entry| self.inner.journal.write(&entry))
        };
        let Some(written) = written else {
            return self.end(cut);
        };
        if let Err(e) = written {
            {
                let mut state = lock(&cut.state);
                state.problem(
                    CONDITION_JOURNAL_FAILED,
                    "JournalWriteFailed",
                    format!("cannot journal the intent, so nothing was frozen: {e}"),
                );
            }
            return self.fail_planned(
                cut,
                statuses,
                format!("cannot write the agent's journal, so nothing was frozen: {e}"),
            );
        }
        {
            let mut state = lock(&cut.state);
            if state.phase != CutPhase::Planned {
                // The watchdog (or an abort) ended it meanwhile: freeze nothing.
                drop(state);
                return self.end(cut);
            }
            state.apply(CutEvent::IntentJournaled);
            state.in_flight = targets.len();
            state.publish();
            if targets.is_empty() {
                state.apply(CutEvent::FreezesReturned);
            }
        }

        // 4. syncfs all, then FIFREEZE all, in parallel; each result registers as it returns.
        executor::freeze_all(
            targets,
            ops.as_ref(),
            &self.inner.config.spawner,
            &Sink { engine: self, cut },
        );

        let (failures, someone_elses) = {
            let mut state = lock(&cut.state);
            if state.phase.is_over() {
                drop(state);
                return self.end(cut);
            }
            if let Some(start) = state.first_freeze {
                let ago = jiff::SignedDuration::try_from(start.elapsed()).unwrap_or_default();
                let wall = jiff::Timestamp::now()
                    .checked_sub(ago)
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                state.freeze_start = Some(MicroTime(wall));
            }
            let mut failures = Vec::new();
            for (t, target) in targets.iter().enumerate() {
                let result = state.freezes.get(t).cloned().flatten();
                for &i in &target.volumes {
                    match &result {
                        Some(Ok(())) => state.volumes[i].frozen = true,
                        Some(Err(why)) => {
                            state.volumes[i].frozen = false;
                            state.volumes[i].reason = Some(why.clone());
                        }
                        None => {}
                    }
                }
                if let Some(Err(why)) = result {
                    failures.push(format!("{} ({why})", target.describe(prepared)));
                }
            }
            let someone_elses = state.entry.frozen.iter().any(|r| r.not_ours);
            (failures, someone_elses)
        };
        if !failures.is_empty() && req.freeze == FreezePolicy::Required {
            return self.fail(cut, format!("could not freeze {}", failures.join(", ")));
        }
        if someone_elses {
            // Journal that an EBUSY freeze is someone else's, so a crash never thaws it (outside
            // the lock; only in this rare case is there a write inside the frozen window).
            self.write_intent_update(cut);
        }

        // 5. Cut the snapshots.
        if let Err(message) = self.cut_snapshots(req, cut, prepared) {
            return self.fail(cut, message);
        }

        // 6. Thaw at once, or hold.
        {
            let mut state = lock(&cut.state);
            if state.phase.is_over() {
                drop(state);
                return self.end(cut);
            }
            let all_frozen = state.volumes.iter().all(|v| v.frozen);
            state.consistency = Some(if all_frozen {
                Consistency::AllFrozen
            } else {
                Consistency::EachOnItsOwn
            });
            state.apply(CutEvent::SnapshotsCut);
            // Held needs no journal write of its own: the journaled intent already says "may be
            // frozen, these snapshots may exist", which is what a crash must recover from.
            state.publish();
            if req.release_after_cut || state.frozen.is_empty() {
                state.apply(CutEvent::Release);
            } else {
                return;
            }
        }
        self.end(cut);
    }

    fn write_intent_update(&self, cut: &Arc<Cut>) {
        let _one = lock(&cut.settling);
        let Some(entry) = lock(&cut.state).entry_to_write() else {
            return;
        };
        if let Err(e) = self.inner.journal.write(&entry) {
            tracing::warn!(key = %cut.key, error = %e, "cannot journal that a freeze is someone else's");
        }
    }

    /// Reserves the superblocks of `targets` for `key`; returns a superblock held by another cut.
    fn reserve(&self, key: &str, targets: &[FreezeTarget]) -> Option<DevId> {
        let mut held = lock(&self.inner.held);
        if let Some(t) = targets
            .iter()
            .find(|t| held.get(&t.superblock).is_some_and(|owner| owner != key))
        {
            return Some(t.superblock);
        }
        for t in targets {
            held.insert(t.superblock, key.to_string());
        }
        None
    }

    fn release_superblocks(&self, key: &str) {
        lock(&self.inner.held).retain(|_, owner| owner != key);
    }

    /// Cuts every planned snapshot; records each one made. Returns the reason to fail, if any.
    fn cut_snapshots(
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
    fn record_snapshot(
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
                // What the create made is journaled as made, whatever happens next.
                state.made.insert(i, volume.plan.handle.clone());
                if state.phase.is_over() {
                    // Aborted meanwhile (watchdog): this snapshot is void; the end deletes it.
                    return Some("aborted while cutting".into());
                }
                let v = &mut state.volumes[i];
                v.snapshot_handle = Some(volume.plan.handle.to_string());
                v.size_bytes = i64::try_from(info.size_bytes).ok();
                v.cut_time = Some(now());
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

    /// Thaws one filesystem of a cut early (the LVM EBUSY degradation).
    fn thaw_one(&self, cut: &Arc<Cut>, superblock: DevId) {
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
    fn fail_planned(&self, cut: &Arc<Cut>, volumes: Vec<VolumeStatus>, message: String) {
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
    fn fail(&self, cut: &Arc<Cut>, message: String) {
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
    fn end(&self, cut: &Arc<Cut>) {
        if let Err(e) = self.settle(cut) {
            tracing::warn!(key = %cut.key, error = %e, "the cut's end is not durable yet; retrying later");
        }
    }

    /// Thaws what is claimed here and takes each entry off the frozen list once its own thaw
    /// returned; a failed thaw stays listed (and is retried).
    fn thaw_claimed(&self, cut: &Arc<Cut>, claimed: Vec<Arc<FrozenFs>>) {
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
    fn thaw_everything(&self, cut: &Arc<Cut>) {
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
    fn settle(&self, cut: &Arc<Cut>) -> Result<(), EngineError> {
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
    fn note_thawed(&self, cut: &Arc<Cut>) {
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
    fn delete_void(&self, cut: &Arc<Cut>, void: Vec<(usize, SnapshotHandle)>) {
        let mut failed = Vec::new();
        let mut deleted = Vec::new();
        for (i, h) in void {
            match backend::delete(&h, &self.inner.config.backend) {
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
    fn watchdog_fired(&self, key: &str, timeout: Duration) {
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

/// The cut's side of the freeze threads.
struct Sink<'a> {
    engine: &'a Engine,
    cut: &'a Arc<Cut>,
}

impl FreezeSink for Sink<'_> {
    fn may_freeze(&self) -> bool {
        lock(&self.cut.state).phase.accepts_freezes()
    }

    fn returned(&self, target: usize, result: Result<(OwnedFd, Instant), NotFrozen>) {
        let mut state = lock(&self.cut.state);
        if state.freezes.get(target).is_none_or(Option::is_some) {
            return;
        }
        state.in_flight = state.in_flight.saturating_sub(1);
        let mut thaw_now = None;
        match result {
            Ok((fd, started)) => {
                state.first_freeze = Some(match state.first_freeze {
                    Some(t) if t <= started => t,
                    _ => started,
                });
                state.freezes[target] = Some(Ok(()));
                let (superblock, mount_point) = state
                    .entry
                    .frozen
                    .get(target)
                    .map(|r| (r.superblock, r.mount_point.clone()))
                    .unwrap_or((DevId { major: 0, minor: 0 }, PathBuf::new()));
                let fs = Arc::new(FrozenFs {
                    target,
                    superblock,
                    mount_point,
                    fd,
                });
                // Registered at once; if the cut was abandoned meanwhile, thawed right here.
                let abandoned = !state.phase.accepts_freezes();
                state.frozen.push(Frozen {
                    fs: fs.clone(),
                    thawing: abandoned,
                });
                if abandoned {
                    thaw_now = Some(fs);
                }
            }
            Err(why) => {
                if why.is_someone_elses()
                    && let Some(record) = state.entry.frozen.get_mut(target)
                {
                    record.not_ours = true;
                }
                state.freezes[target] = Some(Err(why.to_string()));
            }
        }
        if state.in_flight == 0 {
            state.apply(CutEvent::FreezesReturned);
        }
        let over = state.phase.is_over();
        drop(state);
        if let Some(fs) = thaw_now {
            tracing::warn!(mount = %fs.mount_point.display(), target = fs.target, "a freeze returned after its cut was abandoned: thawing it at once");
            self.engine.thaw_claimed(self.cut, vec![fs]);
        }
        if over {
            self.engine.end(self.cut);
        }
    }
}
