//! What a restore makes, as pure functions: target claim names, PV and NodeRestore names, the
//! NodeRestores per node, the claims and the pre-bound PVs. No I/O.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use serde_json::json;

use crate::api::{
    CONSISTENCY_ANNOTATION, CUT_TIME_ANNOTATION, ClonedVolume, Consistency, DEFAULT_NAME_TEMPLATE,
    DNS_SUBDOMAIN_PATTERN, GROUP, GROUP_RESTORE_LABEL, GroupRestore, GroupRestoreSpec,
    MemberSnapshot, NodeRestore, NodeRestoreAction, NodeRestoreSpec, RESTORE_PROVISIONER,
    RESTORED_FROM_ANNOTATION, RestoreVolume,
};

/// Label on every NodeRestore (and PV) with the uid of the GroupRestore that made it.
pub const GROUP_RESTORE_UID_LABEL: &str = "tandem.dev/group-restore-uid";
/// Annotation on a claim tandem created for a restore: that restore's uid (a rollback deletes
/// only these; claims a person gave are left, Pending).
pub const CREATED_BY_ANNOTATION: &str = "tandem.dev/created-by-restore";
/// Annotation on a tandem PV: the NodeRestore that holds its clone.
pub const NODE_RESTORE_ANNOTATION: &str = "tandem.dev/node-restore";
/// Annotation on a NodeRestore whose GroupRestore Completed: its clones are the volumes of bound
/// claims and live on when the GroupRestore goes.
pub const COMPLETED_ANNOTATION: &str = "tandem.dev/restore-completed";
/// The finalizer on every PV tandem made: it goes only once the agent deleted the clone.
pub const CLONE_FINALIZER: &str = "tandem.dev/restore-clone";
/// The annotation through which the PV controller leaves deletion to the external provisioner.
pub const PROVISIONED_BY_ANNOTATION: &str = "pv.kubernetes.io/provisioned-by";
/// The kind a claim's `dataSourceRef` names when it waits for a restore.
pub const KIND: &str = "GroupRestore";

/// One member as the restore will make it.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub member: MemberSnapshot,
    /// The restored claim.
    pub claim: String,
    /// The PV tandem will publish the clone as.
    pub persistent_volume: String,
}

/// Why target names cannot be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "spec.newClaims.claims names {0:?}, which is not a member of the GroupSnapshot (members: {1})"
    )]
    UnknownMember(String, String),
    #[error("spec.newClaims.claims lists member {0:?} twice")]
    MemberTwice(String),
    #[error(
        "two members would be restored to the same claim {0:?}; use {{claim}} in spec.newClaims.nameTemplate or list names in spec.newClaims.claims"
    )]
    Duplicate(String),
    #[error(
        "restored claim name {0:?} is not a valid claim name (at most 253 lowercase letters, digits, '-' and '.'); change spec.newClaims.nameTemplate or spec.newClaims.claims"
    )]
    Invalid(String),
}

/// Fills `{claim}`, `{restore}` and `{snapshot}`.
pub fn render(template: &str, claim: &str, restore: &str, snapshot: &str) -> String {
    template
        .replace("{claim}", claim)
        .replace("{restore}", restore)
        .replace("{snapshot}", snapshot)
}

fn valid_claim_name(name: &str) -> bool {
    // The same rule as DNS_SUBDOMAIN_PATTERN, without a regex engine.
    let _ = DNS_SUBDOMAIN_PATTERN;
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// The PV name of a restored claim: `tandem-<10 hex of sha256(restore uid + "/" + claim)>`.
pub fn pv_name(restore_uid: &str, claim: &str) -> String {
    format!("tandem-{}", short_hash(&[restore_uid, "/", claim]))
}

/// The NodeRestore name of a node: `<restore>-<10 hex of sha256(restore uid + "/" + node)>`.
pub fn node_restore_name(restore: &str, restore_uid: &str, node: &str) -> String {
    format!("{restore}-{}", short_hash(&[restore_uid, "/", node]))
}

fn short_hash(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .take(5)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The members restored and their claim names: every member under the template, or only those
/// `spec.newClaims.claims` lists, under the names it gives.
pub fn targets(
    spec: &GroupRestoreSpec,
    restore: &str,
    restore_uid: &str,
    snapshot: &str,
    members: &[MemberSnapshot],
) -> Result<Vec<Target>, NameError> {
    let new_claims = spec.new_claims.clone().unwrap_or_default();
    let template = new_claims
        .name_template
        .as_deref()
        .unwrap_or(DEFAULT_NAME_TEMPLATE);
    let by_claim: BTreeMap<&str, &MemberSnapshot> =
        members.iter().map(|m| (m.claim.as_str(), m)).collect();
    let chosen: Vec<(&MemberSnapshot, String)> = if new_claims.claims.is_empty() {
        members
            .iter()
            .map(|m| (m, render(template, &m.claim, restore, snapshot)))
            .collect()
    } else {
        let mut seen = std::collections::BTreeSet::new();
        let mut chosen = Vec::new();
        for mapping in &new_claims.claims {
            let Some(member) = by_claim.get(mapping.from.as_str()) else {
                let names: Vec<&str> = by_claim.keys().copied().collect();
                return Err(NameError::UnknownMember(
                    mapping.from.clone(),
                    names.join(", "),
                ));
            };
            if !seen.insert(mapping.from.as_str()) {
                return Err(NameError::MemberTwice(mapping.from.clone()));
            }
            chosen.push((*member, mapping.to.clone()));
        }
        chosen
    };
    let mut names = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (member, claim) in chosen {
        if !valid_claim_name(&claim) {
            return Err(NameError::Invalid(claim));
        }
        if !names.insert(claim.clone()) {
            return Err(NameError::Duplicate(claim));
        }
        out.push(Target {
            member: member.clone(),
            persistent_volume: pv_name(restore_uid, &claim),
            claim,
        });
    }
    Ok(out)
}

/// The provenance annotations of a restored claim and PV.
pub fn provenance(
    namespace: &str,
    snapshot: &str,
    member: &MemberSnapshot,
    consistency: Option<Consistency>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::from([(
        RESTORED_FROM_ANNOTATION.to_string(),
        format!("{namespace}/{snapshot}"),
    )]);
    if let Some(cut) = &member.cut_time {
        out.insert(CUT_TIME_ANNOTATION.into(), cut.0.to_string());
    }
    if let Some(c) = consistency {
        out.insert(CONSISTENCY_ANNOTATION.into(), format!("{c:?}"));
    }
    out
}

/// Whether a claim names `restore` in its `dataSourceRef`.
pub fn refers_to(claim: &PersistentVolumeClaim, restore: &str) -> bool {
    waits_for(claim).is_some_and(|name| name == restore)
}

/// The GroupRestore a claim names in its `dataSourceRef`, if any.
pub fn waits_for(claim: &PersistentVolumeClaim) -> Option<&str> {
    let r = claim.spec.as_ref()?.data_source_ref.as_ref()?;
    (r.api_group.as_deref() == Some(GROUP) && r.kind == KIND).then_some(r.name.as_str())
}

/// Everything a restore's claims, PVs and NodeRestores carry from the restore.
#[derive(Debug, Clone)]
pub struct Owner<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub uid: &'a str,
    pub snapshot: &'a str,
    pub consistency: Option<Consistency>,
    /// The StorageClass of the restored claims.
    pub storage_class: &'a str,
}

impl<'a> Owner<'a> {
    pub fn of(
        restore: &'a GroupRestore,
        namespace: &'a str,
        uid: &'a str,
        storage_class: &'a str,
    ) -> Owner<'a> {
        Owner {
            namespace,
            name: restore.metadata.name.as_deref().unwrap_or_default(),
            uid,
            snapshot: &restore.spec.source.group_snapshot_name,
            consistency: restore.status.as_ref().and_then(|s| s.consistency),
            storage_class,
        }
    }
}

/// The claim tandem creates for `target`: Pending in the restore class (nothing but the PV
/// tandem makes can bind it), `dataSourceRef` → the GroupRestore, the labels, the provenance, the
/// member's capacity, access modes and volume mode.
pub fn claim_object(
    owner: &Owner<'_>,
    target: &Target,
    labels: &BTreeMap<String, String>,
) -> PersistentVolumeClaim {
    let mut labels = labels.clone();
    labels.insert(GROUP_RESTORE_LABEL.into(), owner.name.into());
    let mut annotations = provenance(
        owner.namespace,
        owner.snapshot,
        &target.member,
        owner.consistency,
    );
    annotations.insert(CREATED_BY_ANNOTATION.into(), owner.uid.into());
    let access_modes = if target.member.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        target.member.access_modes.clone()
    };
    let request = target
        .member
        .capacity
        .clone()
        .or_else(|| target.member.size.clone())
        .unwrap_or_else(|| Quantity("1Gi".into()));
    serde_json::from_value(json!({
        "metadata": {
            "name": target.claim,
            "namespace": owner.namespace,
            "labels": labels,
            "annotations": annotations,
        },
        "spec": {
            "accessModes": access_modes,
            "storageClassName": owner.storage_class,
            "volumeMode": target.member.volume_mode.as_deref().unwrap_or("Filesystem"),
            "resources": {"requests": {"storage": request}},
            "dataSourceRef": {"apiGroup": GROUP, "kind": KIND, "name": owner.name},
        }
    }))
    .expect("a claim built from typed parts")
}

/// The NodeRestores of a restore, one per node, each with its volumes.
pub fn node_restores(
    owner: &Owner<'_>,
    targets: &[Target],
    node_snapshot_uids: &BTreeMap<String, String>,
) -> Vec<NodeRestore> {
    let mut by_node: BTreeMap<&str, Vec<RestoreVolume>> = BTreeMap::new();
    for t in targets {
        let node_snapshot = t.member.node_snapshot.clone().unwrap_or_default();
        by_node
            .entry(t.member.node.as_str())
            .or_default()
            .push(RestoreVolume {
                persistent_volume: t.persistent_volume.clone(),
                claim: t.claim.clone(),
                source_claim: t.member.claim.clone(),
                source_persistent_volume: t.member.persistent_volume.clone(),
                node_snapshot_uid: node_snapshot_uids
                    .get(&node_snapshot)
                    .cloned()
                    .unwrap_or_default(),
                node_snapshot,
                release: false,
            });
    }
    by_node
        .into_iter()
        .map(|(node, volumes)| {
            let mut object = NodeRestore::new(
                &node_restore_name(owner.name, owner.uid, node),
                NodeRestoreSpec {
                    node_name: node.into(),
                    group_restore: owner.name.into(),
                    action: NodeRestoreAction::Clone,
                    volumes,
                },
            );
            object.metadata.namespace = Some(owner.namespace.into());
            object.metadata.labels = Some(BTreeMap::from([
                (GROUP_RESTORE_LABEL.into(), owner.name.into()),
                (GROUP_RESTORE_UID_LABEL.into(), owner.uid.into()),
            ]));
            object
        })
        .collect()
}

/// A claim as the PV needs it: name, uid, class, request, access modes, volume mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundClaim {
    pub name: String,
    pub uid: String,
    pub storage_class: String,
    pub request_bytes: u128,
    pub access_modes: Vec<String>,
    pub volume_mode: String,
}

impl BoundClaim {
    pub fn of(claim: &PersistentVolumeClaim) -> Option<BoundClaim> {
        let spec = claim.spec.as_ref()?;
        Some(BoundClaim {
            name: claim.metadata.name.clone()?,
            uid: claim.metadata.uid.clone()?,
            storage_class: spec.storage_class_name.clone().unwrap_or_default(),
            request_bytes: spec
                .resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .and_then(|r| r.get("storage"))
                .and_then(|q| super::quota::parse_quantity(&q.0))
                .unwrap_or(0),
            access_modes: spec.access_modes.clone().unwrap_or_default(),
            volume_mode: spec
                .volume_mode
                .clone()
                .unwrap_or_else(|| "Filesystem".into()),
        })
    }
}

/// Why a clone cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    #[error("the agent reported no path for the clone of PV {0}")]
    NoPath(String),
    #[error(
        "the clone of PV {0} is a block device with no recorded filesystem; the kubelet would format it"
    )]
    NoFilesystem(String),
}

/// The PV for a Cloned volume: pre-bound to the claim (with its uid), `local.path` the agent's
/// path, `fsType` the clone's filesystem when the path is a block device (the kubelet would
/// otherwise format it as ext4), `nouuid` for XFS (the clone has its origin's uuid), pinned to
/// the node, capacity = the clone's size (at least the request), reclaim Delete with tandem as the
/// external deleter, and a finalizer that goes only once the agent deleted the clone.
#[allow(clippy::too_many_arguments)]
pub fn volume_object(
    owner: &Owner<'_>,
    target: &Target,
    node_restore: &str,
    node_hostname: &str,
    claim: &BoundClaim,
    clone: &ClonedVolume,
) -> Result<PersistentVolume, PublishError> {
    let path = clone
        .path
        .clone()
        .ok_or_else(|| PublishError::NoPath(target.persistent_volume.clone()))?;
    let filesystem = clone
        .filesystem
        .clone()
        .or(target.member.filesystem.clone());
    let mut local = json!({"path": path});
    let mut mount_options: Vec<&str> = Vec::new();
    if clone.block && claim.volume_mode == "Filesystem" {
        let fs = filesystem
            .clone()
            .ok_or_else(|| PublishError::NoFilesystem(target.persistent_volume.clone()))?;
        local["fsType"] = json!(fs);
    }
    if claim.volume_mode == "Filesystem" && filesystem.as_deref() == Some("xfs") {
        mount_options.push("nouuid");
    }
    let size = clone
        .size_bytes
        .and_then(|b| u128::try_from(b).ok())
        .unwrap_or(0)
        .max(claim.request_bytes);
    let node_affinity = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
        {"key": super::super::membership::HOSTNAME_LABEL, "operator": "In", "values": [node_hostname]}
    ]}]}});
    Ok(published_volume(
        owner,
        target,
        claim,
        Published {
            size,
            source: ("local", local),
            node_affinity: Some(node_affinity),
            mount_options,
            annotations: BTreeMap::from([(NODE_RESTORE_ANNOTATION.into(), node_restore.into())]),
            finalizer: CLONE_FINALIZER,
        },
    ))
}

/// How one published PV differs from another: its size, its volume source (`local`, `csi`), where
/// it can be used, its mount options, its own annotations and the finalizer of its deleter.
pub struct Published<'a> {
    pub size: u128,
    pub source: (&'static str, serde_json::Value),
    pub node_affinity: Option<serde_json::Value>,
    pub mount_options: Vec<&'a str>,
    pub annotations: BTreeMap<String, String>,
    pub finalizer: &'a str,
}

/// A PV a restore publishes for `target`: pre-bound to the claim (with its uid), in the claim's
/// class, access modes and volume mode, the restore's labels and provenance, reclaim Delete with
/// tandem as the external deleter (`provisioned-by`), held by the deleter's finalizer.
pub fn published_volume(
    owner: &Owner<'_>,
    target: &Target,
    claim: &BoundClaim,
    published: Published<'_>,
) -> PersistentVolume {
    let mut annotations = provenance(
        owner.namespace,
        owner.snapshot,
        &target.member,
        owner.consistency,
    );
    annotations.insert(PROVISIONED_BY_ANNOTATION.into(), RESTORE_PROVISIONER.into());
    annotations.extend(published.annotations);
    let access_modes = if claim.access_modes.is_empty() {
        vec!["ReadWriteOnce".to_string()]
    } else {
        claim.access_modes.clone()
    };
    let mut spec = json!({
        "capacity": {"storage": published.size.to_string()},
        "accessModes": access_modes,
        "persistentVolumeReclaimPolicy": "Delete",
        "storageClassName": claim.storage_class,
        "volumeMode": claim.volume_mode,
        "claimRef": {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "namespace": owner.namespace,
            "name": claim.name,
            "uid": claim.uid,
        },
    });
    spec[published.source.0] = published.source.1;
    if let Some(affinity) = published.node_affinity {
        spec["nodeAffinity"] = affinity;
    }
    if !published.mount_options.is_empty() {
        spec["mountOptions"] = json!(published.mount_options);
    }
    serde_json::from_value(json!({
        "metadata": {
            "name": target.persistent_volume,
            "labels": {
                GROUP_RESTORE_LABEL: owner.name,
                GROUP_RESTORE_UID_LABEL: owner.uid,
            },
            "annotations": annotations,
            "finalizers": [published.finalizer],
        },
        "spec": spec,
    }))
    .expect("a PV built from typed parts")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClaimMapping, NewClaimsSpec, RestoreSource};

    fn member(claim: &str, node: &str) -> MemberSnapshot {
        MemberSnapshot {
            claim: claim.into(),
            persistent_volume: format!("pv-{claim}"),
            node: node.into(),
            node_snapshot: Some(format!("snap-{node}")),
            capacity: Some(Quantity("1Gi".into())),
            volume_mode: Some("Filesystem".into()),
            access_modes: vec!["ReadWriteOnce".into()],
            filesystem: Some("xfs".into()),
            ..Default::default()
        }
    }

    fn spec(template: Option<&str>, claims: &[(&str, &str)]) -> GroupRestoreSpec {
        GroupRestoreSpec {
            source: RestoreSource {
                group_snapshot_name: "snap".into(),
                namespace: None,
            },
            new_claims: Some(NewClaimsSpec {
                name_template: template.map(Into::into),
                claims: claims
                    .iter()
                    .map(|(f, t)| ClaimMapping {
                        from: (*f).into(),
                        to: (*t).into(),
                    })
                    .collect(),
                create_claims: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn target_names_follow_the_template_or_the_explicit_list() {
        let members = [member("data", "a"), member("wal", "b")];
        let t = targets(&spec(None, &[]), "tue", "u1", "snap", &members).expect("targets");
        let names: Vec<&str> = t.iter().map(|t| t.claim.as_str()).collect();
        assert_eq!(names, ["data-tue", "wal-tue"]);
        let t = targets(
            &spec(Some("{snapshot}.{claim}"), &[]),
            "tue",
            "u1",
            "snap",
            &members,
        )
        .expect("targets");
        assert_eq!(t[0].claim, "snap.data");
        // An explicit list restores only what it names, under its names.
        let t = targets(
            &spec(None, &[("wal", "wal-copy")]),
            "tue",
            "u1",
            "snap",
            &members,
        )
        .expect("targets");
        assert_eq!(t.len(), 1);
        assert_eq!(
            (t[0].member.claim.as_str(), t[0].claim.as_str()),
            ("wal", "wal-copy")
        );
    }

    #[test]
    fn bad_names_are_refused_with_what_to_change() {
        let members = [member("data", "a"), member("wal", "b")];
        let cases: Vec<(GroupRestoreSpec, NameError)> = vec![
            (
                spec(Some("{restore}"), &[]),
                NameError::Duplicate("tue".into()),
            ),
            (
                spec(None, &[("data", "x"), ("wal", "x")]),
                NameError::Duplicate("x".into()),
            ),
            (
                spec(None, &[("data", "x"), ("data", "y")]),
                NameError::MemberTwice("data".into()),
            ),
            (
                spec(None, &[("index", "x")]),
                NameError::UnknownMember("index".into(), "data, wal".into()),
            ),
            (
                spec(Some("{claim}_{restore}"), &[]),
                NameError::Invalid("data_tue".into()),
            ),
            (
                spec(Some("-{claim}"), &[]),
                NameError::Invalid("-data".into()),
            ),
        ];
        for (spec, want) in cases {
            assert_eq!(
                targets(&spec, "tue", "u1", "snap", &members),
                Err(want.clone()),
                "{want}"
            );
        }
    }

    #[test]
    fn pv_and_node_restore_names_are_stable_short_and_per_restore() {
        let a = pv_name("uid-1", "data");
        assert_eq!(a, pv_name("uid-1", "data"));
        assert_eq!(a.len(), "tandem-".len() + 10);
        assert_ne!(
            a,
            pv_name("uid-2", "data"),
            "a recreated restore gets new PVs"
        );
        assert_ne!(a, pv_name("uid-1", "wal"));
        assert_ne!(
            node_restore_name("r", "u", "node-1"),
            node_restore_name("r", "u", "node-2")
        );
    }

    fn owner() -> Owner<'static> {
        Owner {
            namespace: "shop",
            name: "tue",
            uid: "u1",
            snapshot: "snap",
            consistency: Some(Consistency::FilesystemFrozen),
            storage_class: "tandem-restore",
        }
    }

    #[test]
    fn one_node_restore_per_node_with_the_cut_it_clones_from() {
        let members = [member("data", "a"), member("wal", "a"), member("idx", "b")];
        let t = targets(&spec(None, &[]), "tue", "u1", "snap", &members).expect("targets");
        let uids = BTreeMap::from([("snap-a".to_string(), "nsu-a".to_string())]);
        let n = node_restores(&owner(), &t, &uids);
        assert_eq!(n.len(), 2);
        assert_eq!(n[0].spec.node_name, "a");
        assert_eq!(n[0].spec.volumes.len(), 2);
        assert_eq!(n[0].spec.volumes[0].node_snapshot_uid, "nsu-a");
        assert_eq!(n[0].spec.volumes[0].source_claim, "data");
        assert_eq!(n[0].spec.volumes[0].claim, "data-tue");
        assert_eq!(n[0].labels()[GROUP_RESTORE_LABEL], "tue");
        assert_eq!(n[0].labels()[GROUP_RESTORE_UID_LABEL], "u1");
        assert!(
            n[0].metadata.owner_references.is_none(),
            "outlives the restore"
        );
    }

    use kube::ResourceExt;

    #[test]
    fn claims_wait_in_the_restore_class_for_this_restore() {
        let t = targets(
            &spec(None, &[]),
            "tue",
            "u1",
            "snap",
            &[member("data", "a")],
        )
        .expect("targets");
        let labels = BTreeMap::from([("app".to_string(), "shop-tue".to_string())]);
        let c = claim_object(&owner(), &t[0], &labels);
        assert!(refers_to(&c, "tue"));
        let spec = c.spec.as_ref().expect("spec");
        assert_eq!(spec.storage_class_name.as_deref(), Some("tandem-restore"));
        assert_eq!(spec.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(
            spec.resources
                .as_ref()
                .and_then(|r| r.requests.as_ref())
                .expect("requests")["storage"],
            Quantity("1Gi".into())
        );
        assert_eq!(c.labels()["app"], "shop-tue");
        assert_eq!(c.labels()[GROUP_RESTORE_LABEL], "tue");
        assert_eq!(c.annotations()[RESTORED_FROM_ANNOTATION], "shop/snap");
        assert_eq!(c.annotations()[CONSISTENCY_ANNOTATION], "FilesystemFrozen");
        assert_eq!(c.annotations()[CREATED_BY_ANNOTATION], "u1");
    }

    fn cloned(block: bool, fs: Option<&str>, size: i64) -> ClonedVolume {
        ClonedVolume {
            persistent_volume: "tandem-x".into(),
            path: Some("/dev/tandem/tandem-x".into()),
            block,
            filesystem: fs.map(Into::into),
            size_bytes: Some(size),
            ..Default::default()
        }
    }

    fn bound(mode: &str) -> BoundClaim {
        BoundClaim {
            name: "data-tue".into(),
            uid: "claim-uid".into(),
            storage_class: "tandem-restore".into(),
            request_bytes: 1 << 30,
            access_modes: vec!["ReadWriteOnce".into()],
            volume_mode: mode.into(),
        }
    }

    #[test]
    fn the_pv_is_pre_bound_pinned_typed_and_deleted_by_tandem() {
        let t = targets(
            &spec(None, &[]),
            "tue",
            "u1",
            "snap",
            &[member("data", "a")],
        )
        .expect("targets");
        let pv = volume_object(
            &owner(),
            &t[0],
            "nr",
            "host-a",
            &bound("Filesystem"),
            &cloned(true, Some("xfs"), 2 << 30),
        )
        .expect("pv");
        let v = serde_json::to_value(&pv).expect("json");
        assert_eq!(v["spec"]["claimRef"]["uid"], "claim-uid");
        assert_eq!(v["spec"]["claimRef"]["name"], "data-tue");
        assert_eq!(v["spec"]["claimRef"]["namespace"], "shop");
        assert_eq!(v["spec"]["local"]["path"], "/dev/tandem/tandem-x");
        assert_eq!(v["spec"]["local"]["fsType"], "xfs");
        assert_eq!(v["spec"]["mountOptions"], json!(["nouuid"]));
        assert_eq!(v["spec"]["capacity"]["storage"], (2u64 << 30).to_string());
        assert_eq!(v["spec"]["persistentVolumeReclaimPolicy"], "Delete");
        assert_eq!(v["spec"]["storageClassName"], "tandem-restore");
        assert_eq!(
            v["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"],
            json!(["host-a"])
        );
        assert_eq!(
            v["metadata"]["annotations"][PROVISIONED_BY_ANNOTATION],
            RESTORE_PROVISIONER
        );
        assert_eq!(v["metadata"]["annotations"][NODE_RESTORE_ANNOTATION], "nr");
        assert_eq!(
            v["metadata"]["annotations"][RESTORED_FROM_ANNOTATION],
            "shop/snap"
        );
        assert_eq!(v["metadata"]["labels"][GROUP_RESTORE_LABEL], "tue");
        assert_eq!(v["metadata"]["finalizers"], json!([CLONE_FINALIZER]));
    }

    #[test]
    fn capacity_is_never_below_the_request_and_fs_type_only_for_block_filesystems() {
        let t = targets(
            &spec(None, &[]),
            "tue",
            "u1",
            "snap",
            &[member("data", "a")],
        )
        .expect("targets");
        // A 64 MiB clone for a 1 GiB claim: the PV says 1 GiB (else the claim never binds).
        let pv = volume_object(
            &owner(),
            &t[0],
            "nr",
            "a",
            &bound("Filesystem"),
            &cloned(true, Some("ext4"), 64 << 20),
        )
        .expect("pv");
        let v = serde_json::to_value(&pv).expect("json");
        assert_eq!(v["spec"]["capacity"]["storage"], (1u64 << 30).to_string());
        assert_eq!(v["spec"]["local"]["fsType"], "ext4");
        assert!(
            v["spec"]["mountOptions"].is_null(),
            "nouuid is for XFS only"
        );
        // A directory (btrfs): no fsType.
        let mut dir = cloned(false, Some("btrfs"), 1 << 30);
        dir.path = Some("/var/lib/kubelet/plugins/tandem.dev/restores/x/volume".into());
        let v = serde_json::to_value(
            volume_object(&owner(), &t[0], "nr", "a", &bound("Filesystem"), &dir).expect("pv"),
        )
        .expect("json");
        assert!(v["spec"]["local"]["fsType"].is_null());
        // A raw block claim: the device as it is.
        let v = serde_json::to_value(
            volume_object(
                &owner(),
                &t[0],
                "nr",
                "a",
                &bound("Block"),
                &cloned(true, Some("xfs"), 1 << 30),
            )
            .expect("pv"),
        )
        .expect("json");
        assert!(v["spec"]["local"]["fsType"].is_null());
        assert!(v["spec"]["mountOptions"].is_null());
        assert_eq!(v["spec"]["volumeMode"], "Block");
        // No path, or a block device of unknown filesystem: refused, never formatted.
        let mut none = cloned(true, None, 1);
        none.path = None;
        assert!(matches!(
            volume_object(&owner(), &t[0], "nr", "a", &bound("Filesystem"), &none),
            Err(PublishError::NoPath(_))
        ));
        let mut unknown = t[0].clone();
        unknown.member.filesystem = None;
        assert!(matches!(
            volume_object(
                &owner(),
                &unknown,
                "nr",
                "a",
                &bound("Filesystem"),
                &cloned(true, None, 1)
            ),
            Err(PublishError::NoFilesystem(_))
        ));
    }
}
