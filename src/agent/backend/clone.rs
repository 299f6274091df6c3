//! Restores: a writable clone of a member snapshot, published as a path a local PV can name.
//!
//! | snapshot    | clone                                                  | published as                         |
//! |-------------|--------------------------------------------------------|--------------------------------------|
//! | `reflink`   | FICLONE of the snapshot image into `.tandem-restores/` | loop device, linked at `<link dir>/<pv>` |
//! | `lvm-thin`  | `lvcreate -s -kn` of the member snapshot (thin)        | `/dev/<vg>/<lv>`                     |
//! | `lvm-thick` | a new LV of the snapshot's size, copied block by block | `/dev/<vg>/<lv>` (method `Copy`)     |
//! | `btrfs`     | writable subvolume snapshot of the member snapshot     | a directory the agent bind-mounts    |
//!
//! A clone carries its owner (the NodeRestore uid) the way snapshots do (LVM tag, xattr), and a
//! clone is made only from a snapshot that carries the mark of the cut the restore names.
//! `attach` re-creates whatever does not survive a reboot (loop device and link, LV activation,
//! bind mount); it is idempotent and the agent runs it at start for every clone it keeps.

use std::path::PathBuf;

use crate::api::CloneMethod;

use super::{BackendError, BackendKind, BackendOptions, Deleted, SnapshotHandle};

/// Where a clone is and whose it is; journaled by the agent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CloneHandle {
    /// A reflink clone image, published through a loop device and a link named after the PV.
    Reflink {
        image: PathBuf,
        link: PathBuf,
        owner: String,
    },
    /// A logical volume (a thin snapshot of the member snapshot, or a full copy of a thick one).
    Lvm {
        vg: String,
        lv: String,
        owner: String,
    },
    /// A writable btrfs subvolume, bind-mounted under `mount`; the PV path is `mount/volume`.
    Btrfs {
        device: PathBuf,
        path: String,
        mount: PathBuf,
        owner: String,
    },
}

impl std::fmt::Display for CloneHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloneHandle::Reflink { image, .. } => write!(f, "reflink:{}", image.display()),
            CloneHandle::Lvm { vg, lv, .. } => write!(f, "lvm:{vg}/{lv}"),
            CloneHandle::Btrfs { device, path, .. } => {
                write!(f, "btrfs:{}:{path}", device.display())
            }
        }
    }
}

/// A clone to make: from which snapshot (of which cut), to what, for which restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClonePlan {
    pub backend: BackendKind,
    /// The member snapshot, as the cut journaled it (its owner is the NodeSnapshot uid).
    pub snapshot: SnapshotHandle,
    /// Where the clone goes (its owner is the NodeRestore uid).
    pub handle: CloneHandle,
}

/// What a clone is, once made and attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneInfo {
    pub handle: CloneHandle,
    /// The host path a PV's `local.path` names.
    pub path: PathBuf,
    /// Whether `path` is a block device (else a directory).
    pub block: bool,
    pub size_bytes: u64,
    pub method: CloneMethod,
}

/// Progress of a `Copy`: bytes copied so far, of the total.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// Where options a restore needs come from.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    pub backend: BackendOptions,
    /// Where reflink clones' loop devices are linked (`/dev/tandem` on a node: gone at reboot, so a
    /// stale link can never name another loop device).
    pub link_dir: PathBuf,
    /// Where btrfs clones are bind-mounted (under the kubelet dir, whose mounts reach the host).
    pub mount_dir: PathBuf,
}

/// Plans the clone of `snapshot` for the PV `pv` of restore `owner` (the NodeRestore uid), named
/// `tandem-r.<namespace>.<pv>.<owner hash>` beside the snapshot.
pub fn plan(
    snapshot: &SnapshotHandle,
    namespace: &str,
    pv: &str,
    owner: &str,
    options: &CloneOptions,
) -> Result<ClonePlan, BackendError> {
    let _ = (snapshot, namespace, pv, owner, options);
    Err(not_built())
}

/// Checks the snapshot's owner mark, makes the clone, marks it and attaches it. Something already at
/// the clone's place is [`BackendError::AlreadyExists`]; a failed clone removes what it half-made.
pub fn create(
    plan: &ClonePlan,
    options: &CloneOptions,
    progress: Progress<'_>,
) -> Result<CloneInfo, BackendError> {
    let _ = (plan, options, progress);
    Err(not_built())
}

/// Re-creates what a reboot removes (loop device and link, LV activation, bind mount); idempotent.
pub fn attach(handle: &CloneHandle, options: &CloneOptions) -> Result<CloneInfo, BackendError> {
    let _ = (handle, options);
    Err(not_built())
}

/// Detaches and deletes a clone after checking its owner mark ([`BackendError::NotOurs`] otherwise);
/// a clone that is not there is [`Deleted::Absent`].
pub fn delete(handle: &CloneHandle, options: &CloneOptions) -> Result<Deleted, BackendError> {
    let _ = (handle, options);
    Err(not_built())
}

fn not_built() -> BackendError {
    BackendError::Unsupported {
        device: PathBuf::new(),
        why: "restore clones are not built yet".into(),
    }
}
