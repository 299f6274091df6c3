//! GroupRestore on the real control plane (kube-apiserver + kube-controller-manager, whose PV
//! controller binds the pre-bound PVs tandem makes), the real `tandem controller`, and real
//! GroupSnapshots cut by real `tandem agent`s over loop-backed volumes. Needs root.

mod agent_support;
mod support;
mod world;

use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use tandem::api::{
    CONSISTENCY_ANNOTATION, CUT_TIME_ANNOTATION, GROUP_RESTORE_LABEL, GroupRestore,
    GroupSnapshotPhase, NodeRestore, NodeRestoreAction, RESTORED_FROM_ANNOTATION, RestorePhase,
};
use world::{WAIT, World, condition_reason, require_root};

/// A world with volumes (claim, node, fs), their agents, the controller, the restore class, a
/// group over them and a Ready GroupSnapshot `snap`.
async fn snapshot_world(name: &str, volumes: &[(&str, &str, &str)]) -> World {
    let mut w = World::new(name).await;
    for (claim, node, fs) in volumes {
        w.add_volume(claim, node, fs, &[("app", "shop")]).await;
    }
    let mut nodes: Vec<&str> = volumes.iter().map(|(_, n, _)| *n).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        w.start_agent(node);
    }
    w.ensure_restore_class().await;
    w.start_controller();
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20}),
    )
    .await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    w
}

async fn events_of(w: &World, restore: &str) -> Vec<Event> {
    let events: Api<Event> = w.env.api();
    events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(restore))
        .collect()
}

#[tokio::test]
async fn every_bad_input_fails_with_its_reason_and_nothing_is_created() {
    if !require_root() {
        return;
    }
    let w = snapshot_world("gr-bad", &[("data", "a", "xfs"), ("wal", "a", "ext4")]).await;
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    // In the way of restore `exists`: a claim of the same name that is not waiting for it.
    claims
        .create(
            &PostParams::default(),
            &support::objects::claim("data-exists", None, &[]),
        )
        .await
        .expect("claim in the way");
    // A snapshot that is not Ready (its group does not exist: it waits, then fails).
    w.create_snapshot("unready", "no-such-group", "Delete")
        .await;

    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "missing",
            json!({"source": {"groupSnapshotName": "nope"}}),
            "GroupSnapshotNotFound",
        ),
        (
            "unready",
            json!({"source": {"groupSnapshotName": "unready"}}),
            "GroupSnapshotNotReady",
        ),
        (
            "foreign",
            json!({"source": {"groupSnapshotName": "snap", "namespace": "elsewhere"}}),
            "CrossNamespace",
        ),
        (
            "exists",
            json!({"source": {"groupSnapshotName": "snap"}}),
            "ClaimExists",
        ),
        (
            "dup",
            json!({"source": {"groupSnapshotName": "snap"}, "newClaims": {"nameTemplate": "x-{restore}"}}),
            "DuplicateClaimName",
        ),
        (
            "unknown",
            json!({"source": {"groupSnapshotName": "snap"},
                "newClaims": {"claims": [{"from": "index", "to": "index-copy"}]}}),
            "UnknownMember",
        ),
    ];
    for (name, spec, _) in &cases {
        w.create_restore(name, spec.clone()).await;
    }
    for (name, _, reason) in &cases {
        let r = w
            .wait_restore_phase_for(name, RestorePhase::Failed, Duration::from_secs(40))
            .await;
        assert_eq!(
            condition_reason(&r, "Ready").as_deref(),
            Some(*reason),
            "{name}: {:?}",
            r.status
        );
        let message = r
            .status
            .as_ref()
            .and_then(|s| s.message.clone())
            .unwrap_or_default();
        assert!(
            message.len() > 30,
            "{name}: a message a person can act on: {message}"
        );
        assert_eq!(
            w.restore_objects(name).await,
            (vec![], vec![], vec![]),
            "{name}: nothing may be created"
        );
        assert!(
            events_of(&w, name)
                .await
                .iter()
                .any(|e| e.type_.as_deref() == Some("Warning")
                    && e.reason.as_deref() == Some(reason)),
            "{name}: a Warning event {reason}"
        );
    }
    // The claim in the way is untouched.
    let untouched = w.claim("data-exists").await.expect("still there");
    assert!(untouched.labels().get(GROUP_RESTORE_LABEL).is_none());

    // A Failed snapshot is refused as such.
    w.wait_phase("unready", GroupSnapshotPhase::Failed).await;
    w.create_restore(
        "failed-source",
        json!({"source": {"groupSnapshotName": "unready"}}),
    )
    .await;
    let r = w
        .wait_restore_phase("failed-source", RestorePhase::Failed)
        .await;
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("GroupSnapshotFailed")
    );

    // Quota: three claims exist, a quota of three admits no more; the restore fails before any
    // clone or claim is made.
    w.create_quota("claims", json!({"persistentvolumeclaims": "3"}))
        .await;
    w.create_restore(
        "over-quota",
        json!({"source": {"groupSnapshotName": "snap"}}),
    )
    .await;
    let r = w
        .wait_restore_phase("over-quota", RestorePhase::Failed)
        .await;
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("QuotaExceeded"),
        "{:?}",
        r.status
    );
    let message = r.status.and_then(|s| s.message).unwrap_or_default();
    assert!(message.contains("persistentvolumeclaims"), "{message}");
    assert_eq!(
        w.restore_objects("over-quota").await,
        (vec![], vec![], vec![])
    );

    // Re-applying a Failed restore does nothing: it stays Failed, still nothing made.
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .patch(
            "exists",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"touched": "again"}}})),
        )
        .await
        .expect("re-apply");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = restores.get("exists").await.expect("get");
    assert_eq!(r.status.expect("status").phase, RestorePhase::Failed);
    assert_eq!(w.restore_objects("exists").await, (vec![], vec![], vec![]));
}

#[tokio::test]
async fn a_missing_or_foreign_storage_class_is_refused() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gr-class").await;
    w.add_volume("data", "a", "xfs", &[("app", "shop")]).await;
    w.start_agent("a");
    let missing = format!("{}-missing", w.env.namespace);
    let foreign = format!("{}-foreign", w.env.namespace);
    w.ensure_storage_class(&foreign, "kubernetes.io/no-provisioner")
        .await;
    w.start_controller_with(&["--restore-storage-class", &missing]);
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}}),
    )
    .await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    w.create_restore("r1", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let r = w.wait_restore_phase("r1", RestorePhase::Failed).await;
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("StorageClassNotFound")
    );
    assert!(
        r.status
            .and_then(|s| s.message)
            .unwrap_or_default()
            .contains(&missing),
        "names the class"
    );
    assert_eq!(w.restore_objects("r1").await, (vec![], vec![], vec![]));

    // The environment variable names the class too; one of another provisioner is refused (it
    // could bind the claims to empty volumes).
    if let Some(mut c) = w.controller.take() {
        c.stop();
    }
    let namespace = w.env.namespace.clone();
    let cmd = &mut w.tandem(&["controller", "--namespace", &namespace]);
    cmd.env("TANDEM_RESTORE_STORAGE_CLASS", &foreign);
    w.controller = Some(support::process::Daemon::spawn(
        "controller-2",
        cmd,
        &w.logs(),
    ));
    w.create_restore("r2", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let r = w.wait_restore_phase("r2", RestorePhase::Failed).await;
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("StorageClassNotTandem")
    );
    assert_eq!(w.restore_objects("r2").await, (vec![], vec![], vec![]));
}

#[tokio::test]
async fn mode_and_source_cannot_be_changed() {
    let env = support::TestEnv::new("gr-immutable").await;
    let restores: Api<GroupRestore> = env.api();
    restores
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "r"},
                "spec": {"source": {"groupSnapshotName": "snap"}, "mode": "NewClaims"}}))
            .expect("restore"),
        )
        .await
        .expect("create");
    for (patch, field) in [
        (
            json!({"spec": {"mode": "InPlace"}}),
            "spec.mode is immutable",
        ),
        (
            json!({"spec": {"source": {"groupSnapshotName": "other"}}}),
            "spec.source is immutable",
        ),
        (
            json!({"spec": {"source": {"groupSnapshotName": "snap", "namespace": "x"}}}),
            "spec.source is immutable",
        ),
    ] {
        let err = restores
            .patch("r", &PatchParams::default(), &Patch::Merge(patch.clone()))
            .await
            .expect_err("refused by the schema");
        assert!(err.to_string().contains(field), "{patch}: {err}");
    }
    // And InPlace options on a NewClaims restore are refused at creation.
    let err = restores
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "r2"},
                "spec": {"source": {"groupSnapshotName": "snap"}, "mode": "NewClaims",
                    "inPlace": {"workloads": "Refuse"}}}))
            .expect("restore"),
        )
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("spec.inPlace applies to mode InPlace only"),
        "{err}"
    );
}

/// The clone reports of `restore`'s NodeRestores, written by the test as an agent would (the
/// agents were stopped): every volume Cloned at `path`.
async fn report_cloned(
    w: &World,
    restore: &str,
    path: &str,
    only: Option<&str>,
) -> Vec<NodeRestore> {
    let nodes: Api<NodeRestore> = w.env.api();
    let restores: Api<GroupRestore> = w.env.api();
    let selector = format!("{GROUP_RESTORE_LABEL}={restore}");
    // The controller creates one NodeRestore per node, one after another: wait for all of them.
    let listed = eventually(WAIT, "a NodeRestore on every member's node", || {
        let nodes = nodes.clone();
        let restores = restores.clone();
        let selector = selector.clone();
        async move {
            let status = restores.get(restore).await.ok()?.status?;
            let member_nodes: std::collections::BTreeSet<String> =
                status.members.iter().map(|m| m.node.clone()).collect();
            let l = nodes
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            let listed: std::collections::BTreeSet<String> =
                l.items.iter().map(|n| n.spec.node_name.clone()).collect();
            (!member_nodes.is_empty() && member_nodes.is_subset(&listed)).then_some(l.items)
        }
    })
    .await;
    for n in &listed {
        if only.is_some_and(|node| node != n.spec.node_name) {
            continue;
        }
        let volumes: Vec<_> = n
            .spec
            .volumes
            .iter()
            .map(|v| {
                json!({"persistentVolume": v.persistent_volume, "state": "Cloned",
                    "method": "Clone", "backend": "reflink", "path": path, "block": false,
                    "filesystem": "xfs", "sizeBytes": 64 << 20,
                    "clonedAt": "2026-12-01T10:00:00Z"})
            })
            .collect();
        nodes
            .patch_status(
                &n.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Cloned", "volumes": volumes}})),
            )
            .await
            .expect("report");
    }
    listed
}

#[tokio::test]
async fn unit_style_binding_and_deleting_driven_by_status_the_test_writes_not_an_agent() {
    if !require_root() {
        return;
    }
    // This drives the controller's half only: the NodeRestore status is written by the test.
    // The end-to-end tests below prove the same with real agents and real clones.
    let mut w = snapshot_world("gr-driven", &[("data", "a", "xfs"), ("wal", "b", "ext4")]).await;
    for node in ["a", "b"] {
        w.agent(node).stop();
    }
    w.create_restore(
        "tue",
        json!({"source": {"groupSnapshotName": "snap"},
            "newClaims": {"labels": {"app": "shop-tue"}}}),
    )
    .await;
    let r = w.wait_restore_phase("tue", RestorePhase::Cloning).await;
    let status = r.status.expect("status");
    assert_eq!(status.member_count, 2);
    // The claims wait, Pending, in the restore class, before any volume exists.
    for claim in ["data-tue", "wal-tue"] {
        let c = eventually(WAIT, "claim", || async { w.claim(claim).await }).await;
        let spec = c.spec.as_ref().expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("tandem-restore"));
        assert_eq!(c.labels()["app"], "shop-tue");
        assert!(spec.volume_name.is_none(), "{claim} bound before its clone");
    }
    let (_, pvs, nodes) = w.restore_objects("tue").await;
    assert!(pvs.is_empty(), "no PV before every clone is made");
    assert_eq!(nodes.len(), 2, "one NodeRestore per node");

    // A scratch directory stands for the clone (no agent: nothing mounts it).
    let path = w.scratch.path("clone-dir");
    std::fs::create_dir_all(&path).expect("dir");
    report_cloned(&w, "tue", &path.to_string_lossy(), None).await;
    let r = w.wait_restore_phase("tue", RestorePhase::Completed).await;
    assert_eq!(
        condition_reason(&r, "ClaimsBound").as_deref(),
        Some("Bound")
    );
    assert_eq!(condition_reason(&r, "Ready").as_deref(), Some("Restored"));
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for member in &r.status.as_ref().expect("status").members {
        let claim = w.claim(&member.claim).await.expect("claim");
        assert_eq!(
            claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()),
            Some(member.persistent_volume.as_str())
        );
        assert_eq!(
            claim.annotations()[RESTORED_FROM_ANNOTATION],
            format!("{}/snap", w.env.namespace)
        );
        assert_eq!(
            claim.annotations()[CONSISTENCY_ANNOTATION],
            "FilesystemFrozen"
        );
        assert!(claim.annotations().contains_key(CUT_TIME_ANNOTATION));
        let pv = volumes.get(&member.persistent_volume).await.expect("pv");
        let spec = pv.spec.as_ref().expect("spec");
        assert_eq!(
            spec.claim_ref.as_ref().and_then(|c| c.uid.clone()),
            claim.uid(),
            "pre-bound to the claim's uid"
        );
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        // The reports said XFS: mounted beside its origin, it needs nouuid.
        assert_eq!(spec.mount_options, Some(vec!["nouuid".to_string()]));
        assert!(
            spec.local.as_ref().is_some_and(|l| l.fs_type.is_none()),
            "a directory has no fsType"
        );
    }

    // Deleting a restored claim: the PV controller releases its PV and leaves deletion to tandem,
    // which asks the node to delete the clone...
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let data = r
        .status
        .as_ref()
        .expect("status")
        .members
        .iter()
        .find(|m| m.source_claim == "data")
        .expect("data")
        .clone();
    claims
        .delete(&data.claim, &Default::default())
        .await
        .expect("delete claim");
    let nodes: Api<NodeRestore> = w.env.api();
    let node = eventually(WAIT, "release asked", || {
        let nodes = nodes.clone();
        let pv = data.persistent_volume.clone();
        async move {
            let l = nodes.list(&ListParams::default()).await.ok()?;
            l.items.into_iter().find(|n| {
                n.spec
                    .volumes
                    .iter()
                    .any(|v| v.persistent_volume == pv && v.release)
            })
        }
    })
    .await;
    // ...the PV stays until the node says the clone is gone...
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        volumes
            .get_opt(&data.persistent_volume)
            .await
            .expect("get")
            .is_some()
    );
    nodes
        .patch_status(
            &node.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"volumes": [
                {"persistentVolume": data.persistent_volume, "state": "Deleted"}]}})),
        )
        .await
        .expect("report deleted");
    // ...then the PV goes, and the NodeRestore whose clones are all gone goes too.
    eventually(WAIT, "PV gone", || async {
        volumes
            .get_opt(&data.persistent_volume)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    eventually(WAIT, "NodeRestore gone", || async {
        nodes
            .get_opt(&node.name_any())
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // The other claim and its volume are untouched.
    let wal = w.claim("wal-tue").await.expect("wal claim");
    assert_eq!(wal.status.and_then(|s| s.phase).as_deref(), Some("Bound"));

    // Deleting the Completed restore leaves its claims, PVs and NodeRestores alone.
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete("tue", &Default::default())
        .await
        .expect("delete restore");
    eventually(WAIT, "restore gone", || async {
        restores.get_opt("tue").await.ok()?.is_none().then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (claims_left, pvs_left, nodes_left) = w.restore_objects("tue").await;
    assert_eq!(claims_left, ["wal-tue"]);
    assert_eq!(pvs_left.len(), 1);
    assert_eq!(nodes_left.len(), 1);
    let left = nodes.get(&nodes_left[0]).await.expect("nrestore");
    assert_eq!(
        left.spec.action,
        NodeRestoreAction::Clone,
        "a completed restore's clones are kept"
    );
}

#[tokio::test]
async fn unit_style_a_failed_node_rolls_back_every_claim_and_node() {
    if !require_root() {
        return;
    }
    // The controller's half, with NodeRestore status written by the test (agents stopped).
    let mut w = snapshot_world("gr-rollback", &[("data", "a", "xfs"), ("wal", "b", "ext4")]).await;
    for node in ["a", "b"] {
        w.agent(node).stop();
    }
    // One claim a person created for the restore (GitOps) and one tandem creates.
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let given: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "wal-r"},
        "spec": {"storageClassName": "tandem-restore", "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
            "dataSourceRef": {"apiGroup": "tandem.dev", "kind": "GroupRestore", "name": "r"}}
    }))
    .expect("claim");
    claims
        .create(&PostParams::default(), &given)
        .await
        .expect("given claim");
    w.create_restore("r", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    w.wait_restore_phase("r", RestorePhase::Cloning).await;
    // The node of `data` clones, the node of `wal` fails.
    let listed = report_cloned(&w, "r", "/nonexistent", Some(&w.node("a"))).await;
    let nodes: Api<NodeRestore> = w.env.api();
    let b = listed
        .iter()
        .find(|n| n.spec.node_name == w.node("b"))
        .expect("node b");
    nodes
        .patch_status(
            &b.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Failed", "message": "the clone's place exists",
                "volumes": [{"persistentVolume": b.spec.volumes[0].persistent_volume, "state": "Failed",
                "message": "the clone's place exists"}]}})),
        )
        .await
        .expect("report failed");
    let r = w.wait_restore_phase("r", RestorePhase::Failed).await;
    let message = r
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("place exists") && message.contains("wal-r"),
        "{message}"
    );
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("CloneFailed")
    );
    // Every node aborts; no PV; the claim tandem made is gone; the one given stays Pending.
    for n in nodes
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
    {
        assert_eq!(n.spec.action, NodeRestoreAction::Abort, "{}", n.name_any());
    }
    let (made, pvs, _) = w.restore_objects("r").await;
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for pv in &pvs {
        let v = volumes.get(pv).await.expect("pv");
        assert!(
            v.metadata.deletion_timestamp.is_some(),
            "{pv} is being deleted"
        );
    }
    eventually(WAIT, "data-r deleted", || async {
        w.claim("data-r").await.is_none().then_some(())
    })
    .await;
    assert!(made.iter().all(|c| c == "data-r"), "{made:?}");
    let given = w.claim("wal-r").await.expect("the given claim stays");
    assert_eq!(
        given.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );
    assert!(given.spec.and_then(|s| s.volume_name).is_none());

    // The agents' answer (Aborted) lets the NodeRestores and the PVs go.
    for n in nodes
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
    {
        nodes
            .patch_status(
                &n.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Aborted"}})),
            )
            .await
            .expect("aborted");
    }
    eventually(WAIT, "NodeRestores gone", || async {
        nodes
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    for pv in &pvs {
        assert!(
            volumes.get_opt(pv).await.expect("get").is_none(),
            "{pv} left"
        );
    }
}

// ---- End to end: real agents, real reflink clones, the real PV controller binding. ----

/// Writes `before.bin` (synced) to every volume, snapshots, then writes `after.bin`. Returns
/// the hashes of `before.bin` and of each member snapshot image, by claim.
async fn snapshot_with_data(
    w: &World,
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
) {
    let mut before = std::collections::BTreeMap::new();
    for (claim, volume) in &w.volumes {
        let hash = agent_support::write_file(
            &volume.mount.join("before.bin"),
            1 << 20,
            claim.len() as u64,
            true,
        );
        before.insert(claim.clone(), hash);
    }
    w.create_snapshot("snap", "shop", "Delete").await;
    let snapshot = w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    for volume in w.volumes.values() {
        agent_support::write_file(&volume.mount.join("after.bin"), 4096, 7, true);
    }
    let images = w
        .volumes
        .keys()
        .map(|claim| {
            (
                claim.clone(),
                image_hash(&World::member_clone(&snapshot, claim)),
            )
        })
        .collect();
    (before, images)
}

/// The sha256 of a whole image (sha256sum: the debug build's hashing is slow for 64 MiB).
fn image_hash(path: &std::path::Path) -> String {
    let out = agent_support::sh("sha256sum", &[&path.to_string_lossy()]);
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A world like [`snapshot_world`] without the snapshot (the test writes data first).
async fn volume_world(name: &str, volumes: &[(&str, &str, &str)]) -> World {
    let mut w = World::new(name).await;
    for (claim, node, fs) in volumes {
        w.add_volume(claim, node, fs, &[("app", "shop")]).await;
    }
    let mut nodes: Vec<&str> = volumes.iter().map(|(_, n, _)| *n).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        w.start_agent(node);
    }
    w.ensure_restore_class().await;
    w.start_controller();
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20}),
    )
    .await;
    w
}

/// The clone image of a restored PV, from its NodeRestore's report.
async fn clone_image(w: &World, pv: &str) -> std::path::PathBuf {
    let nodes: Api<NodeRestore> = w.env.api();
    let handle = nodes
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .iter()
        .filter_map(|n| n.status.as_ref())
        .flat_map(|s| s.volumes.iter())
        .find(|v| v.persistent_volume == pv)
        .and_then(|v| v.clone_handle.clone())
        .expect("clone handle");
    world::clone_path(&handle)
}

/// Checks every member of a Completed restore: bound to a PV that tandem published as the
/// kubelet needs it, whose clone is byte for byte the member snapshot and mounts with the data
/// from before the snapshot and nothing after; writes to it reach neither source nor snapshot.
async fn check_restored(
    w: &mut World,
    restore: &GroupRestore,
    before: &std::collections::BTreeMap<String, String>,
    images: &std::collections::BTreeMap<String, String>,
) {
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let snapshot = w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    let members = restore.status.as_ref().expect("status").members.clone();
    assert_eq!(members.len(), w.volumes.len());
    for member in &members {
        let source = member.source_claim.clone();
        let fs = w.volumes[&source].fs.clone();
        let claim = w.claim(&member.claim).await.expect("claim");
        assert_eq!(
            claim.status.as_ref().and_then(|s| s.phase.as_deref()),
            Some("Bound")
        );
        assert_eq!(
            claim.spec.as_ref().and_then(|s| s.volume_name.as_deref()),
            Some(member.persistent_volume.as_str())
        );
        for key in [
            RESTORED_FROM_ANNOTATION,
            CUT_TIME_ANNOTATION,
            CONSISTENCY_ANNOTATION,
        ] {
            assert!(
                claim.annotations().contains_key(key),
                "{} lacks {key}",
                member.claim
            );
        }
        let pv = volumes.get(&member.persistent_volume).await.expect("pv");
        let spec = pv.spec.clone().expect("spec");
        let local = spec.local.clone().expect("local");
        assert_eq!(
            local.fs_type.as_deref(),
            Some(fs.as_str()),
            "fsType from the clone"
        );
        assert_eq!(
            spec.mount_options.clone().unwrap_or_default(),
            if fs == "xfs" {
                vec!["nouuid".to_string()]
            } else {
                vec![]
            }
        );
        assert_eq!(
            member.node,
            w.node(if source == "wal" && w.agents.len() > 1 {
                "b"
            } else {
                "a"
            })
        );
        // Byte for byte the member snapshot (before anything mounts it).
        let image = clone_image(w, &member.persistent_volume).await;
        assert_eq!(
            image_hash(&image),
            images[&source],
            "{source}: clone != snapshot"
        );
        // Mounted as the kubelet would (read-only here; nouuid beside its XFS origin).
        let dir = w.scratch.path(&format!("restored-{}", member.claim));
        let mut options = vec!["ro"];
        if fs == "xfs" {
            options.push("nouuid");
        }
        w.scratch.mount(&local.path, &dir, &options);
        assert_eq!(
            agent_support::sha256_file(&dir.join("before.bin")),
            before[&source]
        );
        assert!(
            !dir.join("after.bin").exists(),
            "{source}: a write after the snapshot"
        );
        w.scratch.unmount(&dir);
        // A write to the restored volume touches neither the source nor the snapshot.
        let mut options = vec![];
        if fs == "xfs" {
            options.push("nouuid");
        }
        w.scratch.mount(&local.path, &dir, &options);
        agent_support::write_file(&dir.join("restored.bin"), 1 << 20, 99, true);
        w.scratch.unmount(&dir);
        assert!(!w.volumes[&source].mount.join("restored.bin").exists());
        assert_eq!(
            image_hash(&World::member_clone(&snapshot, &source)),
            images[&source],
            "{source}: the snapshot changed"
        );
    }
}

/// Deletes every restored claim of `restore` and waits until its PVs, clones, links and
/// NodeRestores are gone.
async fn delete_restored_claims(w: &World, restore: &GroupRestore) {
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let members = restore.status.as_ref().expect("status").members.clone();
    let mut images = Vec::new();
    for m in &members {
        images.push(clone_image(w, &m.persistent_volume).await);
        claims
            .delete(&m.claim, &Default::default())
            .await
            .expect("delete claim");
    }
    for m in &members {
        eventually(
            WAIT,
            &format!("PV {} gone", m.persistent_volume),
            || async {
                volumes
                    .get_opt(&m.persistent_volume)
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            },
        )
        .await;
    }
    for image in &images {
        assert!(!image.exists(), "clone {} left behind", image.display());
    }
    let nodes: Api<NodeRestore> = w.env.api();
    eventually(WAIT, "NodeRestores gone", || async {
        nodes
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    for node in w.agents.keys() {
        let links = w.scratch.path(&format!("links-{node}"));
        let left: Vec<_> = std::fs::read_dir(&links)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "links left on {node}: {left:?}");
    }
}

#[tokio::test]
async fn restored_claims_on_two_nodes_bind_together_to_clones_of_the_snapshot_and_deleting_them_removes_the_volumes()
 {
    if !require_root() {
        return;
    }
    let mut w = volume_world("gr-e2e-2", &[("data", "a", "xfs"), ("wal", "b", "ext4")]).await;
    let (before, images) = snapshot_with_data(&w).await;
    let started = std::time::Instant::now();
    w.create_restore(
        "tue",
        json!({"source": {"groupSnapshotName": "snap"}, "newClaims": {"labels": {"app": "shop-tue"}}}),
    )
    .await;
    let r = w.wait_restore_phase("tue", RestorePhase::Completed).await;
    println!(
        "apply to Completed (2 members, 2 nodes): {:?}",
        started.elapsed()
    );
    assert_eq!(
        condition_reason(&r, "ClaimsBound").as_deref(),
        Some("Bound")
    );
    let status = r.status.clone().expect("status");
    assert_eq!(status.member_count, 2);
    assert!(
        status
            .members
            .iter()
            .all(|m| m.method.is_some() && m.cloned_at.is_some()),
        "{status:?}"
    );
    // kubectl shows it.
    let shown = w.env.kubectl(&["get", "grestore", "tue"]).expect("kubectl");
    assert!(
        shown.contains("Completed") && shown.contains("FilesystemFrozen"),
        "{shown}"
    );
    check_restored(&mut w, &r, &before, &images).await;
    // The source claims and the snapshot are untouched by the whole restore.
    for (claim, volume) in &w.volumes {
        assert_eq!(
            agent_support::sha256_file(&volume.mount.join("before.bin")),
            before[claim]
        );
    }
    delete_restored_claims(&w, &r).await;
}

#[tokio::test]
async fn a_one_node_restore_of_xfs_and_ext4_members() {
    if !require_root() {
        return;
    }
    let mut w = volume_world("gr-e2e-1", &[("data", "a", "xfs"), ("wal", "a", "ext4")]).await;
    let (before, images) = snapshot_with_data(&w).await;
    w.create_restore(
        "one",
        json!({"source": {"groupSnapshotName": "snap"},
            "newClaims": {"claims": [{"from": "data", "to": "data-copy"}, {"from": "wal", "to": "wal-copy"}]}}),
    )
    .await;
    let r = w.wait_restore_phase("one", RestorePhase::Completed).await;
    let names: Vec<String> = r
        .status
        .as_ref()
        .expect("status")
        .members
        .iter()
        .map(|m| m.claim.clone())
        .collect();
    assert_eq!(names, ["data-copy", "wal-copy"]);
    check_restored(&mut w, &r, &before, &images).await;
    delete_restored_claims(&w, &r).await;
}

/// A btrfs filesystem on a loop image is cut and cloned by reflink like XFS and ext4; its clone
/// has the origin's fsid, and mounts beside the mounted origin (the kernel gives a single-device
/// clone a temporary fsid).
#[tokio::test]
async fn a_btrfs_image_member_is_restored_and_mounts_beside_its_origin() {
    if !require_root() {
        return;
    }
    let mut w = volume_world("gr-e2e-btrfs", &[("data", "a", "btrfs")]).await;
    let (before, images) = snapshot_with_data(&w).await;
    w.create_restore("bt", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let r = w.wait_restore_phase("bt", RestorePhase::Completed).await;
    check_restored(&mut w, &r, &before, &images).await;
    delete_restored_claims(&w, &r).await;
}

/// Makes a folder immutable for as long as it lives (chattr +i; undone on drop, also on panic).
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn new(dir: std::path::PathBuf) -> Immutable {
        std::fs::create_dir_all(&dir).expect("dir");
        agent_support::sh("chattr", &["+i", &dir.to_string_lossy()]);
        Immutable(dir)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .args(["-i", &self.0.to_string_lossy()])
            .status();
    }
}

#[tokio::test]
async fn a_failed_clone_on_one_node_leaves_no_claim_bound_and_no_clone_behind() {
    if !require_root() {
        return;
    }
    let w = volume_world("gr-e2e-fail", &[("data", "a", "xfs"), ("wal", "b", "ext4")]).await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    // Node b cannot publish its clone: its link folder takes no new entry.
    let _guard = Immutable::new(w.link_dir("b"));
    w.create_restore("r", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let r = w.wait_restore_phase("r", RestorePhase::Failed).await;
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("CloneFailed"),
        "{:?}",
        r.status
    );
    let message = r.status.and_then(|s| s.message).unwrap_or_default();
    assert!(message.contains(&w.node("b")), "names the node: {message}");
    // No claim was ever bound to a clone; the claims tandem made, the PVs, every clone and the
    // NodeRestores go.
    let nodes: Api<NodeRestore> = w.env.api();
    eventually(WAIT, "everything rolled back", || async {
        let (claims, pvs, nrs) = w.restore_objects("r").await;
        let left = nodes.list(&ListParams::default()).await.ok()?.items;
        (claims.is_empty()
            && pvs.is_empty()
            && nrs.is_empty()
            && left.is_empty()
            && w.restore_files().is_empty())
        .then_some(())
    })
    .await;
    let links: Vec<_> = std::fs::read_dir(w.link_dir("a"))
        .map(|d| d.filter_map(|e| e.ok()).collect())
        .unwrap_or_default();
    assert!(links.is_empty(), "a's link is left: {links:?}");
}

#[tokio::test]
async fn a_dead_agent_runs_into_the_deadline_and_the_snapshot_waits_for_the_restore() {
    if !require_root() {
        return;
    }
    let mut w = volume_world("gr-e2e-dead", &[("data", "a", "xfs"), ("wal", "b", "ext4")]).await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    // Node b's agent is killed: its clone never comes.
    w.agent("b").kill9();
    w.create_restore(
        "dead-r",
        json!({"source": {"groupSnapshotName": "snap"}, "deadlineSeconds": 15}),
    )
    .await;
    let started = std::time::Instant::now();
    // Node a clones.
    let nodes: Api<NodeRestore> = w.env.api();
    let node_a = w.node("a");
    eventually(WAIT, "node a cloned", || async {
        let l = nodes.list(&ListParams::default()).await.ok()?.items;
        l.iter()
            .any(|n| {
                n.spec.node_name == node_a
                    && n.status
                        .as_ref()
                        .is_some_and(|s| s.phase == tandem::api::NodeRestorePhase::Cloned)
            })
            .then_some(())
    })
    .await;
    assert!(!w.restore_files().is_empty(), "a's clone exists");
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    for c in claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items
    {
        assert!(
            c.name_any() != "data-dead-r" || c.spec.and_then(|s| s.volume_name).is_none(),
            "bound before all cloned"
        );
    }
    // Deleting the source snapshot waits while the restore runs, and says why.
    let snapshots: Api<tandem::api::GroupSnapshot> = w.env.api();
    snapshots
        .delete("snap", &Default::default())
        .await
        .expect("delete snapshot");
    let waiting = eventually(WAIT, "snapshot says it waits", || async {
        let s = snapshots.get_opt("snap").await.ok()??;
        let m = s.status?.message?;
        m.contains("GroupRestore").then_some(m)
    })
    .await;
    assert!(waiting.contains("dead-r"), "{waiting}");
    let r = w.wait_restore_phase("dead-r", RestorePhase::Failed).await;
    println!("Failed after {:?} (deadline 15 s)", started.elapsed());
    assert!(
        started.elapsed() >= Duration::from_secs(14),
        "failed before the deadline"
    );
    assert_eq!(
        condition_reason(&r, "Ready").as_deref(),
        Some("DeadlineExceeded")
    );
    // The snapshot goes on with its deletion (its node b snapshot waits for b's agent, whose
    // return also lets b's NodeRestore abort: it made nothing).
    eventually(WAIT, "snapshot no longer waits", || async {
        let m = snapshots.get_opt("snap").await.ok()??.status?.message?;
        (!m.contains("GroupRestore")).then_some(())
    })
    .await;
    w.start_agent("b");
    eventually(WAIT, "snapshot gone", || async {
        snapshots
            .get_opt("snap")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    // a's clone is deleted, the claims and every NodeRestore are gone.
    eventually(WAIT, "rolled back", || async {
        let (claims, pvs, _) = w.restore_objects("dead-r").await;
        let left = nodes.list(&ListParams::default()).await.ok()?.items;
        (claims.is_empty() && pvs.is_empty() && left.is_empty() && w.restore_files().is_empty())
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn gitops_claims_given_with_a_data_source_ref_are_filled_and_reapplying_changes_nothing() {
    if !require_root() {
        return;
    }
    let w = volume_world(
        "gr-e2e-gitops",
        &[("data", "a", "xfs"), ("wal", "b", "ext4")],
    )
    .await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    let manifest = w.scratch.path("restore.yaml");
    let claim = |name: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata:\n  name: {name}\nspec:\n  storageClassName: tandem-restore\n  accessModes: [ReadWriteOnce]\n  resources:\n    requests:\n      storage: 1Gi\n  dataSourceRef:\n    apiGroup: tandem.dev\n    kind: GroupRestore\n    name: dr\n"
        )
    };
    let text = format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: GroupRestore\nmetadata:\n  name: dr\nspec:\n  source:\n    groupSnapshotName: snap\n  newClaims:\n    createClaims: false\n    nameTemplate: \"{{claim}}-dr\"\n---\n{}---\n{}",
        claim("data-dr"),
        claim("wal-dr")
    );
    std::fs::write(&manifest, text).expect("manifest");
    let path = manifest.to_string_lossy().into_owned();
    w.env.kubectl(&["apply", "-f", &path]).expect("apply");
    let r = w.wait_restore_phase("dr", RestorePhase::Completed).await;
    for m in &r.status.as_ref().expect("status").members {
        let c = w.claim(&m.claim).await.expect("claim");
        assert_eq!(
            c.spec.as_ref().and_then(|s| s.volume_name.as_deref()),
            Some(m.persistent_volume.as_str())
        );
        assert!(
            c.annotations().contains_key(RESTORED_FROM_ANNOTATION),
            "provenance on a given claim"
        );
        assert!(
            !c.annotations()
                .contains_key("tandem.dev/created-by-restore"),
            "a given claim is never marked as tandem's (a rollback would delete it)"
        );
    }
    let versions = |w: &World| {
        let w_api: Api<PersistentVolumeClaim> = w.env.api();
        let r_api: Api<GroupRestore> = w.env.api();
        async move {
            let mut v = Vec::new();
            for c in ["data-dr", "wal-dr"] {
                v.push(w_api.get(c).await.expect("claim").resource_version());
            }
            v.push(r_api.get("dr").await.expect("restore").resource_version());
            v
        }
    };
    let first = versions(&w).await;
    for _ in 0..2 {
        let out = w.env.kubectl(&["apply", "-f", &path]).expect("re-apply");
        assert_eq!(out.matches("unchanged").count(), 3, "{out}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(versions(&w).await, first, "re-applying changed something");
    let (_, pvs, _) = w.restore_objects("dr").await;
    assert_eq!(pvs.len(), 2, "no second restore");
    // Deleting the Completed restore leaves the claims and their volumes.
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete("dr", &Default::default())
        .await
        .expect("delete");
    eventually(WAIT, "restore gone", || async {
        restores.get_opt("dr").await.ok()?.is_none().then_some(())
    })
    .await;
    for c in ["data-dr", "wal-dr"] {
        let claim = w.claim(c).await.expect("claim stays");
        assert_eq!(claim.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    }
    // Applying it again (a new GroupRestore of the same name) is refused with a message, never a
    // second restore: its claims are bound already.
    w.env.kubectl(&["apply", "-f", &path]).expect("apply again");
    let again = w.wait_restore_phase("dr", RestorePhase::Failed).await;
    assert_eq!(
        condition_reason(&again, "Ready").as_deref(),
        Some("ClaimMismatch"),
        "{:?}",
        again.status
    );
    let message = again.status.and_then(|s| s.message).unwrap_or_default();
    assert!(message.contains("already Bound"), "{message}");
    let (_, pvs, _) = w.restore_objects("dr").await;
    assert_eq!(pvs.len(), 2, "nothing new");
    delete_restored_claims(&w, &r).await;
}

/// Waits until `node`'s NodeRestore of `restore` reports Cloned; returns its clone images.
async fn wait_node_cloned(w: &World, restore: &str, node: &str) -> Vec<std::path::PathBuf> {
    let nodes: Api<NodeRestore> = w.env.api();
    let node = w.node(node);
    let selector = format!("{GROUP_RESTORE_LABEL}={restore}");
    eventually(WAIT, &format!("{restore} cloned on {node}"), || async {
        let l = nodes
            .list(&ListParams::default().labels(&selector))
            .await
            .ok()?
            .items;
        let n = l.into_iter().find(|n| n.spec.node_name == node)?;
        let s = n.status?;
        (s.phase == tandem::api::NodeRestorePhase::Cloned).then(|| {
            s.volumes
                .iter()
                .filter_map(|v| v.clone_handle.as_deref().map(world::clone_path))
                .collect()
        })
    })
    .await
}

#[tokio::test]
async fn a_restore_deleted_before_it_completes_is_rolled_back_and_a_restarted_agent_keeps_its_clones()
 {
    if !require_root() {
        return;
    }
    let mut w = volume_world(
        "gr-e2e-restart",
        &[("data", "a", "xfs"), ("wal", "b", "ext4")],
    )
    .await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    w.agent("b").kill9();

    // Deleted while node b has not cloned: rolled back (a's clone goes), then gone.
    w.create_restore("early", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let early_clones = wait_node_cloned(&w, "early", "a").await;
    assert_eq!(early_clones.len(), 1);
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete("early", &Default::default())
        .await
        .expect("delete");
    eventually(WAIT, "early gone", || async {
        restores
            .get_opt("early")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    eventually(WAIT, "early rolled back", || async {
        let (claims, pvs, _) = w.restore_objects("early").await;
        (claims.is_empty() && pvs.is_empty() && !early_clones[0].exists()).then_some(())
    })
    .await;

    // Node a's agent is killed after its clone is made, and comes back: the clone is kept
    // (attached again); once b's agent is back too, the restore completes.
    w.create_restore("late", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let late_clones = wait_node_cloned(&w, "late", "a").await;
    w.agent("a").kill9();
    w.start_agent("a");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        late_clones.iter().all(|c| c.exists()),
        "a restarted agent keeps its clones"
    );
    let r = restores.get("late").await.expect("late");
    assert_eq!(r.status.expect("status").phase, RestorePhase::Cloning);
    w.start_agent("b");
    let r = w.wait_restore_phase("late", RestorePhase::Completed).await;
    for m in &r.status.as_ref().expect("status").members {
        let claim = w.claim(&m.claim).await.expect("claim");
        assert_eq!(claim.status.and_then(|s| s.phase).as_deref(), Some("Bound"));
    }
    // b's NodeRestore of the deleted restore is aborted (it made nothing) and goes.
    let nodes: Api<NodeRestore> = w.env.api();
    eventually(WAIT, "early's NodeRestores gone", || async {
        let (_, _, nrs) = w.restore_objects("early").await;
        let _ = &nodes;
        nrs.is_empty().then_some(())
    })
    .await;
    delete_restored_claims(&w, &r).await;
}

#[tokio::test]
async fn the_node_restores_of_a_restore_that_vanished_unfinished_are_aborted() {
    if !require_root() {
        return;
    }
    let mut w = volume_world(
        "gr-e2e-orphan",
        &[("data", "a", "xfs"), ("wal", "b", "ext4")],
    )
    .await;
    w.create_snapshot("snap", "shop", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    w.agent("b").kill9();
    w.create_restore("gone", json!({"source": {"groupSnapshotName": "snap"}}))
        .await;
    let clones = wait_node_cloned(&w, "gone", "a").await;
    assert!(clones.iter().all(|c| c.exists()));
    // The restore goes without tandem's rollback (its finalizer removed by hand).
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .patch(
            "gone",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .expect("drop finalizer");
    restores
        .delete("gone", &Default::default())
        .await
        .expect("delete");
    // Its NodeRestores are aborted all the same: a's clone goes, and with b's agent back, they go.
    let nodes: Api<NodeRestore> = w.env.api();
    eventually(WAIT, "a's clone deleted", || async {
        let aborted = nodes
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .iter()
            .all(|n| n.spec.action == NodeRestoreAction::Abort);
        (aborted && clones.iter().all(|c| !c.exists())).then_some(())
    })
    .await;
    // The claims it created for the nodes go too.
    eventually(WAIT, "its claims deleted", || async {
        let (claims, _, _) = w.restore_objects("gone").await;
        claims.is_empty().then_some(())
    })
    .await;
    w.start_agent("b");
    eventually(WAIT, "NodeRestores gone", || async {
        nodes
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
}
