//! Validation of a NewClaims restore before anything is touched: a pure function of what the
//! API shows, answering Start (with the plan), Wait (with what it waits for) or Refuse (with a
//! reason and a message a person can act on).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ResourceQuota};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;

use super::plan::{self, Target};
use super::quota::{self, NewClaim, parse_quantity};
use crate::api::{GroupRestore, GroupSnapshot, GroupSnapshotPhase, RESTORE_PROVISIONER};

/// What validation sees.
pub struct Inputs<'a> {
    pub namespace: &'a str,
    pub restore: &'a GroupRestore,
    pub restore_uid: &'a str,
    pub snapshot: Option<&'a GroupSnapshot>,
    /// The StorageClass restored claims use, and the object if it exists.
    pub storage_class_name: &'a str,
    pub storage_class: Option<&'a StorageClass>,
    /// The namespace's claims by name.
    pub claims: &'a BTreeMap<String, PersistentVolumeClaim>,
    /// The namespace's NodeSnapshots: name → uid.
    pub node_snapshots: &'a BTreeMap<String, String>,
    pub quotas: &'a [ResourceQuota],
    /// Whether the restore is young (GitOps may apply a restore before its snapshot).
    pub settling: bool,
}

/// The outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Start(Start),
    Wait(String),
    Refuse {
        reason: &'static str,
        message: String,
    },
}

/// What a restore that may start makes.
#[derive(Debug, Clone, PartialEq)]
pub struct Start {
    pub targets: Vec<Target>,
    /// NodeSnapshot name → uid, for the NodeRestores.
    pub node_snapshot_uids: BTreeMap<String, String>,
    /// Claims a person (or GitOps) created, waiting for this restore: filled, never deleted.
    pub user_given: BTreeSet<String>,
}

fn refuse(reason: &'static str, message: String) -> Verdict {
    Verdict::Refuse { reason, message }
}

/// Why the snapshot cannot be restored from (also checked while a restore runs), or None.
pub fn snapshot_problem(
    namespace: &str,
    name: &str,
    snapshot: Option<&GroupSnapshot>,
    recorded_uid: Option<&str>,
) -> Option<(&'static str, String)> {
    let Some(snapshot) = snapshot else {
        return Some((
            "GroupSnapshotNotFound",
            format!(
                "GroupSnapshot {name} does not exist in namespace {namespace}; name a GroupSnapshot of this namespace in spec.source.groupSnapshotName (create a new GroupRestore: the source cannot be changed)"
            ),
        ));
    };
    if let Some(recorded) = recorded_uid
        && snapshot.uid().as_deref() != Some(recorded)
    {
        return Some((
            "GroupSnapshotRecreated",
            format!(
                "GroupSnapshot {name} was deleted and created again (uid {} is not {recorded}, the one this restore started from)",
                snapshot.uid().unwrap_or_default()
            ),
        ));
    }
    if snapshot.metadata.deletion_timestamp.is_some() {
        return Some((
            "GroupSnapshotDeleting",
            format!("GroupSnapshot {name} is being deleted; its member snapshots are going"),
        ));
    }
    let status = snapshot.status.clone().unwrap_or_default();
    match status.phase {
        GroupSnapshotPhase::Ready => None,
        GroupSnapshotPhase::Failed => Some((
            "GroupSnapshotFailed",
            format!(
                "GroupSnapshot {name} Failed ({}); it holds no snapshot to restore: restore another one",
                status.message.as_deref().unwrap_or("no message")
            ),
        )),
        phase => Some((
            "GroupSnapshotNotReady",
            format!(
                "GroupSnapshot {name} is {phase:?}, not Ready; create the GroupRestore again once `kubectl get gsnap {name}` shows Ready"
            ),
        )),
    }
}

/// Whether a claim is one waiting for this restore (it may be filled) and if not, why.
fn waiting_problem(
    claim: &PersistentVolumeClaim,
    restore: &str,
    class: &str,
    target: &Target,
) -> Option<String> {
    let name = claim.name_any();
    let spec = claim.spec.clone().unwrap_or_default();
    let phase = claim.status.as_ref().and_then(|s| s.phase.clone());
    if spec.volume_name.as_deref().is_some_and(|v| !v.is_empty())
        || phase.as_deref().is_some_and(|p| p != "Pending")
    {
        return Some(format!(
            "claim {name} waits for this restore but is already {} (volume {}); delete it or restore to another name",
            phase.as_deref().unwrap_or("bound"),
            spec.volume_name.as_deref().unwrap_or("-")
        ));
    }
    let got_class = spec.storage_class_name.as_deref().unwrap_or("");
    if got_class != class {
        return Some(format!(
            "claim {name} is in StorageClass {got_class:?}, not {class:?}: only tandem's restore class keeps it from binding to another volume; recreate it with storageClassName: {class}"
        ));
    }
    let mode = spec.volume_mode.as_deref().unwrap_or("Filesystem");
    let member_mode = target.member.volume_mode.as_deref().unwrap_or("Filesystem");
    if mode != member_mode {
        return Some(format!(
            "claim {name} asks for volumeMode {mode}, but member {} is {member_mode} (tandem never converts modes)",
            target.member.claim
        ));
    }
    let request = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| parse_quantity(&q.0));
    let capacity = target
        .member
        .capacity
        .as_ref()
        .and_then(|q| parse_quantity(&q.0));
    if let (Some(request), Some(capacity)) = (request, capacity)
        && request > capacity
    {
        return Some(format!(
            "claim {name} requests {request} bytes, more than member {}'s capacity of {capacity} bytes; request at most {}",
            target.member.claim,
            target
                .member
                .capacity
                .as_ref()
                .map_or(String::new(), |q| q.0.clone())
        ));
    }
    let _ = restore;
    None
}

/// Validates a NewClaims restore.
pub fn validate(inputs: &Inputs<'_>) -> Verdict {
    let restore = inputs.restore;
    let name = restore.name_any();
    let source = &restore.spec.source;
    if let Some(ns) = &source.namespace
        && ns != inputs.namespace
    {
        return refuse(
            "CrossNamespace",
            format!(
                "spec.source.namespace is {ns}, but a GroupRestore restores only snapshots of its own namespace {} (restoring across namespaces would hand one namespace's data to another); create the GroupRestore in {ns}",
                inputs.namespace
            ),
        );
    }
    let recorded = restore
        .status
        .as_ref()
        .and_then(|s| s.group_snapshot_uid.as_deref());
    if let Some((reason, message)) = snapshot_problem(
        inputs.namespace,
        &source.group_snapshot_name,
        inputs.snapshot,
        recorded,
    ) {
        if reason == "GroupSnapshotNotFound" && inputs.settling {
            return Verdict::Wait(format!(
                "waiting for GroupSnapshot {}",
                source.group_snapshot_name
            ));
        }
        return refuse(reason, message);
    }
    let Some(snapshot) = inputs.snapshot else {
        unreachable!("snapshot_problem refuses a missing snapshot")
    };
    let status = snapshot.status.clone().unwrap_or_default();
    if let Some(central) = &status.central
        && let Some((reason, message)) = super::rbd_copies::refusal(&snapshot.name_any(), central)
    {
        return refuse(reason, message);
    }
    if status.members.is_empty() {
        return refuse(
            "EmptySnapshot",
            format!("GroupSnapshot {} has no members", snapshot.name_any()),
        );
    }

    // Each member's cut: its NodeSnapshot and that object's uid (the agent clones only a snapshot
    // carrying that owner's mark).
    let mut node_snapshot_uids = BTreeMap::new();
    let mut members = status.members.clone();
    let snapshot_uid = snapshot.uid().unwrap_or_default();
    for member in &mut members {
        let node_snapshot = member.node_snapshot.clone().unwrap_or_else(|| {
            crate::controller::node_snapshot_name(&snapshot.name_any(), &snapshot_uid, &member.node)
        });
        let Some(uid) = inputs.node_snapshots.get(&node_snapshot) else {
            return refuse(
                "SnapshotIncomplete",
                format!(
                    "member {} of GroupSnapshot {}: its NodeSnapshot {node_snapshot} is gone, so its snapshot cannot be found on node {}",
                    member.claim,
                    snapshot.name_any(),
                    member.node
                ),
            );
        };
        if member.snapshot_handle.is_none() {
            return refuse(
                "SnapshotIncomplete",
                format!(
                    "member {} of GroupSnapshot {} has no snapshot handle",
                    member.claim,
                    snapshot.name_any()
                ),
            );
        }
        node_snapshot_uids.insert(node_snapshot.clone(), uid.clone());
        member.node_snapshot = Some(node_snapshot);
    }

    let targets = match plan::targets(
        &restore.spec,
        &name,
        inputs.restore_uid,
        &snapshot.name_any(),
        &members,
    ) {
        Ok(t) => t,
        Err(e) => {
            let reason = match e {
                plan::NameError::UnknownMember(..) => "UnknownMember",
                plan::NameError::MemberTwice(_) | plan::NameError::Duplicate(_) => {
                    "DuplicateClaimName"
                }
                plan::NameError::Invalid(_) => "InvalidClaimName",
            };
            return refuse(reason, e.to_string());
        }
    };

    let class = inputs.storage_class_name;
    match inputs.storage_class {
        None => {
            return refuse(
                "StorageClassNotFound",
                format!(
                    "StorageClass {class} does not exist; install it (the tandem chart does: provisioner {RESTORE_PROVISIONER}, volumeBindingMode Immediate) or point the controller's --restore-storage-class at one"
                ),
            );
        }
        Some(sc) if sc.provisioner != RESTORE_PROVISIONER => {
            return refuse(
                "StorageClassNotTandem",
                format!(
                    "StorageClass {class} has provisioner {}, not {RESTORE_PROVISIONER}: another provisioner could bind the restored claims to empty volumes",
                    sc.provisioner
                ),
            );
        }
        Some(_) => {}
    }

    let create = restore
        .spec
        .new_claims
        .as_ref()
        .is_none_or(|n| n.create_claims);
    let mut user_given = BTreeSet::new();
    let mut missing = Vec::new();
    let mut new_claims = Vec::new();
    for target in &targets {
        match inputs.claims.get(&target.claim) {
            Some(existing) if plan::refers_to(existing, &name) => {
                if let Some(problem) = waiting_problem(existing, &name, class, target) {
                    return refuse("ClaimMismatch", problem);
                }
                user_given.insert(target.claim.clone());
            }
            Some(_) => {
                return refuse(
                    "ClaimExists",
                    format!(
                        "claim {} (for member {}) already exists and is not waiting for this restore; delete it, or choose other names with spec.newClaims.nameTemplate or spec.newClaims.claims",
                        target.claim, target.member.claim
                    ),
                );
            }
            None if create => new_claims.push(NewClaim {
                storage_class: class.to_string(),
                request_bytes: target
                    .member
                    .capacity
                    .as_ref()
                    .and_then(|q| parse_quantity(&q.0))
                    .unwrap_or(0),
            }),
            None => missing.push(target.claim.clone()),
        }
    }
    if !missing.is_empty() {
        return Verdict::Wait(format!(
            "waiting for claim(s) {} (spec.newClaims.createClaims is false: create each in StorageClass {class} with dataSourceRef {{apiGroup: tandem.dev, kind: GroupRestore, name: {name}}})",
            missing.join(", ")
        ));
    }
    if let Err(message) = quota::check(inputs.quotas, &new_claims) {
        return refuse("QuotaExceeded", message);
    }
    Verdict::Start(Start {
        targets,
        node_snapshot_uids,
        user_given,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn snapshot(phase: &str, members: &[(&str, &str)]) -> GroupSnapshot {
        let members: Vec<_> = members
            .iter()
            .map(|(claim, node)| {
                json!({"claim": claim, "persistentVolume": format!("pv-{claim}"), "node": node,
                    "snapshotHandle": format!("reflink:/x/{claim}"), "nodeSnapshot": format!("ns-{node}"),
                    "capacity": "1Gi", "volumeMode": "Filesystem", "accessModes": ["ReadWriteOnce"]})
            })
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "snap", "namespace": "shop", "uid": "snap-uid"},
            "spec": {"groupName": "g"},
            "status": {"phase": phase, "members": members, "consistency": "FilesystemFrozen"},
        }))
        .expect("snapshot")
    }

    fn restore(spec: serde_json::Value) -> GroupRestore {
        let mut full = json!({"source": {"groupSnapshotName": "snap"}});
        if let (Some(full), Some(extra)) = (full.as_object_mut(), spec.as_object()) {
            full.extend(extra.clone());
        }
        serde_json::from_value(json!({
            "metadata": {"name": "tue", "namespace": "shop", "uid": "r-uid"},
            "spec": full,
        }))
        .expect("restore")
    }

    fn class(provisioner: &str) -> StorageClass {
        serde_json::from_value(
            json!({"metadata": {"name": "tandem-restore"}, "provisioner": provisioner}),
        )
        .expect("class")
    }

    fn pvc(name: &str, spec: serde_json::Value, phase: &str) -> PersistentVolumeClaim {
        serde_json::from_value(
            json!({"metadata": {"name": name, "namespace": "shop"}, "spec": spec,
            "status": {"phase": phase}}),
        )
        .expect("claim")
    }

    fn waiting(name: &str, class: &str, size: &str, mode: &str) -> PersistentVolumeClaim {
        pvc(
            name,
            json!({"storageClassName": class, "volumeMode": mode, "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": size}},
                "dataSourceRef": {"apiGroup": "tandem.dev", "kind": "GroupRestore", "name": "tue"}}),
            "Pending",
        )
    }

    struct World {
        restore: GroupRestore,
        snapshot: Option<GroupSnapshot>,
        class: Option<StorageClass>,
        claims: BTreeMap<String, PersistentVolumeClaim>,
        node_snapshots: BTreeMap<String, String>,
        quotas: Vec<ResourceQuota>,
        settling: bool,
    }

    impl World {
        fn new() -> World {
            World {
                restore: restore(json!({})),
                snapshot: Some(snapshot("Ready", &[("data", "a"), ("wal", "b")])),
                class: Some(class(RESTORE_PROVISIONER)),
                claims: BTreeMap::new(),
                node_snapshots: BTreeMap::from([
                    ("ns-a".into(), "nsu-a".into()),
                    ("ns-b".into(), "nsu-b".into()),
                ]),
                quotas: Vec::new(),
                settling: false,
            }
        }
        fn claim(mut self, c: PersistentVolumeClaim) -> World {
            self.claims.insert(c.name_any(), c);
            self
        }
        fn verdict(&self) -> Verdict {
            validate(&Inputs {
                namespace: "shop",
                restore: &self.restore,
                restore_uid: "r-uid",
                snapshot: self.snapshot.as_ref(),
                storage_class_name: "tandem-restore",
                storage_class: self.class.as_ref(),
                claims: &self.claims,
                node_snapshots: &self.node_snapshots,
                quotas: &self.quotas,
                settling: self.settling,
            })
        }
    }

    fn reason(v: &Verdict) -> &str {
        match v {
            Verdict::Refuse { reason, .. } => reason,
            Verdict::Wait(_) => "Wait",
            Verdict::Start(_) => "Start",
        }
    }

    #[test]
    fn a_good_restore_starts_with_every_member_and_its_cut() {
        let v = World::new().verdict();
        let Verdict::Start(start) = v else {
            panic!("{v:?}")
        };
        assert_eq!(start.targets.len(), 2);
        assert_eq!(start.targets[0].claim, "data-tue");
        assert_eq!(start.node_snapshot_uids["ns-a"], "nsu-a");
        assert!(start.user_given.is_empty());
    }

    #[test]
    fn every_bad_input_is_refused_with_its_reason() {
        let mut cases: Vec<(&str, World)> = Vec::new();
        let mut w = World::new();
        w.restore = restore(json!({"source": {"groupSnapshotName": "snap", "namespace": "prod"}}));
        cases.push(("CrossNamespace", w));
        let mut w = World::new();
        w.snapshot = None;
        cases.push(("GroupSnapshotNotFound", w));
        for (phase, reason) in [
            ("Cutting", "GroupSnapshotNotReady"),
            ("Pending", "GroupSnapshotNotReady"),
            ("Failed", "GroupSnapshotFailed"),
            ("Deleting", "GroupSnapshotNotReady"),
        ] {
            let mut w = World::new();
            w.snapshot = Some(snapshot(phase, &[("data", "a")]));
            cases.push((reason, w));
        }
        let mut w = World::new();
        if let Some(s) = w.snapshot.as_mut() {
            s.metadata.deletion_timestamp = Some(crate::controller::restore::now());
        }
        cases.push(("GroupSnapshotDeleting", w));
        let mut w = World::new();
        if let Some(s) = w.snapshot.as_mut().and_then(|s| s.status.as_mut()) {
            s.central = Some(crate::api::CentralSnapshot {
                pool: "rbd".into(),
                group: "tandem-g".into(),
                snapshot: "tandem-s".into(),
                phase: crate::api::CentralPhase::Removed,
                ..Default::default()
            });
        }
        cases.push(("RbdSnapshotMissing", w));
        let mut w = World::new();
        w.restore.status = Some(crate::api::GroupRestoreStatus {
            group_snapshot_uid: Some("older-uid".into()),
            ..Default::default()
        });
        cases.push(("GroupSnapshotRecreated", w));
        let mut w = World::new();
        w.node_snapshots.remove("ns-b");
        cases.push(("SnapshotIncomplete", w));
        let mut w = World::new();
        w.restore = restore(json!({"newClaims": {"claims": [{"from": "index", "to": "x"}]}}));
        cases.push(("UnknownMember", w));
        let mut w = World::new();
        w.restore = restore(json!({"newClaims": {"nameTemplate": "{restore}"}}));
        cases.push(("DuplicateClaimName", w));
        let mut w = World::new();
        w.class = None;
        cases.push(("StorageClassNotFound", w));
        let mut w = World::new();
        w.class = Some(class("kubernetes.io/no-provisioner"));
        cases.push(("StorageClassNotTandem", w));
        cases.push((
            "ClaimExists",
            World::new().claim(pvc(
                "data-tue",
                json!({"storageClassName": "fast"}),
                "Bound",
            )),
        ));
        cases.push((
            "ClaimMismatch",
            World::new().claim(waiting("data-tue", "fast", "1Gi", "Filesystem")),
        ));
        cases.push((
            "ClaimMismatch",
            World::new().claim(waiting("data-tue", "tandem-restore", "2Gi", "Filesystem")),
        ));
        cases.push((
            "ClaimMismatch",
            World::new().claim(waiting("data-tue", "tandem-restore", "1Gi", "Block")),
        ));
        let mut bound = waiting("data-tue", "tandem-restore", "1Gi", "Filesystem");
        if let Some(s) = bound.spec.as_mut() {
            s.volume_name = Some("someone-else".into());
        }
        cases.push(("ClaimMismatch", World::new().claim(bound)));
        let mut w = World::new();
        w.quotas = vec![
            serde_json::from_value(json!({"metadata": {"name": "q"},
                "status": {"hard": {"requests.storage": "1Gi"}, "used": {"requests.storage": "0"}}}))
            .expect("quota"),
        ];
        cases.push(("QuotaExceeded", w));
        for (want, world) in cases {
            let v = world.verdict();
            assert_eq!(reason(&v), want, "{v:?}");
            if let Verdict::Refuse { message, .. } = &v {
                assert!(
                    message.len() > 20,
                    "a message a person can act on: {message}"
                );
            }
        }
    }

    #[test]
    fn a_young_restore_waits_for_its_snapshot_and_user_claims_are_waited_for() {
        let mut w = World::new();
        w.snapshot = None;
        w.settling = true;
        assert_eq!(reason(&w.verdict()), "Wait");
        // createClaims: false waits for the claims GitOps creates, and fills them.
        let mut w = World::new();
        w.restore = restore(json!({"newClaims": {"createClaims": false}}));
        let v = w.verdict();
        let Verdict::Wait(message) = v else {
            panic!("{v:?}")
        };
        assert!(
            message.contains("data-tue") && message.contains("wal-tue"),
            "{message}"
        );
        let w = w
            .claim(waiting("data-tue", "tandem-restore", "1Gi", "Filesystem"))
            .claim(waiting("wal-tue", "tandem-restore", "512Mi", "Filesystem"));
        let v = w.verdict();
        let Verdict::Start(start) = v else {
            panic!("{v:?}")
        };
        assert_eq!(start.user_given.len(), 2);
    }

    #[test]
    fn quota_counts_only_the_claims_tandem_creates() {
        let mut w = World::new().claim(waiting("data-tue", "tandem-restore", "1Gi", "Filesystem"));
        w.quotas = vec![
            serde_json::from_value(json!({"metadata": {"name": "q"},
                "status": {"hard": {"persistentvolumeclaims": "1"}, "used": {"persistentvolumeclaims": "0"}}}))
            .expect("quota"),
        ];
        assert_eq!(reason(&w.verdict()), "Start");
    }
}
