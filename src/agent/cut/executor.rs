//! The syscalls of a cut, run in parallel: `syncfs` every target, wait until all have flushed, then
//! FIFREEZE each on its own thread, and thaw in parallel. What runs them is injectable
//! ([`FreezeOps`], [`Spawner`]) so that slow, hung or failing calls can be tested; the kernel
//! implementation is [`KernelOps`].
//!
//! Each freeze thread hands its result to the cut the moment its own FIFREEZE returns (see
//! `Cut::freeze_returned`), so a slow sibling never hides a frozen filesystem from the watchdog.

use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{Scope, ScopedJoinHandle};
use std::time::Instant;

use rustix::io::Errno;
use rustix::ioctl::{Getter, ioctl, opcode};

use crate::agent::discovery::MountInfo;
use crate::agent::freeze::{self, FreezeError, Thawed};
use crate::agent::journal::FsIdentity;

use super::plan::FreezeTarget;

/// The calls a cut makes on a filesystem.
pub trait FreezeOps: Send + Sync {
    /// Opens a mount's root and checks it is still the mount that was resolved.
    fn open(&self, mount: &MountInfo) -> Result<OwnedFd, FreezeError>;
    /// Flushes while writes still flow.
    fn syncfs(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError>;
    /// FIFREEZE.
    fn freeze(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError>;
    /// FITHAW.
    fn thaw(&self, fd: &OwnedFd, path: &Path) -> Result<Thawed, FreezeError>;
    /// Who the filesystem at `path` is (journaled, so recovery thaws only the same one).
    fn identity(&self, path: &Path) -> Option<FsIdentity>;
}

/// The real ioctls.
#[derive(Debug, Default, Clone, Copy)]
pub struct KernelOps;

impl FreezeOps for KernelOps {
    fn open(&self, mount: &MountInfo) -> Result<OwnedFd, FreezeError> {
        let fd = freeze::open_dir(&mount.mount_point)?;
        check_same_mount(&fd, mount)?;
        Ok(fd)
    }
    fn syncfs(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError> {
        freeze::syncfs(fd, path)
    }
    fn freeze(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError> {
        freeze::freeze(fd, path)
    }
    fn thaw(&self, fd: &OwnedFd, path: &Path) -> Result<Thawed, FreezeError> {
        freeze::thaw(fd, path)
    }
    fn identity(&self, path: &Path) -> Option<FsIdentity> {
        let fd = freeze::open_dir(path).ok()?;
        identity_of(&fd)
    }
}

/// The opened directory must be the very mount that was resolved (no swap in between).
fn check_same_mount(fd: &OwnedFd, mount: &MountInfo) -> Result<(), FreezeError> {
    let stx = rustix::fs::statx(
        fd,
        "",
        rustix::fs::AtFlags::EMPTY_PATH,
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|errno| FreezeError::Other {
        what: "statx",
        path: mount.mount_point.clone(),
        errno,
    })?;
    if stx.stx_mnt_id != mount.mount_id {
        return Err(FreezeError::Other {
            what: "mount check (the mount changed since it was resolved)",
            path: mount.mount_point.clone(),
            errno: Errno::STALE,
        });
    }
    Ok(())
}

/// `struct fsuuid2` of `FS_IOC_GETFSUUID` (Linux 6.5+).
#[repr(C)]
#[derive(Clone, Copy)]
struct FsUuid2 {
    len: u8,
    uuid: [u8; 16],
}

/// `_IOR(0x15, 0, struct fsuuid2)`.
const FS_IOC_GETFSUUID: rustix::ioctl::Opcode = opcode::read::<FsUuid2>(0x15, 0);

/// The identity of the filesystem of an open mount root: its uuid if the kernel reports one, and
/// the root directory's device and inode.
pub fn identity_of(fd: &impl AsFd) -> Option<FsIdentity> {
    let st = rustix::fs::fstat(fd).ok()?;
    // SAFETY: FS_IOC_GETFSUUID writes one `struct fsuuid2` (17 bytes) into the buffer Getter owns.
    let uuid = unsafe { ioctl(fd, Getter::<FS_IOC_GETFSUUID, FsUuid2>::new()) }
        .ok()
        .filter(|u| u.len > 0 && usize::from(u.len) <= 16)
        .map(|u| {
            u.uuid[..usize::from(u.len)]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        });
    Some(FsIdentity {
        uuid,
        root_dev: st.st_dev,
        root_ino: st.st_ino,
    })
}

/// Decides, by thread name, whether an injected spawner refuses to start a thread.
type RefuseFn = dyn Fn(&str) -> bool + Send + Sync;

/// Starts threads, or refuses to (for tests of what happens when a thread cannot be created).
#[derive(Clone, Default)]
pub struct Spawner {
    refuse: Option<Arc<RefuseFn>>,
}

impl fmt::Debug for Spawner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spawner")
            .field("injected", &self.refuse.is_some())
            .finish()
    }
}

impl Spawner {
    /// A spawner that fails (as if out of threads) for every thread `refuse(name)` says.
    pub fn refusing(refuse: impl Fn(&str) -> bool + Send + Sync + 'static) -> Self {
        Spawner {
            refuse: Some(Arc::new(refuse)),
        }
    }

    /// `Builder::spawn_scoped`, which reports a failure instead of panicking.
    pub fn scoped<'scope, 'env, T, F>(
        &self,
        scope: &'scope Scope<'scope, 'env>,
        name: &str,
        f: F,
    ) -> std::io::Result<ScopedJoinHandle<'scope, T>>
    where
        F: FnOnce() -> T + Send + 'scope,
        T: Send + 'scope,
    {
        if let Some(refuse) = &self.refuse
            && refuse(name)
        {
            // What the kernel answers when a thread cannot be created.
            return Err(std::io::Error::from_raw_os_error(
                Errno::AGAIN.raw_os_error(),
            ));
        }
        std::thread::Builder::new()
            .name(name.into())
            .spawn_scoped(scope, f)
    }
}

/// Counts down the targets that have flushed (or will never flush), so every freeze starts
/// together; a thread that could not be started is counted down for by the caller, so a failed
/// spawn can never leave the others waiting.
struct AllFlushed {
    remaining: Mutex<usize>,
    zero: Condvar,
}

impl AllFlushed {
    fn new(n: usize) -> Self {
        AllFlushed {
            remaining: Mutex::new(n),
            zero: Condvar::new(),
        }
    }
    fn arrive(&self) {
        let mut r = self.remaining.lock().unwrap_or_else(|p| p.into_inner());
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.zero.notify_all();
        }
    }
    fn arrive_and_wait(&self) {
        self.arrive();
        let mut r = self.remaining.lock().unwrap_or_else(|p| p.into_inner());
        while *r > 0 {
            r = match self.zero.wait(r) {
                Ok(r) => r,
                Err(p) => p.into_inner(),
            };
        }
    }
}

/// What a freeze thread tells the cut about its target.
pub(crate) trait FreezeSink: Sync {
    /// Right before FIFREEZE: whether the cut still takes freezes (an abandoned cut does not).
    fn may_freeze(&self) -> bool;
    /// The target's freeze call has returned (or was never made). On success the cut registers
    /// the fd for thawing at once; if the cut was abandoned meanwhile the sink thaws it right
    /// away. A second report for the same target is ignored.
    fn returned(&self, target: usize, result: Result<(OwnedFd, Instant), NotFrozen>);
}

/// Why a target was not frozen.
#[derive(Debug)]
pub(crate) enum NotFrozen {
    /// The cut was over before this target's FIFREEZE.
    Abandoned,
    /// No thread could be started for it (or it died).
    NoThread(String),
    /// open, the mount check, syncfs or FIFREEZE failed.
    Failed(FreezeError),
}

impl NotFrozen {
    /// Someone else holds a freeze on this filesystem (FIFREEZE answered EBUSY).
    pub fn is_someone_elses(&self) -> bool {
        matches!(self, NotFrozen::Failed(FreezeError::AlreadyFrozen { .. }))
    }
}

impl fmt::Display for NotFrozen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotFrozen::Abandoned => write!(f, "the cut ended before this filesystem was frozen"),
            NotFrozen::NoThread(e) => write!(f, "cannot run a thread to freeze it: {e}"),
            NotFrozen::Failed(e) => write!(f, "{e}"),
        }
    }
}

/// syncfs every target, wait for all, then FIFREEZE every target, each on its own thread. Every
/// result goes to `sink` as soon as its own call returns; this returns once every call has.
pub(crate) fn freeze_all(
    targets: &[FreezeTarget],
    ops: &dyn FreezeOps,
    spawner: &Spawner,
    sink: &dyn FreezeSink,
) {
    if targets.is_empty() {
        return;
    }
    let flushed = AllFlushed::new(targets.len());
    std::thread::scope(|s| {
        let started: Vec<_> = targets
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let flushed = &flushed;
                let spawned = spawner.scoped(s, "tandem-freeze", move || {
                    let path = &t.mount.mount_point;
                    let opened = ops.open(&t.mount).and_then(|fd| {
                        ops.syncfs(&fd, path)?;
                        Ok(fd)
                    });
                    // Everyone flushes first, then everyone freezes: the window is one freeze long.
                    flushed.arrive_and_wait();
                    let result = match opened {
                        Err(e) => Err(NotFrozen::Failed(e)),
                        // Checked right before the call: an abandoned cut freezes nothing more.
                        Ok(_) if !sink.may_freeze() => Err(NotFrozen::Abandoned),
                        Ok(fd) => {
                            let started = Instant::now();
                            ops.freeze(&fd, path)
                                .map(|()| (fd, started))
                                .map_err(NotFrozen::Failed)
                        }
                    };
                    sink.returned(i, result);
                });
                if let Err(e) = &spawned {
                    // Count down for the thread that never ran, so no sibling waits for it.
                    flushed.arrive();
                    sink.returned(i, Err(NotFrozen::NoThread(e.to_string())));
                }
                (i, spawned.ok())
            })
            .collect();
        for (i, handle) in started {
            if let Some(h) = handle
                && h.join().is_err()
            {
                // Ignored if the thread had reported before it died.
                sink.returned(
                    i,
                    Err(NotFrozen::NoThread("the freeze thread panicked".into())),
                );
            }
        }
    })
}

/// Thaws every item in parallel (one thread each; inline when a thread cannot be started) and
/// returns each result in order. `item` gives the fd and the path of an element.
pub(crate) fn thaw_all<I: Sync>(
    items: &[I],
    item: impl Fn(&I) -> (&OwnedFd, &Path) + Sync,
    ops: &dyn FreezeOps,
    spawner: &Spawner,
) -> Vec<Result<Thawed, FreezeError>> {
    if let [only] = items {
        let (fd, path) = item(only);
        return vec![ops.thaw(fd, path)];
    }
    std::thread::scope(|s| {
        let started: Vec<_> = items
            .iter()
            .map(|x| {
                let item = &item;
                spawner
                    .scoped(s, "tandem-thaw", move || {
                        let (fd, path) = item(x);
                        ops.thaw(fd, path)
                    })
                    .map_err(|e| {
                        tracing::warn!(error = %e, "cannot start a thaw thread; thawing inline");
                        x
                    })
            })
            .collect();
        started
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| {
                    Err(FreezeError::Other {
                        what: "FITHAW (the thaw thread panicked)",
                        path: Default::default(),
                        errno: Errno::FAULT,
                    })
                }),
                Err(x) => {
                    let (fd, path) = item(x);
                    ops.thaw(fd, path)
                }
            })
            .collect()
    })
}
