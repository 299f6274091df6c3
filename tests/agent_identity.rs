//! Snapshot identity and backend safety (issue 8: C1, H5, L12) on real loop devices, real XFS and
//! btrfs, real FICLONE and btrfs snapshots. Needs root (skips with a message otherwise). Every
//! image, loop device and mount is made here and removed by `Scratch` even when a test fails.

mod agent_support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_support::{Scratch, sh, sha256_file, write_file};
use tandem::agent::backend;
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
