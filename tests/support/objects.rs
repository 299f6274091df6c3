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

/// A ceph-csi RBD PersistentVolume (no node affinity: it is wherever it is attached), reserved for
/// `namespace/claim`, naming its image the way ceph-csi's provisioner does and the Secret it wrote
/// as `controllerExpandSecretRef`.
pub struct RbdVolume<'a> {
    pub cluster_id: &'a str,
    pub pool: &'a str,
    pub image: &'a str,
    pub fs_type: &'a str,
    pub secret: &'a str,
}

pub fn rbd_volume(name: &str, namespace: &str, claim: &str, v: &RbdVolume) -> PersistentVolume {
    serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "",
            "volumeMode": "Filesystem",
            "claimRef": {"namespace": namespace, "name": claim},
            "csi": {
                "driver": "rbd.csi.ceph.com",
                "volumeHandle": format!("0001-{:04x}-{}-0000000000000002-{}", v.cluster_id.len(), v.cluster_id, v.image),
                "fsType": v.fs_type,
                "volumeAttributes": {"clusterID": v.cluster_id, "pool": v.pool, "imageName": v.image},
                "controllerExpandSecretRef": {"name": v.secret, "namespace": namespace},
                "nodeStageSecretRef": {"name": v.secret, "namespace": namespace},
            }
        }
    }))
    .expect("rbd volume")
}

/// Attaches `pv` to `node` as the attach/detach controller would: a VolumeAttachment, attached.
pub async fn attach(client: &kube::Client, pv: &str, node: &str) {
    use k8s_openapi::api::storage::v1::VolumeAttachment;
    use kube::api::{Patch, PatchParams, PostParams};
    let attachments: kube::Api<VolumeAttachment> = kube::Api::all(client.clone());
    let name = format!("csi-{pv}");
    let object: VolumeAttachment = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"attacher": "rbd.csi.ceph.com", "nodeName": node,
                 "source": {"persistentVolumeName": pv}}
    }))
    .expect("attachment");
    attachments
        .create(&PostParams::default(), &object)
        .await
        .expect("create VolumeAttachment");
    attachments
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"attached": true}})),
        )
        .await
        .expect("attached");
}
