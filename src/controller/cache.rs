//! What the controller's watch caches keep of PersistentVolumes: the fields tandem reads.
//!
//! A k8s-openapi `PersistentVolume` is 3.4 KB before any field is set (every volume source of
//! `PersistentVolumeSpec` is inline), so 10,000 cached volumes cost 65 MiB that way. The watch
//! deserialises each object straight into [`CachedVolume`] instead (serde skips the fields it does
//! not name), which holds the same fields under the same names, so code that reads
//! `volume.spec.as_ref()?.claim_ref` reads either.

use std::borrow::Cow;
use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    CSIPersistentVolumeSource, HostPathVolumeSource, LocalVolumeSource, ObjectReference,
    PersistentVolume, PersistentVolumeClaim, PersistentVolumeClaimStatus, VolumeNodeAffinity,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use serde::Deserialize;

/// A PersistentVolume as the controller caches it (see the module's comment).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CachedVolume {
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: Option<CachedVolumeSpec>,
    pub status: Option<CachedVolumeStatus>,
}

/// The part of `PersistentVolumeSpec` tandem reads. A volume of any other source has none of
/// these sources set, and is refused as such.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CachedVolumeSpec {
    pub access_modes: Option<Vec<String>>,
    pub capacity: Option<BTreeMap<String, Quantity>>,
    pub claim_ref: Option<ObjectReference>,
    // Boxed: most volumes of a cluster are not CSI ones of interest, and the source is 0.4 KB.
    pub csi: Option<Box<CSIPersistentVolumeSource>>,
    pub host_path: Option<HostPathVolumeSource>,
    pub local: Option<LocalVolumeSource>,
    pub node_affinity: Option<VolumeNodeAffinity>,
    pub persistent_volume_reclaim_policy: Option<String>,
    pub storage_class_name: Option<String>,
    pub volume_mode: Option<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
pub struct CachedVolumeStatus {
    pub phase: Option<String>,
}

impl kube::Resource for CachedVolume {
    type DynamicType = ();
    type Scope = k8s_openapi::ClusterResourceScope;

    fn kind(dt: &()) -> Cow<'_, str> {
        <PersistentVolume as kube::Resource>::kind(dt)
    }
    fn group(dt: &()) -> Cow<'_, str> {
        <PersistentVolume as kube::Resource>::group(dt)
    }
    fn version(dt: &()) -> Cow<'_, str> {
        <PersistentVolume as kube::Resource>::version(dt)
    }
    fn plural(dt: &()) -> Cow<'_, str> {
        <PersistentVolume as kube::Resource>::plural(dt)
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A volume read from the API server (a live lookup, a test's fixture) as the cache holds it.
impl From<PersistentVolume> for CachedVolume {
    fn from(volume: PersistentVolume) -> Self {
        CachedVolume {
            metadata: volume.metadata,
            spec: volume.spec.map(|s| CachedVolumeSpec {
                access_modes: s.access_modes,
                capacity: s.capacity,
                claim_ref: s.claim_ref,
                csi: s.csi.map(Box::new),
                host_path: s.host_path,
                local: s.local,
                node_affinity: s.node_affinity,
                persistent_volume_reclaim_policy: s.persistent_volume_reclaim_policy,
                storage_class_name: s.storage_class_name,
                volume_mode: s.volume_mode,
            }),
            status: volume.status.map(|s| CachedVolumeStatus { phase: s.phase }),
        }
    }
}

/// A Controller over `api` whose own cache is slimmed as the shared ones are (10,000
/// ConsistencyGroups kept their field managers' trees otherwise: tens of MiB).
pub fn slim_controller<K>(
    api: kube::Api<K>,
    config: kube::runtime::watcher::Config,
) -> Controller<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let objects = reflector(writer, watcher(api, config).modify(slim))
        .default_backoff()
        .applied_objects();
    Controller::for_stream(objects, reader)
}

/// Drops what no reader of the caches needs: the field managers, kubectl's copy of the last
/// applied object, and of a claim's status all but its phase.
pub fn slim<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

pub fn slim_claim(claim: &mut PersistentVolumeClaim) {
    slim(claim);
    if let Some(status) = claim.status.as_mut() {
        *status = PersistentVolumeClaimStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The watch's path (JSON into the projection) and the live path (`From`) agree, and what is
    /// read survives.
    #[test]
    fn a_volume_decoded_from_json_equals_the_one_converted_from_the_full_object() {
        let json = serde_json::json!({
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": "pv-1",
                "uid": "u-1",
                "labels": {"tandem.dev/group-restore": "r"},
                "annotations": {"tandem.dev/node-restore": "n"},
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "capacity": {"storage": "1Gi"},
                "claimRef": {"namespace": "ns", "name": "c", "uid": "cu"},
                "csi": {"driver": "d", "volumeHandle": "h", "volumeAttributes": {"pool": "p"}},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}
                ]}]}},
                "persistentVolumeReclaimPolicy": "Retain",
                "storageClassName": "sc",
                "volumeMode": "Filesystem",
                "nfs": {"server": "s", "path": "/x"},
                "mountOptions": ["noatime"],
            },
            "status": {"phase": "Bound", "message": "m"},
        });
        let decoded: CachedVolume = serde_json::from_value(json.clone()).expect("decodes");
        let full: PersistentVolume = serde_json::from_value(json).expect("decodes");
        assert_eq!(decoded, CachedVolume::from(full));
        let spec = decoded.spec.as_ref().expect("spec");
        assert_eq!(spec.csi.as_ref().map(|c| c.driver.as_str()), Some("d"));
        assert_eq!(
            spec.claim_ref.as_ref().and_then(|r| r.uid.as_deref()),
            Some("cu")
        );
        assert_eq!(
            decoded.status.and_then(|s| s.phase).as_deref(),
            Some("Bound")
        );
    }

    #[test]
    fn the_projection_is_a_fraction_of_the_full_object() {
        // The reason this module exists; a field added to the projection keeps it small.
        assert!(std::mem::size_of::<CachedVolume>() * 3 < std::mem::size_of::<PersistentVolume>());
    }

    #[test]
    fn a_slimmed_claim_keeps_its_phase_only() {
        let mut claim: PersistentVolumeClaim = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c", "managedFields": [{"manager": "m"}]},
            "status": {"phase": "Bound", "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"]},
        }))
        .expect("decodes");
        slim_claim(&mut claim);
        assert_eq!(claim.metadata.managed_fields, None);
        assert_eq!(
            claim.status,
            Some(PersistentVolumeClaimStatus {
                phase: Some("Bound".into()),
                ..Default::default()
            })
        );
    }
}
