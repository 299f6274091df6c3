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

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tracing::info;

use super::fence::{
    self, ClaimState, ClaimTemplate, Fence, PRE_RESTORE_CLAIM_ANNOTATION, PodUse, ScaleBack,
    Workload,
};
use crate::api::{
    GroupRestoreStatus, MemberSnapshot, PRE_RESTORE_LABEL, PreRestoreVolume, ScaledWorkload,
    WorkloadPolicy,
};
use crate::controller::Error;

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
    let Some(volume) = volumes.get_opt(old).await? else {
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
    provenance: &dyn Fn(&MemberSnapshot) -> BTreeMap<String, String>,
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
