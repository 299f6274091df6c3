//! GroupRestore mode InPlace: the group's own claims go back to the snapshot.
//!
//! The flow (decisions in [`super::fence`], I/O here):
//! 1. Pre-flight: every member claim is still bound to the PV the snapshot recorded.
//! 2. Fence: pods using a member claim refuse the restore (`Refuse`), or their Deployments and
//!    StatefulSets are scaled to zero (`ScaleDown`, counts recorded in status.workloads *before*
//!    scaling), phase Fencing until no pod uses a claim (bounded by workloadTimeoutSeconds).
//! 3. Clone, as NewClaims does, with the member's own claim as target.
//! 4. Swap, once every clone is Cloned: status.preRestore is recorded, each old PV is set to Retain,
//!    labelled `tandem.dev/pre-restore=<restore>` and given the claim's template; only then are the
//!    claims deleted, recreated under the same names with `spec.volumeName` = the clone's PV, and
//!    the PVs created pre-bound to the new claims' uids. Completed when every claim is Bound.
//! 5. The workloads are scaled back whatever the outcome.
//!
//! Before the swap a failure rolls back (clones deleted, claims untouched); once status.preRestore
//! is written the restore only goes forward, and its message says where each claim stands.
//!
//! Ceph RBD members are not cloned: once no RBD member is attached to a node, one `rbd group snap
//! rollback` puts their images back (claims and PVs unchanged, no undo point). A group of RBD
//! members only is that alone; in a mixed group it comes after every local clone is ready and
//! before the point of no return, so a failed rollback still swaps nothing.
//!
//! What InPlace needs of the API beyond NewClaims (the chart's RBAC):
//!
//! | API group | resource                              | verbs        |
//! |-----------|---------------------------------------|--------------|
//! | "" (core) | pods                                  | list, watch  |
//! | apps      | replicasets                           | get          |
//! | apps      | deployments/scale, statefulsets/scale | get, patch   |

use crate::api::{CentralPhase, CentralSnapshot};
use crate::controller::cache::CachedVolume;
use crate::controller::ceph;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::info;

use super::clones::{self, Progress};
use super::fence::{
    self, ClaimState, ClaimTemplate, Fence, NotYet, PRE_RESTORE_CLAIM_ANNOTATION, PodUse,
    ScaleBack, Workload,
};
use super::plan::{self, COMPLETED_ANNOTATION, Owner, Target};
use super::rbd_copies;
use super::{RestoreContext, now};
use crate::api::{
    GroupRestore, GroupRestoreStatus, GroupSnapshot, MemberSnapshot, NodeRestore,
    PRE_RESTORE_LABEL, PreRestoreVolume, RestoreMode, RestorePhase, RestoredMember, ScaledWorkload,
    WorkloadPolicy,
};
use crate::controller::{Error, cache_ready};

/// The pods of `namespace` that use any of `claims`.
pub(super) async fn pods_using_claims(
    client: &Client,
    namespace: &str,
    claims: &BTreeSet<String>,
) -> Result<Vec<PodUse>, Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods.list(&ListParams::default()).await?;
    Ok(fence::pods_using(&list.items, claims))
}

/// The Deployments and StatefulSets owning the pods, or why they cannot be scaled.
async fn owners_of(
    client: &Client,
    namespace: &str,
    uses: &[PodUse],
) -> Result<Result<BTreeSet<Workload>, String>, Error> {
    let wanted: BTreeSet<&str> = uses
        .iter()
        .filter_map(|u| u.owner.as_ref())
        .filter(|(kind, _)| kind == "ReplicaSet")
        .map(|(_, name)| name.as_str())
        .collect();
    let mut found = Vec::new();
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    for name in wanted {
        if let Some(rs) = sets.get_opt(name).await? {
            found.push(rs);
        }
    }
    let by_name: BTreeMap<String, &ReplicaSet> = found.iter().map(|r| (r.name_any(), r)).collect();
    Ok(fence::owners(uses, &by_name))
}

/// The replicas of a workload through its scale subresource (None: it does not exist).
async fn replicas(
    client: &Client,
    namespace: &str,
    (kind, name): &Workload,
) -> Result<Option<i32>, Error> {
    let scale = match kind.as_str() {
        "Deployment" => {
            Api::<Deployment>::namespaced(client.clone(), namespace)
                .get_scale(name)
                .await
        }
        _ => {
            Api::<StatefulSet>::namespaced(client.clone(), namespace)
                .get_scale(name)
                .await
        }
    };
    match scale {
        Ok(scale) => Ok(Some(scale.spec.and_then(|s| s.replicas).unwrap_or(0))),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Sets a workload's replicas through its scale subresource; false when it does not exist.
async fn set_replicas(
    client: &Client,
    namespace: &str,
    (kind, name): &Workload,
    replicas: i32,
) -> Result<bool, Error> {
    let patch = Patch::Merge(json!({"spec": {"replicas": replicas}}));
    let params = PatchParams::default();
    let result = match kind.as_str() {
        "Deployment" => Api::<Deployment>::namespaced(client.clone(), namespace)
            .patch_scale(name, &params, &patch)
            .await
            .map(drop),
        _ => Api::<StatefulSet>::namespaced(client.clone(), namespace)
            .patch_scale(name, &params, &patch)
            .await
            .map(drop),
    };
    match result {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Where the fence stands after one pass.
#[derive(Debug)]
pub(super) enum Fenced {
    /// No pod uses a member claim.
    Clear,
    /// Refused or timed out: the restore fails with this message (after scaling back).
    Failed(String),
    /// Waiting for these pods to go; `status` changed (workloads recorded) when `recorded`.
    Waiting { pods: Vec<String>, recorded: bool },
}

/// One pass of the fence. New owners are recorded in `status.workloads` with their current
/// replicas and `record` is awaited (the status must be written before any scale-down, so that
/// a restarted controller scales back to the right count); then every recorded workload not at
/// zero is scaled to zero.
pub(super) async fn fence_pass<F, Fut>(
    client: &Client,
    namespace: &str,
    policy: WorkloadPolicy,
    claims: &BTreeSet<String>,
    status: &mut GroupRestoreStatus,
    timed_out: bool,
    record: F,
) -> Result<Fenced, Error>
where
    F: FnOnce(GroupRestoreStatus) -> Fut,
    Fut: std::future::Future<Output = Result<(), Error>>,
{
    let uses = pods_using_claims(client, namespace, claims).await?;
    let owners = if uses.is_empty() || policy == WorkloadPolicy::Refuse {
        Ok(BTreeSet::new())
    } else {
        owners_of(client, namespace, &uses).await?
    };
    let mut recorded = false;
    match fence::fence(policy, &uses, owners, &status.workloads, timed_out) {
        Fence::Clear => return Ok(Fenced::Clear),
        Fence::Refuse(why) | Fence::TimedOut(why) => return Ok(Fenced::Failed(why)),
        Fence::ScaleDown(new) => {
            for workload in new {
                // A workload gone between the pod list and now owns no pod any more.
                let Some(count) = replicas(client, namespace, &workload).await? else {
                    continue;
                };
                status.workloads.push(ScaledWorkload {
                    kind: workload.0,
                    name: workload.1,
                    replicas: count,
                    restored: false,
                });
            }
            record(status.clone()).await?;
            recorded = true;
        }
        Fence::Wait(_) => {}
    }
    for w in &status.workloads {
        let workload = (w.kind.clone(), w.name.clone());
        if replicas(client, namespace, &workload)
            .await?
            .is_some_and(|r| r != 0)
        {
            info!(kind = %w.kind, name = %w.name, from = w.replicas, "scaling down for an InPlace restore");
            set_replicas(client, namespace, &workload, 0).await?;
        }
    }
    Ok(Fenced::Waiting {
        pods: uses.into_iter().map(|u| u.pod).collect(),
        recorded,
    })
}

/// Scales every recorded workload back (those still at zero), marking each `restored`. Returns a
/// note per workload that could not be (gone, or scaled by someone else since), for the message.
pub(super) async fn scale_back_all(
    client: &Client,
    namespace: &str,
    status: &mut GroupRestoreStatus,
) -> Result<Vec<String>, Error> {
    let mut notes = Vec::new();
    for w in status.workloads.iter_mut().filter(|w| !w.restored) {
        let workload = (w.kind.clone(), w.name.clone());
        match replicas(client, namespace, &workload).await? {
            None => notes.push(format!("{} {} is gone and was not scaled back", w.kind, w.name)),
            Some(current) => match fence::scale_back(w, current) {
                ScaleBack::To(n) => {
                    info!(kind = %w.kind, name = %w.name, replicas = n, "scaling back after an InPlace restore");
                    set_replicas(client, namespace, &workload, n).await?;
                }
                ScaleBack::Leave if current != w.replicas => notes.push(format!(
                    "{} {} was left at {current} replicas (someone scaled it during the restore; it had {})",
                    w.kind, w.name, w.replicas
                )),
                ScaleBack::Leave => {}
            },
        }
        w.restored = true;
    }
    Ok(notes)
}

/// One member of the swap.
#[derive(Debug, Clone)]
pub(super) struct SwapMember {
    pub member: MemberSnapshot,
    /// The clone's PV.
    pub new_volume: String,
}

/// The pre-restore list of the members (recorded before anything is deleted).
pub(super) fn pre_restore(members: &[SwapMember]) -> Vec<PreRestoreVolume> {
    members
        .iter()
        .map(|m| PreRestoreVolume {
            claim: m.member.claim.clone(),
            persistent_volume: m.member.persistent_volume.clone(),
        })
        .collect()
}

/// Marks the old PV as this restore's undo point: reclaim Retain, label, and the claim template
/// (read from the claim, which must still be the one bound to it). Idempotent.
async fn mark_old_volume(
    volumes: &Api<PersistentVolume>,
    claims: &Api<PersistentVolumeClaim>,
    restore: &str,
    m: &SwapMember,
) -> Result<Result<ClaimTemplate, String>, Error> {
    let old = &m.member.persistent_volume;
    let Some(volume) = volumes.get_opt(old).await?.map(CachedVolume::from) else {
        return Ok(Err(format!(
            "the old PV {old} of claim {} is gone",
            m.member.claim
        )));
    };
    if fence::is_marked(&volume, restore)
        && let Some(template) = fence::template_of(&volume)
    {
        return Ok(Ok(template));
    }
    let Some(claim) = claims.get_opt(&m.member.claim).await? else {
        return Ok(Err(format!(
            "claim {} is gone before its PV {old} was kept; nothing was deleted by the restore",
            m.member.claim
        )));
    };
    let bound_uid = volume
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .and_then(|r| r.uid.clone());
    let Some(template) =
        fence::claim_template(&claim).filter(|t| Some(&t.uid) == bound_uid.as_ref())
    else {
        return Ok(Err(format!(
            "claim {} is no longer the one bound to PV {old}",
            m.member.claim
        )));
    };
    let patch = json!({
        "metadata": {
            "labels": {PRE_RESTORE_LABEL: restore},
            "annotations": {PRE_RESTORE_CLAIM_ANNOTATION: serde_json::to_string(&template)?},
        },
        "spec": {"persistentVolumeReclaimPolicy": "Retain"},
    });
    volumes
        .patch(old, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    info!(pv = %old, claim = %m.member.claim, "kept as the undo point of an InPlace restore");
    Ok(Ok(template))
}

/// What one pass of the swap reached.
#[derive(Debug)]
pub(super) enum Swapped {
    /// Every claim is Bound to its clone.
    Bound,
    /// Work is under way; the message says where each claim stands.
    Progress(String),
    /// Something only a person can resolve; the message says what and where each claim stands.
    Stuck(String),
}

/// The recreated claims, by name, with their uids (for the PVs pre-bound to them).
pub(super) type Recreated = BTreeMap<String, PersistentVolumeClaim>;

/// One pass of the swap (the old PVs must be recorded in status.preRestore before the first).
/// Marks every old PV; only when all are marked deletes the old claims (preconditioned on their
/// uid, so a recreated claim is never deleted), recreates the gone ones and returns those
/// recreated without a PV yet, for the caller to publish the clones pre-bound to them.
pub(super) async fn swap_pass(
    client: &Client,
    namespace: &str,
    restore: &str,
    members: &[SwapMember],
    provenance: &(dyn Fn(&MemberSnapshot) -> BTreeMap<String, String> + Sync),
) -> Result<(Swapped, Recreated), Error> {
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    let mut templates = Vec::new();
    let mut problems = Vec::new();
    for m in members {
        match mark_old_volume(&volumes, &claims, restore, m).await? {
            Ok(t) => templates.push(t),
            Err(why) => problems.push(why),
        }
    }
    if !problems.is_empty() {
        return Ok((Swapped::Stuck(problems.join("; ")), Recreated::new()));
    }
    let mut lines = Vec::new();
    let mut stuck = false;
    let mut all_bound = true;
    let mut need_volume = Recreated::new();
    for (m, template) in members.iter().zip(&templates) {
        let current = claims.get_opt(&template.name).await?;
        let mut state = fence::claim_state(template, current.as_ref(), &m.new_volume);
        if state == ClaimState::Old {
            let params = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: Some(template.uid.clone()),
                    resource_version: None,
                }),
                ..DeleteParams::default()
            };
            match claims.delete(&template.name, &params).await {
                Ok(_) => info!(claim = %template.name, "deleted for an InPlace restore"),
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
            let current = claims.get_opt(&template.name).await?;
            state = fence::claim_state(template, current.as_ref(), &m.new_volume);
        }
        if state == ClaimState::Gone {
            let object = fence::recreated_claim(template, &m.new_volume, &provenance(&m.member));
            match claims.create(&PostParams::default(), &object).await {
                Ok(created) => {
                    info!(claim = %template.name, pv = %m.new_volume, "recreated for an InPlace restore");
                    state = fence::claim_state(template, Some(&created), &m.new_volume);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    let current = claims.get_opt(&template.name).await?;
                    state = fence::claim_state(template, current.as_ref(), &m.new_volume);
                }
                Err(e) => {
                    lines.push(format!(
                        "{}; recreating it failed: {e}",
                        fence::explain(
                            template,
                            &state,
                            &m.member.persistent_volume,
                            &m.new_volume
                        )
                    ));
                    all_bound = false;
                    stuck = true;
                    continue;
                }
            }
        }
        match &state {
            ClaimState::Recreated { bound: true, .. } => {}
            ClaimState::Recreated { bound: false, .. } => {
                all_bound = false;
                if let Some(claim) = claims.get_opt(&template.name).await? {
                    need_volume.insert(template.name.clone(), claim);
                }
            }
            ClaimState::Foreign(_) => {
                stuck = true;
                all_bound = false;
            }
            _ => all_bound = false,
        }
        lines.push(fence::explain(
            template,
            &state,
            &m.member.persistent_volume,
            &m.new_volume,
        ));
    }
    let message = lines.join("; ");
    let swapped = if all_bound {
        Swapped::Bound
    } else if stuck {
        Swapped::Stuck(message)
    } else {
        Swapped::Progress(message)
    };
    Ok((swapped, need_volume))
}

/// How often a swap that waits for something only a person can resolve looks again.
const STUCK_RETRY: Duration = Duration::from_secs(30);
/// A safety net while the swap waits for claims to go and bind (their events wake it first).
const SWAP_RETRY: Duration = Duration::from_secs(10);
/// How long a young restore waits for its GroupSnapshot to appear (GitOps may apply both at once).
const SNAPSHOT_GRACE: Duration = Duration::from_secs(10);

/// The InPlace restores a pod event may concern: every InPlace restore of its namespace that has
/// not ended (the fence waits for pods to go; the last look before the swap, that none is back).
pub fn restores_for_pod<P: kube::Resource>(
    restores: &Store<GroupRestore>,
    pod: &P,
) -> Vec<ObjectRef<GroupRestore>> {
    let namespace = pod.meta().namespace.clone();
    restores
        .state()
        .iter()
        .filter(|r| r.namespace() == namespace && r.spec.mode == RestoreMode::InPlace)
        .filter(|r| !super::terminal(r))
        .map(|r| ObjectRef::from_obj(r.as_ref()))
        .collect()
}

/// The restore of the PV a claim names in `spec.volumeName` (label `tandem.dev/group-restore`):
/// a claim InPlace recreated binding to its clone wakes the swap.
pub fn restore_of_claim_volume(
    volumes: &Store<CachedVolume>,
    claim: &PersistentVolumeClaim,
) -> Option<ObjectRef<GroupRestore>> {
    let volume = claim.spec.as_ref()?.volume_name.as_deref()?;
    let pv = volumes.get(&ObjectRef::new(volume))?;
    let name = pv.labels().get(crate::api::GROUP_RESTORE_LABEL)?;
    Some(ObjectRef::new(name).within(&claim.namespace()?))
}

fn member_claims(status: &GroupRestoreStatus) -> BTreeSet<String> {
    status
        .members
        .iter()
        .map(|m| m.source_claim.clone())
        .collect()
}

/// Reconciles an InPlace restore (the dispatch of `super::reconcile`).
pub async fn reconcile(restore: &GroupRestore, rctx: &RestoreContext) -> Result<Action, Error> {
    let status = restore.status.clone().unwrap_or_default();
    let swap_started = !status.pre_restore.is_empty();
    if restore.metadata.deletion_timestamp.is_some() && !swap_started {
        return match status.phase {
            RestorePhase::Completed | RestorePhase::Failed => Ok(Action::await_change()),
            _ => {
                let rolled_back = !status.members.is_empty();
                end_failed(
                    rctx,
                    restore,
                    status,
                    "Deleted",
                    "the GroupRestore was deleted before it completed; the claims were not touched"
                        .into(),
                    rolled_back,
                )
                .await
            }
        };
    }
    // Deleted after the swap started: it finishes (the finalizer holds it), never leaves a claim
    // half-swapped.
    match status.phase {
        RestorePhase::Completed | RestorePhase::Failed => Ok(Action::await_change()),
        RestorePhase::Pending | RestorePhase::Fencing => start(restore, status, rctx).await,
        RestorePhase::Cloning => drive(restore, status, rctx).await,
        RestorePhase::Binding => swap(restore, status, rctx).await,
    }
}

/// Ends the restore Failed: workloads scaled back first, then (when clones may exist) rolled back.
async fn end_failed(
    rctx: &RestoreContext,
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    reason: &str,
    message: String,
    roll_back: bool,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let notes = scale_back_all(&rctx.ctx.client, &namespace, &mut status).await?;
    let mut message = message;
    if !status.workloads.is_empty() {
        message.push_str(&scaled_back_note(&status, &notes));
    }
    if roll_back {
        clones::roll_back(rctx, restore, status, reason, message).await
    } else {
        clones::fail(rctx, restore, status, reason, message).await
    }
}

fn scaled_back_note(status: &GroupRestoreStatus, notes: &[String]) -> String {
    let names: Vec<String> = status
        .workloads
        .iter()
        .map(|w| format!("{} {} to {}", w.kind, w.name, w.replicas))
        .collect();
    let mut out = format!("; workloads scaled back ({})", names.join(", "));
    if !notes.is_empty() {
        out.push_str(&format!(" except: {}", notes.join("; ")));
    }
    out
}

fn age(restore: &GroupRestore) -> Duration {
    restore
        .metadata
        .creation_timestamp
        .as_ref()
        .and_then(|t| Duration::try_from(Timestamp::now().duration_since(t.0)).ok())
        .unwrap_or_default()
}

/// Whether workloadTimeoutSeconds has run out since the fence started (status.startTime).
fn fence_timed_out(restore: &GroupRestore, status: &GroupRestoreStatus) -> (bool, Duration) {
    let seconds = restore
        .spec
        .in_place
        .as_ref()
        .map_or(300, |p| p.workload_timeout_seconds);
    let left = clones::remaining(status.start_time.as_ref(), seconds, Timestamp::now());
    (
        left.is_none() && status.start_time.is_some(),
        left.unwrap_or_default(),
    )
}

fn node_snapshot_uids(rctx: &RestoreContext, namespace: &str) -> BTreeMap<String, String> {
    rctx.ctx
        .node_snapshots
        .state()
        .iter()
        .filter(|n| n.namespace().as_deref() == Some(namespace))
        .filter_map(|n| Some((n.name_any(), n.uid()?)))
        .collect()
}

/// Pending and Fencing: validate and pre-flight, fence, then record the members and clone.
async fn start(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    cache_ready(&rctx.ctx.claims, "PersistentVolumeClaims").await?;
    cache_ready(&rctx.ctx.volumes, "PersistentVolumes").await?;
    cache_ready(&rctx.ctx.node_snapshots, "NodeSnapshots").await?;
    let snapshot = Api::<GroupSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?;
    let claim_objects: Vec<Arc<PersistentVolumeClaim>> = rctx
        .ctx
        .claims
        .state()
        .into_iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace.as_str()))
        .collect();
    let claims: BTreeMap<String, &PersistentVolumeClaim> = claim_objects
        .iter()
        .map(|c| (c.name_any(), c.as_ref()))
        .collect();
    let volume_objects = rctx.ctx.volumes.state();
    let volumes: BTreeMap<String, &CachedVolume> = volume_objects
        .iter()
        .map(|v| (v.name_any(), v.as_ref()))
        .collect();
    let age = age(restore);
    let planned = fence::plan_in_place(
        &namespace,
        restore,
        &uid,
        snapshot.as_ref(),
        &node_snapshot_uids(rctx, &namespace),
        &claims,
        &volumes,
        age < SNAPSHOT_GRACE,
    );
    let start = match planned {
        Ok(start) => start,
        Err(NotYet::Refuse(reason, message)) => {
            return end_failed(rctx, restore, status, reason, message, false).await;
        }
        Err(NotYet::Wait(message)) => {
            if clones::past_deadline(restore) {
                let message = format!("spec.deadlineSeconds passed while {message}");
                return end_failed(rctx, restore, status, "DeadlineExceeded", message, false).await;
            }
            let changed = status.message.as_deref() != Some(message.as_str());
            status.message = Some(message);
            status.start_time.get_or_insert_with(now);
            if changed {
                clones::write_status(&api, &name, &status).await?;
            }
            return Ok(Action::requeue(
                SNAPSHOT_GRACE.saturating_sub(age) + Duration::from_millis(100),
            ));
        }
    };
    if clones::past_deadline(restore) {
        let message = format!(
            "the restore did not get past the fence within spec.deadlineSeconds ({} s)",
            restore.spec.deadline_seconds
        );
        return end_failed(rctx, restore, status, "DeadlineExceeded", message, false).await;
    }

    // The fence.
    let policy = restore
        .spec
        .in_place
        .as_ref()
        .map(|p| p.workloads)
        .unwrap_or_default();
    let claim_names: BTreeSet<String> = start.targets.iter().map(|t| t.claim.clone()).collect();
    let (timed_out, _) = fence_timed_out(restore, &status);
    let generation = restore.metadata.generation;
    let fenced = fence_pass(
        &client,
        &namespace,
        policy,
        &claim_names,
        &mut status,
        timed_out,
        |mut recorded| {
            let api = api.clone();
            let name = name.clone();
            async move {
                // The counts are recorded (and the phase is Fencing) before anything is scaled.
                recorded.phase = RestorePhase::Fencing;
                recorded.start_time.get_or_insert_with(now);
                recorded.observed_generation = generation;
                clones::write_status(&api, &name, &recorded).await
            }
        },
    )
    .await?;
    match fenced {
        Fenced::Failed(why) => {
            let reason = if timed_out {
                "WorkloadTimeout"
            } else {
                "ClaimsInUse"
            };
            end_failed(rctx, restore, status, reason, why, false).await
        }
        Fenced::Waiting { pods, recorded } => {
            let message = format!(
                "waiting for pod(s) {} to stop using the claims (scaled down: {})",
                pods.join(", "),
                status
                    .workloads
                    .iter()
                    .map(|w| format!("{} {}", w.kind, w.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let changed = recorded
                || status.phase != RestorePhase::Fencing
                || status.message.as_deref() != Some(message.as_str());
            status.phase = RestorePhase::Fencing;
            status.start_time.get_or_insert_with(now);
            status.message = Some(message.clone());
            clones::set_conditions(
                &mut status,
                generation,
                (false, "Fencing", message),
                (
                    false,
                    "Fencing",
                    "the claims are untouched until the pods are gone".into(),
                ),
            );
            if changed {
                clones::write_status(&api, &name, &status).await?;
            }
            // Pod events wake the fence; this covers workloadTimeoutSeconds and the deadline.
            let (_, left) = fence_timed_out(restore, &status);
            let deadline = clones::remaining(
                status.start_time.as_ref(),
                restore.spec.deadline_seconds,
                Timestamp::now(),
            )
            .unwrap_or_default();
            Ok(Action::requeue(
                left.min(deadline) + Duration::from_millis(100),
            ))
        }
        Fenced::Clear => {
            let Some(snapshot) = snapshot else {
                return Ok(Action::requeue(Duration::from_secs(1)));
            };
            let central = snapshot.status.as_ref().and_then(|s| s.central.clone());
            if let Some(central) = &central {
                if central.phase != CentralPhase::Taken {
                    let message = format!(
                        "GroupSnapshot {} has no RBD group snapshot to roll back to ({:?})",
                        snapshot.name_any(),
                        central.phase
                    );
                    return end_failed(rctx, restore, status, "RbdSnapshotMissing", message, false)
                        .await;
                }
                if start
                    .targets
                    .iter()
                    .all(|t| rbd_copies::central_volume(Some(central), t).is_some())
                {
                    return roll_back_rbd(restore, status, rctx, &snapshot, central).await;
                }
            }
            let snapshot_status = snapshot.status.clone().unwrap_or_default();
            status.phase = RestorePhase::Cloning;
            status.group_snapshot_uid = snapshot.uid();
            status.consistency = snapshot_status.consistency;
            // A mixed group: the local members are cloned and swapped, the RBD ones rolled back
            // (in `drive`, once the clones are ready and before the first claim is swapped).
            status.members = start
                .targets
                .iter()
                .map(|t| match rbd_copies::central_volume(central.as_ref(), t) {
                    Some(_) => RestoredMember {
                        source_claim: t.member.claim.clone(),
                        claim: t.member.claim.clone(),
                        persistent_volume: t.member.persistent_volume.clone(),
                        node: t.member.node.clone(),
                        backend: Some(rbd_copies::RBD_ROLLBACK_BACKEND.into()),
                        ..Default::default()
                    },
                    None => RestoredMember {
                        source_claim: t.member.claim.clone(),
                        claim: t.claim.clone(),
                        persistent_volume: t.persistent_volume.clone(),
                        node: t.member.node.clone(),
                        ..Default::default()
                    },
                })
                .collect();
            status.member_count = i32::try_from(status.members.len()).unwrap_or(i32::MAX);
            status.start_time.get_or_insert_with(now);
            status.message = None;
            status.observed_generation = generation;
            let message = format!(
                "no pod uses the claims; cloning {} member(s), the claims are untouched until every one is cloned",
                status.member_count
            );
            clones::set_conditions(
                &mut status,
                generation,
                (false, "Cloning", message.clone()),
                (
                    false,
                    "Cloning",
                    "the claims are still on their old volumes".into(),
                ),
            );
            clones::write_status(&api, &name, &status).await?;
            info!(restore = %name, %namespace, members = status.member_count, "InPlace restore started");
            clones::publish(rctx, restore, EventType::Normal, "Cloning", message).await;
            Ok(Action::requeue(Duration::from_millis(10)))
        }
    }
}

/// Where the RBD rollback of an InPlace restore stands.
enum RbdRollback {
    /// Some image is still attached (the status says which): wake with this.
    Waiting(Action),
    /// It could not be made: the restore fails with this reason and message.
    Failed(&'static str, String),
    /// Every RBD member is back at the snapshot.
    Done,
}

/// The RBD part of an InPlace restore: once no RBD member is attached to a node (the kubelet
/// unmounted it, ceph-csi unmapped it, the attach/detach controller removed its
/// VolumeAttachment), one `rbd group snap rollback` over the group's images.
async fn rbd_rollback(
    restore: &GroupRestore,
    status: &mut GroupRestoreStatus,
    rctx: &RestoreContext,
    central: &CentralSnapshot,
) -> Result<RbdRollback, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    let attached = ceph::attached_nodes(&client).await?;
    let still: Vec<String> = central
        .volumes
        .iter()
        .filter_map(|v| {
            attached
                .get(&v.persistent_volume)
                .map(|node| format!("{} on node {node}", v.persistent_volume))
        })
        .collect();
    if !still.is_empty() {
        if clones::past_deadline(restore) {
            return Ok(RbdRollback::Failed(
                "DeadlineExceeded",
                format!(
                    "spec.deadlineSeconds passed while RBD images were still attached ({}); nothing was rolled back",
                    still.join(", ")
                ),
            ));
        }
        let message = format!(
            "no pod uses the claims; waiting for their RBD images to be detached ({}) before the rollback",
            still.join(", ")
        );
        if status.message.as_deref() != Some(message.as_str()) {
            if status.phase == RestorePhase::Pending {
                status.phase = RestorePhase::Fencing;
            }
            status.start_time.get_or_insert_with(now);
            status.message = Some(message.clone());
            clones::set_conditions(
                status,
                restore.metadata.generation,
                (false, "Detaching", message),
                (false, "Detaching", "the claims are untouched".into()),
            );
            clones::write_status(&api, &name, status).await?;
        }
        return Ok(RbdRollback::Waiting(Action::requeue(Duration::from_secs(
            2,
        ))));
    }
    let cluster = match ceph::connect_for(&rctx.ctx.ceph, &client, &rctx.ctx.volumes, central).await
    {
        Ok(cluster) => cluster,
        Err(ceph::CephError::Kube(e)) => return Err(e.into()),
        Err(e) => return Ok(RbdRollback::Failed("CephUnavailable", e.to_string())),
    };
    let record = central.clone();
    let rolled = tokio::task::spawn_blocking(move || ceph::rollback_checked(&cluster, &record))
        .await
        .unwrap_or_else(|e| Err(format!("the rollback call did not return: {e}")));
    if let Err(why) = rolled {
        rctx.ctx.ceph.forget(&central.cluster_id);
        return Ok(RbdRollback::Failed("RbdRollbackFailed", why));
    }
    info!(restore = %name, %namespace, snapshot = %crate::controller::central::snapshot_path(central), "RBD members rolled back");
    Ok(RbdRollback::Done)
}

/// InPlace for a snapshot of RBD members: once the fence has stopped their pods and no member is
/// attached to a node any more (the kubelet unmounts, ceph-csi unmaps, the attach/detach
/// controller removes the VolumeAttachment), one `rbd group snap rollback`. The claims and PVs stay
/// as they are: the images themselves go back to the snapshot. No undo point is kept.
async fn roll_back_rbd(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
    snapshot: &GroupSnapshot,
    central: &CentralSnapshot,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let client = rctx.ctx.client.clone();
    let members = snapshot
        .status
        .as_ref()
        .map(|s| s.members.clone())
        .unwrap_or_default();
    match rbd_rollback(restore, &mut status, rctx, central).await? {
        RbdRollback::Waiting(action) => return Ok(action),
        RbdRollback::Failed(reason, why) => {
            return end_failed(rctx, restore, status, reason, why, false).await;
        }
        RbdRollback::Done => {}
    }
    status.group_snapshot_uid = snapshot.uid();
    status.consistency = snapshot.status.as_ref().and_then(|s| s.consistency);
    status.members = members
        .iter()
        .map(|m| RestoredMember {
            source_claim: m.claim.clone(),
            claim: m.claim.clone(),
            persistent_volume: m.persistent_volume.clone(),
            node: m.node.clone(),
            backend: Some(rbd_copies::RBD_ROLLBACK_BACKEND.into()),
            ..Default::default()
        })
        .collect();
    status.member_count = i32::try_from(status.members.len()).unwrap_or(i32::MAX);
    let notes = scale_back_all(&client, &namespace, &mut status).await?;
    let message = format!(
        "{} RBD image(s) rolled back in place to {} (GroupSnapshot {}); the claims and PVs are unchanged",
        status.member_count,
        crate::controller::central::snapshot_path(central),
        snapshot.name_any()
    );
    finish(
        restore,
        status,
        rctx,
        message,
        &notes,
        "every claim stayed Bound to its volume",
    )
    .await
}

/// Ends a restore Completed with `message` (and which workloads were scaled back).
async fn finish(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
    mut message: String,
    scale_back_notes: &[String],
    bound: &str,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    if !status.workloads.is_empty() {
        message.push_str(&scaled_back_note(&status, scale_back_notes));
    }
    status.phase = RestorePhase::Completed;
    status.completion_time = Some(now());
    status.message = Some(message.clone());
    clones::set_conditions(
        &mut status,
        restore.metadata.generation,
        (true, "Restored", message.clone()),
        (true, "Bound", bound.into()),
    );
    let api: Api<GroupRestore> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    clones::write_status(&api, &restore.name_any(), &status).await?;
    info!(restore = %restore.name_any(), %namespace, "{message}");
    clones::publish(rctx, restore, EventType::Normal, "Restored", message).await;
    rctx.wake_snapshot(&namespace, &restore.spec.source.group_snapshot_name);
    Ok(Action::await_change())
}

/// The targets of a started restore: its recorded members, with what the snapshot recorded.
fn targets_of(status: &GroupRestoreStatus, snapshot: Option<&GroupSnapshot>) -> Vec<Target> {
    let recorded: Vec<MemberSnapshot> = snapshot
        .and_then(|s| s.status.as_ref())
        .map(|s| s.members.clone())
        .unwrap_or_default();
    status
        .members
        .iter()
        .map(|m| Target {
            member: recorded
                .iter()
                .find(|r| r.claim == m.source_claim && r.node == m.node)
                .cloned()
                .unwrap_or_else(|| MemberSnapshot {
                    claim: m.source_claim.clone(),
                    persistent_volume: status
                        .pre_restore
                        .iter()
                        .find(|p| p.claim == m.source_claim)
                        .map(|p| p.persistent_volume.clone())
                        .unwrap_or_default(),
                    node: m.node.clone(),
                    ..Default::default()
                }),
            claim: m.claim.clone(),
            persistent_volume: m.persistent_volume.clone(),
        })
        .collect()
}

/// Whether a member of an InPlace restore is an RBD member rolled back on its own volume.
fn is_rolled_back_member(member: &RestoredMember) -> bool {
    member.backend.as_deref() == Some(rbd_copies::RBD_ROLLBACK_BACKEND)
}

/// The targets cloned on their nodes and swapped (`targets` is `targets_of(status, ..)`, one per
/// member in order): all but the RBD members.
fn local_targets(status: &GroupRestoreStatus, targets: &[Target]) -> Vec<Target> {
    targets
        .iter()
        .zip(&status.members)
        .filter(|(_, m)| !is_rolled_back_member(m))
        .map(|(t, _)| t.clone())
        .collect()
}

/// Cloning: the NodeRestores, their progress; once every clone is Cloned and no pod came back,
/// the point of no return: status.preRestore, phase Binding.
async fn drive(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    cache_ready(&rctx.node_restores, "NodeRestores").await?;
    cache_ready(&rctx.ctx.claims, "PersistentVolumeClaims").await?;
    cache_ready(&rctx.ctx.volumes, "PersistentVolumes").await?;
    if clones::past_deadline(restore) {
        let message = format!(
            "the members were not cloned within spec.deadlineSeconds ({} s); the claims were not touched",
            restore.spec.deadline_seconds
        );
        return end_failed(rctx, restore, status, "DeadlineExceeded", message, true).await;
    }
    let snapshot = Api::<GroupSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?;
    if let Some((reason, message)) = super::validate::snapshot_problem(
        &namespace,
        &restore.spec.source.group_snapshot_name,
        snapshot.as_ref(),
        status.group_snapshot_uid.as_deref(),
    ) && reason != "GroupSnapshotDeleting"
    {
        return end_failed(rctx, restore, status, reason, message, true).await;
    }
    let targets = targets_of(&status, snapshot.as_ref());
    let cloned = local_targets(&status, &targets);
    let class = rctx.storage_class.clone();
    let owner = Owner::of(restore, &namespace, &uid, &class);
    let wanted = plan::node_restores(&owner, &cloned, &node_snapshot_uids(rctx, &namespace));
    if let Err(problem) = clones::ensure_node_restores(rctx, &namespace, &uid, &wanted).await? {
        return end_failed(
            rctx,
            restore,
            status,
            "NodeRestoreCreateFailed",
            problem,
            true,
        )
        .await;
    }
    let nodes: Vec<NodeRestore> = clones::node_restores_of(rctx, &namespace, &uid);
    match clones::aggregate(&mut status.members, &nodes) {
        Progress::Failed(message) => {
            let message = format!("{message}; the claims were not touched");
            end_failed(rctx, restore, status, "CloneFailed", message, true).await
        }
        Progress::Cloning => {
            if restore.status.as_ref() != Some(&status) {
                clones::write_status(&api, &name, &status).await?;
            }
            Ok(clones::until_deadline(restore))
        }
        Progress::Cloned => {
            // Last look before the swap: the claims still the recorded ones, and no pod back.
            let claim_objects: Vec<Arc<PersistentVolumeClaim>> = rctx
                .ctx
                .claims
                .state()
                .into_iter()
                .filter(|c| c.namespace().as_deref() == Some(namespace.as_str()))
                .collect();
            let claims: BTreeMap<String, &PersistentVolumeClaim> = claim_objects
                .iter()
                .map(|c| (c.name_any(), c.as_ref()))
                .collect();
            let volume_objects = rctx.ctx.volumes.state();
            let volumes: BTreeMap<String, &CachedVolume> = volume_objects
                .iter()
                .map(|v| (v.name_any(), v.as_ref()))
                .collect();
            let members: Vec<MemberSnapshot> = targets.iter().map(|t| t.member.clone()).collect();
            let problems = fence::preflight(&members, &claims, &volumes);
            if !problems.is_empty() {
                let message = format!(
                    "the claims changed while the members were cloned, nothing was swapped: {}",
                    problems.join("; ")
                );
                return end_failed(rctx, restore, status, "ClaimsChanged", message, true).await;
            }
            let uses = pods_using_claims(&client, &namespace, &member_claims(&status)).await?;
            if !uses.is_empty() {
                let message = format!(
                    "pods started using the claims while the members were cloned, nothing was swapped: {}",
                    fence::describe_uses(&uses)
                );
                return end_failed(rctx, restore, status, "ClaimsInUse", message, true).await;
            }
            // A mixed group: its RBD members are rolled back first (one call, all or nothing
            // for the local claims: a failure here deletes the clones and swaps nothing).
            if status
                .members
                .iter()
                .any(|m| is_rolled_back_member(m) && m.cloned_at.is_none())
            {
                let central = snapshot
                    .as_ref()
                    .and_then(|s| s.status.as_ref())
                    .and_then(|s| s.central.clone());
                let Some(central) = central else {
                    let message = "the GroupSnapshot no longer records its RBD group snapshot; nothing was swapped".to_string();
                    return end_failed(rctx, restore, status, "RbdSnapshotMissing", message, true)
                        .await;
                };
                match rbd_rollback(restore, &mut status, rctx, &central).await? {
                    RbdRollback::Waiting(action) => return Ok(action),
                    RbdRollback::Failed(reason, why) => {
                        let message =
                            format!("{why}; the claims of the node-local members were not touched");
                        return end_failed(rctx, restore, status, reason, message, true).await;
                    }
                    RbdRollback::Done => {
                        let path = crate::controller::central::snapshot_path(&central);
                        for m in status
                            .members
                            .iter_mut()
                            .filter(|m| is_rolled_back_member(m))
                        {
                            m.cloned_at = Some(now());
                            m.message = Some(format!("rolled back in place to {path}"));
                        }
                    }
                }
            }
            let swap_members: Vec<SwapMember> = cloned
                .iter()
                .map(|t| SwapMember {
                    member: t.member.clone(),
                    new_volume: t.persistent_volume.clone(),
                })
                .collect();
            status.pre_restore = pre_restore(&swap_members);
            status.phase = RestorePhase::Binding;
            status.message =
                Some("every member is cloned; swapping the claims to their clones".into());
            clones::set_conditions(
                &mut status,
                restore.metadata.generation,
                (
                    false,
                    "Binding",
                    "every member is cloned; the claims are being swapped".into(),
                ),
                (
                    false,
                    "Binding",
                    "the old volumes are kept (reclaim Retain) as the undo point".into(),
                ),
            );
            // Recorded before anything is changed: from here on the restore only goes forward.
            clones::write_status(&api, &name, &status).await?;
            info!(restore = %name, %namespace, "InPlace restore: every member cloned, swapping");
            Ok(Action::requeue(Duration::from_millis(10)))
        }
    }
}

/// Binding: the swap, forward only. Completed when every claim is Bound to its clone.
async fn swap(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    cache_ready(&rctx.node_restores, "NodeRestores").await?;
    let snapshot = Api::<GroupSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?;
    let targets = local_targets(&status, &targets_of(&status, snapshot.as_ref()));
    let class = rctx.storage_class.clone();
    let owner = Owner::of(restore, &namespace, &uid, &class);
    let swap_members: Vec<SwapMember> = targets
        .iter()
        .map(|t| {
            let mut member = t.member.clone();
            // The old PV as recorded at the point of no return (the snapshot may be gone by now).
            if let Some(p) = status
                .pre_restore
                .iter()
                .find(|p| p.claim == t.member.claim)
            {
                member.persistent_volume = p.persistent_volume.clone();
            }
            SwapMember {
                member,
                new_volume: t.persistent_volume.clone(),
            }
        })
        .collect();
    let provenance =
        |m: &MemberSnapshot| plan::provenance(&namespace, owner.snapshot, m, owner.consistency);
    let (swapped, need_volume) =
        swap_pass(&client, &namespace, &name, &swap_members, &provenance).await?;
    let nodes: Vec<NodeRestore> = clones::node_restores_of(rctx, &namespace, &uid);
    let mut published_problem = None;
    if !need_volume.is_empty() {
        let wanted: Vec<Target> = targets
            .iter()
            .filter(|t| need_volume.contains_key(&t.claim))
            .cloned()
            .collect();
        if let Err(problem) = clones::create_volumes(rctx, &owner, &wanted, &nodes, None).await? {
            published_problem = Some(problem);
        }
    }
    let stuck = matches!(swapped, Swapped::Stuck(_)) || published_problem.is_some();
    match swapped {
        Swapped::Bound => complete(restore, status, rctx, &nodes).await,
        Swapped::Progress(message) | Swapped::Stuck(message) if stuck => {
            let message = match published_problem {
                Some(p) => format!("{message}; publishing the clones failed: {p}"),
                None => message,
            };
            let message =
                format!("the swap needs attention (it goes on by itself once resolved): {message}");
            if status.message.as_deref() != Some(message.as_str()) {
                status.message = Some(message.clone());
                clones::write_status(&api, &name, &status).await?;
                clones::publish(rctx, restore, EventType::Warning, "SwapStuck", message).await;
            }
            Ok(Action::requeue(STUCK_RETRY))
        }
        Swapped::Progress(message) | Swapped::Stuck(message) => {
            if status.message.as_deref() != Some(message.as_str()) {
                status.message = Some(message);
                clones::write_status(&api, &name, &status).await?;
            }
            Ok(Action::requeue(SWAP_RETRY))
        }
    }
}

/// Every claim is Bound to its clone: the clones outlive the restore, the workloads go back up.
async fn complete(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
    nodes: &[NodeRestore],
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let client = rctx.ctx.client.clone();
    let nodes_api: Api<NodeRestore> = Api::namespaced(client.clone(), &namespace);
    for node in nodes {
        if node.annotations().contains_key(COMPLETED_ANNOTATION) {
            continue;
        }
        nodes_api
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {COMPLETED_ANNOTATION: "true"}}})),
            )
            .await?;
    }
    let notes = scale_back_all(&client, &namespace, &mut status).await?;
    let kept: Vec<String> = status
        .pre_restore
        .iter()
        .map(|p| p.persistent_volume.clone())
        .collect();
    let mut message = format!(
        "{} claim(s) restored in place from GroupSnapshot {} and Bound; the old volumes {} are kept (reclaim Retain, label {PRE_RESTORE_LABEL}={}) as the undo point",
        status.member_count,
        restore.spec.source.group_snapshot_name,
        kept.join(", "),
        restore.name_any()
    );
    let rolled_back: Vec<&str> = status
        .members
        .iter()
        .filter(|m| is_rolled_back_member(m))
        .map(|m| m.claim.as_str())
        .collect();
    if !rolled_back.is_empty() {
        message.push_str(&format!(
            "; the RBD member(s) {} were rolled back on their own volumes (no undo point)",
            rolled_back.join(", ")
        ));
    }
    finish(
        restore,
        status,
        rctx,
        message,
        &notes,
        "every claim is Bound to its restored volume",
    )
    .await
}
