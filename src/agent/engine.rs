//! The cut / release / abort engine: everything the agent does to volumes, as a plain blocking Rust
//! API that the watch loop (and the one-shot mode, and the tests) drive.
//!
//! A cut: resolve every volume and plan its snapshot (fail before freezing anything), journal the
//! intent, arm the watchdog, `syncfs` every filesystem in parallel while writes still flow, FIFREEZE
//! them all in parallel, cut the snapshots, then either thaw at once (`releaseAfterCut`) or hold the
//! freeze until [`Engine::release`] / [`Engine::abort`] or the watchdog's deadline.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};

use crate::api::{CONDITION_READY, FreezePolicy, NodePhase, NodeSnapshotStatus, VolumeStatus};

use super::backend::{
    self, BackendError, BackendKind, BackendOptions, SnapshotHandle, SnapshotPlan,
};
use super::discovery::{self, DevId, MountInfo, ResolvedVolume};
use super::freeze::{self, FreezeError, GuardPaths, Guardrails, Thawed};
use super::journal::{FrozenRecord, Journal, JournalEntry, JournalError, Stage};
use super::watchdog;

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
}

/// Called (from the watchdog's thread) with a cut's key after the watchdog aborted it.
pub type AbortNotifier = Box<dyn Fn(&str) + Send + Sync>;

/// The engine's configuration.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub state_dir: PathBuf,
    pub backend: BackendOptions,
    /// /sys/dev/block (a parameter so unit tests can point elsewhere).
    pub sysfs_block: PathBuf,
    /// Where the node's own filesystems are found (the guard rails).
    pub guard: GuardPaths,
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
    /// Superblocks frozen by a cut of this agent, and by which cut: one freeze per filesystem.
    held: Mutex<HashMap<DevId, String>>,
    cuts: Mutex<HashMap<String, Arc<Cut>>>,
    notifier: Mutex<Option<AbortNotifier>>,
}

/// A cut in memory.
pub(crate) struct Cut {
    key: String,
    state: Mutex<CutState>,
    /// Signalled when the cut is thawed (so the watchdog stops waiting).
    pub(crate) thawed: Condvar,
}

struct FrozenFs {
    superblock: DevId,
    mount_point: PathBuf,
    fd: OwnedFd,
}

struct CutState {
    entry: JournalEntry,
    frozen: Vec<FrozenFs>,
    /// Snapshots cut so far, by volume index.
    made: BTreeMap<usize, SnapshotHandle>,
    /// Set by the first of release/abort/watchdog: the cut is over.
    finished: bool,
    first_freeze: Option<Instant>,
    /// From the first FIFREEZE to the last FITHAW, once thawed.
    window: Option<Duration>,
    deadline: Instant,
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

fn ready_condition(phase: NodePhase, generation: Option<i64>, message: &str) -> Condition {
    let ready = phase == NodePhase::Released;
    Condition {
        type_: CONDITION_READY.into(),
        status: if ready { "True" } else { "False" }.into(),
        reason: format!("{phase:?}"),
        message: message.into(),
        last_transition_time: now(),
        observed_generation: generation,
    }
}

/// Sets the phase, message and the Ready condition.
fn set_phase(status: &mut NodeSnapshotStatus, phase: NodePhase, message: Option<String>) {
    status.phase = phase;
    status.message = message;
    let text = status.message.clone().unwrap_or_default();
    status.conditions = vec![ready_condition(phase, status.observed_generation, &text)];
}

impl Engine {
    /// Opens the journal in the state directory and thaws (and cleans up) whatever an unfinished
    /// entry says may still be frozen: what a crashed or killed agent left behind.
    pub fn start(config: EngineConfig) -> Result<(Engine, Vec<JournalEntry>), EngineError> {
        std::fs::create_dir_all(&config.state_dir).map_err(|source| EngineError::StateDir {
            path: config.state_dir.clone(),
            source,
        })?;
        let journal = Journal::open(&config.state_dir)?;
        let mounts = discovery::read_mountinfo()?;
        let guard = Guardrails::discover(&config.guard, &config.state_dir, &mounts)?;
        let engine = Engine {
            inner: Arc::new(Inner {
                journal,
                guard,
                config,
                held: Mutex::new(HashMap::new()),
                cuts: Mutex::new(HashMap::new()),
                notifier: Mutex::new(None),
            }),
        };
        let recovered = engine.recover(&mounts)?;
        Ok((engine, recovered))
    }

    /// Registers the function the watchdog calls after it aborted a cut.
    pub fn set_abort_notifier(&self, notifier: AbortNotifier) {
        *lock(&self.inner.notifier) = Some(notifier);
    }

    /// The guard rails in force.
    pub fn guardrails(&self) -> &Guardrails {
        &self.inner.guard
    }

    fn recover(&self, mounts: &[MountInfo]) -> Result<Vec<JournalEntry>, EngineError> {
        let mut recovered = Vec::new();
        for entry in self.inner.journal.all()? {
            let mut entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "unreadable journal entry; check its filesystems by hand");
                    continue;
                }
            };
            if !entry.stage.may_be_frozen() {
                continue;
            }
            tracing::warn!(key = %entry.key, stage = ?entry.stage, "found an unfinished cut in the journal: thawing and deleting its snapshots");
            let mut problems = Vec::new();
            for record in &entry.frozen {
                match thaw_record(record, mounts) {
                    Ok(how) => {
                        tracing::info!(mount = %record.mount_point.display(), ?how, "thawed on start")
                    }
                    Err(e) => problems.push(e),
                }
            }
            for handle in &entry.snapshots {
                if let Err(e) = backend::delete(handle, &self.inner.config.backend) {
                    problems.push(format!("cannot delete snapshot {handle}: {e}"));
                }
            }
            let mut message = "the agent restarted while this cut was in progress: it thawed the volumes on start and deleted the snapshots".to_string();
            if !problems.is_empty() {
                message.push_str(&format!("; problems: {}", problems.join("; ")));
            }
            entry.stage = Stage::Aborted;
            for v in &mut entry.status.volumes {
                v.snapshot_handle = None;
            }
            set_phase(&mut entry.status, NodePhase::Aborted, Some(message));
            self.inner.journal.write(&entry)?;
            recovered.push(entry);
        }
        Ok(recovered)
    }

    /// The last status of a cut this agent knows (in memory or in the journal).
    pub fn status(&self, key: &str) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        if let Some(cut) = lock(&self.inner.cuts).get(key).cloned() {
            return Ok(Some(lock(&cut.state).entry.status.clone()));
        }
        Ok(self.inner.journal.get(key)?.map(|e| e.status))
    }

    /// The exact freeze window of a thawed cut of this run (the status rounds it to milliseconds).
    pub fn freeze_window(&self, key: &str) -> Option<Duration> {
        let cut = lock(&self.inner.cuts).get(key).cloned()?;
        lock(&cut.state).window
    }

    /// When a held cut's watchdog fires, if a cut is held.
    pub fn deadline(&self, key: &str) -> Option<Instant> {
        let cut = lock(&self.inner.cuts).get(key).cloned()?;
        let state = lock(&cut.state);
        (!state.finished).then_some(state.deadline)
    }

    /// Freezes, cuts and (if asked) thaws. Idempotent: a cut this agent already made or recorded is
    /// reported as it stands, never cut twice. Blocking.
    pub fn cut(
        &self,
        req: &CutRequest,
        generation: Option<i64>,
    ) -> Result<NodeSnapshotStatus, EngineError> {
        if let Some(status) = self.status(&req.key)? {
            return Ok(status);
        }
        let mut status = NodeSnapshotStatus {
            observed_generation: generation,
            ..Default::default()
        };
        let mut entry = JournalEntry {
            key: req.key.clone(),
            namespace: req.namespace.clone(),
            name: req.name.clone(),
            group_snapshot: req.group_snapshot.clone(),
            stage: Stage::Failed,
            frozen: Vec::new(),
            snapshots: Vec::new(),
            status: status.clone(),
        };

        // 1. Resolve and plan every volume before anything is frozen.
        let prepared = match self.prepare(req) {
            Ok(p) => p,
            Err(failure) => {
                status.volumes = failure.volumes;
                set_phase(&mut status, NodePhase::Failed, Some(failure.message));
                entry.status = status.clone();
                self.inner.journal.write(&entry)?;
                return Ok(status);
            }
        };
        status.volumes = prepared.volumes.iter().map(|v| v.status.clone()).collect();

        // 2. One freeze per filesystem: reserve the superblocks or fail clearly.
        let targets = prepared.freeze_targets();
        {
            let mut held = lock(&self.inner.held);
            if let Some((sb, owner)) = targets
                .iter()
                .find_map(|t| held.get(&t.superblock).map(|o| (t.superblock, o.clone())))
            {
                let mount = targets
                    .iter()
                    .find(|t| t.superblock == sb)
                    .map(|t| t.mount.mount_point.display().to_string())
                    .unwrap_or_default();
                drop(held);
                set_phase(
                    &mut status,
                    NodePhase::Failed,
                    Some(format!(
                        "{mount} is already frozen by another cut of this agent ({owner}); one freeze per volume at a time"
                    )),
                );
                entry.status = status.clone();
                self.inner.journal.write(&entry)?;
                return Ok(status);
            }
            for t in &targets {
                held.insert(t.superblock, req.key.clone());
            }
        }

        // 3. Journal the intent, then arm the watchdog before the first freeze.
        entry.stage = Stage::Freezing;
        entry.frozen = targets
            .iter()
            .map(|t| FrozenRecord {
                mount_point: t.mount.mount_point.clone(),
                superblock: t.superblock,
            })
            .collect();
        entry.snapshots = prepared
            .volumes
            .iter()
            .map(|v| v.plan.handle.clone())
            .collect();
        entry.status = status.clone();
        if let Err(e) = self.inner.journal.write(&entry) {
            self.release_superblocks(&req.key);
            return Err(e.into());
        }
        let cut = Arc::new(Cut {
            key: req.key.clone(),
            state: Mutex::new(CutState {
                entry,
                frozen: Vec::new(),
                made: BTreeMap::new(),
                finished: false,
                first_freeze: None,
                window: None,
                deadline: Instant::now() + req.freeze_timeout,
            }),
            thawed: Condvar::new(),
        });
        lock(&self.inner.cuts).insert(req.key.clone(), cut.clone());
        if !targets.is_empty()
            && let Err(e) = watchdog::arm(self.clone(), cut.clone(), req.freeze_timeout)
        {
            let statuses = status.volumes.clone();
            return self.fail(
                &cut,
                statuses,
                format!("cannot start the watchdog thread, so nothing was frozen: {e}"),
            );
        }

        // 4. syncfs all, then FIFREEZE all, in parallel.
        let results = freeze_all(&targets);
        let mut freeze_failures = Vec::new();
        {
            let mut state = lock(&cut.state);
            for (target, result) in targets.iter().zip(results) {
                match result {
                    Ok((fd, started)) => {
                        state.first_freeze = Some(match state.first_freeze {
                            Some(t) if t <= started => t,
                            _ => started,
                        });
                        if state.finished {
                            // The watchdog fired while we were freezing: undo at once.
                            thaw_fd(&fd, &target.mount.mount_point);
                        } else {
                            state.frozen.push(FrozenFs {
                                superblock: target.superblock,
                                mount_point: target.mount.mount_point.clone(),
                                fd,
                            });
                        }
                    }
                    Err(e) => freeze_failures.push((target, e)),
                }
            }
            if let Some(start) = state.first_freeze {
                let ago = jiff::SignedDuration::try_from(start.elapsed()).unwrap_or_default();
                let wall = jiff::Timestamp::now()
                    .checked_sub(ago)
                    .unwrap_or_else(|_| jiff::Timestamp::now());
                state.entry.status.freeze_start = Some(MicroTime(wall));
            }
        }
        let mut statuses: Vec<VolumeStatus> =
            prepared.volumes.iter().map(|v| v.status.clone()).collect();
        for (target, error) in &freeze_failures {
            for &i in &target.volumes {
                statuses[i].frozen = false;
                statuses[i].reason = Some(error.to_string());
            }
        }
        for target in &targets {
            if !freeze_failures
                .iter()
                .any(|(t, _)| t.superblock == target.superblock)
            {
                for &i in &target.volumes {
                    statuses[i].frozen = true;
                }
            }
        }
        if !freeze_failures.is_empty() && req.freeze == FreezePolicy::Required {
            let names: Vec<String> = freeze_failures
                .iter()
                .map(|(t, e)| format!("{} ({e})", t.describe(&prepared)))
                .collect();
            return self.fail(
                &cut,
                statuses,
                format!("could not freeze {}", names.join(", ")),
            );
        }

        // 5. Cut the snapshots.
        let cut_result = self.cut_snapshots(req, &cut, &prepared, &mut statuses);
        if let Err(message) = cut_result {
            return self.fail(&cut, statuses, message);
        }

        // 6. Thaw at once, or hold.
        let mut state = lock(&cut.state);
        if state.finished {
            // The watchdog aborted meanwhile; it deleted what it saw, delete the rest.
            let made: Vec<SnapshotHandle> = state.made.values().cloned().collect();
            drop(state);
            self.delete_handles(&made);
            return Ok(lock(&cut.state).entry.status.clone());
        }
        let everything_frozen = statuses.iter().all(|v| v.frozen);
        let consistency = if everything_frozen {
            "every volume was frozen while the snapshots were cut"
        } else {
            "not every volume was frozen: each snapshot is consistent on its own only"
        };
        state.entry.status.volumes = statuses;
        if req.release_after_cut || state.frozen.is_empty() {
            self.thaw_locked(&mut state);
            state.finished = true;
            state.entry.stage = Stage::Released;
            set_phase(
                &mut state.entry.status,
                NodePhase::Released,
                Some(format!("cut and released on this node; {consistency}")),
            );
            cut.thawed.notify_all();
            let made: Vec<SnapshotHandle> = state.made.values().cloned().collect();
            self.inner.journal.write(&state.entry)?;
            let status = state.entry.status.clone();
            drop(state);
            self.release_superblocks(&req.key);
            self.persist(&made);
            Ok(status)
        } else {
            state.entry.stage = Stage::Held;
            set_phase(
                &mut state.entry.status,
                NodePhase::Cut,
                Some(format!(
                    "snapshots cut, freeze held until release; {consistency}"
                )),
            );
            self.inner.journal.write(&state.entry)?;
            Ok(state.entry.status.clone())
        }
    }

    /// Cuts every planned snapshot; records each one made. Returns the reason to fail, if any.
    fn cut_snapshots(
        &self,
        req: &CutRequest,
        cut: &Arc<Cut>,
        prepared: &Prepared,
        statuses: &mut [VolumeStatus],
    ) -> Result<(), String> {
        let options = &self.inner.config.backend;
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
                        s.spawn(move || (i, backend::create(plan, options)))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| match h.join() {
                        Ok(r) => r,
                        Err(_) => (
                            usize::MAX,
                            Err(BackendError::Parse {
                                command: "clone thread".into(),
                                why: "panicked".into(),
                            }),
                        ),
                    })
                    .collect()
            });
        let mut failure = None;
        for (i, result) in parallel_results {
            if let Some(msg) = self.record_snapshot(cut, prepared, statuses, i, result) {
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
                self.thaw_one(cut, sb);
                let why = result
                    .as_ref()
                    .err()
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                result = backend::create(plan, options);
                for (j, v) in prepared.volumes.iter().enumerate() {
                    if v.superblock == sb && statuses[j].frozen {
                        statuses[j].frozen = false;
                        statuses[j].reason = Some(format!(
                            "thawed before its snapshot and snapshotted with LVM's own suspend, consistent on its own only: {why}"
                        ));
                    }
                }
            }
            if let Some(msg) = self.record_snapshot(cut, prepared, statuses, i, result) {
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
        statuses: &mut [VolumeStatus],
        i: usize,
        result: Result<backend::SnapshotInfo, BackendError>,
    ) -> Option<String> {
        let Some(volume) = prepared.volumes.get(i) else {
            return Some("a snapshot thread failed".into());
        };
        match result {
            Ok(info) => {
                let mut state = lock(&cut.state);
                if state.finished {
                    // Aborted meanwhile (watchdog): this snapshot is void.
                    drop(state);
                    self.delete_handles(std::slice::from_ref(&info.handle));
                    return Some("aborted while cutting".into());
                }
                statuses[i].snapshot_handle = Some(info.handle.to_string());
                // Journal what was made (btrfs adds the subvolume id/uuid) in place of the plan.
                if let Some(planned) = state.entry.snapshots.get_mut(i) {
                    *planned = info.handle.clone();
                }
                state.made.insert(i, info.handle);
                statuses[i].size_bytes = i64::try_from(info.size_bytes).ok();
                statuses[i].cut_time = Some(now());
                None
            }
            Err(e) => {
                statuses[i].reason = Some(e.to_string());
                Some(format!(
                    "snapshot of volume {} (claim {}) failed: {e}",
                    volume.request.persistent_volume, volume.request.claim
                ))
            }
        }
    }

    /// Thaw everything, delete the snapshots, phase Failed.
    fn fail(
        &self,
        cut: &Arc<Cut>,
        statuses: Vec<VolumeStatus>,
        message: String,
    ) -> Result<NodeSnapshotStatus, EngineError> {
        let mut state = lock(&cut.state);
        let already = state.finished;
        self.thaw_locked(&mut state);
        state.finished = true;
        cut.thawed.notify_all();
        let made: Vec<SnapshotHandle> = std::mem::take(&mut state.made).into_values().collect();
        if !already {
            let mut statuses = statuses;
            for v in &mut statuses {
                v.snapshot_handle = None;
                v.cut_time = None;
            }
            state.entry.status.volumes = statuses;
            state.entry.stage = Stage::Failed;
            set_phase(
                &mut state.entry.status,
                NodePhase::Failed,
                Some(format!(
                    "{message}; every volume is thawed and no snapshot is kept"
                )),
            );
        }
        drop(state);
        self.delete_handles(&made);
        let state = lock(&cut.state);
        self.inner.journal.write(&state.entry)?;
        let status = state.entry.status.clone();
        drop(state);
        self.release_superblocks(&cut.key);
        Ok(status)
    }

    /// Thaws a held cut and keeps its snapshots (`Release`).
    pub fn release(&self, key: &str) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        let Some(cut) = lock(&self.inner.cuts).get(key).cloned() else {
            return self.status(key);
        };
        let mut state = lock(&cut.state);
        if state.finished {
            return Ok(Some(state.entry.status.clone()));
        }
        self.thaw_locked(&mut state);
        state.finished = true;
        cut.thawed.notify_all();
        state.entry.stage = Stage::Released;
        let msg = state.entry.status.message.clone().unwrap_or_default();
        let consistency = msg
            .split_once("; ")
            .map(|(_, c)| c.to_string())
            .unwrap_or_default();
        set_phase(
            &mut state.entry.status,
            NodePhase::Released,
            Some(format!("released; {consistency}")),
        );
        self.inner.journal.write(&state.entry)?;
        let made: Vec<SnapshotHandle> = state.made.values().cloned().collect();
        let status = state.entry.status.clone();
        drop(state);
        self.release_superblocks(key);
        self.persist(&made);
        Ok(Some(status))
    }

    /// Thaws (if held) and deletes the snapshots (`Abort`, the watchdog, or a failure elsewhere in
    /// the group). Also turns a released cut into an aborted one.
    pub fn abort(
        &self,
        key: &str,
        message: &str,
    ) -> Result<Option<NodeSnapshotStatus>, EngineError> {
        let cut = lock(&self.inner.cuts).get(key).cloned();
        let Some(cut) = cut else {
            // Known only from the journal (e.g. after a restart): delete what it lists.
            let Some(mut entry) = self.inner.journal.get(key)? else {
                return Ok(None);
            };
            if entry.status.phase != NodePhase::Aborted && entry.status.phase != NodePhase::Failed {
                self.delete_handles(&entry.snapshots);
                for v in &mut entry.status.volumes {
                    v.snapshot_handle = None;
                }
                entry.stage = Stage::Aborted;
                set_phase(&mut entry.status, NodePhase::Aborted, Some(message.into()));
                self.inner.journal.write(&entry)?;
            }
            return Ok(Some(entry.status));
        };
        let mut state = lock(&cut.state);
        let phase = state.entry.status.phase;
        if matches!(phase, NodePhase::Aborted | NodePhase::Failed) {
            return Ok(Some(state.entry.status.clone()));
        }
        self.thaw_locked(&mut state);
        state.finished = true;
        cut.thawed.notify_all();
        let mut made: Vec<SnapshotHandle> = std::mem::take(&mut state.made).into_values().collect();
        if phase == NodePhase::Released || phase == NodePhase::Cut {
            made.extend(state.entry.snapshots.iter().cloned());
            made.dedup();
        }
        for v in &mut state.entry.status.volumes {
            v.snapshot_handle = None;
        }
        state.entry.stage = Stage::Aborted;
        set_phase(
            &mut state.entry.status,
            NodePhase::Aborted,
            Some(message.into()),
        );
        drop(state);
        self.delete_handles(&made);
        let state = lock(&cut.state);
        self.inner.journal.write(&state.entry)?;
        let status = state.entry.status.clone();
        drop(state);
        self.release_superblocks(key);
        Ok(Some(status))
    }

    /// Aborts every cut that still holds a freeze (on shutdown).
    pub fn abort_all_held(&self, message: &str) {
        let held: Vec<String> = lock(&self.inner.cuts)
            .iter()
            .filter(|(_, c)| !lock(&c.state).finished)
            .map(|(k, _)| k.clone())
            .collect();
        for key in held {
            if let Err(e) = self.abort(&key, message) {
                tracing::error!(key, error = %e, "abort on shutdown could not update the journal");
            }
        }
    }

    /// Called by the watchdog at the deadline.
    pub(crate) fn watchdog_fired(&self, key: &str, timeout: Duration) {
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
        if let Some(notify) = lock(&self.inner.notifier).as_ref() {
            notify(key);
        }
    }

    /// The NodeSnapshot is going away: thaw if held, delete the snapshots unless `retain`, and
    /// forget the cut.
    pub fn finalize(&self, key: &str, retain: bool) -> Result<(), EngineError> {
        if let Some(cut) = lock(&self.inner.cuts).get(key).cloned() {
            let finished = lock(&cut.state).finished;
            if !finished {
                self.abort(
                    key,
                    "the NodeSnapshot was deleted while its freeze was held",
                )?;
            }
        }
        if let Some(entry) = self.inner.journal.get(key)?
            && (!retain || entry.status.phase != NodePhase::Released)
        {
            self.delete_handles(&entry.snapshots);
        }
        lock(&self.inner.cuts).remove(key);
        self.inner.journal.remove(key)?;
        Ok(())
    }

    fn prepare(&self, req: &CutRequest) -> Result<Prepared, Failure> {
        let mounts = discovery::read_mountinfo().map_err(|e| Failure {
            volumes: Vec::new(),
            message: e.to_string(),
        })?;
        let mut volumes = Vec::new();
        let mut statuses = Vec::new();
        let mut problems = Vec::new();
        for request in &req.volumes {
            let mut status = VolumeStatus {
                claim: request.claim.clone(),
                ..Default::default()
            };
            let who = format!(
                "volume {} (claim {})",
                request.persistent_volume, request.claim
            );
            let resolved = match discovery::resolve_volume(
                &request.path,
                &mounts,
                &self.inner.config.sysfs_block,
            ) {
                Ok(r) => r,
                Err(e) => {
                    status.reason = Some(e.to_string());
                    problems.push(format!("{who}: {e}"));
                    statuses.push(status);
                    continue;
                }
            };
            status.device = Some(resolved.device.display().to_string());
            status.filesystem = resolved.fs_type().map(str::to_string);
            // Refuse the node's own filesystems before anything else is considered.
            if let Some(mount) = &resolved.mount
                && let Err(refusal) = self.inner.guard.check_volume(
                    &request.path,
                    mount,
                    &mounts,
                    &request.persistent_volume,
                    request.allow_shared_filesystem,
                )
            {
                status.reason = Some(refusal.to_string());
                problems.push(format!("{who}: {refusal}"));
                statuses.push(status);
                continue;
            }
            let plan = match backend::snapshot_name(
                &req.namespace,
                &req.group_snapshot,
                &request.persistent_volume,
                &req.key,
            )
            .and_then(|name| backend::plan(&resolved, &name, &req.key, &self.inner.config.backend))
            {
                Ok(p) => p,
                Err(e) => {
                    status.reason = Some(e.to_string());
                    problems.push(format!("{who}: {e}"));
                    statuses.push(status);
                    continue;
                }
            };
            status.backend = Some(plan.backend.name().to_string());
            // Why this volume will not be frozen, if it will not.
            let mut no_freeze = None;
            if req.freeze == FreezePolicy::Disabled {
                no_freeze = Some("freeze is Disabled for this group".to_string());
            } else if resolved.mount.is_none() {
                no_freeze = Some("a block-mode volume has no filesystem to freeze".into());
            } else if !plan.backend.snapshots_under_freeze() {
                no_freeze = Some("a btrfs snapshot cannot be taken while its filesystem is frozen (it would block until the thaw); the snapshot is atomic for this subvolume only".into());
            }
            if let Some(why) = &no_freeze {
                if req.freeze == FreezePolicy::Required {
                    status.reason = Some(why.clone());
                    problems.push(format!("{who} cannot be frozen: {why}"));
                    statuses.push(status);
                    continue;
                }
                status.reason = Some(why.clone());
            }
            let superblock = resolved
                .mount
                .as_ref()
                .map(|m| m.dev)
                .unwrap_or(resolved.block_dev);
            statuses.push(status.clone());
            volumes.push(PreparedVolume {
                request: request.clone(),
                resolved,
                plan,
                superblock,
                freeze: no_freeze.is_none(),
                status,
            });
        }
        if !problems.is_empty() {
            return Err(Failure {
                volumes: statuses,
                message: problems.join("; "),
            });
        }
        Ok(Prepared { volumes })
    }

    fn thaw_locked(&self, state: &mut MutexGuard<'_, CutState>) {
        let frozen = std::mem::take(&mut state.frozen);
        if !frozen.is_empty() {
            std::thread::scope(|s| {
                for f in &frozen {
                    s.spawn(move || thaw_fd(&f.fd, &f.mount_point));
                }
            });
        }
        if let Some(start) = state.first_freeze {
            let window = start.elapsed();
            state.window = Some(window);
            state.entry.status.freeze_window_millis = i64::try_from(window.as_millis()).ok();
        }
    }

    /// Thaws one filesystem of a cut early (the LVM EBUSY degradation).
    fn thaw_one(&self, cut: &Arc<Cut>, superblock: DevId) {
        let mut state = lock(&cut.state);
        if let Some(pos) = state.frozen.iter().position(|f| f.superblock == superblock) {
            let f = state.frozen.remove(pos);
            thaw_fd(&f.fd, &f.mount_point);
        }
    }

    fn release_superblocks(&self, key: &str) {
        lock(&self.inner.held).retain(|_, owner| owner != key);
    }

    fn delete_handles(&self, handles: &[SnapshotHandle]) {
        for h in handles {
            if let Err(e) = backend::delete(h, &self.inner.config.backend) {
                tracing::error!(handle = %h, error = %e, "could not delete a void snapshot");
            }
        }
    }

    fn persist(&self, handles: &[SnapshotHandle]) {
        for h in handles {
            if let Err(e) = backend::persist(h) {
                tracing::warn!(handle = %h, error = %e, "could not make a snapshot durable");
            }
        }
    }

    pub(crate) fn cut_key(cut: &Cut) -> &str {
        &cut.key
    }

    pub(crate) fn cut_wait_thawed(cut: &Cut, deadline: Instant) -> bool {
        let mut state = lock(&cut.state);
        loop {
            if state.finished {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = match cut.thawed.wait_timeout(state, deadline - now) {
                Ok((s, _)) => s,
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }
}

/// Locks, ignoring poisoning: a panicked thread must never keep the agent from thawing.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn thaw_fd(fd: &OwnedFd, mount_point: &Path) {
    match freeze::thaw(fd, mount_point) {
        Ok(Thawed::Thawed) => {}
        Ok(Thawed::WasNotFrozen) => {
            tracing::warn!(mount = %mount_point.display(), "was not frozen any more when thawed (someone else thawed it)")
        }
        Err(e) => tracing::error!(mount = %mount_point.display(), error = %e, "THAW FAILED"),
    }
}

/// Thaws a journal record on start: through the mount at the recorded place if it is still the same
/// filesystem, else through any mount of that superblock.
fn thaw_record(record: &FrozenRecord, mounts: &[MountInfo]) -> Result<Thawed, String> {
    let candidates = mounts
        .iter()
        .filter(|m| m.dev == record.superblock)
        .map(|m| m.mount_point.clone());
    let mut tried = Vec::new();
    let preferred = std::iter::once(record.mount_point.clone()).filter(|p| {
        mounts
            .iter()
            .any(|m| &m.mount_point == p && m.dev == record.superblock)
    });
    for path in preferred.chain(candidates) {
        match freeze::open_dir(&path).and_then(|fd| freeze::thaw(&fd, &path)) {
            Ok(t) => return Ok(t),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!(
        "cannot thaw {} ({}): no mount of that filesystem is left{}",
        record.mount_point.display(),
        record.superblock,
        if tried.is_empty() {
            String::new()
        } else {
            format!(" ({})", tried.join("; "))
        }
    ))
}

struct Failure {
    volumes: Vec<VolumeStatus>,
    message: String,
}

struct PreparedVolume {
    request: VolumeRequest,
    #[allow(dead_code)]
    resolved: ResolvedVolume,
    plan: SnapshotPlan,
    superblock: DevId,
    freeze: bool,
    status: VolumeStatus,
}

struct Prepared {
    volumes: Vec<PreparedVolume>,
}

/// A filesystem to freeze and the volumes on it.
struct FreezeTarget {
    superblock: DevId,
    mount: MountInfo,
    volumes: Vec<usize>,
}

impl FreezeTarget {
    fn describe(&self, prepared: &Prepared) -> String {
        let claims: Vec<String> = self
            .volumes
            .iter()
            .map(|&i| {
                let r = &prepared.volumes[i].request;
                format!("volume {} (claim {})", r.persistent_volume, r.claim)
            })
            .collect();
        format!(
            "{} at {}",
            claims.join(" and "),
            self.mount.mount_point.display()
        )
    }
}

impl Prepared {
    fn freeze_targets(&self) -> Vec<FreezeTarget> {
        let mut targets: Vec<FreezeTarget> = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.freeze {
                continue;
            }
            let Some(mount) = &v.resolved.mount else {
                continue;
            };
            if let Some(t) = targets.iter_mut().find(|t| t.superblock == v.superblock) {
                t.volumes.push(i);
            } else {
                targets.push(FreezeTarget {
                    superblock: v.superblock,
                    mount: mount.clone(),
                    volumes: vec![i],
                });
            }
        }
        targets
    }
}

/// syncfs every target, wait for all, then FIFREEZE every target, each on its own thread. Returns
/// per target the open fd (kept for the thaw) and when its FIFREEZE started.
fn freeze_all(targets: &[FreezeTarget]) -> Vec<Result<(OwnedFd, Instant), FreezeError>> {
    if targets.is_empty() {
        return Vec::new();
    }
    let barrier = Barrier::new(targets.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let barrier = &barrier;
                s.spawn(move || {
                    let path = &t.mount.mount_point;
                    let opened = freeze::open_dir(path).and_then(|fd| {
                        check_same_mount(&fd, t)?;
                        freeze::syncfs(&fd, path)?;
                        Ok(fd)
                    });
                    // Everyone flushes first, then everyone freezes: the window is one freeze long.
                    barrier.wait();
                    let fd = opened?;
                    let started = Instant::now();
                    freeze::freeze(&fd, path)?;
                    Ok((fd, started))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(FreezeError::Other {
                        what: "freeze thread",
                        path: PathBuf::new(),
                        errno: rustix::io::Errno::FAULT,
                    })
                })
            })
            .collect()
    })
}

/// The opened directory must be the very mount that was resolved (no swap in between).
fn check_same_mount(fd: &OwnedFd, target: &FreezeTarget) -> Result<(), FreezeError> {
    let stx = rustix::fs::statx(
        fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|errno| FreezeError::Other {
        what: "statx",
        path: target.mount.mount_point.clone(),
        errno,
    })?;
    if stx.stx_mnt_id != target.mount.mount_id {
        return Err(FreezeError::Other {
            what: "mount check (the mount changed since it was resolved)",
            path: target.mount.mount_point.clone(),
            errno: rustix::io::Errno::STALE,
        });
    }
    Ok(())
}
