//! Which members of a group snapshot are cut centrally, and under what names: pure decisions for
//! the controller's RBD group snapshot (the cut itself is `barrier::Step::CentralCut`).
//!
//! A member is an RBD member when its PersistentVolume is a ceph-csi RBD volume: the CSI driver
//! `rbd.csi.ceph.com` (Rook prefixes it with its namespace), whose volume attributes name the
//! cluster (`clusterID`, ceph-csi's config map maps it to monitors), the pool, the image
//! (`imageName`) and the RADOS namespace (`radosNamespace`, optional). One RBD group holds every
//! RBD member of a ConsistencyGroup, so they must share a cluster, pool and namespace.

use std::collections::BTreeSet;

use super::barrier::Central;
use super::cache::CachedVolume;
use crate::api::{CentralPhase, CentralSnapshot, CentralVolumeCsi};

/// ceph-csi's RBD driver name; Rook deploys it as `<operator namespace>.rbd.csi.ceph.com`.
pub const CEPH_CSI_RBD_DRIVER: &str = "rbd.csi.ceph.com";

/// An RBD image a member's PersistentVolume names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RbdVolume {
    /// ceph-csi's cluster id (a key of its config map, not the Ceph fsid).
    pub cluster_id: String,
    pub pool: String,
    pub namespace: String,
    pub image: String,
}

/// The volume attributes of a ceph-csi PV that a restored copy keeps: the cluster, the pool and
/// how to map it. The image's own (`imageName`, `journalPool`, the claim's name) stay behind.
const KEPT_ATTRIBUTES: [&str; 10] = [
    "clusterID",
    "pool",
    "radosNamespace",
    "imageFeatures",
    "imageFormat",
    "mounter",
    "mapOptions",
    "unmapOptions",
    "encrypted",
    "encryptionKMSID",
];

/// What a restored copy of `volume` needs to be a ceph-csi volume (None: not a CSI volume).
pub fn restore_csi(volume: &CachedVolume) -> Option<CentralVolumeCsi> {
    let csi = volume.spec.as_ref()?.csi.as_ref()?;
    let reference = |r: Option<&k8s_openapi::api::core::v1::SecretReference>| {
        let r = r?;
        Some(format!(
            "{}/{}",
            r.namespace.as_deref().filter(|n| !n.is_empty())?,
            r.name.as_deref().filter(|n| !n.is_empty())?
        ))
    };
    Some(CentralVolumeCsi {
        driver: csi.driver.clone(),
        fs_type: csi.fs_type.clone(),
        node_stage_secret: reference(csi.node_stage_secret_ref.as_ref()),
        controller_secret: reference(csi.controller_expand_secret_ref.as_ref()),
        attributes: csi
            .volume_attributes
            .iter()
            .flatten()
            .filter(|(k, _)| KEPT_ATTRIBUTES.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    })
}

/// `pool/[namespace/]name`: an image (or `group@snap`) the way `rbd` names it.
pub fn rbd_path(pool: &str, namespace: &str, name: &str) -> String {
    format!("{}/{name}", super::rbd::PoolRef::new(pool, namespace))
}

/// `pool/[namespace/]group@snap`: the RBD group snapshot of a central record.
pub fn snapshot_path(central: &CentralSnapshot) -> String {
    rbd_path(
        &central.pool,
        &central.rados_namespace,
        &format!("{}@{}", central.group, central.snapshot),
    )
}

/// Where a group's RBD members live, all of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdPlacement {
    pub cluster_id: String,
    pub pool: String,
    pub namespace: String,
}

/// Why a PV of the ceph-csi RBD driver cannot be a member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RbdMemberError {
    #[error(
        "PersistentVolume {pv} is a ceph-csi RBD volume without the volume attribute {attribute}"
    )]
    MissingAttribute { pv: String, attribute: &'static str },
    #[error(
        "the RBD members are in more than one cluster, pool or RADOS namespace ({places}); one RBD group holds every member, so they must share one"
    )]
    Scattered { places: String },
}

fn is_rbd_driver(driver: &str) -> bool {
    driver == CEPH_CSI_RBD_DRIVER || driver.ends_with(&format!(".{CEPH_CSI_RBD_DRIVER}"))
}

/// The RBD image behind `volume`, if it is a ceph-csi RBD volume.
pub fn rbd_volume(volume: &CachedVolume) -> Option<Result<RbdVolume, RbdMemberError>> {
    let csi = volume.spec.as_ref()?.csi.as_ref()?;
    if !is_rbd_driver(&csi.driver) {
        return None;
    }
    let pv = volume.metadata.name.clone().unwrap_or_default();
    let attributes = csi.volume_attributes.clone().unwrap_or_default();
    let get = |attribute: &'static str| {
        attributes
            .get(attribute)
            .filter(|v| !v.is_empty())
            .cloned()
            .ok_or(RbdMemberError::MissingAttribute {
                pv: pv.clone(),
                attribute,
            })
    };
    Some((|| {
        Ok(RbdVolume {
            cluster_id: get("clusterID")?,
            pool: get("pool")?,
            image: get("imageName")?,
            namespace: attributes
                .get("radosNamespace")
                .cloned()
                .unwrap_or_default(),
        })
    })())
}

/// Where the group's RBD members are, or why they cannot share one group; None without any.
pub fn placement(members: &[RbdVolume]) -> Result<Option<RbdPlacement>, RbdMemberError> {
    let places: BTreeSet<(&str, &str, &str)> = members
        .iter()
        .map(|m| (m.cluster_id.as_str(), m.pool.as_str(), m.namespace.as_str()))
        .collect();
    match places.len() {
        0 => Ok(None),
        1 => {
            let (cluster_id, pool, namespace) = places.into_iter().next().unwrap_or_default();
            Ok(Some(RbdPlacement {
                cluster_id: cluster_id.into(),
                pool: pool.into(),
                namespace: namespace.into(),
            }))
        }
        _ => Err(RbdMemberError::Scattered {
            places: places
                .iter()
                .map(|(c, p, n)| {
                    if n.is_empty() {
                        format!("{c}:{p}")
                    } else {
                        format!("{c}:{p}/{n}")
                    }
                })
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// The RBD group of a ConsistencyGroup: named after its uid, so a group re-created under the
/// same name never inherits the snapshots of the one before.
pub fn rbd_group_name(consistency_group_uid: &str) -> String {
    format!("tandem-{consistency_group_uid}")
}

/// The RBD group snapshot of a GroupSnapshot: named after its uid, so a restarted controller
/// finds the one it cut and never cuts twice, and a reused GroupSnapshot name cuts anew.
pub fn rbd_snap_name(group_snapshot_uid: &str) -> String {
    format!("tandem-{group_snapshot_uid}")
}

/// Whether the central cut may start: the node whose freeze ends first must still be frozen when
/// the call returns, with a margin for the release to reach it. `left_ms` is each node's freeze
/// budget left (its deadline minus now), `expected_ms` what the call is expected to take.
pub fn enough_budget(left_ms: &[i64], expected_ms: i64, margin_ms: i64) -> bool {
    left_ms
        .iter()
        .min()
        .is_some_and(|&least| least > expected_ms.saturating_add(margin_ms))
}

/// The barrier's view of a GroupSnapshot's central snapshot. `Removed` is `Pending` again: a
/// failing snapshot has nothing left to remove, and a Ready one never gets there.
pub fn barrier_view(central: Option<&CentralSnapshot>) -> Central {
    match central {
        None => Central::None,
        Some(c) => match c.phase {
            CentralPhase::Pending | CentralPhase::Removed => Central::Pending,
            CentralPhase::Taken => Central::Taken,
            CentralPhase::Failed => Central::Failed(
                c.message
                    .clone()
                    .unwrap_or_else(|| "the group snapshot call failed".into()),
            ),
        },
    }
}

/// The image an agent reports it froze (`rbd-group:<fsid>:<pool>/[<namespace>/]<image>@<id>`,
/// the agent's handle of a centrally cut member).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrozenImage {
    pub fsid: String,
    pub pool: String,
    pub namespace: String,
    pub image: String,
}

pub fn parse_frozen_image(handle: &str) -> Option<FrozenImage> {
    let rest = handle.strip_prefix("rbd-group:")?;
    let (fsid, rest) = rest.split_once(':')?;
    let (path, _id) = rest.rsplit_once('@')?;
    let parts: Vec<&str> = path.split('/').collect();
    let (pool, namespace, image) = match parts.as_slice() {
        [pool, image] => (*pool, "", *image),
        [pool, namespace, image] => (*pool, *namespace, *image),
        _ => return None,
    };
    Some(FrozenImage {
        fsid: fsid.into(),
        pool: pool.into(),
        namespace: namespace.into(),
        image: image.into(),
    })
}

/// Whether every node froze exactly the images the PersistentVolumes name, in the cluster the
/// controller is connected to (`fsid`). `reported`: per central member, the PV and the handle
/// its agent reported. Cut only when this holds: a node that froze something else leaves the
/// real image unfrozen under the group snapshot.
pub fn check_frozen(
    central: &CentralSnapshot,
    fsid: &str,
    reported: &[(&str, Option<&str>)],
) -> Result<(), String> {
    for volume in &central.volumes {
        let handle = reported
            .iter()
            .find(|(pv, _)| *pv == volume.persistent_volume)
            .and_then(|(_, h)| *h);
        let Some(handle) = handle else {
            return Err(format!(
                "the node of PersistentVolume {} reported no frozen RBD image",
                volume.persistent_volume
            ));
        };
        let frozen = parse_frozen_image(handle).ok_or_else(|| {
            format!(
                "the node of PersistentVolume {} froze {handle}, not an RBD image",
                volume.persistent_volume
            )
        })?;
        let expected = FrozenImage {
            fsid: fsid.into(),
            pool: central.pool.clone(),
            namespace: central.rados_namespace.clone(),
            image: volume.image.clone(),
        };
        if frozen != expected {
            return Err(format!(
                "the node of PersistentVolume {} froze the RBD image {} of cluster {}, but the PersistentVolume names {} of cluster {fsid}",
                volume.persistent_volume,
                rbd_path(&frozen.pool, &frozen.namespace, &frozen.image),
                frozen.fsid,
                rbd_path(&expected.pool, &expected.namespace, &expected.image),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restored_copy_keeps_the_mapping_and_drops_the_images_own_attributes() {
        let pv: CachedVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "pvc-1"},
            "spec": {"csi": {
                "driver": "rook-ceph.rbd.csi.ceph.com", "volumeHandle": "0001-...", "fsType": "ext4",
                "nodeStageSecretRef": {"namespace": "rook-ceph", "name": "node"},
                "controllerExpandSecretRef": {"namespace": "rook-ceph", "name": ""},
                "volumeAttributes": {"clusterID": "c", "pool": "p", "imageName": "csi-vol-1",
                    "journalPool": "p", "imageFeatures": "layering", "mounter": "rbd",
                    "csi.storage.k8s.io/pvc/name": "db"}}}
        }))
        .expect("pv");
        let csi = restore_csi(&pv).expect("csi");
        assert_eq!(csi.driver, "rook-ceph.rbd.csi.ceph.com");
        assert_eq!(csi.fs_type.as_deref(), Some("ext4"));
        assert_eq!(csi.node_stage_secret.as_deref(), Some("rook-ceph/node"));
        // A reference without a name is no reference.
        assert_eq!(csi.controller_secret, None);
        let kept: Vec<&str> = csi.attributes.keys().map(String::as_str).collect();
        assert_eq!(kept, ["clusterID", "imageFeatures", "mounter", "pool"]);
        assert_eq!(rbd_path("p", "", "i"), "p/i");
        assert_eq!(rbd_path("p", "n", "i"), "p/n/i");
    }

    #[test]
    fn frozen_images_must_be_the_ones_the_volumes_name() {
        let central = CentralSnapshot {
            cluster_id: "c1".into(),
            pool: "rbd".into(),
            group: "tandem-g".into(),
            snapshot: "tandem-s".into(),
            volumes: vec![
                crate::api::CentralVolume {
                    persistent_volume: "pv-a".into(),
                    image: "img-a".into(),
                    csi: None,
                },
                crate::api::CentralVolume {
                    persistent_volume: "pv-b".into(),
                    image: "img-b".into(),
                    csi: None,
                },
            ],
            ..Default::default()
        };
        let a = "rbd-group:F:rbd/img-a@10ab";
        let b = "rbd-group:F:rbd/img-b@10ac";
        assert_eq!(
            parse_frozen_image("rbd-group:F:p/ns/i@1"),
            Some(FrozenImage {
                fsid: "F".into(),
                pool: "p".into(),
                namespace: "ns".into(),
                image: "i".into()
            })
        );
        for bad in [
            "lvm:vg/lv",
            "rbd-group:F:p@1",
            "rbd-group:F:p/i",
            "rbd-group:F:a/b/c/d@1",
        ] {
            assert_eq!(parse_frozen_image(bad), None, "{bad}");
        }
        type Row<'a> = (
            &'a str,
            Vec<(&'a str, Option<&'a str>)>,
            &'a str,
            Option<&'a str>,
        );
        let table: Vec<Row> = vec![
            (
                "both right",
                vec![("pv-a", Some(a)), ("pv-b", Some(b))],
                "F",
                None,
            ),
            (
                "one unreported",
                vec![("pv-a", Some(a)), ("pv-b", None)],
                "F",
                Some("reported no frozen"),
            ),
            (
                "swapped",
                vec![("pv-a", Some(b)), ("pv-b", Some(a))],
                "F",
                Some("names rbd/img-a"),
            ),
            (
                "another cluster",
                vec![("pv-a", Some(a)), ("pv-b", Some(b))],
                "G",
                Some("of cluster F"),
            ),
            (
                "not rbd",
                vec![("pv-a", Some("lvm:vg/lv")), ("pv-b", Some(b))],
                "F",
                Some("not an RBD image"),
            ),
        ];
        for (what, reported, fsid, error) in table {
            let got = check_frozen(&central, fsid, &reported);
            match error {
                None => assert_eq!(got, Ok(()), "{what}"),
                Some(part) => assert!(
                    got.as_ref().err().is_some_and(|e| e.contains(part)),
                    "{what}: {got:?}"
                ),
            }
        }
        // What the barrier sees of each phase.
        let with = |phase, message: Option<&str>| CentralSnapshot {
            phase,
            message: message.map(str::to_string),
            ..central.clone()
        };
        assert_eq!(barrier_view(None), Central::None);
        assert_eq!(
            barrier_view(Some(&with(CentralPhase::Pending, None))),
            Central::Pending
        );
        assert_eq!(
            barrier_view(Some(&with(CentralPhase::Removed, None))),
            Central::Pending
        );
        assert_eq!(
            barrier_view(Some(&with(CentralPhase::Taken, None))),
            Central::Taken
        );
        assert_eq!(
            barrier_view(Some(&with(CentralPhase::Failed, Some("EROFS")))),
            Central::Failed("EROFS".into())
        );
    }

    fn pv(name: &str, driver: &str, attributes: &[(&str, &str)]) -> CachedVolume {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"csi": {
                "driver": driver,
                "volumeHandle": "0001-0024-c1-0000000000000001-uuid",
                "volumeAttributes": attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<std::collections::BTreeMap<_, _>>(),
            }},
        }))
        .expect("pv")
    }

    #[test]
    fn ceph_csi_rbd_volumes_are_found_by_driver_and_their_attributes() {
        let full = [
            ("clusterID", "c1"),
            ("pool", "replicapool"),
            ("imageName", "csi-vol-1"),
        ];
        let image = |ns: &str| RbdVolume {
            cluster_id: "c1".into(),
            pool: "replicapool".into(),
            namespace: ns.into(),
            image: "csi-vol-1".into(),
        };
        assert_eq!(
            rbd_volume(&pv("a", "rbd.csi.ceph.com", &full)),
            Some(Ok(image("")))
        );
        // Rook's driver name, and a RADOS namespace.
        let mut with_ns = full.to_vec();
        with_ns.push(("radosNamespace", "tenant"));
        assert_eq!(
            rbd_volume(&pv("a", "rook-ceph.rbd.csi.ceph.com", &with_ns)),
            Some(Ok(image("tenant")))
        );
        // Other drivers are not RBD members, whatever their attributes.
        assert_eq!(rbd_volume(&pv("a", "cephfs.csi.ceph.com", &full)), None);
        assert_eq!(rbd_volume(&pv("a", "fakerbd.csi.ceph.com", &full)), None);
        // An RBD volume without its image is named, not guessed.
        assert_eq!(
            rbd_volume(&pv("a", "rbd.csi.ceph.com", &full[..2])),
            Some(Err(RbdMemberError::MissingAttribute {
                pv: "a".into(),
                attribute: "imageName"
            }))
        );
    }

    #[test]
    fn every_rbd_member_shares_one_placement_or_the_group_is_refused() {
        let v = |cluster: &str, pool: &str, ns: &str, image: &str| RbdVolume {
            cluster_id: cluster.into(),
            pool: pool.into(),
            namespace: ns.into(),
            image: image.into(),
        };
        assert_eq!(placement(&[]), Ok(None));
        assert_eq!(
            placement(&[v("c1", "p", "", "a"), v("c1", "p", "", "b")]),
            Ok(Some(RbdPlacement {
                cluster_id: "c1".into(),
                pool: "p".into(),
                namespace: String::new()
            }))
        );
        for scattered in [
            [v("c1", "p", "", "a"), v("c2", "p", "", "b")],
            [v("c1", "p", "", "a"), v("c1", "q", "", "b")],
            [v("c1", "p", "", "a"), v("c1", "p", "t", "b")],
        ] {
            assert!(
                matches!(placement(&scattered), Err(RbdMemberError::Scattered { .. })),
                "{scattered:?}"
            );
        }
        let Err(RbdMemberError::Scattered { places }) =
            placement(&[v("c1", "p", "", "a"), v("c1", "p", "t", "b")])
        else {
            panic!("not refused");
        };
        assert_eq!(places, "c1:p, c1:p/t");
    }

    #[test]
    fn names_follow_the_uids_and_the_budget_must_outlast_the_call() {
        assert_eq!(rbd_group_name("u-1"), "tandem-u-1");
        assert_eq!(rbd_snap_name("u-2"), "tandem-u-2");
        let table: [(&[i64], i64, i64, bool); 5] = [
            (&[10_000, 4_000], 1_500, 1_000, true),
            (&[10_000, 2_000], 1_500, 1_000, false),
            (&[2_500], 1_500, 1_000, false),
            (&[], 1, 0, false),
            (&[-5], 0, 0, false),
        ];
        for (left, expected, margin, want) in table {
            assert_eq!(
                enough_budget(left, expected, margin),
                want,
                "{left:?} {expected} {margin}"
            );
        }
    }
}
