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
//!
//! Where things are:
//! - reflink: `<pool>/.tandem-restores/<name>.img` (FICLONE needs the snapshot's filesystem), made
//!   as a marked `.partial` and renamed without replacing; fsynced; a loop device without autoclear
//!   (found again by the image's device and inode, never by path); the link `<link dir>/<pv>`.
//! - LVM: `<vg>/<name>` tagged `tandem-restore` and `tandem-owner-<uid>`, every command scoped to
//!   the VG's devices ([`lvm::VgScope`]). Thin: `lvcreate -s -kn` of the member snapshot, which the
//!   clone does not depend on afterwards. Thick: a plain LV of the snapshot's size, copied in
//!   process (O_DIRECT, 4 MiB at a time, fdatasync); a failed copy removes the LV.
//! - btrfs: `<top level>/.tandem-restores/<name>/volume` (a writable snapshot), the directory and the
//!   subvolume both marked; the directory (exactly the one opened: `open_tree` + `move_mount`) is
//!   bind-mounted at `<mount dir>/<pv>`, nosuid and nodev, and the PV path is `<mount dir>/<pv>/volume`.
//!
//! The filesystem inside a block clone is read from its superblock ([`detect_filesystem`]: XFS,
//! ext2/3/4, btrfs), so the agent needs neither blkid nor the member's recorded type; a PV of an
//! XFS clone needs `nouuid` when it is mounted beside its origin (same filesystem uuid).

use std::os::fd::AsFd;
use std::path::PathBuf;

use crate::api::CloneMethod;

use super::{
    BackendError, BackendKind, BackendOptions, Deleted, NAME_BUDGET, SnapshotHandle, btrfs,
    check_label, check_owner, check_subdomain, fit_name, lvm, owner_tag, reflink,
};

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
    /// The filesystem in the clone, read from its superblock (`xfs`, `ext4`, `ext3`, `ext2`,
    /// `btrfs`; None when none of them): what a block PV's `local.fsType` names.
    pub filesystem: Option<String>,
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

/// The name of the clone of restore `owner` for the PV `pv`:
/// `tandem-r.<namespace>.<pv>.<8 hex of sha256(owner)>`, shortened to `budget` like snapshot names.
pub fn clone_name(
    namespace: &str,
    pv: &str,
    owner: &str,
    budget: usize,
) -> Result<String, BackendError> {
    check_label("namespace", namespace)?;
    check_subdomain("persistent volume", pv)?;
    check_owner(owner)?;
    Ok(fit_name(
        &format!("tandem-r.{namespace}.{pv}.{}", owner_tag(owner)),
        budget,
    ))
}

/// Plans the clone of `snapshot` for the PV `pv` of restore `owner` (the NodeRestore uid), named
/// `tandem-r.<namespace>.<pv>.<owner hash>` beside the snapshot. For an LVM snapshot this asks LVM
/// whether it is thin or thick (its segment type); the other backends plan without I/O.
pub fn plan(
    snapshot: &SnapshotHandle,
    namespace: &str,
    pv: &str,
    owner: &str,
    options: &CloneOptions,
) -> Result<ClonePlan, BackendError> {
    let name = clone_name(namespace, pv, owner, NAME_BUDGET)?;
    let (backend, handle) = match snapshot {
        SnapshotHandle::Reflink { clone, .. } => (
            BackendKind::Reflink,
            CloneHandle::Reflink {
                image: reflink::restore_image(clone, &name)?,
                link: options.link_dir.join(pv),
                owner: owner.into(),
            },
        ),
        SnapshotHandle::Lvm { vg, lv, .. } => {
            let (_, name) = lvm::fit_lv_name(vg, &name)?;
            (
                lvm::snapshot_kind(vg, lv)?,
                CloneHandle::Lvm {
                    vg: vg.clone(),
                    lv: name,
                    owner: owner.into(),
                },
            )
        }
        SnapshotHandle::Btrfs { device, .. } => (
            BackendKind::Btrfs,
            CloneHandle::Btrfs {
                device: device.clone(),
                path: format!("/{}/{name}", btrfs::RESTORE_DIR),
                mount: options.mount_dir.join(pv),
                owner: owner.into(),
            },
        ),
        // A new image from a member of an RBD group snapshot is made in the cluster, by the
        // controller: no node holds anything to clone.
        SnapshotHandle::RbdGroup { .. } => {
            return Err(BackendError::Unsupported {
                device: PathBuf::from(snapshot.to_string()),
                why: "an RBD member is restored in the cluster (a new image copied from the group snapshot), not by a node's agent".into(),
            });
        }
    };
    Ok(ClonePlan {
        backend,
        snapshot: snapshot.clone(),
        handle,
    })
}

fn mismatch(plan: &ClonePlan) -> BackendError {
    BackendError::Parse {
        command: "clone plan".into(),
        why: format!(
            "the {} clone {} does not fit the snapshot {}",
            plan.backend.name(),
            plan.handle,
            plan.snapshot
        ),
    }
}

/// Checks the snapshot's owner mark, makes the clone, marks it and attaches it. Something already at
/// the clone's place is [`BackendError::AlreadyExists`]; a failed clone removes what it half-made.
/// `progress` is called during a `Copy` (lvm-thick) with the bytes copied and the total.
pub fn create(
    plan: &ClonePlan,
    options: &CloneOptions,
    progress: Progress<'_>,
) -> Result<CloneInfo, BackendError> {
    check_owner(plan.handle.owner())?;
    match (&plan.snapshot, &plan.handle, plan.backend) {
        (
            SnapshotHandle::Reflink {
                clone: snapshot,
                owner: snapshot_owner,
            },
            CloneHandle::Reflink { image, link, owner },
            BackendKind::Reflink,
        ) => reflink::clone_create(snapshot, snapshot_owner, image, link, owner),
        (
            SnapshotHandle::Lvm {
                vg,
                lv: snapshot,
                owner: snapshot_owner,
            },
            CloneHandle::Lvm {
                vg: clone_vg,
                lv,
                owner,
            },
            backend @ (BackendKind::LvmThin | BackendKind::LvmThick),
        ) if vg == clone_vg => {
            lvm::clone_create(vg, snapshot, snapshot_owner, lv, owner, backend, progress)
        }
        (
            SnapshotHandle::Btrfs {
                device,
                path: snapshot,
                owner: snapshot_owner,
                subvolume,
            },
            CloneHandle::Btrfs {
                device: clone_device,
                path,
                mount,
                owner,
            },
            BackendKind::Btrfs,
        ) if device == clone_device => btrfs::clone_create(
            device,
            (snapshot, snapshot_owner, subvolume.as_ref()),
            path,
            mount,
            owner,
            &options.backend,
        ),
        _ => Err(mismatch(plan)),
    }
}

/// Re-creates what a reboot removes (loop device and link, LV activation, bind mount); idempotent.
pub fn attach(handle: &CloneHandle, options: &CloneOptions) -> Result<CloneInfo, BackendError> {
    match handle {
        CloneHandle::Reflink { image, link, owner } => reflink::clone_attach(image, link, owner),
        CloneHandle::Lvm { vg, lv, owner } => lvm::clone_attach(vg, lv, owner),
        CloneHandle::Btrfs {
            device,
            path,
            mount,
            owner,
        } => btrfs::clone_attach(device, path, mount, owner, &options.backend),
    }
}

/// Detaches and deletes a clone after checking its owner mark ([`BackendError::NotOurs`] otherwise);
/// a clone that is not there is [`Deleted::Absent`].
pub fn delete(handle: &CloneHandle, options: &CloneOptions) -> Result<Deleted, BackendError> {
    match handle {
        CloneHandle::Reflink { image, link, owner } => reflink::clone_delete(image, link, owner),
        CloneHandle::Lvm { vg, lv, owner } => lvm::clone_delete(vg, lv, owner),
        CloneHandle::Btrfs {
            device,
            path,
            mount,
            owner,
        } => btrfs::clone_delete(device, path, mount, owner, &options.backend),
    }
}

impl CloneHandle {
    /// The restore that owns the clone (the NodeRestore uid).
    pub fn owner(&self) -> &str {
        match self {
            CloneHandle::Reflink { owner, .. }
            | CloneHandle::Lvm { owner, .. }
            | CloneHandle::Btrfs { owner, .. } => owner,
        }
    }
}

/// The filesystem a superblock names, from the first 64 KiB + 4 KiB of a device or image
/// (`xfs`, `ext4`/`ext3`/`ext2`, `btrfs`); None for anything else. Pure.
pub fn filesystem_of(head: &[u8], btrfs_sb: &[u8]) -> Option<&'static str> {
    if head.get(..4) == Some(b"XFSB") {
        return Some("xfs");
    }
    // ext2/3/4: the superblock at 1024, s_magic 0xEF53 at 56; feature words at 92 (compat),
    // 96 (incompat), 100 (ro_compat).
    let word = |off: usize| -> Option<u32> {
        head.get(1024 + off..1024 + off + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(1024 + 56..1024 + 58) == Some(&[0x53, 0xEF]) {
        let compat = word(92).unwrap_or(0);
        let incompat = word(96).unwrap_or(0);
        let ro_compat = word(100).unwrap_or(0);
        // extents, 64bit, flex_bg, huge_file, dir_nlink, extra_isize: ext4 only.
        let ext4 = incompat & (0x40 | 0x80 | 0x200) != 0 || ro_compat & (0x8 | 0x20 | 0x40) != 0;
        return Some(if ext4 {
            "ext4"
        } else if compat & 0x4 != 0 {
            "ext3"
        } else {
            "ext2"
        });
    }
    // btrfs: the superblock at 64 KiB, magic "_BHRfS_M" at 0x40 in it.
    if btrfs_sb.get(0x40..0x48) == Some(b"_BHRfS_M") {
        return Some("btrfs");
    }
    None
}

/// Reads the superblocks of the device or image open at `fd` and names its filesystem.
pub fn detect_filesystem(fd: impl AsFd) -> Option<String> {
    let fd = fd.as_fd();
    let mut head = vec![0u8; 4096];
    let mut btrfs_sb = vec![0u8; 4096];
    let n = rustix::io::pread(fd, &mut head[..], 0).ok()?;
    head.truncate(n);
    let m = rustix::io::pread(fd, &mut btrfs_sb[..], 64 << 10).unwrap_or(0);
    btrfs_sb.truncate(m);
    filesystem_of(&head, &btrfs_sb).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9c8d7e-6f5a-4b3c-2d1e-0f9a8b7c6d5e";

    fn options() -> CloneOptions {
        CloneOptions {
            backend: BackendOptions {
                thick_cow_size: "1G".into(),
                btrfs_mount_dir: "/var/lib/tandem/btrfs".into(),
            },
            link_dir: "/dev/tandem".into(),
            mount_dir: "/var/lib/kubelet/plugins/tandem.dev/restores".into(),
        }
    }

    #[test]
    fn clone_names_carry_namespace_pv_and_owner() {
        let name = clone_name("shop", "tandem-0123456789", UID, NAME_BUDGET).unwrap();
        assert!(
            name.starts_with("tandem-r.shop.tandem-0123456789."),
            "{name}"
        );
        let tag = name.rsplit('.').next().unwrap();
        assert_eq!(tag, owner_tag(UID));
        assert_ne!(
            name,
            clone_name("shop", "tandem-0123456789", "other", NAME_BUDGET).unwrap()
        );
        for (ns, pv) in [("a/b", "pv"), ("ns", "../x"), ("ns", "a/b"), ("N", "pv")] {
            assert!(clone_name(ns, pv, UID, NAME_BUDGET).is_err(), "{ns} {pv}");
        }
        assert!(clone_name("ns", "pv", "a/b", NAME_BUDGET).is_err());
        let long = clone_name(&"n".repeat(63), &"p".repeat(253), UID, NAME_BUDGET).unwrap();
        assert!(super::super::dm_escaped_len(&long) <= NAME_BUDGET, "{long}");
    }

    #[test]
    fn reflink_and_btrfs_plans_place_the_clone_beside_the_snapshot() {
        let snap = SnapshotHandle::Reflink {
            clone: "/pool/.tandem-snapshots/tandem.ns.g.pv.01234567.img".into(),
            owner: "cut".into(),
        };
        let p = plan(&snap, "ns", "tandem-abc", UID, &options()).unwrap();
        assert_eq!(p.backend, BackendKind::Reflink);
        let CloneHandle::Reflink { image, link, owner } = &p.handle else {
            panic!("{:?}", p.handle)
        };
        let name = clone_name("ns", "tandem-abc", UID, NAME_BUDGET).unwrap();
        assert_eq!(
            image,
            &PathBuf::from(format!("/pool/.tandem-restores/{name}.img"))
        );
        assert_eq!(link, &PathBuf::from("/dev/tandem/tandem-abc"));
        assert_eq!(owner, UID);
        let bad = SnapshotHandle::Reflink {
            clone: "/pool/elsewhere/x.img".into(),
            owner: "cut".into(),
        };
        assert!(plan(&bad, "ns", "pv", UID, &options()).is_err());

        let snap = SnapshotHandle::Btrfs {
            device: "/dev/loop3".into(),
            path: "/.tandem-snapshots/tandem.ns.g.pv.01234567".into(),
            owner: "cut".into(),
            subvolume: None,
        };
        let p = plan(&snap, "ns", "tandem-abc", UID, &options()).unwrap();
        assert_eq!(
            p.handle,
            CloneHandle::Btrfs {
                device: "/dev/loop3".into(),
                path: format!("/.tandem-restores/{name}"),
                mount: "/var/lib/kubelet/plugins/tandem.dev/restores/tandem-abc".into(),
                owner: UID.into(),
            }
        );
        // A plan whose parts do not belong together is refused before anything is touched.
        let mut odd = p.clone();
        odd.backend = BackendKind::Reflink;
        assert!(matches!(
            create(&odd, &options(), &mut |_, _| {}),
            Err(BackendError::Parse { .. })
        ));
    }

    #[test]
    fn reads_filesystems_from_their_superblocks() {
        let mut head = vec![0u8; 4096];
        assert_eq!(filesystem_of(&head, &[]), None);
        head[..4].copy_from_slice(b"XFSB");
        assert_eq!(filesystem_of(&head, &[]), Some("xfs"));
        let mut ext = vec![0u8; 4096];
        ext[1024 + 56] = 0x53;
        ext[1024 + 57] = 0xEF;
        assert_eq!(filesystem_of(&ext, &[]), Some("ext2"));
        ext[1024 + 92] = 0x4;
        assert_eq!(filesystem_of(&ext, &[]), Some("ext3"));
        ext[1024 + 96] = 0x40;
        assert_eq!(filesystem_of(&ext, &[]), Some("ext4"));
        let mut sb = vec![0u8; 4096];
        sb[0x40..0x48].copy_from_slice(b"_BHRfS_M");
        assert_eq!(filesystem_of(&[0u8; 100], &sb), Some("btrfs"));
        // Short reads never panic.
        assert_eq!(filesystem_of(&[], &[]), None);
        assert_eq!(filesystem_of(&head[..2], &sb[..10]), None);
    }
}
