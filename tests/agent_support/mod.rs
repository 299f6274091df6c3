//! Helpers for the agent's root tests: scratch images, loop devices, filesystems and mounts that a
//! test makes itself and that are always removed (thawed first, then unmounted, inner loop devices
//! before the filesystem holding their images), even when the test fails.
#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Whether this process may make loop devices and mount (CI runs as root).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Returns early from a test with a message when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !agent_support::is_root() {
            eprintln!("SKIPPED: this test needs root (loop devices, mounts, FIFREEZE)");
            return;
        }
    };
}

/// Runs a command, panicking with its stderr on failure; returns stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command and returns its exit code and combined output.
pub fn sh_status(program: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

enum Made {
    Loop(String),
    /// A mount, and the loop device made for it when an image file was mounted.
    Mount(PathBuf, Option<String>),
}

/// A scratch area under /var/tmp with everything it made, undone in reverse order on drop.
pub struct Scratch {
    made: Vec<Made>,
    pub dir: tempfile::TempDir,
}

/// A loop-backed volume filesystem made by a test.
#[derive(Debug, Clone)]
pub struct Volume {
    pub image: PathBuf,
    pub device: String,
    pub mount: PathBuf,
    pub fs: String,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("tandem-agent-test-")
            .tempdir_in("/var/tmp")
            .expect("tempdir");
        Scratch {
            made: Vec::new(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A sparse image file.
    pub fn image(&self, path: &Path, size: u64) {
        let f = fs::File::create(path).expect("create image");
        f.set_len(size).expect("size image");
    }

    /// Attaches an image to a free loop device (allocated atomically by losetup; retried when
    /// another test raced for the same number), detached on drop.
    pub fn attach(&mut self, image: &Path, read_only: bool) -> String {
        let dev = attach_loop(image, read_only);
        self.made.push(Made::Loop(dev.clone()));
        dev
    }

    /// Detaches a loop device made here (before drop).
    pub fn detach(&mut self, dev: &str) {
        if let Some(pos) = self
            .made
            .iter()
            .position(|m| matches!(m, Made::Loop(d) if d == dev))
        {
            self.made.remove(pos);
            sh("losetup", &["-d", dev]);
        }
    }

    pub fn mkfs(&self, dev: &str, fs: &str) {
        match fs {
            "xfs" => sh("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", dev]),
            "ext4" => sh("mkfs.ext4", &["-q", "-F", dev]),
            "btrfs" => sh("mkfs.btrfs", &["-q", "-f", dev]),
            other => panic!("no mkfs for {other}"),
        };
    }

    /// Mounts `dev` on `dir`. An image file is attached to a loop device of its own first
    /// (read-only for an `ro` mount) and detached with the mount: left to mount(8), the
    /// auto-cleared loop device of an earlier mount of the same file can still be releasing,
    /// and a second mount with other flags then fails with "already mounted".
    pub fn mount(&mut self, dev: &str, dir: &Path, options: &[&str]) {
        fs::create_dir_all(dir).expect("mount dir");
        let is_image =
            !options.contains(&"bind") && fs::metadata(dev).map(|m| m.is_file()).unwrap_or(false);
        // The mount owns this loop device: it is detached after the unmount.
        let image_loop = is_image.then(|| attach_loop(Path::new(dev), options.contains(&"ro")));
        let source = image_loop.as_deref().unwrap_or(dev);
        let d = dir.to_string_lossy().into_owned();
        let joined = options.join(",");
        let mut args: Vec<&str> = Vec::new();
        if !options.is_empty() {
            args.push("-o");
            args.push(&joined);
        }
        args.push(source);
        args.push(&d);
        let (code, out) = sh_status("mount", &args);
        if code != 0 {
            if let Some(l) = &image_loop {
                let _ = sh_status("losetup", &["-d", l]);
            }
            panic!("mount {} failed: {out}", args.join(" "));
        }
        self.made.push(Made::Mount(dir.to_path_buf(), image_loop));
    }

    /// Unmounts a mount made here (before drop), thawing it first.
    pub fn unmount(&mut self, dir: &Path) {
        if let Some(pos) = self
            .made
            .iter()
            .position(|m| matches!(m, Made::Mount(d, _) if d == dir))
            && let Made::Mount(dir, image_loop) = self.made.remove(pos)
        {
            undo_mount(&dir, image_loop.as_deref());
        }
    }

    /// A reflink pool: an XFS (reflink=1) or btrfs filesystem on a loop device.
    pub fn pool(&mut self, fs: &str) -> PathBuf {
        let img = self.path(&format!("pool-{fs}.img"));
        self.image(&img, 4 << 30);
        let dev = self.attach(&img, false);
        self.mkfs(&dev, fs);
        let mnt = self.path(&format!("pool-{fs}"));
        self.mount(&dev, &mnt, &[]);
        mnt
    }

    /// A volume: an image in `pool`, on a loop device, formatted and mounted.
    pub fn volume(&mut self, pool: &Path, name: &str, fs: &str, size: u64) -> Volume {
        let image = pool.join(format!("{name}.img"));
        // mkfs.xfs wants at least 300 MB.
        let size = if fs == "xfs" {
            size.max(320 << 20)
        } else {
            size
        };
        self.image(&image, size);
        let device = self.attach(&image, false);
        self.mkfs(&device, fs);
        let mount = self.path(&format!("vol-{name}"));
        self.mount(&device, &mount, &[]);
        Volume {
            image,
            device,
            mount,
            fs: fs.into(),
        }
    }

    /// Asserts that `mount` is a mount of a loop device this scratch made: the only kind of
    /// filesystem a test may let the agent freeze.
    pub fn assert_owned(&self, mount: &Path) {
        let info = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
        let m = mount.to_string_lossy();
        let line = info
            .lines()
            .rfind(|l| l.split(' ').nth(4) == Some(&m))
            .unwrap_or_else(|| panic!("{m} is not mounted"));
        let fields: Vec<&str> = line.split(' ').collect();
        let sep = fields.iter().position(|f| *f == "-").expect("separator");
        let source = fields[sep + 2];
        assert!(
            self.made
                .iter()
                .any(|x| matches!(x, Made::Loop(d) if d == source)),
            "refusing to let a test freeze {m}: its source {source} is not a loop device this test made"
        );
    }
}

/// Attaches `image` to a free loop device (see [`Scratch::attach`]); the caller detaches it.
fn attach_loop(image: &Path, read_only: bool) -> String {
    let img = image.to_string_lossy().into_owned();
    let mut last = String::new();
    for _ in 0..10 {
        let mut args = vec!["--find", "--show"];
        if read_only {
            args.push("--read-only");
        }
        args.push(&img);
        let (code, out) = sh_status("losetup", &args);
        if code == 0 {
            let dev = out.trim().to_string();
            assert!(dev.starts_with("/dev/loop"), "losetup said {dev:?}");
            return dev;
        }
        last = out;
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("losetup failed: {last}");
}

fn undo_mount(dir: &Path, image_loop: Option<&str>) {
    // Always thaw before unmounting: a frozen superblock survives the unmount.
    if let Ok(fd) = tandem::agent::freeze::open_dir(dir) {
        let _ = tandem::agent::freeze::thaw(&fd, dir);
    }
    let d = dir.to_string_lossy().into_owned();
    let (code, _) = sh_status("umount", &[&d]);
    if code != 0 {
        let _ = sh_status("umount", &["-l", &d]);
    }
    if let Some(dev) = image_loop {
        let (code, out) = sh_status("losetup", &["-d", dev]);
        if code != 0 {
            eprintln!("cleanup: losetup -d {dev}: {out}");
        }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        while let Some(m) = self.made.pop() {
            match m {
                Made::Mount(dir, image_loop) => undo_mount(&dir, image_loop.as_deref()),
                Made::Loop(dev) => {
                    let (code, out) = sh_status("losetup", &["-d", &dev]);
                    if code != 0 {
                        eprintln!("cleanup: losetup -d {dev}: {out}");
                    }
                }
            }
        }
    }
}

/// Writes a file with pseudo-random content and returns its sha256.
pub fn write_file(path: &Path, bytes: usize, seed: u64, sync: bool) -> String {
    let mut data = vec![0u8; bytes];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let mut f = fs::File::create(path).expect("create file");
    f.write_all(&data).expect("write");
    if sync {
        f.sync_all().expect("fsync");
    }
    sha256_hex(&data)
}

pub fn sha256_file(path: &Path) -> String {
    sha256_hex(&fs::read(path).expect("read"))
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checks a snapshot image: attaches it, checks the filesystem (ext4: e2fsck -fn must be clean;
/// XFS: mount once to replay the log, then xfs_repair -n must be clean), mounts it read-only and
/// returns the mount point for comparisons. The caller's Scratch undoes it all.
pub fn open_snapshot(scratch: &mut Scratch, image: &Path, fs: &str, label: &str) -> PathBuf {
    let dev = scratch.attach(image, false);
    let mnt = scratch.path(&format!("snap-{label}"));
    match fs {
        "ext4" => {
            let (code, out) = sh_status("e2fsck", &["-fn", &dev]);
            assert_eq!(code, 0, "e2fsck of the snapshot: {out}");
            scratch.mount(&dev, &mnt, &["ro"]);
        }
        "xfs" => {
            // An XFS snapshot has a dirty log by design: replay it with a normal mount first.
            scratch.mount(&dev, &mnt, &["nouuid"]);
            scratch.unmount(&mnt);
            let (code, out) = sh_status("xfs_repair", &["-n", &dev]);
            assert_eq!(
                code, 0,
                "xfs_repair -n of the snapshot after log replay: {out}"
            );
            scratch.mount(&dev, &mnt, &["ro", "nouuid"]);
        }
        other => panic!("no check for {other}"),
    }
    mnt
}

/// The floor: the syscalls alone, no discovery, journal, planning or status.
pub fn floor_round(volumes: &[Volume], clones: &[PathBuf]) -> std::time::Duration {
    let fds: Vec<std::os::fd::OwnedFd> = volumes
        .iter()
        .map(|v| tandem::agent::freeze::open_dir(&v.mount).expect("open"))
        .collect();
    let barrier = std::sync::Barrier::new(fds.len());
    let starts: Vec<std::time::Instant> = std::thread::scope(|s| {
        let hs: Vec<_> = fds
            .iter()
            .zip(volumes)
            .map(|(fd, v)| {
                let barrier = &barrier;
                s.spawn(move || {
                    tandem::agent::freeze::syncfs(fd, &v.mount).expect("syncfs");
                    barrier.wait();
                    let t = std::time::Instant::now();
                    tandem::agent::freeze::freeze(fd, &v.mount).expect("freeze");
                    t
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("thread")).collect()
    });
    std::thread::scope(|s| {
        for (v, c) in volumes.iter().zip(clones) {
            s.spawn(move || {
                let src = std::fs::File::open(&v.image).expect("image");
                let dst = std::fs::File::create(c).expect("clone");
                rustix::fs::ioctl_ficlone(&dst, &src).expect("FICLONE");
            });
        }
    });
    std::thread::scope(|s| {
        for (fd, v) in fds.iter().zip(volumes) {
            s.spawn(move || tandem::agent::freeze::thaw(fd, &v.mount).expect("thaw"));
        }
    });
    let window = starts.iter().min().expect("a volume").elapsed();
    for c in clones {
        let _ = std::fs::remove_file(c);
    }
    window
}

pub fn stats(mut v: Vec<std::time::Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
    (ms(v[0]), ms(v[v.len() / 2]), ms(v[v.len() - 1]))
}

impl Scratch {
    /// Bind-mounts the file `src` over the file `dst` (undone on drop like any mount): the path
    /// `dst` then shows another file than the one opened through it before, as a path can in
    /// another mount namespace.
    pub fn bind_file(&mut self, src: &Path, dst: &Path) {
        sh(
            "mount",
            &["--bind", &src.to_string_lossy(), &dst.to_string_lossy()],
        );
        self.made.push(Made::Mount(dst.to_path_buf(), None));
    }
}

impl Scratch {
    /// A reflink pool of `size` bytes (sparse): for benchmarks with many volumes.
    pub fn pool_sized(&mut self, fs: &str, size: u64) -> PathBuf {
        let img = self.path(&format!("pool-{fs}.img"));
        self.image(&img, size);
        let dev = self.attach(&img, false);
        self.mkfs(&dev, fs);
        let mnt = self.path(&format!("pool-{fs}"));
        self.mount(&dev, &mnt, &[]);
        mnt
    }

    /// Like [`Scratch::volume`], but says what failed instead of panicking (a benchmark that
    /// wants as many loop devices as the machine gives goes on with those it got).
    pub fn try_volume(
        &mut self,
        pool: &Path,
        name: &str,
        fs: &str,
        size: u64,
    ) -> Result<Volume, String> {
        let image = pool.join(format!("{name}.img"));
        fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("image {}: {e}", image.display()))?;
        let img = image.to_string_lossy().into_owned();
        let (code, out) = sh_status("losetup", &["--find", "--show", &img]);
        let device = out.trim().to_string();
        if code != 0 || !device.starts_with("/dev/loop") {
            let _ = fs::remove_file(&image);
            return Err(format!("losetup: {}", out.trim()));
        }
        self.made.push(Made::Loop(device.clone()));
        let (code, out) = match fs {
            "ext4" => sh_status("mkfs.ext4", &["-q", "-F", &device]),
            "xfs" => sh_status("mkfs.xfs", &["-q", "-f", &device]),
            other => return Err(format!("no mkfs for {other}")),
        };
        if code != 0 {
            return Err(format!("mkfs: {out}"));
        }
        let mount = self.path(&format!("vol-{name}"));
        fs::create_dir_all(&mount).map_err(|e| format!("mount dir: {e}"))?;
        let m = mount.to_string_lossy().into_owned();
        let (code, out) = sh_status("mount", &[&device, &m]);
        if code != 0 {
            return Err(format!("mount: {out}"));
        }
        self.made.push(Made::Mount(mount.clone(), None));
        Ok(Volume {
            image,
            device,
            mount,
            fs: fs.into(),
        })
    }
}
