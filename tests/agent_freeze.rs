//! The agent's engine on real loop devices, real XFS/ext4/btrfs, real FIFREEZE and real FICLONE.
//! Needs root (skips with a message otherwise). Every image, loop device and mount is made here and
//! removed by `Scratch` even when a test fails.

mod agent_support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use agent_support::{Scratch, open_snapshot, sh_status, sha256_file, write_file};
use tandem::agent::discovery::{self, DeviceKind};
use tandem::agent::engine::{CutRequest, Engine, EngineConfig, VolumeRequest};
use tandem::agent::freeze;
use tandem::api::{FreezePolicy, NodePhase};

const MIB: usize = 1 << 20;

fn request(
    key: &str,
    volumes: &[(&str, &Path)],
    freeze: FreezePolicy,
    release: bool,
) -> CutRequest {
    CutRequest {
        key: key.into(),
        namespace: "ns1".into(),
        name: format!("{key}-node"),
        group_snapshot: key.into(),
        freeze,
        freeze_timeout: Duration::from_secs(20),
        release_after_cut: release,
        volumes: volumes
            .iter()
            .map(|(pv, path)| VolumeRequest {
                claim: format!("claim-{pv}"),
                persistent_volume: pv.to_string(),
                path: path.to_path_buf(),
                allow_shared_filesystem: false,
                central: false,
            })
            .collect(),
    }
}

fn engine(scratch: &Scratch) -> Engine {
    Engine::start(EngineConfig::new(scratch.path("state")))
        .expect("engine")
        .0
}

fn clone_path(handle: &str) -> PathBuf {
    PathBuf::from(handle.strip_prefix("reflink:").expect("reflink handle"))
}

/// Whether the filesystem at `mount` is frozen: a probe FIFREEZE answers EBUSY. (If it was not
/// frozen the probe froze it, so thaw it again.)
fn is_frozen(mount: &Path) -> bool {
    let fd = freeze::open_dir(mount).expect("open");
    match freeze::freeze(&fd, mount) {
        Err(freeze::FreezeError::AlreadyFrozen { .. }) => true,
        Ok(()) => {
            freeze::thaw(&fd, mount).expect("thaw the probe");
            false
        }
        Err(e) => panic!("probe freeze of {}: {e}", mount.display()),
    }
}

/// A thread that writes into `mount`; `done` turns true when its write returned.
fn start_writer(
    mount: &Path,
    name: &str,
) -> (std::thread::JoinHandle<()>, Arc<AtomicBool>, Arc<AtomicI32>) {
    let done = Arc::new(AtomicBool::new(false));
    let tid = Arc::new(AtomicI32::new(0));
    let path = mount.join(name);
    let (d, t) = (done.clone(), tid.clone());
    let h = std::thread::spawn(move || {
        t.store(unsafe { libc::gettid() }, Ordering::SeqCst);
        std::fs::write(&path, b"written while frozen").expect("writer");
        d.store(true, Ordering::SeqCst);
    });
    (h, done, tid)
}

fn thread_state(tid: i32) -> String {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(") ")
                .map(|(_, rest)| rest.chars().take(1).collect())
        })
        .unwrap_or_default()
}

#[test]
fn discovery_finds_the_loop_image_under_a_real_mount() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "disc", "ext4", 64 << 20);
    let mounts = discovery::read_mountinfo().unwrap();
    let r = discovery::resolve_volume(&v.mount, &mounts, Path::new("/sys/dev/block")).unwrap();
    assert_eq!(r.device, PathBuf::from(&v.device));
    assert_eq!(r.fs_type(), Some("ext4"));
    assert_eq!(
        r.kind,
        DeviceKind::Loop {
            backing_file: v.image.clone()
        }
    );
    // A directory inside the volume is not the mount of a volume.
    std::fs::create_dir_all(v.mount.join("sub")).unwrap();
    assert!(matches!(
        discovery::resolve_volume(&v.mount.join("sub"), &mounts, Path::new("/sys/dev/block")),
        Err(discovery::DiscoveryError::NotAMount { .. })
    ));
    // Block mode: the device node itself.
    let b = discovery::resolve_volume(Path::new(&v.device), &mounts, Path::new("/sys/dev/block"))
        .unwrap();
    assert!(b.mount.is_none());
    assert!(matches!(b.kind, DeviceKind::Loop { .. }));
}

fn reflink_cut_roundtrip(pool_fs: &str) {
    let mut s = Scratch::new();
    let pool = s.pool(pool_fs);
    let vx = s.volume(&pool, "vx", "xfs", 512 << 20);
    let ve = s.volume(&pool, "ve", "ext4", 512 << 20);
    let mut expected = Vec::new();
    for v in [&vx, &ve] {
        s.assert_owned(&v.mount);
        let synced = write_file(&v.mount.join("synced.bin"), 8 * MIB, 1, true);
        // Dirty at freeze time: never synced by the test, so only the agent's syncfs/FIFREEZE flush it.
        let dirty = write_file(&v.mount.join("dirty.bin"), 8 * MIB, 2, false);
        std::fs::write(v.mount.join("marker.txt"), "before").unwrap();
        expected.push((synced, dirty));
    }
    let e = engine(&s);
    let req = request(
        &format!("rt-{pool_fs}"),
        &[("pv-x", &vx.mount), ("pv-e", &ve.mount)],
        FreezePolicy::Required,
        true,
    );
    let st = e.cut(&req, Some(1)).unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
    assert!(st.freeze_window_millis.is_some());
    assert!(st.freeze_start.is_some());
    assert_eq!(st.observed_generation, Some(1));
    for v in [&vx, &ve] {
        std::fs::write(v.mount.join("marker.txt"), "after").unwrap();
        std::fs::write(v.mount.join("post-thaw.txt"), "after").unwrap();
        assert!(!is_frozen(&v.mount), "thawed after the cut");
    }
    for (v, status, (synced, dirty)) in [
        (&vx, &st.volumes[0], &expected[0]),
        (&ve, &st.volumes[1], &expected[1]),
    ] {
        assert_eq!(status.backend.as_deref(), Some("reflink"));
        assert!(status.frozen);
        assert_eq!(status.device.as_deref(), Some(v.device.as_str()));
        assert_eq!(status.filesystem.as_deref(), Some(v.fs.as_str()));
        assert_eq!(status.size_bytes, Some(512 << 20));
        assert!(status.cut_time.is_some());
        let handle = status.snapshot_handle.clone().expect("handle");
        let clone = clone_path(&handle);
        // Named after the GroupSnapshot and the volume, beside the image.
        assert!(
            clone.starts_with(pool.join(".tandem-snapshots")),
            "{handle}"
        );
        assert!(
            clone
                .to_string_lossy()
                .contains(&format!("tandem.ns1.rt-{pool_fs}.pv-")),
            "{handle}"
        );
        let label = format!("{}-{pool_fs}", v.fs);
        let snap = open_snapshot(&mut s, &clone, &v.fs, &label);
        assert_eq!(&sha256_file(&snap.join("synced.bin")), synced);
        assert_eq!(&sha256_file(&snap.join("dirty.bin")), dirty);
        assert_eq!(
            std::fs::read_to_string(snap.join("marker.txt")).unwrap(),
            "before"
        );
        assert!(!snap.join("post-thaw.txt").exists());
    }
    // Cutting again is idempotent: the same status, no second snapshot.
    let again = e.cut(&req, Some(1)).unwrap();
    assert_eq!(again, st);
    let clones = std::fs::read_dir(pool.join(".tandem-snapshots"))
        .unwrap()
        .count();
    assert_eq!(clones, 2);
}

#[test]
fn reflink_cut_of_xfs_and_ext4_on_an_xfs_pool_holds_exactly_the_prefreeze_data() {
    require_root!();
    reflink_cut_roundtrip("xfs");
}

#[test]
fn reflink_cut_of_xfs_and_ext4_on_a_btrfs_pool_holds_exactly_the_prefreeze_data() {
    require_root!();
    reflink_cut_roundtrip("btrfs");
}

#[test]
fn a_writer_blocks_while_frozen_and_resumes_after_release() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "w", "xfs", 128 << 20);
    s.assert_owned(&v.mount);
    let e = engine(&s);
    let req = request("hold", &[("pv-w", &v.mount)], FreezePolicy::Required, false);
    let st = e.cut(&req, None).unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "{:?}", st.message);
    assert!(st.volumes[0].frozen);
    assert!(st.freeze_window_millis.is_none(), "no window while held");
    let (writer, done, tid) = start_writer(&v.mount, "blocked.txt");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !done.load(Ordering::SeqCst),
        "the write must wait while frozen"
    );
    assert_eq!(
        thread_state(tid.load(Ordering::SeqCst)),
        "D",
        "the writer sleeps in the freeze"
    );
    assert!(!v.mount.join("blocked.txt").exists());
    assert!(e.deadline("hold").is_some());
    // A second cut of the same volume while the first holds it fails clearly.
    let second = e
        .cut(
            &request(
                "hold-2",
                &[("pv-w", &v.mount)],
                FreezePolicy::Required,
                true,
            ),
            None,
        )
        .unwrap();
    assert_eq!(second.phase, NodePhase::Failed);
    assert!(
        second
            .message
            .as_deref()
            .unwrap_or("")
            .contains("already frozen by another cut"),
        "{:?}",
        second.message
    );
    let released = e.release("hold").unwrap().unwrap();
    assert_eq!(released.phase, NodePhase::Released);
    assert!(released.freeze_window_millis.is_some());
    writer.join().unwrap();
    assert!(done.load(Ordering::SeqCst));
    assert_eq!(
        std::fs::read(v.mount.join("blocked.txt")).unwrap(),
        b"written while frozen"
    );
    let clone = clone_path(released.volumes[0].snapshot_handle.as_deref().unwrap());
    assert!(clone.exists(), "release keeps the snapshot");
    assert!(e.deadline("hold").is_none());
}

#[test]
fn abort_thaws_and_deletes_the_snapshots() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 128 << 20);
    s.assert_owned(&v.mount);
    let e = engine(&s);
    let st = e
        .cut(
            &request(
                "abort",
                &[("pv-a", &v.mount)],
                FreezePolicy::Required,
                false,
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Cut);
    let clone = clone_path(st.volumes[0].snapshot_handle.as_deref().unwrap());
    assert!(clone.exists());
    assert!(is_frozen(&v.mount));
    let ab = e.abort("abort", "test abort").unwrap().unwrap();
    assert_eq!(ab.phase, NodePhase::Aborted);
    assert!(ab.volumes[0].snapshot_handle.is_none());
    assert!(!clone.exists());
    assert!(!is_frozen(&v.mount));
    // Finalizing afterwards (NodeSnapshot deleted) forgets it.
    e.finalize("abort", false).unwrap();
    assert!(e.status("abort").unwrap().is_none());
}

#[test]
fn the_watchdog_thaws_on_timeout_deletes_the_snapshots_and_reports_aborted() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "wd", "xfs", 128 << 20);
    s.assert_owned(&v.mount);
    let e = engine(&s);
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    e.set_abort_notifier(Box::new(move |key| {
        let _ = tx.lock().unwrap().send(key.to_string());
    }));
    let mut req = request("wd", &[("pv-wd", &v.mount)], FreezePolicy::Required, false);
    req.freeze_timeout = Duration::from_secs(1);
    let st = e.cut(&req, None).unwrap();
    assert_eq!(st.phase, NodePhase::Cut);
    let clone = clone_path(st.volumes[0].snapshot_handle.as_deref().unwrap());
    let (writer, _done, _tid) = start_writer(&v.mount, "after-watchdog.txt");
    // Nobody releases: the watchdog must.
    let key = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("watchdog fired");
    assert_eq!(key, "wd");
    writer.join().unwrap();
    let st = e.status("wd").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Aborted);
    assert!(st.message.unwrap().contains("watchdog"));
    assert!(!clone.exists(), "void snapshot deleted");
    assert!(!is_frozen(&v.mount));
    // A late release does not resurrect it.
    assert_eq!(e.release("wd").unwrap().unwrap().phase, NodePhase::Aborted);
}

#[test]
fn refuses_root_the_state_dir_and_paths_that_are_not_volume_mounts() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "r", "ext4", 128 << 20);
    s.assert_owned(&v.mount);
    let e = engine(&s);
    let mut root = request(
        "root",
        &[("pv-root", Path::new("/"))],
        FreezePolicy::Required,
        true,
    );
    root.freeze_timeout = Duration::from_secs(2); // belt and braces: the watchdog would thaw
    let st = e.cut(&root, None).unwrap();
    assert_eq!(st.phase, NodePhase::Failed);
    assert!(
        st.message.as_deref().unwrap().contains("root filesystem"),
        "{:?}",
        st.message
    );
    assert!(st.freeze_start.is_none(), "nothing was frozen");

    std::fs::create_dir_all(v.mount.join("sub")).unwrap();
    let st = e
        .cut(
            &request(
                "sub",
                &[("pv-sub", &v.mount.join("sub"))],
                FreezePolicy::Required,
                true,
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Failed);
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("not the mount of a volume"),
        "{:?}",
        st.message
    );

    // An agent whose state directory lives on the volume refuses to freeze that volume.
    let inner = Engine::start(EngineConfig::new(v.mount.join("agent-state")))
        .unwrap()
        .0;
    let st = inner
        .cut(
            &request("self", &[("pv-r", &v.mount)], FreezePolicy::Required, true),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Failed);
    assert!(
        st.message.as_deref().unwrap().contains("state directory"),
        "{:?}",
        st.message
    );
    assert!(!is_frozen(&v.mount));

    // Someone else froze it: the kernel's EBUSY is reported, and their freeze is left alone.
    let fd = freeze::open_dir(&v.mount).unwrap();
    freeze::freeze(&fd, &v.mount).unwrap();
    let st = e
        .cut(
            &request("busy", &[("pv-r", &v.mount)], FreezePolicy::Required, true),
            None,
        )
        .unwrap();
    let still = is_frozen(&v.mount);
    freeze::thaw(&fd, &v.mount).unwrap();
    assert_eq!(st.phase, NodePhase::Failed);
    assert!(
        st.message.as_deref().unwrap().contains("EBUSY"),
        "{:?}",
        st.message
    );
    assert!(still, "the other freeze was not undone by the agent");
}

#[test]
fn btrfs_subvolumes_get_read_only_snapshots_outside_the_volume() {
    require_root!();
    let mut s = Scratch::new();
    // The image sits on /var/tmp (ext4, no reflink), so the btrfs backend is the one that applies.
    let img = s.path("btrfs.img");
    s.image(&img, 1 << 30);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let top = s.path("btrfs-top");
    s.mount(&dev, &top, &[]);
    agent_support::sh(
        "btrfs",
        &[
            "-q",
            "subvolume",
            "create",
            &top.join("vol1").to_string_lossy(),
        ],
    );
    let mnt = s.path("btrfs-vol1");
    s.mount(&dev, &mnt, &["subvol=vol1"]);
    s.assert_owned(&mnt);
    let sum = write_file(&mnt.join("data.bin"), 8 * MIB, 3, false);
    std::fs::write(mnt.join("marker.txt"), "before").unwrap();
    let e = engine(&s);

    // Required: refused, because a btrfs snapshot cannot be taken under a freeze.
    let st = e
        .cut(
            &request("b-req", &[("pv-b", &mnt)], FreezePolicy::Required, true),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Failed);
    assert!(
        st.message.as_deref().unwrap().contains("btrfs"),
        "{:?}",
        st.message
    );

    let st = e
        .cut(
            &request("b", &[("pv-b", &mnt)], FreezePolicy::BestEffort, true),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
    let vs = &st.volumes[0];
    assert_eq!(vs.backend.as_deref(), Some("btrfs"));
    assert!(!vs.frozen);
    assert!(vs.reason.as_deref().unwrap().contains("btrfs"));
    assert_eq!(vs.filesystem.as_deref(), Some("btrfs"));
    std::fs::write(mnt.join("marker.txt"), "after").unwrap();
    let handle = vs.snapshot_handle.clone().unwrap();
    let name = tandem::agent::backend::snapshot_name("ns1", "b", "pv-b", "b").unwrap();
    assert_eq!(handle, format!("btrfs:{dev}:/.tandem-snapshots/{name}"));
    let snap = top.join(".tandem-snapshots").join(&name);
    assert_eq!(sha256_file(&snap.join("data.bin")), sum);
    assert_eq!(
        std::fs::read_to_string(snap.join("marker.txt")).unwrap(),
        "before"
    );
    let (_, ro) = sh_status(
        "btrfs",
        &["property", "get", "-ts", &snap.to_string_lossy(), "ro"],
    );
    assert!(ro.contains("ro=true"), "{ro}");
    // Nothing of the snapshot is visible inside the volume.
    assert!(!mnt.join(".tandem-snapshots").exists());
    // Idempotent, then deleted on finalize.
    assert_eq!(
        e.cut(
            &request("b", &[("pv-b", &mnt)], FreezePolicy::BestEffort, true),
            None
        )
        .unwrap(),
        st
    );
    e.finalize("b", false).unwrap();
    assert!(!snap.exists());
}

#[test]
fn freeze_disabled_snapshots_without_freezing() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "d", "ext4", 64 << 20);
    let e = engine(&s);
    let st = e
        .cut(
            &request("dis", &[("pv-d", &v.mount)], FreezePolicy::Disabled, false),
            None,
        )
        .unwrap();
    assert_eq!(
        st.phase,
        NodePhase::Released,
        "nothing frozen, nothing to hold"
    );
    assert!(!st.volumes[0].frozen);
    assert!(st.freeze_start.is_none());
    assert!(clone_path(st.volumes[0].snapshot_handle.as_deref().unwrap()).exists());
}

/// The child of the kill -9 test: cuts, holds, says so, and waits to be killed.
#[test]
fn child_holds_a_freeze_until_killed() {
    let (Ok(state), Ok(mount)) = (
        std::env::var("TANDEM_TEST_CHILD_STATE"),
        std::env::var("TANDEM_TEST_CHILD_MOUNT"),
    ) else {
        return; // only meaningful as the child of the test below
    };
    let e = Engine::start(EngineConfig::new(state)).unwrap().0;
    let mut req = request(
        "killed",
        &[("pv-k", Path::new(&mount))],
        FreezePolicy::Required,
        false,
    );
    req.freeze_timeout = Duration::from_secs(120);
    let st = e.cut(&req, None).unwrap();
    println!("CHILD-PHASE {:?}", st.phase);
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn an_agent_killed_while_frozen_is_thawed_by_its_restart() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "k", "xfs", 128 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_holds_a_freeze_until_killed",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TANDEM_TEST_CHILD_STATE", &state)
        .env("TANDEM_TEST_CHILD_MOUNT", &v.mount)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "child ended without holding a freeze");
        if line.contains("CHILD-PHASE") {
            break;
        }
    }
    assert!(line.contains("Cut"), "{line}");
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();
    let clones: Vec<_> = std::fs::read_dir(pool.join(".tandem-snapshots"))
        .unwrap()
        .collect();
    assert_eq!(clones.len(), 1, "the dead agent had cut its snapshot");
    assert!(
        is_frozen(&v.mount),
        "a killed freezer leaves the filesystem frozen"
    );

    let (restarted, recovered) = Engine::start(EngineConfig::new(&state)).unwrap();
    assert_eq!(recovered.len(), 1);
    assert!(!is_frozen(&v.mount), "the restart thawed it");
    std::fs::write(v.mount.join("after-restart.txt"), "ok").unwrap();
    let st = restarted.status("killed").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Aborted);
    assert!(st.message.unwrap().contains("restarted"));
    assert_eq!(
        std::fs::read_dir(pool.join(".tandem-snapshots"))
            .unwrap()
            .count(),
        0,
        "the void snapshot was deleted, not leaked"
    );
    // And asking again does not cut a second time.
    let again = restarted
        .cut(
            &request(
                "killed",
                &[("pv-k", &v.mount)],
                FreezePolicy::Required,
                false,
            ),
            None,
        )
        .unwrap();
    assert_eq!(again.phase, NodePhase::Aborted);
    assert!(!is_frozen(&v.mount));
}

/// Waits up to `limit` for `done`; says whether it turned true.
fn done_within(done: &AtomicBool, limit: Duration) -> bool {
    let until = std::time::Instant::now() + limit;
    while std::time::Instant::now() < until {
        if done.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done.load(Ordering::SeqCst)
}

/// The shared-disk recipe of the local static provisioner: one filesystem, subdirectories of it
/// bind-mounted as separate volumes. A cut of one of them must not freeze the others.
#[test]
fn a_bind_of_a_subdirectory_is_a_shared_filesystem_and_is_never_frozen() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let image = pool.join("disk.img");
    s.image(&image, 256 << 20);
    let dev = s.attach(&image, false);
    s.mkfs(&dev, "ext4");
    let disk = s.path("disk");
    s.mount(&dev, &disk, &[]);
    for dir in ["a", "b"] {
        std::fs::create_dir(disk.join(dir)).unwrap();
    }
    let (m1, m2) = (s.path("m1"), s.path("m2"));
    s.mount(&disk.join("a").to_string_lossy(), &m1, &["bind"]);
    s.mount(&disk.join("b").to_string_lossy(), &m2, &["bind"]);
    for m in [&disk, &m1, &m2] {
        s.assert_owned(m);
    }
    let e = engine(&s);

    let mut hold = request("shared", &[("pv-1", &m1)], FreezePolicy::Required, false);
    hold.freeze_timeout = Duration::from_secs(5); // belt and braces: the watchdog would thaw
    let st = e.cut(&hold, None).unwrap();
    let (writer, done, _tid) = start_writer(&m2, "other-tenant.txt");
    let writer_ran = done_within(&done, Duration::from_secs(2));
    if st.phase == NodePhase::Cut {
        e.abort("shared", "test cleanup").unwrap();
    }
    writer.join().unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{:?}", st.message);
    let message = st.message.as_deref().unwrap_or("");
    assert!(message.contains("shared filesystem"), "{message}");
    assert!(
        message.contains("tandem.dev/shared-filesystem"),
        "{message}"
    );
    assert!(st.freeze_start.is_none(), "nothing was frozen");
    assert!(
        writer_ran,
        "a writer on another bind of the disk was blocked"
    );
    assert!(!is_frozen(&disk));

    // The whole disk is shared too while parts of it are bound elsewhere.
    let st = e
        .cut(
            &request("whole", &[("pv-disk", &disk)], FreezePolicy::Required, true),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{:?}", st.message);
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("also shows the directory /a"),
        "{:?}",
        st.message
    );

    // An administrator's opt-in on the PersistentVolume lets the cut through.
    let mut allowed = request("allowed", &[("pv-1", &m1)], FreezePolicy::Required, true);
    allowed.volumes[0].allow_shared_filesystem = true;
    let st = e.cut(&allowed, None).unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
    assert!(st.volumes[0].frozen);
    e.finalize("allowed", false).unwrap();
}

/// The guard rails found from the host side: a scratch filesystem stands for the host's root,
/// with the kubelet folder on it and a container runtime filesystem mounted below it. Volumes
/// that are (binds of) those filesystems are refused; an ordinary volume is not.
#[test]
fn node_filesystems_found_through_the_host_root_are_never_frozen() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let host = s.volume(&pool, "host", "ext4", 128 << 20);
    let host_root = host.mount.clone();
    std::fs::create_dir_all(host_root.join("var/lib/kubelet")).unwrap();
    std::fs::create_dir_all(host_root.join("var/lib/containerd")).unwrap();
    let runtime_image = pool.join("containerd.img");
    s.image(&runtime_image, 64 << 20);
    let runtime_dev = s.attach(&runtime_image, false);
    s.mkfs(&runtime_dev, "ext4");
    s.mount(&runtime_dev, &host_root.join("var/lib/containerd"), &[]);
    let kubelet_view = s.path("kubelet-view");
    s.mount(
        &host_root.join("var/lib/kubelet").to_string_lossy(),
        &kubelet_view,
        &["bind"],
    );
    let runtime_view = s.path("runtime-view");
    s.mount(
        &host_root.join("var/lib/containerd").to_string_lossy(),
        &runtime_view,
        &["bind"],
    );
    let ordinary = s.volume(&pool, "ordinary", "ext4", 64 << 20);
    for m in [&host_root, &kubelet_view, &runtime_view, &ordinary.mount] {
        s.assert_owned(m);
    }
    let mut config = EngineConfig::new(s.path("state"));
    config.guard.layout.host_root = host_root.clone();
    let e = Engine::start(config).expect("engine").0;

    for (key, path, expected) in [
        ("host-root", &host_root, "node's root filesystem"),
        ("kubelet", &kubelet_view, "node's root filesystem"),
        ("runtime", &runtime_view, "/var/lib/containerd"),
    ] {
        let mut req = request(key, &[("pv-node", path)], FreezePolicy::Required, false);
        req.freeze_timeout = Duration::from_secs(5);
        let st = e.cut(&req, None).unwrap();
        if st.phase == NodePhase::Cut {
            e.abort(key, "test cleanup").unwrap();
        }
        assert_eq!(st.phase, NodePhase::Failed, "{key}: {:?}", st.message);
        let message = st.message.as_deref().unwrap_or("");
        assert!(message.contains(expected), "{key}: {message}");
        assert!(st.freeze_start.is_none(), "{key}: nothing was frozen");
    }
    assert!(!is_frozen(&host_root));
    assert!(!is_frozen(&runtime_view));
    let st = e
        .cut(
            &request(
                "ordinary",
                &[("pv-o", &ordinary.mount)],
                FreezePolicy::Required,
                true,
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
}

/// btrfs snapshots a whole subvolume: a volume that shows only a directory inside one is shared.
#[test]
fn a_directory_inside_a_btrfs_subvolume_is_a_shared_filesystem() {
    require_root!();
    let mut s = Scratch::new();
    let img = s.path("btrfs.img");
    s.image(&img, 1 << 30);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let top = s.path("btrfs-top");
    s.mount(&dev, &top, &[]);
    let subvolume = top.join("vol1");
    agent_support::sh(
        "btrfs",
        &["-q", "subvolume", "create", &subvolume.to_string_lossy()],
    );
    std::fs::create_dir(subvolume.join("tenant-a")).unwrap();
    let inside = s.path("tenant-a");
    s.mount(
        &subvolume.join("tenant-a").to_string_lossy(),
        &inside,
        &["bind"],
    );
    s.assert_owned(&inside);
    let e = engine(&s);
    let st = e
        .cut(
            &request(
                "inside",
                &[("pv-a", &inside)],
                FreezePolicy::BestEffort,
                true,
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{:?}", st.message);
    let message = st.message.as_deref().unwrap_or("");
    assert!(message.contains("shared filesystem"), "{message}");
    assert!(
        message.contains("inside the btrfs subvolume /vol1"),
        "{message}"
    );
    assert!(
        !top.join(".tandem-snapshots/tandem.ns1.inside.pv-a")
            .exists()
    );
}

#[test]
fn a_volume_to_be_cut_centrally_on_a_loop_device_is_refused_and_nothing_is_frozen() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let local = s.volume(&pool, "a", "ext4", 128 << 20);
    let central = s.volume(&pool, "b", "ext4", 128 << 20);
    s.assert_owned(&local.mount);
    s.assert_owned(&central.mount);
    let e = engine(&s);
    let mut req = request(
        "central",
        &[("pv-a", &local.mount), ("pv-b", &central.mount)],
        FreezePolicy::Required,
        false,
    );
    // Marked central (an RBD group snapshot would cut it), but not a krbd device: a freeze
    // without any snapshot of it would be reported as one, so the whole cut is refused.
    req.volumes[1].central = true;
    let st = e.cut(&req, None).unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{st:?}");
    let message = st.message.clone().unwrap_or_default();
    assert!(
        message.contains("pv-b") && message.contains("not a krbd-mapped RBD image"),
        "{message}"
    );
    assert!(st.volumes.iter().all(|v| v.snapshot_handle.is_none()));
    assert!(!is_frozen(&local.mount));
    assert!(!is_frozen(&central.mount));
}
