//! The node agent: acts only on its own node's NodeSnapshots.
//!
//! - [`discovery`]: what is under a volume (mountinfo, sysfs).
//! - [`freeze`]: FIFREEZE/FITHAW/syncfs and the guard rails.
//! - [`backend`]: the snapshot backends (reflink, lvm-thin, lvm-thick, btrfs).
//! - [`journal`]: what is about to be frozen, on the host, so a restart thaws it.
//! - [`watchdog`]: thaws on the agent's own clock after `freezeTimeoutSeconds`.
//! - [`cut`]: cut / release / abort as a plain blocking API around a pure lifecycle
//!   ([`cut::lifecycle`]); [`engine`] is the same API under its first name.
//! - [`watch`]: the NodeSnapshot watch loop that drives the engine.
//! - [`oneshot`]: one-shot restores without an API server (clone, attach, delete the clones of a
//!   one-shot cut).
//! - [`restore`]: the NodeRestore watch loop and the clone journal (clones of member snapshots).

pub mod backend;
pub mod cut;
pub mod discovery;
pub mod engine;
pub mod freeze;
pub mod journal;
pub mod oneshot;
pub mod restore;
pub mod siblings;
pub mod watch;
pub mod watchdog;

use std::path::PathBuf;
use std::time::Duration;

use crate::api::{FreezePolicy, NodePhase};

use engine::{CutRequest, Engine, EngineConfig, EngineError, VolumeRequest};

/// Command-line flags of `tandem agent`.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The node this agent acts for (from the downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Host directory for the agent's journal. Must not be on a filesystem the agent may freeze
    /// (the agent refuses to freeze its filesystem).
    #[arg(long, env = "TANDEM_STATE_DIR", default_value = "/var/lib/tandem")]
    pub state_dir: PathBuf,

    /// The kubelet's root directory, where CSI volumes are mounted.
    #[arg(long, env = "TANDEM_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    pub kubelet_dir: PathBuf,

    /// Where the host's `/` is visible to the agent (read-only), to find the host's root, kubelet,
    /// container runtime and log filesystems, which are never frozen. `/` when the agent runs on
    /// the host; the chart mounts it at `/host`.
    #[arg(long, env = "TANDEM_HOST_ROOT", default_value = "/")]
    pub host_root: PathBuf,

    /// Copy-on-write space of a thick LVM snapshot (`lvcreate -L`, e.g. `1G`).
    #[arg(long, env = "TANDEM_THICK_COW_SIZE", default_value = "1G")]
    pub thick_cow_size: String,

    /// Where restore clones' loop devices are linked, as `<dir>/<pv>` (a tmpfs on a node, so a
    /// stale link never survives a reboot).
    #[arg(long, env = "TANDEM_RESTORE_LINK_DIR", default_value = "/dev/tandem")]
    pub restore_link_dir: PathBuf,

    /// Where btrfs restore clones are bind-mounted, as `<dir>/<pv>` (default
    /// `<kubelet dir>/plugins/tandem.dev/restores`, whose mounts reach the host).
    #[arg(long, env = "TANDEM_RESTORE_MOUNT_DIR")]
    pub restore_mount_dir: Option<PathBuf>,

    /// Only thaw what the journal says is still frozen (and delete its snapshots), then exit.
    #[arg(long)]
    pub recover_only: bool,

    /// Without an API server: cut the volumes mounted at these paths, print the status as JSON and
    /// exit (for hosts without Kubernetes, such as the LVM test guest). Repeatable.
    #[arg(long = "oneshot-volume", value_name = "PATH")]
    pub oneshot_volumes: Vec<PathBuf>,

    /// One-shot: also freeze the krbd volume mounted here without cutting it (its snapshot is an
    /// RBD group snapshot cut by another process while this one holds). Repeatable.
    #[arg(long = "oneshot-central-volume", value_name = "PATH")]
    pub oneshot_central_volumes: Vec<PathBuf>,

    /// One-shot: while holding, thaw as soon as this file exists (at most `--oneshot-hold-ms`).
    #[arg(long, value_name = "PATH")]
    pub oneshot_release_file: Option<PathBuf>,

    /// One-shot: while holding, thaw and delete the snapshots as soon as this file exists (the
    /// central cut failed, as the controller's `Abort`).
    #[arg(long, value_name = "PATH")]
    pub oneshot_abort_file: Option<PathBuf>,

    /// One-shot: `cut` (freeze, snapshot, thaw), `delete` (delete the snapshots of an earlier cut
    /// of the same name and forget it), `restore` (clone the snapshots of an earlier cut of the same
    /// name; again: attach them), `attach` (re-attach those clones) or `unrestore` (delete them).
    #[arg(long, default_value = "cut", value_parser = ["cut", "delete", "restore", "attach", "unrestore"])]
    pub oneshot_action: String,

    /// One-shot: the name snapshots are named after (stands for the GroupSnapshot).
    #[arg(long, default_value = "oneshot")]
    pub oneshot_name: String,

    /// One-shot: the namespace snapshots are named after.
    #[arg(long, default_value = "local")]
    pub oneshot_namespace: String,

    /// One-shot: hold the freeze this long after the cut before thawing (0: thaw at once). The
    /// held status is printed as a JSON line as soon as the freeze is held.
    #[arg(long, default_value_t = 0)]
    pub oneshot_hold_ms: u64,

    /// One-shot: the freeze policy (Required, BestEffort, Disabled).
    #[arg(long, default_value = "Required", value_parser = ["Required", "BestEffort", "Disabled"])]
    pub oneshot_freeze: String,

    /// One-shot: the watchdog's limit, in seconds.
    #[arg(long, default_value_t = 10)]
    pub oneshot_freeze_timeout_seconds: u64,
}

/// What stops the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Restore(#[from] restore::RestoreError),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("one-shot cut ended {phase:?}: {message}")]
    OneshotFailed { phase: NodePhase, message: String },
    #[error("cannot print the status: {0}")]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Backend(#[from] backend::BackendError),
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("one-shot restore: {0}")]
    OneshotRestore(String),
}

/// Locks, ignoring poisoning: a panicked thread must never keep the agent from thawing.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The engine configuration the flags ask for.
pub fn engine_config(args: &AgentArgs) -> EngineConfig {
    let mut config = EngineConfig::new(&args.state_dir);
    config.backend.thick_cow_size = args.thick_cow_size.clone();
    config.guard.layout.host_root = args.host_root.clone();
    config.guard.layout.kubelet_dir = args.kubelet_dir.clone();
    config
}

/// Where restores put and publish their clones, from the flags.
pub fn clone_options(args: &AgentArgs) -> backend::clone::CloneOptions {
    backend::clone::CloneOptions {
        backend: engine_config(args).backend,
        link_dir: args.restore_link_dir.clone(),
        mount_dir: args.restore_mount_dir.clone().unwrap_or_else(|| {
            args.kubelet_dir
                .join("plugins")
                .join("tandem.dev")
                .join("restores")
        }),
    }
}

/// Runs the agent until a shutdown signal.
pub async fn run(args: AgentArgs) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    Ok(run_agent(args).await?)
}

async fn run_agent(args: AgentArgs) -> Result<(), AgentError> {
    let config = engine_config(&args);
    let (engine, recovered) = tokio::task::spawn_blocking(move || Engine::start(config)).await??;
    for entry in &recovered {
        tracing::warn!(namespace = %entry.namespace, name = %entry.name, "thawed and cleaned up a cut left unfinished by an earlier run");
    }
    if args.recover_only {
        tracing::info!(count = recovered.len(), "recovery done");
        return Ok(());
    }
    if matches!(
        args.oneshot_action.as_str(),
        "restore" | "attach" | "unrestore"
    ) {
        // The engine (its lock on the state directory) is held meanwhile: one agent per node.
        return tokio::task::spawn_blocking(move || {
            let _engine = engine;
            oneshot::run(&args, &clone_options(&args))
        })
        .await?;
    }
    if !args.oneshot_volumes.is_empty()
        || !args.oneshot_central_volumes.is_empty()
        || args.oneshot_action == "delete"
    {
        return tokio::task::spawn_blocking(move || oneshot(&engine, &args)).await?;
    }
    // Restores share the engine's state directory and its lock. Their start (rolling back what a
    // dead agent left half cloned, attaching the clones kept) runs beside the NodeSnapshot watch,
    // never before it: a slow attach must not keep this node's cuts waiting. The NodeRestore watch
    // starts once it is done.
    let started = {
        let engine = engine.clone();
        let state_dir = args.state_dir.clone();
        let ops = std::sync::Arc::new(restore::Backends(clone_options(&args)));
        tokio::task::spawn_blocking(move || restore::Restores::start(&engine, &state_dir, ops))
    };
    let client = kube::Client::try_default().await?;
    let node = args.node_name.clone();
    let restores = {
        let client = client.clone();
        async move {
            let (restores, recovered) = started.await??;
            for r in &recovered {
                tracing::info!(?r, "restore found at start");
            }
            restore::watch::run(client, restores, node).await;
            Ok::<(), AgentError>(())
        }
    };
    // Both run until the shutdown signal; the NodeSnapshot watch thaws what it holds before it
    // returns, so it is never cut short by the other's error (reported once both are done).
    let (snapshots, restores) = tokio::join!(watch::run(client, engine, args), async {
        let result = restores.await;
        if let Err(e) = &result {
            tracing::error!(error = %e, "restores cannot run on this agent; NodeSnapshots go on");
        }
        result
    });
    snapshots.and(restores)
}

fn parse_freeze(s: &str) -> FreezePolicy {
    match s {
        "BestEffort" => FreezePolicy::BestEffort,
        "Disabled" => FreezePolicy::Disabled,
        _ => FreezePolicy::Required,
    }
}

/// How a one-shot hold ended.
#[derive(Debug, PartialEq, Eq)]
enum HoldEnd {
    /// `--oneshot-hold-ms` passed or the release file appeared.
    Release,
    /// The abort file appeared.
    Abort,
    /// The cut ended on its own (the watchdog's freeze timeout).
    Ended,
}

/// Holds for `--oneshot-hold-ms`, until `--oneshot-release-file` or `--oneshot-abort-file`
/// exists, or until the watchdog has ended the cut on its own clock.
fn hold(engine: &Engine, key: &str, args: &AgentArgs) -> Result<HoldEnd, AgentError> {
    let exists = |f: &Option<PathBuf>| f.as_ref().is_some_and(|f| f.exists());
    let until = std::time::Instant::now() + Duration::from_millis(args.oneshot_hold_ms);
    let mut polls = 0u32;
    while std::time::Instant::now() < until {
        if exists(&args.oneshot_abort_file) {
            return Ok(HoldEnd::Abort);
        }
        if exists(&args.oneshot_release_file) {
            return Ok(HoldEnd::Release);
        }
        polls += 1;
        if polls.is_multiple_of(10)
            && engine
                .status(key)?
                .is_some_and(|s| s.phase != NodePhase::Cut)
        {
            return Ok(HoldEnd::Ended);
        }
        let left = until.saturating_duration_since(std::time::Instant::now());
        std::thread::sleep(left.min(Duration::from_millis(5)));
    }
    Ok(HoldEnd::Release)
}

/// The one-shot mode: the real engine, without an API server.
fn oneshot(engine: &Engine, args: &AgentArgs) -> Result<(), AgentError> {
    let key = format!("oneshot-{}-{}", args.oneshot_namespace, args.oneshot_name);
    if args.oneshot_action == "delete" {
        engine.finalize(&key, false)?;
        println!("{{\"deleted\":{key:?}}}");
        return Ok(());
    }
    let req = CutRequest {
        key: key.clone(),
        namespace: args.oneshot_namespace.clone(),
        name: args.oneshot_name.clone(),
        group_snapshot: args.oneshot_name.clone(),
        freeze: parse_freeze(&args.oneshot_freeze),
        freeze_timeout: Duration::from_secs(args.oneshot_freeze_timeout_seconds),
        release_after_cut: args.oneshot_hold_ms == 0,
        volumes: (args.oneshot_volumes.iter().map(|p| (p, false)))
            .chain(args.oneshot_central_volumes.iter().map(|p| (p, true)))
            .map(|(p, central)| {
                let name = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "root".into());
                VolumeRequest {
                    claim: name.clone(),
                    persistent_volume: name,
                    path: p.clone(),
                    allow_shared_filesystem: false,
                    central,
                }
            })
            .collect(),
    };
    let mut status = engine.cut(&req, None)?;
    if status.phase == NodePhase::Cut {
        // Whoever cuts centrally waits for this line.
        println!("{}", serde_json::to_string(&status)?);
        let ended = match hold(engine, &key, args)? {
            HoldEnd::Release => engine.release(&key)?,
            HoldEnd::Abort => engine.abort(&key, "aborted (--oneshot-abort-file)")?,
            HoldEnd::Ended => engine.status(&key)?,
        };
        status = ended.unwrap_or(status);
    }
    println!("{}", serde_json::to_string(&status)?);
    if status.phase != NodePhase::Released {
        return Err(AgentError::OneshotFailed {
            phase: status.phase,
            message: status.message.unwrap_or_default(),
        });
    }
    Ok(())
}
