//! The controller's way into the Ceph clusters of RBD members, with the credentials ceph-csi's
//! users already hold: ceph-csi's config map (`config.json`: cluster id → monitors) and the
//! Secret a PersistentVolume names (`controllerExpandSecretRef`, as ceph-csi's provisioner
//! writes it; `--ceph-secret` when a PV names none) with `userID`/`userKey` (or
//! `adminID`/`adminKey`). Only the controller reads them; agents need none.
//!
//! librbd calls block, so each runs on tokio's blocking pool; connections are kept per cluster
//! and dropped after a failed call.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::ListParams;
use kube::{Api, Client};

use super::cache::CachedVolume;
use super::central::{
    RbdVolume, placement, rbd_group_name, rbd_snap_name, rbd_volume, restore_csi,
};
use super::rbd::{Cluster, ClusterConfig, PoolRef, RbdError, SnapCreated};
use crate::api::{CentralPhase, CentralSnapshot, CentralVolume};

/// How long a connection (and from then on each monitor or OSD operation) may take.
pub const CEPH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the controller finds ceph-csi's configuration (`tandem controller --ceph-csi-config`).
#[derive(Debug, Clone, Default)]
pub struct CephSettings {
    /// ceph-csi's config map, `namespace/name`.
    pub csi_config: Option<(String, String)>,
    /// The Secret for PVs that name none, `namespace/name`.
    pub secret: Option<(String, String)>,
}

/// Why the controller cannot reach a cluster; each names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    #[error(
        "the group has Ceph RBD members, but the controller was not told where ceph-csi's config map is (tandem controller --ceph-csi-config namespace/name, or the chart's ceph.csiConfig)"
    )]
    NotConfigured,
    #[error("{0} must be namespace/name")]
    BadReference(String),
    #[error("the ConfigMap {0} (ceph-csi's config) does not exist")]
    ConfigMapMissing(String),
    #[error("ceph-csi's config {config}: {why}")]
    BadConfig { config: String, why: String },
    #[error("ceph-csi's config {config} has no cluster {cluster_id} (or it lists no monitors)")]
    UnknownCluster { config: String, cluster_id: String },
    #[error(
        "PersistentVolume {pv} names no controllerExpandSecretRef and the controller has no --ceph-secret"
    )]
    NoSecret { pv: String },
    #[error("the Secret {0} (Ceph credentials) does not exist")]
    SecretMissing(String),
    #[error("the Secret {0} holds neither userID/userKey nor adminID/adminKey")]
    SecretIncomplete(String),
    #[error(transparent)]
    Rbd(#[from] RbdError),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("a librbd call did not return: {0}")]
    Join(String),
}

/// `namespace/name`.
pub fn parse_reference(value: &str) -> Result<(String, String), CephError> {
    match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(CephError::BadReference(value.to_string())),
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct CsiCluster {
    #[serde(rename = "clusterID")]
    cluster_id: String,
    #[serde(default)]
    monitors: Vec<String>,
}

/// The monitors of `cluster_id` in ceph-csi's `config.json`, as `mon_host` takes them.
pub fn monitors_of(config_name: &str, json: &str, cluster_id: &str) -> Result<String, CephError> {
    let clusters: Vec<CsiCluster> =
        serde_json::from_str(json).map_err(|e| CephError::BadConfig {
            config: config_name.into(),
            why: format!("config.json is not ceph-csi's list of clusters: {e}"),
        })?;
    clusters
        .into_iter()
        .find(|c| c.cluster_id == cluster_id && !c.monitors.is_empty())
        .map(|c| c.monitors.join(","))
        .ok_or_else(|| CephError::UnknownCluster {
            config: config_name.into(),
            cluster_id: cluster_id.into(),
        })
}

/// The cephx user and key in a ceph-csi Secret.
pub fn credentials_of(
    secret_name: &str,
    data: &BTreeMap<String, ByteString>,
) -> Result<(String, String), CephError> {
    let text = |key: &str| {
        data.get(key)
            .and_then(|v| String::from_utf8(v.0.clone()).ok())
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    [("userID", "userKey"), ("adminID", "adminKey")]
        .iter()
        .find_map(|(id, key)| Some((text(id)?, text(key)?)))
        .ok_or_else(|| CephError::SecretIncomplete(secret_name.into()))
}

/// The Secret whose credentials reach a PV's image: the one its provisioner recorded, else the
/// controller's default.
pub fn secret_of(
    volume: &CachedVolume,
    fallback: Option<&(String, String)>,
) -> Result<(String, String), CephError> {
    let named = volume
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .and_then(|c| c.controller_expand_secret_ref.as_ref())
        .map(|r| {
            (
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default(),
            )
        })
        .filter(|(ns, name)| !ns.is_empty() && !name.is_empty());
    named
        .or_else(|| fallback.cloned())
        .ok_or(CephError::NoSecret {
            pv: volume.metadata.name.clone().unwrap_or_default(),
        })
}

/// The images to add to and remove from a group so it holds exactly `wanted`.
pub fn group_changes(current: &[String], wanted: &[String]) -> (Vec<String>, Vec<String>) {
    let current: BTreeSet<&String> = current.iter().collect();
    let wanted_set: BTreeSet<&String> = wanted.iter().collect();
    (
        wanted_set
            .difference(&current)
            .map(|s| s.to_string())
            .collect(),
        current
            .difference(&wanted_set)
            .map(|s| s.to_string())
            .collect(),
    )
}

/// The connections of this controller, one per ceph-csi cluster id.
#[derive(Default)]
pub struct CephClusters {
    pub settings: CephSettings,
    connected: Mutex<HashMap<String, Arc<Cluster>>>,
    /// The last group snapshot call's time, per cluster id.
    last_cut: Mutex<HashMap<String, Duration>>,
}

/// What a first group snapshot call of a cluster is expected to take.
const FIRST_CUT_EXPECTED: Duration = Duration::from_secs(1);

impl CephClusters {
    pub fn new(settings: CephSettings) -> CephClusters {
        CephClusters {
            settings,
            connected: Mutex::default(),
            last_cut: Mutex::default(),
        }
    }

    /// What the next group snapshot call on this cluster is expected to take: twice the last
    /// one (calls vary), at least 200 ms; 1 s before the first.
    pub fn expected_cut(&self, cluster_id: &str) -> Duration {
        let last = self.last_cut.lock().unwrap_or_else(|p| p.into_inner());
        last.get(cluster_id).map_or(FIRST_CUT_EXPECTED, |d| {
            (*d * 2).max(Duration::from_millis(200))
        })
    }

    pub fn record_cut(&self, cluster_id: &str, took: Duration) {
        let mut last = self.last_cut.lock().unwrap_or_else(|p| p.into_inner());
        last.insert(cluster_id.to_string(), took);
    }

    /// A connection to the cluster of `volume` (an RBD member with this `cluster_id`).
    pub async fn connect(
        &self,
        client: &Client,
        cluster_id: &str,
        volume: Option<&CachedVolume>,
    ) -> Result<Arc<Cluster>, CephError> {
        if let Some(cluster) = self.lock().get(cluster_id) {
            return Ok(cluster.clone());
        }
        let (ns, name) = self
            .settings
            .csi_config
            .clone()
            .ok_or(CephError::NotConfigured)?;
        let config_name = format!("{ns}/{name}");
        let map = Api::<ConfigMap>::namespaced(client.clone(), &ns)
            .get_opt(&name)
            .await?
            .ok_or_else(|| CephError::ConfigMapMissing(config_name.clone()))?;
        let json = map
            .data
            .as_ref()
            .and_then(|d| d.get("config.json"))
            .ok_or_else(|| CephError::BadConfig {
                config: config_name.clone(),
                why: "it has no config.json".into(),
            })?;
        let mon_host = monitors_of(&config_name, json, cluster_id)?;
        let (secret_ns, secret_name) = match volume {
            Some(volume) => secret_of(volume, self.settings.secret.as_ref())?,
            None => self.settings.secret.clone().ok_or(CephError::NoSecret {
                pv: "(gone)".into(),
            })?,
        };
        let secret_ref = format!("{secret_ns}/{secret_name}");
        let secret = Api::<Secret>::namespaced(client.clone(), &secret_ns)
            .get_opt(&secret_name)
            .await?
            .ok_or_else(|| CephError::SecretMissing(secret_ref.clone()))?;
        let (user, key) = credentials_of(&secret_ref, &secret.data.unwrap_or_default())?;
        let config = ClusterConfig {
            mon_host,
            user,
            key,
        };
        let cluster = Arc::new(blocking(move || Cluster::connect(&config, CEPH_TIMEOUT)).await?);
        self.lock().insert(cluster_id.to_string(), cluster.clone());
        Ok(cluster)
    }

    /// Forgets a connection after a failed call: the next one connects (and reads the Secret) anew.
    pub fn forget(&self, cluster_id: &str) {
        self.lock().remove(cluster_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Cluster>>> {
        self.connected.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Runs a librbd call on the blocking pool.
pub async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, RbdError> + Send + 'static,
) -> Result<T, CephError> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| CephError::Join(e.to_string()))?
        .map_err(CephError::from)
}

/// Makes the RBD group hold exactly `images` (created if missing). An image in another group is
/// [`RbdError::ImageInOtherGroup`] and is never moved.
pub fn prepare_group(
    cluster: &Cluster,
    pool: &PoolRef,
    group: &str,
    images: &[String],
) -> Result<(), RbdError> {
    cluster.ensure_group(pool, group)?;
    let current: Vec<String> = cluster
        .group_images(pool, group)?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let (add, remove) = group_changes(&current, images);
    for image in &add {
        cluster.add_image(pool, group, image)?;
    }
    for image in &remove {
        cluster.remove_image(pool, group, image)?;
    }
    Ok(())
}

/// Cuts the group snapshot; what it did and how long the call took.
pub fn cut(
    cluster: &Cluster,
    pool: &PoolRef,
    group: &str,
    snap: &str,
) -> Result<(SnapCreated, Duration), RbdError> {
    let start = Instant::now();
    let created = cluster.create_group_snap(pool, group, snap)?;
    Ok((created, start.elapsed()))
}

/// The central cut: checks that the nodes froze exactly the images the PersistentVolumes name
/// in this very cluster, then cuts the group snapshot. `reported`: per PV, its agent's handle.
/// Returns how long the call took, or why nothing was cut.
pub fn cut_checked(
    cluster: &Cluster,
    central: &CentralSnapshot,
    reported: &[(String, Option<String>)],
) -> Result<Duration, String> {
    let fsid = cluster
        .fsid()
        .map_err(|e| format!("cannot read the cluster's fsid: {e}"))?;
    let reported: Vec<(&str, Option<&str>)> = reported
        .iter()
        .map(|(pv, h)| (pv.as_str(), h.as_deref()))
        .collect();
    super::central::check_frozen(central, &fsid, &reported)?;
    let pool = PoolRef::new(&central.pool, &central.rados_namespace);
    match cut(cluster, &pool, &central.group, &central.snapshot) {
        Ok((created, took)) => {
            if created == SnapCreated::AlreadyExisted {
                // Cut by this process before a restart, while these same nodes held the freeze
                // they still hold (a node thaws early only by aborting).
                tracing::info!(snapshot = %central.snapshot, "the RBD group snapshot existed already");
            }
            Ok(took)
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Rolls the RBD group back to a central snapshot, once its images are still exactly the
/// snapshot's (Ceph 16 would also roll back an image that left the group and skip one that joined).
pub fn rollback_checked(cluster: &Cluster, central: &CentralSnapshot) -> Result<(), String> {
    let pool = PoolRef::new(&central.pool, &central.rados_namespace);
    let mut now: Vec<String> = cluster
        .group_images(&pool, &central.group)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|i| i.name)
        .collect();
    let mut then: Vec<String> = central.volumes.iter().map(|v| v.image.clone()).collect();
    now.sort();
    then.sort();
    if now != then {
        return Err(format!(
            "the RBD group {pool}/{} holds {} now, the snapshot {}: a rollback would not restore exactly the snapshot's images",
            central.group,
            now.join(", "),
            then.join(", ")
        ));
    }
    cluster
        .rollback_group_snap(&pool, &central.group, &central.snapshot)
        .map_err(|e| e.to_string())
}

/// The connection to a central snapshot's cluster, with the credentials of its first member's PV
/// (or the controller's default Secret once every PV is gone).
pub async fn connect_for(
    clusters: &CephClusters,
    client: &Client,
    volumes: &kube::runtime::reflector::Store<CachedVolume>,
    record: &CentralSnapshot,
) -> Result<Arc<Cluster>, CephError> {
    let volume = record.volumes.iter().find_map(|v| {
        volumes.get(&kube::runtime::reflector::ObjectRef::new(
            &v.persistent_volume,
        ))
    });
    clusters
        .connect(client, &record.cluster_id, volume.as_deref())
        .await
}

/// Removes a central snapshot; a missing one (or a missing group) is fine.
pub fn remove_snapshot(cluster: &Cluster, central: &CentralSnapshot) -> Result<(), RbdError> {
    let pool = PoolRef::new(&central.pool, &central.rados_namespace);
    match cluster.remove_group_snap(&pool, &central.group, &central.snapshot) {
        Ok(()) | Err(RbdError::GroupNotFound { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes the group of a central snapshot if no snapshot is left in it (its images leave it and
/// stay); whether it was removed.
pub fn remove_group_if_unused(
    cluster: &Cluster,
    central: &CentralSnapshot,
) -> Result<bool, RbdError> {
    let pool = PoolRef::new(&central.pool, &central.rados_namespace);
    match cluster.group_snaps(&pool, &central.group) {
        Ok(snaps) if snaps.is_empty() => {
            cluster.remove_group(&pool, &central.group)?;
            Ok(true)
        }
        Ok(_) | Err(RbdError::GroupNotFound { .. }) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The nodes RBD volumes are attached to, by PersistentVolume: the VolumeAttachments the
/// attach/detach controller made for ceph-csi (an RBD volume has no node affinity).
pub async fn attached_nodes(client: &Client) -> Result<BTreeMap<String, String>, kube::Error> {
    let attachments = Api::<VolumeAttachment>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    Ok(attachments
        .items
        .into_iter()
        .filter(|a| a.status.as_ref().is_some_and(|s| s.attached))
        .filter(|a| a.metadata.deletion_timestamp.is_none())
        .filter_map(|a| Some((a.spec.source.persistent_volume_name?, a.spec.node_name)))
        .collect())
}

/// Why a group snapshot with RBD members cannot start.
#[derive(Debug)]
pub enum PrepareError {
    /// Not without a change by a person: the snapshot fails with this reason and message.
    Refused {
        reason: &'static str,
        message: String,
    },
    /// The Kubernetes API failed: tried again.
    Kube(kube::Error),
}

fn refused(reason: &'static str, message: impl Into<String>) -> PrepareError {
    PrepareError::Refused {
        reason,
        message: message.into(),
    }
}

/// Readies the central snapshot of a group snapshot whose members are `volumes` (PV name and
/// projection): None without RBD members; else the RBD group of the ConsistencyGroup
/// (`group_uid`) holds exactly the RBD members, and the record of the snapshot to cut.
pub async fn prepare(
    client: &Client,
    clusters: &CephClusters,
    volumes: &[(String, Option<&CachedVolume>)],
    group_uid: &str,
    snapshot_uid: &str,
) -> Result<Option<CentralSnapshot>, PrepareError> {
    let mut members: Vec<(String, RbdVolume, &CachedVolume)> = Vec::new();
    let mut first: Option<&CachedVolume> = None;
    for (pv, volume) in volumes {
        let Some(volume) = volume else { continue };
        match rbd_volume(volume) {
            None => {}
            Some(Ok(image)) => {
                first.get_or_insert(volume);
                members.push((pv.clone(), image, volume));
            }
            Some(Err(e)) => return Err(refused("InvalidRbdVolume", e.to_string())),
        }
    }
    let images: Vec<RbdVolume> = members.iter().map(|(_, i, _)| i.clone()).collect();
    let place = match placement(&images) {
        Ok(Some(place)) => place,
        Ok(None) => return Ok(None),
        Err(e) => return Err(refused("RbdMembersScattered", e.to_string())),
    };
    let Some(volume) = first else {
        return Ok(None);
    };
    let cluster = match clusters
        .connect(client, &place.cluster_id, Some(volume))
        .await
    {
        Ok(c) => c,
        Err(CephError::Kube(e)) => return Err(PrepareError::Kube(e)),
        Err(e) => return Err(refused("CephUnavailable", e.to_string())),
    };
    let group = rbd_group_name(group_uid);
    let pool = PoolRef::new(&place.pool, &place.namespace);
    let names: Vec<String> = images.iter().map(|i| i.image.clone()).collect();
    let prepared = {
        let (cluster, pool, group, names) = (cluster.clone(), pool.clone(), group.clone(), names);
        blocking(move || prepare_group(&cluster, &pool, &group, &names)).await
    };
    match prepared {
        Ok(()) => {}
        Err(CephError::Rbd(e @ RbdError::ImageInOtherGroup { .. })) => {
            return Err(refused("RbdImageInOtherGroup", e.to_string()));
        }
        Err(e) => {
            clusters.forget(&place.cluster_id);
            return Err(refused(
                "RbdGroupFailed",
                format!("cannot make the RBD group {pool}/{group} hold the members: {e}"),
            ));
        }
    }
    Ok(Some(CentralSnapshot {
        cluster_id: place.cluster_id,
        pool: place.pool,
        rados_namespace: place.namespace,
        group,
        snapshot: rbd_snap_name(snapshot_uid),
        volumes: members
            .into_iter()
            .map(|(pv, image, volume)| CentralVolume {
                persistent_volume: pv,
                image: image.image,
                csi: restore_csi(volume),
            })
            .collect(),
        phase: CentralPhase::Pending,
        call_millis: None,
        message: None,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_config_and_secrets_are_read_the_way_ceph_csi_writes_them() {
        assert_eq!(
            parse_reference("ceph-csi/ceph-csi-config").ok(),
            Some(("ceph-csi".into(), "ceph-csi-config".into()))
        );
        for bad in ["", "name", "/name", "ns/", "a/b/c"] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }

        let json = r#"[{"clusterID":"c1","monitors":["10.0.0.1:6789","10.0.0.2:6789"]},
                       {"clusterID":"c2","monitors":[]}]"#;
        assert_eq!(
            monitors_of("ns/cfg", json, "c1").ok().as_deref(),
            Some("10.0.0.1:6789,10.0.0.2:6789")
        );
        assert!(matches!(
            monitors_of("ns/cfg", json, "c2"),
            Err(CephError::UnknownCluster { .. })
        ));
        assert!(matches!(
            monitors_of("ns/cfg", json, "c3"),
            Err(CephError::UnknownCluster { .. })
        ));
        assert!(matches!(
            monitors_of("ns/cfg", "{}", "c1"),
            Err(CephError::BadConfig { .. })
        ));

        let data = |pairs: &[(&str, &str)]| -> BTreeMap<String, ByteString> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect()
        };
        assert_eq!(
            credentials_of("s", &data(&[("userID", "csi"), ("userKey", "AQB==\n")])).ok(),
            Some(("csi".into(), "AQB==".into()))
        );
        assert_eq!(
            credentials_of("s", &data(&[("adminID", "admin"), ("adminKey", "AQC==")])).ok(),
            Some(("admin".into(), "AQC==".into()))
        );
        assert!(credentials_of("s", &data(&[("userID", "csi")])).is_err());
        // The error names the Secret, never its contents.
        let message = credentials_of("ns/s", &data(&[("userKey", "AQsecret")]))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("ns/s") && !message.contains("AQsecret"));
    }

    #[test]
    fn the_secret_is_the_volumes_own_before_the_default() {
        let pv = |secret: Option<(&str, &str)>| -> CachedVolume {
            let mut csi = serde_json::json!({"driver": "rbd.csi.ceph.com", "volumeHandle": "h"});
            if let Some((ns, name)) = secret {
                csi["controllerExpandSecretRef"] =
                    serde_json::json!({"namespace": ns, "name": name});
            }
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": "pv"}, "spec": {"csi": csi}}),
            )
            .expect("pv")
        };
        let fallback = ("tandem".to_string(), "ceph".to_string());
        assert_eq!(
            secret_of(&pv(Some(("ceph-csi", "csi-rbd-secret"))), Some(&fallback)).ok(),
            Some(("ceph-csi".into(), "csi-rbd-secret".into()))
        );
        assert_eq!(secret_of(&pv(None), Some(&fallback)).ok(), Some(fallback));
        assert!(matches!(
            secret_of(&pv(None), None),
            Err(CephError::NoSecret { .. })
        ));
    }

    #[test]
    fn a_group_is_brought_to_exactly_the_members() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        type Images<'a> = &'a [&'a str];
        // (in the group, the members, added, removed)
        let table: [(Images, Images, Images, Images); 4] = [
            (&[], &["a", "b"], &["a", "b"], &[]),
            (&["a", "b"], &["a", "b"], &[], &[]),
            (&["a", "old"], &["a", "new"], &["new"], &["old"]),
            (&["a"], &[], &[], &["a"]),
        ];
        for (current, wanted, add, remove) in table {
            assert_eq!(
                group_changes(&s(current), &s(wanted)),
                (s(add), s(remove)),
                "{current:?} -> {wanted:?}"
            );
        }
    }
}
