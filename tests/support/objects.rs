//! Builders for the Kubernetes objects tests publish: local PVs pinned to a node and the PVCs
//! pre-bound to them (kube-controller-manager's binder completes the binding).

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use serde_json::json;

/// A local PersistentVolume at `path` on `node`, reserved for `namespace/claim`.
pub fn local_volume(
    name: &str,
    path: &str,
    node: &str,
    namespace: &str,
    claim: &str,
    labels: &[(&str, &str)],
) -> PersistentVolume {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "local": {"path": path},
            "claimRef": {"namespace": namespace, "name": claim},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}
            ]}]}}
        }
    }))
    .expect("volume")
}

/// A claim that asks for `volume` by name.
pub fn claim(name: &str, volume: Option<&str>, labels: &[(&str, &str)]) -> PersistentVolumeClaim {
    let labels: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "",
        "resources": {"requests": {"storage": "1Gi"}}
    });
    if let Some(volume) = volume {
        spec["volumeName"] = json!(volume);
    }
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": spec
    }))
    .expect("claim")
}
