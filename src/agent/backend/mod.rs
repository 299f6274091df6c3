//! Snapshot backends, chosen by what the device under a volume is:
//!
//! | device                                        | backend     | snapshot                                        |
//! |-----------------------------------------------|-------------|-------------------------------------------------|
//! | loop device over an image on XFS or btrfs     | `reflink`   | FICLONE of the image into `.tandem-snapshots/`  |
//! | LVM thin volume                               | `lvm-thin`  | `lvcreate -s` (no size)                         |
//! | LVM linear/striped volume                     | `lvm-thick` | `lvcreate -s -L <cow size>`                     |
//! | btrfs subvolume (not on a reflink loop image) | `btrfs`     | read-only subvolume snapshot                    |
//! | krbd image (`/dev/rbdN`), marked central       | `rbd-group` | none here: one RBD group snapshot, by the controller |
//!
//! Every snapshot carries the identity of the cut that made it (its owner, the NodeSnapshot uid):
//! in its name (`tandem.<namespace>.<groupsnapshot>.<pv>.<owner hash>`) and as a mark on the
//! object (an xattr on a reflink clone and on a btrfs snapshot, an LVM tag; btrfs handles also
//! record the subvolume id and uuid). `create` never adopts an object it finds at the planned place
//! ([`BackendError::AlreadyExists`]), and `delete` removes nothing whose mark is not its owner's
//! ([`BackendError::NotOurs`]); a snapshot that is already gone is [`Deleted::Absent`].

pub mod btrfs;
pub mod clone;
pub mod loopdev;
pub mod lvm;
pub mod rbd;
pub mod reflink;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use rustix::fs::XattrFlags;
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
    /// Frozen here, cut by the controller's RBD group snapshot ([`rbd`]).
    #[serde(rename = "rbd-group")]
    RbdGroup,
}

impl BackendKind {
    /// The name reported in status.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Reflink => "reflink",
            BackendKind::LvmThin => "lvm-thin",
            BackendKind::LvmThick => "lvm-thick",
            BackendKind::Btrfs => "btrfs",
            BackendKind::RbdGroup => "rbd-group",
        }
    }

    /// Whether a snapshot can be cut while the volume's filesystem is frozen. A btrfs snapshot
    /// writes to the very filesystem it snapshots, so under a freeze it would block until the thaw.
    pub fn snapshots_under_freeze(self) -> bool {
        !matches!(self, BackendKind::Btrfs)
    }
}

/// Where a snapshot is, whose it is and how to delete it; serialised into the status
/// `snapshotHandle` as `reflink:<clone path>`, `lvm:<vg>/<lv>` or
/// `btrfs:<device>:<path below the top-level subvolume>` (the owner is not shown).
///
/// `owner` defaults to empty for handles journaled before identities existed: such a handle
/// matches no mark, so its object is reported [`BackendError::NotOurs`] and kept, never deleted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotHandle {
    Reflink {
        clone: PathBuf,
        #[serde(default)]
        owner: String,
    },
    Lvm {
        vg: String,
        lv: String,
        #[serde(default)]
        owner: String,
    },
    Btrfs {
        device: PathBuf,
        path: String,
        #[serde(default)]
        owner: String,
        /// The subvolume `create` made (None in a planned handle).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        subvolume: Option<SubvolumeId>,
    },
    /// An RBD image whose snapshot is the controller's group snapshot: nothing on the node.
    RbdGroup {
        cluster_fsid: String,
        pool: String,
        /// The RADOS namespace (empty: the pool's default).
        #[serde(default)]
        namespace: String,
        image: String,
        image_id: String,
        #[serde(default)]
        owner: String,
    },
}

/// A btrfs subvolume's identity: its id (tree objectid) and uuid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SubvolumeId {
    pub id: u64,
    pub uuid: String,
}

impl SnapshotHandle {
    /// The cut that made (or plans) this snapshot.
    pub fn owner(&self) -> &str {
        match self {
            SnapshotHandle::Reflink { owner, .. }
            | SnapshotHandle::Lvm { owner, .. }
            | SnapshotHandle::Btrfs { owner, .. }
            | SnapshotHandle::RbdGroup { owner, .. } => owner,
        }
    }
}

impl std::fmt::Display for SnapshotHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotHandle::Reflink { clone, .. } => write!(f, "reflink:{}", clone.display()),
            SnapshotHandle::Lvm { vg, lv, .. } => write!(f, "lvm:{vg}/{lv}"),
            SnapshotHandle::Btrfs { device, path, .. } => {
                write!(f, "btrfs:{}:{path}", device.display())
            }
            SnapshotHandle::RbdGroup {
                cluster_fsid,
                pool,
                namespace,
                image,
                image_id,
                ..
            } => {
                let ns = if namespace.is_empty() {
                    String::new()
                } else {
                    format!("{namespace}/")
                };
                write!(f, "rbd-group:{cluster_fsid}:{pool}/{ns}{image}@{image_id}")
            }
        }
    }
}

/// A snapshot to cut: which backend, from what, to what, for which cut.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotPlan {
    pub backend: BackendKind,
    pub handle: SnapshotHandle,
    pub source: SnapshotSource,
    pub owner: String,
}

/// What is snapshotted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SnapshotSource {
    /// The loop device's image file (checked to be the loop device's backing file when cloned).
    Image {
        image: PathBuf,
        #[serde(default)]
        loop_device: PathBuf,
    },
    /// The origin logical volume.
    LogicalVolume { vg: String, lv: String },
    /// The subvolume (its path below the btrfs top-level subvolume) on a device.
    Subvolume { device: PathBuf, subvol: String },
    /// The krbd device of an image cut centrally.
    RbdImage { device: PathBuf },
}

/// What a cut snapshot is: its size and the handle to journal (btrfs adds the subvolume it made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub size_bytes: u64,
    pub handle: SnapshotHandle,
}

/// What a delete did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    /// The snapshot was there, carried its owner's mark, and was removed.
    Removed,
    /// Nothing was there (never made, or already deleted).
    Absent,
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
    /// Something is already where this cut's snapshot would go; tandem never adopts it.
    #[error(
        "{what} already exists; it was not made by this cut, so tandem neither reports nor replaces it"
    )]
    AlreadyExists { what: String },
    /// The object at a handle's place does not carry the handle's owner mark; it is left alone.
    #[error("{what} is not this cut's snapshot nor this restore's clone ({why}); left untouched")]
    NotOurs { what: String, why: String },
    #[error("cannot name a snapshot after {field} {value:?}: {why}")]
    InvalidName {
        field: &'static str,
        value: String,
        why: &'static str,
    },
    /// The loop device's image path (read from sysfs, a host path) does not exist in the agent's
    /// mount namespace: the agent pod does not mount the directory holding it.
    #[error(
        "the image {image} of loop device {device} is not visible to the agent: mount the host directory {host_dir} into the agent pod (add it to the Helm value agent.extraHostPaths)"
    )]
    ImageNotVisible {
        image: PathBuf,
        device: PathBuf,
        host_dir: PathBuf,
    },
    /// The file at the image path is not the loop device's backing file (replaced, or another
    /// file at that path in the agent's mount namespace).
    #[error(
        "{image} is not the backing file of {device} (the loop device reads inode {expected}, the path holds inode {found}): refusing to clone another file"
    )]
    NotTheBackingFile {
        image: PathBuf,
        device: PathBuf,
        expected: String,
        found: String,
    },
}

/// The budget for a snapshot name, in bytes after LVM's device-mapper escaping (each `-` doubled).
/// A dm name is `<vg>-<lv>` plus `-cow` for a thick snapshot and must stay below DM_NAME_LEN (128
/// with its NUL): 96 leaves room for volume groups of up to 26 escaped bytes, and [`lvm::plan`]
/// shortens further for longer ones.
pub const NAME_BUDGET: usize = 96;

/// The length of `name` in a device-mapper name (LVM doubles every `-`).
pub fn dm_escaped_len(name: &str) -> usize {
    name.len() + name.bytes().filter(|&b| b == b'-').count()
}

/// The 8 hex characters of an owner in its snapshots' names.
fn owner_tag(owner: &str) -> String {
    hex(&Sha256::digest(owner.as_bytes())[..4])
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid(field: &'static str, value: &str, why: &'static str) -> BackendError {
    BackendError::InvalidName {
        field,
        value: value.into(),
        why,
    }
}

/// A namespace or GroupSnapshot name: a DNS label (so it has no `.`, which keeps the parts of a
/// snapshot name apart).
fn check_label(field: &'static str, value: &str) -> Result<(), BackendError> {
    if value.is_empty() || value.len() > 63 {
        return Err(invalid(field, value, "must be 1 to 63 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(invalid(field, value, "may hold only a-z, 0-9 and '-'"));
    }
    if value.starts_with('-') {
        return Err(invalid(field, value, "must not start with '-'"));
    }
    Ok(())
}

/// A PersistentVolume name: a DNS subdomain (no `/`, no `..`).
fn check_subdomain(field: &'static str, value: &str) -> Result<(), BackendError> {
    if value.is_empty() || value.len() > 253 {
        return Err(invalid(field, value, "must be 1 to 253 characters"));
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        return Err(invalid(field, value, "may hold only a-z, 0-9, '-' and '.'"));
    }
    if value.starts_with(['.', '-']) || value.ends_with('.') || value.contains("..") {
        return Err(invalid(
            field,
            value,
            "must not start with '.' or '-', end with '.' or hold '..'",
        ));
    }
    Ok(())
}

/// An owner (a Kubernetes uid): also used in LVM tags and xattr values.
pub(crate) fn check_owner(owner: &str) -> Result<(), BackendError> {
    // A uid is 36 characters; the one-shot mode's keys are `oneshot-<namespace>-<name>`.
    if owner.is_empty() || owner.len() > 200 {
        return Err(invalid("owner", owner, "must be 1 to 200 characters"));
    }
    if !owner
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(invalid(
            "owner",
            owner,
            "may hold only A-Z, a-z, 0-9 and '-'",
        ));
    }
    Ok(())
}

/// Builds the snapshot name `tandem.<namespace>.<groupsnapshot>.<pv>.<owner hash>` of the cut
/// `owner` (the NodeSnapshot uid), so two cuts never share a name even when the three names repeat
/// over time. Names over [`NAME_BUDGET`] keep their start and get a hash of the whole name.
pub fn snapshot_name(
    namespace: &str,
    group_snapshot: &str,
    pv: &str,
    owner: &str,
) -> Result<String, BackendError> {
    check_label("namespace", namespace)?;
    check_label("group snapshot", group_snapshot)?;
    check_subdomain("persistent volume", pv)?;
    check_owner(owner)?;
    let full = format!(
        "tandem.{namespace}.{group_snapshot}.{pv}.{}",
        owner_tag(owner)
    );
    Ok(fit_name(&full, NAME_BUDGET))
}

/// Shortens a snapshot name to `budget` escaped bytes (see [`dm_escaped_len`]): the longest start
/// that fits, then a hash of the whole name and the name's last part (the owner hash). Names that
/// fit are returned unchanged. `budget` must leave room for the 18-byte suffix.
pub fn fit_name(name: &str, budget: usize) -> String {
    if dm_escaped_len(name) <= budget {
        return name.to_string();
    }
    let tag = name.rsplit('.').next().unwrap_or_default();
    let suffix = format!(".{}.{tag}", hex(&Sha256::digest(name.as_bytes())[..4]));
    let room = budget.saturating_sub(dm_escaped_len(&suffix));
    let mut used = 0;
    let mut end = 0;
    for (i, c) in name.char_indices() {
        used += if c == '-' { 2 } else { c.len_utf8() };
        if used > room {
            break;
        }
        end = i + c.len_utf8();
    }
    let start = name[..end].trim_end_matches(['.', '-']);
    format!("{start}{suffix}")
}

/// Chooses the backend from what the device is, and plans the snapshot of the cut `owner`.
pub fn plan(
    volume: &ResolvedVolume,
    name: &str,
    owner: &str,
    options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    check_owner(owner)?;
    let is_btrfs = volume.fs_type() == Some("btrfs");
    match &volume.kind {
        // A loop image on a reflink pool is cloned whole, whatever filesystem is inside it; a
        // btrfs inside an image on a pool without reflink still has its own snapshots.
        DeviceKind::Loop { backing_file } => {
            match reflink::plan(&volume.device, backing_file, name, owner) {
                Err(_) if is_btrfs => plan_btrfs(volume, name, owner, options),
                other => other,
            }
        }
        DeviceKind::LvmVolume { vg, lv, .. } => lvm::plan(vg, lv, name, owner),
        _ if is_btrfs => plan_btrfs(volume, name, owner, options),
        DeviceKind::OtherDeviceMapper { dm_name } => Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: format!("device-mapper device {dm_name} is not an LVM logical volume"),
        }),
        DeviceKind::Rbd(image) if image.snapshot.is_some() => Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: format!(
                "{image} is mapped at its snapshot {} (read-only), not at the image itself",
                image.snapshot.as_deref().unwrap_or_default()
            ),
        }),
        // One group snapshot in the cluster, cut while every node holds its freeze: only a
        // member the controller marked central (`rbd::plan`) is frozen for it.
        DeviceKind::Rbd(image) => Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: format!(
                "{image}: an RBD member is snapshotted by the controller's RBD group snapshot, and this one was not marked to be cut centrally (is its PersistentVolume a ceph-csi RBD volume?)"
            ),
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
    owner: &str,
    options: &BackendOptions,
) -> Result<SnapshotPlan, BackendError> {
    let mount = volume
        .mount
        .as_ref()
        .ok_or_else(|| BackendError::Unsupported {
            device: volume.device.clone(),
            why: "btrfs without a mount".into(),
        })?;
    btrfs::plan(&volume.device, &mount.root, name, owner, options)
}

/// Cuts the snapshot and marks it with its owner. Whatever already exists at the planned place is
/// [`BackendError::AlreadyExists`]; a failed create removes what it half-made itself.
pub fn create(plan: &SnapshotPlan, options: &BackendOptions) -> Result<SnapshotInfo, BackendError> {
    let mismatch = || BackendError::Parse {
        command: "plan".into(),
        why: format!(
            "source {:?} does not match handle {} of owner {:?}",
            plan.source,
            plan.handle,
            plan.handle.owner()
        ),
    };
    if plan.handle.owner() != plan.owner {
        return Err(mismatch());
    }
    check_owner(&plan.owner)?;
    match (&plan.source, &plan.handle) {
        (
            SnapshotSource::Image { image, loop_device },
            SnapshotHandle::Reflink { clone, owner },
        ) => reflink::create(loop_device, image, clone, owner),
        (
            SnapshotSource::LogicalVolume { vg, lv },
            SnapshotHandle::Lvm {
                lv: snap, owner, ..
            },
        ) => lvm::create(vg, lv, snap, owner, plan.backend, &options.thick_cow_size),
        (
            SnapshotSource::Subvolume { device, subvol },
            SnapshotHandle::Btrfs { path, owner, .. },
        ) => btrfs::create(device, subvol, path, owner, options),
        // Cut by the controller once every node holds: nothing to make here.
        (SnapshotSource::RbdImage { .. }, handle @ SnapshotHandle::RbdGroup { .. }) => {
            Ok(SnapshotInfo {
                handle: handle.clone(),
                size_bytes: 0,
            })
        }
        _ => Err(mismatch()),
    }
}

/// Deletes a snapshot by its handle, after checking that the object there carries the handle's
/// owner mark ([`BackendError::NotOurs`] otherwise, and nothing is touched). A snapshot that is not
/// there is [`Deleted::Absent`], so planned handles of snapshots never made can be deleted too.
pub fn delete(handle: &SnapshotHandle, options: &BackendOptions) -> Result<Deleted, BackendError> {
    match handle {
        SnapshotHandle::Reflink { clone, owner } => reflink::delete(clone, owner),
        SnapshotHandle::Lvm { vg, lv, owner } => lvm::delete(vg, lv, owner),
        SnapshotHandle::Btrfs {
            device,
            path,
            owner,
            subvolume,
        } => btrfs::delete(device, path, owner, subvolume.as_ref(), options),
        // The group snapshot is the controller's to remove; the node holds nothing of it.
        SnapshotHandle::RbdGroup { .. } => Ok(Deleted::Absent),
    }
}

/// Makes a cut snapshot durable where the backend needs it (a reflink clone's fsync); called after
/// the thaw so it is not paid inside the frozen window.
pub fn persist(handle: &SnapshotHandle) -> Result<(), BackendError> {
    match handle {
        SnapshotHandle::Reflink { clone, .. } => reflink::persist(clone),
        SnapshotHandle::Lvm { .. }
        | SnapshotHandle::Btrfs { .. }
        | SnapshotHandle::RbdGroup { .. } => Ok(()),
    }
}

/// The xattr that marks a reflink clone or a btrfs snapshot with its owner. A `trusted.` xattr
/// needs CAP_SYS_ADMIN to set or read, so a tenant cannot forge it.
pub const OWNER_XATTR: &str = "trusted.tandem.owner";

/// Marks a file or directory with its owner.
pub(crate) fn set_mark(fd: impl AsFd, owner: &str, what: &Path) -> Result<(), BackendError> {
    rustix::fs::fsetxattr(fd, OWNER_XATTR, owner.as_bytes(), XattrFlags::empty()).map_err(|e| {
        BackendError::Io {
            what: format!("mark {} with its owner ({OWNER_XATTR})", what.display()),
            source: e.into(),
        }
    })
}

/// Why the object open at `fd` is not `owner`'s, or None when its mark says it is.
pub(crate) fn mark_mismatch(fd: impl AsFd, owner: &str) -> Option<String> {
    let mut buf = [0u8; 256];
    match rustix::fs::fgetxattr(fd, OWNER_XATTR, &mut buf[..]) {
        Ok(len) => {
            let found = String::from_utf8_lossy(&buf[..len]);
            if !owner.is_empty() && found == owner {
                None
            } else {
                Some(format!("its owner mark is {found:?}, not {owner:?}"))
            }
        }
        Err(rustix::io::Errno::NODATA) => Some(format!("it has no owner mark ({OWNER_XATTR})")),
        Err(e) => Some(format!("its owner mark cannot be read: {e}")),
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

    const UID: &str = "3f9a8b7c-1d2e-4f5a-8b9c-0d1e2f3a4b5c";

    #[test]
    fn krbd_images_are_refused_by_name_and_a_mapped_snapshot_as_read_only() {
        use crate::agent::discovery::{DevId, RbdImage};
        let image = |snapshot: Option<&str>| ResolvedVolume {
            path: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv-1/mount".into(),
            mount: None,
            device: "/dev/rbd0".into(),
            block_dev: DevId {
                major: 252,
                minor: 0,
            },
            kind: DeviceKind::Rbd(RbdImage {
                cluster_fsid: "8f9b".into(),
                pool: "rbd".into(),
                pool_ns: String::new(),
                name: "csi-vol-1".into(),
                image_id: "1013".into(),
                snapshot: snapshot.map(str::to_string),
            }),
        };
        let why = |v: &ResolvedVolume| match plan(
            v,
            "tandem.ns.s.pv-1.abcd1234",
            UID,
            &BackendOptions {
                thick_cow_size: "1G".into(),
                btrfs_mount_dir: "/run/tandem/btrfs".into(),
            },
        ) {
            Err(BackendError::Unsupported { why, .. }) => why,
            other => panic!("not refused: {other:?}"),
        };
        let head = why(&image(None));
        assert!(head.contains("RBD image rbd/csi-vol-1 (id 1013"), "{head}");
        assert!(head.contains("RBD group snapshot"), "{head}");
        let snap = why(&image(Some("snap-1")));
        assert!(snap.contains("snapshot snap-1 (read-only)"), "{snap}");
    }

    #[test]
    fn a_central_member_must_be_a_krbd_image_and_is_neither_made_nor_deleted_on_the_node() {
        use crate::agent::discovery::{DevId, RbdImage};
        let volume = |kind: DeviceKind| ResolvedVolume {
            path: "/var/lib/kubelet/pods/p/volumes/kubernetes.io~csi/pv-1/mount".into(),
            mount: None,
            device: "/dev/rbd0".into(),
            block_dev: DevId {
                major: 252,
                minor: 0,
            },
            kind,
        };
        let image = |snapshot: Option<&str>| {
            DeviceKind::Rbd(RbdImage {
                cluster_fsid: "8f9b".into(),
                pool: "rbd".into(),
                pool_ns: "tenant".into(),
                name: "csi-vol-1".into(),
                image_id: "1013".into(),
                snapshot: snapshot.map(str::to_string),
            })
        };
        let plan = rbd::plan(&volume(image(None)), UID).expect("a krbd head is planned");
        assert_eq!(plan.backend, BackendKind::RbdGroup);
        assert_eq!(
            plan.handle.to_string(),
            "rbd-group:8f9b:rbd/tenant/csi-vol-1@1013"
        );
        assert_eq!(plan.handle.owner(), UID);
        let options = BackendOptions {
            thick_cow_size: "1G".into(),
            btrfs_mount_dir: "/run/tandem/btrfs".into(),
        };
        // Nothing is made on the node, and nothing there is deleted.
        let made = create(&plan, &options).expect("create");
        assert_eq!(made.handle, plan.handle);
        assert_eq!(
            delete(&plan.handle, &options).expect("delete"),
            Deleted::Absent
        );
        // Never frozen without a snapshot: a mapped snapshot or any other device is refused.
        for kind in [
            image(Some("snap-1")),
            DeviceKind::Loop {
                backing_file: "/pool/img".into(),
            },
            DeviceKind::Other,
        ] {
            match rbd::plan(&volume(kind.clone()), UID) {
                Err(BackendError::Unsupported { .. }) => {}
                other => panic!("{kind:?} not refused: {other:?}"),
            }
        }
        // A node has nothing to clone it from.
        let clone_options = clone::CloneOptions {
            backend: options,
            link_dir: "/run/tandem/restores".into(),
            mount_dir: "/run/tandem/restore-mounts".into(),
        };
        assert!(matches!(
            clone::plan(&plan.handle, "ns", "pv-1", UID, &clone_options),
            Err(BackendError::Unsupported { .. })
        ));
    }

    #[test]
    fn names_carry_the_owner_and_trace_back() {
        let name = snapshot_name("shop", "orders-2026", "pv-1", UID).unwrap();
        assert!(name.starts_with("tandem.shop.orders-2026.pv-1."), "{name}");
        let tag = name.rsplit('.').next().unwrap();
        assert_eq!(tag.len(), 8);
        assert!(tag.bytes().all(|b| b.is_ascii_hexdigit()));
        // Same names, another cut: another snapshot name. Same cut: the same name.
        assert_ne!(
            name,
            snapshot_name("shop", "orders-2026", "pv-1", "other-uid").unwrap()
        );
        assert_eq!(
            name,
            snapshot_name("shop", "orders-2026", "pv-1", UID).unwrap()
        );
    }

    #[test]
    fn long_names_are_shortened_and_stay_unique() {
        let long = snapshot_name(&"n".repeat(63), &"g".repeat(63), &"p".repeat(200), UID).unwrap();
        assert!(dm_escaped_len(&long) <= NAME_BUDGET, "{long}");
        assert!(long.starts_with("tandem.nnn"));
        assert!(long.ends_with(&format!(".{}", owner_tag(UID))));
        let other = snapshot_name(&"n".repeat(63), &"g".repeat(63), &"p".repeat(201), UID).unwrap();
        assert_ne!(long, other);
    }

    /// L2: the worst case for LVM is a name made of '-' (each doubled in the dm name); with the
    /// longest VG name that keeps NAME_BUDGET unchanged, `<vg>-<lv>-cow` stays below 128 bytes.
    #[test]
    fn the_worst_case_dm_name_stays_below_dm_name_len() {
        let worst_label = format!("a{}", "-".repeat(62));
        let worst_pv = format!("a{}", "-".repeat(252));
        let name = snapshot_name(&worst_label, &worst_label, &worst_pv, UID).unwrap();
        assert!(dm_escaped_len(&name) <= NAME_BUDGET, "{name}");
        // The review's realistic name: 110 characters, 130 in a dm name before this fix.
        let real = snapshot_name(
            "team-payments-prod-eu-west-1",
            "orders-db-nightly-2026-11-21-0300",
            "pvc-3f9a8b7c-1d2e-4f5a-8b9c-0d1e2f3a4b5c",
            UID,
        )
        .unwrap();
        for name in [name, real] {
            let vg = "vg-data-0";
            let (budget, lv) = lvm::fit_lv_name(vg, &name).unwrap();
            assert!(budget <= NAME_BUDGET);
            let dm = format!("{}-{}-cow", vg.replace('-', "--"), lv.replace('-', "--"));
            assert!(dm.len() < 128, "{} bytes: {dm}", dm.len());
        }
        // A long VG name shortens further, and a VG name that leaves no room is refused.
        let vg = "v".repeat(60);
        let (_, lv) =
            lvm::fit_lv_name(&vg, &snapshot_name("a", "b", &worst_pv, UID).unwrap()).unwrap();
        assert!(vg.len() + 1 + dm_escaped_len(&lv) + 4 < 128, "{lv}");
        assert!(lvm::fit_lv_name(&"v".repeat(100), "tandem.a.b.c.d").is_err());
    }

    /// L4: inputs are validated, and nothing slices inside a character.
    #[test]
    fn names_refuse_paths_and_non_ascii() {
        for (ns, g, pv) in [
            ("ns", "../../x", "pv"),
            ("ns", "a/b", "pv"),
            ("ns", "g", "../pv"),
            ("ns", "g", "a/b"),
            ("ns", "g", "a..b"),
            ("ns", "g", ".pv"),
            ("n.s", "g", "pv"),
            ("ns", "g.x", "pv"),
            ("ns", "", "pv"),
            ("ns", "g", ""),
            ("ns", "grüße", "pv"),
            ("ns", "g", "pv-é"),
            ("ns", "G", "pv"),
        ] {
            assert!(
                matches!(
                    snapshot_name(ns, g, pv, UID),
                    Err(BackendError::InvalidName { .. })
                ),
                "{ns}/{g}/{pv} accepted"
            );
        }
        for owner in ["", "a/b", "ü", "a b", &"u".repeat(201)] {
            assert!(snapshot_name("ns", "g", "pv", owner).is_err(), "{owner:?}");
        }
        // fit_name never panics on multi-byte input (it is only ever given validated ASCII).
        let cut = fit_name(&format!("{}.deadbeef", "ü".repeat(100)), 40);
        assert!(cut.len() <= 40, "{cut}");
    }

    #[test]
    fn handles_render_without_their_owner() {
        assert_eq!(
            SnapshotHandle::Lvm {
                vg: "vg0".into(),
                lv: "s".into(),
                owner: UID.into(),
            }
            .to_string(),
            "lvm:vg0/s"
        );
        assert_eq!(
            SnapshotHandle::Reflink {
                clone: "/p/.tandem-snapshots/x.img".into(),
                owner: UID.into(),
            }
            .to_string(),
            "reflink:/p/.tandem-snapshots/x.img"
        );
        assert_eq!(
            SnapshotHandle::Btrfs {
                device: "/dev/loop3".into(),
                path: "/.tandem-snapshots/x".into(),
                owner: UID.into(),
                subvolume: Some(SubvolumeId {
                    id: 257,
                    uuid: "u".into()
                }),
            }
            .to_string(),
            "btrfs:/dev/loop3:/.tandem-snapshots/x"
        );
    }

    /// Handles journaled before identities existed still load; their owner is empty, which
    /// matches no mark.
    #[test]
    fn old_journal_handles_load_with_no_owner() {
        let h: SnapshotHandle =
            serde_json::from_str(r#"{"Lvm":{"vg":"vg0","lv":"tandem.ns.g.pv"}}"#).unwrap();
        assert_eq!(h.owner(), "");
        let h: SnapshotHandle = serde_json::from_str(
            r#"{"Btrfs":{"device":"/dev/loop1","path":"/.tandem-snapshots/x"}}"#,
        )
        .unwrap();
        assert!(matches!(
            h,
            SnapshotHandle::Btrfs {
                subvolume: None,
                ..
            }
        ));
    }
}
