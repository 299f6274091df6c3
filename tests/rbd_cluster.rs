//! The controller's librbd client (`tandem::controller::rbd`) against a real single-node Ceph
//! brought up for this test (hack/ceph-mini.sh): consistency groups, group snapshots, restore to
//! new images, rollback, and the failures the controller must tell apart. No mocks.

#[path = "ceph_support/mod.rs"]
mod ceph_support;

use std::time::{Duration, Instant};

use base64::Engine;
use tandem::controller::rbd::{
    Cluster, ClusterConfig, GroupImageState, PoolRef, RbdError, SnapCreated, SnapState,
};

const MIB: u64 = 1 << 20;

/// What each image holds at two offsets: distinct per image and per generation.
fn pattern(image: usize, generation: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ (image as u8 * 64) ^ generation)
        .collect()
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn rbd_consistency_groups_against_a_real_ceph() {
    let Some(ceph) = ceph_support::Ceph::up() else {
        return;
    };
    println!("cluster up in {}", ms(ceph.up_time));
    let config = ClusterConfig {
        mon_host: ceph.get("CEPH_MON_HOST").to_string(),
        user: ceph.get("CEPH_USER").to_string(),
        key: ceph.get("CEPH_KEY").to_string(),
    };
    let pool = PoolRef::new(ceph.get("CEPH_POOL"), "");
    let uid = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or_default()
    );

    // 1. Connect as a `profile rbd` user; the fsid is the cluster's.
    let start = Instant::now();
    let cluster = Cluster::connect(&config, Duration::from_secs(10)).expect("connect");
    println!("connect: {}", ms(start.elapsed()));
    assert_eq!(cluster.fsid().expect("fsid"), ceph.get("CEPH_FSID"));

    // 2. Three images with distinct data, in one group; ensure and add are idempotent.
    let images: Vec<String> = (1..=3).map(|n| format!("vol{n}-{uid}")).collect();
    let group = format!("tandem-{uid}");
    let len = 64 * 1024;
    for (n, image) in images.iter().enumerate() {
        cluster
            .create_image(&pool, image, 4 * MIB)
            .expect("create image");
        for offset in [0, MIB] {
            cluster
                .write_image(&pool, image, offset, &pattern(n, 1, len))
                .expect("write");
        }
    }
    assert!(matches!(
        cluster.create_image(&pool, &images[0], 4 * MIB),
        Err(RbdError::ImageExists { .. })
    ));
    cluster.ensure_group(&pool, &group).expect("ensure group");
    cluster
        .ensure_group(&pool, &group)
        .expect("ensure group again");
    for _ in 0..2 {
        for image in &images {
            cluster.add_image(&pool, &group, image).expect("add image");
        }
    }
    let mut members = cluster.group_images(&pool, &group).expect("group images");
    members.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
        images.iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(
        members
            .iter()
            .all(|m| m.pool == pool.pool && m.state == GroupImageState::Attached),
        "{members:?}"
    );
    assert!(matches!(
        cluster.add_image(&pool, &group, &format!("missing-{uid}")),
        Err(RbdError::ImageNotFound { .. })
    ));
    assert!(matches!(
        cluster.add_image(&pool, "bad\0group", &images[0]),
        Err(RbdError::InvalidName { .. })
    ));

    // 3. The group snapshot; cutting it again by name cuts nothing.
    let snap = format!("tandem-{uid}");
    let start = Instant::now();
    let created = cluster
        .create_group_snap(&pool, &group, &snap)
        .expect("group snap");
    println!("group snap create: {}", ms(start.elapsed()));
    assert_eq!(created, SnapCreated::Created);
    let start = Instant::now();
    let again = cluster
        .create_group_snap(&pool, &group, &snap)
        .expect("group snap again");
    println!(
        "group snap create of an existing one: {}",
        ms(start.elapsed())
    );
    assert_eq!(again, SnapCreated::AlreadyExisted);
    assert_eq!(
        cluster.group_snap_state(&pool, &group, &snap).unwrap(),
        Some(SnapState::Complete)
    );
    let snaps = cluster.group_snaps(&pool, &group).expect("group snaps");
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(
        cluster
            .group_snap_state(&pool, &group, "no-such-snap")
            .unwrap(),
        None
    );

    // 4. Overwrite; restore to new images holds the snapshot's bytes; rollback restores them.
    for (n, image) in images.iter().enumerate() {
        for offset in [0, MIB] {
            cluster
                .write_image(&pool, image, offset, &pattern(n, 2, len))
                .expect("overwrite");
        }
        assert_eq!(
            cluster.read_image(&pool, image, MIB, len).unwrap(),
            pattern(n, 2, len)
        );
    }
    for (n, image) in images.iter().enumerate() {
        let restored = format!("{image}-restored");
        let start = Instant::now();
        cluster
            .copy_from_group_snap(&pool, &group, &snap, image, &restored)
            .expect("copy from group snap");
        println!(
            "copy of {image} from the group snap: {}",
            ms(start.elapsed())
        );
        for offset in [0, MIB] {
            let got = cluster.read_image(&pool, &restored, offset, len).unwrap();
            assert_eq!(got, pattern(n, 1, len), "{restored} at {offset}");
            assert_ne!(got, pattern(n, 2, len));
        }
        assert!(matches!(
            cluster.copy_from_group_snap(&pool, &group, &snap, image, &restored),
            Err(RbdError::ImageExists { .. })
        ));
    }
    assert!(matches!(
        cluster.copy_from_group_snap(&pool, &group, "no-such-snap", &images[0], "x"),
        Err(RbdError::SnapshotNotFound { .. })
    ));
    let start = Instant::now();
    cluster
        .rollback_group_snap(&pool, &group, &snap)
        .expect("rollback");
    println!("group snap rollback: {}", ms(start.elapsed()));
    for (n, image) in images.iter().enumerate() {
        for offset in [0, MIB] {
            assert_eq!(
                cluster.read_image(&pool, image, offset, len).unwrap(),
                pattern(n, 1, len),
                "{image} at {offset} after the rollback"
            );
        }
    }

    // 5. An image in another group is never moved.
    let other_group = format!("other-{uid}");
    let other_image = format!("vol-other-{uid}");
    cluster
        .create_image(&pool, &other_image, 4 * MIB)
        .expect("create");
    cluster.ensure_group(&pool, &other_group).expect("group");
    cluster
        .add_image(&pool, &other_group, &other_image)
        .expect("add to the other group");
    match cluster.add_image(&pool, &group, &other_image) {
        Err(e @ RbdError::ImageInOtherGroup { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains(&format!("{}/{other_group}", pool.pool)),
                "{text}"
            );
            println!("add to a second group: {text}");
        }
        other => panic!("expected ImageInOtherGroup, got {other:?}"),
    }
    let in_other = cluster.group_images(&pool, &other_group).unwrap();
    assert_eq!(in_other.len(), 1);
    assert_eq!(in_other[0].name, other_image);
    assert_eq!(cluster.group_images(&pool, &group).unwrap().len(), 3);
    // Removing it from a group it is not in leaves it alone.
    cluster
        .remove_image(&pool, &group, &other_image)
        .expect("remove from a group it is not in");
    assert_eq!(cluster.group_images(&pool, &other_group).unwrap().len(), 1);

    // 6. An explicit exclusive lock on a member (another client's) refuses the cut, at once.
    let holder = Cluster::connect(&config, Duration::from_secs(10)).expect("second connection");
    let locked = holder.open_image(&pool, &images[1]).expect("open");
    locked.lock_exclusive().expect("lock");
    let locked_snap = format!("locked-{uid}");
    let start = Instant::now();
    let refused = cluster.create_group_snap(&pool, &group, &locked_snap);
    let took = start.elapsed();
    println!(
        "group snap create refused by an exclusive lock: {}",
        ms(took)
    );
    match refused {
        Err(e @ RbdError::ExclusiveLock { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("exclusive") && text.contains("not retried"),
                "{text}"
            );
            println!("  {text}");
        }
        other => panic!("expected ExclusiveLock, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "the refusal took {took:?}");
    assert_ne!(
        cluster
            .group_snap_state(&pool, &group, &locked_snap)
            .unwrap(),
        Some(SnapState::Complete)
    );
    println!(
        "after the refusal: {:?}",
        cluster.group_snaps(&pool, &group).unwrap()
    );
    locked.unlock().expect("unlock");
    drop(locked);
    drop(holder);
    // Without the lock the same name cuts.
    let _ = cluster.remove_group_snap(&pool, &group, &locked_snap);
    assert_eq!(
        cluster
            .create_group_snap(&pool, &group, &locked_snap)
            .unwrap(),
        SnapCreated::Created
    );

    // 7. Cleanup, every step idempotent; no tandem group is left.
    for s in [&snap, &locked_snap] {
        cluster
            .remove_group_snap(&pool, &group, s)
            .expect("rm snap");
        cluster
            .remove_group_snap(&pool, &group, s)
            .expect("rm snap again");
        assert_eq!(cluster.group_snap_state(&pool, &group, s).unwrap(), None);
    }
    assert!(cluster.group_snaps(&pool, &group).unwrap().is_empty());
    for image in &images {
        cluster.remove_image(&pool, &group, image).expect("remove");
        cluster
            .remove_image(&pool, &group, image)
            .expect("remove again");
    }
    assert!(cluster.group_images(&pool, &group).unwrap().is_empty());
    for g in [&group, &other_group] {
        cluster.remove_group(&pool, g).expect("remove group");
        cluster.remove_group(&pool, g).expect("remove group again");
    }
    let groups = cluster.list_groups(&pool).expect("list groups");
    assert!(
        !groups
            .iter()
            .any(|g| g.starts_with("tandem-") || g.starts_with("other-")),
        "{groups:?}"
    );
    for image in images.iter().chain([&other_image]) {
        cluster.delete_image(&pool, image).expect("delete");
        cluster
            .delete_image(&pool, &format!("{image}-restored"))
            .expect("delete restored");
        cluster.delete_image(&pool, image).expect("delete again");
    }
    drop(cluster);

    // 8. A wrong key fails to connect, in bounded time, and the error shows no key.
    let mut secret = base64::engine::general_purpose::STANDARD
        .decode(&config.key)
        .expect("the key is base64");
    let last = secret.len() - 1;
    secret[last] ^= 0x5a;
    let wrong = ClusterConfig {
        key: base64::engine::general_purpose::STANDARD.encode(&secret),
        ..config.clone()
    };
    let timeout = Duration::from_secs(5);
    let start = Instant::now();
    let failed = Cluster::connect(&wrong, timeout);
    let took = start.elapsed();
    println!("connect with a wrong key failed after {}", ms(took));
    match failed {
        Err(e @ RbdError::Connect { .. }) => {
            let text = e.to_string();
            println!("  {text}");
            assert!(
                !text.contains(&wrong.key) && !text.contains(&config.key),
                "{text}"
            );
            assert!(!format!("{e:?}").contains(&wrong.key), "{e:?}");
        }
        other => panic!("expected a Connect error, got {other:?}"),
    }
    assert!(took < timeout + Duration::from_secs(5), "took {took:?}");
}
