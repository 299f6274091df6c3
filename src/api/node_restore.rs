use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{CloneMethod, MAX_GENERATION, MAX_SNAPSHOT_BYTES};

/// The controller's request to one node's agent: clone these member snapshots into new volumes.
///
/// Internal: the controller creates one per node per GroupRestore and the agent of
/// `spec.nodeName` clones and reports in its status (the NodeSnapshot pattern, under the same
/// per-node admission policy). It outlives a Completed GroupRestore: each clone lives as long as the
/// PersistentVolume made for it, and the object is deleted once every clone is gone.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "NodeRestore",
    namespaced,
    shortname = "nrestore",
    category = "tandem",
    status = "NodeRestoreStatus",
    doc = "One node's part of a GroupRestore: the channel between the tandem controller and a node's agent.",
    selectable = ".spec.nodeName",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.nodeName"),
    printcolumn(
        name = "GroupRestore",
        type_ = "string",
        json_path = ".spec.groupRestore"
    ),
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct NodeRestoreSpec {
    /// The node whose agent acts on this object. Cannot be changed.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    #[x_kube(validation = Rule::new("self == oldSelf").message("spec.nodeName is immutable"))]
    pub node_name: String,

    /// The GroupRestore this is part of (in the same namespace).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub group_restore: String,

    /// `Clone` (make the clones and keep them) or `Abort` (delete every clone: the restore failed).
    #[serde(default)]
    pub action: NodeRestoreAction,

    /// The volumes to make on this node (at most 512).
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub volumes: Vec<RestoreVolume>,
}

/// What the controller asks of an agent.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum NodeRestoreAction {
    /// Clone every volume and keep the clones.
    #[default]
    Clone,
    /// Delete every clone (the restore failed or was rolled back).
    Abort,
}

/// One clone an agent is asked to make.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreVolume {
    /// The PersistentVolume tandem will publish the clone as (the clone's key and name).
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    )]
    pub persistent_volume: String,
    /// The restored claim (in this object's namespace).
    pub claim: String,
    /// The member's claim in the GroupSnapshot.
    pub source_claim: String,
    /// The member's PersistentVolume in the GroupSnapshot.
    pub source_persistent_volume: String,
    /// The NodeSnapshot (this namespace) whose cut made the member snapshot.
    pub node_snapshot: String,
    /// That NodeSnapshot's uid: the agent clones only a snapshot that carries this owner's mark.
    pub node_snapshot_uid: String,
    /// The restored claim was deleted: delete this clone (tandem is the external deleter of its PVs).
    #[serde(default)]
    pub release: bool,
}

/// Where a node's part of a restore stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum NodeRestorePhase {
    /// The agent has not acted yet.
    #[default]
    Pending,
    /// The agent is cloning.
    Cloning,
    /// Every clone exists.
    Cloned,
    /// Every clone was deleted (asked, or the restore failed).
    Aborted,
    /// The agent could not clone; see `message`. Whatever it made was deleted.
    Failed,
}

/// Where one clone stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum CloneState {
    /// Not made yet, or being made.
    #[default]
    Cloning,
    /// Made and published at `path`.
    Cloned,
    /// Deleted (released, aborted or never made).
    Deleted,
    /// Could not be made; see `message`.
    Failed,
}

/// What an agent did.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeRestoreStatus {
    /// The `metadata.generation` the agent last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_GENERATION))]
    pub observed_generation: Option<i64>,
    /// Where this node's part stands.
    #[serde(default)]
    pub phase: NodeRestorePhase,
    /// Per volume: the clone and where it is published.
    #[serde(default)]
    #[schemars(length(max = 512))]
    pub volumes: Vec<ClonedVolume>,
    /// What went wrong, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// `Ready` and its reason.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One clone as the agent made it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClonedVolume {
    /// The PersistentVolume the clone is for.
    pub persistent_volume: String,
    /// Where the clone stands.
    #[serde(default)]
    pub state: CloneState,
    /// `Clone` (copy-on-write) or `Copy` (full copy).
    #[serde(default)]
    pub method: CloneMethod,
    /// The backend (`reflink`, `lvm-thin`, `lvm-thick`, `btrfs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The backend's handle of the clone (an image path, an LV, a subvolume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_handle: Option<String>,
    /// The host path the PersistentVolume's `local.path` names: a block device (`block: true`),
    /// which the kubelet mounts with `filesystem`, or a directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whether `path` is a block device holding a filesystem (rather than a directory).
    #[serde(default)]
    pub block: bool,
    /// The filesystem in the clone (what the member snapshot held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    /// The clone's size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SNAPSHOT_BYTES))]
    pub size_bytes: Option<i64>,
    /// For a `Copy`: bytes copied so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = MAX_SNAPSHOT_BYTES))]
    pub copied_bytes: Option<i64>,
    /// When the clone was ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cloned_at: Option<Time>,
    /// Why the clone failed or is not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
