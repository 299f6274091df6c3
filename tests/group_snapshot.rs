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
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
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
        // Released by the agents themselves once every node had cut, or by the controller if
        // it came first.
        assert!(
            matches!(n.spec.action, NodeAction::Cut | NodeAction::Release),
            "{:?}",
            n.spec
        );
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

/// The agents release each other: with the controller's release held back (test-only delay),
/// the snapshot still becomes Ready at once, every node released itself (its action is still
/// `Cut`), and the snapshots hold what was written before.
#[tokio::test]
async fn across_nodes_the_agents_release_themselves_once_every_node_has_cut() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-siblings").await;
    for (claim, node, fs) in [
        ("data", "a", "xfs"),
        ("wal", "b", "ext4"),
        ("log", "c", "xfs"),
    ] {
        w.add_volume(claim, node, fs, &[("app", "shop")]).await;
    }
    for node in ["a", "b", "c"] {
        w.start_agent(node);
    }
    w.start_controller_with(&["--test-only-release-delay-ms", "600000"]);
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 60}),
    )
    .await;
    let mut before = BTreeMap::new();
    for (claim, volume) in &w.volumes {
        let hash = agent_support::write_file(&volume.mount.join("before.bin"), 1 << 20, 3, true);
        before.insert(claim.clone(), hash);
    }

    w.create_snapshot("shop-1", "shop", "Delete").await;
    let snapshot = w.wait_phase("shop-1", GroupSnapshotPhase::Ready).await;
    let status = snapshot.status.expect("status");
    assert_eq!(status.consistency, Some(Consistency::FilesystemFrozen));
    assert!(status.members.iter().all(|m| m.frozen), "{status:?}");
    let nodes = w.node_snapshots().await;
    assert_eq!(nodes.len(), 3);
    let mut group_nodes: Vec<String> = ["a", "b", "c"].iter().map(|n| w.node(n)).collect();
    group_nodes.sort();
    for n in &nodes {
        assert_eq!(n.spec.group_nodes, group_nodes, "{:?}", n.spec);
        assert_eq!(
            n.spec.action,
            NodeAction::Cut,
            "the controller released {}, not its agent",
            n.spec.node_name
        );
        assert_eq!(
            n.status.as_ref().map(|s| s.phase),
            Some(NodePhase::Released)
        );
    }
    w.assert_nothing_frozen();
    // Every sibling watch stops with its cut, and stays stopped (the actions stay `Cut` for good:
    // a watch started again on them would live as long as the snapshot).
    let logs = w.logs();
    let node_names: Vec<String> = ["a", "b", "c"].iter().map(|n| w.node(n)).collect();
    let balanced = || {
        node_names.iter().all(|node| {
            let log =
                std::fs::read_to_string(logs.join(format!("agent-{node}.log"))).unwrap_or_default();
            let started = log.matches("sibling watch started").count();
            started > 0 && started == log.matches("sibling watch stopped").count()
        })
    };
    eventually(WAIT, "every sibling watch stopped", || {
        let done = balanced();
        async move { done.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        balanced(),
        "a sibling watch started again after its cut ended"
    );
    for volume in w.volumes.values() {
        agent_support::write_file(&volume.mount.join("after.bin"), 4096, 7, true);
    }
    let claims: Vec<String> = w.volumes.keys().cloned().collect();
    for claim in claims {
        let member = status
            .members
            .iter()
            .find(|m| m.claim == claim)
            .expect("member");
        let clone = clone_path(member.snapshot_handle.as_deref().expect("handle"));
        let fs = w.volumes[&claim].fs.clone();
        let mnt = open_snapshot(&mut w.scratch, &clone, &fs, &claim);
        assert_eq!(
            agent_support::sha256_file(&mnt.join("before.bin")),
            before[&claim],
            "{claim}"
        );
        assert!(!mnt.join("after.bin").exists(), "{claim}: written after");
        w.scratch.unmount(&mnt);
    }
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
    // The GroupSnapshot goes; its NodeSnapshot stays as the record of the kept clones.
    let kept = eventually(WAIT, "GroupSnapshot gone, NodeSnapshot kept", || {
        let snapshots = snapshots.clone();
        let nodes_api = nodes_api.clone();
        async move {
            let gone = snapshots.get_opt("solo-1").await.ok()?.is_none();
            let nodes = nodes_api.list(&ListParams::default()).await.ok()?.items;
            match nodes.as_slice() {
                [kept] if gone && kept.owner_references().is_empty() => Some(kept.clone()),
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(w.snapshot_files().len(), 2, "Retain must keep the clones");
    w.assert_nothing_frozen();
    // Deleting the kept NodeSnapshot deletes the clones.
    nodes_api
        .delete(&kept.name_any(), &DeleteParams::default())
        .await
        .expect("delete kept");
    eventually(WAIT, "kept clones deleted", || async {
        w.snapshot_files().is_empty().then_some(())
    })
    .await;
}

/// NodeSnapshots kept by a `Retain` deletion (no owner, label tandem.dev/retained).
async fn kept_node_snapshots(w: &World) -> Vec<NodeSnapshot> {
    w.node_snapshots()
        .await
        .into_iter()
        .filter(|n| n.labels().get("tandem.dev/retained").map(String::as_str) == Some("true"))
        .collect()
}

#[tokio::test]
async fn retained_snapshots_stay_counted_as_nodesnapshots_and_the_quota_bounds_them() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-retain-quota").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_group("g", json!({"claims": ["one"]})).await;
    // One GroupSnapshot at a time, at most two NodeSnapshots: Retain loops cannot pile up
    // snapshots that nothing accounts for.
    w.create_quota(
        "snapshots",
        json!({"count/groupsnapshots.tandem.dev": "1", "count/nodesnapshots.tandem.dev": "2"}),
    )
    .await;
    for round in 1..=2 {
        let name = format!("daily-{round}");
        w.create_snapshot(&name, "g", "Retain").await;
        let ready = w.wait_phase(&name, GroupSnapshotPhase::Ready).await;
        let clone = World::member_clone(&ready, "one");
        if round == 1 {
            w.delete_snapshot(&name).await;
        } else {
            // GitOps tools delete in the foreground: the garbage collector deletes the
            // NodeSnapshots first. What they keep must stay all the same.
            let snapshots: Api<GroupSnapshot> = w.env.api();
            snapshots
                .delete(&name, &DeleteParams::foreground())
                .await
                .expect("delete in the foreground");
            eventually(WAIT, "the GroupSnapshot gone", || {
                let snapshots = snapshots.clone();
                let name = name.clone();
                async move { snapshots.get_opt(&name).await.ok()?.is_none().then_some(()) }
            })
            .await;
        }
        // The snapshot stays, and so does an object that accounts for it.
        assert!(clone.exists(), "round {round}: the retained clone is gone");
        let kept = kept_node_snapshots(&w).await;
        assert_eq!(kept.len(), round, "round {round}: {kept:?}");
        let mine = kept
            .iter()
            .find(|n| {
                n.status.as_ref().is_some_and(|s| {
                    s.volumes.iter().any(|v| {
                        v.snapshot_handle
                            .as_deref()
                            .is_some_and(|h| h.ends_with(&*clone.to_string_lossy()))
                    })
                })
            })
            .expect("the kept NodeSnapshot names the clone");
        assert!(mine.owner_references().is_empty(), "{mine:?}");
        assert_eq!(
            mine.spec.deletion_policy,
            tandem::api::DeletionPolicy::Delete
        );
        // Released to be deleted by whoever deletes it; one that was already being deleted keeps
        // the controller's finalizer as its hold.
        assert_eq!(
            mine.finalizers()
                .iter()
                .any(|f| f == "tandem.dev/group-snapshot"),
            round == 2,
            "{mine:?}"
        );
        assert_eq!(mine.metadata.deletion_timestamp.is_some(), round == 2);
    }
    // The Event says where the data is.
    let events: Api<k8s_openapi::api::events::v1::Event> = w.env.api();
    let retained = eventually(WAIT, "a Retained event", || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| e.reason.as_deref() == Some("Retained"))
        }
    })
    .await;
    assert!(
        retained
            .note
            .as_deref()
            .is_some_and(|n| n.contains("NodeSnapshot")),
        "{retained:?}"
    );
    // The third round finds the quota full and fails, saying why; nothing more is kept.
    w.create_snapshot("daily-3", "g", "Retain").await;
    let failed = w.wait_phase("daily-3", GroupSnapshotPhase::Failed).await;
    let message = failed.status.expect("status").message.expect("message");
    assert!(message.contains("exceeded quota"), "{message}");
    assert_eq!(w.snapshot_files().len(), 2, "{:?}", w.snapshot_files());
    w.assert_nothing_frozen();

    // Deleting a kept NodeSnapshot deletes its snapshot.
    let nodes: Api<NodeSnapshot> = w.env.api();
    let kept = kept_node_snapshots(&w).await;
    let (terminating, live): (Vec<_>, Vec<_>) = kept
        .into_iter()
        .partition(|n| n.metadata.deletion_timestamp.is_some());
    assert_eq!((terminating.len(), live.len()), (1, 1));
    let first_name = live[0].name_any();
    nodes
        .delete(&first_name, &DeleteParams::default())
        .await
        .expect("delete kept");
    let w = &w;
    eventually(WAIT, "the kept NodeSnapshot and its clone gone", || {
        let nodes = nodes.clone();
        let first_name = first_name.clone();
        async move {
            let gone = nodes.get_opt(&first_name).await.ok()?.is_none();
            (gone && w.snapshot_files().len() == 1).then_some(())
        }
    })
    .await;
    // The one kept from a foreground deletion goes when its finalizer is removed.
    nodes
        .patch(
            &terminating[0].name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": ["tandem.dev/agent"]}})),
        )
        .await
        .expect("release the terminating one");
    eventually(WAIT, "its clone gone", || async {
        w.snapshot_files().is_empty().then_some(())
    })
    .await;
    for file in w.snapshot_files() {
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test]
async fn a_group_snapshot_whose_finalizer_was_removed_leaves_nothing_behind() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-orphan").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_group("g", json!({"claims": ["one"]})).await;
    w.create_snapshot("del", "g", "Delete").await;
    w.wait_phase("del", GroupSnapshotPhase::Ready).await;
    w.create_snapshot("ret", "g", "Retain").await;
    w.wait_phase("ret", GroupSnapshotPhase::Ready).await;
    assert_eq!(w.snapshot_files().len(), 2);

    // With the controller away (so no cleanup runs), the snapshots are deleted and someone
    // removes tandem's finalizer: the GroupSnapshots go, and the garbage collector deletes
    // their NodeSnapshots, which keep the controller's finalizer.
    w.controller.as_mut().expect("controller").stop();
    let snapshots: Api<GroupSnapshot> = w.env.api();
    for name in ["del", "ret"] {
        snapshots
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
        snapshots
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .expect("remove finalizer");
    }
    eventually(WAIT, "the NodeSnapshots to be Terminating", || async {
        let nodes = w.node_snapshots().await;
        (nodes.len() == 2
            && nodes
                .iter()
                .all(|n| n.metadata.deletion_timestamp.is_some()))
        .then_some(())
    })
    .await;
    // The controller, back, sweeps the orphans: nothing is left that no object accounts for.
    w.start_controller();
    eventually(
        Duration::from_secs(30),
        "the orphaned NodeSnapshots and their clones gone",
        || async {
            (w.node_snapshots().await.is_empty() && w.snapshot_files().is_empty()).then_some(())
        },
    )
    .await;
    w.assert_nothing_frozen();
}

#[tokio::test]
async fn a_delete_the_agent_cannot_finish_is_shown_on_the_group_snapshot() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-delfail").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_group("g", json!({"claims": ["one"]})).await;
    w.create_snapshot("s", "g", "Delete").await;
    w.wait_phase("s", GroupSnapshotPhase::Ready).await;
    // The agent goes away; the test reports, as the agent would, that its delete keeps failing.
    w.agent("a").stop();
    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .delete("s", &DeleteParams::default())
        .await
        .expect("delete");
    let nodes: Api<NodeSnapshot> = w.env.api();
    let name = w.node_snapshots().await.remove(0).name_any();
    nodes
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "DeleteFailed", "status": "True", "reason": "BackendError",
                "message": "lvremove: Logical volume vg0/x in use",
                "lastTransitionTime": "2026-12-01T00:00:00Z"
            }]}})),
        )
        .await
        .expect("report the failure");
    let status = eventually(WAIT, "the failure on the GroupSnapshot", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("s").await.ok()?.status?;
            status
                .message
                .as_deref()?
                .contains("lvremove: Logical volume vg0/x in use")
                .then_some(status)
        }
    })
    .await;
    assert_eq!(status.phase, GroupSnapshotPhase::Deleting);
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "DeleteFailed" && c.status == "True"),
        "{status:?}"
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = w.env.api();
    eventually(WAIT, "a DeleteFailed event", || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .iter()
                .any(|e| e.reason.as_deref() == Some("DeleteFailed"))
                .then_some(())
        }
    })
    .await;
    // The agent, back, finishes the deletion.
    w.start_agent("a");
    eventually(WAIT, "the GroupSnapshot gone", || {
        let snapshots = snapshots.clone();
        async move { snapshots.get_opt("s").await.ok()?.is_none().then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn a_recreated_snapshot_cuts_new_data_and_never_touches_the_one_kept() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-reuse").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.add_volume("two", "b", "ext4", &[]).await;
    w.start_agent("a");
    w.start_agent("b");
    w.start_controller();
    w.create_group("solo", json!({"claims": ["one"]})).await;
    w.create_group(
        "pair",
        json!({"claims": ["one", "two"], "freeze": "Required"}),
    )
    .await;
    let write = |w: &World, seed: u64| {
        agent_support::write_file(
            &w.volumes["one"].mount.join("data.bin"),
            1 << 20,
            seed,
            true,
        )
    };

    // `daily` (Retain), Ready, deleted: its clone stays, with the data of its cut.
    write(&w, 1);
    w.create_snapshot("daily", "solo", "Retain").await;
    let first = w.wait_phase("daily", GroupSnapshotPhase::Ready).await;
    let first_clone = World::member_clone(&first, "one");
    let first_hash = agent_support::sha256_file(&first_clone);
    w.delete_snapshot("daily").await;
    assert!(first_clone.exists());

    // New data, `daily` again: its snapshot holds the new data; the first one is untouched.
    write(&w, 2);
    w.create_snapshot("daily", "solo", "Retain").await;
    let second = w.wait_phase("daily", GroupSnapshotPhase::Ready).await;
    let second_clone = World::member_clone(&second, "one");
    let open_data = |w: &mut World, clone: &std::path::Path, label: &str| {
        let mnt = open_snapshot(&mut w.scratch, clone, "xfs", label);
        let hash = agent_support::sha256_file(&mnt.join("data.bin"));
        w.scratch.unmount(&mnt);
        hash
    };
    let live = agent_support::sha256_file(&w.volumes["one"].mount.join("data.bin"));
    assert_eq!(
        open_data(&mut w, &second_clone, "second"),
        live,
        "the second `daily` reports Ready with the data of the first"
    );
    assert!(first_clone.exists(), "the first clone is gone");
    assert_eq!(agent_support::sha256_file(&first_clone), first_hash);
    w.delete_snapshot("daily").await;

    // A later `daily` of both volumes that fails on node b (someone else froze "two") must not
    // delete node a's kept snapshots.
    let stuck = w.volumes["two"].mount.clone();
    w.scratch.assert_owned(&stuck);
    let fd = tandem::agent::freeze::open_dir(&stuck).expect("open two");
    tandem::agent::freeze::freeze(&fd, &stuck).expect("freeze two");
    w.create_snapshot("daily", "pair", "Retain").await;
    w.wait_phase("daily", GroupSnapshotPhase::Failed).await;
    tandem::agent::freeze::thaw(&fd, &stuck).expect("thaw two");
    assert!(
        first_clone.exists(),
        "a failed snapshot deleted the one kept before it"
    );
    assert_eq!(agent_support::sha256_file(&first_clone), first_hash);
    w.assert_nothing_frozen();
    for file in w.snapshot_files() {
        let _ = std::fs::remove_file(file);
    }
}
