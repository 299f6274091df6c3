//! `btrfs`: the volume is a btrfs subvolume; the snapshot is a read-only subvolume snapshot.
//!
//! A btrfs snapshot writes to the filesystem it snapshots, so under FIFREEZE it would block until
//! the thaw: this backend never runs under a freeze. Each snapshot is atomic for its subvolume (the
//! kernel flushes and commits), but several subvolumes are not snapshotted at one instant.
//!
//! Snapshots go to `/.tandem-snapshots/<name>` below the top-level subvolume, which the agent mounts
//! (subvolid=5) under its own directory for the time of the call. A volume mounted at the top level
//! itself is refused: its snapshot directory would be inside the volume the tenant sees and writes.
//!
//! Everything is done with btrfs ioctls on file descriptors (no `btrfs` CLI, which the agent image
//! does not ship and which follows symlinks): paths are resolved below the top-level mount with
//! `openat2(RESOLVE_NO_SYMLINKS | RESOLVE_BENEATH | RESOLVE_NO_XDEV)` and checked to be on the same
//! filesystem; a snapshot is made writable, marked with its owner (an xattr on its root), set
//! read-only, and its subvolume id and uuid go into the handle; a delete checks the mark (and the
//! recorded uuid) on the opened subvolume and then destroys it by id.

use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{AtFlags, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::ioctl::{Opcode, Updater, ioctl, opcode};
use rustix::mount::{MountFlags, MoveMountFlags, OpenTreeFlags, UnmountFlags};

use super::clone::{CloneHandle, CloneInfo};
use super::{
    BackendError, BackendKind, BackendOptions, Deleted, SnapshotHandle, SnapshotInfo, SnapshotPlan,
    SnapshotSource, SubvolumeId, mark_mismatch, set_mark,
};
use crate::api::CloneMethod;

/// The directory below the top-level subvolume that holds the snapshots.
pub const SNAPSHOT_DIR: &str = ".tandem-snapshots";

/// The inode number of every subvolume's root directory (BTRFS_FIRST_FREE_OBJECTID).
const SUBVOLUME_ROOT_INO: u64 = 256;

/// Why a btrfs volume mounted at `root` (its mountinfo root, the subvolume path) cannot be
/// snapshotted here, if it cannot: when the snapshot directory would be inside it (the top level)
/// or it inside the snapshot directory.
pub fn refuse_mount_root(root: &str) -> Option<String> {
    let root = root.trim_end_matches('/');
    let dir = format!("/{SNAPSHOT_DIR}");
    if root.is_empty() {
        return Some(format!(
            "the volume is the btrfs top-level subvolume, so its snapshots ({dir}) would be inside the volume its users see and write; give the volume its own subvolume (mount -o subvol=<name>)"
        ));
    }
    if root == dir || root.starts_with(&format!("{dir}/")) {
        return Some(format!(
            "the volume is inside tandem's snapshot directory {dir}"
        ));
    }
    if root.split('/').any(|c| c == "..") {
        return Some(format!("the subvolume path {root:?} has a '..' component"));
    }
    None
}

/// Plans a snapshot of the subvolume `subvol` (its path below the top level, from mountinfo).
pub fn plan(
    device: &Path,
    subvol: &str,
    name: &str,
    owner: &str,
    _options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    if let Some(why) = refuse_mount_root(subvol) {
        return Err(BackendError::Unsupported {
            device: device.into(),
            why,
        });
    }
    Ok(SnapshotPlan {
        backend: BackendKind::Btrfs,
        handle: SnapshotHandle::Btrfs {
            device: device.into(),
            path: format!("/{SNAPSHOT_DIR}/{name}"),
            owner: owner.into(),
            subvolume: None,
        },
        source: SnapshotSource::Subvolume {
            device: device.into(),
            subvol: subvol.into(),
        },
        owner: owner.into(),
    })
}

fn errno(what: impl Into<String>) -> impl FnOnce(Errno) -> BackendError {
    let what = what.into();
    move |e| BackendError::Io {
        what,
        source: e.into(),
    }
}

// --- btrfs ioctls (<linux/btrfs.h>) ---

const BTRFS_IOCTL_MAGIC: u8 = 0x94;
const BTRFS_SUBVOL_RDONLY: u64 = 1 << 1;
const BTRFS_SUBVOL_SPEC_BY_ID: u64 = 1 << 4;

/// `struct btrfs_ioctl_vol_args_v2` (4096 bytes; the name union also holds a subvolume id).
#[repr(C)]
struct VolArgsV2 {
    fd: i64,
    transid: u64,
    flags: u64,
    unused: [u64; 4],
    name: [u8; 4040],
}

impl VolArgsV2 {
    fn new() -> Self {
        VolArgsV2 {
            fd: 0,
            transid: 0,
            flags: 0,
            unused: [0; 4],
            name: [0; 4040],
        }
    }
}

/// `struct btrfs_ioctl_timespec`.
#[repr(C)]
#[derive(Clone, Copy)]
struct Timespec {
    sec: u64,
    nsec: u32,
}

/// `struct btrfs_ioctl_get_subvol_info_args` (504 bytes).
#[repr(C)]
struct SubvolInfo {
    treeid: u64,
    name: [u8; 256],
    parent_id: u64,
    dirid: u64,
    generation: u64,
    flags: u64,
    uuid: [u8; 16],
    parent_uuid: [u8; 16],
    received_uuid: [u8; 16],
    ctransid: u64,
    otransid: u64,
    stransid: u64,
    rtransid: u64,
    ctime: Timespec,
    otime: Timespec,
    stime: Timespec,
    rtime: Timespec,
    reserved: [u64; 8],
}

/// `struct btrfs_ioctl_fs_info_args` (1024 bytes); only the fsid is used.
#[repr(C)]
struct FsInfo {
    max_id: u64,
    num_devices: u64,
    fsid: [u8; 16],
    nodesize: u32,
    sectorsize: u32,
    clone_alignment: u32,
    csum_type: u16,
    csum_size: u16,
    flags: u64,
    generation: u64,
    metadata_uuid: [u8; 16],
    reserved: [u8; 944],
}

const SNAP_CREATE_V2: Opcode = opcode::write::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 23);
const SUBVOL_SETFLAGS: Opcode = opcode::write::<u64>(BTRFS_IOCTL_MAGIC, 26);
const FS_INFO: Opcode = opcode::read::<FsInfo>(BTRFS_IOCTL_MAGIC, 31);
const GET_SUBVOL_INFO: Opcode = opcode::read::<SubvolInfo>(BTRFS_IOCTL_MAGIC, 60);
const SNAP_DESTROY_V2: Opcode = opcode::write::<VolArgsV2>(BTRFS_IOCTL_MAGIC, 63);

/// The filesystem's fsid (the same for every subvolume, unlike statfs's f_fsid).
fn fsid(fd: impl AsFd) -> Result<[u8; 16], Errno> {
    // SAFETY: all-zero is a valid FsInfo (integers and byte arrays).
    let mut info: FsInfo = unsafe { std::mem::zeroed() };
    // SAFETY: BTRFS_IOC_FS_INFO reads and fills a struct btrfs_ioctl_fs_info_args, which FsInfo
    // mirrors; the opcode encodes its size.
    unsafe { ioctl(fd, Updater::<FS_INFO, FsInfo>::new(&mut info)) }?;
    Ok(info.fsid)
}

/// The id and uuid of the subvolume holding `fd`.
fn subvolume_of(fd: impl AsFd) -> Result<SubvolumeId, Errno> {
    // SAFETY: all-zero is a valid SubvolInfo.
    let mut info: SubvolInfo = unsafe { std::mem::zeroed() };
    // SAFETY: BTRFS_IOC_GET_SUBVOL_INFO fills a struct btrfs_ioctl_get_subvol_info_args.
    unsafe { ioctl(fd, Updater::<GET_SUBVOL_INFO, SubvolInfo>::new(&mut info)) }?;
    Ok(SubvolumeId {
        id: info.treeid,
        uuid: format_uuid(&info.uuid),
    })
}

fn format_uuid(b: &[u8; 16]) -> String {
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// A writable snapshot of the subvolume `src` named `name` in the directory `dir`.
fn snap_create(dir: impl AsFd, src: impl AsFd, name: &str) -> Result<(), Errno> {
    let mut args = VolArgsV2::new();
    args.fd = i64::from(std::os::fd::AsRawFd::as_raw_fd(&src.as_fd()));
    let bytes = name.as_bytes();
    if bytes.len() >= args.name.len() {
        return Err(Errno::NAMETOOLONG);
    }
    args.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: BTRFS_IOC_SNAP_CREATE_V2 reads a struct btrfs_ioctl_vol_args_v2 (NUL-terminated
    // name, the source fd open for the whole call).
    unsafe { ioctl(dir, Updater::<SNAP_CREATE_V2, VolArgsV2>::new(&mut args)) }
}

fn set_read_only(subvolume: impl AsFd) -> Result<(), Errno> {
    let mut flags: u64 = BTRFS_SUBVOL_RDONLY;
    // SAFETY: BTRFS_IOC_SUBVOL_SETFLAGS reads a u64.
    unsafe { ioctl(subvolume, Updater::<SUBVOL_SETFLAGS, u64>::new(&mut flags)) }
}

/// Destroys the subvolume `id` (any fd on the filesystem names it).
fn destroy_by_id(fs_fd: impl AsFd, id: u64) -> Result<(), Errno> {
    let mut args = VolArgsV2::new();
    args.flags = BTRFS_SUBVOL_SPEC_BY_ID;
    args.name[..8].copy_from_slice(&id.to_ne_bytes());
    // SAFETY: BTRFS_IOC_SNAP_DESTROY_V2 reads a struct btrfs_ioctl_vol_args_v2 (subvolid in the union).
    unsafe { ioctl(fs_fd, Updater::<SNAP_DESTROY_V2, VolArgsV2>::new(&mut args)) }
}

// --- the top-level mount and checked paths below it ---

/// The top-level subvolume of a btrfs device, mounted for as long as this value lives.
struct TopLevel {
    dir: PathBuf,
    fd: Option<OwnedFd>,
    fsid: [u8; 16],
}

static MOUNTS: AtomicU64 = AtomicU64::new(0);

impl TopLevel {
    fn mount(device: &Path, options: &BackendOptions) -> Result<Self, BackendError> {
        let id: String = device
            .to_string_lossy()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // One directory per call, so concurrent calls never unmount each other's.
        let dir = options.btrfs_mount_dir.join(format!(
            "{id}-{}-{}",
            std::process::id(),
            MOUNTS.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).map_err(|source| BackendError::Io {
            what: format!("create {}", dir.display()),
            source,
        })?;
        if let Err(e) = rustix::mount::mount(
            device,
            &dir,
            "btrfs",
            MountFlags::NOATIME | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            c"subvolid=5",
        ) {
            let _ = fs::remove_dir(&dir);
            return Err(errno(format!(
                "mount the top level of {} on {}",
                device.display(),
                dir.display()
            ))(e));
        }
        let mut top = TopLevel {
            dir,
            fd: None,
            fsid: [0; 16],
        };
        let fd = rustix::fs::open(
            &top.dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno(format!("open {}", top.dir.display())))?;
        top.fsid = fsid(&fd).map_err(errno(format!("BTRFS_IOC_FS_INFO {}", top.dir.display())))?;
        top.fd = Some(fd);
        Ok(top)
    }

    fn fd(&self) -> Result<&OwnedFd, BackendError> {
        self.fd.as_ref().ok_or_else(|| BackendError::Parse {
            command: "btrfs top level".into(),
            why: "not open".into(),
        })
    }

    /// Opens `below` (relative to `dir`, a directory of this filesystem) without following any
    /// symlink, without leaving `dir` or the mount, and checks it is on this filesystem.
    fn open_below(&self, dir: impl AsFd, below: &str) -> Result<OwnedFd, Errno> {
        let below = below.trim_start_matches('/');
        let fd = rustix::fs::openat2(
            dir,
            if below.is_empty() { "." } else { below },
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::BENEATH | ResolveFlags::NO_XDEV,
        )?;
        if fsid(&fd)? != self.fsid {
            return Err(Errno::XDEV);
        }
        Ok(fd)
    }
}

impl Drop for TopLevel {
    fn drop(&mut self) {
        self.fd = None;
        if let Err(e) = rustix::mount::unmount(&self.dir, UnmountFlags::empty()) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmount of btrfs top level failed; detaching");
            let _ = rustix::mount::unmount(&self.dir, UnmountFlags::DETACH);
        }
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The snapshot's name from a handle path, which must be `/.tandem-snapshots/<one component>`.
fn snapshot_leaf(path: &str) -> Result<&str, BackendError> {
    let leaf = path
        .strip_prefix(&format!("/{SNAPSHOT_DIR}/"))
        .filter(|l| !l.is_empty() && *l != "." && *l != ".." && !l.contains('/'));
    leaf.ok_or_else(|| BackendError::Parse {
        command: "btrfs handle".into(),
        why: format!("{path:?} is not /{SNAPSHOT_DIR}/<name>"),
    })
}

/// Whether an open directory is a subvolume root.
fn is_subvolume_root(fd: impl AsFd) -> bool {
    rustix::fs::fstat(fd).is_ok_and(|st| st.st_ino == SUBVOLUME_ROOT_INO)
}

/// Takes a read-only snapshot of `subvol` at `path`, marked with `owner`. Anything already at
/// `path` is [`BackendError::AlreadyExists`]; a failed create destroys the snapshot it made.
pub fn create(
    device: &Path,
    subvol: &str,
    path: &str,
    owner: &str,
    options: &BackendOptions,
) -> Result<SnapshotInfo, BackendError> {
    let name = snapshot_leaf(path)?;
    let shown = format!("btrfs:{}:{path}", device.display());
    if let Some(why) = refuse_mount_root(subvol) {
        return Err(BackendError::Unsupported {
            device: device.into(),
            why,
        });
    }
    let top = TopLevel::mount(device, options)?;
    let top_fd = top.fd()?;
    match rustix::fs::mkdirat(top_fd, SNAPSHOT_DIR, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(errno(format!(
                "create /{SNAPSHOT_DIR} on {}",
                device.display()
            ))(e));
        }
    }
    let dir = top.open_below(top_fd, SNAPSHOT_DIR).map_err(|e| match e {
        Errno::LOOP | Errno::NOTDIR | Errno::XDEV => BackendError::AlreadyExists {
            what: format!(
                "/{SNAPSHOT_DIR} on {} (not a plain directory of this filesystem: {e})",
                device.display()
            ),
        },
        e => errno(format!("open /{SNAPSHOT_DIR} on {}", device.display()))(e),
    })?;
    if rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW).is_ok() {
        return Err(BackendError::AlreadyExists { what: shown });
    }
    let src = top.open_below(top_fd, subvol).map_err(errno(format!(
        "open subvolume {subvol} of {}",
        device.display()
    )))?;
    if !is_subvolume_root(&src) {
        return Err(BackendError::Unsupported {
            device: device.into(),
            why: format!("{subvol} is not a subvolume"),
        });
    }
    snap_create(&dir, &src, name).map_err(|e| match e {
        Errno::EXIST => BackendError::AlreadyExists {
            what: shown.clone(),
        },
        e => errno(format!("BTRFS_IOC_SNAP_CREATE_V2 {subvol} -> {shown}"))(e),
    })?;
    // Made here: from now on a failure destroys it (by id, once known).
    let snap = match top.open_below(&dir, name) {
        Ok(fd) => fd,
        Err(e) => return Err(errno(format!("open the new snapshot {shown}"))(e)),
    };
    let made = subvolume_of(&snap).map_err(errno(format!("BTRFS_IOC_GET_SUBVOL_INFO {shown}")))?;
    match finish_snapshot(&snap, owner, &shown) {
        Ok(size_bytes) => Ok(SnapshotInfo {
            size_bytes,
            handle: SnapshotHandle::Btrfs {
                device: device.into(),
                path: path.into(),
                owner: owner.into(),
                subvolume: Some(made),
            },
        }),
        Err(e) => {
            drop(snap);
            if let Err(d) = destroy_by_id(&dir, made.id) {
                tracing::warn!(snapshot = %shown, error = %d, "could not destroy a half-made snapshot");
            }
            Err(e)
        }
    }
}

/// Marks a new snapshot with its owner and makes it read-only; returns its size.
fn finish_snapshot(snap: &OwnedFd, owner: &str, shown: &str) -> Result<u64, BackendError> {
    set_mark(snap, owner, Path::new(shown))?;
    set_read_only(snap).map_err(errno(format!("make {shown} read-only")))?;
    let st = rustix::fs::fstatvfs(snap).map_err(errno(format!("statvfs {shown}")))?;
    Ok(st.f_blocks * st.f_frsize)
}

/// Deletes the snapshot subvolume at `path` if it is `owner`'s: a subvolume root on this
/// filesystem, reached without symlinks, carrying the owner mark and (when recorded) the
/// subvolume id and uuid. It is destroyed by id; anything else there is [`BackendError::NotOurs`].
pub fn delete(
    device: &Path,
    path: &str,
    owner: &str,
    recorded: Option<&SubvolumeId>,
    options: &BackendOptions,
) -> Result<Deleted, BackendError> {
    let name = snapshot_leaf(path)?;
    let shown = format!("btrfs:{}:{path}", device.display());
    let not_ours = |why: String| BackendError::NotOurs {
        what: shown.clone(),
        why,
    };
    let top = TopLevel::mount(device, options)?;
    let top_fd = top.fd()?;
    let dir = match top.open_below(top_fd, SNAPSHOT_DIR) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Deleted::Absent),
        Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::XDEV)) => {
            return Err(not_ours(format!(
                "/{SNAPSHOT_DIR} is not a plain directory of this filesystem: {e}"
            )));
        }
        Err(e) => return Err(errno(format!("open /{SNAPSHOT_DIR} of {shown}"))(e)),
    };
    let snap = match top.open_below(&dir, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Deleted::Absent),
        Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::XDEV)) => {
            return Err(not_ours(format!(
                "it is a symbolic link, not a directory or on another filesystem: {e}"
            )));
        }
        Err(e) => return Err(errno(format!("open {shown}"))(e)),
    };
    if !is_subvolume_root(&snap) {
        return Err(not_ours("it is not a subvolume".into()));
    }
    let found = subvolume_of(&snap).map_err(errno(format!("BTRFS_IOC_GET_SUBVOL_INFO {shown}")))?;
    if let Some(recorded) = recorded
        && *recorded != found
    {
        return Err(not_ours(format!(
            "it is subvolume {} ({}), the handle recorded {} ({})",
            found.id, found.uuid, recorded.id, recorded.uuid
        )));
    }
    if let Some(why) = mark_mismatch(&snap, owner) {
        return Err(not_ours(why));
    }
    drop(snap);
    destroy_by_id(&dir, found.id).map_err(errno(format!(
        "BTRFS_IOC_SNAP_DESTROY_V2 subvolume {} ({shown})",
        found.id
    )))?;
    Ok(Deleted::Removed)
}

// --- restore clones ---

/// The directory below the top-level subvolume that holds restore clones: each clone is a directory
/// `<name>` holding the writable subvolume `volume`; the directory is what the agent bind-mounts, so
/// the PV path `<mount>/volume` exists only while the bind mount does.
pub const RESTORE_DIR: &str = ".tandem-restores";

/// The subvolume inside a clone's directory.
pub const CLONE_VOLUME: &str = "volume";

fn gone(what: String) -> BackendError {
    BackendError::Io {
        what,
        source: std::io::ErrorKind::NotFound.into(),
    }
}

/// The clone's name from a handle path, which must be `/.tandem-restores/<one component>`.
fn restore_leaf(path: &str) -> Result<&str, BackendError> {
    let leaf = path
        .strip_prefix(&format!("/{RESTORE_DIR}/"))
        .filter(|l| !l.is_empty() && *l != "." && *l != ".." && !l.contains('/'));
    leaf.ok_or_else(|| BackendError::Parse {
        command: "btrfs clone handle".into(),
        why: format!("{path:?} is not /{RESTORE_DIR}/<name>"),
    })
}

/// Makes a writable snapshot of the member snapshot (which must carry its cut's mark, and be the
/// subvolume the cut recorded) at `<top>/.tandem-restores/<name>/volume`, marks the directory and
/// the subvolume with `owner`, and bind-mounts the directory at `mount`. Anything at the clone's
/// place is [`BackendError::AlreadyExists`]; a failure removes what this call made.
pub fn clone_create(
    device: &Path,
    (snapshot, snapshot_owner, recorded): (&str, &str, Option<&SubvolumeId>),
    path: &str,
    mount: &Path,
    owner: &str,
    options: &BackendOptions,
) -> Result<CloneInfo, BackendError> {
    let snap_name = snapshot_leaf(snapshot)?;
    let name = restore_leaf(path)?;
    let shown_snap = format!("btrfs:{}:{snapshot}", device.display());
    let shown = format!("btrfs:{}:{path}", device.display());
    let top = TopLevel::mount(device, options)?;
    let top_fd = top.fd()?;
    let not_ours = |why: String| BackendError::NotOurs {
        what: shown_snap.clone(),
        why,
    };
    let snaps = top.open_below(top_fd, SNAPSHOT_DIR).map_err(errno(format!(
        "open /{SNAPSHOT_DIR} of {}",
        device.display()
    )))?;
    let src = match top.open_below(&snaps, snap_name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Err(gone(format!("the member snapshot {shown_snap}"))),
        Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::XDEV)) => {
            return Err(not_ours(format!(
                "it is not a directory of this filesystem: {e}"
            )));
        }
        Err(e) => return Err(errno(format!("open {shown_snap}"))(e)),
    };
    if !is_subvolume_root(&src) {
        return Err(not_ours("it is not a subvolume".into()));
    }
    let found =
        subvolume_of(&src).map_err(errno(format!("BTRFS_IOC_GET_SUBVOL_INFO {shown_snap}")))?;
    if let Some(recorded) = recorded
        && *recorded != found
    {
        return Err(not_ours(format!(
            "it is subvolume {} ({}), the cut recorded {} ({})",
            found.id, found.uuid, recorded.id, recorded.uuid
        )));
    }
    if let Some(why) = mark_mismatch(&src, snapshot_owner) {
        return Err(not_ours(why));
    }
    match rustix::fs::mkdirat(top_fd, RESTORE_DIR, Mode::from_raw_mode(0o700)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => {
            return Err(errno(format!(
                "create /{RESTORE_DIR} on {}",
                device.display()
            ))(e));
        }
    }
    let restores = top.open_below(top_fd, RESTORE_DIR).map_err(|e| match e {
        Errno::LOOP | Errno::NOTDIR | Errno::XDEV => BackendError::AlreadyExists {
            what: format!(
                "/{RESTORE_DIR} on {} (not a plain directory of this filesystem: {e})",
                device.display()
            ),
        },
        e => errno(format!("open /{RESTORE_DIR} on {}", device.display()))(e),
    })?;
    // The clone's directory is made here, exclusively: whatever is there already is not ours.
    match rustix::fs::mkdirat(&restores, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => {}
        Err(Errno::EXIST) => return Err(BackendError::AlreadyExists { what: shown }),
        Err(e) => return Err(errno(format!("create {shown}"))(e)),
    }
    let made = (|| {
        let dir = top
            .open_below(&restores, name)
            .map_err(errno(format!("open {shown}")))?;
        set_mark(&dir, owner, Path::new(&shown))?;
        snap_create(&dir, &src, CLONE_VOLUME).map_err(errno(format!(
            "BTRFS_IOC_SNAP_CREATE_V2 {shown_snap} -> {shown}/{CLONE_VOLUME}"
        )))?;
        let volume = top
            .open_below(&dir, CLONE_VOLUME)
            .map_err(errno(format!("open {shown}/{CLONE_VOLUME}")))?;
        set_mark(
            &volume,
            owner,
            Path::new(&format!("{shown}/{CLONE_VOLUME}")),
        )?;
        bind(&dir, mount)?;
        clone_info(&volume, device, path, mount, owner)
    })();
    match made {
        Ok(info) => Ok(info),
        Err(e) => {
            drop(top);
            if let Err(d) = clone_delete(device, path, mount, owner, options) {
                tracing::warn!(clone = %shown, error = %d, "could not remove a half-made clone");
            }
            Err(e)
        }
    }
}

fn clone_info(
    volume: &OwnedFd,
    device: &Path,
    path: &str,
    mount: &Path,
    owner: &str,
) -> Result<CloneInfo, BackendError> {
    let st = rustix::fs::fstatvfs(volume).map_err(errno(format!("statvfs {path}")))?;
    Ok(CloneInfo {
        handle: CloneHandle::Btrfs {
            device: device.into(),
            path: path.into(),
            mount: mount.into(),
            owner: owner.into(),
        },
        path: mount.join(CLONE_VOLUME),
        block: false,
        size_bytes: st.f_blocks * st.f_frsize,
        method: CloneMethod::Clone,
        filesystem: Some("btrfs".into()),
    })
}

/// (st_dev, st_ino) of an open file.
fn dev_ino(fd: impl AsFd) -> Option<(u64, u64)> {
    rustix::fs::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

/// Whether `mount` is (the root of) a bind mount of the directory open at `dir`.
fn is_bound(dir: &OwnedFd, mount: &Path) -> bool {
    let Ok(target) = rustix::fs::open(
        mount,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    dev_ino(&target).is_some_and(|id| Some(id) == dev_ino(dir))
}

/// Bind-mounts the directory open at `dir` (exactly it: a detached copy of its mount, never a path
/// looked up again) at `mount`, without the top-level mount's noexec; nosuid and nodev.
fn bind(dir: &OwnedFd, mount: &Path) -> Result<(), BackendError> {
    if is_bound(dir, mount) {
        return Ok(());
    }
    fs::create_dir_all(mount).map_err(|source| BackendError::Io {
        what: format!("create {}", mount.display()),
        source,
    })?;
    let tree = rustix::mount::open_tree(
        dir,
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(errno(format!("open_tree for {}", mount.display())))?;
    rustix::mount::move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        mount,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(errno(format!(
        "bind-mount the clone at {}",
        mount.display()
    )))?;
    if let Err(e) = rustix::mount::mount_remount(
        mount,
        MountFlags::BIND | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    ) {
        tracing::warn!(mount = %mount.display(), error = %e, "could not set the clone's bind mount to nosuid,nodev,exec");
    }
    Ok(())
}

/// Opens the clone's directory and checks its marks (the directory's and, when it is there, the
/// subvolume's); None when the directory is not there.
fn open_clone(
    top: &TopLevel,
    name: &str,
    owner: &str,
    shown: &str,
) -> Result<Option<(OwnedFd, Option<OwnedFd>)>, BackendError> {
    let not_ours = |why: String| BackendError::NotOurs {
        what: shown.into(),
        why,
    };
    let top_fd = top.fd()?;
    let restores = match top.open_below(top_fd, RESTORE_DIR) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::XDEV)) => {
            return Err(not_ours(format!(
                "/{RESTORE_DIR} is not a plain directory of this filesystem: {e}"
            )));
        }
        Err(e) => return Err(errno(format!("open /{RESTORE_DIR} of {shown}"))(e)),
    };
    let dir = match top.open_below(&restores, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e @ (Errno::LOOP | Errno::NOTDIR | Errno::XDEV)) => {
            return Err(not_ours(format!(
                "it is not a directory of this filesystem: {e}"
            )));
        }
        Err(e) => return Err(errno(format!("open {shown}"))(e)),
    };
    if let Some(why) = mark_mismatch(&dir, owner) {
        return Err(not_ours(why));
    }
    let volume = match top.open_below(&dir, CLONE_VOLUME) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(Some((dir, None))),
        Err(e) => {
            return Err(not_ours(format!(
                "its {CLONE_VOLUME} cannot be opened: {e}"
            )));
        }
    };
    if !is_subvolume_root(&volume) {
        return Err(not_ours(format!("its {CLONE_VOLUME} is not a subvolume")));
    }
    if let Some(why) = mark_mismatch(&volume, owner) {
        return Err(not_ours(format!("its {CLONE_VOLUME}: {why}")));
    }
    Ok(Some((dir, Some(volume))))
}

/// Bind-mounts the clone's directory at `mount` again if it is not (after a reboot); idempotent.
pub fn clone_attach(
    device: &Path,
    path: &str,
    mount: &Path,
    owner: &str,
    options: &BackendOptions,
) -> Result<CloneInfo, BackendError> {
    let name = restore_leaf(path)?;
    let shown = format!("btrfs:{}:{path}", device.display());
    let top = TopLevel::mount(device, options)?;
    let Some((dir, Some(volume))) = open_clone(&top, name, owner, &shown)? else {
        return Err(gone(format!("the clone {shown}")));
    };
    bind(&dir, mount)?;
    clone_info(&volume, device, path, mount, owner)
}

/// Unmounts the clone's bind mount, destroys its subvolume and removes its directory, after
/// checking their marks; a clone whose directory is not there is [`Deleted::Absent`]. A bind mount
/// in use (a pod's mount inside it) is refused by the kernel, and nothing is destroyed.
pub fn clone_delete(
    device: &Path,
    path: &str,
    mount: &Path,
    owner: &str,
    options: &BackendOptions,
) -> Result<Deleted, BackendError> {
    let name = restore_leaf(path)?;
    let shown = format!("btrfs:{}:{path}", device.display());
    let top = TopLevel::mount(device, options)?;
    let Some((dir, volume)) = open_clone(&top, name, owner, &shown)? else {
        // Nothing of ours: an empty mount directory left is removed, anything else left.
        let _ = fs::remove_dir(mount);
        return Ok(Deleted::Absent);
    };
    while is_bound(&dir, mount) {
        rustix::mount::unmount(mount, UnmountFlags::empty())
            .map_err(errno(format!("unmount {}", mount.display())))?;
    }
    match fs::remove_dir(mount) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(mount = %mount.display(), error = %e, "could not remove the clone's mount directory")
        }
    }
    if let Some(volume) = volume {
        let id = subvolume_of(&volume).map_err(errno(format!(
            "BTRFS_IOC_GET_SUBVOL_INFO {shown}/{CLONE_VOLUME}"
        )))?;
        drop(volume);
        destroy_by_id(&dir, id.id).map_err(errno(format!(
            "BTRFS_IOC_SNAP_DESTROY_V2 subvolume {} ({shown}/{CLONE_VOLUME})",
            id.id
        )))?;
    }
    drop(dir);
    let restores = top
        .open_below(top.fd()?, RESTORE_DIR)
        .map_err(errno(format!("open /{RESTORE_DIR} of {shown}")))?;
    rustix::fs::unlinkat(&restores, name, AtFlags::REMOVEDIR)
        .map_err(errno(format!("remove {shown}")))?;
    Ok(Deleted::Removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_structs_match_the_kernel() {
        assert_eq!(std::mem::size_of::<VolArgsV2>(), 4096);
        assert_eq!(std::mem::size_of::<SubvolInfo>(), 504);
        assert_eq!(std::mem::size_of::<FsInfo>(), 1024);
        // The values of <linux/btrfs.h>'s BTRFS_IOC_* (printed by a C program against the header).
        assert_eq!(SNAP_CREATE_V2 as u64, 0x5000_9417);
        assert_eq!(SNAP_DESTROY_V2 as u64, 0x5000_943f);
        assert_eq!(GET_SUBVOL_INFO as u64, 0x81f8_943c);
        assert_eq!(FS_INFO as u64, 0x8400_941f);
        assert_eq!(SUBVOL_SETFLAGS as u64, 0x4008_941a);
    }

    /// H5: a volume at the top level (or in the snapshot directory) is refused.
    #[test]
    fn refuses_volumes_that_would_hold_their_snapshots() {
        for root in [
            "/",
            "",
            "/.tandem-snapshots",
            "/.tandem-snapshots/x",
            "/a/../b",
        ] {
            assert!(refuse_mount_root(root).is_some(), "{root:?} accepted");
        }
        for root in ["/vol1", "/tenants/a", "/.tandem-snapshotsx"] {
            assert!(refuse_mount_root(root).is_none(), "{root:?} refused");
        }
    }

    #[test]
    fn handle_paths_are_one_name_in_the_snapshot_directory() {
        assert_eq!(
            snapshot_leaf("/.tandem-snapshots/tandem.a.b.c.0123abcd").unwrap(),
            "tandem.a.b.c.0123abcd"
        );
        for bad in [
            "/.tandem-snapshots/",
            "/.tandem-snapshots/..",
            "/.tandem-snapshots/a/b",
            "/elsewhere/x",
            "x",
        ] {
            assert!(snapshot_leaf(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuids_render_like_btrfs_progs() {
        let b: [u8; 16] = std::array::from_fn(|i| i as u8);
        assert_eq!(format_uuid(&b), "00010203-0405-0607-0809-0a0b0c0d0e0f");
    }
}
