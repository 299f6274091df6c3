//! `btrfs`: the volume is a btrfs subvolume; the snapshot is a read-only subvolume snapshot.
//!
//! A btrfs snapshot writes to the filesystem it snapshots, so under FIFREEZE it would block until
//! the thaw: this backend never runs under a freeze. Each snapshot is atomic for its subvolume (the
//! kernel flushes and commits), but several subvolumes are not snapshotted at one instant.
//!
//! Snapshots go to `/.tandem-snapshots/<name>` below the top-level subvolume, which the agent mounts
//! (subvolid=5) under its own directory for the time of the call, so they are never inside the
//! volume the application sees.

use std::fs;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use super::{
    BackendError, BackendKind, BackendOptions, SnapshotHandle, SnapshotInfo, SnapshotPlan,
    SnapshotSource, run_tool,
};

/// The directory below the top-level subvolume that holds the snapshots.
pub const SNAPSHOT_DIR: &str = ".tandem-snapshots";

/// Plans a snapshot of the subvolume `subvol` (its path below the top level, from mountinfo).
pub fn plan(
    device: &Path,
    subvol: &str,
    name: &str,
    _options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    Ok(SnapshotPlan {
        backend: BackendKind::Btrfs,
        handle: SnapshotHandle::Btrfs {
            device: device.into(),
            path: format!("/{SNAPSHOT_DIR}/{name}"),
        },
        source: SnapshotSource::Subvolume {
            device: device.into(),
            subvol: subvol.into(),
        },
    })
}

/// The top-level subvolume of a btrfs device, mounted for as long as this value lives.
struct TopLevel {
    dir: PathBuf,
}

impl TopLevel {
    fn mount(device: &Path, options: &BackendOptions) -> Result<Self, BackendError> {
        let id: String = device
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = options
            .btrfs_mount_dir
            .join(format!("{id}-{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|source| BackendError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        rustix::mount::mount(device, &dir, "btrfs", MountFlags::NOATIME, c"subvolid=5").map_err(
            |e| BackendError::Io {
                what: format!(
                    "mount the top level of {} on {}",
                    device.display(),
                    dir.display()
                ),
                source: e.into(),
            },
        )?;
        Ok(TopLevel { dir })
    }

    fn join(&self, below_top: &str) -> PathBuf {
        self.dir.join(below_top.trim_start_matches('/'))
    }
}

impl Drop for TopLevel {
    fn drop(&mut self) {
        if let Err(e) = rustix::mount::unmount(&self.dir, UnmountFlags::empty()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmount of btrfs top level failed; detaching");
            let _ = rustix::mount::unmount(&self.dir, UnmountFlags::DETACH);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// Takes a read-only snapshot of `subvol` at `path` (kept if it already exists).
pub fn create(
    device: &Path,
    subvol: &str,
    path: &str,
    options: &BackendOptions,
) -> Result<SnapshotInfo, BackendError> {
    let top = TopLevel::mount(device, options)?;
    let dest = top.join(path);
    if !dest.exists() {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|source| BackendError::Io {
                what: format!("create {}", parent.display()),
                source,
            })?;
        }
        let src = top.join(subvol);
        run_tool(
            "btrfs",
            &[
                "-q",
                "subvolume",
                "snapshot",
                "-r",
                &src.to_string_lossy(),
                &dest.to_string_lossy(),
            ],
        )?;
    }
    let stat = rustix::fs::statvfs(&dest).map_err(|e| BackendError::Io {
        what: format!("statvfs {}", dest.display()),
        source: e.into(),
    })?;
    Ok(SnapshotInfo {
        size_bytes: stat.f_blocks * stat.f_frsize,
    })
}

/// Deletes the snapshot subvolume at `path` (nothing to do when it is gone).
pub fn delete(device: &Path, path: &str, options: &BackendOptions) -> Result<(), BackendError> {
    let top = TopLevel::mount(device, options)?;
    let dest = top.join(path);
    if dest.exists() {
        run_tool(
            "btrfs",
            &["-q", "subvolume", "delete", &dest.to_string_lossy()],
        )?;
    }
    Ok(())
}
