//! Snapshot identity and backend safety (issue 8: C1, H5, L12) on real loop devices, real XFS and
//! btrfs, real FICLONE and btrfs snapshots. Needs root (skips with a message otherwise). Every
//! image, loop device and mount is made here and removed by `Scratch` even when a test fails.

mod agent_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{Scratch, sh, sha256_file, write_file};
use tandem::agent::backend::{
    self, BackendError, BackendOptions, Deleted, SnapshotHandle, SnapshotPlan, SnapshotSource,
};
use tandem::agent::discovery::{self, ResolvedVolume};
use tandem::agent::engine::{CutRequest, Engine, EngineConfig, VolumeRequest};
use tandem::api::{FreezePolicy, NodePhase};

const MIB: usize = 1 << 20;

/// A cut of one NodeSnapshot `key` (its uid) of GroupSnapshot `group_snapshot` in `ns1`.
fn request(
    key: &str,
    group_snapshot: &str,
    pv: &str,
    path: &Path,
    freeze: FreezePolicy,
) -> CutRequest {
    CutRequest {
        key: key.into(),
        namespace: "ns1".into(),
        name: format!("{group_snapshot}-node"),
        group_snapshot: group_snapshot.into(),
        freeze,
        freeze_timeout: Duration::from_secs(20),
        release_after_cut: true,
        volumes: vec![VolumeRequest {
            claim: format!("claim-{pv}"),
            persistent_volume: pv.into(),
            path: path.to_path_buf(),
            allow_shared_filesystem: false,
            central: false,
        }],
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

/// C1, the review's scenario: `nightly` is retained, deleted and created again under the same
/// name. The new cut must make a new clone (not report yesterday's), and a failing or deleted new
/// cut must never delete the retained one.
#[test]
fn a_reused_group_snapshot_name_makes_a_new_clone_and_never_deletes_the_retained_one() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 128 << 20);
    s.assert_owned(&v.mount);
    let e = engine(&s);

    write_file(&v.mount.join("data.bin"), 4 * MIB, 1, true);
    let first = e
        .cut(
            &request("uid-1", "nightly", "pv-a", &v.mount, FreezePolicy::Required),
            None,
        )
        .unwrap();
    assert_eq!(first.phase, NodePhase::Released, "{:?}", first.message);
    let retained = clone_path(first.volumes[0].snapshot_handle.as_deref().unwrap());
    let retained_sum = sha256_file(&retained);
    // The GroupSnapshot (Retain) is deleted: the agent forgets the cut and keeps the clone.
    e.finalize("uid-1", true).unwrap();
    assert!(retained.exists());

    write_file(&v.mount.join("data.bin"), 4 * MIB, 2, true);
    let second = e
        .cut(
            &request("uid-2", "nightly", "pv-a", &v.mount, FreezePolicy::Required),
            None,
        )
        .unwrap();
    assert_eq!(second.phase, NodePhase::Released, "{:?}", second.message);
    let fresh = clone_path(second.volumes[0].snapshot_handle.as_deref().unwrap());
    assert_ne!(fresh, retained, "the second cut adopted the retained clone");
    assert_ne!(
        sha256_file(&fresh),
        retained_sum,
        "the second cut reports old data"
    );

    // A third cut of the same name that is aborted, and the second one deleted: the retained clone stays.
    let mut held = request("uid-3", "nightly", "pv-a", &v.mount, FreezePolicy::Required);
    held.release_after_cut = false;
    assert_eq!(e.cut(&held, None).unwrap().phase, NodePhase::Cut);
    assert_eq!(
        e.abort("uid-3", "another node failed")
            .unwrap()
            .unwrap()
            .phase,
        NodePhase::Aborted
    );
    e.finalize("uid-3", false).unwrap();
    e.finalize("uid-2", false).unwrap();
    assert!(!fresh.exists(), "the second cut's own clone is deleted");
    assert!(retained.exists(), "a later cut deleted the retained clone");
    assert_eq!(sha256_file(&retained), retained_sum);
}

/// L12 through the engine: the agent's view of the image path (from sysfs, a host path) shows
/// another file than the one the loop device reads, as in a container whose mounts differ. The cut
/// must fail, not clone the other file.
#[test]
fn a_cut_refuses_to_clone_a_file_that_is_not_the_loop_backing_file() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let other = pool.join("other.img");
    let other_sum = write_file(&other, 4 * MIB, 7, true);
    s.bind_file(&other, &v.image);
    let e = engine(&s);
    let st = e
        .cut(
            &request("uid-l12", "g", "pv-a", &v.mount, FreezePolicy::Required),
            None,
        )
        .unwrap();
    let clones: Vec<String> = std::fs::read_dir(pool.join(".tandem-snapshots"))
        .map(|d| d.map(|e| sha256_file(&e.unwrap().path())).collect())
        .unwrap_or_default();
    assert!(
        !clones.contains(&other_sum),
        "the agent cloned the other file"
    );
    assert_eq!(st.phase, NodePhase::Failed, "{:?}", st.volumes);
    let reason = st.volumes[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("not the backing file"), "{reason}");
}

/// A btrfs subvolume `name` made with the CLI (the test's own fixture, not the agent's code).
fn subvolume(path: &Path) {
    sh(
        "btrfs",
        &["-q", "subvolume", "create", &path.to_string_lossy()],
    );
}

/// H5, the review's test: a btrfs PV mounted at its top level (so `.tandem-snapshots` is inside the
/// tenant's volume) with a planted symlink to another filesystem's subvolume. The cut must not
/// report success, and deleting it must never reach the victim.
#[test]
fn a_top_level_btrfs_volume_is_refused_and_a_planted_symlink_never_reaches_the_victim() {
    require_root!();
    let mut s = Scratch::new();
    // The victim: a subvolume on a second btrfs.
    let victim_img = s.path("victim.img");
    s.image(&victim_img, 256 << 20);
    let victim_dev = s.attach(&victim_img, false);
    s.mkfs(&victim_dev, "btrfs");
    let victim_top = s.path("victim-top");
    s.mount(&victim_dev, &victim_top, &[]);
    let victim = victim_top.join("precious");
    subvolume(&victim);
    std::fs::write(victim.join("data.txt"), "another tenant's data").unwrap();

    // The tenant's volume: a whole btrfs, mounted at its top level.
    let img = s.path("tenant.img");
    s.image(&img, 256 << 20);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let mnt = s.path("tenant-vol");
    s.mount(&dev, &mnt, &[]);
    s.assert_owned(&mnt);
    let planted_dir = mnt.join(".tandem-snapshots");
    std::fs::create_dir(&planted_dir).unwrap();
    for name in planted_names("ns1", "b", "pv-b", "uid-b") {
        std::os::unix::fs::symlink(&victim, planted_dir.join(name)).unwrap();
    }

    let e = engine(&s);
    let st = e
        .cut(
            &request("uid-b", "b", "pv-b", &mnt, FreezePolicy::BestEffort),
            None,
        )
        .unwrap();
    assert_eq!(
        st.phase,
        NodePhase::Failed,
        "a planted snapshot was reported as made: {:?}",
        st.volumes
    );
    e.finalize("uid-b", false).unwrap();
    assert!(
        victim.join("data.txt").exists(),
        "the agent deleted the victim subvolume"
    );
    assert_eq!(
        std::fs::read_to_string(victim.join("data.txt")).unwrap(),
        "another tenant's data"
    );
}

/// Every name a planted object could carry for this cut: today's and the one before owners.
fn planted_names(ns: &str, gsnap: &str, pv: &str, owner: &str) -> Vec<String> {
    vec![
        format!("tandem.{ns}.{gsnap}.{pv}"),
        backend::snapshot_name(ns, gsnap, pv, owner).unwrap(),
    ]
}

const OWNER_A: &str = "0a0a0a0a-1111-4222-8333-444455556666";
const OWNER_B: &str = "0b0b0b0b-1111-4222-8333-444455556666";

fn options(scratch: &Scratch) -> BackendOptions {
    BackendOptions {
        thick_cow_size: "64M".into(),
        btrfs_mount_dir: scratch.path("btrfs-mounts"),
    }
}

fn resolve(path: &Path) -> ResolvedVolume {
    let mounts = discovery::read_mountinfo().unwrap();
    discovery::resolve_volume(path, &mounts, Path::new("/sys/dev/block")).unwrap()
}

/// The plan of `owner` with another cut's name: what a planted object at "our" name looks like.
fn plan_at(volume: &ResolvedVolume, name: &str, owner: &str, o: &BackendOptions) -> SnapshotPlan {
    backend::plan(volume, name, owner, o).unwrap()
}

/// C1 for reflink, on an XFS pool: a clone is marked with its owner; another owner's create at the
/// same place fails and leaves it untouched; another owner's delete is NotOurs; a second delete of
/// the owner's handle is Absent; a planted unmarked file is never adopted nor removed.
#[test]
fn reflink_clones_are_never_adopted_nor_deleted_by_another_cut() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    let o = options(&s);
    let volume = resolve(&v.mount);
    let name = backend::snapshot_name("ns1", "g", "pv-a", OWNER_A).unwrap();
    let plan = plan_at(&volume, &name, OWNER_A, &o);
    let made = backend::create(&plan, &o).unwrap();
    assert_eq!(made.handle, plan.handle);
    let SnapshotHandle::Reflink { clone, .. } = &made.handle else {
        panic!("not reflink: {}", made.handle)
    };
    let clone = clone.clone();
    let sum = sha256_file(&clone);
    let mut mark = [0u8; 128];
    let len = rustix::fs::getxattr(&clone, "trusted.tandem.owner", &mut mark[..]).unwrap();
    assert_eq!(&mark[..len], OWNER_A.as_bytes());

    // Another cut planning the same place (a name collision, or a planted object): refused.
    let foreign = plan_at(&volume, &name, OWNER_B, &o);
    let err = backend::create(&foreign, &o).unwrap_err();
    assert!(matches!(err, BackendError::AlreadyExists { .. }), "{err}");
    assert_eq!(sha256_file(&clone), sum, "the existing clone was touched");
    let err = backend::delete(&foreign.handle, &o).unwrap_err();
    assert!(matches!(err, BackendError::NotOurs { .. }), "{err}");
    assert!(clone.exists(), "another cut's delete removed the clone");
    // The same cut again: it did not journal this create, so it does not adopt it either.
    assert!(matches!(
        backend::create(&plan, &o),
        Err(BackendError::AlreadyExists { .. })
    ));

    assert_eq!(backend::delete(&made.handle, &o).unwrap(), Deleted::Removed);
    assert!(!clone.exists());
    assert_eq!(backend::delete(&made.handle, &o).unwrap(), Deleted::Absent);

    // A planted, unmarked file at the name: never adopted, never removed.
    std::fs::write(&clone, "planted").unwrap();
    assert!(matches!(
        backend::create(&plan, &o),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        backend::delete(&plan.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert_eq!(std::fs::read_to_string(&clone).unwrap(), "planted");
    // A planted symlink at the name pointing at a file elsewhere: the same.
    std::fs::remove_file(&clone).unwrap();
    let victim = s.path("victim.txt");
    std::fs::write(&victim, "victim").unwrap();
    std::os::unix::fs::symlink(&victim, &clone).unwrap();
    assert!(matches!(
        backend::create(&plan, &o),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        backend::delete(&plan.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "victim");
}

/// L12: the image path no longer holds the loop device's backing file (renamed, another file put
/// at the old path; or another file at that path in the agent's mount namespace): refused.
#[test]
fn an_image_path_that_is_not_the_loop_backing_file_is_refused() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "a", "ext4", 64 << 20);
    let o = options(&s);
    let volume = resolve(&v.mount);
    let name = backend::snapshot_name("ns1", "g", "pv-a", OWNER_A).unwrap();
    let good = plan_at(&volume, &name, OWNER_A, &o);

    let moved = pool.join("a-moved.img");
    std::fs::rename(&v.image, &moved).unwrap();
    write_file(&v.image, MIB, 9, true);
    let err = backend::reflink::plan(Path::new(&v.device), &v.image, &name, OWNER_A).unwrap_err();
    assert!(
        matches!(err, BackendError::NotTheBackingFile { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not the backing file"), "{err}");
    // A plan made before the swap is refused at create, and nothing is left behind.
    let err = backend::create(&good, &o).unwrap_err();
    assert!(
        matches!(err, BackendError::NotTheBackingFile { .. }),
        "{err}"
    );
    let snaps = pool.join(".tandem-snapshots");
    assert_eq!(std::fs::read_dir(&snaps).map(|d| d.count()).unwrap_or(0), 0);
    // The file the loop device reads (under its new name) is accepted.
    let SnapshotSource::Image { loop_device, .. } = &good.source else {
        panic!("not an image plan")
    };
    assert!(backend::reflink::plan(loop_device, &moved, &name, OWNER_A).is_ok());
}

/// A btrfs filesystem on a loop device with a subvolume `vol1` mounted as the volume; returns the
/// device, the test's own top-level mount and the volume mount.
fn btrfs_volume(s: &mut Scratch, label: &str) -> (String, PathBuf, PathBuf) {
    let img = s.path(&format!("{label}.img"));
    s.image(&img, 256 << 20);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let top = s.path(&format!("{label}-top"));
    s.mount(&dev, &top, &[]);
    subvolume(&top.join("vol1"));
    let mnt = s.path(&format!("{label}-vol1"));
    s.mount(&dev, &mnt, &["subvol=vol1"]);
    (dev, top, mnt)
}

/// C1 and H5 for btrfs: the handle records the subvolume; a delete with another owner or another
/// recorded uuid is NotOurs; planted objects (an unmarked subvolume, a symlink to another
/// filesystem's subvolume, a symlinked snapshot directory) are never adopted, followed nor deleted.
#[test]
fn btrfs_snapshots_are_checked_by_mark_and_uuid_and_never_reached_through_symlinks() {
    require_root!();
    let mut s = Scratch::new();
    let (_victim_dev, victim_top, _) = btrfs_volume(&mut s, "victim");
    let victim = victim_top.join("precious");
    subvolume(&victim);
    std::fs::write(victim.join("data.txt"), "another tenant's data").unwrap();

    let (dev, top, mnt) = btrfs_volume(&mut s, "tenant");
    std::fs::write(mnt.join("data.txt"), "mine").unwrap();
    let o = options(&s);
    let volume = resolve(&mnt);
    let name = backend::snapshot_name("ns1", "g", "pv-b", OWNER_A).unwrap();
    let plan = plan_at(&volume, &name, OWNER_A, &o);
    assert_eq!(plan.backend.name(), "btrfs");
    let made = backend::create(&plan, &o).unwrap();
    let SnapshotHandle::Btrfs {
        subvolume: Some(id),
        ..
    } = &made.handle
    else {
        panic!("no subvolume recorded: {:?}", made.handle)
    };
    let snap = top.join(".tandem-snapshots").join(&name);
    let shown = sh("btrfs", &["subvolume", "show", &snap.to_string_lossy()]);
    let field = |key: &str| {
        shown
            .lines()
            .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
    };
    assert_eq!(field("UUID:"), Some(id.uuid.clone()), "{shown}");
    assert_eq!(field("Subvolume ID:"), Some(id.id.to_string()), "{shown}");
    assert_eq!(field("Flags:"), Some("readonly".into()), "{shown}");
    assert_eq!(
        made.handle.to_string(),
        format!("btrfs:{dev}:/.tandem-snapshots/{name}")
    );
    assert_eq!(
        std::fs::read_to_string(snap.join("data.txt")).unwrap(),
        "mine"
    );

    // Another owner at the same place, and the recorded identity tampered with: NotOurs.
    let foreign = plan_at(&volume, &name, OWNER_B, &o);
    assert!(matches!(
        backend::create(&foreign, &o),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        backend::delete(&foreign.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    let mut tampered = made.handle.clone();
    if let SnapshotHandle::Btrfs {
        subvolume: Some(id),
        ..
    } = &mut tampered
    {
        id.uuid = "00000000-0000-0000-0000-000000000000".into();
    }
    assert!(matches!(
        backend::delete(&tampered, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert!(snap.join("data.txt").exists());
    assert_eq!(backend::delete(&made.handle, &o).unwrap(), Deleted::Removed);
    assert!(!snap.exists());
    assert_eq!(backend::delete(&made.handle, &o).unwrap(), Deleted::Absent);
    // A planned handle (no subvolume recorded) of a snapshot never made is Absent as well.
    assert_eq!(backend::delete(&plan.handle, &o).unwrap(), Deleted::Absent);

    // An unmarked subvolume planted at the name.
    subvolume(&snap);
    assert!(matches!(
        backend::create(&plan, &o),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        backend::delete(&plan.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert!(snap.exists());
    sh(
        "btrfs",
        &["-q", "subvolume", "delete", &snap.to_string_lossy()],
    );

    // A symlink at the name to the victim on another filesystem.
    std::os::unix::fs::symlink(&victim, &snap).unwrap();
    assert!(matches!(
        backend::create(&plan, &o),
        Err(BackendError::AlreadyExists { .. })
    ));
    assert!(matches!(
        backend::delete(&plan.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    std::fs::remove_file(&snap).unwrap();

    // The snapshot directory itself a symlink to the victim's parent.
    std::fs::remove_dir(top.join(".tandem-snapshots")).unwrap();
    std::os::unix::fs::symlink(&victim_top, top.join(".tandem-snapshots")).unwrap();
    let victim_plan = plan_at(&volume, "precious", OWNER_A, &o);
    assert!(backend::create(&victim_plan, &o).is_err());
    assert!(matches!(
        backend::delete(&victim_plan.handle, &o),
        Err(BackendError::NotOurs { .. })
    ));
    assert_eq!(
        std::fs::read_to_string(victim.join("data.txt")).unwrap(),
        "another tenant's data"
    );
    assert!(!victim_top.join("precious").join("vol1").exists());
}

/// The engine journals the handle `create` returned, so a btrfs snapshot is deleted only if it is
/// still the subvolume that was made: one replaced at the same path (even carrying a copied owner
/// mark) is left alone.
#[test]
fn the_engine_deletes_only_the_btrfs_subvolume_it_made() {
    require_root!();
    let mut s = Scratch::new();
    let (_dev, top, mnt) = btrfs_volume(&mut s, "eng");
    s.assert_owned(&mnt);
    let e = engine(&s);
    let st = e
        .cut(
            &request("uid-e", "g", "pv-e", &mnt, FreezePolicy::BestEffort),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
    let name = backend::snapshot_name("ns1", "g", "pv-e", "uid-e").unwrap();
    let snap = top.join(".tandem-snapshots").join(&name);
    let mut mark = [0u8; 256];
    let len = rustix::fs::getxattr(&snap, "trusted.tandem.owner", &mut mark[..]).unwrap();
    assert_eq!(&mark[..len], b"uid-e");
    // Someone replaces the snapshot with another subvolume and copies the mark.
    sh(
        "btrfs",
        &["-q", "subvolume", "delete", &snap.to_string_lossy()],
    );
    subvolume(&snap);
    std::fs::write(snap.join("other.txt"), "not the snapshot").unwrap();
    rustix::fs::setxattr(
        &snap,
        "trusted.tandem.owner",
        &mark[..len],
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    e.finalize("uid-e", false).unwrap();
    assert!(
        snap.join("other.txt").exists(),
        "the agent deleted a subvolume it did not make"
    );
}
