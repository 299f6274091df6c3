//! Reconciles GroupRestores (mode NewClaims in [`new_claims`], InPlace in `in_place`) and, as
//! the external deleter, the NodeRestores and PVs they leave behind ([`deleter`]).
//!
//! What the controller needs of the API for restores (the chart's RBAC), exactly:
//!
//! | API group      | resource               | verbs                                   | why |
//! |----------------|------------------------|-----------------------------------------|-----|
//! | tandem.dev     | grouprestores          | get, list, watch, patch                 | watch; finalizer (merge patch); the GroupSnapshot's deletion lists the restores from it |
//! | tandem.dev     | grouprestores/status   | patch                                   | status (server-side apply) |
//! | tandem.dev     | noderestores           | get, list, watch, create, patch, delete | one per node; action Abort, volumes[].release, the completed annotation; deleted once its clones are gone |
//! | tandem.dev     | groupsnapshots         | get, list, watch                        | the source (and its wake-up) |
//! | tandem.dev     | nodesnapshots          | list, watch                             | the uid of each member's cut (shared cache) |
//! | "" (core)      | persistentvolumeclaims | get, list, watch, create, patch, delete | restored claims: created, provenance annotated, deleted on rollback |
//! | "" (core)      | persistentvolumes      | get, list, watch, create, patch, delete | the pre-bound PVs: created, finalizer patched off, deleted (external deleter) |
//! | "" (core)      | resourcequotas         | list                                    | the quota check before anything is made |
//! | storage.k8s.io | storageclasses         | get                                     | the restore class exists with provisioner tandem.dev/restore |
//! | events.k8s.io  | events                 | create, patch                           | Warning/Normal events on restores and on claims left Pending |
//! | "" (core)      | nodes                  | list, watch                             | a Node's kubernetes.io/hostname label for the PV's node affinity |
//!
//! InPlace (the `in_place` module) needs more (pods list/watch, replicasets get,
//! deployments/scale and statefulsets/scale get/patch).

pub mod clones;
pub mod deleter;
mod fence;
mod in_place;
mod new_claims;
pub mod plan;
pub mod post_hooks;
pub mod quota;
pub mod rbd_copies;
pub mod validate;

use crate::controller::cache::CachedVolume;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::{Context, Error};
use crate::api::{
    DEFAULT_RESTORE_STORAGE_CLASS, GROUP_RESTORE_LABEL, GroupRestore, GroupSnapshot, NodeRestore,
    NodeRestoreAction, RestoreMode, RestorePhase,
};
use plan::{CLONE_FINALIZER, GROUP_RESTORE_UID_LABEL, NODE_RESTORE_ANNOTATION};

/// The controller's finalizer on GroupRestores: a restore deleted before it completed is
/// rolled back first.
pub const FINALIZER: &str = "tandem.dev/group-restore";
/// The condition that says whether every restored claim is Bound.
pub const CONDITION_CLAIMS_BOUND: &str = "ClaimsBound";

pub(crate) fn now() -> Time {
    Time(Timestamp::now())
}

/// What the restore reconcilers share.
pub struct RestoreContext {
    pub ctx: Arc<Context>,
    /// The StorageClass of restored claims (`--restore-storage-class`).
    pub storage_class: String,
    pub node_restores: Store<NodeRestore>,
    pub restores: Store<GroupRestore>,
    /// The RBD copies running for restores to new claims.
    pub copies: rbd_copies::Copies,
}

impl RestoreContext {
    /// Wakes a GroupSnapshot whose deletion may wait for a restore from it.
    pub fn wake_snapshot(&self, namespace: &str, name: &str) {
        // The receiver lives as long as the controller; a send after it stopped is moot.
        let _ = self
            .ctx
            .wake
            .send(ObjectRef::<GroupSnapshot>::new(name).within(namespace));
    }
}

/// Whether a restore has ended (Completed or Failed): nothing more is done for it.
pub fn terminal(restore: &GroupRestore) -> bool {
    matches!(
        restore.status.as_ref().map(|s| s.phase),
        Some(RestorePhase::Completed | RestorePhase::Failed)
    )
}

/// The restore a claim or PV belongs to: by label, or (a claim a person made) by dataSourceRef.
fn restore_of_claim(claim: &PersistentVolumeClaim) -> Option<ObjectRef<GroupRestore>> {
    let namespace = claim.namespace()?;
    let name = claim
        .labels()
        .get(GROUP_RESTORE_LABEL)
        .map(String::as_str)
        .or_else(|| plan::waits_for(claim))?;
    Some(ObjectRef::new(name).within(&namespace))
}

fn restore_of_volume(pv: &CachedVolume) -> Option<ObjectRef<GroupRestore>> {
    // Also an InPlace restore's undo point: its claim going wakes the swap.
    let name = (pv.labels().get(GROUP_RESTORE_LABEL))
        .or_else(|| pv.labels().get(crate::api::PRE_RESTORE_LABEL))?;
    let namespace = pv.spec.as_ref()?.claim_ref.as_ref()?.namespace.clone()?;
    Some(ObjectRef::new(name).within(&namespace))
}

fn node_restore_of_volume(pv: &CachedVolume) -> Option<ObjectRef<NodeRestore>> {
    let name = pv.annotations().get(NODE_RESTORE_ANNOTATION)?;
    let namespace = pv.spec.as_ref()?.claim_ref.as_ref()?.namespace.clone()?;
    Some(ObjectRef::new(name).within(&namespace))
}

/// Runs the GroupRestore controller and the NodeRestore cleanup (the external deleter).
///
/// `claim_objects` and `volume_objects` are copies of the shared PVC and PV watches.
pub async fn run_restore_controllers(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    storage_class: Option<String>,
    claim_objects: BoxStream<'static, PersistentVolumeClaim>,
    volume_objects: BoxStream<'static, CachedVolume>,
) {
    let restores_api: Api<GroupRestore> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let node_restores_api: Api<NodeRestore> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let snapshots_api: Api<GroupSnapshot> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // NodeRestores and GroupRestores: one watch each, cached, fanned out to both controllers.
    let (node_restores, node_restores_writer) = reflector::store();
    let node_restore_events = reflector(
        node_restores_writer,
        watcher(node_restores_api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let (restores, restores_writer) = reflector::store();
    let restore_events = reflector(
        restores_writer,
        watcher(restores_api.clone(), watcher::Config::default()),
    )
    .default_backoff()
    .touched_objects();
    let (node_restore_events, node_restore_copies) = tee(node_restore_events);
    let (restore_events, restore_copies) = tee(restore_events);
    let (volume_objects, volume_copies) = tee_ok(volume_objects);
    let (volume_copies, rbd_volume_copies) = tee_ok(volume_copies);
    let node_restore_events =
        super::drive_in_background("noderestores", node_restore_events, None, None);
    let restore_events = super::drive_in_background("grouprestores", restore_events, None, None);

    let rctx = Arc::new(RestoreContext {
        ctx: ctx.clone(),
        storage_class: storage_class.unwrap_or_else(|| DEFAULT_RESTORE_STORAGE_CLASS.to_string()),
        node_restores: node_restores.clone(),
        restores: restores.clone(),
        copies: Default::default(),
    });

    let restores_for_snapshots = restores.clone();
    // InPlace: pods going (or coming) wake the fence and the swap.
    let pods_api: Api<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Pod>> =
        match namespace {
            Some(ns) => Api::namespaced(ctx.client.clone(), ns),
            None => Api::all(ctx.client.clone()),
        };
    let restores_for_pods = restores.clone();
    let volumes_for_claims = ctx.volumes.clone();
    let group_restores = Controller::for_stream(restore_events, restores.clone())
        .watches_stream(
            watcher(pods_api, watcher::Config::default())
                .default_backoff()
                .touched_objects(),
            move |pod| in_place::restores_for_pod(&restores_for_pods, &pod),
        )
        .watches_stream(
            node_restore_copies.map(Ok::<_, watcher::Error>),
            |n: NodeRestore| {
                let namespace = n.namespace()?;
                Some(ObjectRef::<GroupRestore>::new(&n.spec.group_restore).within(&namespace))
            },
        )
        .watches_stream(claim_objects.map(Ok::<_, watcher::Error>), move |c| {
            // Also a claim InPlace recreated (its labels are the old claim's): through its PV.
            restore_of_claim(&c)
                .or_else(|| in_place::restore_of_claim_volume(&volumes_for_claims, &c))
        })
        .watches_stream(volume_objects.map(Ok::<_, watcher::Error>), |v| {
            restore_of_volume(&v)
        })
        .watches(snapshots_api, watcher::Config::default(), move |s| {
            let namespace = s.namespace();
            let name = s.name_any();
            restores_for_snapshots
                .state()
                .iter()
                .filter(|r| r.namespace() == namespace && r.spec.source.group_snapshot_name == name)
                .map(|r| ObjectRef::from_obj(r.as_ref()))
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, rctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "group restore reconcile failed");
            }
        });

    let node_restores_for_restores = node_restores.clone();
    let cleanup = Controller::for_stream(node_restore_events, node_restores.clone())
        .watches_stream(volume_copies.map(Ok::<_, watcher::Error>), |v| {
            node_restore_of_volume(&v)
        })
        .watches_stream(
            restore_copies.map(Ok::<_, watcher::Error>),
            move |r: GroupRestore| {
                let namespace = r.namespace();
                let name = r.name_any();
                node_restores_for_restores
                    .state()
                    .iter()
                    .filter(|n| n.namespace() == namespace && n.spec.group_restore == name)
                    .map(|n| ObjectRef::from_obj(n.as_ref()))
                    .collect::<Vec<_>>()
            },
        )
        .shutdown_on_signal()
        .run(reconcile_node_restore, node_error_policy, rctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "node restore cleanup failed");
            }
        });
    // The external deleter of restored RBD copies: their image goes once their claim is gone.
    let rctx2 = rctx;
    let rbd_copies = Controller::for_stream(
        rbd_volume_copies.map(Ok::<_, watcher::Error>),
        ctx.volumes.clone(),
    )
    .shutdown_on_signal()
    .run(rbd_copies::reconcile_volume, volume_error_policy, rctx2)
    .for_each(|result| async move {
        if let Err(e) = result {
            warn!(error = %e, "restored RBD copy cleanup failed");
        }
    });
    tokio::join!(group_restores, cleanup, rbd_copies);
}

/// Copies of every object of a watch stream, for a second consumer.
pub(super) fn tee<K: Clone + Send + 'static>(
    events: impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
) -> (
    impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static,
    BoxStream<'static, K>,
) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let events = events.inspect(move |e| {
        if let Ok(object) = e {
            let _ = tx.send(object.clone());
        }
    });
    let copies =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    (events, copies.boxed())
}

fn tee_ok<K: Clone + Send + 'static>(
    objects: BoxStream<'static, K>,
) -> (BoxStream<'static, K>, BoxStream<'static, K>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let objects = objects.inspect(move |object| {
        let _ = tx.send(object.clone());
    });
    let copies =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) });
    (objects.boxed(), copies.boxed())
}

fn error_policy(restore: Arc<GroupRestore>, error: &Error, rctx: Arc<RestoreContext>) -> Action {
    warn!(restore = %restore.name_any(), error = %error, "will retry");
    rctx.ctx.metrics.reconcile_error("group_restore");
    Action::requeue(Duration::from_secs(2))
}

fn volume_error_policy(pv: Arc<CachedVolume>, error: &Error, rctx: Arc<RestoreContext>) -> Action {
    warn!(pv = %pv.name_any(), error = %error, "will retry");
    rctx.ctx.metrics.reconcile_error("rbd_copy");
    Action::requeue(Duration::from_secs(5))
}

fn node_error_policy(node: Arc<NodeRestore>, error: &Error, rctx: Arc<RestoreContext>) -> Action {
    warn!(noderestore = %node.name_any(), error = %error, "will retry");
    rctx.ctx.metrics.reconcile_error("node_restore");
    Action::requeue(Duration::from_secs(2))
}

async fn reconcile(restore: Arc<GroupRestore>, rctx: Arc<RestoreContext>) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let name = restore.name_any();
    let api: Api<GroupRestore> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    if restore.metadata.deletion_timestamp.is_some() && terminal(&restore) {
        // Rolled back, or Completed (whose claims, PVs and NodeRestores stay).
        if let Some(patch) = crate::finalizer::removing(restore.as_ref(), FINALIZER) {
            api.patch(&name, &PatchParams::default(), &patch).await?;
        }
        rctx.wake_snapshot(&namespace, &restore.spec.source.group_snapshot_name);
        return Ok(Action::await_change());
    }
    if restore.metadata.deletion_timestamp.is_none()
        && let Some(patch) = crate::finalizer::adding(restore.as_ref(), FINALIZER)
    {
        api.patch(&name, &PatchParams::default(), &patch).await?;
        return Ok(Action::await_change());
    }
    // Completed: the group's post-restore hooks, once pods use the restored claims.
    if restore.metadata.deletion_timestamp.is_none()
        && let Some(action) = post_hooks::reconcile(&restore, &rctx).await?
    {
        return Ok(action);
    }
    match restore.spec.mode {
        RestoreMode::NewClaims => new_claims::reconcile(&restore, &rctx).await,
        RestoreMode::InPlace => in_place::reconcile(&restore, &rctx).await,
    }
}

/// The deleter: releases clones whose claims are gone, deletes their PVs once the clone is gone,
/// aborts orphans and deletes finished NodeRestores.
async fn reconcile_node_restore(
    node: Arc<NodeRestore>,
    rctx: Arc<RestoreContext>,
) -> Result<Action, Error> {
    let namespace = node.namespace().ok_or(Error::MissingNamespace)?;
    let name = node.name_any();
    super::cache_ready(&rctx.ctx.volumes, "PersistentVolumes").await?;
    super::cache_ready(&rctx.restores, "GroupRestores").await?;
    let volumes: BTreeMap<String, CachedVolume> = node
        .spec
        .volumes
        .iter()
        .filter_map(|v| {
            let pv = rctx
                .ctx
                .volumes
                .get(&ObjectRef::new(&v.persistent_volume))?;
            Some((v.persistent_volume.clone(), pv.as_ref().clone()))
        })
        .collect();
    let uid = node.labels().get(GROUP_RESTORE_UID_LABEL).cloned();
    let restore_exists = rctx
        .restores
        .get(&ObjectRef::new(&node.spec.group_restore).within(&namespace))
        .is_some_and(|r| r.uid() == uid);
    let steps = deleter::steps(&node, &volumes, restore_exists);
    let api: Api<NodeRestore> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    let pvs: Api<PersistentVolume> = Api::all(rctx.ctx.client.clone());

    if !steps.release.is_empty() {
        let volumes: Vec<_> = node
            .spec
            .volumes
            .iter()
            .map(|v| {
                let mut v = v.clone();
                if steps.release.contains(&v.persistent_volume) {
                    v.release = true;
                }
                v
            })
            .collect();
        info!(noderestore = %name, released = ?steps.release, "claims gone: releasing their clones");
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": node.resource_version()},
                "spec": {"volumes": volumes},
            })),
        )
        .await?;
    }
    for pv_name in &steps.finalize {
        let Some(pv) = volumes.get(pv_name) else {
            continue;
        };
        if pv.metadata.deletion_timestamp.is_none() {
            match pvs.delete(pv_name, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        crate::finalizer::remove(&pvs, pv, CLONE_FINALIZER).await?;
        info!(noderestore = %name, pv = %pv_name, "clone deleted: PV removed");
    }
    if steps.abort {
        info!(noderestore = %name, "its GroupRestore is gone and never completed: aborting");
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"action": NodeRestoreAction::Abort}})),
        )
        .await?;
        // The claims that restore created for this node wait for nothing now.
        if let Some(uid) = &uid {
            let claims: Vec<String> = node.spec.volumes.iter().map(|v| v.claim.clone()).collect();
            clones::delete_created_claims(&rctx, &namespace, uid, &claims).await?;
        }
    }
    if steps.delete {
        info!(noderestore = %name, "every clone is gone: deleting");
        match api.delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}
