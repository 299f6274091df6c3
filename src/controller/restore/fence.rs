//! The decisions of an InPlace restore, as pure logic over what the API server holds: whether the
//! group's own claims are still the ones the snapshot recorded (the pre-flight), which pods use
//! them and who owns those pods (the fence), and where each claim stands in the swap from its old
//! volume to the clone. No I/O: `in_place.rs` reads the objects, calls these and acts.

use crate::controller::cache::CachedVolume;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, PersistentVolumeClaimSpec, Pod, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use super::plan::{self, Target};
use super::validate;
use crate::api::{
    GroupRestore, GroupSnapshot, MemberSnapshot, PRE_RESTORE_LABEL, ScaledWorkload, WorkloadPolicy,
};

/// On a PV an InPlace restore replaced: the claim it was bound to, as JSON ([`ClaimTemplate`]),
/// written before the claim is deleted, so the claim can be recreated under its name with its
/// metadata and spec even by a controller that restarted after the delete.
pub const PRE_RESTORE_CLAIM_ANNOTATION: &str = "tandem.dev/pre-restore-claim";

/// Annotations that describe the old claim's binding, not the claim: never copied to the new one
/// (the PV controller and provisioners set them again for the new binding).
const BINDING_ANNOTATIONS: &[&str] = &[
    "pv.kubernetes.io/bind-completed",
    "pv.kubernetes.io/bound-by-controller",
    "volume.beta.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/storage-provisioner",
    "volume.kubernetes.io/selected-node",
];

/// A quantity in bytes (None when unparseable).
fn bytes(quantity: &Quantity) -> Option<u128> {
    super::quota::parse_quantity(&quantity.0)
}

fn claim_request(claim: &PersistentVolumeClaim) -> Option<&Quantity> {
    claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
}

/// Checks, before anything is touched, that every member claim is still the one the snapshot
/// recorded: it exists, is not being deleted, is Bound to the recorded PV, that PV's claimRef
/// names it back (by uid), and its request fits the snapshot's capacity. `claims` and `volumes`
/// are those of the restore's namespace (claims by name) and the cluster (PVs by name).
///
/// Returns every problem found, one sentence each, or an empty list.
pub fn preflight(
    members: &[MemberSnapshot],
    claims: &BTreeMap<String, &PersistentVolumeClaim>,
    volumes: &BTreeMap<String, &CachedVolume>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for member in members {
        let name = &member.claim;
        let Some(claim) = claims.get(name) else {
            problems.push(format!(
                "claim {name} does not exist any more (the snapshot recorded it bound to PV {}); restore to new claims instead",
                member.persistent_volume
            ));
            continue;
        };
        if claim.metadata.deletion_timestamp.is_some() {
            problems.push(format!("claim {name} is being deleted"));
            continue;
        }
        let bound_to = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
        if bound_to != Some(member.persistent_volume.as_str()) {
            problems.push(format!(
                "claim {name} is bound to {}, not to PV {} that the snapshot recorded: it was rebound since the snapshot; restore to new claims instead",
                bound_to.map_or("no PV".to_string(), |v| format!("PV {v}")),
                member.persistent_volume
            ));
            continue;
        }
        let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
        if phase != Some("Bound") {
            problems.push(format!(
                "claim {name} is {}, not Bound to PV {}",
                phase.unwrap_or("without a phase"),
                member.persistent_volume
            ));
            continue;
        }
        let Some(volume) = volumes.get(&member.persistent_volume) else {
            problems.push(format!(
                "PV {} of claim {name} does not exist",
                member.persistent_volume
            ));
            continue;
        };
        let claim_ref = volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        let back = claim_ref.is_some_and(|r| {
            r.name.as_deref() == Some(name.as_str())
                && r.namespace == claim.metadata.namespace
                && r.uid == claim.metadata.uid
        });
        if !back {
            problems.push(format!(
                "PV {} is not bound back to claim {name} (its claimRef names another claim)",
                member.persistent_volume
            ));
            continue;
        }
        if volume.labels().contains_key(PRE_RESTORE_LABEL) {
            problems.push(format!(
                "PV {} of claim {name} is the undo point of another restore ({PRE_RESTORE_LABEL}={})",
                member.persistent_volume,
                volume.labels()[PRE_RESTORE_LABEL]
            ));
            continue;
        }
        if let (Some(request), Some(capacity)) = (claim_request(claim), member.capacity.as_ref())
            && let (Some(r), Some(c)) = (bytes(request), bytes(capacity))
            && r > c
        {
            problems.push(format!(
                "claim {name} requests {}, more than the snapshot's {} (it was expanded since the snapshot)",
                request.0, capacity.0
            ));
            continue;
        }
        let mode = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_mode.as_deref())
            .unwrap_or("Filesystem");
        if let Some(recorded) = member.volume_mode.as_deref()
            && recorded != mode
        {
            problems.push(format!(
                "claim {name} has volume mode {mode}, the snapshot {recorded}"
            ));
        }
    }
    problems
}

/// What an InPlace restore that may start restores: each member back into its own claim.
#[derive(Debug, Clone, PartialEq)]
pub struct InPlaceStart {
    pub targets: Vec<Target>,
    /// NodeSnapshot name → uid, for the NodeRestores.
    pub node_snapshot_uids: BTreeMap<String, String>,
}

/// Why an InPlace restore cannot start (yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotYet {
    /// Wait (GitOps may apply the restore before its snapshot): what it waits for.
    Wait(String),
    /// Refused, with a condition reason and a message a person can act on.
    Refuse(&'static str, String),
}

/// Validates an InPlace restore before anything is touched: the snapshot (this namespace, Ready,
/// the one recorded), every member's cut findable (its NodeSnapshot and handle), and the
/// pre-flight of the claims ([`preflight`]). The target of each member is its own claim; the
/// clone's PV is named as NewClaims names it.
#[allow(clippy::too_many_arguments)]
pub fn plan_in_place(
    namespace: &str,
    restore: &GroupRestore,
    restore_uid: &str,
    snapshot: Option<&GroupSnapshot>,
    node_snapshots: &BTreeMap<String, String>,
    claims: &BTreeMap<String, &PersistentVolumeClaim>,
    volumes: &BTreeMap<String, &CachedVolume>,
    settling: bool,
) -> Result<InPlaceStart, NotYet> {
    let source = &restore.spec.source;
    if let Some(ns) = &source.namespace
        && ns != namespace
    {
        return Err(NotYet::Refuse(
            "CrossNamespace",
            format!(
                "spec.source.namespace is {ns}, but a GroupRestore restores only snapshots of its own namespace {namespace}; create the GroupRestore in {ns}"
            ),
        ));
    }
    let recorded = restore
        .status
        .as_ref()
        .and_then(|s| s.group_snapshot_uid.as_deref());
    if let Some((reason, message)) =
        validate::snapshot_problem(namespace, &source.group_snapshot_name, snapshot, recorded)
    {
        if reason == "GroupSnapshotNotFound" && settling {
            return Err(NotYet::Wait(format!(
                "waiting for GroupSnapshot {}",
                source.group_snapshot_name
            )));
        }
        return Err(NotYet::Refuse(reason, message));
    }
    let Some(snapshot) = snapshot else {
        return Err(NotYet::Refuse(
            "GroupSnapshotNotFound",
            "no GroupSnapshot".into(),
        ));
    };
    let snapshot_name = snapshot.name_any();
    let snapshot_uid = snapshot.uid().unwrap_or_default();
    let members = snapshot.status.clone().unwrap_or_default().members;
    if members.is_empty() {
        return Err(NotYet::Refuse(
            "EmptySnapshot",
            format!("GroupSnapshot {snapshot_name} has no members"),
        ));
    }
    let mut node_snapshot_uids = BTreeMap::new();
    let mut targets = Vec::new();
    for member in &members {
        let mut member = member.clone();
        let node_snapshot = member.node_snapshot.clone().unwrap_or_else(|| {
            crate::controller::node_snapshot_name(&snapshot_name, &snapshot_uid, &member.node)
        });
        let Some(uid) = node_snapshots.get(&node_snapshot) else {
            return Err(NotYet::Refuse(
                "SnapshotIncomplete",
                format!(
                    "member {} of GroupSnapshot {snapshot_name}: its NodeSnapshot {node_snapshot} is gone, so its snapshot cannot be found on node {}",
                    member.claim, member.node
                ),
            ));
        };
        if member.snapshot_handle.is_none() {
            return Err(NotYet::Refuse(
                "SnapshotIncomplete",
                format!(
                    "member {} of GroupSnapshot {snapshot_name} has no snapshot handle",
                    member.claim
                ),
            ));
        }
        node_snapshot_uids.insert(node_snapshot.clone(), uid.clone());
        member.node_snapshot = Some(node_snapshot);
        targets.push(Target {
            claim: member.claim.clone(),
            persistent_volume: plan::pv_name(restore_uid, &member.claim),
            member,
        });
    }
    let problems = preflight(&members, claims, volumes);
    if !problems.is_empty() {
        return Err(NotYet::Refuse(
            "ClaimsChanged",
            format!(
                "the group's claims are not the ones GroupSnapshot {snapshot_name} recorded, nothing was touched: {}",
                problems.join("; ")
            ),
        ));
    }
    Ok(InPlaceStart {
        targets,
        node_snapshot_uids,
    })
}

/// One pod that uses member claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUse {
    pub pod: String,
    pub claims: Vec<String>,
    /// The pod's controller (kind, name), if any.
    pub owner: Option<(String, String)>,
}

/// The pods (of the restore's namespace) that use any of `claims`: every pod not Succeeded or
/// Failed whose volumes name one of them (also one being deleted), and a pod being deleted on a
/// node whatever its phase (its kubelet may still be unmounting the volume; PodGC marks such pods
/// Failed before they are gone). Sorted by pod name.
pub fn pods_using(pods: &[Pod], claims: &BTreeSet<String>) -> Vec<PodUse> {
    let mut uses: Vec<PodUse> = pods
        .iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            let ended = matches!(phase, Some("Succeeded" | "Failed"));
            let on_node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| !n.is_empty());
            !ended || (on_node && p.metadata.deletion_timestamp.is_some())
        })
        .filter_map(|p| {
            let used: BTreeSet<String> = p
                .spec
                .as_ref()?
                .volumes
                .iter()
                .flatten()
                .filter_map(|v| v.persistent_volume_claim.as_ref())
                .map(|c| c.claim_name.clone())
                .filter(|c| claims.contains(c))
                .collect();
            if used.is_empty() {
                return None;
            }
            Some(PodUse {
                pod: p.name_any(),
                claims: used.into_iter().collect(),
                owner: controller_of(&p.metadata),
            })
        })
        .collect();
    uses.sort_by(|a, b| a.pod.cmp(&b.pod));
    uses
}

fn controller_of(meta: &ObjectMeta) -> Option<(String, String)> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .map(|o| (o.kind.clone(), o.name.clone()))
}

/// A workload an InPlace restore can scale: `Deployment` or `StatefulSet`, by name.
pub type Workload = (String, String);

/// The Deployments and StatefulSets that own the pods (Pod → ReplicaSet → Deployment, Pod →
/// StatefulSet), or why they cannot be scaled down: a bare pod, a ReplicaSet of no Deployment,
/// another kind of owner. `replica_sets` are those of the namespace, by name.
pub fn owners(
    uses: &[PodUse],
    replica_sets: &BTreeMap<String, &ReplicaSet>,
) -> Result<BTreeSet<Workload>, String> {
    let mut workloads = BTreeSet::new();
    let mut refused = Vec::new();
    for used in uses {
        match &used.owner {
            None => refused.push(format!("pod {} has no owner", used.pod)),
            Some((kind, name)) if kind == "StatefulSet" => {
                workloads.insert(("StatefulSet".to_string(), name.clone()));
            }
            Some((kind, name)) if kind == "ReplicaSet" => {
                let deployment = replica_sets
                    .get(name)
                    .and_then(|rs| controller_of(&rs.metadata))
                    .filter(|(kind, _)| kind == "Deployment");
                match deployment {
                    Some((_, deployment)) => {
                        workloads.insert(("Deployment".to_string(), deployment));
                    }
                    None if replica_sets.contains_key(name) => refused.push(format!(
                        "pod {} belongs to ReplicaSet {name}, which no Deployment owns",
                        used.pod
                    )),
                    None => refused.push(format!(
                        "pod {} belongs to ReplicaSet {name}, which does not exist",
                        used.pod
                    )),
                }
            }
            Some((kind, name)) => {
                refused.push(format!("pod {} belongs to {kind} {name}", used.pod))
            }
        }
    }
    if refused.is_empty() {
        Ok(workloads)
    } else {
        Err(format!(
            "{}; only Deployments and StatefulSets are scaled down: stop these pods yourself and apply the restore again",
            refused.join("; ")
        ))
    }
}

/// Lists the pods and the claims they use, for messages.
pub fn describe_uses(uses: &[PodUse]) -> String {
    uses.iter()
        .map(|u| format!("{} (claims {})", u.pod, u.claims.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the fence does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fence {
    /// No pod uses a member claim: go on.
    Clear,
    /// The restore is refused: the message says why and names the pods.
    Refuse(String),
    /// Record these workloads (with their current replicas) in status.workloads, then scale
    /// every recorded one to zero.
    ScaleDown(Vec<Workload>),
    /// Every owner is recorded (and scaled to zero): wait for these pods to go.
    Wait(Vec<String>),
    /// The pods did not go within workloadTimeoutSeconds.
    TimedOut(String),
}

/// Decides the fence from the pods using the claims, their owners, the workloads recorded so far
/// and whether workloadTimeoutSeconds has run out.
pub fn fence(
    policy: WorkloadPolicy,
    uses: &[PodUse],
    owners: Result<BTreeSet<Workload>, String>,
    recorded: &[ScaledWorkload],
    timed_out: bool,
) -> Fence {
    if uses.is_empty() {
        return Fence::Clear;
    }
    if policy == WorkloadPolicy::Refuse {
        return Fence::Refuse(format!(
            "pods use member claims: {}; stop them, or set spec.inPlace.workloads: ScaleDown",
            describe_uses(uses)
        ));
    }
    let owners = match owners {
        Ok(owners) => owners,
        Err(why) => return Fence::Refuse(why),
    };
    let new: Vec<Workload> = owners
        .into_iter()
        .filter(|(kind, name)| !recorded.iter().any(|r| &r.kind == kind && &r.name == name))
        .collect();
    if !new.is_empty() {
        return Fence::ScaleDown(new);
    }
    if timed_out {
        return Fence::TimedOut(format!(
            "pods still use member claims after workloadTimeoutSeconds: {}",
            describe_uses(uses)
        ));
    }
    Fence::Wait(uses.iter().map(|u| u.pod.clone()).collect())
}

/// What to do with a recorded workload at the end of the restore, given its replicas now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleBack {
    /// Scale it to this many replicas.
    To(i32),
    /// Leave it: someone scaled it since (to the count it has now), or it is back already.
    Leave,
}

/// A workload still at zero goes back to its recorded count; one scaled by someone else since is
/// left as it is.
pub fn scale_back(recorded: &ScaledWorkload, current: i32) -> ScaleBack {
    if recorded.restored || current != 0 || recorded.replicas == 0 {
        ScaleBack::Leave
    } else {
        ScaleBack::To(recorded.replicas)
    }
}

/// What a recreated claim keeps of the claim it replaces. Stored on the old PV
/// ([`PRE_RESTORE_CLAIM_ANNOTATION`]) before that claim is deleted.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimTemplate {
    pub name: String,
    /// The old claim's uid: a claim of this name with another uid is not the old one.
    pub uid: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub access_modes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<VolumeResourceRequirements>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// The template of a claim (None when it has no uid, which a stored claim always has).
pub fn claim_template(claim: &PersistentVolumeClaim) -> Option<ClaimTemplate> {
    let spec = claim.spec.clone().unwrap_or_default();
    let annotations = claim
        .annotations()
        .iter()
        .filter(|(k, _)| !BINDING_ANNOTATIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Some(ClaimTemplate {
        name: claim.name_any(),
        uid: claim.metadata.uid.clone()?,
        labels: claim.labels().clone(),
        annotations,
        access_modes: spec.access_modes.unwrap_or_default(),
        resources: spec.resources,
        volume_mode: spec.volume_mode,
        storage_class_name: spec.storage_class_name,
    })
}

/// The claim that replaces the template's: same name, labels, annotations (plus `provenance`),
/// access modes, resources, volume mode and class, with `spec.volumeName` = `volume` so that no
/// other PV can bind it.
pub fn recreated_claim(
    template: &ClaimTemplate,
    volume: &str,
    provenance: &BTreeMap<String, String>,
) -> PersistentVolumeClaim {
    let mut annotations = template.annotations.clone();
    annotations.extend(provenance.iter().map(|(k, v)| (k.clone(), v.clone())));
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(template.name.clone()),
            labels: (!template.labels.is_empty()).then(|| template.labels.clone()),
            annotations: (!annotations.is_empty()).then_some(annotations),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(template.access_modes.clone()),
            resources: template.resources.clone(),
            volume_mode: template.volume_mode.clone(),
            storage_class_name: template.storage_class_name.clone(),
            volume_name: Some(volume.to_string()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The template an old PV carries, if it was marked (and the annotation parses).
pub fn template_of(volume: &CachedVolume) -> Option<ClaimTemplate> {
    serde_json::from_str(volume.annotations().get(PRE_RESTORE_CLAIM_ANNOTATION)?).ok()
}

/// Whether the old PV is marked as this restore's undo point: reclaim Retain, the label naming
/// `restore`, and the claim template.
pub fn is_marked(volume: &CachedVolume, restore: &str) -> bool {
    let retain = volume
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Retain");
    retain
        && volume.labels().get(PRE_RESTORE_LABEL).map(String::as_str) == Some(restore)
        && template_of(volume).is_some()
}

/// Where one member's claim stands in the swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimState {
    /// The old claim (uid of the template), still there: delete it.
    Old,
    /// The old claim is being deleted (pvc-protection waits for pods that still use it).
    Deleting,
    /// No claim of that name: recreate it.
    Gone,
    /// The recreated claim (another uid, `volumeName` = the clone's PV), with its uid and whether
    /// it is Bound.
    Recreated { uid: String, bound: bool },
    /// A claim of that name that is neither the old one nor ours: someone else made it.
    Foreign(String),
}

/// Classifies the claim now under the template's name.
pub fn claim_state(
    template: &ClaimTemplate,
    current: Option<&PersistentVolumeClaim>,
    new_volume: &str,
) -> ClaimState {
    let Some(claim) = current else {
        return ClaimState::Gone;
    };
    let uid = claim.metadata.uid.clone().unwrap_or_default();
    if uid == template.uid {
        return if claim.metadata.deletion_timestamp.is_some() {
            ClaimState::Deleting
        } else {
            ClaimState::Old
        };
    }
    let volume_name = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
    if volume_name == Some(new_volume) {
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        return ClaimState::Recreated { uid, bound };
    }
    ClaimState::Foreign(format!(
        "a claim {} (uid {uid}) was created by someone else after the old one was deleted, bound to {}; the clone PV {new_volume} is kept for it",
        template.name,
        volume_name.unwrap_or("no PV")
    ))
}

/// In words, where a member stands, for the status message after the swap started.
pub fn explain(template: &ClaimTemplate, state: &ClaimState, old_pv: &str, new_pv: &str) -> String {
    let claim = &template.name;
    match state {
        ClaimState::Old => format!("claim {claim} is still on its old PV {old_pv} (kept, Retain)"),
        ClaimState::Deleting => format!(
            "claim {claim} is being deleted (a pod may still use it); its old PV {old_pv} is kept"
        ),
        ClaimState::Gone => format!(
            "claim {claim} is deleted and not yet recreated; its old PV {old_pv} is kept (Retain, label {PRE_RESTORE_LABEL}) and the clone is PV {new_pv}"
        ),
        ClaimState::Recreated { bound: true, .. } => {
            format!("claim {claim} is Bound to the clone PV {new_pv}")
        }
        ClaimState::Recreated { bound: false, .. } => format!(
            "claim {claim} is recreated and waits to bind to the clone PV {new_pv}; its old PV {old_pv} is kept"
        ),
        ClaimState::Foreign(why) => why.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn member(claim: &str, pv: &str, capacity: &str) -> MemberSnapshot {
        MemberSnapshot {
            claim: claim.into(),
            persistent_volume: pv.into(),
            node: "n1".into(),
            capacity: Some(Quantity(capacity.into())),
            volume_mode: Some("Filesystem".into()),
            ..Default::default()
        }
    }

    fn pvc(
        name: &str,
        uid: &str,
        volume: Option<&str>,
        phase: &str,
        request: &str,
    ) -> PersistentVolumeClaim {
        let mut spec = json!({"accessModes": ["ReadWriteOnce"], "storageClassName": "",
            "resources": {"requests": {"storage": request}}});
        if let Some(v) = volume {
            spec["volumeName"] = json!(v);
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid,
                "labels": {"app": "db"},
                "annotations": {"pv.kubernetes.io/bind-completed": "yes", "team": "orders"}},
            "spec": spec,
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn pv(name: &str, claim: &str, uid: &str) -> CachedVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"capacity": {"storage": "1Gi"}, "persistentVolumeReclaimPolicy": "Delete",
                "claimRef": {"namespace": "shop", "name": claim, "uid": uid}}
        }))
        .unwrap()
    }

    fn check(
        members: &[MemberSnapshot],
        claims: &[PersistentVolumeClaim],
        volumes: &[CachedVolume],
    ) -> Vec<String> {
        let claims = claims.iter().map(|c| (c.name_any(), c)).collect();
        let volumes = volumes.iter().map(|v| (v.name_any(), v)).collect();
        preflight(members, &claims, &volumes)
    }

    #[test]
    fn preflight_table() {
        let m = [member("data", "pv-a", "1Gi")];
        let good_claim = pvc("data", "u1", Some("pv-a"), "Bound", "1Gi");
        let good_pv = pv("pv-a", "data", "u1");
        let mut deleting = good_claim.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        let mut marked = good_pv.clone();
        marked.metadata.labels = Some([(PRE_RESTORE_LABEL.to_string(), "r0".to_string())].into());
        let mut block = good_claim.clone();
        block.spec.as_mut().unwrap().volume_mode = Some("Block".into());
        #[allow(clippy::type_complexity)]
        let table: Vec<(
            &str,
            Vec<PersistentVolumeClaim>,
            Vec<CachedVolume>,
            Option<&str>,
        )> = vec![
            (
                "all good",
                vec![good_claim.clone()],
                vec![good_pv.clone()],
                None,
            ),
            (
                "claim missing",
                vec![],
                vec![good_pv.clone()],
                Some("claim data does not exist any more"),
            ),
            (
                "claim deleting",
                vec![deleting],
                vec![good_pv.clone()],
                Some("is being deleted"),
            ),
            (
                "rebound to another PV",
                vec![pvc("data", "u1", Some("pv-b"), "Bound", "1Gi")],
                vec![good_pv.clone()],
                Some("claim data is bound to PV pv-b, not to PV pv-a"),
            ),
            (
                "unbound",
                vec![pvc("data", "u1", None, "Pending", "1Gi")],
                vec![good_pv.clone()],
                Some("bound to no PV, not to PV pv-a"),
            ),
            (
                "claim Lost",
                vec![pvc("data", "u1", Some("pv-a"), "Lost", "1Gi")],
                vec![good_pv.clone()],
                Some("claim data is Lost, not Bound"),
            ),
            (
                "PV gone",
                vec![good_claim.clone()],
                vec![],
                Some("PV pv-a of claim data does not exist"),
            ),
            (
                "PV bound to a recreated claim of that name",
                vec![good_claim.clone()],
                vec![pv("pv-a", "data", "u-other")],
                Some("not bound back to claim data"),
            ),
            (
                "PV is another restore's undo point",
                vec![good_claim.clone()],
                vec![marked],
                Some("undo point of another restore"),
            ),
            (
                "claim expanded since the snapshot",
                vec![pvc("data", "u1", Some("pv-a"), "Bound", "2Gi")],
                vec![good_pv.clone()],
                Some("requests 2Gi, more than the snapshot's 1Gi"),
            ),
            (
                "smaller request in other units fits",
                vec![pvc("data", "u1", Some("pv-a"), "Bound", "1000M")],
                vec![good_pv.clone()],
                None,
            ),
            (
                "volume mode changed",
                vec![block],
                vec![good_pv.clone()],
                Some("volume mode Block"),
            ),
        ];
        for (what, claims, volumes, expected) in table {
            let problems = check(&m, &claims, &volumes);
            match expected {
                None => assert!(problems.is_empty(), "{what}: {problems:?}"),
                Some(text) => {
                    assert_eq!(problems.len(), 1, "{what}: {problems:?}");
                    assert!(problems[0].contains(text), "{what}: {problems:?}");
                }
            }
        }
        // Every member is checked; the problems of all are listed.
        let two = [member("data", "pv-a", "1Gi"), member("wal", "pv-w", "1Gi")];
        let problems = check(&two, &[], &[]);
        assert_eq!(problems.len(), 2, "{problems:?}");
    }

    fn pod(name: &str, claims: &[&str], phase: &str, owner: Option<(&str, &str)>) -> Pod {
        let volumes: Vec<_> = claims
            .iter()
            .enumerate()
            .map(|(i, c)| json!({"name": format!("v{i}"), "persistentVolumeClaim": {"claimName": c}}))
            .chain([json!({"name": "scratch", "emptyDir": {}})])
            .collect();
        let owners: Vec<_> = owner
            .into_iter()
            .map(|(kind, name)| json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "x", "controller": true}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "ownerReferences": owners},
            "spec": {"containers": [{"name": "c"}], "volumes": volumes},
            "status": {"phase": phase}
        }))
        .unwrap()
    }

    fn rs(name: &str, owner: Option<(&str, &str)>) -> ReplicaSet {
        let owners: Vec<_> = owner
            .into_iter()
            .map(|(kind, name)| json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": "x", "controller": true}))
            .collect();
        serde_json::from_value(json!({"metadata": {"name": name, "ownerReferences": owners}}))
            .unwrap()
    }

    #[test]
    fn which_pods_use_the_claims() {
        let claims: BTreeSet<String> = ["data".to_string(), "wal".to_string()].into();
        let pods = [
            pod("web-1", &["other"], "Running", None),
            pod(
                "db-0",
                &["wal", "data", "other"],
                "Running",
                Some(("StatefulSet", "db")),
            ),
            pod("job-1", &["data"], "Succeeded", Some(("Job", "j"))),
            pod("job-2", &["data"], "Failed", None),
            pod("pending", &["data"], "Pending", None),
            pod("no-phase", &["wal"], "", None),
        ];
        let uses = pods_using(&pods, &claims);
        let names: Vec<&str> = uses.iter().map(|u| u.pod.as_str()).collect();
        assert_eq!(names, ["db-0", "no-phase", "pending"]);
        // Being deleted: on a node it may still hold the mount whatever its phase; never
        // scheduled, an ended pod holds nothing.
        let deleting = |name: &str, phase: &str, node: Option<&str>| {
            let mut p = pod(name, &["data"], phase, None);
            p.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
            p.spec.as_mut().unwrap().node_name = node.map(String::from);
            p
        };
        let pods = [
            deleting("failed-on-node", "Failed", Some("n1")),
            deleting("failed-unscheduled", "Failed", None),
            deleting("running-on-node", "Running", Some("n1")),
            deleting("succeeded-on-node", "Succeeded", Some("n1")),
        ];
        let names: Vec<String> = pods_using(&pods, &claims)
            .into_iter()
            .map(|u| u.pod)
            .collect();
        assert_eq!(
            names,
            ["failed-on-node", "running-on-node", "succeeded-on-node"]
        );
        assert_eq!(uses[0].claims, ["data", "wal"]);
        assert_eq!(uses[0].owner, Some(("StatefulSet".into(), "db".into())));
        assert!(describe_uses(&uses).contains("db-0 (claims data, wal)"));
    }

    #[test]
    fn owners_table() {
        let web = rs("web-7d9", Some(("Deployment", "web")));
        let loose = rs("loose", None);
        let sets: BTreeMap<String, &ReplicaSet> =
            [("web-7d9".to_string(), &web), ("loose".to_string(), &loose)].into();
        let use_of = |pod: &str, owner: Option<(&str, &str)>| PodUse {
            pod: pod.into(),
            claims: vec!["data".into()],
            owner: owner.map(|(k, n)| (k.to_string(), n.to_string())),
        };
        let ok = owners(
            &[
                use_of("web-7d9-a", Some(("ReplicaSet", "web-7d9"))),
                use_of("web-7d9-b", Some(("ReplicaSet", "web-7d9"))),
                use_of("db-0", Some(("StatefulSet", "db"))),
            ],
            &sets,
        )
        .unwrap();
        assert_eq!(
            ok,
            [
                ("Deployment".to_string(), "web".to_string()),
                ("StatefulSet".to_string(), "db".to_string())
            ]
            .into()
        );
        for (what, owner, expected) in [
            ("bare pod", None, "pod p has no owner"),
            (
                "daemonset",
                Some(("DaemonSet", "ds")),
                "pod p belongs to DaemonSet ds",
            ),
            ("job", Some(("Job", "j")), "pod p belongs to Job j"),
            (
                "replicaset without deployment",
                Some(("ReplicaSet", "loose")),
                "no Deployment owns",
            ),
            (
                "replicaset missing",
                Some(("ReplicaSet", "gone")),
                "does not exist",
            ),
        ] {
            let why = owners(
                &[
                    use_of("db-0", Some(("StatefulSet", "db"))),
                    use_of("p", owner),
                ],
                &sets,
            )
            .expect_err(what);
            assert!(why.contains(expected), "{what}: {why}");
            assert!(
                why.contains("only Deployments and StatefulSets"),
                "{what}: {why}"
            );
        }
    }

    #[test]
    fn fence_table() {
        let uses = vec![PodUse {
            pod: "db-0".into(),
            claims: vec!["data".into()],
            owner: Some(("StatefulSet".into(), "db".into())),
        }];
        let db: BTreeSet<Workload> = [("StatefulSet".to_string(), "db".to_string())].into();
        let recorded = vec![ScaledWorkload {
            kind: "StatefulSet".into(),
            name: "db".into(),
            replicas: 3,
            restored: false,
        }];
        use WorkloadPolicy::{Refuse, ScaleDown};
        assert_eq!(fence(Refuse, &[], Ok(db.clone()), &[], false), Fence::Clear);
        assert_eq!(
            fence(ScaleDown, &[], Ok(db.clone()), &recorded, true),
            Fence::Clear
        );
        match fence(Refuse, &uses, Ok(db.clone()), &[], false) {
            Fence::Refuse(why) => assert!(
                why.contains("db-0 (claims data)") && why.contains("ScaleDown"),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            fence(
                ScaleDown,
                &uses,
                Err("pod x has no owner".into()),
                &[],
                false
            ),
            Fence::Refuse("pod x has no owner".into())
        );
        assert_eq!(
            fence(ScaleDown, &uses, Ok(db.clone()), &[], false),
            Fence::ScaleDown(vec![("StatefulSet".into(), "db".into())])
        );
        assert_eq!(
            fence(ScaleDown, &uses, Ok(db.clone()), &recorded, false),
            Fence::Wait(vec!["db-0".into()])
        );
        // A new owner seen while waiting is recorded too, even after the timeout.
        let both: BTreeSet<Workload> = [
            ("StatefulSet".to_string(), "db".to_string()),
            ("Deployment".to_string(), "web".to_string()),
        ]
        .into();
        assert_eq!(
            fence(ScaleDown, &uses, Ok(both), &recorded, true),
            Fence::ScaleDown(vec![("Deployment".into(), "web".into())])
        );
        match fence(ScaleDown, &uses, Ok(db), &recorded, true) {
            Fence::TimedOut(why) => assert!(why.contains("db-0"), "{why}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn scale_back_table() {
        let w = |replicas, restored| ScaledWorkload {
            kind: "Deployment".into(),
            name: "web".into(),
            replicas,
            restored,
        };
        assert_eq!(scale_back(&w(3, false), 0), ScaleBack::To(3));
        assert_eq!(scale_back(&w(3, false), 2), ScaleBack::Leave);
        assert_eq!(scale_back(&w(3, true), 0), ScaleBack::Leave);
        assert_eq!(scale_back(&w(0, false), 0), ScaleBack::Leave);
    }

    #[test]
    fn recreated_claim_keeps_metadata_and_spec() {
        let mut old = pvc("data", "u1", Some("pv-a"), "Bound", "1Gi");
        old.spec.as_mut().unwrap().volume_mode = Some("Filesystem".into());
        old.spec.as_mut().unwrap().selector = Some(Default::default());
        let template = claim_template(&old).unwrap();
        // Through JSON, as it is stored on the old PV.
        let template: ClaimTemplate =
            serde_json::from_str(&serde_json::to_string(&template).unwrap()).unwrap();
        assert_eq!(template.uid, "u1");
        let provenance = [(
            "tandem.dev/restored-from".to_string(),
            "shop/snap".to_string(),
        )]
        .into();
        let new = recreated_claim(&template, "tandem-0123456789", &provenance);
        assert_eq!(new.name_any(), "data");
        assert_eq!(new.labels(), old.labels());
        let annotations = new.annotations();
        assert_eq!(annotations.get("team").map(String::as_str), Some("orders"));
        assert_eq!(
            annotations
                .get("tandem.dev/restored-from")
                .map(String::as_str),
            Some("shop/snap")
        );
        assert!(!annotations.contains_key("pv.kubernetes.io/bind-completed"));
        let spec = new.spec.unwrap();
        let old_spec = old.spec.unwrap();
        assert_eq!(spec.access_modes, old_spec.access_modes);
        assert_eq!(spec.resources, old_spec.resources);
        assert_eq!(spec.volume_mode, old_spec.volume_mode);
        assert_eq!(spec.storage_class_name, Some(String::new()));
        assert_eq!(spec.volume_name.as_deref(), Some("tandem-0123456789"));
        assert!(spec.selector.is_none() && spec.data_source.is_none());
        assert!(new.metadata.uid.is_none() && new.metadata.resource_version.is_none());
    }

    #[test]
    fn marked_and_claim_states() {
        let old = pvc("data", "u1", Some("pv-a"), "Bound", "1Gi");
        let template = claim_template(&old).unwrap();
        let mut volume = pv("pv-a", "data", "u1");
        assert!(!is_marked(&volume, "r1"));
        volume
            .spec
            .as_mut()
            .unwrap()
            .persistent_volume_reclaim_policy = Some("Retain".into());
        volume.metadata.labels = Some([(PRE_RESTORE_LABEL.to_string(), "r1".to_string())].into());
        assert!(!is_marked(&volume, "r1"), "no template yet");
        volume.metadata.annotations = Some(
            [(
                PRE_RESTORE_CLAIM_ANNOTATION.to_string(),
                serde_json::to_string(&template).unwrap(),
            )]
            .into(),
        );
        assert!(is_marked(&volume, "r1"));
        assert!(!is_marked(&volume, "r2"));
        assert_eq!(template_of(&volume), Some(template.clone()));

        let new_pv = "tandem-aa";
        assert_eq!(claim_state(&template, None, new_pv), ClaimState::Gone);
        assert_eq!(claim_state(&template, Some(&old), new_pv), ClaimState::Old);
        let mut deleting = old.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert_eq!(
            claim_state(&template, Some(&deleting), new_pv),
            ClaimState::Deleting
        );
        let ours = pvc("data", "u2", Some(new_pv), "Pending", "1Gi");
        assert_eq!(
            claim_state(&template, Some(&ours), new_pv),
            ClaimState::Recreated {
                uid: "u2".into(),
                bound: false
            }
        );
        let bound = pvc("data", "u2", Some(new_pv), "Bound", "1Gi");
        assert_eq!(
            claim_state(&template, Some(&bound), new_pv),
            ClaimState::Recreated {
                uid: "u2".into(),
                bound: true
            }
        );
        let foreign = pvc("data", "u3", Some("pv-z"), "Bound", "1Gi");
        let state = claim_state(&template, Some(&foreign), new_pv);
        assert!(
            matches!(&state, ClaimState::Foreign(why) if why.contains("someone else")),
            "{state:?}"
        );
        let gone = explain(&template, &ClaimState::Gone, "pv-a", new_pv);
        assert!(
            gone.contains("pv-a") && gone.contains(new_pv) && gone.contains("Retain"),
            "{gone}"
        );
    }
}
