use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{DeletionPolicy, FreezePolicy};

/// The largest freeze window an agent may report: far above any bounded freeze (the timeout is at
/// most 300 s), small enough that no arithmetic on it can overflow.
pub const MAX_FREEZE_WINDOW_MILLIS: i64 = 86_400_000;
/// The largest snapshot size an agent may report (1 EiB).
pub const MAX_SNAPSHOT_BYTES: i64 = 1 << 60;
/// Times an agent reports stay far from the end of the calendar, so no arithmetic on them overflows.
const BEFORE_YEAR_9000: &str = "self < timestamp('9000-01-01T00:00:00Z')";
/// The largest generation an agent may report (2^53: exact in every JSON number).
pub const MAX_GENERATION: i64 = 1 << 53;

/// The controller's request to one node's agent: freeze, cut and thaw these volumes.
///
/// Internal: the controller creates one per node per GroupSnapshot (owned by it) and the agent of
/// `spec.nodeName` acts on it and reports in its status. `kubectl get nsnap` shows where a group
/// snapshot is stuck.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "NodeSnapshot",
    namespaced,
    shortname = "nsnap",
    category = "tandem",
    status = "NodeSnapshotStatus",
    doc = "One node's part of a GroupSnapshot: the channel between the tandem controller and a node's agent.",
    selectable = ".spec.nodeName",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "GroupSnapshot",
        type_ = "string",
        json_path = ".spec.groupSnapshot"
    ),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Freeze-ms",
        type_ = "integer",
        json_path = ".status.freezeWindowMillis"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeSnapshotSpec {
    /// The node whose agent acts on this object. Cannot be changed.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.nodeName is immutable"))]
    pub node_name: String,

    /// The GroupSnapshot this is part of (in the same namespace); a DNS label, as the agent puts it
    /// into snapshot names.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub group_snapshot: String,

    /// What the controller wants now: `Cut` (freeze and snapshot), `Release` (thaw and keep the
    /// snapshots) or `Abort` (thaw and delete the snapshots).
    #[serde(default)]
    pub action: NodeAction,

    /// Whether the agent may thaw as soon as its own cut is done (the whole group is on this node).
    #[serde(default)]
    pub release_after_cut: bool,

    /// Every node of the GroupSnapshot, this one included, when it spans several. An agent that
    /// holds its cut releases itself (thaws, keeps the snapshots) as soon as the NodeSnapshots of
    /// all of them show `Cut` or `Released` under the same GroupSnapshot, without waiting for the
    /// controller's `Release`: every member is frozen and cut by then, and the controller's hop
    /// is the slowest part of a cross-node freeze. Empty: wait for `Release`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 512))]
    pub group_nodes: Vec<String>,

    /// Freeze policy copied from the group when the snapshot started.
    #[serde(default)]
    pub freeze: FreezePolicy,

    /// The longest, in seconds, any filesystem may stay frozen; the agent enforces it on its own clock.
    #[schemars(range(min = 1, max = 300))]
    pub freeze_timeout_seconds: i32,

    /// What happens to the snapshots when this object is deleted.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// The volumes of this node to snapshot (at most 512, like a group's members).
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub volumes: Vec<NodeVolume>,
}

impl NodeSnapshot {
    /// The uid of the GroupSnapshot that controls this object (its controller owner reference).
    pub fn group_snapshot_uid(&self) -> Option<&str> {
        self.metadata
            .owner_references
            .iter()
            .flatten()
            .find(|o| o.kind == "GroupSnapshot" && o.controller == Some(true))
            .map(|o| o.uid.as_str())
    }
}

/// What the controller asks of an agent.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum NodeAction {
    /// Freeze the volumes, cut their snapshots and hold the freeze.
    #[default]
    Cut,
    /// Check every volume and flush its filesystem, freezing nothing, then report `Prepared`: a
    /// group on several nodes prepares everywhere first, so that every node freezes on one
    /// `Cut` with little left to flush.
    Prepare,
    /// Thaw and keep the snapshots.
    Release,
    /// Thaw and delete the snapshots.
    Abort,
}

/// A volume an agent is asked to snapshot.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeVolume {
    /// The PersistentVolumeClaim (in this object's namespace).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub claim: String,
    /// The PersistentVolume bound to it.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub persistent_volume: String,
    /// Freeze only: the volume is an RBD image whose snapshot is the controller's RBD group
    /// snapshot, taken while every node holds its freeze. The agent refuses it unless its device is
    /// a krbd mapping of an image, and refuses a krbd device not marked so.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub central: bool,
}

/// Where a node's part stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum NodePhase {
    /// The agent has not acted yet.
    #[default]
    Pending,
    /// Every volume checked and flushed; nothing is frozen. Waiting for `Cut`.
    Prepared,
    /// The volumes are frozen and their snapshots cut; the freeze is held until `Release`.
    Cut,
    /// The volumes are thawed and the snapshots kept.
    Released,
    /// The volumes are thawed and the snapshots deleted (asked, failed or timed out).
    Aborted,
    /// The agent could not do what was asked; see `message`.
    Failed,
}

/// What an agent did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSnapshotStatus {
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_GENERATION))]
    pub observed_generation: Option<i64>,
    /// Where this node's part stands.
    #[serde(default)]
    pub phase: NodePhase,
    /// Per volume: device, backend, freeze and snapshot.
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub volumes: Vec<VolumeStatus>,
    /// When the node's first freeze began (microseconds: windows across nodes are computed from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(BEFORE_YEAR_9000).message("status.freezeStart must be before the year 9000"))]
    pub freeze_start: Option<MicroTime>,
    /// From the node's first freeze to its last thaw, in milliseconds (monotonic clock; at most a day).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_FREEZE_WINDOW_MILLIS))]
    pub freeze_window_millis: Option<i64>,
    /// What went wrong, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Ready` and its reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One volume as the agent found and snapshotted it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct VolumeStatus {
    /// The PersistentVolumeClaim.
    pub claim: String,
    /// The block device under the volume, as the node's mount table shows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// The filesystem type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// The snapshot backend chosen from what the device is (`reflink`, `lvm-thin`, `lvm-thick`, `btrfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// Whether the filesystem was frozen while the snapshot was cut.
    #[serde(default)]
    pub frozen: bool,
    /// Why the volume was not frozen or not snapshotted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The backend's handle of the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_handle: Option<String>,
    /// The snapshot's size in bytes (at most 1 EiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SNAPSHOT_BYTES))]
    pub size_bytes: Option<i64>,
    /// When the snapshot was cut.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new(BEFORE_YEAR_9000).message("cutTime must be before the year 9000"))]
    pub cut_time: Option<Time>,
}
