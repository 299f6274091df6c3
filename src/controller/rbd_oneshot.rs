//! `tandem rbd`: the controller's RBD group calls without an API server, for hosts without
//! Kubernetes (the RBD test guest), as `tandem agent --oneshot-*` is the agent's cut. One process,
//! one connection, the same calls the controller makes through librbd: never an `rbd` process.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::rbd::{Cluster, ClusterConfig, PoolRef, RbdError, SnapCreated};

/// How to reach the cluster and which group.
#[derive(clap::Args, Debug, Clone)]
pub struct RbdTarget {
    /// The monitors, as Ceph's `mon_host` takes them.
    #[arg(long)]
    pub mon_host: String,
    /// The cephx user, without `client.`.
    #[arg(long, default_value = "admin")]
    pub user: String,
    /// A file holding the user's bare cephx secret (as `ceph auth get-key` prints it).
    #[arg(long)]
    pub key_file: PathBuf,
    #[arg(long, default_value = "rbd")]
    pub pool: String,
    /// The RADOS namespace (none by default).
    #[arg(long, default_value = "")]
    pub namespace: String,
    #[arg(long)]
    pub group: String,
    /// The group snapshot's name.
    #[arg(long)]
    pub snap: String,
    /// How long connecting and each call may take, in seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_seconds: u64,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum RbdCommand {
    /// Ensure the group, add the images to it (never out of another group), and cut one group
    /// snapshot of them all (an existing complete one of that name is kept, not cut again).
    GroupSnap {
        #[command(flatten)]
        target: RbdTarget,
        /// A member image (in the pool). Repeatable.
        #[arg(long = "image", required = true)]
        images: Vec<String>,
    },
    /// Remove the group snapshot (a missing one is fine).
    GroupSnapRm {
        #[command(flatten)]
        target: RbdTarget,
    },
    /// Roll every member back to the group snapshot (the images must be unmapped).
    Rollback {
        #[command(flatten)]
        target: RbdTarget,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum RbdOneshotError {
    #[error("cannot read the key file {path}: {source}")]
    KeyFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Rbd(#[from] RbdError),
}

fn connect(target: &RbdTarget) -> Result<Cluster, RbdOneshotError> {
    let key =
        std::fs::read_to_string(&target.key_file).map_err(|source| RbdOneshotError::KeyFile {
            path: target.key_file.clone(),
            source,
        })?;
    let config = ClusterConfig {
        mon_host: target.mon_host.clone(),
        user: target.user.clone(),
        key: key.trim().to_string(),
    };
    Ok(Cluster::connect(
        &config,
        Duration::from_secs(target.timeout_seconds),
    )?)
}

/// Runs one command and prints one JSON line of what it did.
pub fn run(command: &RbdCommand) -> Result<(), RbdOneshotError> {
    let (target, images) = match command {
        RbdCommand::GroupSnap { target, images } => (target, images.as_slice()),
        RbdCommand::GroupSnapRm { target } | RbdCommand::Rollback { target } => (target, &[][..]),
    };
    let connecting = Instant::now();
    let cluster = connect(target)?;
    let connect_ms = connecting.elapsed().as_millis();
    let pool = PoolRef::new(&target.pool, &target.namespace);
    let (group, snap) = (target.group.as_str(), target.snap.as_str());
    let line = match command {
        RbdCommand::GroupSnap { .. } => {
            // Membership first, outside any freeze window; the cut is the one timed call.
            cluster.ensure_group(&pool, group)?;
            for image in images {
                cluster.add_image(&pool, group, image)?;
            }
            let cutting = Instant::now();
            let created = cluster.create_group_snap(&pool, group, snap)?;
            serde_json::json!({
                "group": format!("{pool}/{group}"),
                "snap": snap,
                "created": created == SnapCreated::Created,
                "connectMillis": connect_ms,
                "groupSnapMillis": cutting.elapsed().as_secs_f64() * 1000.0,
            })
        }
        RbdCommand::GroupSnapRm { .. } => {
            let started = Instant::now();
            cluster.remove_group_snap(&pool, group, snap)?;
            serde_json::json!({"removed": snap, "millis": started.elapsed().as_millis()})
        }
        RbdCommand::Rollback { .. } => {
            let started = Instant::now();
            cluster.rollback_group_snap(&pool, group, snap)?;
            serde_json::json!({"rolledBack": snap, "millis": started.elapsed().as_millis()})
        }
    };
    println!("{line}");
    Ok(())
}
