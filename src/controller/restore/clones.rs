//! The clone side of a restore, shared by NewClaims and InPlace: creating the NodeRestores,
//! reading their status into the members, publishing the PVs once every volume is Cloned, the
//! deadline, and the rollback.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::plan::{
    self, BoundClaim, CREATED_BY_ANNOTATION, GROUP_RESTORE_UID_LABEL, Owner, Target,
};
use super::rbd_copies::{self, central_volume, is_rbd_copy};
use super::{CONDITION_CLAIMS_BOUND, RestoreContext, now};
use crate::api::{
    CONDITION_READY, CentralSnapshot, CloneState, GroupRestore, GroupRestoreStatus, GroupSnapshot,
    NodeRestore, NodeRestoreAction, NodeRestorePhase, RestorePhase, RestoredMember,
};
use crate::conditions::condition;
use crate::controller::{CONTROLLER_NAME, Error, publish_event};

/// Where the clones of a restore stand, from the NodeRestores' status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Some volume is not cloned yet.
    Cloning,
    /// Every volume of every node is Cloned.
    Cloned,
    /// A node could not clone (or lost a clone); the restore must roll back.
    Failed(String),
}

/// Copies what the agents reported into `members` and says where the clones stand.
pub fn aggregate(members: &mut [RestoredMember], nodes: &[NodeRestore]) -> Progress {
    let mut failures = Vec::new();
    let mut all_cloned = true;
    for node in nodes {
        let status = node.status.clone().unwrap_or_default();
        if matches!(
            status.phase,
            NodeRestorePhase::Failed | NodeRestorePhase::Aborted
        ) {
            failures.push(format!(
                "node {} {:?}: {}",
                node.spec.node_name,
                status.phase,
                status.message.as_deref().unwrap_or("no message")
            ));
        }
    }
    // RBD members are copied by the controller, not on a node (`rbd_copies`).
    for member in members.iter_mut().filter(|m| !rbd_copies::is_rbd_member(m)) {
        let node = nodes.iter().find(|n| {
            n.spec.node_name == member.node
                && n.spec
                    .volumes
                    .iter()
                    .any(|v| v.persistent_volume == member.persistent_volume)
        });
        let reported = node.and_then(|n| n.status.as_ref()).and_then(|s| {
            s.volumes
                .iter()
                .find(|v| v.persistent_volume == member.persistent_volume)
        });
        let Some(v) = reported else {
            all_cloned = false;
            continue;
        };
        member.method = Some(v.method);
        member.backend = v.backend.clone();
        member.size = v.size_bytes.map(|b| Quantity(b.to_string()));
        member.progress_percent = match (v.copied_bytes, v.size_bytes) {
            (Some(c), Some(s)) if s > 0 => {
                Some(i32::try_from((c.clamp(0, s) as i128 * 100 / s as i128) as i64).unwrap_or(100))
            }
            _ if v.state == CloneState::Cloned => Some(100),
            _ => None,
        };
        member.cloned_at = v.cloned_at.clone();
        member.message = v.message.clone();
        match v.state {
            CloneState::Cloned => {}
            CloneState::Cloning => all_cloned = false,
            CloneState::Failed => {
                all_cloned = false;
                failures.push(format!(
                    "member {} on node {}: {}",
                    member.source_claim,
                    member.node,
                    v.message.as_deref().unwrap_or("the clone failed")
                ));
            }
            CloneState::Deleted => {
                all_cloned = false;
                failures.push(format!(
                    "the clone of member {} on node {} was deleted",
                    member.source_claim, member.node
                ));
            }
        }
    }
    if !failures.is_empty() {
        failures.sort();
        failures.dedup();
        return Progress::Failed(failures.join("; "));
    }
    if all_cloned {
        Progress::Cloned
    } else {
        Progress::Cloning
    }
}

/// How long until the deadline (`deadlineSeconds` from `status.startTime`); None once passed.
pub fn remaining(start: Option<&Time>, deadline_seconds: i32, now: Timestamp) -> Option<Duration> {
    let start = start.map(|t| t.0).unwrap_or(now);
    let deadline = Duration::from_secs(u64::try_from(deadline_seconds).unwrap_or(900));
    let elapsed = Duration::try_from(now.duration_since(start)).unwrap_or_default();
    deadline.checked_sub(elapsed).filter(|d| !d.is_zero())
}

/// Wakes at the deadline (no polling in between: NodeRestore and claim changes wake the
/// reconcile), or at once when it passed.
pub fn until_deadline(restore: &GroupRestore) -> Action {
    let start = restore.status.as_ref().and_then(|s| s.start_time.as_ref());
    match remaining(start, restore.spec.deadline_seconds, Timestamp::now()) {
        Some(d) => Action::requeue(d + Duration::from_millis(100)),
        None => Action::requeue(Duration::from_millis(100)),
    }
}

/// Whether the deadline has passed.
pub fn past_deadline(restore: &GroupRestore) -> bool {
    let start = restore.status.as_ref().and_then(|s| s.start_time.as_ref());
    start.is_some() && remaining(start, restore.spec.deadline_seconds, Timestamp::now()).is_none()
}

/// Writes the status (server-side apply, the whole status owned by the controller).
pub async fn write_status(
    api: &Api<GroupRestore>,
    name: &str,
    status: &GroupRestoreStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": GroupRestore::api_version(&()),
        "kind": GroupRestore::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(CONTROLLER_NAME).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// Publishes an Event on the restore.
pub async fn publish(
    rctx: &RestoreContext,
    restore: &GroupRestore,
    type_: EventType,
    reason: &str,
    note: String,
) {
    publish_event(
        &rctx.ctx,
        &restore.object_ref(&()),
        type_,
        reason.into(),
        Some(note),
        "Restore",
    )
    .await;
}

/// Sets the two conditions.
pub fn set_conditions(
    status: &mut GroupRestoreStatus,
    generation: Option<i64>,
    ready: (bool, &str, String),
    bound: (bool, &str, String),
) {
    let previous = status.conditions.clone();
    status.conditions = vec![
        condition(
            &previous,
            CONDITION_READY,
            ready.0,
            ready.1,
            ready.2,
            generation,
        ),
        condition(
            &previous,
            CONDITION_CLAIMS_BOUND,
            bound.0,
            bound.1,
            bound.2,
            generation,
        ),
    ];
}

/// Ends the restore as Failed (nothing left to roll back: call [`roll_back`] first when there is).
pub async fn fail(
    rctx: &RestoreContext,
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let api: Api<GroupRestore> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    status.phase = RestorePhase::Failed;
    status.completion_time = Some(now());
    status.message = Some(message.clone());
    status.observed_generation = restore.metadata.generation;
    set_conditions(
        &mut status,
        restore.metadata.generation,
        (false, reason, message.clone()),
        (
            false,
            reason,
            "no claim is bound to a restored volume".into(),
        ),
    );
    write_status(&api, &restore.name_any(), &status).await?;
    publish(rctx, restore, EventType::Warning, reason, message).await;
    rctx.wake_snapshot(&namespace, &restore.spec.source.group_snapshot_name);
    Ok(Action::await_change())
}

/// The NodeRestores this restore made (by uid label), from the cache.
pub fn node_restores_of(rctx: &RestoreContext, namespace: &str, uid: &str) -> Vec<NodeRestore> {
    rctx.node_restores
        .state()
        .iter()
        .filter(|n| {
            n.namespace().as_deref() == Some(namespace)
                && n.labels().get(GROUP_RESTORE_UID_LABEL).map(String::as_str) == Some(uid)
        })
        .map(|n| n.as_ref().clone())
        .collect()
}

/// Creates the NodeRestores not there yet; a name taken by another restore's object is an error.
pub async fn ensure_node_restores(
    rctx: &RestoreContext,
    namespace: &str,
    uid: &str,
    wanted: &[NodeRestore],
) -> Result<Result<(), String>, Error> {
    let api: Api<NodeRestore> = Api::namespaced(rctx.ctx.client.clone(), namespace);
    let existing = node_restores_of(rctx, namespace, uid);
    for object in wanted {
        if existing.iter().any(|n| n.name_any() == object.name_any()) {
            continue;
        }
        match api.create(&PostParams::default(), object).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let found = api.get_opt(&object.name_any()).await?;
                let ours = found.as_ref().is_some_and(|n| {
                    n.labels().get(GROUP_RESTORE_UID_LABEL).map(String::as_str) == Some(uid)
                });
                if !ours {
                    return Ok(Err(format!(
                        "NodeRestore {} already exists and belongs to another restore",
                        object.name_any()
                    )));
                }
            }
            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
                return Ok(Err(format!(
                    "cannot create NodeRestore {}: {} (HTTP {})",
                    object.name_any(),
                    e.message,
                    e.code
                )));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(()))
}

/// The hostname label value of a Node (what a local PV's node affinity names); the name itself
/// when no Node object says otherwise.
pub fn hostname_of(rctx: &RestoreContext, node: &str) -> String {
    rctx.ctx
        .nodes
        .state()
        .iter()
        .find(|n| n.name_any() == node)
        .and_then(|n| {
            n.labels()
                .get(crate::controller::membership::HOSTNAME_LABEL)
                .cloned()
        })
        .unwrap_or_else(|| node.to_string())
}

/// Creates the PV of every target once every volume is Cloned. Returns a problem (the restore
/// rolls back) if a clone cannot be published or a claim is missing.
pub async fn create_volumes(
    rctx: &RestoreContext,
    owner: &Owner<'_>,
    targets: &[Target],
    nodes: &[NodeRestore],
    central: Option<&CentralSnapshot>,
) -> Result<Result<(), String>, Error> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(rctx.ctx.client.clone(), owner.namespace);
    let volumes: Api<PersistentVolume> = Api::all(rctx.ctx.client.clone());
    let mut objects = Vec::new();
    for target in targets {
        // The claim's uid from the API (not a cache): the PV is pre-bound to exactly this claim.
        let Some(claim) = claims.get_opt(&target.claim).await? else {
            return Ok(Err(format!(
                "claim {} disappeared before its volume was ready",
                target.claim
            )));
        };
        let Some(bound) = BoundClaim::of(&claim) else {
            return Ok(Err(format!("claim {} has no uid or spec", target.claim)));
        };
        if let (Some(central), Some(volume)) = (central, central_volume(central, target)) {
            match rbd_copies::volume_object(owner, target, &bound, central, volume) {
                Ok(pv) => objects.push(pv),
                Err(e) => return Ok(Err(e)),
            }
            continue;
        }
        let Some((node, clone)) = nodes.iter().find_map(|n| {
            let v = n
                .status
                .as_ref()?
                .volumes
                .iter()
                .find(|v| v.persistent_volume == target.persistent_volume)?;
            Some((n, v.clone()))
        }) else {
            return Ok(Err(format!(
                "no node reports the clone of {}",
                target.persistent_volume
            )));
        };
        let hostname = hostname_of(rctx, &node.spec.node_name);
        match plan::volume_object(owner, target, &node.name_any(), &hostname, &bound, &clone) {
            Ok(pv) => objects.push(pv),
            Err(e) => return Ok(Err(e.to_string())),
        }
    }
    let params = PostParams::default();
    let results =
        futures::future::join_all(objects.iter().map(|pv| volumes.create(&params, pv))).await;
    for (pv, result) in objects.iter().zip(results) {
        match result {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let found = volumes.get_opt(&pv.name_any()).await?;
                let ours = found.as_ref().is_some_and(|v| {
                    v.labels().get(GROUP_RESTORE_UID_LABEL).map(String::as_str) == Some(owner.uid)
                });
                if !ours {
                    return Ok(Err(format!(
                        "PersistentVolume {} already exists and is not this restore's",
                        pv.name_any()
                    )));
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Ok(()))
}

/// Whether every target claim is Bound to its PV.
pub fn all_bound(targets: &[Target], claims: &BTreeMap<String, PersistentVolumeClaim>) -> bool {
    targets.iter().all(|t| {
        claims.get(&t.claim).is_some_and(|c| {
            c.spec.as_ref().and_then(|s| s.volume_name.as_deref())
                == Some(t.persistent_volume.as_str())
                && c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        })
    })
}

/// Tells every node of the restore to delete its clones.
pub async fn abort_node_restores(
    rctx: &RestoreContext,
    namespace: &str,
    uid: &str,
) -> Result<(), Error> {
    let api: Api<NodeRestore> = Api::namespaced(rctx.ctx.client.clone(), namespace);
    let listed = api
        .list(&ListParams::default().labels(&format!("{GROUP_RESTORE_UID_LABEL}={uid}")))
        .await?;
    let patch = Patch::Merge(json!({"spec": {"action": NodeRestoreAction::Abort}}));
    for node in listed.items {
        if node.spec.action == NodeRestoreAction::Abort {
            continue;
        }
        match api
            .patch(&node.name_any(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Deletes the PVs the restore made (the deleter drops their finalizer once the clone is gone).
pub async fn delete_volumes(rctx: &RestoreContext, uid: &str) -> Result<(), Error> {
    let api: Api<PersistentVolume> = Api::all(rctx.ctx.client.clone());
    let listed = api
        .list(&ListParams::default().labels(&format!("{GROUP_RESTORE_UID_LABEL}={uid}")))
        .await?;
    for pv in listed.items {
        if pv.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match api
            .delete(&pv.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Deletes the claims this restore created (annotated with its uid); returns the names of the
/// claims a person gave, which stay (Pending).
pub async fn delete_created_claims(
    rctx: &RestoreContext,
    namespace: &str,
    uid: &str,
    claim_names: &[String],
) -> Result<Vec<String>, Error> {
    let api: Api<PersistentVolumeClaim> = Api::namespaced(rctx.ctx.client.clone(), namespace);
    let mut left = Vec::new();
    for name in claim_names {
        let Some(claim) = api.get_opt(name).await? else {
            continue;
        };
        if claim
            .annotations()
            .get(CREATED_BY_ANNOTATION)
            .map(String::as_str)
            != Some(uid)
        {
            left.push(name.clone());
            continue;
        }
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        match api.delete(name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(left)
}

/// Rolls a restore back: every node deletes its clones, tandem's PVs and the claims tandem made
/// are deleted, claims a person gave stay Pending (with an Event), and the restore ends Failed.
pub async fn roll_back(
    rctx: &RestoreContext,
    restore: &GroupRestore,
    status: GroupRestoreStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    abort_node_restores(rctx, &namespace, &uid).await?;
    delete_volumes(rctx, &uid).await?;
    if status.members.iter().any(is_rbd_copy) {
        // The source GroupSnapshot waits for this restore to end before it goes.
        let snapshot = Api::<GroupSnapshot>::namespaced(rctx.ctx.client.clone(), &namespace)
            .get_opt(&restore.spec.source.group_snapshot_name)
            .await?
            .filter(|s| s.uid() == status.group_snapshot_uid);
        match snapshot.and_then(|s| s.status).and_then(|s| s.central) {
            Some(central) => {
                rbd_copies::delete_unpublished(rctx, &uid, &central, &status.members).await?
            }
            None => warn!(
                restore = %restore.name_any(),
                "the source GroupSnapshot is gone: its RBD copies without a PV stay (named after their PVs)"
            ),
        }
    }
    let names: Vec<String> = status.members.iter().map(|m| m.claim.clone()).collect();
    let not_created = delete_created_claims(rctx, &namespace, &uid, &names).await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    // Of the claims tandem did not create, only those a person made for this restore (their
    // dataSourceRef names it) stay Pending; an InPlace restore's members are the group's own
    // claims, untouched and still Bound.
    let mut left = Vec::new();
    for name in &not_created {
        if let Some(claim) = claims.get_opt(name).await?
            && plan::refers_to(&claim, &restore.name_any())
        {
            left.push(name.clone());
            publish_event(
                &rctx.ctx,
                &claim.object_ref(&()),
                EventType::Warning,
                "RestoreFailed".into(),
                Some(format!(
                    "GroupRestore {} failed ({message}); this claim stays Pending: delete it, or create a new GroupRestore and point its dataSourceRef there",
                    restore.name_any()
                )),
                "Restore",
            )
            .await;
        }
    }
    info!(restore = %restore.name_any(), %namespace, %reason, "rolled back: {message}");
    let mut message = format!("{message}; rolled back: every clone is being deleted");
    if !left.is_empty() {
        message.push_str(&format!(
            ", claim(s) {} you created stay Pending",
            left.join(", ")
        ));
    }
    fail(rctx, restore, status, reason, message).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClonedVolume, NodeRestoreSpec, NodeRestoreStatus, RestoreVolume};

    // Unit-style: the NodeRestore status is written here by hand, as an agent would; the end to end
    // tests (tests/group_restore.rs) drive real agents.
    fn node(name: &str, phase: NodeRestorePhase, volumes: &[(&str, CloneState)]) -> NodeRestore {
        let mut n = NodeRestore::new(
            &format!("nr-{name}"),
            NodeRestoreSpec {
                node_name: name.into(),
                group_restore: "r".into(),
                action: NodeRestoreAction::Clone,
                volumes: volumes
                    .iter()
                    .map(|(pv, _)| RestoreVolume {
                        persistent_volume: (*pv).into(),
                        ..Default::default()
                    })
                    .collect(),
            },
        );
        n.status = Some(NodeRestoreStatus {
            phase,
            volumes: volumes
                .iter()
                .map(|(pv, state)| ClonedVolume {
                    persistent_volume: (*pv).into(),
                    state: *state,
                    size_bytes: Some(100),
                    copied_bytes: (*state == CloneState::Cloning).then_some(25),
                    message: (*state == CloneState::Failed).then(|| "clone place exists".into()),
                    ..Default::default()
                })
                .collect(),
            message: (phase == NodeRestorePhase::Failed).then(|| "could not clone".into()),
            ..Default::default()
        });
        n
    }

    fn members() -> Vec<RestoredMember> {
        [("data", "a", "pv-1"), ("wal", "b", "pv-2")]
            .iter()
            .map(|(c, n, pv)| RestoredMember {
                source_claim: (*c).into(),
                claim: format!("{c}-r"),
                persistent_volume: (*pv).into(),
                node: (*n).into(),
                ..Default::default()
            })
            .collect()
    }

    #[test]
    fn aggregation_waits_for_every_volume_of_every_node() {
        use CloneState::*;
        use NodeRestorePhase as P;
        let cases: Vec<(Vec<NodeRestore>, Progress)> = vec![
            (vec![], Progress::Cloning),
            (
                vec![node("a", P::Cloned, &[("pv-1", Cloned)])],
                Progress::Cloning,
            ),
            (
                vec![
                    node("a", P::Cloned, &[("pv-1", Cloned)]),
                    node("b", P::Cloning, &[("pv-2", Cloning)]),
                ],
                Progress::Cloning,
            ),
            (
                vec![
                    node("a", P::Cloned, &[("pv-1", Cloned)]),
                    node("b", P::Cloned, &[("pv-2", Cloned)]),
                ],
                Progress::Cloned,
            ),
        ];
        for (nodes, want) in cases {
            let mut m = members();
            assert_eq!(aggregate(&mut m, &nodes), want, "{nodes:?}");
        }
    }

    #[test]
    fn any_failure_on_any_node_fails_the_restore_with_what_happened() {
        use CloneState::*;
        use NodeRestorePhase as P;
        for nodes in [
            vec![
                node("a", P::Cloned, &[("pv-1", Cloned)]),
                node("b", P::Failed, &[("pv-2", Failed)]),
            ],
            vec![
                node("a", P::Cloned, &[("pv-1", Cloned)]),
                node("b", P::Cloning, &[("pv-2", Failed)]),
            ],
            vec![
                node("a", P::Cloned, &[("pv-1", Deleted)]),
                node("b", P::Cloned, &[("pv-2", Cloned)]),
            ],
            vec![
                node("a", P::Aborted, &[]),
                node("b", P::Cloned, &[("pv-2", Cloned)]),
            ],
        ] {
            let mut m = members();
            let got = aggregate(&mut m, &nodes);
            let Progress::Failed(message) = got else {
                panic!("{got:?} for {nodes:?}")
            };
            assert!(message.contains("node"), "{message}");
        }
    }

    #[test]
    fn members_show_method_size_and_progress() {
        use CloneState::*;
        let nodes = vec![
            node("a", NodeRestorePhase::Cloned, &[("pv-1", Cloned)]),
            node("b", NodeRestorePhase::Cloning, &[("pv-2", Cloning)]),
        ];
        let mut m = members();
        aggregate(&mut m, &nodes);
        assert_eq!(m[0].progress_percent, Some(100));
        assert_eq!(m[0].size, Some(Quantity("100".into())));
        assert_eq!(m[1].progress_percent, Some(25));
    }

    #[test]
    fn the_deadline_counts_from_the_start() {
        let start = Timestamp::from_second(1_000_000).expect("time");
        let at = |s: i64| Timestamp::from_second(1_000_000 + s).expect("time");
        let t = Time(start);
        assert_eq!(
            remaining(Some(&t), 60, at(10)),
            Some(Duration::from_secs(50))
        );
        assert_eq!(remaining(Some(&t), 60, at(60)), None);
        assert_eq!(remaining(Some(&t), 60, at(3600)), None);
        // Clock skew (a start in the future) never makes the deadline longer.
        assert_eq!(
            remaining(Some(&t), 60, at(-10)),
            Some(Duration::from_secs(60))
        );
    }
}
