//! The claims of RBD members. Once tandem put a claim's image in its ConsistencyGroup's RBD
//! group, deleting the claim must not leave ceph-csi an image it cannot delete: librbd refuses to
//! remove an image in a group, and an image taken out of a group keeps its share of every group
//! snapshot, so `rbd rm` fails on "image has snapshots" either way.
//!
//! So tandem puts a finalizer on the claim before its image joins the group. A deleted claim is
//! held while a GroupSnapshot's RBD group snapshot holds its image, with a Warning event naming
//! those GroupSnapshots (deleting them removes the image's snapshots); then tandem takes the
//! image out of its tandem group and lets the claim go, and ceph-csi deletes the volume as usual.
//! Nothing is deleted by tandem here: a person decides which snapshots go.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{ListParams, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

use super::central::{RbdVolume, placement, rbd_group_name, rbd_path, rbd_volume};
use super::rbd::PoolRef;
use super::{Context, Error, ceph, publish_event};
use crate::api::{CentralPhase, ConsistencyGroup, GroupMember, GroupSnapshot};

/// The finalizer on the claim of an RBD member whose image tandem put in a group.
pub const MEMBER_FINALIZER: &str = "tandem.dev/rbd-member";

/// How often a held claim looks again (GroupSnapshot changes wake it sooner).
const HELD_RECHECK: Duration = Duration::from_secs(60);

/// The GroupSnapshots whose RBD group snapshot holds the image of PersistentVolume `pv`: cut
/// (Taken) or being cut (Pending). Failed and Removed ones hold nothing.
pub fn holders(pv: &str, snapshots: &[GroupSnapshot]) -> Vec<String> {
    let mut names: Vec<String> = snapshots
        .iter()
        .filter(|s| {
            s.status
                .as_ref()
                .and_then(|s| s.central.as_ref())
                .is_some_and(|c| {
                    matches!(c.phase, CentralPhase::Taken | CentralPhase::Pending)
                        && c.volumes.iter().any(|v| v.persistent_volume == pv)
                })
        })
        .map(|s| s.name_any())
        .collect();
    names.sort();
    names
}

/// Whether tandem may take an image out of `group`: only its own groups.
pub fn is_tandem_group(group: &str) -> bool {
    group.starts_with("tandem-")
}

/// Whether a tandem RBD group goes once an image left it: its ConsistencyGroup is gone (no live
/// group has its name) and it holds no image and no snapshot any more. (One that still holds a
/// snapshot goes with the deletion of that GroupSnapshot.)
pub fn group_goes(group: &str, live_groups: &[String], images: usize, snaps: usize) -> bool {
    is_tandem_group(group) && !live_groups.iter().any(|g| g == group) && images == 0 && snaps == 0
}

/// Puts the finalizer on each claim (read fresh: a cached copy may be stale) before its image
/// joins a group.
pub async fn protect(ctx: &Context, namespace: &str, claims: &[String]) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    for name in claims {
        let cached = ctx
            .claims
            .get(&ObjectRef::new(name).within(namespace))
            .is_some_and(|c| crate::finalizer::has(c.as_ref(), MEMBER_FINALIZER));
        if cached {
            continue;
        }
        let Some(claim) = api.get_opt(name).await? else {
            continue;
        };
        if let Some(patch) = crate::finalizer::adding(&claim, MEMBER_FINALIZER) {
            api.patch(name, &PatchParams::default(), &patch).await?;
        }
    }
    Ok(())
}

/// Brings a ConsistencyGroup's RBD group to its RBD members as they are now, when they changed
/// (`previous` → `members`): the claims joining are protected first, images that left are taken
/// out. Anything that goes wrong is logged (and, for an image in another group, told on the
/// ConsistencyGroup): the next snapshot makes the group hold exactly its members before anything
/// freezes, or fails saying why.
pub async fn follow_members(
    ctx: &Context,
    group: &ConsistencyGroup,
    previous: &[GroupMember],
    members: &[GroupMember],
) {
    let rbd_of = |m: &GroupMember| {
        let volume = ctx
            .volumes
            .get(&ObjectRef::new(m.persistent_volume.as_deref()?))?;
        let image = rbd_volume(&volume)?.ok()?;
        Some((m.claim.clone(), volume, image))
    };
    let now: Vec<_> = members
        .iter()
        .filter(|m| m.supported)
        .filter_map(rbd_of)
        .collect();
    let before: Vec<_> = previous.iter().filter_map(rbd_of).collect();
    let images: Vec<RbdVolume> = now
        .iter()
        .chain(&before)
        .map(|(_, _, i)| i.clone())
        .collect();
    let (Some(namespace), Some(uid)) = (group.namespace(), group.uid()) else {
        return;
    };
    let place = match placement(&images) {
        Ok(Some(place)) => place,
        Ok(None) => return,
        // The snapshot refuses these, saying why.
        Err(_) => return,
    };
    let Some((_, volume, _)) = now.first().or(before.first()) else {
        return;
    };
    let claims: Vec<String> = now.iter().map(|(c, _, _)| c.clone()).collect();
    if let Err(e) = protect(ctx, &namespace, &claims).await {
        warn!(group = %group.name_any(), error = %e, "cannot protect the RBD members' claims yet");
        return;
    }
    let cluster = match ctx
        .ceph
        .connect(&ctx.client, &place.cluster_id, Some(volume))
        .await
    {
        Ok(cluster) => cluster,
        Err(e) => {
            warn!(group = %group.name_any(), error = %e, "cannot reach the RBD members' cluster");
            return;
        }
    };
    let pool = PoolRef::new(&place.pool, &place.namespace);
    let rbd_group = rbd_group_name(&uid);
    let wanted: Vec<String> = now.iter().map(|(_, _, i)| i.image.clone()).collect();
    let synced = {
        let (pool, rbd_group, wanted) = (pool.clone(), rbd_group.clone(), wanted.clone());
        ceph::blocking(move || ceph::prepare_group(&cluster, &pool, &rbd_group, &wanted)).await
    };
    match synced {
        Ok(()) => info!(
            group = %group.name_any(), %namespace, rbd_group = %rbd_path(&place.pool, &place.namespace, &rbd_group),
            images = ?wanted, "the RBD group follows the members"
        ),
        Err(ceph::CephError::Rbd(e @ super::rbd::RbdError::ImageInOtherGroup { .. })) => {
            publish_event(
                ctx,
                &group.object_ref(&()),
                EventType::Warning,
                "RbdImageInOtherGroup".into(),
                Some(format!(
                    "{e}; its group snapshots will fail until it leaves that group"
                )),
                "Reconcile",
            )
            .await;
        }
        Err(e) => {
            ctx.ceph.forget(&place.cluster_id);
            warn!(group = %group.name_any(), error = %e, "cannot bring the RBD group to the members yet");
        }
    }
}

/// Runs the release of deleted member claims. `claims`: a copy of the shared claim watch.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    claims: BoxStream<'static, PersistentVolumeClaim>,
) {
    let snapshots: Api<GroupSnapshot> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let volumes = ctx.volumes.clone();
    Controller::for_stream(claims.map(Ok::<_, watcher::Error>), ctx.claims.clone())
        // A GroupSnapshot going (or changing) may release the claims of its RBD members.
        .watches(snapshots, watcher::Config::default(), move |s| {
            let namespace = s.namespace();
            s.status
                .and_then(|s| s.central)
                .map(|c| c.volumes)
                .unwrap_or_default()
                .into_iter()
                .filter_map(|v| {
                    let pv = volumes.get(&ObjectRef::new(&v.persistent_volume))?;
                    let claim = pv.spec.as_ref()?.claim_ref.as_ref()?.name.clone()?;
                    Some(ObjectRef::new(&claim).within(namespace.as_deref()?))
                })
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "RBD member claim reconcile failed");
            }
        })
        .await;
}

fn error_policy(claim: Arc<PersistentVolumeClaim>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(claim = %claim.name_any(), error = %error, "will retry");
    ctx.metrics.reconcile_error("rbd_member");
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Context>) -> Result<Action, Error> {
    if claim.metadata.deletion_timestamp.is_none()
        || !crate::finalizer::has(claim.as_ref(), MEMBER_FINALIZER)
    {
        return Ok(Action::await_change());
    }
    let namespace = claim.namespace().ok_or(Error::MissingNamespace)?;
    let name = claim.name_any();
    let volume = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .and_then(|pv| ctx.volumes.get(&ObjectRef::new(pv)));
    let Some(volume) = volume else {
        return release(&ctx, &claim).await;
    };
    let Some(Ok(image)) = rbd_volume(&volume) else {
        return release(&ctx, &claim).await;
    };
    let pv = volume.name_any();
    let snapshots = Api::<GroupSnapshot>::namespaced(ctx.client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let path = rbd_path(&image.pool, &image.namespace, &image.image);
    let held_by = holders(&pv, &snapshots);
    if !held_by.is_empty() {
        let note = format!(
            "the image {path} holds a snapshot for GroupSnapshot(s) {}; delete them and this claim goes (or remove the finalizer {MEMBER_FINALIZER} to let ceph-csi try anyway: it cannot delete an image with snapshots)",
            held_by.join(", ")
        );
        info!(claim = %name, %namespace, "deletion held: {note}");
        publish_event(
            &ctx,
            &claim.object_ref(&()),
            EventType::Warning,
            "RbdSnapshotsHoldImage".into(),
            Some(note),
            "Delete",
        )
        .await;
        return Ok(Action::requeue(HELD_RECHECK));
    }
    // The RBD groups of this namespace's live ConsistencyGroups.
    let live_groups: Vec<String> =
        Api::<ConsistencyGroup>::namespaced(ctx.client.clone(), &namespace)
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter_map(|g| g.uid())
            .map(|uid| rbd_group_name(&uid))
            .collect();
    let left = match ctx
        .ceph
        .connect(&ctx.client, &image.cluster_id, Some(&volume))
        .await
    {
        Ok(cluster) => {
            let pool = PoolRef::new(&image.pool, &image.namespace);
            let name = image.image.clone();
            ceph::blocking(move || match cluster.image_group(&pool, &name) {
                Ok(Some(group)) if is_tandem_group(&group) => {
                    cluster.remove_image(&pool, &group, &name)?;
                    if group_goes(
                        &group,
                        &live_groups,
                        cluster.group_images(&pool, &group)?.len(),
                        cluster.group_snaps(&pool, &group)?.len(),
                    ) {
                        cluster.remove_group(&pool, &group)?;
                        info!(%group, "the RBD group of a deleted ConsistencyGroup went with its last image");
                    }
                    Ok(Some(group))
                }
                Ok(_) | Err(super::rbd::RbdError::ImageNotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            })
            .await
        }
        Err(e) => Err(e),
    };
    match left {
        Ok(group) => {
            if let Some(group) = group {
                info!(claim = %name, %namespace, image = %path, %group, "the image left its RBD group");
            }
            release(&ctx, &claim).await
        }
        Err(ceph::CephError::Kube(e)) => Err(e.into()),
        Err(e) => {
            ctx.ceph.forget(&image.cluster_id);
            publish_event(
                &ctx,
                &claim.object_ref(&()),
                EventType::Warning,
                "RbdGroupLeaveFailed".into(),
                Some(format!(
                    "cannot take the image {path} out of its RBD group yet ({e}); retried every 30 s"
                )),
                "Delete",
            )
            .await;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
    }
}

async fn release(ctx: &Context, claim: &PersistentVolumeClaim) -> Result<Action, Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    crate::finalizer::remove(&api, claim, MEMBER_FINALIZER).await?;
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot(name: &str, phase: &str, pvs: &[&str]) -> GroupSnapshot {
        let volumes: Vec<_> = pvs
            .iter()
            .map(|pv| json!({"persistentVolume": pv, "image": format!("img-{pv}")}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "app"},
            "spec": {"groupName": "g"},
            "status": {"central": {"clusterId": "c", "pool": "rbd", "group": "tandem-g",
                "snapshot": format!("tandem-{name}"), "volumes": volumes, "phase": phase}},
        }))
        .expect("snapshot")
    }

    #[test]
    fn only_cut_or_cutting_snapshots_hold_an_image() {
        let snapshots = [
            snapshot("mon", "Taken", &["pv-a", "pv-b"]),
            snapshot("tue", "Pending", &["pv-a"]),
            snapshot("wed", "Failed", &["pv-a"]),
            snapshot("thu", "Removed", &["pv-a"]),
            snapshot("fri", "Taken", &["pv-b"]),
        ];
        assert_eq!(holders("pv-a", &snapshots), ["mon", "tue"]);
        assert_eq!(holders("pv-b", &snapshots), ["fri", "mon"]);
        assert!(holders("pv-c", &snapshots).is_empty());
        let local: GroupSnapshot = serde_json::from_value(json!({
            "metadata": {"name": "local"}, "spec": {"groupName": "g"}, "status": {}
        }))
        .expect("snapshot");
        assert!(holders("pv-a", &[local]).is_empty());
    }

    #[test]
    fn a_group_goes_with_its_last_image_once_its_consistency_group_is_gone() {
        let live = ["tandem-live".to_string()];
        // (group, images left, snapshots left, goes)
        let table = [
            ("tandem-gone", 0, 0, true),
            ("tandem-gone", 1, 0, false),
            ("tandem-gone", 0, 1, false),
            ("tandem-live", 0, 0, false),
            ("csi-group", 0, 0, false),
        ];
        for (group, images, snaps, goes) in table {
            assert_eq!(
                group_goes(group, &live, images, snaps),
                goes,
                "{group} {images} {snaps}"
            );
        }
    }

    #[test]
    fn only_tandems_own_groups_are_left() {
        assert!(is_tandem_group("tandem-4f2c"));
        assert!(!is_tandem_group("csi-vol-group-1"));
    }
}
