//! `reflink`: the volume is a loop device over an image file on a reflink-capable pool filesystem
//! (XFS with reflink, or btrfs). The snapshot is a FICLONE of the image: it shares every extent and
//! costs well under a millisecond, and because the clone lives on the pool (not on the frozen
//! volume filesystem) it does not block on the freeze.
//!
//! Clones live beside the image, in `<image dir>/.tandem-snapshots/<snapshot name>.img`, because
//! FICLONE only works within one filesystem. Each clone carries its owner in the
//! [`OWNER_XATTR`](super::OWNER_XATTR) xattr, set on the `.partial` file before the clone is
//! renamed (without replacing anything) to its final name. The image is cloned only once it is
//! proven to be the loop device's backing file (LOOP_GET_STATUS64 against fstat), because the
//! path comes from sysfs, a host path that the agent's mount namespace may resolve differently.

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, RenameFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::ioctl::{Getter, Opcode, ioctl};

use super::{
    BackendError, BackendKind, Deleted, SnapshotHandle, SnapshotInfo, SnapshotPlan, SnapshotSource,
    mark_mismatch, set_mark,
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

fn errno(what: impl Into<String>) -> impl FnOnce(Errno) -> BackendError {
    let what = what.into();
    move |e| BackendError::Io {
        what,
        source: e.into(),
    }
}

/// Plans a clone of the loop device's image for the cut `owner`.
pub fn plan(
    loop_device: &Path,
    image: &Path,
    name: &str,
    owner: &str,
) -> Result<SnapshotPlan, BackendError> {
    let shown = image.to_string_lossy();
    if shown.ends_with(" (deleted)") {
        return Err(BackendError::Unsupported {
            device: image.into(),
            why: "the loop device's image file was deleted".into(),
        });
    }
    let stat = rustix::fs::statfs(image).map_err(|e| match e {
        Errno::NOENT => image_not_visible(loop_device, image),
        e => errno(format!("statfs {}", image.display()))(e),
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
    // Refuse before any freeze when the path holds another file than the loop device reads.
    open_image(loop_device, image)?;
    let dir = image.parent().ok_or_else(|| BackendError::Unsupported {
        device: image.into(),
        why: "image has no parent directory".into(),
    })?;
    Ok(SnapshotPlan {
        backend: BackendKind::Reflink,
        handle: SnapshotHandle::Reflink {
            clone: dir.join(SNAPSHOT_DIR).join(format!("{name}.img")),
            owner: owner.into(),
        },
        source: SnapshotSource::Image {
            image: image.into(),
            loop_device: loop_device.into(),
        },
        owner: owner.into(),
    })
}

/// The error for an image path that does not exist in the agent's mount namespace.
pub fn image_not_visible(loop_device: &Path, image: &Path) -> BackendError {
    BackendError::ImageNotVisible {
        image: image.into(),
        device: loop_device.into(),
        host_dir: image.parent().unwrap_or(image).into(),
    }
}

/// `struct loop_info64` of <linux/loop.h>.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; 64],
    lo_crypt_name: [u8; 64],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// LOOP_GET_STATUS64 (an old-style ioctl number, not _IOR-encoded).
const LOOP_GET_STATUS64: Opcode = 0x4C05;

/// The (major, minor, inode) of the loop device's backing file, as the kernel sees it.
fn loop_backing(loop_device: &Path) -> Result<(u32, u32, u64), BackendError> {
    let fd = rustix::fs::open(
        loop_device,
        OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    )
    .map_err(errno(format!("open {}", loop_device.display())))?;
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64, which LoopInfo64 mirrors.
    let info = unsafe { ioctl(&fd, Getter::<LOOP_GET_STATUS64, LoopInfo64>::new()) }.map_err(
        errno(format!("LOOP_GET_STATUS64 {}", loop_device.display())),
    )?;
    // The kernel encodes lo_device with new_encode_dev (huge_encode_dev).
    let dev = info.lo_device;
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    Ok((major, minor, info.lo_inode))
}

/// Opens the image read-only and checks that it is the loop device's backing file.
fn open_image(loop_device: &Path, image: &Path) -> Result<OwnedFd, BackendError> {
    let fd =
        rustix::fs::open(image, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
            match e {
                Errno::NOENT => image_not_visible(loop_device, image),
                e => errno(format!("open {}", image.display()))(e),
            }
        })?;
    check_backing(loop_device, image, &fd)?;
    Ok(fd)
}

fn check_backing(loop_device: &Path, image: &Path, fd: impl AsFd) -> Result<(), BackendError> {
    let (major, minor, inode) = loop_backing(loop_device)?;
    let st = rustix::fs::fstat(fd).map_err(errno(format!("stat {}", image.display())))?;
    let found = (
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev),
        st.st_ino,
    );
    if found != (major, minor, inode) {
        return Err(BackendError::NotTheBackingFile {
            image: image.into(),
            device: loop_device.into(),
            expected: format!("{inode} on {major}:{minor}"),
            found: format!("{} on {}:{}", found.2, found.0, found.1),
        });
    }
    Ok(())
}

/// The snapshot directory and the clone's file name.
fn split(clone: &Path) -> Result<(&Path, &OsStr), BackendError> {
    match (clone.parent(), clone.file_name()) {
        (Some(dir), Some(name)) if dir.file_name() == Some(OsStr::new(SNAPSHOT_DIR)) => {
            Ok((dir, name))
        }
        _ => Err(BackendError::Parse {
            command: "reflink handle".into(),
            why: format!("{} is not in a {SNAPSHOT_DIR} directory", clone.display()),
        }),
    }
}

fn partial_name(name: &OsStr) -> PathBuf {
    let mut p = name.to_owned();
    p.push(".partial");
    PathBuf::from(p)
}

/// Opens `<pool dir>/.tandem-snapshots` without following a symlink there; None when absent.
fn open_snapshot_dir(snap_dir: &Path, create: bool) -> Result<Option<OwnedFd>, BackendError> {
    let pool = snap_dir.parent().unwrap_or(snap_dir);
    let pool_fd = match rustix::fs::open(
        pool,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT) if !create => return Ok(None),
        Err(e) => return Err(errno(format!("open {}", pool.display()))(e)),
    };
    if create {
        match rustix::fs::mkdirat(&pool_fd, SNAPSHOT_DIR, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(errno(format!("create {}", snap_dir.display()))(e)),
        }
    }
    match rustix::fs::openat2(
        &pool_fd,
        SNAPSHOT_DIR,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
        ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_XDEV,
    ) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::NOENT) if !create => Ok(None),
        Err(Errno::LOOP | Errno::NOTDIR | Errno::XDEV) => Err(BackendError::NotOurs {
            what: snap_dir.display().to_string(),
            why: "it is not a plain directory on the pool".into(),
        }),
        Err(e) => Err(errno(format!("open {}", snap_dir.display()))(e)),
    }
}

/// Clones `image` (checked to be `loop_device`'s backing file) to `clone`, marked with `owner`:
/// FICLONE into a `.partial` file made here, then a rename that never replaces anything.
pub fn create(
    loop_device: &Path,
    image: &Path,
    clone: &Path,
    owner: &str,
) -> Result<SnapshotInfo, BackendError> {
    let (snap_dir, name) = split(clone)?;
    let dir = open_snapshot_dir(snap_dir, true)?.ok_or_else(|| BackendError::Parse {
        command: "reflink create".into(),
        why: format!("{} vanished", snap_dir.display()),
    })?;
    if rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(BackendError::AlreadyExists {
            what: clone.display().to_string(),
        });
    }
    let src = open_image(loop_device, image)?;
    let partial = partial_name(name);
    let partial_path = snap_dir.join(&partial);
    let dst = create_partial(&dir, &partial, &partial_path, owner)?;
    let made = fill_partial(
        &dir,
        &dst,
        &src,
        owner,
        (&partial, &partial_path),
        (name, clone),
    );
    match made {
        Ok(size_bytes) => Ok(SnapshotInfo {
            size_bytes,
            handle: SnapshotHandle::Reflink {
                clone: clone.into(),
                owner: owner.into(),
            },
        }),
        Err(e) => {
            // Only the `.partial` this call made (exclusively) is removed.
            if let Err(u) = rustix::fs::unlinkat(&dir, &partial, AtFlags::empty()) {
                tracing::warn!(path = %partial_path.display(), error = %u, "could not remove a half-made clone");
            }
            Err(e)
        }
    }
}

/// Marks the `.partial` file, clones the image into it and renames it to the clone's name (never
/// replacing anything); returns the clone's size.
fn fill_partial(
    dir: &OwnedFd,
    dst: &OwnedFd,
    src: &OwnedFd,
    owner: &str,
    (partial, partial_path): (&Path, &Path),
    (name, clone): (&OsStr, &Path),
) -> Result<u64, BackendError> {
    set_mark(dst, owner, partial_path)?;
    rustix::fs::ioctl_ficlone(dst, src)
        .map_err(errno(format!("FICLONE into {}", partial_path.display())))?;
    let size_bytes = rustix::fs::fstat(dst)
        .map_err(errno(format!("stat {}", partial_path.display())))?
        .st_size;
    match rustix::fs::renameat_with(dir, partial, dir, name, RenameFlags::NOREPLACE) {
        Ok(()) => Ok(u64::try_from(size_bytes).unwrap_or(0)),
        Err(Errno::EXIST) => Err(BackendError::AlreadyExists {
            what: clone.display().to_string(),
        }),
        Err(e) => Err(errno(format!("rename to {}", clone.display()))(e)),
    }
}

/// Creates the `.partial` file exclusively. One left by an earlier attempt of the same owner (it is
/// marked before anything else) is replaced; anyone else's is [`BackendError::AlreadyExists`].
fn create_partial(
    dir: &OwnedFd,
    partial: &Path,
    partial_path: &Path,
    owner: &str,
) -> Result<OwnedFd, BackendError> {
    let create = || {
        rustix::fs::openat(
            dir,
            partial,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
    };
    match create() {
        Ok(fd) => return Ok(fd),
        Err(Errno::EXIST) => {}
        Err(e) => return Err(errno(format!("create {}", partial_path.display()))(e)),
    }
    match open_own(dir, partial, owner) {
        Found::Ours => {
            rustix::fs::unlinkat(dir, partial, AtFlags::empty())
                .map_err(errno(format!("remove {}", partial_path.display())))?;
            create().map_err(|e| match e {
                Errno::EXIST => BackendError::AlreadyExists {
                    what: partial_path.display().to_string(),
                },
                e => errno(format!("create {}", partial_path.display()))(e),
            })
        }
        _ => Err(BackendError::AlreadyExists {
            what: partial_path.display().to_string(),
        }),
    }
}

/// What is at a name in the snapshot directory.
enum Found {
    Absent,
    Ours,
    Foreign(String),
}

fn open_own(dir: &OwnedFd, name: &Path, owner: &str) -> Found {
    match rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => match rustix::fs::fstat(&fd) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                Found::Foreign("it is not a regular file".into())
            }
            Ok(_) => match mark_mismatch(&fd, owner) {
                None => Found::Ours,
                Some(why) => Found::Foreign(why),
            },
            Err(e) => Found::Foreign(format!("it cannot be examined: {e}")),
        },
        Err(Errno::NOENT) => Found::Absent,
        Err(Errno::LOOP) => Found::Foreign("it is a symbolic link".into()),
        Err(e) => Found::Foreign(format!("it cannot be opened: {e}")),
    }
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

/// Removes the clone and any half-made `.partial` of `owner`; anything there that is not marked
/// as `owner`'s is left alone and reported as [`BackendError::NotOurs`].
pub fn delete(clone: &Path, owner: &str) -> Result<Deleted, BackendError> {
    let (snap_dir, name) = split(clone)?;
    let Some(dir) = open_snapshot_dir(snap_dir, false)? else {
        return Ok(Deleted::Absent);
    };
    let mut outcome = Deleted::Absent;
    let mut foreign = None;
    for entry in [PathBuf::from(name), partial_name(name)] {
        let path = snap_dir.join(&entry);
        match open_own(&dir, &entry, owner) {
            Found::Absent => {}
            Found::Ours => match rustix::fs::unlinkat(&dir, &entry, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => outcome = Deleted::Removed,
                Err(e) => return Err(errno(format!("remove {}", path.display()))(e)),
            },
            Found::Foreign(why) => {
                foreign.get_or_insert(BackendError::NotOurs {
                    what: path.display().to_string(),
                    why,
                });
            }
        }
    }
    match foreign {
        Some(e) => Err(e),
        None => Ok(outcome),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The message tells the operator which host directory the agent pod must mount.
    #[test]
    fn an_invisible_image_names_the_directory_to_mount() {
        let e = plan(
            Path::new("/dev/loop7"),
            Path::new("/srv/tandem-pool-that-is-not-here/vol1.img"),
            "tandem.ns.g.pv.01234567",
            "uid-1",
        )
        .unwrap_err();
        assert!(matches!(e, BackendError::ImageNotVisible { .. }), "{e:?}");
        let text = e.to_string();
        assert!(
            text.contains(
                "mount the host directory /srv/tandem-pool-that-is-not-here into the agent pod"
            ),
            "{text}"
        );
        assert!(text.contains("agent.extraHostPaths"), "{text}");
        assert!(text.contains("/dev/loop7"), "{text}");
    }

    #[test]
    fn loop_info64_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
    }

    #[test]
    fn handles_must_point_into_the_snapshot_directory() {
        assert!(split(Path::new("/pool/.tandem-snapshots/x.img")).is_ok());
        assert!(split(Path::new("/pool/elsewhere/x.img")).is_err());
        assert!(split(Path::new("/")).is_err());
    }
}
