//! Restore clones (issue 9) on real loop devices, real XFS, ext4 and btrfs, real FICLONE and btrfs
//! snapshots: the clone's content is the snapshot's, writes to the clone reach neither the snapshot
//! nor the origin, `attach` re-creates what a reboot removes, and owner marks are checked both on
//! the snapshot cloned and on the clone deleted. Needs root (skips with a message otherwise).
//! Every image, loop device and mount is made here and removed even when a test fails (`Scratch`
//! for the test's own, [`Clones`] for what the backend made).

mod agent_support;

use std::path::{Path, PathBuf};

use agent_support::{Scratch, sh, sh_status, sha256_file, write_file};
use tandem::agent::backend::clone::{self, CloneHandle, CloneInfo, CloneOptions, ClonePlan};
use tandem::agent::backend::{
    self, BackendError, BackendKind, BackendOptions, Deleted, SnapshotHandle, loopdev,
};
use tandem::agent::freeze;
use tandem::api::CloneMethod;

const MIB: usize = 1 << 20;
const CUT: &str = "11111111-aaaa-4bbb-8ccc-000000000001";
const OTHER_CUT: &str = "22222222-aaaa-4bbb-8ccc-000000000002";
const RESTORE: &str = "33333333-aaaa-4bbb-8ccc-000000000003";
const OTHER_RESTORE: &str = "44444444-aaaa-4bbb-8ccc-000000000004";

fn options(s: &Scratch) -> CloneOptions {
    CloneOptions {
        backend: BackendOptions {
            thick_cow_size: "64M".into(),
            btrfs_mount_dir: s.path("btrfs-mounts"),
        },
        link_dir: s.path("links"),
        mount_dir: s.path("restores"),
    }
}

/// Clones made by a test: their mounts unmounted and the clones deleted on drop (before the
/// Scratch that holds their pool, which is declared first and so dropped last).
struct Clones {
    options: CloneOptions,
    handles: Vec<CloneHandle>,
    mounts: Vec<PathBuf>,
}

impl Clones {
    fn new(options: CloneOptions) -> Self {
        Clones {
            options,
            handles: Vec::new(),
            mounts: Vec::new(),
        }
    }

    fn create(&mut self, plan: &ClonePlan) -> Result<CloneInfo, BackendError> {
        self.handles.push(plan.handle.clone());
        clone::create(plan, &self.options, &mut |_, _| {})
    }

    fn mount(&mut self, device: &Path, dir: &Path, opts: &[&str]) -> (i32, String) {
        std::fs::create_dir_all(dir).unwrap();
        let mut args = Vec::new();
        let joined = opts.join(",");
        if !opts.is_empty() {
            args.extend(["-o", joined.as_str()]);
        }
        let d = device.to_string_lossy();
        let m = dir.to_string_lossy();
        args.extend([d.as_ref(), m.as_ref()]);
        let out = sh_status("mount", &args);
        if out.0 == 0 {
            self.mounts.push(dir.into());
        }
        out
    }

    fn unmount(&mut self, dir: &Path) {
        self.mounts.retain(|m| m != dir);
        sh("umount", &[&dir.to_string_lossy()]);
    }
}

impl Drop for Clones {
    fn drop(&mut self) {
        for m in self.mounts.drain(..).rev() {
            let (code, _) = sh_status("umount", &[&m.to_string_lossy()]);
            if code != 0 {
                let _ = sh_status("umount", &["-l", &m.to_string_lossy()]);
            }
        }
        for h in self.handles.drain(..).rev() {
            if let Err(e) = clone::delete(&h, &self.options) {
                eprintln!("cleanup: delete clone {h}: {e}");
            }
        }
    }
}

/// A reflink snapshot of the volume (frozen for the cut, like the agent does), marked as `owner`'s.
fn reflink_snapshot(v: &agent_support::Volume, pv: &str, owner: &str) -> SnapshotHandle {
    let name = backend::snapshot_name("ns1", "g", pv, owner).unwrap();
    let plan = backend::reflink::plan(Path::new(&v.device), &v.image, &name, owner).unwrap();
    let fd = freeze::open_dir(&v.mount).unwrap();
    freeze::syncfs(&fd, &v.mount).unwrap();
    freeze::freeze(&fd, &v.mount).unwrap();
    let made = backend::create(&plan, &backend_options());
    freeze::thaw(&fd, &v.mount).unwrap();
    let made = made.unwrap();
    backend::persist(&made.handle).unwrap();
    made.handle
}

fn backend_options() -> BackendOptions {
    BackendOptions {
        thick_cow_size: "64M".into(),
        btrfs_mount_dir: "/var/tmp/tandem-clone-test-btrfs".into(),
    }
}

fn sha256sum(path: &Path) -> String {
    sh("sha256sum", &[&path.to_string_lossy()])
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn loop_of(link: &Path) -> PathBuf {
    let target = std::fs::read_link(link).expect("the link");
    assert!(
        target.to_string_lossy().starts_with("/dev/loop"),
        "{} -> {}",
        link.display(),
        target.display()
    );
    target
}

/// Reflink clones of an XFS and an ext4 volume on a `pool_fs` pool: content, independence, XFS
/// `nouuid`, attach after a "reboot", delete.
fn reflink_round(pool_fs: &str) {
    let mut s = Scratch::new();
    let pool = s.pool(pool_fs);
    let o = options(&s);
    let mut clones = Clones::new(o.clone());
    for fs in ["xfs", "ext4"] {
        let v = s.volume(&pool, &format!("{fs}-vol"), fs, 64 << 20);
        s.assert_owned(&v.mount);
        let data = write_file(&v.mount.join("data.bin"), 8 * MIB, 7, true);
        let pv = format!("tandem-{fs}0000001");
        let snapshot = reflink_snapshot(&v, &pv, CUT);
        let SnapshotHandle::Reflink {
            clone: snap_image, ..
        } = &snapshot
        else {
            panic!("{snapshot:?}")
        };
        let snap_sum = sha256sum(snap_image);

        let plan = clone::plan(&snapshot, "ns1", &pv, RESTORE, &o).unwrap();
        assert_eq!(plan.backend, BackendKind::Reflink);
        let info = clones.create(&plan).unwrap();
        let CloneHandle::Reflink { image, link, .. } = &info.handle else {
            panic!("{:?}", info.handle)
        };
        assert_eq!(link, &o.link_dir.join(&pv));
        assert_eq!(info.path, *link);
        assert!(info.block);
        assert_eq!(info.method, CloneMethod::Clone);
        assert_eq!(info.filesystem.as_deref(), Some(fs));
        assert_eq!(
            info.size_bytes,
            std::fs::metadata(snap_image).unwrap().len()
        );
        assert_eq!(
            image.parent().unwrap(),
            pool.join(".tandem-restores"),
            "the clone is on the snapshot's pool"
        );
        let device = loop_of(link);
        // The clone's bytes are the snapshot's.
        assert_eq!(sha256sum(image), snap_sum, "{fs}: clone image");
        assert_eq!(sha256sum(&device), snap_sum, "{fs}: the loop device");
        // Creating again never adopts what is there.
        assert!(matches!(
            clone::create(&plan, &o, &mut |_, _| {}),
            Err(BackendError::AlreadyExists { .. })
        ));

        // Mounted beside its mounted origin: XFS needs nouuid (the same filesystem uuid).
        let mnt = s.path(&format!("clone-{fs}"));
        if fs == "xfs" {
            let (code, out) = clones.mount(link, &mnt, &[]);
            assert_ne!(code, 0, "an XFS clone mounted without nouuid: {out}");
            let (code, out) = clones.mount(link, &mnt, &["nouuid"]);
            assert_eq!(code, 0, "{out}");
        } else {
            let (code, out) = clones.mount(link, &mnt, &[]);
            assert_eq!(code, 0, "{out}");
        }
        assert_eq!(
            sha256_file(&mnt.join("data.bin")),
            data,
            "{fs}: file in the clone"
        );
        // Writes to the clone reach neither the snapshot nor the origin.
        write_file(&mnt.join("data.bin"), 8 * MIB, 99, true);
        write_file(&mnt.join("new.bin"), MIB, 98, true);
        clones.unmount(&mnt);
        assert_eq!(
            sha256sum(snap_image),
            snap_sum,
            "{fs}: snapshot after clone writes"
        );
        assert_eq!(sha256_file(&v.mount.join("data.bin")), data, "{fs}: origin");
        assert!(!v.mount.join("new.bin").exists());

        // Attach is idempotent.
        let again = clone::attach(&info.handle, &o).unwrap();
        assert_eq!(loop_of(link), device, "attach keeps the loop device");
        assert_eq!(again.path, info.path);
        // A "reboot": the loop device and the link are gone; attach makes both again.
        sh("losetup", &["-d", &device.to_string_lossy()]);
        std::fs::remove_file(link).unwrap();
        let id = {
            let f = std::fs::File::open(image).unwrap();
            loopdev::file_id(&f, image).unwrap()
        };
        for _ in 0..50 {
            if loopdev::find(id).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(loopdev::find(id).is_empty(), "the loop device is detached");
        let back = clone::attach(&info.handle, &o).unwrap();
        let device = loop_of(link);
        assert_eq!(loopdev::find(id), vec![device.clone()]);
        assert_eq!(back.filesystem.as_deref(), Some(fs));
        let opts: &[&str] = if fs == "xfs" { &["nouuid"] } else { &[] };
        let (code, out) = clones.mount(link, &mnt, opts);
        assert_eq!(code, 0, "{out}");
        assert!(mnt.join("new.bin").exists(), "the clone kept its writes");
        clones.unmount(&mnt);

        // Delete: loop device, link and image go; a second delete finds nothing.
        assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Removed);
        assert!(!image.exists());
        assert!(std::fs::symlink_metadata(link).is_err(), "the link is gone");
        assert!(
            loopdev::find(id).is_empty() || !device.exists() || {
                // LOOP_CLR_FD may finish when the last opener closes.
                std::thread::sleep(std::time::Duration::from_millis(200));
                loopdev::find(id).is_empty()
            }
        );
        assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Absent);
        assert!(snap_image.exists(), "the snapshot stays");
        backend::delete(&snapshot, &backend_options()).unwrap();
    }
}

#[test]
fn reflink_clones_on_an_xfs_pool() {
    require_root!();
    reflink_round("xfs");
}

#[test]
fn reflink_clones_on_a_btrfs_pool() {
    require_root!();
    reflink_round("btrfs");
}

/// A clone whose mark is another restore's is NotOurs and left with its loop device and link; a
/// snapshot carrying another cut's mark is never cloned; something planted at the clone's place is
/// never adopted.
#[test]
fn reflink_owner_marks_are_checked_on_the_snapshot_and_on_the_clone() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let o = options(&s);
    let mut clones = Clones::new(o.clone());
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    write_file(&v.mount.join("data.bin"), MIB, 3, true);
    let snapshot = reflink_snapshot(&v, "pv-a", CUT);

    // The snapshot is the cut CUT's: a handle that names another cut is refused, nothing is made.
    let SnapshotHandle::Reflink {
        clone: snap_image, ..
    } = &snapshot
    else {
        panic!()
    };
    let foreign_snapshot = SnapshotHandle::Reflink {
        clone: snap_image.clone(),
        owner: OTHER_CUT.into(),
    };
    let plan = clone::plan(&foreign_snapshot, "ns1", "pv-a", RESTORE, &o).unwrap();
    let err = clones.create(&plan).unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    let CloneHandle::Reflink { image, link, .. } = &plan.handle else {
        panic!()
    };
    assert!(!image.exists() && std::fs::symlink_metadata(link).is_err());
    assert_eq!(
        std::fs::read_dir(pool.join(".tandem-restores"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "nothing half-made is left"
    );

    // The right cut: cloned. Another restore's handle of the same place: NotOurs, all left.
    let plan = clone::plan(&snapshot, "ns1", "pv-a", RESTORE, &o).unwrap();
    let info = clones.create(&plan).unwrap();
    let device = loop_of(link);
    let mut theirs = info.handle.clone();
    if let CloneHandle::Reflink { owner, .. } = &mut theirs {
        *owner = OTHER_RESTORE.into();
    }
    let err = clone::delete(&theirs, &o).unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    assert!(image.exists());
    assert_eq!(loop_of(link), device);
    assert!(matches!(
        clone::attach(&theirs, &o),
        Err(BackendError::NotOurs { .. })
    ));

    // A clone that is mounted is not detached nor removed.
    let mnt = s.path("clone-a");
    let (code, out) = clones.mount(link, &mnt, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(clone::delete(&info.handle, &o).is_err());
    assert!(image.exists());
    clones.unmount(&mnt);
    assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Removed);

    // A file planted at the clone's place is neither adopted nor removed.
    std::fs::write(image, "planted").unwrap();
    assert!(matches!(
        clones.create(&plan),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        clone::delete(&info.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert_eq!(std::fs::read_to_string(image).unwrap(), "planted");
    std::fs::remove_file(image).unwrap();
    backend::delete(&snapshot, &backend_options()).unwrap();
}

fn subvolume(path: &Path) {
    sh(
        "btrfs",
        &["-q", "subvolume", "create", &path.to_string_lossy()],
    );
}

/// A btrfs snapshot, cut the way the agent cuts one (btrfs is never frozen), of `owner`'s cut.
fn btrfs_snapshot(mount: &Path, pv: &str, owner: &str, o: &BackendOptions) -> SnapshotHandle {
    let mounts = tandem::agent::discovery::read_mountinfo().unwrap();
    let volume =
        tandem::agent::discovery::resolve_volume(mount, &mounts, Path::new("/sys/dev/block"))
            .unwrap();
    let name = backend::snapshot_name("ns1", "g", pv, owner).unwrap();
    let plan = backend::plan(&volume, &name, owner, o).unwrap();
    assert_eq!(plan.backend, BackendKind::Btrfs);
    backend::create(&plan, o).unwrap().handle
}

/// The btrfs-subvolume backend: a writable snapshot of the member snapshot in its own directory,
/// bind-mounted; the PV path (`<mount>/volume`) is missing while the bind mount is gone, and
/// `attach` brings it back; writes reach neither snapshot nor origin; marks are checked; delete
/// removes the subvolume, its directory and the mount.
#[test]
fn btrfs_clones_are_bind_mounted_directories() {
    require_root!();
    let mut s = Scratch::new();
    let img = s.path("btrfs.img");
    s.image(&img, 512 << 20);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let top = s.path("top");
    s.mount(&dev, &top, &[]);
    subvolume(&top.join("vol1"));
    let origin = s.path("vol1");
    s.mount(&dev, &origin, &["subvol=vol1"]);
    let o = options(&s);
    let mut clones = Clones::new(o.clone());
    let data = write_file(&origin.join("data.bin"), 4 * MIB, 5, true);
    let snapshot = btrfs_snapshot(&origin, "pv-b", CUT, &o.backend);
    let SnapshotHandle::Btrfs {
        path: snap_path, ..
    } = &snapshot
    else {
        panic!("{snapshot:?}")
    };
    let snap_dir = top.join(snap_path.trim_start_matches('/'));

    // Another cut's handle of the snapshot: refused, nothing made.
    let mut foreign = snapshot.clone();
    if let SnapshotHandle::Btrfs { owner, .. } = &mut foreign {
        *owner = OTHER_CUT.into();
    }
    let plan = clone::plan(&foreign, "ns1", "pv-b", RESTORE, &o).unwrap();
    let err = clones.create(&plan).unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(top.join(".tandem-restores"))
            .map(|d| d.count())
            .unwrap_or(0),
        0
    );

    let plan = clone::plan(&snapshot, "ns1", "pv-b", RESTORE, &o).unwrap();
    assert_eq!(plan.backend, BackendKind::Btrfs);
    let info = clones.create(&plan).unwrap();
    let CloneHandle::Btrfs { path, mount, .. } = &info.handle else {
        panic!("{:?}", info.handle)
    };
    assert_eq!(mount, &o.mount_dir.join("pv-b"));
    assert_eq!(info.path, mount.join("volume"));
    assert!(!info.block);
    assert_eq!(info.method, CloneMethod::Clone);
    let in_top = top.join(path.trim_start_matches('/')).join("volume");
    let shown = sh("btrfs", &["subvolume", "show", &in_top.to_string_lossy()]);
    assert!(
        !shown.contains("readonly"),
        "the clone is writable: {shown}"
    );
    assert_eq!(sha256_file(&info.path.join("data.bin")), data);
    assert!(matches!(
        clone::create(&plan, &o, &mut |_, _| {}),
        Err(BackendError::AlreadyExists { .. })
    ));

    // Writes to the clone reach neither the snapshot nor the origin.
    write_file(&info.path.join("data.bin"), 4 * MIB, 55, true);
    std::fs::write(info.path.join("new.txt"), "clone only").unwrap();
    assert_eq!(sha256_file(&snap_dir.join("data.bin")), data);
    assert_eq!(sha256_file(&origin.join("data.bin")), data);
    assert!(!origin.join("new.txt").exists() && !snap_dir.join("new.txt").exists());

    // A "reboot": the bind mount is gone, so the PV path does not exist; attach brings it back.
    let again = clone::attach(&info.handle, &o).unwrap();
    assert_eq!(again.path, info.path);
    sh("umount", &[&mount.to_string_lossy()]);
    assert!(mount.is_dir());
    assert!(!info.path.exists(), "no PV path without the bind mount");
    clone::attach(&info.handle, &o).unwrap();
    assert_eq!(
        std::fs::read_to_string(info.path.join("new.txt")).unwrap(),
        "clone only"
    );
    // Attach twice mounts once.
    clone::attach(&info.handle, &o).unwrap();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let m = mount.to_string_lossy();
    let lines: Vec<&str> = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(&m))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    // Bound without the agent's top-level mount's noexec, with nosuid and nodev.
    let flags: Vec<&str> = lines[0].split(' ').nth(5).unwrap().split(',').collect();
    assert!(
        flags.contains(&"nosuid") && flags.contains(&"nodev") && !flags.contains(&"noexec"),
        "{flags:?}"
    );

    // Another restore's handle: NotOurs, left mounted.
    let mut theirs = info.handle.clone();
    if let CloneHandle::Btrfs { owner, .. } = &mut theirs {
        *owner = OTHER_RESTORE.into();
    }
    assert!(matches!(
        clone::delete(&theirs, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert!(info.path.join("new.txt").exists());

    assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Removed);
    assert!(!mount.exists(), "the mount directory is removed");
    assert!(!top.join(path.trim_start_matches('/')).exists());
    assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Absent);
    assert_eq!(
        sha256_file(&snap_dir.join("data.bin")),
        data,
        "the snapshot stays"
    );
    backend::delete(&snapshot, &o.backend).unwrap();
}

/// Runs `tandem agent` one-shot with `state` and the test's restore link dir.
fn oneshot(s: &Scratch, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["agent", "--node-name", "n", "--state-dir"])
        .arg(s.path("state"))
        .arg("--restore-link-dir")
        .arg(s.path("links"))
        .arg("--restore-mount-dir")
        .arg(s.path("restores"))
        .args(["--oneshot-namespace", "ns1", "--oneshot-name", "nightly"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Unrestores and deletes the one-shot cut on drop (before the Scratch).
struct OneshotCleanup<'a>(&'a Scratch);

impl Drop for OneshotCleanup<'_> {
    fn drop(&mut self) {
        let _ = oneshot(self.0, &["--oneshot-action", "unrestore"]);
        let _ = oneshot(self.0, &["--oneshot-action", "delete"]);
    }
}

/// The one-shot CLI on a reflink volume: cut, restore (JSON with the link, method and size), the
/// clone's bytes are the snapshot's; restore again only attaches; attach re-creates the loop device
/// and link after a "reboot"; unrestore removes the clone.
#[test]
fn oneshot_restore_of_a_reflink_cut() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    write_file(&v.mount.join("data.bin"), 4 * MIB, 11, true);
    let s = s;
    let _cleanup = OneshotCleanup(&s);
    let mount = v.mount.to_string_lossy().into_owned();
    let (ok, out, err) = oneshot(&s, &["--oneshot-volume", &mount]);
    assert!(ok && out.contains("\"phase\":\"Released\""), "{out} {err}");
    let snapshot = {
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        PathBuf::from(
            status["volumes"][0]["snapshotHandle"]
                .as_str()
                .unwrap()
                .strip_prefix("reflink:")
                .unwrap(),
        )
    };

    let (ok, out, err) = oneshot(&s, &["--oneshot-action", "restore"]);
    assert!(ok, "{out} {err}");
    let restored: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &restored["restored"][0];
    let link = s.path("links").join("vol-a");
    assert_eq!(
        c["path"].as_str(),
        Some(link.to_string_lossy().as_ref()),
        "{out}"
    );
    assert_eq!(c["method"].as_str(), Some("Clone"));
    assert_eq!(c["backend"].as_str(), Some("reflink"));
    assert_eq!(c["filesystem"].as_str(), Some("ext4"));
    assert_eq!(c["block"].as_bool(), Some(true));
    let device = loop_of(&link);
    assert_eq!(sha256sum(&device), sha256sum(&snapshot));
    let image = PathBuf::from(
        c["handle"]
            .as_str()
            .unwrap()
            .strip_prefix("reflink:")
            .unwrap(),
    );
    assert!(
        image.starts_with(pool.join(".tandem-restores")),
        "{image:?}"
    );

    // Again: attached, not cloned twice.
    let (ok, out, err) = oneshot(&s, &["--oneshot-action", "restore"]);
    assert!(ok && out.contains("\"attached\""), "{out} {err}");
    assert_eq!(loop_of(&link), device);
    // A "reboot": attach makes the loop device and the link again.
    sh("losetup", &["-d", &device.to_string_lossy()]);
    std::fs::remove_file(&link).unwrap();
    let (ok, out, err) = oneshot(&s, &["--oneshot-action", "attach"]);
    assert!(ok, "{out} {err}");
    assert_eq!(sha256sum(&loop_of(&link)), sha256sum(&snapshot));

    let (ok, out, err) = oneshot(&s, &["--oneshot-action", "unrestore"]);
    assert!(ok && out.contains("Removed"), "{out} {err}");
    assert!(!image.exists() && std::fs::symlink_metadata(&link).is_err());
    assert!(
        snapshot.exists(),
        "the cut's snapshot stays until the cut is deleted"
    );
}

/// Attaches of one clone at once (an agent's start racing another call) make one loop device.
#[test]
fn concurrent_attaches_of_a_reflink_clone_make_one_loop_device() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let o = options(&s);
    let mut clones = Clones::new(o.clone());
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    let snapshot = reflink_snapshot(&v, "pv-a", CUT);
    let plan = clone::plan(&snapshot, "ns1", "pv-a", RESTORE, &o).unwrap();
    let info = clones.create(&plan).unwrap();
    let CloneHandle::Reflink { image, link, .. } = &info.handle else {
        panic!()
    };
    let id = {
        let f = std::fs::File::open(image).unwrap();
        loopdev::file_id(&f, image).unwrap()
    };
    for round in 0..5 {
        for device in loopdev::find(id) {
            sh("losetup", &["-d", &device.to_string_lossy()]);
        }
        for _ in 0..100 {
            if loopdev::find(id).is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let barrier = std::sync::Barrier::new(4);
        std::thread::scope(|t| {
            for _ in 0..4 {
                t.spawn(|| {
                    barrier.wait();
                    clone::attach(&info.handle, &o).unwrap();
                });
            }
        });
        let found = loopdev::find(id);
        assert_eq!(found.len(), 1, "round {round}: {found:?}");
        assert_eq!(loop_of(link), found[0]);
    }
    assert_eq!(clone::delete(&info.handle, &o).unwrap(), Deleted::Removed);
    backend::delete(&snapshot, &backend_options()).unwrap();
}
