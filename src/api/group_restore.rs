use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::Consistency;

/// The provisioner name of tandem's restore StorageClass: PVs that carry it in
/// `pv.kubernetes.io/provisioned-by` are deleted by tandem (the external deleter), never by the
/// PV controller.
pub const RESTORE_PROVISIONER: &str = "tandem.dev/restore";
/// The StorageClass restored claims use unless the controller is told otherwise.
pub const DEFAULT_RESTORE_STORAGE_CLASS: &str = "tandem-restore";
/// Annotation on every restored claim and PV: `<namespace>/<GroupSnapshot>` it came from.
pub const RESTORED_FROM_ANNOTATION: &str = "tandem.dev/restored-from";
/// Annotation on every restored claim and PV: when the member snapshot was cut (RFC 3339).
pub const CUT_TIME_ANNOTATION: &str = "tandem.dev/cut-time";
/// Annotation on every restored claim and PV: the consistency the GroupSnapshot reached.
pub const CONSISTENCY_ANNOTATION: &str = "tandem.dev/consistency";
/// Label on every restored claim and PV (and NodeRestore): the GroupRestore that made it.
pub const GROUP_RESTORE_LABEL: &str = "tandem.dev/group-restore";
/// Label on a PV that InPlace replaced: kept (reclaim Retain) as the undo point of that restore.
pub const PRE_RESTORE_LABEL: &str = "tandem.dev/pre-restore";
/// The default claim name template of NewClaims.
pub const DEFAULT_NAME_TEMPLATE: &str = "{claim}-{restore}";

/// A GroupSnapshot restored as a set of claims: to new claims, or in place of the group's own.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "GroupRestore",
    namespaced,
    shortname = "grestore",
    category = "tandem",
    status = "GroupRestoreStatus",
    doc = "Restores every member of a GroupSnapshot together: no claim binds until every member is cloned.",
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
    printcolumn(name = "Snapshot", type_ = "string", json_path = ".spec.source.groupSnapshotName"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Consistency", type_ = "string", json_path = ".status.consistency"),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'InPlace' || !has(self.newClaims)").message("spec.newClaims applies to mode NewClaims only"))]
#[x_kube(validation = Rule::new("self.mode != 'NewClaims' || !has(self.inPlace)").message("spec.inPlace applies to mode InPlace only"))]
pub struct GroupRestoreSpec {
    /// The GroupSnapshot to restore. Cannot be changed.
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.source is immutable: create another GroupRestore to restore another snapshot"))]
    pub source: RestoreSource,

    /// `NewClaims` (default): one new claim per member, the group's own claims untouched.
    /// `InPlace`: the group's own claims go back to the snapshot. Cannot be changed.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.mode is immutable"))]
    pub mode: RestoreMode,

    /// How the new claims are named and labelled (mode NewClaims).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_claims: Option<NewClaimsSpec>,

    /// What to do about the pods that use the claims (mode InPlace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_place: Option<InPlaceSpec>,

    /// The longest, in seconds, the restore may take before it is rolled back (every clone made is
    /// removed and no claim is bound). Default 900; thick LVM members are full copies and may need more.
    #[serde(default = "default_deadline_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub deadline_seconds: i32,
}

fn default_deadline_seconds() -> i32 {
    900
}

/// Which snapshot to restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSource {
    /// The GroupSnapshot, in this namespace. It must be Ready.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub group_snapshot_name: String,
    /// The GroupSnapshot's namespace, if given: it must be this GroupRestore's own (a restore across
    /// namespaces is refused; it would hand one namespace's data to another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: Option<String>,
}

/// How a GroupRestore restores.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum RestoreMode {
    /// One new claim per member, bound to a new volume holding the member's snapshot.
    #[default]
    NewClaims,
    /// The group's own claims are replaced, under the same names, by claims of the snapshot; the
    /// replaced volumes are kept (reclaim Retain, label `tandem.dev/pre-restore`) as an undo point.
    InPlace,
}

/// The new claims of a NewClaims restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NewClaimsSpec {
    /// Name of each new claim: `{claim}` is the member's claim, `{restore}` this GroupRestore,
    /// `{snapshot}` the GroupSnapshot. Default `{claim}-{restore}`. Ignored for members named in `claims`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub name_template: Option<String>,

    /// Explicit names; when given, only these members are restored (the others are left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub claims: Vec<ClaimMapping>,

    /// Labels added to every new claim.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,

    /// Whether tandem creates the claims (default true). With `false`, the claims are created by
    /// you (or GitOps), each in StorageClass `tandem-restore` with `dataSourceRef`
    /// `{apiGroup: tandem.dev, kind: GroupRestore, name: <this>}`; tandem fills them.
    #[serde(default = "default_true")]
    pub create_claims: bool,
}

fn default_true() -> bool {
    true
}

/// One member restored under a name of your choosing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimMapping {
    /// The member's claim, as the GroupSnapshot recorded it.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub from: String,
    /// The new claim's name.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub to: String,
}

/// An InPlace restore's treatment of the pods that use the claims.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct InPlaceSpec {
    /// `Refuse` (default): the restore fails while any pod uses a member claim. `ScaleDown`: the
    /// Deployments and StatefulSets owning those pods are scaled to zero, and back to their recorded
    /// replica counts once the claims are restored (or the restore failed).
    #[serde(default)]
    pub workloads: WorkloadPolicy,
    /// How long to wait, in seconds, for the pods to go after a scale-down. Default 300.
    #[serde(default = "default_workload_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub workload_timeout_seconds: i32,
}

fn default_workload_timeout_seconds() -> i32 {
    300
}

/// What an InPlace restore does about pods using the claims.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum WorkloadPolicy {
    /// Fail while any pod uses a member claim.
    #[default]
    Refuse,
    /// Scale the owners to zero, restore, scale them back.
    ScaleDown,
}

/// Where a restore stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum RestorePhase {
    /// Being checked (nothing touched yet).
    #[default]
    Pending,
    /// InPlace: waiting for the pods that use the claims to stop.
    Fencing,
    /// The nodes are cloning the member snapshots.
    Cloning,
    /// Every member is cloned; the claims are being bound to the clones.
    Binding,
    /// Every claim is Bound to a clone of its member snapshot.
    Completed,
    /// The restore failed or was refused; every clone made was removed and no claim is bound to one.
    Failed,
}

/// How a member was restored.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum CloneMethod {
    /// A copy-on-write clone of the snapshot (reflink, lvm-thin, btrfs): cheap, whatever the size.
    #[default]
    Clone,
    /// A full copy of the snapshot (lvm-thick): takes time in proportion to the size.
    Copy,
}

/// What a restore did and reached.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupRestoreStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Where the restore stands.
    #[serde(default)]
    pub phase: RestorePhase,
    /// The uid of the GroupSnapshot restored, recorded at the start: a GroupSnapshot recreated
    /// under the same name is not the one this restore started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_snapshot_uid: Option<String>,
    /// The consistency the GroupSnapshot reached (also annotated on each restored claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,
    /// Per member: source claim, new claim, volume, node, method.
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub members: Vec<RestoredMember>,
    /// How many members are restored.
    #[serde(default)]
    pub member_count: i32,
    /// InPlace: the workloads scaled down, with the replica counts they had.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<ScaledWorkload>,
    /// InPlace: the volumes the claims had before, kept (reclaim Retain) as the undo point.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pre_restore: Vec<PreRestoreVolume>,
    /// When the restore started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the restore Completed or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// What went wrong, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The group's post-restore hooks (ConsistencyGroup `spec.quiesce.postRestore`), one run per
    /// hook and pod, run once the restored claims are used by Running and Ready pods; the
    /// condition `PostRestoreHooks` says where they stand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub post_restore_hooks: Vec<super::HookRun>,
    /// `Ready` and its reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One member of a restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoredMember {
    /// The member's claim in the GroupSnapshot.
    pub source_claim: String,
    /// The restored claim.
    pub claim: String,
    /// The PersistentVolume tandem made for the clone.
    pub persistent_volume: String,
    /// The node the member snapshot, and so the clone, is on.
    pub node: String,
    /// `Clone` (copy-on-write) or `Copy` (full copy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<CloneMethod>,
    /// The snapshot backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The volume's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// For a `Copy`: how much is copied so far, in percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub progress_percent: Option<i32>,
    /// When the clone was ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_at: Option<Time>,
    /// What happened to this member, if anything went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A workload an InPlace restore scaled down.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScaledWorkload {
    /// `Deployment` or `StatefulSet`.
    pub kind: String,
    /// Its name, in this namespace.
    pub name: String,
    /// The replicas it had, restored after the restore.
    pub replicas: i32,
    /// Whether it has been scaled back.
    #[serde(default)]
    pub restored: bool,
}

/// A volume an InPlace restore replaced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PreRestoreVolume {
    /// The claim it was bound to.
    pub claim: String,
    /// The kept PersistentVolume (reclaim Retain, label `tandem.dev/pre-restore`).
    pub persistent_volume: String,
}
