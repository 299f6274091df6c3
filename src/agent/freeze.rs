//! FIFREEZE / FITHAW / syncfs on a mount's root directory, and the guard rails that decide what may
//! be frozen at all.
//!
//! The kernel does not count userspace freezes: one FITHAW undoes any FIFREEZE, and a second
//! FIFREEZE answers EBUSY. The caller keeps track of what it froze (the engine and the journal).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Updater, ioctl, opcode};

use super::discovery::{
    self, DevId, DiscoveryError, MountInfo, NodeLayout, SHARED_FILESYSTEM_ALLOW,
    SHARED_FILESYSTEM_ANNOTATION, Sharing,
};

/// `_IOWR('X', 119, int)`: freeze the filesystem holding the fd.
const FIFREEZE: rustix::ioctl::Opcode = opcode::read_write::<libc_int>(b'X', 119);
/// `_IOWR('X', 120, int)`: thaw it.
const FITHAW: rustix::ioctl::Opcode = opcode::read_write::<libc_int>(b'X', 120);
#[allow(non_camel_case_types)]
type libc_int = std::ffi::c_int;

/// Why a freeze, thaw or flush did not happen.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("cannot open {path}: {errno}")]
    Open { path: PathBuf, errno: Errno },
    #[error("{path} is already frozen (EBUSY): someone else holds a freeze on that filesystem")]
    AlreadyFrozen { path: PathBuf },
    #[error("the filesystem at {path} does not support freezing (EOPNOTSUPP)")]
    Unsupported { path: PathBuf },
    #[error("freezing {path} needs CAP_SYS_ADMIN (EPERM)")]
    NotPermitted { path: PathBuf },
    #[error("{what} of {path} failed: {errno}")]
    Other {
        what: &'static str,
        path: PathBuf,
        errno: Errno,
    },
}

/// The result of a thaw: done, or there was nothing frozen (EINVAL).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Thawed {
    Thawed,
    WasNotFrozen,
}

/// Opens a mount's root directory for the ioctls (read-only, no follow of a final symlink).
pub fn open_dir(path: &Path) -> Result<OwnedFd, FreezeError> {
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .map_err(|errno| FreezeError::Open {
        path: path.into(),
        errno,
    })
}

/// Flushes the filesystem while writes still flow, so the freeze that follows has little left to
/// write and the frozen window stays short.
pub fn syncfs(fd: impl AsFd, path: &Path) -> Result<(), FreezeError> {
    rustix::fs::syncfs(fd).map_err(|errno| FreezeError::Other {
        what: "syncfs",
        path: path.into(),
        errno,
    })
}

/// FIFREEZE on the filesystem of `fd`.
pub fn freeze(fd: impl AsFd, path: &Path) -> Result<(), FreezeError> {
    let mut arg: libc_int = 0;
    // SAFETY: FIFREEZE takes (and ignores) a pointer to an int; `arg` outlives the call.
    let res = unsafe { ioctl(fd, Updater::<FIFREEZE, libc_int>::new(&mut arg)) };
    res.map_err(|errno| match errno {
        Errno::BUSY => FreezeError::AlreadyFrozen { path: path.into() },
        Errno::OPNOTSUPP => FreezeError::Unsupported { path: path.into() },
        Errno::PERM => FreezeError::NotPermitted { path: path.into() },
        errno => FreezeError::Other {
            what: "FIFREEZE",
            path: path.into(),
            errno,
        },
    })
}

/// FITHAW on the filesystem of `fd`. EINVAL (not frozen) is an answer, not an error.
pub fn thaw(fd: impl AsFd, path: &Path) -> Result<Thawed, FreezeError> {
    let mut arg: libc_int = 0;
    // SAFETY: as for FIFREEZE.
    let res = unsafe { ioctl(fd, Updater::<FITHAW, libc_int>::new(&mut arg)) };
    match res {
        Ok(()) => Ok(Thawed::Thawed),
        Err(Errno::INVAL) => Ok(Thawed::WasNotFrozen),
        Err(errno) => Err(FreezeError::Other {
            what: "FITHAW",
            path: path.into(),
            errno,
        }),
    }
}

/// Thaws by path: opens the mount root and thaws.
pub fn thaw_path(path: &Path) -> Result<Thawed, FreezeError> {
    let fd = open_dir(path)?;
    thaw(&fd, path)
}

/// Where the guard rails look for the node's own filesystems (host paths, found under
/// `layout.host_root`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardPaths {
    pub layout: NodeLayout,
    /// Host folders of the container runtime and the logs, whose filesystems are never frozen.
    pub node_dirs: Vec<PathBuf>,
}

impl Default for GuardPaths {
    fn default() -> Self {
        GuardPaths {
            layout: NodeLayout {
                host_root: "/".into(),
                kubelet_dir: "/var/lib/kubelet".into(),
            },
            node_dirs: [
                "/var/lib/containerd",
                "/run/containerd",
                "/var/lib/containers",
                "/run/containers",
                "/var/lib/docker",
                "/var/log",
            ]
            .map(PathBuf::from)
            .to_vec(),
        }
    }
}

/// A filesystem of the node itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeFs {
    /// The host's root filesystem.
    HostRoot,
    /// The agent's own `/` when that is not the host's (the container's root).
    AgentRoot,
    /// The filesystem of the kubelet's directory.
    Kubelet,
    /// The filesystem of a container runtime or log folder.
    NodeDir,
}

/// A filesystem that is never frozen, and the host folder it was found through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Protected {
    pub what: NodeFs,
    /// The host path (not the path under `host_root`).
    pub dir: PathBuf,
    pub superblock: DevId,
}

/// What may never be frozen: the node's own filesystems (host root, kubelet, container runtime,
/// logs, found from the host side) and the filesystem of the agent's state directory (a frozen
/// journal could not record the thaw); and what the sharing check needs to know of the node.
#[derive(Debug, Clone)]
pub struct Guardrails {
    pub protected: Vec<Protected>,
    pub state_dir: PathBuf,
    pub state_dir_fs: DevId,
    pub layout: NodeLayout,
}

/// Why a guard rail refused a freeze.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to freeze {path}: it is on the node's root filesystem (/)")]
    RootFilesystem { path: PathBuf },
    #[error("refusing to freeze {path}: it is on the agent container's own root filesystem")]
    AgentRootFilesystem { path: PathBuf },
    #[error("refusing to freeze {path}: it is on the kubelet's filesystem ({})", dir.display())]
    KubeletFilesystem { path: PathBuf, dir: PathBuf },
    #[error("refusing to freeze {path}: it is on the node's filesystem of {}", dir.display())]
    NodeFilesystem { path: PathBuf, dir: PathBuf },
    #[error(
        "refusing to freeze {path}: it is on the filesystem of the agent's state directory {state_dir}"
    )]
    StateDirFilesystem { path: PathBuf, state_dir: PathBuf },
    #[error(
        "refusing {path}: a shared filesystem ({why}); freezing or snapshotting it would reach other volumes' data. An administrator who accepts that sets the annotation {SHARED_FILESYSTEM_ANNOTATION}: {SHARED_FILESYSTEM_ALLOW} on the PersistentVolume"
    )]
    SharedFilesystem { path: PathBuf, why: Sharing },
}

/// The node's own filesystems, from the mount table: each candidate host folder is looked up under
/// `host_root`, and the agent's own `/` is always protected (it is the host's root when the agent
/// runs on the host). Folders that do not exist are skipped by the caller.
pub fn protected_filesystems(
    mounts: &[MountInfo],
    paths: &GuardPaths,
    exists: impl Fn(&Path) -> bool,
) -> Vec<Protected> {
    let layout = &paths.layout;
    let on_host = layout.host_root == Path::new("/");
    // The agent's own `/` is the host's root on the host, a container's overlay in a pod.
    let own_root_is_host = on_host
        && discovery::mount_containing(Path::new("/"), mounts)
            .is_some_and(|m| m.fs_type != "overlay");
    let mut candidates = vec![(
        if own_root_is_host {
            NodeFs::HostRoot
        } else {
            NodeFs::AgentRoot
        },
        PathBuf::from("/"),
        PathBuf::from("/"),
    )];
    let under_host = |dir: &Path| layout.host_root.join(dir.strip_prefix("/").unwrap_or(dir));
    if !on_host {
        candidates.push((NodeFs::HostRoot, "/".into(), layout.host_root.clone()));
    }
    // The kubelet folder is also mounted at its own path in the DaemonSet.
    candidates.push((
        NodeFs::Kubelet,
        layout.kubelet_dir.clone(),
        layout.kubelet_dir.clone(),
    ));
    if !on_host {
        candidates.push((
            NodeFs::Kubelet,
            layout.kubelet_dir.clone(),
            under_host(&layout.kubelet_dir),
        ));
    }
    for dir in &paths.node_dirs {
        candidates.push((NodeFs::NodeDir, dir.clone(), under_host(dir)));
    }
    let mut protected: Vec<Protected> = Vec::new();
    for (what, dir, seen_at) in candidates {
        if !exists(&seen_at) {
            continue;
        }
        let Some(mount) = discovery::mount_containing(&seen_at, mounts) else {
            continue;
        };
        if !protected.iter().any(|p| p.superblock == mount.dev) {
            protected.push(Protected {
                what,
                dir,
                superblock: mount.dev,
            });
        }
    }
    protected
}

impl Guardrails {
    /// Finds the node's own filesystems and the state directory's filesystem.
    pub fn discover(
        paths: &GuardPaths,
        state_dir: &Path,
        mounts: &[MountInfo],
    ) -> Result<Guardrails, DiscoveryError> {
        // Only the host root is resolved: a symlink below it points into the host's namespace,
        // not the agent's, so those paths are taken as they are.
        let mut resolved = paths.clone();
        if let Ok(real) = std::fs::canonicalize(&paths.layout.host_root) {
            resolved.layout.host_root = real;
        }
        if !resolved.layout.host_root.is_dir() {
            tracing::warn!(host_root = %resolved.layout.host_root.display(), "the host root folder is missing: only the filesystems the agent sees at its own paths are guarded");
        }
        let protected = protected_filesystems(mounts, &resolved, |p| p.exists());
        for p in &protected {
            tracing::info!(what = ?p.what, dir = %p.dir.display(), superblock = %p.superblock, "never freezing this filesystem");
        }
        Ok(Guardrails {
            protected,
            state_dir: state_dir.into(),
            state_dir_fs: discovery::superblock_of(state_dir, mounts)?,
            layout: resolved.layout,
        })
    }

    /// Checks a freeze target by its superblock device.
    pub fn check(&self, path: &Path, superblock: DevId) -> Result<(), Refusal> {
        if let Some(p) = self.protected.iter().find(|p| p.superblock == superblock) {
            let path = path.to_path_buf();
            return Err(match p.what {
                NodeFs::HostRoot => Refusal::RootFilesystem { path },
                NodeFs::AgentRoot => Refusal::AgentRootFilesystem { path },
                NodeFs::Kubelet => Refusal::KubeletFilesystem {
                    path,
                    dir: p.dir.clone(),
                },
                NodeFs::NodeDir => Refusal::NodeFilesystem {
                    path,
                    dir: p.dir.clone(),
                },
            });
        }
        if superblock == self.state_dir_fs {
            return Err(Refusal::StateDirFilesystem {
                path: path.into(),
                state_dir: self.state_dir.clone(),
            });
        }
        Ok(())
    }

    /// Checks a filesystem volume: the node's own filesystems first, then that the filesystem is
    /// the volume's own, unless its PersistentVolume allows a shared one.
    pub fn check_volume(
        &self,
        path: &Path,
        mount: &MountInfo,
        mounts: &[MountInfo],
        persistent_volume: &str,
        allow_shared_filesystem: bool,
    ) -> Result<(), Refusal> {
        self.check(path, mount.dev)?;
        if allow_shared_filesystem {
            return Ok(());
        }
        match discovery::sharing(mount, mounts, &self.layout, persistent_volume) {
            Some(why) => Err(Refusal::SharedFilesystem {
                path: path.into(),
                why,
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::discovery::parse_mountinfo;

    fn paths(host_root: &str) -> GuardPaths {
        let mut paths = GuardPaths::default();
        paths.layout.host_root = host_root.into();
        paths
    }

    fn guardrails(table: &str, host_root: &str) -> (Guardrails, Vec<MountInfo>) {
        let mounts = parse_mountinfo(table).unwrap();
        let paths = paths(host_root);
        let guard = Guardrails {
            protected: protected_filesystems(&mounts, &paths, |_| true),
            state_dir: "/var/lib/tandem".into(),
            state_dir_fs: DevId {
                major: 254,
                minor: 99,
            },
            layout: paths.layout,
        };
        (guard, mounts)
    }

    fn check_at(guard: &Guardrails, mounts: &[MountInfo], at: &str) -> Result<(), Refusal> {
        let mount = mounts
            .iter()
            .find(|m| m.mount_point == Path::new(at))
            .unwrap_or_else(|| panic!("no mount at {at}"));
        guard.check_volume(Path::new(at), mount, mounts, "pv-1", false)
    }

    /// The review's case: in the DaemonSet `/` is the container's overlay, and the host's root
    /// filesystem shows up only as the agent's hostPath mounts.
    #[test]
    fn in_a_container_without_the_host_root_the_kubelet_filesystem_is_still_refused() {
        let (guard, mounts) = guardrails(
            "1 0 0:50 / / rw - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w\n\
             2 1 254:1 /var/lib/kubelet /var/lib/kubelet rw - ext4 /dev/vda1 rw\n\
             3 1 254:1 /mnt/disks /mnt/disks rw - ext4 /dev/vda1 rw\n\
             4 3 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n",
            "/",
        );
        assert_eq!(
            check_at(&guard, &mounts, "/var/lib/kubelet"),
            Err(Refusal::KubeletFilesystem {
                path: "/var/lib/kubelet".into(),
                dir: "/var/lib/kubelet".into()
            })
        );
        // Any other bind of the same host filesystem is refused as the kubelet's too.
        assert!(matches!(
            check_at(&guard, &mounts, "/mnt/disks"),
            Err(Refusal::KubeletFilesystem { .. })
        ));
        // The overlay is the agent's own root, not the node's.
        assert_eq!(
            check_at(&guard, &mounts, "/"),
            Err(Refusal::AgentRootFilesystem { path: "/".into() })
        );
        assert_eq!(check_at(&guard, &mounts, "/mnt/disks/vol1"), Ok(()));
    }

    #[test]
    fn through_the_host_root_every_node_filesystem_is_refused() {
        let (guard, mounts) = guardrails(
            "1 0 0:50 / / rw - overlay overlay rw\n\
             2 1 254:1 / /host ro - ext4 /dev/vda1 rw\n\
             3 2 254:2 / /host/var/lib/kubelet rw - xfs /dev/vdb rw\n\
             4 2 254:3 / /host/var/lib/containerd rw - xfs /dev/vdc rw\n\
             5 2 0:25 / /host/run rw - tmpfs tmpfs rw\n\
             6 2 254:4 / /host/var/log rw - ext4 /dev/vdd rw\n\
             7 1 254:2 / /var/lib/kubelet rw - xfs /dev/vdb rw\n\
             8 1 254:1 /var/lib/tandem /var/lib/tandem rw - ext4 /dev/vda1 rw\n\
             10 1 254:1 /srv/pv /srv/pv rw - ext4 /dev/vda1 rw\n\
             11 1 254:3 /io.containerd.snapshotter.v1.overlayfs /srv/pv-runtime rw - xfs /dev/vdc rw\n\
             12 1 254:4 /pods /srv/pv-logs rw - ext4 /dev/vdd rw\n\
             13 1 0:25 /containerd /srv/pv-run rw - tmpfs tmpfs rw\n\
             14 1 7:1 / /srv/vol1 rw - ext4 /dev/loop1 rw\n",
            "/host",
        );
        let refused = |at: &str| check_at(&guard, &mounts, at).unwrap_err().to_string();
        assert!(refused("/srv/pv").contains("node's root filesystem"));
        assert!(refused("/host").contains("node's root filesystem"));
        assert!(refused("/var/lib/kubelet").contains("kubelet's filesystem"));
        assert!(refused("/srv/pv-runtime").contains("/var/lib/containerd"));
        assert!(refused("/srv/pv-logs").contains("/var/log"));
        assert!(refused("/srv/pv-run").contains("/run/containerd"));
        assert!(refused("/").contains("agent container's own root"));
        assert_eq!(check_at(&guard, &mounts, "/srv/vol1"), Ok(()));
    }

    #[test]
    fn on_the_host_its_root_is_the_node_root_and_missing_folders_are_skipped() {
        let mounts = parse_mountinfo(
            "1 0 254:1 / / rw - ext4 /dev/vda1 rw\n\
             2 1 254:2 / /var/log rw - ext4 /dev/vdb rw\n",
        )
        .unwrap();
        let found = protected_filesystems(&mounts, &paths("/"), |p| p != Path::new("/var/log"));
        assert_eq!(
            found,
            vec![Protected {
                what: NodeFs::HostRoot,
                dir: "/".into(),
                superblock: DevId {
                    major: 254,
                    minor: 1
                }
            }]
        );
    }

    #[test]
    fn the_annotation_allows_a_shared_filesystem_but_never_a_node_filesystem() {
        let (guard, mounts) = guardrails(
            "1 0 254:1 / / rw - ext4 /dev/vda1 rw\n\
             2 1 254:1 /srv /srv/pv rw - ext4 /dev/vda1 rw\n\
             3 1 7:1 / /mnt/disk rw - ext4 /dev/loop1 rw\n\
             4 1 7:1 /a /mnt/m1 rw - ext4 /dev/loop1 rw\n",
            "/",
        );
        let with_allow = |at: &str, allow: bool| {
            let mount = mounts
                .iter()
                .find(|m| m.mount_point == Path::new(at))
                .unwrap();
            guard.check_volume(Path::new(at), mount, &mounts, "pv-1", allow)
        };
        let refused = with_allow("/mnt/m1", false).unwrap_err();
        assert!(
            refused.to_string().contains("shared filesystem"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains(SHARED_FILESYSTEM_ANNOTATION),
            "{refused}"
        );
        assert_eq!(with_allow("/mnt/m1", true), Ok(()));
        assert!(with_allow("/mnt/disk", false).is_err());
        assert_eq!(with_allow("/mnt/disk", true), Ok(()));
        assert!(matches!(
            with_allow("/srv/pv", true),
            Err(Refusal::RootFilesystem { .. })
        ));
    }
}
