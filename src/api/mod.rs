//! The tandem API: custom resource types and nothing else (no I/O).
//!
//! Doc comments on fields become `kubectl explain` text, so they are written for users.

// kube's `printcolumn(name = .., type_ = ..)` repeats keys by design; clippy reads them as duplicates.
#[allow(clippy::duplicated_attributes)]
mod consistency_group;
#[allow(clippy::duplicated_attributes)]
mod group_restore;
#[allow(clippy::duplicated_attributes)]
mod group_snapshot;
#[allow(clippy::duplicated_attributes)]
mod node_restore;
#[allow(clippy::duplicated_attributes)]
mod node_snapshot;
mod quiesce;

pub use consistency_group::*;
pub use group_restore::*;
pub use group_snapshot::*;
pub use node_restore::*;
pub use node_snapshot::*;
pub use quiesce::*;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every tandem resource.
pub const GROUP: &str = "tandem.dev";
/// API version of every tandem resource.
pub const VERSION: &str = "v1alpha1";

/// A DNS-1123 label: what Kubernetes requires of most object names and what tandem requires of the
/// names it embeds in snapshot names.
pub const DNS_LABEL_PATTERN: &str = "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A DNS-1123 subdomain: what Kubernetes requires of a PersistentVolumeClaim's name.
pub const DNS_SUBDOMAIN_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// Whether the members' filesystems are frozen while their snapshots are cut.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum FreezePolicy {
    /// Every member must be frozen; a member that cannot be frozen fails the snapshot.
    #[default]
    Required,
    /// Freeze what can be frozen; a member that cannot be frozen is snapshotted unfrozen and the
    /// snapshot reports `Independent` consistency.
    BestEffort,
    /// Never freeze; snapshots are cut one after another (`Independent` consistency).
    Disabled,
}

/// What point-in-time guarantee a group snapshot reached.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Consistency {
    /// Every quiesce hook succeeded (every hold was held across the cut) and every member was
    /// frozen: the application itself was quiesced.
    ApplicationQuiesced,
    /// Every member was frozen before any member was thawed: the set is crash-consistent.
    FilesystemFrozen,
    /// At least one member was not frozen: each snapshot is consistent on its own only.
    Independent,
}

/// The condition type every tandem resource reports.
pub const CONDITION_READY: &str = "Ready";

/// Every CRD tandem installs, in a stable order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        ConsistencyGroup::crd(),
        GroupSnapshot::crd(),
        NodeSnapshot::crd(),
        GroupRestore::crd(),
        NodeRestore::crd(),
    ]
}

/// The YAML document of one CRD, as committed under `crds/`.
pub fn crd_yaml(crd: &CustomResourceDefinition) -> Result<String, serde_saphyr::SerializeError> {
    serde_saphyr::to_string(crd)
}

/// The file name under `crds/` that holds a CRD.
pub fn crd_file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.spec.names.plural)
}
