//! The cut / release / abort engine: everything the agent does to volumes, as a plain blocking Rust
//! API that the watch loop (and the one-shot mode, and the tests) drive.
//!
//! A cut: resolve every volume and plan its snapshot (fail before freezing anything: `plan`),
//! arm the watchdog, journal the intent, `syncfs` every filesystem in parallel while writes still
//! flow, FIFREEZE them all in parallel (`executor`), cut the snapshots (`snapshots`), then either
//! thaw at once (`releaseAfterCut`) or hold the freeze until [`Engine::release`] /
//! [`Engine::abort`] or the watchdog's deadline; every end goes through `end`. `state` holds a
//! cut's bookkeeping and renders its status, `recovery` thaws what a dead agent left frozen.
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

mod end;
mod executor;
mod plan;
mod recovery;
mod snapshots;
mod state;
#[cfg(test)]
mod tests;

use crate::agent::lock;
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{CONDITION_READY, FreezePolicy, NodePhase, NodeSnapshotStatus, VolumeStatus};

use super::backend::BackendOptions;
use super::discovery::{self, DevId};
use super::freeze::{GuardPaths, Guardrails};
use super::journal::{FrozenRecord, Journal, JournalEntry, JournalError, Stage};
use super::watchdog::{self, ThawSignal};

pub use executor::{FreezeOps, KernelOps, Spawner, identity_of};
use executor::{FreezeSink, NotFrozen};
use lifecycle::{Consistency, CutEvent, CutPhase};
use plan::{FreezeTarget, Prepared};
use state::{CutState, Frozen, FrozenFs};

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
    /// The PersistentVolume allows a filesystem shared with other mounts (its annotation
    /// `tandem.dev/shared-filesystem: allow`).
    pub allow_shared_filesystem: bool,
    /// Frozen here and cut by the controller's RBD group snapshot (`spec.volumes[].central`).
    pub central: bool,
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

/// Why a cut would fail, found by [`Engine::prepare`] before anything was frozen.
#[derive(Debug, Clone)]
pub struct PrepareRefused {
    pub message: String,
    /// Per volume, what was found (as a failed cut reports it).
    pub volumes: Vec<VolumeStatus>,
}

/// Called from any engine thread with a cut's key (see [`Engine::set_change_notifier`]).
pub type Notifier = Box<dyn Fn(&str) + Send + Sync>;
/// Called (from the watchdog's thread) with a cut's key after the watchdog aborted it.
pub type AbortNotifier = Notifier;

/// The engine's configuration.
#[derive(Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub backend: BackendOptions,
    /// /sys/dev/block (a parameter so unit tests can point elsewhere).
    pub sysfs_block: PathBuf,
    /// Where the node's own filesystems are found (the guard rails).
    pub guard: GuardPaths,
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
            .field("guard", &self.guard)
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
            guard: GuardPaths::default(),
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
    on_change: Mutex<Option<Notifier>>,
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
        let guard = Guardrails::discover(&config.guard, &config.state_dir, &mounts)?;
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
    pub fn set_change_notifier(&self, notifier: Notifier) {
        *lock(&self.inner.on_change) = Some(notifier);
    }

    pub(super) fn changed(&self, key: &str) {
        if let Some(notify) = lock(&self.inner.on_change).as_ref() {
            notify(key);
        }
    }

    /// The guard rails in force.
    pub fn guardrails(&self) -> &Guardrails {
        &self.inner.guard
    }

    /// A cut by key: in memory, or loaded from the journal.
    pub(super) fn find(&self, key: &str) -> Result<Option<Arc<Cut>>, EngineError> {
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

    /// The Prepare step of a cut across nodes: resolves and plans every volume as the cut will,
    /// and flushes every filesystem it would freeze, in parallel. Nothing is frozen, registered
    /// or journaled, so there is nothing to recover and it may run any number of times. Later the
    /// cut's own flush finds little left, and every node freezes soon after the one trigger.
    pub fn prepare(&self, req: &CutRequest) -> Result<(), PrepareRefused> {
        let prepared = self.plan(req)?;
        let ops = self.inner.config.freeze_ops.as_ref();
        std::thread::scope(|s| {
            for target in prepared.freeze_targets() {
                s.spawn(move || {
                    // A flush that fails here is the cut's to report: it flushes again.
                    let path = &target.mount.mount_point;
                    if let Err(e) = ops.open(&target.mount).and_then(|fd| ops.syncfs(&fd, path)) {
                        tracing::debug!(path = %path.display(), error = %e, "prepare: flush failed");
                    }
                });
            }
        });
        Ok(())
    }

    /// Resolves and plans every volume of `req` against the node's mounts (no I/O on them).
    fn plan(&self, req: &CutRequest) -> Result<Prepared, PrepareRefused> {
        let mounts = discovery::read_mountinfo().map_err(|e| PrepareRefused {
            message: e.to_string(),
            volumes: Vec::new(),
        })?;
        plan::prepare(
            req,
            &mounts,
            &self.inner.guard,
            &self.inner.config.backend,
            &self.inner.config.sysfs_block,
        )
        .map_err(|failure| PrepareRefused {
            message: failure.message,
            volumes: failure.volumes,
        })
    }

    /// Runs a registered cut as far as it goes (held, or ended).
    pub(crate) fn run(&self, req: &CutRequest, cut: &Arc<Cut>) {
        // 1. Resolve and plan every volume before anything is frozen.
        let prepared = match self.plan(req) {
            Ok(p) => p,
            Err(refused) => return self.fail_planned(cut, refused.volumes, refused.message),
        };
        let targets = prepared.freeze_targets();
        self.freeze_and_cut(req, cut, &prepared, &targets);
        self.changed(&req.key);
    }

    /// Steps 2-6 of a cut, from a plan.
    pub(super) fn freeze_and_cut(
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
        tracing::debug!(key = %req.key, targets = targets.len(), "intent journaled: syncfs");
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
        tracing::debug!(key = %req.key, failures = failures.len(), "freezes returned: cutting");
        if let Err(message) = self.cut_snapshots(req, cut, prepared) {
            return self.fail(cut, message);
        }
        tracing::debug!(key = %req.key, "snapshots cut");

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

    pub(super) fn write_intent_update(&self, cut: &Arc<Cut>) {
        let _one = lock(&cut.settling);
        let Some(entry) = lock(&cut.state).entry_to_write() else {
            return;
        };
        if let Err(e) = self.inner.journal.write(&entry) {
            tracing::warn!(key = %cut.key, error = %e, "cannot journal that a freeze is someone else's");
        }
    }

    /// Reserves the superblocks of `targets` for `key`; returns a superblock held by another cut.
    pub(super) fn reserve(&self, key: &str, targets: &[FreezeTarget]) -> Option<DevId> {
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

    pub(super) fn release_superblocks(&self, key: &str) {
        lock(&self.inner.held).retain(|_, owner| owner != key);
    }
}

/// The cut's side of the freeze threads.
struct Sink<'a> {
    engine: &'a Engine,
    cut: &'a Arc<Cut>,
}

impl FreezeSink for Sink<'_> {
    fn may_freeze(&self) -> bool {
        tracing::debug!(key = %self.cut.key, "all flushed: freezing");
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
            tracing::debug!(key = %self.cut.key, "every freeze returned");
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
