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

use super::discovery::DevId;

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

/// What may never be frozen: the node's root filesystem and the filesystem of the agent's own state
/// directory (a frozen journal could not record the thaw).
#[derive(Debug, Clone)]
pub struct Guardrails {
    pub root_fs: DevId,
    pub state_dir: PathBuf,
    pub state_dir_fs: DevId,
}

/// Why a guard rail refused a freeze.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refusing to freeze {path}: it is on the node's root filesystem (/)")]
    RootFilesystem { path: PathBuf },
    #[error(
        "refusing to freeze {path}: it is on the filesystem of the agent's state directory {state_dir}"
    )]
    StateDirFilesystem { path: PathBuf, state_dir: PathBuf },
}

impl Guardrails {
    /// Checks a freeze target by its superblock device.
    pub fn check(&self, path: &Path, superblock: DevId) -> Result<(), Refusal> {
        if superblock == self.root_fs {
            return Err(Refusal::RootFilesystem { path: path.into() });
        }
        if superblock == self.state_dir_fs {
            return Err(Refusal::StateDirFilesystem {
                path: path.into(),
                state_dir: self.state_dir.clone(),
            });
        }
        Ok(())
    }
}
