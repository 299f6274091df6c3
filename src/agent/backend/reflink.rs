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

use super::clone::{CloneHandle, CloneInfo, detect_filesystem};
use super::{
    BackendError, BackendKind, Deleted, SnapshotHandle, SnapshotInfo, SnapshotPlan, SnapshotSource,
    loopdev, mark_mismatch, set_mark,
};
use crate::api::CloneMethod;

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
pub(crate) struct LoopInfo64 {
    pub lo_device: u64,
    pub lo_inode: u64,
    pub lo_rdevice: u64,
    pub lo_offset: u64,
    pub lo_sizelimit: u64,
    pub lo_number: u32,
    pub lo_encrypt_type: u32,
    pub lo_encrypt_key_size: u32,
    pub lo_flags: u32,
    pub lo_file_name: [u8; 64],
    pub lo_crypt_name: [u8; 64],
    pub lo_encrypt_key: [u8; 32],
    pub lo_init: [u64; 2],
}

impl LoopInfo64 {
    pub(crate) fn zeroed() -> Self {
        LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: 0,
            lo_file_name: [0; 64],
            lo_crypt_name: [0; 64],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        }
    }
}

/// LOOP_GET_STATUS64 (an old-style ioctl number, not _IOR-encoded).
const LOOP_GET_STATUS64: Opcode = 0x4C05;

/// The (major, minor, inode) of the loop device's backing file, as the kernel sees it.
pub(crate) fn loop_backing(loop_device: &Path) -> Result<(u32, u32, u64), BackendError> {
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
    open_pool_dir(snap_dir, SNAPSHOT_DIR, create)
}

/// Opens `<pool dir>/<leaf>` (`snap_dir`) without following a symlink there; None when absent.
fn open_pool_dir(
    snap_dir: &Path,
    leaf: &str,
    create: bool,
) -> Result<Option<OwnedFd>, BackendError> {
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
        match rustix::fs::mkdirat(&pool_fd, leaf, Mode::from_raw_mode(0o700)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(errno(format!("create {}", snap_dir.display()))(e)),
        }
    }
    match rustix::fs::openat2(
        &pool_fd,
        leaf,
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
        Found::Ours(_) => {
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
    Ours(OwnedFd),
    Foreign(String),
}

fn open_own(dir: &OwnedFd, name: &Path, owner: &str) -> Found {
    open_own_as(dir, name, owner, OFlags::RDONLY)
}

/// Opens a regular file of `dir` (read-only or read-write, never through a symlink) and checks its
/// owner mark.
fn open_own_as(dir: &OwnedFd, name: &Path, owner: &str, access: OFlags) -> Found {
    match rustix::fs::openat(
        dir,
        name,
        access | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => match rustix::fs::fstat(&fd) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile => {
                Found::Foreign("it is not a regular file".into())
            }
            Ok(_) => match mark_mismatch(&fd, owner) {
                None => Found::Ours(fd),
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
            Found::Ours(_) => match rustix::fs::unlinkat(&dir, &entry, AtFlags::empty()) {
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

// --- restore clones ---

/// The directory beside `.tandem-snapshots`, on the same pool, that holds restore clones.
pub const RESTORE_DIR: &str = ".tandem-restores";

/// The clone image named `name` of the member snapshot `snapshot`: `<pool>/.tandem-restores/<name>.img`
/// (FICLONE needs one filesystem).
pub fn restore_image(snapshot: &Path, name: &str) -> Result<PathBuf, BackendError> {
    let (snap_dir, _) = split(snapshot)?;
    let pool = snap_dir.parent().ok_or_else(|| BackendError::Parse {
        command: "reflink handle".into(),
        why: format!("{} has no pool directory", snapshot.display()),
    })?;
    Ok(pool.join(RESTORE_DIR).join(format!("{name}.img")))
}

/// The restore directory and the clone's file name.
fn split_restore(image: &Path) -> Result<(&Path, &OsStr), BackendError> {
    match (image.parent(), image.file_name()) {
        (Some(dir), Some(name)) if dir.file_name() == Some(OsStr::new(RESTORE_DIR)) => {
            Ok((dir, name))
        }
        _ => Err(BackendError::Parse {
            command: "reflink clone handle".into(),
            why: format!("{} is not in a {RESTORE_DIR} directory", image.display()),
        }),
    }
}

fn gone(what: String) -> BackendError {
    BackendError::Io {
        what,
        source: std::io::ErrorKind::NotFound.into(),
    }
}

/// Clones the member snapshot `snapshot` (which must carry `snapshot_owner`'s mark) to `image`,
/// marked with `owner`, made durable, attached to a loop device and linked at `link`. Anything at
/// `image` is [`BackendError::AlreadyExists`]; a failure removes what this call made.
pub fn clone_create(
    snapshot: &Path,
    snapshot_owner: &str,
    image: &Path,
    link: &Path,
    owner: &str,
) -> Result<CloneInfo, BackendError> {
    let (snap_dir, snap_name) = split(snapshot)?;
    let (restore_dir, name) = split_restore(image)?;
    if snap_dir.parent() != restore_dir.parent() {
        return Err(BackendError::Parse {
            command: "reflink clone plan".into(),
            why: format!(
                "{} is not on the pool of {}",
                image.display(),
                snapshot.display()
            ),
        });
    }
    let sdir = open_snapshot_dir(snap_dir, false)?
        .ok_or_else(|| gone(format!("the member snapshot {}", snapshot.display())))?;
    let src = match open_own(&sdir, Path::new(snap_name), snapshot_owner) {
        Found::Ours(fd) => fd,
        Found::Absent => return Err(gone(format!("the member snapshot {}", snapshot.display()))),
        Found::Foreign(why) => {
            return Err(BackendError::NotOurs {
                what: snapshot.display().to_string(),
                why,
            });
        }
    };
    let dir = open_pool_dir(restore_dir, RESTORE_DIR, true)?
        .ok_or_else(|| gone(format!("{} vanished", restore_dir.display())))?;
    if rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(BackendError::AlreadyExists {
            what: image.display().to_string(),
        });
    }
    let partial = partial_name(name);
    let partial_path = restore_dir.join(&partial);
    let dst = create_partial(&dir, &partial, &partial_path, owner)?;
    let made = fill_partial(
        &dir,
        &dst,
        &src,
        owner,
        (&partial, &partial_path),
        (name, image),
    );
    if let Err(e) = made {
        if let Err(u) = rustix::fs::unlinkat(&dir, &partial, AtFlags::empty()) {
            tracing::warn!(path = %partial_path.display(), error = %u, "could not remove a half-made clone");
        }
        return Err(e);
    }
    drop(dst);
    // From here the clone exists under its name: a failure removes it (and what was attached).
    let published = persist(image).and_then(|()| {
        match open_own_as(&dir, Path::new(name), owner, OFlags::RDWR) {
            Found::Ours(fd) => publish(&fd, image, link).map(|device| (fd, device)),
            _ => Err(gone(format!("the new clone {}", image.display()))),
        }
    });
    match published {
        Ok((fd, _device)) => clone_info(&fd, image, link, owner),
        Err(e) => {
            if let Err(u) = clone_delete(image, link, owner) {
                tracing::warn!(image = %image.display(), error = %u, "could not remove a half-made clone");
            }
            Err(e)
        }
    }
}

fn clone_info(
    fd: &OwnedFd,
    image: &Path,
    link: &Path,
    owner: &str,
) -> Result<CloneInfo, BackendError> {
    let size = rustix::fs::fstat(fd)
        .map_err(errno(format!("stat {}", image.display())))?
        .st_size;
    Ok(CloneInfo {
        handle: CloneHandle::Reflink {
            image: image.into(),
            link: link.into(),
            owner: owner.into(),
        },
        path: link.into(),
        block: true,
        size_bytes: u64::try_from(size).unwrap_or(0),
        method: CloneMethod::Clone,
        filesystem: detect_filesystem(fd),
    })
}

/// Attaches the clone open at `fd` to a loop device (the one already attached to it, if any) and
/// points `link` at it; returns the device.
fn publish(fd: &OwnedFd, image: &Path, link: &Path) -> Result<PathBuf, BackendError> {
    // Two attaches of one clone at once (two agents' starts) would each find no loop device and
    // attach one: the image's lock makes them take turns. The lock belongs to `fd`'s open file
    // description, which is released when `fd` closes; the loop device gets another one (it keeps
    // the file it is given open, and with it any lock on it, for as long as it is attached).
    rustix::fs::flock(fd, rustix::fs::FlockOperation::LockExclusive)
        .map_err(errno(format!("lock {}", image.display())))?;
    let id = loopdev::file_id(fd, image)?;
    let device = match loopdev::find(id).into_iter().next() {
        Some(device) => device,
        None => {
            let own = rustix::fs::open(
                format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)),
                OFlags::RDWR | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno(format!("reopen {}", image.display())))?;
            if loopdev::file_id(&own, image)? != id {
                return Err(gone(format!("{} changed while reopened", image.display())));
            }
            loopdev::attach(&own, image)?
        }
    };
    ensure_link(link, &device)?;
    Ok(device)
}

/// Makes `link` a symbolic link to `device` (replacing a link to anything else; refusing
/// anything that is not a symbolic link).
fn ensure_link(link: &Path, device: &Path) -> Result<(), BackendError> {
    let io_err = |what: String| move |source| BackendError::Io { what, source };
    let (Some(dir), Some(leaf)) = (link.parent(), link.file_name()) else {
        return Err(BackendError::Parse {
            command: "reflink clone handle".into(),
            why: format!("{} is not a link path", link.display()),
        });
    };
    std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
    match std::fs::read_link(link) {
        Ok(target) if target == device => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(Errno::INVAL.raw_os_error()) => {
            return Err(BackendError::AlreadyExists {
                what: format!("{} (not a symbolic link)", link.display()),
            });
        }
        Err(e) => return Err(io_err(format!("read {}", link.display()))(e)),
    }
    let mut tmp_name = OsStr::new(".").to_owned();
    tmp_name.push(leaf);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(device, &tmp).map_err(io_err(format!(
        "link {} to {}",
        tmp.display(),
        device.display()
    )))?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io_err(format!("rename {} to {}", tmp.display(), link.display()))(e)
    })
}

/// Removes `link` if it is a symbolic link and `stale` says its target may go.
fn remove_link_if(link: &Path, stale: impl Fn(&Path) -> bool) -> Result<(), BackendError> {
    match std::fs::read_link(link) {
        Ok(target) if stale(&target) => match std::fs::remove_file(link) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(BackendError::Io {
                what: format!("remove {}", link.display()),
                source,
            }),
        },
        Ok(target) => {
            tracing::warn!(link = %link.display(), target = %target.display(), "a clone's link names another loop device; left alone");
            Ok(())
        }
        Err(_) => Ok(()),
    }
}

/// Whether a loop device is attached to anything.
fn attached(device: &Path) -> bool {
    device.file_name().is_some_and(|n| {
        Path::new("/sys/block")
            .join(n)
            .join("loop/backing_file")
            .exists()
    })
}

/// Re-creates the loop device and the link of a clone (after a reboot, or when either is gone);
/// idempotent.
pub fn clone_attach(image: &Path, link: &Path, owner: &str) -> Result<CloneInfo, BackendError> {
    let (restore_dir, name) = split_restore(image)?;
    let dir = open_pool_dir(restore_dir, RESTORE_DIR, false)?
        .ok_or_else(|| gone(format!("the clone {}", image.display())))?;
    match open_own_as(&dir, Path::new(name), owner, OFlags::RDWR) {
        Found::Ours(fd) => {
            publish(&fd, image, link)?;
            clone_info(&fd, image, link, owner)
        }
        Found::Absent => Err(gone(format!("the clone {}", image.display()))),
        Found::Foreign(why) => Err(BackendError::NotOurs {
            what: image.display().to_string(),
            why,
        }),
    }
}

/// Detaches (loop device, link) and removes a clone marked as `owner`'s, and its half-made
/// `.partial`; anything else there is [`BackendError::NotOurs`] and left, with its loop device and
/// link. A loop device still in use (mounted) is an error, and nothing is removed.
pub fn clone_delete(image: &Path, link: &Path, owner: &str) -> Result<Deleted, BackendError> {
    let (restore_dir, name) = split_restore(image)?;
    let Some(dir) = open_pool_dir(restore_dir, RESTORE_DIR, false)? else {
        remove_link_if(link, |t| !attached(t))?;
        return Ok(Deleted::Absent);
    };
    let mut outcome = Deleted::Absent;
    let mut detached = Vec::new();
    match open_own(&dir, Path::new(name), owner) {
        Found::Foreign(why) => {
            return Err(BackendError::NotOurs {
                what: image.display().to_string(),
                why,
            });
        }
        Found::Absent => {}
        Found::Ours(fd) => {
            let id = loopdev::file_id(&fd, image)?;
            for device in loopdev::find(id) {
                loopdev::detach(&device)?;
                detached.push(device);
            }
            drop(fd);
            match rustix::fs::unlinkat(&dir, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => outcome = Deleted::Removed,
                Err(e) => return Err(errno(format!("remove {}", image.display()))(e)),
            }
        }
    }
    remove_link_if(link, |t| detached.iter().any(|d| d == t) || !attached(t))?;
    let partial = partial_name(name);
    match open_own(&dir, &partial, owner) {
        Found::Ours(_) => match rustix::fs::unlinkat(&dir, &partial, AtFlags::empty()) {
            Ok(()) | Err(Errno::NOENT) => outcome = Deleted::Removed,
            Err(e) => {
                return Err(errno(format!(
                    "remove {}",
                    restore_dir.join(&partial).display()
                ))(e));
            }
        },
        Found::Absent => {}
        Found::Foreign(why) => {
            return Err(BackendError::NotOurs {
                what: restore_dir.join(&partial).display().to_string(),
                why,
            });
        }
    }
    if outcome == Deleted::Removed {
        let _ = persist_dir(restore_dir);
    }
    Ok(outcome)
}

fn persist_dir(dir: &Path) -> Result<(), BackendError> {
    File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("fsync {}", dir.display())))
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
