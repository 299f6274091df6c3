//! Loop devices for reflink clones: attached without autoclear (a clone outlives the agent),
//! allocated atomically (LOOP_CTL_GET_FREE, then LOOP_CONFIGURE, retried when another process took
//! the same number in between), found again by their backing file's device and inode (never by a
//! path), and detached only when nothing holds them open exclusively (a mount does).

use std::ffi::c_void;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, NoArg, Opcode, Setter, ioctl};

use super::BackendError;
use super::reflink::{LoopInfo64, loop_backing};

/// Old-style (not _IO-encoded) loop ioctls of <linux/loop.h>.
const LOOP_CLR_FD: Opcode = 0x4C01;
const LOOP_CONFIGURE: Opcode = 0x4C0A;
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;

/// How often an allocation is retried when another process configured the free device first.
const ATTACH_ATTEMPTS: usize = 20;

/// `struct loop_config` of <linux/loop.h>.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// LOOP_CTL_GET_FREE returns the number of a free loop device (creating one if needed).
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and returns the device number as the ioctl's value.
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| Errno::RANGE)
    }
}

fn errno(what: impl Into<String>) -> impl FnOnce(Errno) -> BackendError {
    let what = what.into();
    move |e| BackendError::Io {
        what,
        source: e.into(),
    }
}

/// The (major, minor, inode) of an open file, as a loop device's status reports its backing file.
pub fn file_id(fd: impl AsFd, what: &Path) -> Result<(u32, u32, u64), BackendError> {
    let st = rustix::fs::fstat(fd).map_err(errno(format!("stat {}", what.display())))?;
    Ok((
        rustix::fs::major(st.st_dev),
        rustix::fs::minor(st.st_dev),
        st.st_ino,
    ))
}

/// Every loop device whose backing file is `id` (normally none or one).
pub fn find(id: (u32, u32, u64)) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            // Only attached loop devices have loop/backing_file.
            (name.starts_with("loop") && e.path().join("loop/backing_file").exists())
                .then(|| PathBuf::from("/dev").join(name))
        })
        .filter(|dev| loop_backing(dev).is_ok_and(|b| b == id))
        .collect();
    found.sort();
    found
}

/// Attaches the open file `file` (read-write) to a free loop device and returns the device.
pub fn attach(file: &OwnedFd, what: &Path) -> Result<PathBuf, BackendError> {
    let control = rustix::fs::open(
        "/dev/loop-control",
        OFlags::RDWR | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(errno("open /dev/loop-control"))?;
    let fd =
        u32::try_from(std::os::fd::AsRawFd::as_raw_fd(file)).map_err(|_| BackendError::Io {
            what: format!("attach {}", what.display()),
            source: std::io::Error::other("negative file descriptor"),
        })?;
    let mut last = Errno::BUSY;
    for _ in 0..ATTACH_ATTEMPTS {
        // SAFETY: GetFree mirrors LOOP_CTL_GET_FREE (no argument, the number as the result).
        let number = unsafe { ioctl(&control, GetFree) }.map_err(errno("LOOP_CTL_GET_FREE"))?;
        let device = PathBuf::from(format!("/dev/loop{number}"));
        let dev_fd = match rustix::fs::open(&device, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        {
            Ok(fd) => fd,
            // The node may appear a moment after the kernel made the device.
            Err(Errno::NOENT) => {
                last = Errno::NOENT;
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(errno(format!("open {}", device.display()))(e)),
        };
        let mut info: LoopInfo64 = LoopInfo64::zeroed();
        let shown = what.as_os_str().as_encoded_bytes();
        let n = shown.len().min(info.lo_file_name.len() - 1);
        info.lo_file_name[..n].copy_from_slice(&shown[..n]);
        let config = LoopConfig {
            fd,
            block_size: 0,
            info,
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads a struct loop_config, which LoopConfig mirrors; `file` stays
        // open for the call.
        match unsafe { ioctl(&dev_fd, Setter::<LOOP_CONFIGURE, LoopConfig>::new(config)) } {
            Ok(()) => return Ok(device),
            // Another process configured this device between GET_FREE and CONFIGURE.
            Err(Errno::BUSY) => last = Errno::BUSY,
            Err(e) => {
                return Err(errno(format!(
                    "LOOP_CONFIGURE {} with {}",
                    device.display(),
                    what.display()
                ))(e));
            }
        }
    }
    Err(errno(format!(
        "attach {} to a loop device ({ATTACH_ATTEMPTS} attempts)",
        what.display()
    ))(last))
}

/// Detaches a loop device, unless something holds it exclusively (a mount): then it is in use and
/// [`BackendError::Io`] with EBUSY says so.
pub fn detach(device: &Path) -> Result<(), BackendError> {
    let fd = match rustix::fs::open(
        device,
        OFlags::RDONLY | OFlags::EXCL | OFlags::CLOEXEC | OFlags::NONBLOCK,
        Mode::empty(),
    ) {
        Ok(fd) => fd,
        Err(Errno::NOENT | Errno::NXIO) => return Ok(()),
        Err(Errno::BUSY) => {
            return Err(BackendError::Io {
                what: format!(
                    "detach {}: it is in use (mounted or held open exclusively)",
                    device.display()
                ),
                source: Errno::BUSY.into(),
            });
        }
        Err(e) => return Err(errno(format!("open {}", device.display()))(e)),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    match unsafe { ioctl(&fd, NoArg::<LOOP_CLR_FD>::new()) } {
        // ENXIO: not attached any more.
        Ok(()) | Err(Errno::NXIO) => Ok(()),
        Err(e) => Err(errno(format!("LOOP_CLR_FD {}", device.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loop_config_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }
}
