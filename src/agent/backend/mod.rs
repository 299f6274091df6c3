//! Snapshot backends, chosen by what the device under a volume is:
//!
//! | device                                        | backend     | snapshot                                        |
//! |-----------------------------------------------|-------------|-------------------------------------------------|
//! | loop device over an image on XFS or btrfs     | `reflink`   | FICLONE of the image into `.tandem-snapshots/`  |
//! | LVM thin volume                               | `lvm-thin`  | `lvcreate -s` (no size)                         |
//! | LVM linear/striped volume                     | `lvm-thick` | `lvcreate -s -L <cow size>`                     |
//! | btrfs subvolume (not on a reflink loop image) | `btrfs`     | read-only subvolume snapshot                    |
//!
//! Every snapshot is named after the GroupSnapshot and the volume
//! (`tandem.<namespace>.<groupsnapshot>.<pv>`), its handle says how to find and delete it again,
//! and create and delete are idempotent: a restarted agent neither makes a second snapshot nor
//! leaks one.

pub mod btrfs;
pub mod lvm;
pub mod reflink;

use std::path::PathBuf;
use std::process::Command;

use sha2::{Digest, Sha256};

use super::discovery::{DeviceKind, ResolvedVolume};

/// The backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BackendKind {
    #[serde(rename = "reflink")]
    Reflink,
    #[serde(rename = "lvm-thin")]
    LvmThin,
    #[serde(rename = "lvm-thick")]
    LvmThick,
    #[serde(rename = "btrfs")]
    Btrfs,
}

impl BackendKind {
    /// The name reported in status.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Reflink => "reflink",
            BackendKind::LvmThin => "lvm-thin",
            BackendKind::LvmThick => "lvm-thick",
            BackendKind::Btrfs => "btrfs",
        }
    }

    /// Whether a snapshot can be cut while the volume's filesystem is frozen. A btrfs snapshot
    /// writes to the very filesystem it snapshots, so under a freeze it would block until the thaw.
    pub fn snapshots_under_freeze(self) -> bool {
        !matches!(self, BackendKind::Btrfs)
    }
}

/// Where a snapshot is and how to delete it; serialised into the status `snapshotHandle` as
/// `reflink:<clone path>`, `lvm:<vg>/<lv>` or `btrfs:<device>:<path below the top-level subvolume>`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotHandle {
    Reflink { clone: PathBuf },
    Lvm { vg: String, lv: String },
    Btrfs { device: PathBuf, path: String },
}

impl std::fmt::Display for SnapshotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotHandle::Reflink { clone } => write!(f, "reflink:{}", clone.display()),
            SnapshotHandle::Lvm { vg, lv } => write!(f, "lvm:{vg}/{lv}"),
            SnapshotHandle::Btrfs { device, path } => {
                write!(f, "btrfs:{}:{path}", device.display())
            }
        }
    }
}

/// A snapshot to cut: which backend, from what, to what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotPlan {
    pub backend: BackendKind,
    pub handle: SnapshotHandle,
    pub source: SnapshotSource,
}

/// What is snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotSource {
    /// The loop device's image file.
    Image { image: PathBuf },
    /// The origin logical volume.
    LogicalVolume { vg: String, lv: String },
    /// The subvolume (its path below the btrfs top-level subvolume) on a device.
    Subvolume { device: PathBuf, subvol: String },
}

/// What a cut snapshot is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub size_bytes: u64,
}

/// Options an operator sets on the agent.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Copy-on-write space for a thick LVM snapshot (an `lvcreate -L` size, e.g. `1G` or `10%ORIGIN`).
    pub thick_cow_size: String,
    /// Where the agent mounts btrfs top-level subvolumes to reach their snapshot directory.
    pub btrfs_mount_dir: PathBuf,
}

/// Why a backend could not plan, cut or delete a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("no snapshot backend for {device}: {why}")]
    Unsupported { device: PathBuf, why: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    /// Kernels without freeze holders (before about 6.6; Debian 12's 6.1) refuse to suspend a
    /// device-mapper origin whose filesystem is frozen.
    #[error(
        "the kernel refused to snapshot {origin} while its filesystem is frozen (EBUSY from the device-mapper suspend; kernels without freeze holders, such as Debian 12's 6.1, cannot do this): {stderr}"
    )]
    FrozenOriginBusy { origin: String, stderr: String },
    #[error("unexpected output of `{command}`: {why}")]
    Parse { command: String, why: String },
}

/// Builds the snapshot name `tandem.<namespace>.<groupsnapshot>.<pv>`; names too long for LVM (127)
/// keep their start and get a hash of the whole name, so they stay unique and traceable.
pub fn snapshot_name(namespace: &str, group_snapshot: &str, pv: &str) -> String {
    let full = format!("tandem.{namespace}.{group_snapshot}.{pv}");
    const MAX: usize = 120;
    if full.len() <= MAX {
        return full;
    }
    let digest = Sha256::digest(full.as_bytes());
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    let keep = MAX - hex.len() - 1;
    let mut cut = full[..keep].to_string();
    while !full.is_char_boundary(cut.len()) {
        cut.pop();
    }
    format!("{cut}.{hex}")
}

/// Chooses the backend from what the device is, and plans the snapshot.
pub fn plan(
    volume: &ResolvedVolume,
    name: &str,
    options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    let is_btrfs = volume.fs_type() == Some("btrfs");
    match &volume.kind {
        // A loop image on a reflink pool is cloned whole, whatever filesystem is inside it; a
        // btrfs inside an image on a pool without reflink still has its own snapshots.
        DeviceKind::Loop { backing_file } => match reflink::plan(backing_file, name) {
            Err(_) if is_btrfs => plan_btrfs(volume, name, options),
            other => other,
        },
        DeviceKind::LvmVolume { vg, lv, .. } => lvm::plan(vg, lv, name),
        _ if is_btrfs => plan_btrfs(volume, name, options),
        DeviceKind::OtherDeviceMapper { dm_name } => Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: format!("device-mapper device {dm_name} is not an LVM logical volume"),
        }),
        _ => Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: "not a loop device over an image, an LVM logical volume nor a btrfs subvolume"
                .into(),
        }),
    }
}

fn plan_btrfs(
    volume: &ResolvedVolume,
    name: &str,
    options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    let mount = volume
        .mount
        .as_ref()
        .ok_or_else(|| BackendError::Unsupported {
            device: volume.device.clone(),
            why: "btrfs without a mount".into(),
        })?;
    btrfs::plan(&volume.device, &mount.root, name, options)
}

/// Cuts the snapshot (idempotent: an existing snapshot of that name is kept and reported).
pub fn create(plan: &SnapshotPlan, options: &BackendOptions) -> Result<SnapshotInfo, BackendError> {
    match (&plan.source, &plan.handle) {
        (SnapshotSource::Image { image }, SnapshotHandle::Reflink { clone }) => {
            reflink::create(image, clone)
        }
        (SnapshotSource::LogicalVolume { vg, lv }, SnapshotHandle::Lvm { lv: snap, .. }) => {
            lvm::create(vg, lv, snap, plan.backend, &options.thick_cow_size)
        }
        (SnapshotSource::Subvolume { device, subvol }, SnapshotHandle::Btrfs { path, .. }) => {
            btrfs::create(device, subvol, path, options)
        }
        _ => Err(BackendError::Parse {
            command: "plan".into(),
            why: format!(
                "source {:?} does not match handle {}",
                plan.source, plan.handle
            ),
        }),
    }
}

/// Deletes a snapshot by its handle (idempotent: an absent snapshot is not an error).
pub fn delete(handle: &SnapshotHandle, options: &BackendOptions) -> Result<(), BackendError> {
    match handle {
        SnapshotHandle::Reflink { clone } => reflink::delete(clone),
        SnapshotHandle::Lvm { vg, lv } => lvm::delete(vg, lv),
        SnapshotHandle::Btrfs { device, path } => btrfs::delete(device, path, options),
    }
}

/// Makes a cut snapshot durable where the backend needs it (a reflink clone's fsync); called after
/// the thaw so it is not paid inside the frozen window.
pub fn persist(handle: &SnapshotHandle) -> Result<(), BackendError> {
    match handle {
        SnapshotHandle::Reflink { clone } => reflink::persist(clone),
        SnapshotHandle::Lvm { .. } | SnapshotHandle::Btrfs { .. } => Ok(()),
    }
}

/// Runs a tool and returns its stdout, or its stderr in the error.
pub(crate) fn run_tool(program: &str, args: &[&str]) -> Result<String, BackendError> {
    let rendered = || format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| BackendError::Io {
            what: format!("cannot run {}", rendered()),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(BackendError::Command {
            command: rendered(),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_trace_back_and_stay_short() {
        assert_eq!(
            snapshot_name("shop", "orders-2026", "pv-1"),
            "tandem.shop.orders-2026.pv-1"
        );
        let long = snapshot_name(&"n".repeat(63), &"g".repeat(63), &"p".repeat(200));
        assert!(long.len() <= 120);
        assert!(long.starts_with("tandem.nnn"));
        let other = snapshot_name(&"n".repeat(63), &"g".repeat(63), &"p".repeat(201));
        assert_ne!(long, other);
    }

    #[test]
    fn handles_render() {
        assert_eq!(
            SnapshotHandle::Lvm {
                vg: "vg0".into(),
                lv: "s".into()
            }
            .to_string(),
            "lvm:vg0/s"
        );
        assert_eq!(
            SnapshotHandle::Reflink {
                clone: "/p/.tandem-snapshots/x.img".into()
            }
            .to_string(),
            "reflink:/p/.tandem-snapshots/x.img"
        );
    }
}
