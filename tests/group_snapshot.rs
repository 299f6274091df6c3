//! GroupSnapshot end to end: the real control plane, the real `tandem controller` and one real
//! `tandem agent` process per simulated node, over loop-backed XFS/ext4 volumes published as
//! local PVs. Needs root (CI is root); skips with a message otherwise.

mod agent_support;
mod support;
mod world;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_support::open_snapshot;
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use support::eventually;
use tandem::api::{
    Consistency, GroupSnapshot, GroupSnapshotPhase, NodeAction, NodePhase, NodeSnapshot,
};
use world::{WAIT, World, clone_path, count_lines, ordered_writer, require_root};

#[tokio::test]
async fn cross_node_group_snapshot_is_one_point_in_time() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-cross").await;
    for (claim, node, fs) in [
        ("data", "a", "xfs"),
        ("wal", "a", "ext4"),
        ("index", "b", "xfs"),
        ("queue", "c", "ext4"),
    ] {
        w.add_volume(claim, node, fs, &[("app", "shop")]).await;
    }
    for node in ["a", "b", "c"] {
        w.start_agent(node);
    }
    w.start_controller();
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20}),
    )
    .await;

    // Data written (and synced) before the snapshot.
    let mut before = BTreeMap::new();
    for (claim, volume) in &w.volumes {
        let hash = agent_support::write_file(
            &volume.mount.join("before.bin"),
            1 << 20,
            claim.len() as u64,
            true,
        );
        before.insert(claim.clone(), hash);
    }
    let order: Vec<String> = w.volumes.keys().cloned().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = ordered_writer(
        order.iter().map(|c| w.volumes[c].mount.clone()).collect(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    w.create_snapshot("shop-1", "shop", "Delete").await;
    let snapshot = w.wait_phase("shop-1", GroupSnapshotPhase::Ready).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().expect("writer");
    assert!(rounds > 0);
    for (claim, volume) in &w.volumes {
        agent_support::write_file(&volume.mount.join("after.bin"), 4096, 7, true);
        let _ = claim;
    }

    let status = snapshot.status.expect("status");
    assert_eq!(status.consistency, Some(Consistency::FilesystemFrozen));
    assert_eq!(status.member_count, 4);
    assert_eq!(status.nodes.len(), 3);
    assert!(status.freeze_window_millis.is_some(), "{status:?}");
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.freeze_window_millis.is_some()),
        "{status:?}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True");
    for member in &status.members {
        assert!(member.frozen, "{member:?}");
        assert!(
            member.cut_time.is_some() && member.size.is_some(),
            "{member:?}"
        );
        assert_eq!(
            member.node,
            w.node(match member.claim.as_str() {
                "data" | "wal" => "a",
                "index" => "b",
                _ => "c",
            })
        );
    }
    for n in w.node_snapshots().await {
        assert_eq!(n.spec.action, NodeAction::Release);
        assert_eq!(n.status.expect("status").phase, NodePhase::Released);
    }
    w.assert_nothing_frozen();

    // Every member's snapshot: clean filesystem, the data from before, nothing from after, and
    // the ordered writer's counts form one point in time across all four volumes and three nodes.
    let mut counts = Vec::new();
    for claim in &order {
        let member = status
            .members
            .iter()
            .find(|m| &m.claim == claim)
            .expect("member");
        let clone = clone_path(member.snapshot_handle.as_deref().expect("handle"));
        let fs = w.volumes[claim].fs.clone();
        let mnt = open_snapshot(&mut w.scratch, &clone, &fs, claim);
        assert_eq!(
            agent_support::sha256_file(&mnt.join("before.bin")),
            before[claim],
            "{claim}"
        );
        assert!(
            !mnt.join("after.bin").exists(),
            "{claim}: data written after the snapshot is in it"
        );
        counts.push(count_lines(&mnt.join("sequence")));
        w.scratch.unmount(&mnt);
    }
    for pair in counts.windows(2) {
        assert!(
            pair[0] >= pair[1] && pair[0] <= pair[1] + 1,
            "the snapshots are not one point in time: sequence counts {counts:?} in order {order:?}"
        );
    }

    // Re-applying the same object (GitOps) never cuts again.
    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .patch(
            "shop-1",
            &PatchParams::apply("gitops").force(),
            &Patch::Apply(
                json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
                "metadata": {"name": "shop-1", "labels": {"synced": "yes"}},
                "spec": {"groupName": "shop", "deletionPolicy": "Delete"}}),
            ),
        )
        .await
        .expect("re-apply");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = snapshots
        .get("shop-1")
        .await
        .expect("snapshot")
        .status
        .expect("status");
    assert_eq!(again.phase, GroupSnapshotPhase::Ready);
    assert_eq!(
        again.start_time, status.start_time,
        "re-applying started a new cut"
    );
    assert_eq!(w.node_snapshots().await.len(), 3);
    assert_eq!(w.snapshot_files().len(), 4, "{:?}", w.snapshot_files());

    // A member snapshot cannot be deleted on its own: its NodeSnapshot waits for the group.
    let nodes: Api<NodeSnapshot> = w.env.api();
    let first = w.node_snapshots().await.remove(0);
    let first_name = first.metadata.name.clone().expect("name");
    nodes
        .delete(&first_name, &DeleteParams::default())
        .await
        .expect("delete nsnap");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        nodes.get_opt(&first_name).await.expect("get").is_some(),
        "a member snapshot was deleted on its own"
    );
    assert_eq!(w.snapshot_files().len(), 4, "{:?}", w.snapshot_files());

    // deletionPolicy Delete: the clones go with the GroupSnapshot.
    snapshots
        .delete("shop-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "GroupSnapshot and NodeSnapshots gone", || {
        let snapshots = snapshots.clone();
        let nodes = nodes.clone();
        async move {
            let gone = snapshots.get_opt("shop-1").await.ok()?.is_none();
            let nodes_gone = nodes
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            (gone && nodes_gone).then_some(())
        }
    })
    .await;
    assert!(
        w.snapshot_files().is_empty(),
        "clones left behind: {:?}",
        w.snapshot_files()
    );
}

#[tokio::test]
async fn single_node_snapshot_with_retain_keeps_the_clones() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-retain").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.add_volume("two", "a", "ext4", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_group("solo", json!({"claims": ["one", "two"]}))
        .await;
    w.create_snapshot("solo-1", "solo", "Retain").await;
    let snapshot = w.wait_phase("solo-1", GroupSnapshotPhase::Ready).await;
    let status = snapshot.status.expect("status");
    assert_eq!(status.consistency, Some(Consistency::FilesystemFrozen));
    // One node: the agent thawed right after its cut, without waiting for a release.
    let nodes = w.node_snapshots().await;
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].spec.release_after_cut);
    assert_eq!(nodes[0].spec.action, NodeAction::Cut);
    assert_eq!(w.snapshot_files().len(), 2);

    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .delete("solo-1", &DeleteParams::default())
        .await
        .expect("delete");
    let nodes_api: Api<NodeSnapshot> = w.env.api();
    eventually(WAIT, "GroupSnapshot gone", || {
        let snapshots = snapshots.clone();
        let nodes_api = nodes_api.clone();
        async move {
            let gone = snapshots.get_opt("solo-1").await.ok()?.is_none()
                && nodes_api
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty();
            gone.then_some(())
        }
    })
    .await;
    assert_eq!(w.snapshot_files().len(), 2, "Retain must keep the clones");
    w.assert_nothing_frozen();
    for file in w.snapshot_files() {
        std::fs::remove_file(file).expect("remove retained clone");
    }
}
