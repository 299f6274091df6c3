use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{Consistency, HookRun, HooksPolicy};

/// A point-in-time snapshot of every member of a ConsistencyGroup.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "GroupSnapshot",
    namespaced,
    shortname = "gsnap",
    category = "tandem",
    status = "GroupSnapshotStatus",
    doc = "A crash-consistent snapshot of every member of a ConsistencyGroup.",
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.groupName"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Consistency", type_ = "string", json_path = ".status.consistency"),
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.memberCount"),
    printcolumn(name = "Freeze-ms", type_ = "integer", description = "Overall freeze window: first freeze to last thaw", json_path = ".status.freezeWindowMillis"),
    printcolumn(name = "Quiesce-ms", type_ = "integer", priority = 1, description = "Quiesce window: first hold ready to last hold released", json_path = ".status.quiesceWindowMillis"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotSpec {
    /// The ConsistencyGroup (in this namespace) to snapshot. Cannot be changed.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.groupName is immutable"))]
    pub group_name: String,

    /// What happens to the member snapshots when this object is deleted: `Delete` (default) removes
    /// them from their nodes; `Retain` keeps the snapshots of a Ready GroupSnapshot as standalone
    /// NodeSnapshots (counted by `count/nodesnapshots.tandem.dev`; deleting one deletes its
    /// snapshots). Cannot be changed: create the GroupSnapshot with the policy you want.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.deletionPolicy is immutable: it was copied to the member snapshots when they were made"))]
    pub deletion_policy: DeletionPolicy,

    /// `Run` (default): run the group's quiesce hooks around the cut. `Skip`: do not (the
    /// snapshot is at most FilesystemFrozen). Cannot be changed.
    #[serde(default)]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.hooks is immutable"))]
    pub hooks: HooksPolicy,
}

/// What happens to member snapshots when their GroupSnapshot is deleted.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DeletionPolicy {
    /// Remove every member snapshot from its node.
    #[default]
    Delete,
    /// Keep the member snapshots of a Ready snapshot, each node's as a NodeSnapshot of its own.
    Retain,
}

/// Where a group snapshot stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum GroupSnapshotPhase {
    /// Waiting to start (for example behind another snapshot of the same volumes).
    #[default]
    Pending,
    /// Quiesce hooks are running: Pre hooks, then the holds becoming ready.
    Quiescing,
    /// Nodes are freezing and cutting their members.
    Cutting,
    /// Every node has cut; nodes are thawing.
    Releasing,
    /// Every member snapshot exists and every filesystem is thawed.
    Ready,
    /// The snapshot failed; no partial snapshot is left.
    Failed,
    /// The member snapshots are being removed.
    Deleting,
}

/// What a group snapshot recorded and reached.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the snapshot stands.
    #[serde(default)]
    pub phase: GroupSnapshotPhase,

    /// The guarantee reached: `ApplicationQuiesced`, `FilesystemFrozen` or `Independent`. Unset
    /// until Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<Consistency>,

    /// The members recorded when the snapshot started; later changes to the group do not touch it.
    #[serde(default)]
    pub members: Vec<MemberSnapshot>,

    /// How many members the snapshot covers.
    #[serde(default)]
    pub member_count: i32,

    /// Freeze window per node.
    #[serde(default)]
    pub nodes: Vec<NodeFreezeWindow>,

    /// Overall freeze window in milliseconds: from the first freeze on any node to the last thaw.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_millis: Option<i64>,

    /// Every quiesce hook in every pod it ran in, with timings and exit.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub hooks: Vec<HookRun>,

    /// The hooks that failed (`name` or `name/pod`): under `onError: Continue` the snapshot is cut
    /// anyway and these say why it is not ApplicationQuiesced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub failed_hooks: Vec<String>,

    /// The quiesce window in milliseconds: from the first hold ready to the last hold released
    /// (the application's pause; the freeze window is inside it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce_window_millis: Option<i64>,

    /// When the snapshot started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,

    /// When the snapshot became Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,

    /// What went wrong, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The Ceph RBD group snapshot the controller cuts over the group's RBD members while every
    /// node holds its freeze; unset for a group without RBD members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub central: Option<CentralSnapshot>,

    /// `Ready` and its reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// A group snapshot cut in the storage cluster (an RBD group snapshot) over the members frozen on
/// their nodes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CentralSnapshot {
    /// ceph-csi's cluster id (a key of its config map).
    pub cluster_id: String,
    /// The pool of the group and its images.
    pub pool: String,
    /// The RADOS namespace (empty: the pool's default).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub rados_namespace: String,
    /// The RBD group (one per ConsistencyGroup, `tandem-<group uid>`).
    pub group: String,
    /// The RBD group snapshot (`tandem-<GroupSnapshot uid>`: a restart never cuts twice).
    pub snapshot: String,
    /// The member images, by PersistentVolume.
    #[serde(default)]
    pub volumes: Vec<CentralVolume>,
    /// Where the group snapshot stands.
    #[serde(default)]
    pub phase: CentralPhase,
    /// How long the group snapshot call took, in milliseconds (inside every node's freeze).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_millis: Option<i64>,
    /// Why the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// One RBD member of a central snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CentralVolume {
    /// The PersistentVolume.
    pub persistent_volume: String,
    /// Its RBD image.
    pub image: String,
    /// What a restored copy of it needs to be a ceph-csi volume (recorded at the snapshot: the
    /// source PV may be gone when the restore runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CentralVolumeCsi>,
}

/// The parts of a member's ceph-csi PV that a restored copy's static PV repeats.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CentralVolumeCsi {
    /// The CSI driver (`rbd.csi.ceph.com`, or Rook's `<namespace>.rbd.csi.ceph.com`).
    pub driver: String,
    /// The filesystem ceph-csi mounts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fs_type: Option<String>,
    /// The Secret the node plugin maps the image with, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_stage_secret: Option<String>,
    /// The Secret the controller reaches the image with, `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub controller_secret: Option<String>,
    /// The volume attributes that are not the image's own (cluster, pool, features, mounter).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// Where a central snapshot stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum CentralPhase {
    /// Not cut yet (the group is ready in the cluster, the nodes are freezing).
    #[default]
    Pending,
    /// Cut while every node held its freeze.
    Taken,
    /// The call failed; nothing was cut.
    Failed,
    /// Removed again (the group snapshot failed, or it was deleted).
    Removed,
}

/// One member's snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberSnapshot {
    /// The PersistentVolumeClaim.
    pub claim: String,
    /// The PersistentVolume.
    pub persistent_volume: String,
    /// The node the volume lives on.
    pub node: String,
    /// The backend's handle of the snapshot (an image path, an LV, a subvolume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// The snapshot's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Quantity>,
    /// When the snapshot was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cut_time: Option<Time>,
    /// Whether the filesystem was frozen when the snapshot was cut.
    #[serde(default)]
    pub frozen: bool,
    /// Why the member was not frozen, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The NodeSnapshot whose cut holds this member's snapshot (what a restore clones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_snapshot: Option<String>,
    /// The snapshot backend (`reflink`, `lvm-thin`, `lvm-thick`, `btrfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The filesystem in the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// The member volume's capacity when the snapshot started (what a restored claim gets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,
    /// The member volume's mode (`Filesystem` or `Block`); a restore keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// The member claim's access modes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub access_modes: Vec<String>,
    /// The member claim's StorageClass (an InPlace restore recreates the claim in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
}

/// How long one node kept its members frozen.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeFreezeWindow {
    /// The node.
    pub node: String,
    /// From the node's first freeze to its last thaw, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze_window_millis: Option<i64>,
}
