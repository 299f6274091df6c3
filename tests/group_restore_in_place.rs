//! GroupRestore mode InPlace on the real control plane: the real `tandem controller`, a real
//! `tandem agent` that cuts the group snapshot of loop-backed XFS volumes and clones it (reflink
//! into the pool, a loop device, a link), and Pod, Deployment and StatefulSet objects (no kubelet
//! or scheduler: pods stay Pending, which is enough for the pvc-protection controller and for the
//! scale subresource; pods that must stay after their deletion carry a finalizer of the test).
//! Needs root; skips with a message otherwise.

mod agent_support;
mod support;
mod world;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use tandem::api::{
    GROUP_RESTORE_LABEL, GroupRestore, GroupSnapshot, GroupSnapshotPhase, NodeRestore,
    PRE_RESTORE_LABEL, RESTORED_FROM_ANNOTATION, RestorePhase,
};
use world::{WAIT, World, require_root};

/// Detaches the loop devices of the clones the agent left in the pool (and their links), so that
/// a test leaves no loop device behind, also when it fails. Declared after the World, it goes
/// first.
struct Sweep(PathBuf);

impl Drop for Sweep {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(self.0.join(".tandem-restores")) else {
            return;
        };
        for entry in entries.flatten() {
            let image = entry.path().to_string_lossy().into_owned();
            let (_, out) = agent_support::sh_status("losetup", &["-j", &image]);
            for dev in out
                .lines()
                .filter_map(|l| l.split(':').next())
                .filter(|d| d.starts_with("/dev/loop"))
            {
                if let Ok(links) = std::fs::read_dir("/dev/tandem") {
                    for link in links.flatten() {
                        if std::fs::read_link(link.path()).is_ok_and(|t| t.to_string_lossy() == dev)
                        {
                            let _ = std::fs::remove_file(link.path());
                        }
                    }
                }
                let _ = agent_support::sh_status("losetup", &["-d", dev]);
            }
        }
    }
}

/// Seeds of the file each claim holds at the snapshot.
const CLAIMS: [(&str, u64); 2] = [("data", 11), ("wal", 22)];

/// A group of two XFS claims, `data` on node `a` and `wal` on node `b` (one NodeRestore each), a
/// Ready snapshot `snap` of them holding `before.bin`, and `after.bin` written after it. The
/// member PVs are set to reclaim Delete, so that the restore's switch to Retain shows.
async fn world_with_snapshot(name: &str) -> (World, GroupSnapshot, BTreeMap<String, String>) {
    let mut w = World::new(name).await;
    for (claim, node) in [("data", "a"), ("wal", "b")] {
        w.add_volume(claim, node, "xfs", &[("app", "shop")]).await;
    }
    w.start_agent("a");
    w.start_agent("b");
    w.start_controller();
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}}),
    )
    .await;
    let mut hashes = BTreeMap::new();
    for (claim, seed) in CLAIMS {
        let hash = agent_support::write_file(
            &w.volumes[claim].mount.join("before.bin"),
            1 << 20,
            seed,
            true,
        );
        hashes.insert(claim.to_string(), hash);
    }
    w.create_snapshot("snap", "shop", "Delete").await;
    let snapshot = w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    for (claim, _) in CLAIMS {
        agent_support::write_file(&w.volumes[claim].mount.join("after.bin"), 4096, 7, true);
    }
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for (claim, _) in CLAIMS {
        volumes
            .patch(
                &old_pv(&w, claim),
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Delete"}})),
            )
            .await
            .expect("reclaim Delete");
    }
    (w, snapshot, hashes)
}

fn old_pv(w: &World, claim: &str) -> String {
    format!("{}-{claim}", w.env.namespace)
}

async fn create_restore(w: &World, name: &str, in_place: serde_json::Value, deadline: i32) {
    let api: Api<GroupRestore> = w.env.api();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"source": {"groupSnapshotName": "snap"}, "mode": "InPlace",
                "inPlace": in_place, "deadlineSeconds": deadline},
        }))
        .expect("restore"),
    )
    .await
    .expect("create restore");
}

/// The claims as they are now: name → (uid, volumeName, phase).
async fn claims_now(w: &World) -> BTreeMap<String, (String, String, String)> {
    let api: Api<PersistentVolumeClaim> = w.env.api();
    api.list(&ListParams::default())
        .await
        .expect("claims")
        .items
        .into_iter()
        .map(|c| {
            let spec = c.spec.clone().unwrap_or_default();
            let phase = c
                .status
                .as_ref()
                .and_then(|s| s.phase.clone())
                .unwrap_or_default();
            (
                c.name_any(),
                (
                    c.uid().unwrap_or_default(),
                    spec.volume_name.unwrap_or_default(),
                    phase,
                ),
            )
        })
        .collect()
}

/// The old PVs' reclaim policy and pre-restore label.
async fn old_pv_marks(w: &World) -> Vec<(String, Option<String>)> {
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let mut out = Vec::new();
    for (claim, _) in CLAIMS {
        let pv = volumes.get(&old_pv(w, claim)).await.expect("old PV");
        out.push((
            pv.spec
                .and_then(|s| s.persistent_volume_reclaim_policy)
                .unwrap_or_default(),
            pv.metadata
                .labels
                .unwrap_or_default()
                .get(PRE_RESTORE_LABEL)
                .cloned(),
        ));
    }
    out
}

async fn node_restores(w: &World) -> Vec<NodeRestore> {
    let api: Api<NodeRestore> = w.env.api();
    api.list(&ListParams::default())
        .await
        .expect("nrestore")
        .items
}

/// Waits for the restore to reach `phase` (panics if it ends in the other terminal phase).
async fn wait_restore(w: &World, name: &str, phase: RestorePhase) -> GroupRestore {
    let api: Api<GroupRestore> = w.env.api();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let restore = api.get(name).await.expect("restore");
        let got = restore.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if got == phase {
            return restore;
        }
        if matches!(got, RestorePhase::Completed | RestorePhase::Failed) {
            panic!(
                "GroupRestore {name} ended {got:?}, not {phase:?}: {:?}",
                restore.status
            );
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GroupRestore {name} not {phase:?} in {WAIT:?}: {:?}",
            restore.status
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn pod(name: &str, claims: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": claims.iter().map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}})).collect::<Vec<_>>(),
        }
    }))
    .expect("pod")
}

fn template(app: &str, claim: &str) -> serde_json::Value {
    json!({
        "metadata": {"labels": {"run": app}},
        "spec": {
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}],
        }
    })
}

/// Mounts a restored claim's PV path (the clone) and checks it holds the snapshot's data.
fn assert_snapshot_data(w: &mut World, pv: &PersistentVolume, claim: &str, hash: &str) {
    let path = pv
        .spec
        .as_ref()
        .and_then(|s| s.local.as_ref())
        .map(|l| l.path.clone())
        .expect("local path");
    let mnt = w.scratch.path(&format!("restored-{claim}"));
    w.scratch.mount(&path, &mnt, &["nouuid"]);
    assert_eq!(
        agent_support::sha256_file(&mnt.join("before.bin")),
        hash,
        "claim {claim}: not the snapshot's data"
    );
    assert!(
        !mnt.join("after.bin").exists(),
        "claim {claim}: holds data written after the snapshot"
    );
    w.scratch.unmount(&mnt);
}

#[tokio::test]
async fn in_place_brings_the_claims_back_under_their_names_and_keeps_the_old_volumes() {
    if !require_root() {
        return;
    }
    let (mut w, _, hashes) = world_with_snapshot("ip-swap").await;
    let _sweep = Sweep(w.pool.clone());
    let before = claims_now(&w).await;
    let applied = std::time::Instant::now();
    create_restore(&w, "back", json!({}), 120).await;
    let restore = wait_restore(&w, "back", RestorePhase::Completed).await;
    eprintln!(
        "InPlace restore of 2 members on 2 nodes: applied to Completed in {:?}",
        applied.elapsed()
    );
    let status = restore.status.expect("status");

    // The undo point: the old PVs, listed, kept with reclaim Retain and the label.
    let mut listed: Vec<(String, String)> = status
        .pre_restore
        .iter()
        .map(|p| (p.claim.clone(), p.persistent_volume.clone()))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        CLAIMS.map(|(c, _)| (c.to_string(), old_pv(&w, c))).to_vec()
    );
    for (policy, label) in old_pv_marks(&w).await {
        assert_eq!(policy, "Retain");
        assert_eq!(label.as_deref(), Some("back"));
    }

    // The claims: same names, new objects, each Bound to the clone's PV, same labels, provenance.
    let after = claims_now(&w).await;
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for (claim, _) in CLAIMS {
        let (old_uid, old_volume, _) = &before[claim];
        let (uid, volume, phase) = &after[claim];
        assert_ne!(uid, old_uid, "claim {claim} was not recreated");
        assert_ne!(volume, old_volume);
        assert_eq!(phase, "Bound");
        let member = status
            .members
            .iter()
            .find(|m| m.source_claim == claim)
            .expect("member");
        assert_eq!(member.claim, claim);
        assert_eq!(&member.persistent_volume, volume);
        let object = claims.get(claim).await.expect("claim");
        assert_eq!(object.labels().get("app").map(String::as_str), Some("shop"));
        assert_eq!(
            object
                .annotations()
                .get(RESTORED_FROM_ANNOTATION)
                .map(String::as_str),
            Some(format!("{}/snap", w.env.namespace).as_str())
        );
        let spec = object.spec.clone().expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some(""));
        assert_eq!(spec.access_modes, Some(vec!["ReadWriteOnce".to_string()]));
        let pv = volumes.get(volume).await.expect("new PV");
        assert_eq!(
            pv.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.clone())
                .as_deref(),
            Some(uid.as_str())
        );
        assert_snapshot_data(&mut w, &pv, claim, &hashes[claim]);
    }

    // Done is done: nothing changes on a second look.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(claims_now(&w).await, after);

    // A restored volume set to Retain outlives its claim (as an undo point does), clone and all;
    // deleting the PV then removes the clone.
    let (_, restored, _) = &after["data"];
    volumes
        .patch(
            restored,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"persistentVolumeReclaimPolicy": "Retain"}})),
        )
        .await
        .expect("Retain");
    claims
        .delete("data", &DeleteParams::default())
        .await
        .expect("delete data");
    eventually(WAIT, "the restored PV Released", || {
        let volumes = volumes.clone();
        async move {
            let pv = volumes.get(restored).await.ok()?;
            (pv.status?.phase.as_deref() == Some("Released")).then_some(())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pv = volumes.get(restored).await.expect("kept PV");
    assert!(
        pv.metadata.deletion_timestamp.is_none(),
        "a Retain PV was deleted"
    );
    let path = pv.spec.and_then(|s| s.local).map(|l| l.path).expect("path");
    assert!(
        std::path::Path::new(&path).exists(),
        "the clone of a Retain PV was removed"
    );
    volumes
        .delete(restored, &DeleteParams::default())
        .await
        .expect("delete PV");
    eventually(WAIT, "the PV and its clone gone", || {
        let volumes = volumes.clone();
        let path = path.clone();
        async move {
            let gone = volumes.get_opt(restored).await.ok()?.is_none();
            (gone && !std::path::Path::new(&path).exists()).then_some(())
        }
    })
    .await;
}

#[tokio::test]
async fn a_pod_using_a_claim_refuses_the_restore_and_touches_nothing() {
    if !require_root() {
        return;
    }
    let (w, _, _) = world_with_snapshot("ip-refuse").await;
    let _sweep = Sweep(w.pool.clone());
    let pods: Api<Pod> = w.env.api();
    pods.create(&PostParams::default(), &pod("reader", &["wal"]))
        .await
        .expect("pod");
    let before = claims_now(&w).await;

    create_restore(&w, "refused", json!({"workloads": "Refuse"}), 60).await;
    let restore = wait_restore(&w, "refused", RestorePhase::Failed).await;
    let message = restore.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.contains("reader") && message.contains("wal"),
        "{message}"
    );

    // ScaleDown cannot stop a pod nobody owns: refused too, naming it.
    create_restore(&w, "bare", json!({"workloads": "ScaleDown"}), 60).await;
    let restore = wait_restore(&w, "bare", RestorePhase::Failed).await;
    let message = restore.status.and_then(|s| s.message).unwrap_or_default();
    assert!(message.contains("pod reader has no owner"), "{message}");

    assert_eq!(claims_now(&w).await, before, "the claims were touched");
    assert!(
        node_restores(&w).await.is_empty(),
        "a refused restore cloned"
    );
    for (policy, label) in old_pv_marks(&w).await {
        assert_eq!((policy.as_str(), label), ("Delete", None));
    }
}

#[tokio::test]
async fn scale_down_records_the_counts_stops_the_workloads_and_scales_them_back() {
    if !require_root() {
        return;
    }
    let (w, _, _) = world_with_snapshot("ip-scale").await;
    let _sweep = Sweep(w.pool.clone());
    let deployments: Api<Deployment> = w.env.api();
    let sets: Api<StatefulSet> = w.env.api();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
                "replicas": 2, "selector": {"matchLabels": {"run": "web"}}, "template": template("web", "data")}}))
            .expect("deployment"),
        )
        .await
        .expect("create deployment");
    sets.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "db"}, "spec": {
            "replicas": 1, "serviceName": "db", "selector": {"matchLabels": {"run": "db"}}, "template": template("db", "wal")}}))
        .expect("statefulset"),
    )
    .await
    .expect("create statefulset");
    let pods: Api<Pod> = w.env.api();
    eventually(WAIT, "3 pods using the claims", || {
        let pods = pods.clone();
        async move { (pods.list(&ListParams::default()).await.ok()?.items.len() == 3).then_some(()) }
    })
    .await;

    create_restore(
        &w,
        "scaled",
        json!({"workloads": "ScaleDown", "workloadTimeoutSeconds": 60}),
        120,
    )
    .await;
    // Seen while it runs: the counts recorded, and both workloads at zero with no pod left.
    let api: Api<GroupRestore> = w.env.api();
    let mut saw_zero = false;
    let restore = loop {
        let restore = api.get("scaled").await.expect("restore");
        let d = deployments
            .get_scale("web")
            .await
            .expect("scale")
            .spec
            .and_then(|s| s.replicas);
        let s = sets
            .get_scale("db")
            .await
            .expect("scale")
            .spec
            .and_then(|s| s.replicas);
        // `replicas` is omitted when zero.
        if d.unwrap_or(0) == 0 && s.unwrap_or(0) == 0 {
            saw_zero = true;
        }
        let phase = restore.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if matches!(phase, RestorePhase::Completed | RestorePhase::Failed) {
            break restore;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let status = restore.status.expect("status");
    assert_eq!(
        status.phase,
        RestorePhase::Completed,
        "{:?}",
        status.message
    );
    assert!(saw_zero, "the workloads were never at zero");
    let mut recorded: Vec<(String, String, i32, bool)> = status
        .workloads
        .iter()
        .map(|w| (w.kind.clone(), w.name.clone(), w.replicas, w.restored))
        .collect();
    recorded.sort();
    assert_eq!(
        recorded,
        [
            ("Deployment".into(), "web".into(), 2, true),
            ("StatefulSet".into(), "db".into(), 1, true)
        ]
    );
    assert_eq!(
        deployments
            .get_scale("web")
            .await
            .expect("scale")
            .spec
            .and_then(|s| s.replicas),
        Some(2)
    );
    assert_eq!(
        sets.get_scale("db")
            .await
            .expect("scale")
            .spec
            .and_then(|s| s.replicas),
        Some(1)
    );
    for (claim, (_, volume, phase)) in claims_now(&w).await {
        assert_eq!(phase, "Bound", "{claim}");
        assert!(volume.starts_with("tandem-"), "{claim} on {volume}");
    }
}

#[tokio::test]
async fn a_claim_not_bound_to_the_recorded_volume_is_refused_before_anything_is_touched() {
    if !require_root() {
        return;
    }
    let (w, _, _) = world_with_snapshot("ip-rebound").await;
    let _sweep = Sweep(w.pool.clone());
    // `wal` now is another claim, on another PV (same name, not the volume the snapshot recorded).
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    claims
        .delete("wal", &DeleteParams::default())
        .await
        .expect("delete wal");
    eventually(WAIT, "wal gone", || {
        let claims = claims.clone();
        async move { claims.get_opt("wal").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let other = format!("{}-other", w.env.namespace);
    let mount = w.volumes["wal"].mount.to_string_lossy().into_owned();
    volumes
        .create(
            &PostParams::default(),
            &support::objects::local_volume(
                &other,
                &mount,
                &w.node("a"),
                &w.env.namespace,
                "wal",
                &[],
            ),
        )
        .await
        .expect("other PV");
    claims
        .create(
            &PostParams::default(),
            &support::objects::claim("wal", Some(&other), &[("app", "shop")]),
        )
        .await
        .expect("recreate wal");
    eventually(WAIT, "wal Bound to the other PV", || {
        let claims = claims.clone();
        async move {
            let c = claims.get("wal").await.ok()?;
            (c.status?.phase.as_deref() == Some("Bound")).then_some(())
        }
    })
    .await;
    let before = claims_now(&w).await;
    create_restore(&w, "stale", json!({}), 60).await;
    let restore = wait_restore(&w, "stale", RestorePhase::Failed).await;
    let message = restore.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.contains(&format!(
            "claim wal is bound to PV {other}, not to PV {}",
            old_pv(&w, "wal")
        )),
        "{message}"
    );
    assert_eq!(claims_now(&w).await, before);
    assert!(
        node_restores(&w).await.is_empty(),
        "a refused restore cloned"
    );
    let data_pv = volumes.get(&old_pv(&w, "data")).await.expect("data PV");
    assert!(data_pv.labels().get(PRE_RESTORE_LABEL).is_none());
    volumes.delete(&other, &DeleteParams::default()).await.ok();
}

#[tokio::test]
async fn a_failed_clone_leaves_the_claims_untouched_and_scales_back() {
    if !require_root() {
        return;
    }
    let (w, snapshot, _) = world_with_snapshot("ip-fail").await;
    let _sweep = Sweep(w.pool.clone());
    let deployments: Api<Deployment> = w.env.api();
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
                "replicas": 3, "selector": {"matchLabels": {"run": "web"}}, "template": template("web", "data")}}))
            .expect("deployment"),
        )
        .await
        .expect("create deployment");
    let pods: Api<Pod> = w.env.api();
    eventually(WAIT, "3 pods", || {
        let pods = pods.clone();
        async move { (pods.list(&ListParams::default()).await.ok()?.items.len() == 3).then_some(()) }
    })
    .await;
    let before = claims_now(&w).await;
    // The member snapshot of `wal` is lost on the node: its clone fails there.
    std::fs::remove_file(World::member_clone(&snapshot, "wal")).expect("remove the wal snapshot");
    create_restore(&w, "broken", json!({"workloads": "ScaleDown"}), 60).await;
    let restore = wait_restore(&w, "broken", RestorePhase::Failed).await;
    let status = restore.status.expect("status");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("wal") && message.contains("the claims were not touched"),
        "{message}"
    );
    assert!(status.pre_restore.is_empty(), "{:?}", status.pre_restore);
    assert_eq!(claims_now(&w).await, before, "the claims were touched");
    for (policy, label) in old_pv_marks(&w).await {
        assert_eq!((policy.as_str(), label), ("Delete", None));
    }
    assert_eq!(status.workloads.len(), 1);
    assert!(
        status.workloads[0].restored && status.workloads[0].replicas == 3,
        "{:?}",
        status.workloads
    );
    assert_eq!(
        deployments
            .get_scale("web")
            .await
            .expect("scale")
            .spec
            .and_then(|s| s.replicas),
        Some(3)
    );
    // Every clone goes: no PV of the restore, no clone image left in the pool.
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let restores_dir = w.pool.join(".tandem-restores");
    eventually(WAIT, "every clone gone", || {
        let volumes = volumes.clone();
        let restores_dir = restores_dir.clone();
        let label = format!("{GROUP_RESTORE_LABEL}=broken");
        async move {
            let pvs = volumes
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?
                .items;
            let images = std::fs::read_dir(&restores_dir)
                .map(|d| d.count())
                .unwrap_or(0);
            (pvs.is_empty() && images == 0).then_some(())
        }
    })
    .await;
}

const HOLD: &str = "tandem.dev/test-hold";

/// A Deployment `web` of `replicas` pods on node `a` using `data`, whose pods carry a finalizer of
/// the test: deleted, they stay (Terminating, still using the claim) until [`release`] removes it.
async fn held_deployment(w: &World, replicas: i32) {
    let deployments: Api<Deployment> = w.env.api();
    let mut template = template("web", "data");
    template["metadata"]["finalizers"] = json!([HOLD]);
    // Bound to a node (one with no kubelet): a pod being deleted there may still hold its mount,
    // whatever phase PodGC gives it.
    template["spec"]["nodeName"] = json!(w.node("a"));
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "web"}, "spec": {
                "replicas": replicas, "selector": {"matchLabels": {"run": "web"}}, "template": template}}))
            .expect("deployment"),
        )
        .await
        .expect("create deployment");
    let pods: Api<Pod> = w.env.api();
    eventually(WAIT, "the pods", || {
        let pods = pods.clone();
        async move {
            let n = pods.list(&ListParams::default()).await.ok()?.items.len();
            (n == usize::try_from(replicas).ok()?).then_some(())
        }
    })
    .await;
}

/// Removes the test's finalizer from every pod and claim that carries it (pods being deleted are
/// then force-deleted).
async fn release(w: &World) {
    let pods: Api<Pod> = w.env.api();
    for p in pods.list(&ListParams::default()).await.expect("pods").items {
        if p.finalizers().iter().any(|f| f == HOLD) {
            pods.patch(
                &p.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await
            .expect("release pod");
            // No kubelet confirms a graceful deletion on the node: force it, as a kubelet would.
            if p.metadata.deletion_timestamp.is_some() {
                let force = DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                };
                match pods.delete(&p.name_any(), &force).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => panic!("force-delete pod: {e}"),
                }
            }
        }
    }
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    for c in claims
        .list(&ListParams::default())
        .await
        .expect("claims")
        .items
    {
        if c.finalizers().iter().any(|f| f == HOLD) {
            let rest: Vec<String> = c
                .finalizers()
                .iter()
                .filter(|f| *f != HOLD)
                .cloned()
                .collect();
            claims
                .patch(
                    &c.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
                )
                .await
                .expect("release claim");
        }
    }
}

async fn web_replicas(w: &World) -> i32 {
    let deployments: Api<Deployment> = w.env.api();
    deployments
        .get_scale("web")
        .await
        .expect("scale")
        .spec
        .and_then(|s| s.replicas)
        .unwrap_or(0)
}

/// Waits until `check` holds of the restore.
async fn wait_until(
    w: &World,
    name: &str,
    what: &str,
    check: impl Fn(&GroupRestore) -> bool,
) -> GroupRestore {
    let api: Api<GroupRestore> = w.env.api();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let restore = api.get(name).await.expect("restore");
        if check(&restore) {
            return restore;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "GroupRestore {name}: not {what} in {WAIT:?}: {:?}",
            restore.status
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
}

fn phase_of(r: &GroupRestore) -> RestorePhase {
    r.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

#[tokio::test]
async fn a_restarted_controller_scales_back_to_the_recorded_count() {
    if !require_root() {
        return;
    }
    let (mut w, _, hashes) = world_with_snapshot("ip-restart-fence").await;
    let _sweep = Sweep(w.pool.clone());
    held_deployment(&w, 2).await;
    create_restore(
        &w,
        "fenced",
        json!({"workloads": "ScaleDown", "workloadTimeoutSeconds": 600}),
        600,
    )
    .await;
    // Scaled to zero, the pods deleted but held: the fence waits, naming them.
    let restore = wait_until(&w, "fenced", "Fencing on the held pods", |r| {
        phase_of(r) == RestorePhase::Fencing
            && r.status
                .as_ref()
                .and_then(|s| s.message.as_deref())
                .is_some_and(|m| m.contains("web-"))
    })
    .await;
    assert_eq!(
        restore.status.as_ref().expect("status").workloads[0].replicas,
        2
    );
    eventually(WAIT, "web at zero", || async {
        (web_replicas(&w).await == 0).then_some(())
    })
    .await;
    assert!(
        node_restores(&w).await.is_empty(),
        "cloning began while pods use the claims"
    );

    // The controller dies while fencing; the one that comes back knows the count from the status.
    w.controller.as_mut().expect("controller").kill9();
    w.start_controller();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        phase_of(
            &w.env
                .api::<GroupRestore>()
                .get("fenced")
                .await
                .expect("restore")
        ),
        RestorePhase::Fencing
    );
    release(&w).await;
    let restore = wait_restore(&w, "fenced", RestorePhase::Completed).await;
    let status = restore.status.expect("status");
    assert_eq!(status.workloads.len(), 1);
    assert!(status.workloads[0].restored, "{:?}", status.workloads);
    assert_eq!(
        web_replicas(&w).await,
        2,
        "scaled back to the count before the restore"
    );
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for (claim, _) in CLAIMS {
        let m = status
            .members
            .iter()
            .find(|m| m.claim == claim)
            .expect("member");
        let pv = volumes.get(&m.persistent_volume).await.expect("PV");
        assert_snapshot_data(&mut w, &pv, claim, &hashes[claim]);
    }
    release(&w).await;
}

#[tokio::test]
async fn pods_that_do_not_go_fail_the_restore_after_the_workload_timeout() {
    if !require_root() {
        return;
    }
    let (w, _, _) = world_with_snapshot("ip-fence-timeout").await;
    let _sweep = Sweep(w.pool.clone());
    held_deployment(&w, 2).await;
    let before = claims_now(&w).await;
    create_restore(
        &w,
        "slow",
        json!({"workloads": "ScaleDown", "workloadTimeoutSeconds": 3}),
        60,
    )
    .await;
    let restore = wait_restore(&w, "slow", RestorePhase::Failed).await;
    let status = restore.status.expect("status");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("after workloadTimeoutSeconds") && message.contains("web-"),
        "{message}"
    );
    assert!(
        message.contains("scaled back (Deployment web to 2)"),
        "{message}"
    );
    assert_eq!(web_replicas(&w).await, 2);
    assert_eq!(claims_now(&w).await, before, "the claims were touched");
    assert!(node_restores(&w).await.is_empty());
    release(&w).await;
}

#[tokio::test]
async fn the_swap_goes_forward_after_a_controller_restart_past_the_deadline_and_a_deletion() {
    if !require_root() {
        return;
    }
    let (mut w, _, hashes) = world_with_snapshot("ip-restart-swap").await;
    let _sweep = Sweep(w.pool.clone());
    // `wal` cannot go until the test lets it: the swap stops half-way, with `data` swapped.
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    claims
        .patch(
            "wal",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": ["kubernetes.io/pvc-protection", HOLD]}}),
            ),
        )
        .await
        .expect("hold wal");
    let before = claims_now(&w).await;
    create_restore(&w, "half", json!({}), 10).await;
    let restore = wait_until(&w, "half", "held in the swap", |r| {
        phase_of(r) == RestorePhase::Binding
            && r.status
                .as_ref()
                .and_then(|s| s.message.as_deref())
                .is_some_and(|m| m.contains("claim wal is being deleted"))
    })
    .await;
    let status = restore.status.expect("status");
    // Recorded before anything was deleted: both old PVs, kept and labelled.
    assert_eq!(status.pre_restore.len(), 2, "{:?}", status.pre_restore);
    for (policy, label) in old_pv_marks(&w).await {
        assert_eq!(
            (policy.as_str(), label.as_deref()),
            ("Retain", Some("half"))
        );
    }
    w.controller.as_mut().expect("controller").kill9();
    // Past the deadline: a swap under way is never rolled back (that would leave claims deleted).
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.start_controller();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        phase_of(
            &w.env
                .api::<GroupRestore>()
                .get("half")
                .await
                .expect("restore")
        ),
        RestorePhase::Binding
    );
    // Deleted half-way: the swap still finishes (a rollback now would leave `wal` deleted).
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete("half", &DeleteParams::default())
        .await
        .expect("delete restore");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        phase_of(&restores.get("half").await.expect("held by its finalizer")),
        RestorePhase::Binding
    );
    release(&w).await;
    eventually(WAIT, "the restore finished and gone", || {
        let restores = restores.clone();
        async move { restores.get_opt("half").await.ok()?.is_none().then_some(()) }
    })
    .await;
    let after = claims_now(&w).await;
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for (claim, _) in CLAIMS {
        assert_ne!(after[claim].0, before[claim].0, "{claim} not recreated");
        assert_eq!(after[claim].2, "Bound");
        let m = status
            .members
            .iter()
            .find(|m| m.claim == claim)
            .expect("member");
        assert_eq!(after[claim].1, m.persistent_volume);
        let pv = volumes.get(&m.persistent_volume).await.expect("PV");
        assert_snapshot_data(&mut w, &pv, claim, &hashes[claim]);
    }
}

#[tokio::test]
async fn a_restore_deleted_while_fencing_scales_back_and_touches_nothing() {
    if !require_root() {
        return;
    }
    let (w, _, _) = world_with_snapshot("ip-delete-fence").await;
    let _sweep = Sweep(w.pool.clone());
    held_deployment(&w, 2).await;
    let before = claims_now(&w).await;
    create_restore(
        &w,
        "gone",
        json!({"workloads": "ScaleDown", "workloadTimeoutSeconds": 600}),
        600,
    )
    .await;
    wait_until(&w, "gone", "Fencing", |r| {
        phase_of(r) == RestorePhase::Fencing
    })
    .await;
    eventually(WAIT, "web at zero", || async {
        (web_replicas(&w).await == 0).then_some(())
    })
    .await;
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete("gone", &DeleteParams::default())
        .await
        .expect("delete restore");
    eventually(WAIT, "the restore gone", || {
        let restores = restores.clone();
        async move { restores.get_opt("gone").await.ok()?.is_none().then_some(()) }
    })
    .await;
    assert_eq!(web_replicas(&w).await, 2, "not scaled back");
    assert_eq!(claims_now(&w).await, before, "the claims were touched");
    assert!(node_restores(&w).await.is_empty());
    release(&w).await;
}

#[tokio::test]
async fn a_pod_that_starts_using_a_claim_while_cloning_stops_the_swap_before_it_starts() {
    if !require_root() {
        return;
    }
    let (mut w, _, _) = world_with_snapshot("ip-late-pod").await;
    let _sweep = Sweep(w.pool.clone());
    let before = claims_now(&w).await;
    // The node's agent is away: the restore waits in Cloning.
    w.agent("a").stop();
    create_restore(&w, "late", json!({}), 120).await;
    wait_until(&w, "late", "Cloning", |r| {
        phase_of(r) == RestorePhase::Cloning
    })
    .await;
    let pods: Api<Pod> = w.env.api();
    pods.create(&PostParams::default(), &pod("latecomer", &["data"]))
        .await
        .expect("pod");
    w.start_agent("a");
    let restore = wait_restore(&w, "late", RestorePhase::Failed).await;
    let status = restore.status.expect("status");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("pods started using the claims") && message.contains("latecomer"),
        "{message}"
    );
    assert!(status.pre_restore.is_empty(), "{:?}", status.pre_restore);
    assert_eq!(claims_now(&w).await, before, "the claims were touched");
    for (policy, label) in old_pv_marks(&w).await {
        assert_eq!((policy.as_str(), label), ("Delete", None));
    }
    let restores_dir = w.pool.join(".tandem-restores");
    eventually(WAIT, "every clone gone", || {
        let restores_dir = restores_dir.clone();
        async move {
            let images = std::fs::read_dir(&restores_dir)
                .map(|d| d.count())
                .unwrap_or(0);
            (images == 0).then_some(())
        }
    })
    .await;
}
