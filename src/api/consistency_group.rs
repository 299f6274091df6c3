use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::{FreezePolicy, QuiesceSpec};

/// A named set of volumes that is snapshotted at one point in time.
///
/// Members are the PersistentVolumeClaims of this namespace picked by `selector`, `volumeSelector`
/// and `claims` together. A group never reaches a volume claimed from another namespace.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "ConsistencyGroup",
    namespaced,
    shortname = "cg",
    category = "tandem",
    status = "ConsistencyGroupStatus",
    doc = "A named set of volumes that tandem snapshots at one point in time.",
    validation = Rule::new("size(self.metadata.name) <= 63 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit"),
    printcolumn(name = "Members", type_ = "integer", description = "Members that can be snapshotted", json_path = ".status.readyMembers"),
    printcolumn(name = "Unsupported", type_ = "integer", description = "Members that cannot be snapshotted", json_path = ".status.unsupportedMembers"),
    printcolumn(name = "Nodes", type_ = "integer", description = "Nodes the members live on", json_path = ".status.nodeCount"),
    printcolumn(name = "Freeze", type_ = "string", description = "Freeze policy", json_path = ".spec.freeze"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[x_kube(validation = Rule::new("has(self.selector) || has(self.volumeSelector) || (has(self.claims) && size(self.claims) > 0)").message("set at least one of spec.selector, spec.volumeSelector or spec.claims"))]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupSpec {
    /// Selects PersistentVolumeClaims of this namespace by their labels (matchLabels and
    /// matchExpressions, at least one requirement: `{}` would select every claim).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_selector")]
    #[x_kube(validation = Rule::new(NON_EMPTY_SELECTOR).message("spec.selector must have at least one requirement: an empty selector would select every claim of the namespace"))]
    pub selector: Option<LabelSelector>,

    /// Selects PersistentVolumes by their labels. Only volumes bound to a claim of this namespace
    /// become members; volumes claimed from other namespaces are ignored whatever their labels say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "bounded_selector")]
    #[x_kube(validation = Rule::new(NON_EMPTY_SELECTOR).message("spec.volumeSelector must have at least one requirement: an empty selector would select every volume"))]
    pub volume_selector: Option<LabelSelector>,

    /// Names of PersistentVolumeClaims of this namespace that are members whatever their labels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512), extend("x-kubernetes-list-type" = "set"))]
    #[schemars(inner(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    ))]
    pub claims: Option<Vec<String>>,

    /// Whether members' filesystems are frozen while the group is snapshotted:
    /// `Required` (default), `BestEffort` or `Disabled`.
    #[serde(default)]
    pub freeze: FreezePolicy,

    /// The longest, in seconds, that any member's filesystem may stay frozen (1 to 300). Each node's
    /// agent thaws on its own clock when this runs out, whatever the controller does.
    #[serde(default = "default_freeze_timeout_seconds")]
    #[schemars(range(min = 1, max = 300))]
    pub freeze_timeout_seconds: i32,

    /// Commands run in the pods that use the members, ordered around the cut: every Pre hook,
    /// every Hold ready, the cut on every node, every hold released with the thaw, every Post
    /// hook. Needs exec rights: bind the ClusterRole `tandem-hook-runner` to the controller in
    /// this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<QuiesceSpec>,
}

/// A selector with no requirement matches everything.
const NON_EMPTY_SELECTOR: &str = "(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)";

/// The most members a group may have (like `claims`); a group that selects more reports
/// `TooManyMembers` instead of a status too large to store.
pub const MAX_MEMBERS: usize = 512;
/// Bounds on a selector's size: requirements, values per requirement, labels.
pub const MAX_SELECTOR_REQUIREMENTS: u32 = 32;
pub const MAX_SELECTOR_VALUES: u32 = 64;
pub const MAX_SELECTOR_LABELS: u32 = 32;

/// The schema of a LabelSelector with bounds on every list and map in it.
fn bounded_selector(generator: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut schema = generator.subschema_for::<LabelSelector>();
    if let Some(object) = schema.as_object_mut() {
        object.insert("nullable".into(), true.into());
        if let Some(properties) = object.get_mut("properties").and_then(|p| p.as_object_mut()) {
            if let Some(labels) = properties
                .get_mut("matchLabels")
                .and_then(|p| p.as_object_mut())
            {
                labels.insert("maxProperties".into(), MAX_SELECTOR_LABELS.into());
            }
            if let Some(expressions) = properties
                .get_mut("matchExpressions")
                .and_then(|p| p.as_object_mut())
            {
                expressions.insert("maxItems".into(), MAX_SELECTOR_REQUIREMENTS.into());
                if let Some(values) = expressions
                    .get_mut("items")
                    .and_then(|i| i.get_mut("properties"))
                    .and_then(|p| p.get_mut("values"))
                    .and_then(|v| v.as_object_mut())
                {
                    values.insert("maxItems".into(), MAX_SELECTOR_VALUES.into());
                }
            }
        }
    }
    schema
}

fn default_freeze_timeout_seconds() -> i32 {
    10
}

/// What the controller found the group to contain.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistencyGroupStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Every volume the group selects, in claim-name order, with whether it can be snapshotted.
    #[serde(default)]
    pub members: Vec<GroupMember>,

    /// How many members can be snapshotted.
    #[serde(default)]
    pub ready_members: i32,

    /// How many members cannot be snapshotted (see each member's `reason`).
    #[serde(default)]
    pub unsupported_members: i32,

    /// The nodes the snapshottable members live on.
    #[serde(default)]
    pub nodes: Vec<String>,

    /// How many nodes the snapshottable members live on.
    #[serde(default)]
    pub node_count: i32,

    /// `Ready` is True when the group has at least one member and every member can be snapshotted.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// One volume of a group.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupMember {
    /// The PersistentVolumeClaim, in the group's namespace.
    pub claim: String,

    /// The PersistentVolume bound to the claim, once bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume: Option<String>,

    /// The node the volume lives on, from the PersistentVolume's node affinity (none for a Ceph RBD
    /// volume: it is on the node its VolumeAttachment names when a snapshot starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,

    /// The CSI driver of the volume, or its in-tree source (`local`, `hostPath`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,

    /// The volume's size as provisioned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<Quantity>,

    /// `Filesystem` or `Block`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,

    /// Whether tandem can snapshot this member.
    pub supported: bool,

    /// Why the member cannot be snapshotted, as a CamelCase word (`ClaimNotFound`, `ClaimNotBound`,
    /// `VolumeNotFound`, `VolumeNotPinnedToNode`, `UnsupportedVolumeSource`, `ClaimedFromOtherNamespace`,
    /// `InvalidRbdVolume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,

    /// The reason in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
