//! The controller's central cut of Ceph RBD members, against a real single-node Ceph
//! (hack/ceph-mini.sh) and the real control plane, with the real `tandem controller` and
//! ceph-csi-shaped PersistentVolumes, VolumeAttachments, config map and Secret.
//!
//! There is no krbd on this host, so the nodes' part is played here on the NodeSnapshots (the
//! real agents freeze krbd volumes in hack/rbd-qemu, where the kernel has rbd): a played node
//! "freezes" by stopping its writes to the image, reports the image it froze, and on `Release`
//! checks that the group snapshot exists already. What is checked is the controller's: when it
//! cuts, that it cuts once and only inside every node's hold, what it refuses, that a failed or
//! deleted snapshot leaves nothing in Ceph. Needs root (the test world's scratch pool); skips
//! without the Ceph daemons only with TANDEM_SKIP_CEPH=1.

mod agent_support;
#[path = "ceph_support/mod.rs"]
mod ceph_support;
mod support;
mod world;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume, PersistentVolumeClaim, Secret};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use support::process::Daemon;
use tandem::api::NodePhase;
use tandem::api::{CentralPhase, GroupSnapshot, GroupSnapshotPhase, NodeAction, NodeSnapshot};
use tandem::controller::rbd::{Cluster, ClusterConfig, PoolRef, SnapState};
use world::{WAIT, World, require_root};

/// Waits until the NodeSnapshot of GroupSnapshot `snapshot` on node `short` is in `phase`.
async fn wait_node(w: &World, snapshot: &str, short: &str, phase: NodePhase) {
    let node = w.node(short);
    let api: Api<NodeSnapshot> = w.env.api();
    eventually(WAIT, &format!("node {short} {phase:?}"), || async {
        let listed = api.list(&Default::default()).await.ok()?.items;
        listed
            .iter()
            .any(|n| {
                n.spec.node_name == node
                    && n.metadata.deletion_timestamp.is_none()
                    && n.status.as_ref().is_some_and(|s| s.phase == phase)
                    && n.spec.group_snapshot == snapshot
            })
            .then_some(())
    })
    .await;
}

const MIB: u64 = 1 << 20;
const CLUSTER_ID: &str = "test-cluster";

/// One generation of an image's data: distinct per image.
fn data(image: &str, generation: &str) -> Vec<u8> {
    format!("{image}:{generation}:").repeat(64).into_bytes()
}

struct Rbd {
    cluster: Arc<Cluster>,
    pool: PoolRef,
    fsid: String,
    mon_host: String,
    user: String,
    key: String,
}

/// How a played node behaves.
#[derive(Clone, Default)]
struct Play {
    /// Reports this handle for every volume instead of the image's own.
    wrong_handle: Option<String>,
    /// Reports a freeze that began this long ago.
    frozen_since: Duration,
    /// The node (full name) that reports its cut only once this is set.
    gate: Option<(String, Arc<AtomicBool>)>,
    /// A node not released this long after its cut thaws on its own clock (the agent's
    /// watchdog) and reports Aborted.
    watchdog: Option<Duration>,
}

/// The nodes' part, played on every NodeSnapshot of the namespace: Prepare → Prepared; Cut →
/// writes stop, Cut with the frozen images; Release → the group snapshot must exist, the next
/// generation is written, Released; Abort → Aborted. Returns when `stop` is set.
async fn play_nodes(
    w: &World,
    rbd: &Rbd,
    images: &BTreeMap<String, String>,
    play: Play,
    stop: Arc<AtomicBool>,
) -> Vec<String> {
    let api: Api<NodeSnapshot> = w.env.api();
    let mut seen = Vec::new();
    let mut cut_at: BTreeMap<String, std::time::Instant> = BTreeMap::new();
    while !stop.load(Ordering::SeqCst) {
        let listed = api.list(&Default::default()).await.expect("list").items;
        for n in listed {
            let name = n.metadata.name.clone().unwrap_or_default();
            let phase = n.status.as_ref().map(|s| s.phase);
            use tandem::api::NodePhase as P;
            let status = match (n.spec.action, phase) {
                (NodeAction::Prepare, None | Some(P::Pending)) => json!({"phase": "Prepared"}),
                (NodeAction::Cut, None | Some(P::Pending) | Some(P::Prepared)) => {
                    if let Some((node, gate)) = &play.gate
                        && *node == n.spec.node_name
                        && !gate.load(Ordering::SeqCst)
                    {
                        continue;
                    }
                    for v in &n.spec.volumes {
                        assert_eq!(
                            v.central,
                            images.contains_key(&v.claim),
                            "{}: cut centrally exactly when it is an RBD member",
                            v.claim
                        );
                    }
                    cut_at.insert(name.clone(), std::time::Instant::now());
                    let start = k8s_openapi::jiff::Timestamp::now()
                        - k8s_openapi::jiff::SignedDuration::try_from(play.frozen_since)
                            .expect("duration");
                    let volumes: Vec<serde_json::Value> = n
                        .spec
                        .volumes
                        .iter()
                        .map(|v| {
                            let Some(image) = images.get(&v.claim) else {
                                // A local member, cut on its node.
                                return json!({"claim": v.claim, "backend": "reflink", "frozen": true,
                                              "filesystem": "xfs", "snapshotHandle": format!("reflink:/played/{}", v.claim)});
                            };
                            let handle = play.wrong_handle.clone().unwrap_or_else(|| {
                                format!("rbd-group:{}:{}/{image}@1", rbd.fsid, rbd.pool.pool)
                            });
                            json!({"claim": v.claim, "backend": "rbd-group", "frozen": true,
                                   "filesystem": "ext4", "snapshotHandle": handle})
                        })
                        .collect();
                    seen.push(format!("{name}: cut"));
                    json!({"phase": "Cut", "freezeStart": start.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string(), "volumes": volumes})
                }
                (NodeAction::Cut, Some(P::Cut))
                    if play.watchdog.is_some_and(|bound| {
                        cut_at.get(&name).is_some_and(|t| t.elapsed() > bound)
                    }) =>
                {
                    seen.push(format!("{name}: thawed by its watchdog"));
                    let mut s = serde_json::to_value(n.status.clone()).expect("status");
                    s["phase"] = json!("Aborted");
                    s["message"] = json!("the freeze timeout passed before the release");
                    s
                }
                (NodeAction::Release, Some(P::Cut)) => {
                    // The release comes only after the group snapshot is cut.
                    let snaps = rbd
                        .cluster
                        .group_snaps(&rbd.pool, &group_of(w).await)
                        .unwrap_or_default();
                    assert!(
                        snaps.iter().any(|s| s.state == SnapState::Complete),
                        "released before the RBD group snapshot existed: {snaps:?}"
                    );
                    for image in images.values() {
                        rbd.cluster
                            .write_image(&rbd.pool, image, 0, &data(image, "after"))
                            .expect("write after the thaw");
                    }
                    seen.push(format!("{name}: released"));
                    let mut s = serde_json::to_value(n.status.clone()).expect("status");
                    s["phase"] = json!("Released");
                    s["freezeWindowMillis"] = json!(5);
                    s
                }
                (NodeAction::Abort, Some(p)) if p != P::Aborted && p != P::Failed => {
                    seen.push(format!("{name}: aborted"));
                    let mut s = serde_json::to_value(n.status.clone()).expect("status");
                    s["phase"] = json!("Aborted");
                    s
                }
                (NodeAction::Abort, None) => json!({"phase": "Aborted"}),
                _ => continue,
            };
            let _ = api
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": status})),
                )
                .await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    seen
}

/// The RBD group of the namespace's ConsistencyGroup `g`.
async fn group_of(w: &World) -> String {
    let groups: Api<tandem::api::ConsistencyGroup> = w.env.api();
    let uid = groups
        .get("g")
        .await
        .expect("group")
        .metadata
        .uid
        .expect("uid");
    format!("tandem-{uid}")
}

/// RBD images published the ceph-csi way: PVs of `rbd.csi.ceph.com` naming the cluster id, pool
/// and image, bound claims, and VolumeAttachments to their nodes.
async fn publish(w: &World, rbd: &Rbd, members: &[(&str, &str)]) -> BTreeMap<String, String> {
    let ns = w.env.namespace.clone();
    let configs: Api<ConfigMap> = w.env.api();
    let config = json!([{"clusterID": CLUSTER_ID, "monitors": [rbd.mon_host]}]);
    configs
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "ceph-csi-config"},
                "data": {"config.json": config.to_string()}}))
            .expect("config map"),
        )
        .await
        .expect("config map");
    let secrets: Api<Secret> = w.env.api();
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "csi-rbd-secret"},
                "stringData": {"userID": rbd.user, "userKey": rbd.key}}))
            .expect("secret"),
        )
        .await
        .expect("secret");
    let mut images = BTreeMap::new();
    for (claim, node) in members {
        let image = format!("csi-vol-{ns}-{claim}");
        let pv = format!("{ns}-{claim}");
        let _ = rbd.cluster.delete_image(&rbd.pool, &image);
        rbd.cluster
            .create_image(&rbd.pool, &image, 8 * MIB)
            .expect("create image");
        rbd.cluster
            .write_image(&rbd.pool, &image, 0, &data(&image, "before"))
            .expect("write");
        let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
        let volume = support::objects::RbdVolume {
            cluster_id: CLUSTER_ID,
            pool: &rbd.pool.pool,
            image: &image,
            fs_type: "ext4",
            secret: "csi-rbd-secret",
        };
        volumes
            .create(
                &PostParams::default(),
                &support::objects::rbd_volume(&pv, &ns, claim, &volume),
            )
            .await
            .expect("create PV");
        let claims: Api<PersistentVolumeClaim> = w.env.api();
        claims
            .create(
                &PostParams::default(),
                &support::objects::claim(claim, Some(&pv), &[("app", "db")]),
            )
            .await
            .expect("create PVC");
        support::objects::attach(&w.env.client, &pv, &w.node(node)).await;
        images.insert(claim.to_string(), image);
    }
    images
}

async fn world(
    name: &str,
    rbd: &Rbd,
    members: &[(&str, &str)],
    locals: &[(&str, &str)],
) -> (World, BTreeMap<String, String>) {
    let mut w = World::new(name).await;
    let images = publish(&w, rbd, members).await;
    let ns = w.env.namespace.clone();
    // Local members (a node's own volumes) in the same group and barrier.
    for (claim, node) in locals {
        let pv = format!("{ns}-{claim}");
        let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
        volumes
            .create(
                &PostParams::default(),
                &support::objects::local_volume(
                    &pv,
                    &format!("/played/{claim}"),
                    &w.node(node),
                    &ns,
                    claim,
                    &[],
                ),
            )
            .await
            .expect("create local PV");
        let claims: Api<PersistentVolumeClaim> = w.env.api();
        claims
            .create(
                &PostParams::default(),
                &support::objects::claim(claim, Some(&pv), &[("app", "db")]),
            )
            .await
            .expect("create PVC");
    }
    w.start_controller_with(&["--ceph-csi-config", &format!("{ns}/ceph-csi-config")]);
    w.create_group(
        "g",
        json!({"selector": {"matchLabels": {"app": "db"}}, "freezeTimeoutSeconds": 10}),
    )
    .await;
    (w, images)
}

/// Runs the played nodes while `f` runs; what they did.
async fn with_nodes<F: std::future::Future<Output = ()>>(
    w: &World,
    rbd: &Rbd,
    images: &BTreeMap<String, String>,
    play: Play,
    f: F,
) -> Vec<String> {
    let stop = Arc::new(AtomicBool::new(false));
    let nodes = play_nodes(w, rbd, images, play, stop.clone());
    let test = async {
        f.await;
        // A last round for the answers the controller is still waiting for.
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::SeqCst);
    };
    let (seen, ()) = futures::join!(nodes, test);
    seen
}

/// Plays a node's agent for a restore's local member: waits for the restore's NodeRestore, checks
/// it holds exactly `claim`, and reports it Cloned. Its name and the clone's PV.
async fn play_clone(
    node_restores: &Api<tandem::api::NodeRestore>,
    restore: &str,
    claim: &str,
) -> (String, String) {
    let node_restore = eventually(WAIT, "the local member's NodeRestore", || async {
        let listed = node_restores.list(&Default::default()).await.ok()?;
        listed
            .items
            .into_iter()
            .find(|n| n.spec.group_restore == restore)
    })
    .await;
    let cloned: Vec<&str> = node_restore
        .spec
        .volumes
        .iter()
        .map(|v| v.source_claim.as_str())
        .collect();
    assert_eq!(
        cloned,
        [claim],
        "only the local member is a node's to clone"
    );
    let name = node_restore.metadata.name.clone().unwrap_or_default();
    let clone_pv = node_restore.spec.volumes[0].persistent_volume.clone();
    node_restores
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Cloned", "volumes": [{
                "persistentVolume": clone_pv, "state": "Cloned", "method": "Clone",
                "backend": "reflink", "path": format!("/played/clones/{restore}/{claim}"),
                "filesystem": "ext4", "sizeBytes": 1073741824i64}]}})),
        )
        .await
        .expect("play the node's clone");
    (name, clone_pv)
}

/// Waits for an event `reason` about the object `regarding` whose note says `says`.
async fn wait_event(w: &World, reason: &str, regarding: &str, says: &str) {
    let events: Api<k8s_openapi::api::events::v1::Event> = w.env.api();
    eventually(
        WAIT,
        &format!("a {reason} event on {regarding}"),
        || async {
            let listed = events.list(&Default::default()).await.ok()?;
            listed
                .items
                .iter()
                .any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding)
                        && e.note.as_deref().is_some_and(|n| n.contains(says))
                })
                .then_some(())
        },
    )
    .await
}

/// Waits until the RBD group holds exactly `want`.
async fn group_holds(rbd: &Rbd, group: &str, want: &[&String]) {
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    eventually(WAIT, &format!("the RBD group holding {want:?}"), || async {
        let mut held: Vec<String> = rbd
            .cluster
            .group_images(&rbd.pool, group)
            .ok()?
            .into_iter()
            .map(|i| i.name)
            .collect();
        held.sort();
        (held == want).then_some(())
    })
    .await
}

async fn snapshot(w: &World, name: &str) -> GroupSnapshot {
    let api: Api<GroupSnapshot> = w.env.api();
    api.get(name).await.expect("snapshot")
}

#[tokio::test]
async fn rbd_members_are_cut_by_one_group_snapshot_inside_every_nodes_hold() {
    if !require_root() {
        return;
    }
    let Some(ceph) = ceph_support::Ceph::up() else {
        return;
    };
    println!("Ceph up in {:?}", ceph.up_time);
    let config = ClusterConfig {
        mon_host: ceph.get("CEPH_MON_HOST").into(),
        user: ceph.get("CEPH_USER").into(),
        key: ceph.get("CEPH_KEY").into(),
    };
    let cluster = Arc::new(Cluster::connect(&config, Duration::from_secs(10)).expect("connect"));
    let rbd = Rbd {
        fsid: cluster.fsid().expect("fsid"),
        cluster,
        pool: PoolRef::new(ceph.get("CEPH_POOL"), ""),
        mon_host: config.mon_host.clone(),
        user: config.user.clone(),
        key: config.key.clone(),
    };

    // 1. Three images on two nodes: one group snapshot while both nodes hold, holding exactly
    //    the data from before the freeze; released only after it was cut.
    let (mut w, images) = world(
        "rbd-cut",
        &rbd,
        &[("db-a", "a"), ("db-b", "a"), ("db-c", "b")],
        &[("db-local", "b")],
    )
    .await;
    let seen = with_nodes(&w, &rbd, &images, Play::default(), async {
        w.create_snapshot("s", "g", "Delete").await;
        w.wait_phase("s", GroupSnapshotPhase::Ready).await;
    })
    .await;
    println!("nodes: {seen:?}");
    let s = snapshot(&w, "s").await;
    let status = s.status.clone().expect("status");
    let central = status.central.clone().expect("central");
    assert_eq!(central.phase, CentralPhase::Taken, "{central:?}");
    assert_eq!(central.volumes.len(), 3);
    assert_eq!(
        central.snapshot,
        format!("tandem-{}", s.metadata.uid.clone().unwrap_or_default())
    );
    println!("RBD group snapshot call: {:?} ms", central.call_millis);
    let group = group_of(&w).await;
    assert_eq!(central.group, group);
    let mut in_group: Vec<String> = rbd
        .cluster
        .group_images(&rbd.pool, &group)
        .expect("group images")
        .into_iter()
        .map(|i| i.name)
        .collect();
    in_group.sort();
    assert_eq!(in_group, images.values().cloned().collect::<Vec<_>>());
    for image in images.values() {
        let copy = format!("{image}-check");
        rbd.cluster
            .copy_from_group_snap(&rbd.pool, &group, &central.snapshot, image, &copy)
            .expect("copy from the group snapshot");
        let before = data(image, "before");
        let got = rbd
            .cluster
            .read_image(&rbd.pool, &copy, 0, before.len())
            .expect("read");
        assert!(
            got == before,
            "{image}: the snapshot holds {:?}, not the data from before the freeze",
            String::from_utf8_lossy(&got[..64])
        );
        let after = data(image, "after");
        let head = rbd
            .cluster
            .read_image(&rbd.pool, image, 0, after.len())
            .expect("read");
        assert!(
            head == after,
            "{image}: the head holds what was written after the thaw"
        );
        rbd.cluster
            .delete_image(&rbd.pool, &copy)
            .expect("delete copy");
    }
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(message.contains("RBD group snapshot"), "{message}");

    // Restore to new claims: each RBD member is copied from the group snapshot into a new
    // image, published as a static ceph-csi PV, bound to its claim.
    w.ensure_restore_class().await;
    let rbd_members = json!([
        {"from": "db-a", "to": "db-a-r"}, {"from": "db-b", "to": "db-b-r"}, {"from": "db-c", "to": "db-c-r"}
    ]);
    w.create_restore(
        "r",
        json!({"source": {"groupSnapshotName": "s"}, "newClaims": {"claims": rbd_members}}),
    )
    .await;
    let restored = w
        .wait_restore_phase("r", tandem::api::RestorePhase::Completed)
        .await;
    let restored = restored.status.expect("status");
    println!("restored: {:?}", restored.members);
    assert_eq!(restored.members.len(), 3);
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for member in &restored.members {
        assert_eq!(member.backend.as_deref(), Some("rbd-copy"), "{member:?}");
        let claim = claims.get(&member.claim).await.expect("claim");
        assert_eq!(
            claim.status.and_then(|s| s.phase).as_deref(),
            Some("Bound"),
            "{}",
            member.claim
        );
        let pv = volumes.get(&member.persistent_volume).await.expect("pv");
        let csi = pv.spec.and_then(|s| s.csi).expect("a ceph-csi PV");
        assert_eq!(csi.driver, "rbd.csi.ceph.com");
        assert_eq!(csi.volume_handle, member.persistent_volume);
        let attributes = csi.volume_attributes.unwrap_or_default();
        assert_eq!(
            attributes.get("staticVolume").map(String::as_str),
            Some("true")
        );
        assert!(
            csi.node_stage_secret_ref.is_some(),
            "ceph-csi maps it with it"
        );
        // The new image holds the member's data from before the freeze, not the head's.
        let image = &images[&member.source_claim];
        let before = data(image, "before");
        let got = rbd
            .cluster
            .read_image(&rbd.pool, &member.persistent_volume, 0, before.len())
            .expect("read the restored image");
        assert!(
            got == before,
            "{}: the restored image holds {:?}",
            member.claim,
            String::from_utf8_lossy(&got[..64])
        );
    }
    // A restored claim deleted: tandem deletes its image, then its PV.
    let gone = restored.members[0].clone();
    claims
        .delete(&gone.claim, &Default::default())
        .await
        .expect("delete the restored claim");
    eventually(WAIT, "the restored image and its PV gone", || async {
        let image_gone = rbd
            .cluster
            .open_image(&rbd.pool, &gone.persistent_volume)
            .is_err();
        let pv_gone = volumes
            .get_opt(&gone.persistent_volume)
            .await
            .ok()?
            .is_none();
        (image_gone && pv_gone).then_some(())
    })
    .await;
    for member in &restored.members[1..] {
        rbd.cluster
            .open_image(&rbd.pool, &member.persistent_volume)
            .expect("the other restored images stay");
    }

    // A restore of the whole mixed group to new claims: the RBD members copied by the
    // controller, the local member cloned by its node (played here: the NodeRestore's status is
    // what an agent reports), every claim Bound in one restore.
    w.create_restore("r-mixed", json!({"source": {"groupSnapshotName": "s"}}))
        .await;
    let node_restores: Api<tandem::api::NodeRestore> = w.env.api();
    let (node_restore, clone_pv) = play_clone(&node_restores, "r-mixed", "db-local").await;
    let node_restore = node_restores.get(&node_restore).await.expect("NodeRestore");
    assert_eq!(node_restore.spec.node_name, w.node("b"));
    let mixed = w
        .wait_restore_phase("r-mixed", tandem::api::RestorePhase::Completed)
        .await
        .status
        .expect("status");
    let mut backends: Vec<(String, String)> = mixed
        .members
        .iter()
        .map(|m| {
            (
                m.source_claim.clone(),
                m.backend.clone().unwrap_or_default(),
            )
        })
        .collect();
    backends.sort();
    assert_eq!(
        backends,
        [
            ("db-a".to_string(), "rbd-copy".to_string()),
            ("db-b".into(), "rbd-copy".into()),
            ("db-c".into(), "rbd-copy".into()),
            ("db-local".into(), "reflink".into()),
        ]
    );
    let local_pv = volumes.get(&clone_pv).await.expect("the clone's PV");
    assert!(local_pv.spec.and_then(|s| s.local).is_some(), "a local PV");

    // A restore deleted while its copy runs (a controller whose copies wait 3 s at each progress
    // report): the copy is cancelled and deletes what it made; no image, PV or claim is left.
    let cfg = format!("{}/ceph-csi-config", w.env.namespace);
    if let Some(mut c) = w.controller.take() {
        c.kill9();
    }
    w.start_controller_with(&[
        "--ceph-csi-config",
        &cfg,
        "--test-only-copy-delay-ms",
        "3000",
    ]);
    w.create_restore(
        "r-slow",
        json!({"source": {"groupSnapshotName": "s"}, "newClaims": {"claims": [{"from": "db-a", "to": "slow-a"}]}}),
    )
    .await;
    let restores: Api<tandem::api::GroupRestore> = w.env.api();
    let copying = eventually(WAIT, "the copy running", || async {
        let r = restores.get("r-slow").await.ok()?;
        let member = r.status?.members.into_iter().next()?;
        (member.cloned_at.is_none() && member.progress_percent.is_some()).then_some(member)
    })
    .await;
    eventually(WAIT, "the copy's image made", || async {
        rbd.cluster
            .open_image(&rbd.pool, &copying.persistent_volume)
            .ok()
            .map(drop)
    })
    .await;
    restores
        .delete("r-slow", &Default::default())
        .await
        .expect("delete the restore");
    let deleted = std::time::Instant::now();
    eventually(WAIT, "the restore gone", || async {
        restores
            .get_opt("r-slow")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await;
    eventually(WAIT, "the cancelled copy's image deleted", || async {
        rbd.cluster
            .open_image(&rbd.pool, &copying.persistent_volume)
            .is_err()
            .then_some(())
    })
    .await;
    println!(
        "cancelled copy gone {:?} after the delete",
        deleted.elapsed()
    );
    assert!(
        volumes
            .get_opt(&copying.persistent_volume)
            .await
            .expect("get")
            .is_none()
    );
    assert!(claims.get_opt("slow-a").await.expect("get").is_none());
    if let Some(mut c) = w.controller.take() {
        c.kill9();
    }
    w.start_controller_with(&["--ceph-csi-config", &cfg]);

    // The RBD group snapshot removed behind tandem's back (`rbd group snap rm`): a restore
    // from it fails naming it, and leaves no image, PV or claim.
    rbd.cluster
        .remove_group_snap(&rbd.pool, &group, &central.snapshot)
        .expect("remove the group snapshot by hand");
    w.create_restore(
        "r-gone",
        json!({"source": {"groupSnapshotName": "s"}, "newClaims": {"claims": [
            {"from": "db-a", "to": "gone-a"}, {"from": "db-c", "to": "gone-c"}]}}),
    )
    .await;
    let failed = w
        .wait_restore_phase("r-gone", tandem::api::RestorePhase::Failed)
        .await;
    let status = failed.status.clone().expect("status");
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains(&central.snapshot) && message.contains("does not exist"),
        "{message}"
    );
    for member in &status.members {
        assert!(
            rbd.cluster
                .open_image(&rbd.pool, &member.persistent_volume)
                .is_err(),
            "no copy is left: {member:?}"
        );
        assert!(
            volumes
                .get_opt(&member.persistent_volume)
                .await
                .expect("get")
                .is_none()
        );
    }
    eventually(WAIT, "the claims it created gone", || async {
        let left = claims.list(&Default::default()).await.ok()?;
        (!left.items.iter().any(|c| {
            c.metadata
                .name
                .as_deref()
                .is_some_and(|n| n.starts_with("gone-"))
        }))
        .then_some(())
    })
    .await;

    // 2. Reconciling again never cuts again; deleting the GroupSnapshot removes its RBD group
    //    snapshot and keeps the group while the ConsistencyGroup exists.
    let api: Api<GroupSnapshot> = w.env.api();
    api.delete("s", &Default::default()).await.expect("delete");
    eventually(WAIT, "the GroupSnapshot gone", || async {
        api.get_opt("s").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        rbd.cluster
            .group_snaps(&rbd.pool, &group)
            .expect("snaps")
            .is_empty()
    );
    assert!(
        rbd.cluster
            .list_groups(&rbd.pool)
            .expect("groups")
            .contains(&group)
    );

    // 3. A node that froze some other image: nothing is cut, every node aborts.
    let wrong = Play {
        wrong_handle: Some(format!(
            "rbd-group:{}:{}/someone-else@1",
            rbd.fsid, rbd.pool.pool
        )),
        ..Play::default()
    };
    let seen = with_nodes(&w, &rbd, &images, wrong, async {
        w.create_snapshot("wrong", "g", "Delete").await;
        w.wait_phase("wrong", GroupSnapshotPhase::Failed).await;
    })
    .await;
    let failed = snapshot(&w, "wrong").await.status.expect("status");
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains("someone-else") && message.contains("names"),
        "{message}"
    );
    assert!(seen.iter().any(|s| s.contains("aborted")), "{seen:?}");
    assert!(
        rbd.cluster
            .group_snaps(&rbd.pool, &group)
            .expect("snaps")
            .is_empty()
    );

    // 4. Too little of the freeze left for the call: nothing is cut.
    let late = Play {
        frozen_since: Duration::from_millis(9_500),
        ..Play::default()
    };
    with_nodes(&w, &rbd, &images, late, async {
        w.create_snapshot("late", "g", "Delete").await;
        w.wait_phase("late", GroupSnapshotPhase::Failed).await;
    })
    .await;
    let message = snapshot(&w, "late")
        .await
        .status
        .and_then(|s| s.message)
        .unwrap_or_default();
    assert!(message.contains("freeze budget"), "{message}");
    assert!(
        rbd.cluster
            .group_snaps(&rbd.pool, &group)
            .expect("snaps")
            .is_empty()
    );

    // 5. An image held by an exclusive lock (mapped `-o exclusive`): librbd refuses the cut,
    //    the snapshot fails with nothing cut and every node aborted.
    let locked = rbd
        .cluster
        .open_image(&rbd.pool, &images["db-b"])
        .expect("open");
    locked.lock_exclusive().expect("lock");
    let seen = with_nodes(&w, &rbd, &images, Play::default(), async {
        w.create_snapshot("locked", "g", "Delete").await;
        w.wait_phase("locked", GroupSnapshotPhase::Failed).await;
    })
    .await;
    drop(locked);
    let failed = snapshot(&w, "locked").await.status.expect("status");
    let message = failed.message.clone().unwrap_or_default();
    assert!(message.contains("exclusive lock"), "{message}");
    assert_eq!(failed.central.map(|c| c.phase), Some(CentralPhase::Failed));
    assert!(seen.iter().any(|s| s.contains("aborted")), "{seen:?}");
    assert!(
        rbd.cluster
            .group_snaps(&rbd.pool, &group)
            .expect("snaps")
            .is_empty()
    );

    // 6. The controller killed while node a holds and before node b has cut: the restarted
    //    controller cuts once, inside both holds, and the snapshot is Ready.
    let cfg = format!("{}/ceph-csi-config", w.env.namespace);
    let ns = w.env.namespace.clone();
    let mut controller = w.controller.take().expect("controller");
    let restart_controller = |w: &World| {
        Daemon::spawn(
            "controller-restarted",
            &mut w.tandem(&["controller", "--namespace", &ns, "--ceph-csi-config", &cfg]),
            &w.logs(),
        )
    };
    let gate = Arc::new(AtomicBool::new(false));
    let play = Play {
        gate: Some((w.node("b"), gate.clone())),
        ..Play::default()
    };
    let mut restarted = None;
    let seen = with_nodes(&w, &rbd, &images, play, async {
        w.create_snapshot("restart", "g", "Delete").await;
        wait_node(&w, "restart", "a", NodePhase::Cut).await;
        controller.kill9();
        gate.store(true, Ordering::SeqCst);
        wait_node(&w, "restart", "b", NodePhase::Cut).await;
        restarted = Some(restart_controller(&w));
        w.wait_phase("restart", GroupSnapshotPhase::Ready).await;
    })
    .await;
    println!("restart: {seen:?}");
    let snaps = rbd.cluster.group_snaps(&rbd.pool, &group).expect("snaps");
    assert_eq!(snaps.len(), 1, "cut once: {snaps:?}");
    let taken = snapshot(&w, "restart")
        .await
        .status
        .and_then(|s| s.central)
        .expect("central");
    assert_eq!(
        (taken.phase, snaps[0].name.clone()),
        (CentralPhase::Taken, taken.snapshot.clone())
    );

    // 7. The controller down until every node's own clock thawed it: the restarted controller
    //    fails the snapshot and cuts nothing.
    let mut controller = restarted.take().expect("controller");
    let gate = Arc::new(AtomicBool::new(false));
    let play = Play {
        gate: Some((w.node("b"), gate.clone())),
        watchdog: Some(Duration::from_secs(2)),
        ..Play::default()
    };
    let seen = with_nodes(&w, &rbd, &images, play, async {
        w.create_snapshot("orphaned", "g", "Delete").await;
        wait_node(&w, "orphaned", "a", NodePhase::Cut).await;
        controller.kill9();
        gate.store(true, Ordering::SeqCst);
        wait_node(&w, "orphaned", "a", NodePhase::Aborted).await;
        wait_node(&w, "orphaned", "b", NodePhase::Aborted).await;
        restarted = Some(restart_controller(&w));
        w.wait_phase("orphaned", GroupSnapshotPhase::Failed).await;
    })
    .await;
    println!("orphaned: {seen:?}");
    let snaps = rbd.cluster.group_snaps(&rbd.pool, &group).expect("snaps");
    assert_eq!(snaps.len(), 1, "nothing more was cut: {snaps:?}");
    w.controller = restarted;

    // 8. The ConsistencyGroup deleted: with its last snapshot gone the RBD group goes (its
    //    images stay).
    let groups: Api<tandem::api::ConsistencyGroup> = w.env.api();
    groups
        .delete("g", &Default::default())
        .await
        .expect("delete group");
    for name in ["wrong", "late", "locked", "restart", "orphaned"] {
        api.delete(name, &Default::default()).await.expect("delete");
    }
    eventually(WAIT, "the RBD group removed", || async {
        (!rbd.cluster.list_groups(&rbd.pool).ok()?.contains(&group)).then_some(())
    })
    .await;
    for image in images.values() {
        rbd.cluster
            .open_image(&rbd.pool, image)
            .expect("the image stays");
    }
    drop(w);

    // 9. An image already in another group (ceph-csi's own, say) is refused by name before
    //    anything is frozen, and stays where it is.
    //    (The ConsistencyGroup's RBD group took the image in as soon as the group saw it; it
    //    is moved into the other group by hand here, as if it had been there first.)
    let (w, images) = world("rbd-other", &rbd, &[("db-x", "a")], &[]).await;
    let other = format!("ceph-csi-{}", w.env.namespace);
    let ours = group_of(&w).await;
    eventually(WAIT, "the RBD group following the members", || async {
        let held = rbd.cluster.group_images(&rbd.pool, &ours).ok()?;
        (held.len() == 1).then_some(())
    })
    .await;
    rbd.cluster
        .remove_image(&rbd.pool, &ours, &images["db-x"])
        .expect("leave");
    rbd.cluster.ensure_group(&rbd.pool, &other).expect("group");
    rbd.cluster
        .add_image(&rbd.pool, &other, &images["db-x"])
        .expect("add");
    w.create_snapshot("s", "g", "Delete").await;
    let failed = w.wait_phase("s", GroupSnapshotPhase::Failed).await;
    let message = failed.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.contains(&other) && message.contains("never moves"),
        "{message}"
    );
    assert!(w.node_snapshots().await.is_empty(), "nothing was frozen");
    let held: Vec<String> = rbd
        .cluster
        .group_images(&rbd.pool, &other)
        .expect("images")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(held, vec![images["db-x"].clone()]);
    rbd.cluster
        .remove_group(&rbd.pool, &other)
        .expect("cleanup");
    drop(w);

    // 10. InPlace of a mixed group: the local member is cloned on its node (played), then, once
    //     no RBD member is attached, one `rbd group snap rollback` (their claims and PVs stay, the
    //     images hold the snapshot's data), then the local claim is swapped to its clone.
    let (w, images) = world(
        "rbd-undo",
        &rbd,
        &[("db-u1", "a"), ("db-u2", "b")],
        &[("db-ulocal", "b")],
    )
    .await;
    with_nodes(&w, &rbd, &images, Play::default(), async {
        w.create_snapshot("s", "g", "Delete").await;
        w.wait_phase("s", GroupSnapshotPhase::Ready).await;
    })
    .await;
    w.ensure_restore_class().await;
    let restores: Api<tandem::api::GroupRestore> = w.env.api();
    let node_restores: Api<tandem::api::NodeRestore> = w.env.api();
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let attachments: Api<k8s_openapi::api::storage::v1::VolumeAttachment> =
        Api::all(w.env.client.clone());
    let own_pv = format!("{}-db-ulocal", w.env.namespace);
    let in_place = json!({"source": {"groupSnapshotName": "s"}, "mode": "InPlace", "inPlace": {}});
    let waits_for_detach = |name: &'static str| {
        let restores = restores.clone();
        async move {
            eventually(WAIT, "the rollback waits for the detach", || async {
                let r = restores.get(name).await.ok()?;
                r.status?
                    .message?
                    .contains("waiting for their RBD images to be detached")
                    .then_some(())
            })
            .await
        }
    };
    let rbd_pvs: Vec<(String, String)> = [("db-u1", "a"), ("db-u2", "b")]
        .iter()
        .map(|(claim, node)| (format!("{}-{claim}", w.env.namespace), w.node(node)))
        .collect();
    let detach = || async {
        for (pv, _) in &rbd_pvs {
            attachments
                .delete(&format!("csi-{pv}"), &Default::default())
                .await
                .expect("detach");
        }
    };
    let heads_hold = |generation: &str| {
        for image in images.values() {
            let expected = data(image, generation);
            let head = rbd
                .cluster
                .read_image(&rbd.pool, image, 0, expected.len())
                .expect("read");
            assert!(head == expected, "{image}: the head is not {generation:?}");
        }
    };

    // First, one whose RBD rollback is refused (an image joined the RBD group behind tandem's
    // back, so it no longer holds exactly the snapshot's images): it fails before the point of
    // no return. The local clone goes, no claim is swapped, no image is rolled back.
    let intruder = format!("intruder-{}", w.env.namespace);
    let _ = rbd.cluster.delete_image(&rbd.pool, &intruder);
    rbd.cluster
        .create_image(&rbd.pool, &intruder, MIB)
        .expect("create");
    let group = group_of(&w).await;
    rbd.cluster
        .add_image(&rbd.pool, &group, &intruder)
        .expect("join the group by hand");
    w.create_restore("undo-0", in_place.clone()).await;
    let (refused_node, _) = play_clone(&node_restores, "undo-0", "db-ulocal").await;
    waits_for_detach("undo-0").await;
    detach().await;
    let refused = w
        .wait_restore_phase("undo-0", tandem::api::RestorePhase::Failed)
        .await;
    println!(
        "refused: {:?}",
        refused.status.as_ref().and_then(|s| s.message.clone())
    );
    assert_eq!(
        world::condition_reason(&refused, "Ready").as_deref(),
        Some("RbdRollbackFailed"),
        "{:?}",
        refused.status
    );
    // The group's own claims are Bound and untouched: nothing tells a person to delete them.
    let message = refused
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    assert!(!message.contains("stay Pending"), "{message}");
    let local = claims.get("db-ulocal").await.expect("the local claim");
    assert_eq!(
        local.spec.and_then(|s| s.volume_name).as_deref(),
        Some(own_pv.as_str()),
        "the local claim is untouched"
    );
    eventually(WAIT, "the refused restore's clone aborted", || async {
        let n = node_restores.get_opt(&refused_node).await.ok()?;
        n.is_none_or(|n| n.spec.action == tandem::api::NodeRestoreAction::Abort)
            .then_some(())
    })
    .await;
    heads_hold("after");
    rbd.cluster
        .remove_image(&rbd.pool, &group, &intruder)
        .expect("leave");
    rbd.cluster
        .delete_image(&rbd.pool, &intruder)
        .expect("delete");
    for (pv, node) in &rbd_pvs {
        support::objects::attach(&w.env.client, pv, node).await;
    }

    // Then the one that works.
    w.create_restore("undo", in_place.clone()).await;
    let (_, clone_pv) = play_clone(&node_restores, "undo", "db-ulocal").await;
    waits_for_detach("undo").await;
    heads_hold("after");
    let local = claims.get("db-ulocal").await.expect("the local claim");
    assert_eq!(
        local.spec.and_then(|s| s.volume_name).as_deref(),
        Some(own_pv.as_str()),
        "nothing is swapped before the rollback"
    );
    detach().await;
    let done = w
        .wait_restore_phase("undo", tandem::api::RestorePhase::Completed)
        .await;
    let message = done
        .status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default();
    println!("in place: {message}");
    heads_hold("before");
    assert!(
        message.contains("rolled back on their own volumes"),
        "{message}"
    );
    let swapped = claims.get("db-ulocal").await.expect("the local claim");
    assert_eq!(
        swapped.spec.and_then(|s| s.volume_name).as_deref(),
        Some(clone_pv.as_str()),
        "the local claim is on its clone"
    );
    let old = volumes.get(&own_pv).await.expect("the undo point");
    assert_eq!(
        old.metadata
            .labels
            .unwrap_or_default()
            .get("tandem.dev/pre-restore")
            .map(String::as_str),
        Some("undo")
    );

    // 11. A member claim deleted while a GroupSnapshot holds its image: held (with an event
    //     naming the snapshot), until that snapshot goes; then its image leaves the RBD group and
    //     the claim goes, so ceph-csi can delete the image.
    let held = claims.get("db-u1").await.expect("claim");
    assert!(
        held.finalizers()
            .iter()
            .any(|f| f == "tandem.dev/rbd-member"),
        "{:?}",
        held.finalizers()
    );
    claims
        .delete("db-u1", &Default::default())
        .await
        .expect("delete the member claim");
    wait_event(&w, "RbdSnapshotsHoldImage", "db-u1", "GroupSnapshot(s) s").await;
    assert!(
        claims.get_opt("db-u1").await.expect("get").is_some(),
        "held"
    );
    let group = group_of(&w).await;
    let in_group = |rbd: &Rbd| -> Vec<String> {
        rbd.cluster
            .group_images(&rbd.pool, &group)
            .expect("group images")
            .into_iter()
            .map(|i| i.name)
            .collect()
    };
    // The group follows its members, and a claim being deleted is no member: its image may
    // leave the RBD group at once (its snapshot of s stays, and goes with s). The claim stays.
    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .delete("s", &Default::default())
        .await
        .expect("delete the snapshot");
    eventually(WAIT, "the claim released", || async {
        claims.get_opt("db-u1").await.ok()?.is_none().then_some(())
    })
    .await;
    assert_eq!(in_group(&rbd), vec![images["db-u2"].clone()]);
    rbd.cluster
        .delete_image(&rbd.pool, &images["db-u1"])
        .expect("what ceph-csi does next now succeeds");

    // 12. The ConsistencyGroup deleted (no snapshot left), then its last member claim: the
    //     image leaves the RBD group, and the group, empty and without a ConsistencyGroup, goes.
    let groups: Api<tandem::api::ConsistencyGroup> = w.env.api();
    groups
        .delete("g", &Default::default())
        .await
        .expect("delete the group");
    claims
        .delete("db-u2", &Default::default())
        .await
        .expect("delete the last member claim");
    eventually(WAIT, "the claim released", || async {
        claims.get_opt("db-u2").await.ok()?.is_none().then_some(())
    })
    .await;
    assert!(
        !rbd.cluster
            .list_groups(&rbd.pool)
            .expect("groups")
            .contains(&group),
        "the RBD group went with its last image"
    );
    drop(w);

    // 13. The RBD group follows the ConsistencyGroup as it changes, with no snapshot: a claim
    //     relabelled out leaves it, relabelled back joins it again (protected first), and an
    //     image already in another group is told on the ConsistencyGroup, never moved.
    let (w, images) = world("rbd-follow", &rbd, &[("db-f1", "a"), ("db-f2", "a")], &[]).await;
    let group = group_of(&w).await;
    group_holds(&rbd, &group, &[&images["db-f1"], &images["db-f2"]]).await;
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    for claim in ["db-f1", "db-f2"] {
        let c = claims.get(claim).await.expect("claim");
        assert!(
            c.finalizers().iter().any(|f| f == "tandem.dev/rbd-member"),
            "{claim} protected before its image joined"
        );
    }
    let relabel = |app: &'static str| {
        let claims = claims.clone();
        async move {
            claims
                .patch(
                    "db-f2",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {"app": app}}})),
                )
                .await
                .expect("relabel");
        }
    };
    relabel("other").await;
    group_holds(&rbd, &group, &[&images["db-f1"]]).await;
    relabel("db").await;
    group_holds(&rbd, &group, &[&images["db-f1"], &images["db-f2"]]).await;
    // A third image, in another group before it becomes a member.
    let ns = w.env.namespace.clone();
    let third = format!("csi-vol-{ns}-db-f3");
    let _ = rbd.cluster.delete_image(&rbd.pool, &third);
    rbd.cluster
        .create_image(&rbd.pool, &third, 8 * MIB)
        .expect("create");
    let other = format!("ceph-csi-{ns}");
    rbd.cluster.ensure_group(&rbd.pool, &other).expect("group");
    rbd.cluster
        .add_image(&rbd.pool, &other, &third)
        .expect("add");
    let volume = support::objects::RbdVolume {
        cluster_id: CLUSTER_ID,
        pool: &rbd.pool.pool,
        image: &third,
        fs_type: "ext4",
        secret: "csi-rbd-secret",
    };
    Api::<PersistentVolume>::all(w.env.client.clone())
        .create(
            &PostParams::default(),
            &support::objects::rbd_volume(&format!("{ns}-db-f3"), &ns, "db-f3", &volume),
        )
        .await
        .expect("PV");
    claims
        .create(
            &PostParams::default(),
            &support::objects::claim("db-f3", Some(&format!("{ns}-db-f3")), &[("app", "db")]),
        )
        .await
        .expect("claim");
    wait_event(&w, "RbdImageInOtherGroup", "g", &other).await;
    let held: Vec<String> = rbd
        .cluster
        .group_images(&rbd.pool, &other)
        .expect("images")
        .into_iter()
        .map(|i| i.name)
        .collect();
    assert_eq!(held, vec![third.clone()], "never moved");
    rbd.cluster
        .remove_group(&rbd.pool, &other)
        .expect("cleanup");
}
