//! The Ceph RBD members of a NewClaims restore. Ceph 16.x cannot clone from a group snapshot, so
//! the controller (the one process holding Ceph credentials) copies each member's image, as it
//! was in the RBD group snapshot, into a new image named after the restored PV, and publishes
//! that image as a static ceph-csi PV pre-bound to the restored claim. tandem is the PV's
//! external deleter (ceph-csi deletes no static volume): once the claim is gone, the image goes,
//! then the PV.
//!
//! A copy interrupted by a restart is deleted and made again: a member counts as copied only
//! once its status says so, and that is written after the copy returned.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::PersistentVolume;
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::plan::{
    BoundClaim, Owner, PROVISIONED_BY_ANNOTATION, Published, Target, published_volume,
};
use super::{RestoreContext, now};
use crate::api::{
    CentralPhase, CentralSnapshot, CentralVolume, CloneMethod, RESTORE_PROVISIONER, RestoredMember,
};
use crate::controller::cache::CachedVolume;
use crate::controller::central::{rbd_path, rbd_volume, snapshot_path};
use crate::controller::ceph::{self, CephError};
use crate::controller::rbd::PoolRef;
use crate::controller::{Error, publish_event};

/// The backend a restored RBD member reports (`status.members[].backend`).
pub const RBD_COPY_BACKEND: &str = "rbd-copy";
/// The finalizer on a restored RBD member's PV: it goes once tandem deleted the image.
pub const IMAGE_FINALIZER: &str = "tandem.dev/rbd-image";

/// The central record of `target`'s member, if it is an RBD member.
pub fn central_volume<'a>(
    central: Option<&'a CentralSnapshot>,
    target: &Target,
) -> Option<&'a CentralVolume> {
    central?
        .volumes
        .iter()
        .find(|v| v.persistent_volume == target.member.persistent_volume)
}

/// Why the RBD members of GroupSnapshot `snapshot` cannot be restored to new claims, or None.
pub fn refusal(snapshot: &str, central: &CentralSnapshot) -> Option<(&'static str, String)> {
    let path = snapshot_path(central);
    if central.phase != CentralPhase::Taken {
        return Some((
            "RbdSnapshotMissing",
            format!(
                "GroupSnapshot {snapshot} records its RBD group snapshot {path} as {:?}, not Taken: there is nothing to copy",
                central.phase
            ),
        ));
    }
    for volume in &central.volumes {
        let Some(csi) = &volume.csi else {
            return Some((
                "RbdSnapshotTooOld",
                format!(
                    "GroupSnapshot {snapshot} was taken by a tandem that did not record how PersistentVolume {} is mapped (its CSI driver, secrets and attributes), so a copy of {} cannot be published; restore it in place (spec.mode: InPlace), or take a new GroupSnapshot",
                    volume.persistent_volume,
                    rbd_path(&central.pool, &central.rados_namespace, &volume.image)
                ),
            ));
        };
        if csi.attributes.get("encrypted").map(String::as_str) == Some("true") {
            return Some((
                "RbdEncryptedUnsupported",
                format!(
                    "PersistentVolume {} is an encrypted ceph-csi volume: its key is kept by ceph-csi under the volume's own id, which a copy does not have, so tandem does not restore it to a new claim; restore in place (spec.mode: InPlace)",
                    volume.persistent_volume
                ),
            ));
        }
    }
    None
}

/// The restored member's record before its copy: a full copy by the controller.
pub fn pending_member(mut member: RestoredMember, target: &Target) -> RestoredMember {
    member.method = Some(CloneMethod::Copy);
    member.backend = Some(RBD_COPY_BACKEND.into());
    member.size = target.member.capacity.clone();
    member.progress_percent = Some(0);
    member
}

/// The backend of an RBD member an InPlace restore rolls back (`rbd group snap rollback`).
pub const RBD_ROLLBACK_BACKEND: &str = "rbd-group";

/// Whether a restored member is an RBD copy (made by the controller, deleted on a rollback).
pub fn is_rbd_copy(member: &RestoredMember) -> bool {
    member.backend.as_deref() == Some(RBD_COPY_BACKEND)
}

/// Whether a restored member is an RBD one (copied or rolled back): no NodeRestore's business.
pub fn is_rbd_member(member: &RestoredMember) -> bool {
    is_rbd_copy(member) || member.backend.as_deref() == Some(RBD_ROLLBACK_BACKEND)
}

/// The static ceph-csi PV of a restored RBD member: the new image (named after the PV) as
/// `volumeHandle` and `imageName`, `staticVolume: "true"`, the member's driver, filesystem,
/// secrets and mapping attributes, pre-bound to the claim (with its uid), no node affinity (the
/// image is reachable from every node), reclaim Delete with tandem as the external deleter.
pub fn volume_object(
    owner: &Owner<'_>,
    target: &Target,
    claim: &BoundClaim,
    central: &CentralSnapshot,
    volume: &CentralVolume,
) -> Result<PersistentVolume, String> {
    let csi = volume.csi.as_ref().ok_or_else(|| {
        format!(
            "the snapshot recorded no CSI settings for {}",
            volume.persistent_volume
        )
    })?;
    let image = &target.persistent_volume;
    let mut attributes = csi.attributes.clone();
    attributes.insert("clusterID".into(), central.cluster_id.clone());
    attributes.insert("pool".into(), central.pool.clone());
    if central.rados_namespace.is_empty() {
        attributes.remove("radosNamespace");
    } else {
        attributes.insert("radosNamespace".into(), central.rados_namespace.clone());
    }
    attributes.insert("imageName".into(), image.clone());
    attributes.insert("staticVolume".into(), "true".into());
    let secret = |reference: &Option<String>| {
        reference
            .as_deref()
            .and_then(|r| r.split_once('/'))
            .map(|(namespace, name)| json!({"namespace": namespace, "name": name}))
    };
    let mut source = json!({
        "driver": csi.driver,
        "volumeHandle": image,
        "volumeAttributes": attributes,
    });
    if let Some(fs) = &csi.fs_type {
        source["fsType"] = json!(fs);
    }
    if let Some(r) = secret(&csi.node_stage_secret) {
        source["nodeStageSecretRef"] = r;
    }
    if let Some(r) = secret(&csi.controller_secret) {
        source["controllerExpandSecretRef"] = r;
    }
    let size = target
        .member
        .capacity
        .as_ref()
        .and_then(|q| super::quota::parse_quantity(&q.0))
        .unwrap_or(0)
        .max(claim.request_bytes);
    // The copy has its origin's XFS uuid: without nouuid it cannot be mounted beside it.
    let xfs =
        csi.fs_type.as_deref() == Some("xfs") || target.member.filesystem.as_deref() == Some("xfs");
    let mount_options = if claim.volume_mode == "Filesystem" && xfs {
        vec!["nouuid"]
    } else {
        Vec::new()
    };
    Ok(published_volume(
        owner,
        target,
        claim,
        Published {
            size,
            source: ("csi", source),
            // Reachable from every node.
            node_affinity: None,
            mount_options,
            annotations: Default::default(),
            finalizer: IMAGE_FINALIZER,
        },
    ))
}

/// The copies this controller runs, by restore uid and new image. A copy takes as long as its
/// image is large, so it runs on the blocking pool, outside any reconcile: the reconcile starts
/// it, reads its progress and collects its result. A copy whose restore rolled back is cancelled
/// and deletes what it made itself.
#[derive(Default)]
pub struct Copies {
    running: Mutex<HashMap<String, Arc<Copy>>>,
}

/// One copy: progress, cancellation, and its result once done.
#[derive(Default)]
pub struct Copy {
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
    cancelled: AtomicBool,
    result: Mutex<Option<Result<Duration, String>>>,
}

impl Copies {
    fn key(restore_uid: &str, image: &str) -> String {
        format!("{restore_uid}/{image}")
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Copy>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels (and forgets) the copies of a restore; the images of those still running, which
    /// delete themselves once they stop.
    pub fn cancel(&self, restore_uid: &str) -> Vec<String> {
        let prefix = format!("{restore_uid}/");
        let mut copies = self.lock();
        let mine: Vec<String> = copies
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect();
        let mut running = Vec::new();
        for key in mine {
            let Some(copy) = copies.remove(&key) else {
                continue;
            };
            // Under the result's lock: the copy decides who deletes its image under it too.
            let result = copy.result.lock().unwrap_or_else(|p| p.into_inner());
            copy.cancelled.store(true, Ordering::SeqCst);
            if result.is_none() {
                running.push(key[prefix.len()..].to_string());
            }
        }
        running
    }
}

impl Copy {
    fn percent(&self) -> i32 {
        let total = self.total_bytes.load(Ordering::Relaxed);
        let done = self.done_bytes.load(Ordering::Relaxed).min(total);
        if total == 0 {
            return 0;
        }
        i32::try_from(done * 100 / total).unwrap_or(100)
    }
}

/// Where the RBD copies of a restore stand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Copying {
    /// Every RBD member is copied.
    Done,
    /// Some copy is still running (progress is in the members).
    Running,
    /// A copy failed: the restore rolls back.
    Failed(String),
}

/// Starts the copy of every RBD member not copied yet, reads the progress of those running into
/// `members`, and records those done.
pub async fn copy_members(
    rctx: &RestoreContext,
    restore_uid: &str,
    central: &CentralSnapshot,
    targets: &[Target],
    members: &mut [RestoredMember],
) -> Result<Copying, Error> {
    let todo: Vec<(usize, CentralVolume, String)> = members
        .iter()
        .enumerate()
        .filter(|(_, m)| is_rbd_copy(m) && m.cloned_at.is_none())
        .filter_map(|(i, m)| {
            let target = targets
                .iter()
                .find(|t| t.persistent_volume == m.persistent_volume)?;
            let volume = central_volume(Some(central), target)?;
            Some((i, volume.clone(), target.persistent_volume.clone()))
        })
        .collect();
    if todo.is_empty() {
        return Ok(Copying::Done);
    }
    let mut failures = Vec::new();
    let mut running = false;
    let mut to_start = Vec::new();
    for (i, volume, new_image) in &todo {
        let key = Copies::key(restore_uid, new_image);
        let copy = rctx.copies.lock().get(&key).cloned();
        let Some(copy) = copy else {
            to_start.push((*i, volume.clone(), new_image.clone()));
            continue;
        };
        let from = rbd_path(&central.pool, &central.rados_namespace, &volume.image);
        let to = rbd_path(&central.pool, &central.rados_namespace, new_image);
        let result = copy
            .result
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let member = &mut members[*i];
        match result {
            None => {
                running = true;
                member.progress_percent = Some(copy.percent());
            }
            Some(Ok(took)) => {
                rctx.copies.lock().remove(&key);
                info!(from = %from, to = %to, millis = took.as_millis() as u64, "RBD member copied");
                member.cloned_at = Some(now());
                member.progress_percent = Some(100);
                member.message = Some(format!(
                    "copied {from}@{} to {to} in {} ms",
                    central.snapshot,
                    took.as_millis()
                ));
            }
            Some(Err(e)) => {
                rctx.copies.lock().remove(&key);
                member.message = Some(e.clone());
                failures.push(format!("cannot copy {from} to {to}: {e}"));
            }
        }
    }
    if !failures.is_empty() {
        rctx.ctx.ceph.forget(&central.cluster_id);
        return Ok(Copying::Failed(failures.join("; ")));
    }
    if !to_start.is_empty() {
        let client = rctx.ctx.client.clone();
        let cluster =
            match ceph::connect_for(&rctx.ctx.ceph, &client, &rctx.ctx.volumes, central).await {
                Ok(c) => c,
                Err(CephError::Kube(e)) => return Err(e.into()),
                Err(e) => {
                    return Ok(Copying::Failed(format!(
                        "cannot reach the Ceph cluster: {e}"
                    )));
                }
            };
        let pool = PoolRef::new(&central.pool, &central.rados_namespace);
        for (i, volume, new_image) in to_start {
            let copy = Arc::new(Copy::default());
            rctx.copies
                .lock()
                .insert(Copies::key(restore_uid, &new_image), copy.clone());
            let (cluster, pool, group, snap) = (
                cluster.clone(),
                pool.clone(),
                central.group.clone(),
                central.snapshot.clone(),
            );
            let image = volume.image.clone();
            let delay = rctx.ctx.test_only_copy_delay;
            members[i].progress_percent = Some(0);
            tokio::task::spawn_blocking(move || {
                let started = std::time::Instant::now();
                // What an interrupted attempt left is not a copy.
                let copied = cluster.delete_image(&pool, &new_image).and_then(|()| {
                    cluster.copy_from_group_snap_with_progress(
                        &pool,
                        &group,
                        &snap,
                        &image,
                        &new_image,
                        &|done, total| {
                            if let Some(delay) = delay {
                                std::thread::sleep(delay);
                            }
                            copy.done_bytes.store(done, Ordering::Relaxed);
                            copy.total_bytes.store(total, Ordering::Relaxed);
                            !copy.cancelled.load(Ordering::SeqCst)
                        },
                    )
                });
                // Decided under the result's lock (as `cancel` decides): cancelled before this,
                // the copy deletes its image; after, the rollback does.
                let cancelled = {
                    let mut result = copy.result.lock().unwrap_or_else(|p| p.into_inner());
                    *result = Some(
                        copied
                            .map(|()| started.elapsed())
                            .map_err(|e| e.to_string()),
                    );
                    copy.cancelled.load(Ordering::SeqCst)
                };
                if cancelled {
                    // Its restore rolled back while it ran: nothing else deletes this image.
                    if let Err(e) = cluster.delete_image(&pool, &new_image) {
                        warn!(image = %new_image, error = %e, "cannot delete the copy of a rolled-back restore");
                    }
                }
            });
        }
        running = true;
    }
    Ok(if running {
        Copying::Running
    } else {
        Copying::Done
    })
}

/// Deletes the copies of a rolled-back restore that have no PV (with a PV, the deleter deletes
/// the image once the PV goes).
pub async fn delete_unpublished(
    rctx: &RestoreContext,
    restore_uid: &str,
    central: &CentralSnapshot,
    members: &[RestoredMember],
) -> Result<(), Error> {
    // A copy still running deletes its image itself once it stops.
    let running = rctx.copies.cancel(restore_uid);
    let volumes: Api<PersistentVolume> = Api::all(rctx.ctx.client.clone());
    let mut images = Vec::new();
    for member in members
        .iter()
        .filter(|m| is_rbd_copy(m) && !running.contains(&m.persistent_volume))
    {
        if volumes.get_opt(&member.persistent_volume).await?.is_none() {
            images.push(member.persistent_volume.clone());
        }
    }
    if images.is_empty() {
        return Ok(());
    }
    let client = rctx.ctx.client.clone();
    let cluster = ceph::connect_for(&rctx.ctx.ceph, &client, &rctx.ctx.volumes, central)
        .await
        .map_err(|e| Error::Ceph(e.to_string()))?;
    let pool = PoolRef::new(&central.pool, &central.rados_namespace);
    let deleted = images.clone();
    ceph::blocking(move || {
        images
            .iter()
            .try_for_each(|image| cluster.delete_image(&pool, image))
    })
    .await
    .map_err(|e| Error::Ceph(e.to_string()))?;
    info!(images = ?deleted, "rolled back: the unpublished RBD copies are deleted");
    Ok(())
}

/// What the deleter does with a PV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deletion {
    /// Not a restored RBD copy, or its claim still holds it.
    Keep,
    /// Its claim is gone (or the PV is being deleted): delete the image, then the PV.
    DeleteImage,
}

/// Whether a PV's image is to be deleted: only tandem's restored RBD copies (its finalizer and
/// provisioner mark), once Released or deleted.
pub fn deletion(pv: &CachedVolume) -> Deletion {
    let ours = pv.finalizers().iter().any(|f| f == IMAGE_FINALIZER)
        && pv
            .annotations()
            .get(PROVISIONED_BY_ANNOTATION)
            .map(String::as_str)
            == Some(RESTORE_PROVISIONER);
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    if ours && (released || pv.metadata.deletion_timestamp.is_some()) {
        Deletion::DeleteImage
    } else {
        Deletion::Keep
    }
}

/// The deleter of restored RBD copies: deletes the image of a Released (or deleted) PV, then the
/// PV. A busy image (still mapped, or holding snapshots) waits, with an event on the PV.
pub async fn reconcile_volume(
    pv: Arc<CachedVolume>,
    rctx: Arc<RestoreContext>,
) -> Result<Action, Error> {
    if deletion(&pv) == Deletion::Keep {
        return Ok(Action::await_change());
    }
    let name = pv.name_any();
    let Some(Ok(image)) = rbd_volume(&pv) else {
        warn!(pv = %name, "a restored RBD copy whose PV names no image: releasing it");
        return remove_finalizer(&rctx, &pv).await;
    };
    let client = rctx.ctx.client.clone();
    let path = rbd_path(&image.pool, &image.namespace, &image.image);
    let deleted = match rctx
        .ctx
        .ceph
        .connect(&client, &image.cluster_id, Some(&pv))
        .await
    {
        Ok(cluster) => {
            let pool = PoolRef::new(&image.pool, &image.namespace);
            let name = image.image.clone();
            ceph::blocking(move || cluster.delete_image(&pool, &name)).await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = deleted {
        rctx.ctx.ceph.forget(&image.cluster_id);
        warn!(pv = %name, image = %path, error = %e, "cannot delete a restored RBD copy yet");
        publish_event(
            &rctx.ctx,
            &pv_reference(&pv),
            EventType::Warning,
            "RbdImageNotDeleted".into(),
            Some(format!(
                "the claim of this restored volume is gone, but its image {path} cannot be deleted yet ({e}); retried every 30 s"
            )),
            "Delete",
        )
        .await;
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    info!(pv = %name, image = %path, "the claim is gone: its RBD copy is deleted");
    let volumes: Api<PersistentVolume> = Api::all(client);
    if pv.metadata.deletion_timestamp.is_none() {
        match volumes.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Action::await_change()),
            Err(e) => return Err(e.into()),
        }
    }
    remove_finalizer(&rctx, &pv).await
}

fn pv_reference(pv: &CachedVolume) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("PersistentVolume".into()),
        name: pv.metadata.name.clone(),
        uid: pv.metadata.uid.clone(),
        ..Default::default()
    }
}

async fn remove_finalizer(rctx: &RestoreContext, pv: &CachedVolume) -> Result<Action, Error> {
    let volumes: Api<PersistentVolume> = Api::all(rctx.ctx.client.clone());
    crate::finalizer::remove(&volumes, pv, IMAGE_FINALIZER).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CentralVolumeCsi, MemberSnapshot};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use std::collections::BTreeMap;

    fn central() -> CentralSnapshot {
        CentralSnapshot {
            cluster_id: "c1".into(),
            pool: "rbd".into(),
            rados_namespace: "ns1".into(),
            group: "tandem-g".into(),
            snapshot: "tandem-s".into(),
            volumes: vec![CentralVolume {
                persistent_volume: "pv-db".into(),
                image: "csi-vol-1".into(),
                csi: Some(CentralVolumeCsi {
                    driver: "rook-ceph.rbd.csi.ceph.com".into(),
                    fs_type: Some("xfs".into()),
                    node_stage_secret: Some("rook-ceph/rook-csi-rbd-node".into()),
                    controller_secret: Some("rook-ceph/rook-csi-rbd-provisioner".into()),
                    attributes: BTreeMap::from([
                        ("clusterID".into(), "c1".into()),
                        ("pool".into(), "rbd".into()),
                        ("radosNamespace".into(), "ns1".into()),
                        ("imageFeatures".into(), "layering".into()),
                    ]),
                }),
            }],
            phase: CentralPhase::Taken,
            ..Default::default()
        }
    }

    fn target() -> Target {
        Target {
            member: MemberSnapshot {
                claim: "db".into(),
                persistent_volume: "pv-db".into(),
                node: "a".into(),
                capacity: Some(Quantity("1Gi".into())),
                filesystem: Some("xfs".into()),
                ..Default::default()
            },
            claim: "db-restored".into(),
            persistent_volume: "tandem-0123456789".into(),
        }
    }

    #[test]
    fn a_copy_reports_its_progress_and_a_rollback_cancels_only_its_own_restores_copies() {
        let copies = Copies::default();
        let mine = Arc::new(Copy::default());
        let other = Arc::new(Copy::default());
        copies
            .lock()
            .insert(Copies::key("r1", "tandem-a"), mine.clone());
        copies
            .lock()
            .insert(Copies::key("r2", "tandem-b"), other.clone());
        assert_eq!(mine.percent(), 0, "nothing known yet");
        mine.total_bytes.store(400, Ordering::Relaxed);
        mine.done_bytes.store(100, Ordering::Relaxed);
        assert_eq!(mine.percent(), 25);
        mine.done_bytes.store(500, Ordering::Relaxed);
        assert_eq!(mine.percent(), 100, "never past 100");
        let finished = Arc::new(Copy::default());
        *finished.result.lock().expect("lock") = Some(Ok(Duration::from_millis(5)));
        copies
            .lock()
            .insert(Copies::key("r1", "tandem-done"), finished.clone());
        assert_eq!(copies.cancel("r1"), ["tandem-a"], "only the running one");
        assert!(mine.cancelled.load(Ordering::SeqCst));
        assert!(!other.cancelled.load(Ordering::SeqCst));
        assert_eq!(copies.lock().len(), 1, "the cancelled ones are forgotten");
        assert!(copies.cancel("r3").is_empty(), "a restore without copies");
    }

    #[test]
    fn only_a_taken_recorded_unencrypted_snapshot_is_copied() {
        assert_eq!(refusal("s", &central()), None);
        let mut c = central();
        c.phase = CentralPhase::Removed;
        assert_eq!(refusal("s", &c).map(|r| r.0), Some("RbdSnapshotMissing"));
        let mut c = central();
        c.volumes[0].csi = None;
        assert_eq!(refusal("s", &c).map(|r| r.0), Some("RbdSnapshotTooOld"));
        let mut c = central();
        if let Some(csi) = c.volumes[0].csi.as_mut() {
            csi.attributes.insert("encrypted".into(), "true".into());
        }
        assert_eq!(
            refusal("s", &c).map(|r| r.0),
            Some("RbdEncryptedUnsupported")
        );
    }

    #[test]
    fn a_copy_is_published_as_a_static_ceph_csi_volume_of_the_claim() {
        let restore: crate::api::GroupRestore = serde_json::from_value(json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "GroupRestore",
            "metadata": {"name": "r", "namespace": "app"},
            "spec": {"source": {"groupSnapshotName": "s"}},
        }))
        .expect("restore");
        let owner = Owner::of(&restore, "app", "uid-r", "tandem-restore");
        let claim = BoundClaim {
            name: "db-restored".into(),
            uid: "uid-c".into(),
            storage_class: "tandem-restore".into(),
            request_bytes: 1 << 20,
            access_modes: vec!["ReadWriteOnce".into()],
            volume_mode: "Filesystem".into(),
        };
        let c = central();
        let pv = volume_object(&owner, &target(), &claim, &c, &c.volumes[0]).expect("pv");
        let spec = pv.spec.clone().expect("spec");
        let csi = spec.csi.clone().expect("csi");
        assert_eq!(csi.driver, "rook-ceph.rbd.csi.ceph.com");
        assert_eq!(csi.volume_handle, "tandem-0123456789");
        assert_eq!(csi.fs_type.as_deref(), Some("xfs"));
        let attributes = csi.volume_attributes.clone().unwrap_or_default();
        assert_eq!(attributes["staticVolume"], "true");
        assert_eq!(attributes["imageName"], "tandem-0123456789");
        assert_eq!(attributes["radosNamespace"], "ns1");
        assert_eq!(attributes["imageFeatures"], "layering");
        assert_eq!(
            csi.node_stage_secret_ref.and_then(|r| r.name).as_deref(),
            Some("rook-csi-rbd-node")
        );
        assert_eq!(spec.claim_ref.and_then(|r| r.uid).as_deref(), Some("uid-c"));
        assert_eq!(spec.capacity.expect("capacity")["storage"].0, "1073741824");
        assert_eq!(spec.mount_options, Some(vec!["nouuid".to_string()]));
        assert_eq!(spec.node_affinity, None);
        assert_eq!(pv.finalizers(), [IMAGE_FINALIZER.to_string()]);

        // What the deleter reads back from it.
        let cached: CachedVolume =
            serde_json::from_value(serde_json::to_value(&pv).expect("json")).expect("cached");
        let image = rbd_volume(&cached).expect("rbd").expect("image");
        assert_eq!(
            (
                image.cluster_id.as_str(),
                image.pool.as_str(),
                image.namespace.as_str(),
                image.image.as_str()
            ),
            ("c1", "rbd", "ns1", "tandem-0123456789")
        );
        assert_eq!(deletion(&cached), Deletion::Keep);
        let mut released = cached.clone();
        released.status = serde_json::from_value(json!({"phase": "Released"})).ok();
        assert_eq!(deletion(&released), Deletion::DeleteImage);
        let mut not_ours = released.clone();
        not_ours.metadata.finalizers = None;
        assert_eq!(deletion(&not_ours), Deletion::Keep);
    }
}
