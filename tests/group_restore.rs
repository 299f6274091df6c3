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
    let selector = format!("{GROUP_RESTORE_LABEL}={restore}");
    let listed = eventually(WAIT, "NodeRestores", || {
        let nodes = nodes.clone();
        let selector = selector.clone();
        async move {
            let l = nodes
                .list(&ListParams::default().labels(&selector))
                .await
                .ok()?;
            (!l.items.is_empty()).then_some(l.items)
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
