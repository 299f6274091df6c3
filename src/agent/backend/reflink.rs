//! `reflink`: the volume is a loop device over an image file on a reflink-capable pool filesystem
//! (XFS with reflink, or btrfs). The snapshot is a FICLONE of the image: it shares every extent and
//! costs well under a millisecond, and because the clone lives on the pool (not on the frozen
//! volume filesystem) it does not block on the freeze.
//!
//! Clones live beside the image, in `<image dir>/.tandem-snapshots/<snapshot name>.img`, because
//! FICLONE only works within one filesystem.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::{
    BackendError, BackendKind, SnapshotHandle, SnapshotInfo, SnapshotPlan, SnapshotSource,
};

/// statfs f_type of XFS.
const XFS_MAGIC: i64 = 0x5846_5342;
/// statfs f_type of btrfs.
const BTRFS_MAGIC: i64 = 0x9123_683e;

/// The directory beside an image that holds its clones.
pub const SNAPSHOT_DIR: &str = ".tandem-snapshots";

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
    let what = what.into();
    move |source| BackendError::Io { what, source }
}

/// Plans a clone of the loop device's image.
pub fn plan(image: &Path, name: &str) -> Result<SnapshotPlan, BackendError> {
    let shown = image.to_string_lossy();
    if shown.ends_with(" (deleted)") {
        return Err(BackendError::Unsupported {
            device: image.into(),
            why: "the loop device's image file was deleted".into(),
        });
    }
    let stat = rustix::fs::statfs(image).map_err(|e| BackendError::Io {
        what: format!("statfs {}", image.display()),
        source: e.into(),
    })?;
    let magic = stat.f_type as i64;
    if magic != XFS_MAGIC && magic != BTRFS_MAGIC {
        return Err(BackendError::Unsupported {
            device: image.into(),
            why: format!(
                "the image is on a filesystem without reflink (statfs type {magic:#x}); reflink needs XFS or btrfs"
            ),
        });
    }
    let dir = image.parent().ok_or_else(|| BackendError::Unsupported {
        device: image.into(),
        why: "image has no parent directory".into(),
    })?;
    Ok(SnapshotPlan {
        backend: BackendKind::Reflink,
        handle: SnapshotHandle::Reflink {
            clone: dir.join(SNAPSHOT_DIR).join(format!("{name}.img")),
        },
        source: SnapshotSource::Image {
            image: image.into(),
        },
    })
}

fn partial_of(clone: &Path) -> PathBuf {
    let mut p = clone.as_os_str().to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Clones `image` to `clone` (FICLONE into a `.partial` file, then rename: a clone that exists
/// under its final name is complete, so a retry keeps it).
pub fn create(image: &Path, clone: &Path) -> Result<SnapshotInfo, BackendError> {
    if let Ok(meta) = fs::metadata(clone) {
        return Ok(SnapshotInfo {
            size_bytes: meta.len(),
        });
    }
    if let Some(dir) = clone.parent() {
        fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    let src = File::open(image).map_err(io(format!("open {}", image.display())))?;
    let partial = partial_of(clone);
    let dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&partial)
        .map_err(io(format!("create {}", partial.display())))?;
    rustix::fs::ioctl_ficlone(&dst, &src).map_err(|e| BackendError::Io {
        what: format!("FICLONE {} -> {}", image.display(), partial.display()),
        source: e.into(),
    })?;
    let size_bytes = dst
        .metadata()
        .map_err(io(format!("stat {}", partial.display())))?
        .len();
    fs::rename(&partial, clone).map_err(io(format!("rename to {}", clone.display())))?;
    Ok(SnapshotInfo { size_bytes })
}

/// Makes a clone durable (fsync of the file and its directory); done after the thaw, so it is
/// not paid inside the frozen window.
pub fn persist(clone: &Path) -> Result<(), BackendError> {
    File::open(clone)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsync {}", clone.display())))?;
    if let Some(dir) = clone.parent() {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io(format!("fsync {}", dir.display())))?;
    }
    Ok(())
}

/// Removes a clone and any half-made `.partial`.
pub fn delete(clone: &Path) -> Result<(), BackendError> {
    for path in [clone.to_path_buf(), partial_of(clone)] {
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("remove {}", path.display()))(e)),
        }
    }
    Ok(())
}
