//! Mode NewClaims: validate, record the members, create the claims (Pending in the restore
//! class) and one NodeRestore per node, publish the pre-bound PVs once every volume is cloned,
//! Completed once every claim is Bound; any failure, the deadline or a deletion rolls back.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, ResourceQuota};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use serde_json::json;
use tracing::info;

use super::clones::{self, Progress};
use super::plan::{self, COMPLETED_ANNOTATION, CREATED_BY_ANNOTATION, Owner, Target};
use super::rbd_copies;
use super::validate::{self, Inputs, Verdict};
use super::{RestoreContext, now};
use crate::api::{
    GroupRestore, GroupRestoreStatus, GroupSnapshot, MemberSnapshot, NodeRestore, RestorePhase,
    RestoredMember,
};
use crate::controller::central::snapshot_path;
use crate::controller::{Error, cache_ready};

/// How long a young restore waits for its GroupSnapshot to appear (GitOps may apply both at once).
const SNAPSHOT_GRACE: Duration = Duration::from_secs(10);
/// How often a restore reads the progress of its RBD copies.
const COPY_POLL: Duration = Duration::from_secs(1);

pub async fn reconcile(restore: &GroupRestore, rctx: &RestoreContext) -> Result<Action, Error> {
    let status = restore.status.clone().unwrap_or_default();
    if restore.metadata.deletion_timestamp.is_some() {
        return match status.phase {
            RestorePhase::Completed | RestorePhase::Failed => Ok(Action::await_change()),
            RestorePhase::Pending if status.members.is_empty() => {
                clones::fail(
                    rctx,
                    restore,
                    status,
                    "Deleted",
                    "the GroupRestore was deleted before it started".into(),
                )
                .await
            }
            _ => {
                clones::roll_back(
                    rctx,
                    restore,
                    status,
                    "Deleted",
                    "the GroupRestore was deleted before it completed".into(),
                )
                .await
            }
        };
    }
    match status.phase {
        // Done: re-applying the same object (GitOps) restores nothing again.
        RestorePhase::Completed | RestorePhase::Failed => Ok(Action::await_change()),
        RestorePhase::Pending if status.members.is_empty() => start(restore, status, rctx).await,
        RestorePhase::Binding => drive(restore, status, rctx, true).await,
        _ => drive(restore, status, rctx, false).await,
    }
}

fn storage_class_of(rctx: &RestoreContext) -> &str {
    &rctx.storage_class
}

async fn start(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    cache_ready(&rctx.ctx.claims, "PersistentVolumeClaims").await?;
    cache_ready(&rctx.ctx.node_snapshots, "NodeSnapshots").await?;
    let snapshot = Api::<GroupSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?;
    let class_name = storage_class_of(rctx);
    let class = Api::<StorageClass>::all(client.clone())
        .get_opt(class_name)
        .await?;
    let claims = claims_of(rctx, &namespace);
    let node_snapshots: BTreeMap<String, String> = rctx
        .ctx
        .node_snapshots
        .state()
        .iter()
        .filter(|n| n.namespace().as_deref() == Some(namespace.as_str()))
        .filter_map(|n| Some((n.name_any(), n.uid()?)))
        .collect();
    let quotas = Api::<ResourceQuota>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?
        .items;
    let age = restore
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| {
            Duration::try_from(k8s_openapi::jiff::Timestamp::now().duration_since(t.0))
                .unwrap_or_default()
        })
        .unwrap_or_default();
    let verdict = validate::validate(&Inputs {
        namespace: &namespace,
        restore,
        restore_uid: &uid,
        snapshot: snapshot.as_ref(),
        storage_class_name: class_name,
        storage_class: class.as_ref(),
        claims: &claims,
        node_snapshots: &node_snapshots,
        quotas: &quotas,
        settling: age < SNAPSHOT_GRACE,
    });
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    match verdict {
        Verdict::Refuse { reason, message } => {
            clones::fail(rctx, restore, status, reason, message).await
        }
        Verdict::Wait(message) => {
            if clones::past_deadline(restore) {
                return clones::fail(
                    rctx,
                    restore,
                    status,
                    "DeadlineExceeded",
                    format!(
                        "spec.deadlineSeconds ({} s) passed while {message}",
                        restore.spec.deadline_seconds
                    ),
                )
                .await;
            }
            let changed =
                status.message.as_deref() != Some(message.as_str()) || status.start_time.is_none();
            status.message = Some(message.clone());
            status.start_time.get_or_insert_with(now);
            status.observed_generation = restore.metadata.generation;
            clones::set_conditions(
                &mut status,
                restore.metadata.generation,
                (false, "Waiting", message),
                (false, "Waiting", "no claim is bound yet".into()),
            );
            if changed {
                clones::write_status(&api, &name, &status).await?;
            }
            // Claim and GroupSnapshot events wake the restore; this covers the grace and the deadline.
            let mut wake = clones::until_deadline(restore);
            if age < SNAPSHOT_GRACE {
                wake = Action::requeue(SNAPSHOT_GRACE - age + Duration::from_millis(100));
            }
            Ok(wake)
        }
        Verdict::Start(start) => {
            let snapshot = snapshot.expect("validation started from a snapshot");
            let snapshot_status = snapshot.status.clone().unwrap_or_default();
            status.phase = RestorePhase::Cloning;
            status.group_snapshot_uid = snapshot.uid();
            status.consistency = snapshot_status.consistency;
            let central = snapshot_status.central.as_ref();
            status.members = start
                .targets
                .iter()
                .map(|t| {
                    let member = RestoredMember {
                        source_claim: t.member.claim.clone(),
                        claim: t.claim.clone(),
                        persistent_volume: t.persistent_volume.clone(),
                        node: t.member.node.clone(),
                        ..Default::default()
                    };
                    match rbd_copies::central_volume(central, t) {
                        Some(_) => rbd_copies::pending_member(member, t),
                        None => member,
                    }
                })
                .collect();
            status.member_count = i32::try_from(status.members.len()).unwrap_or(i32::MAX);
            status.start_time.get_or_insert_with(now);
            status.message = None;
            status.observed_generation = restore.metadata.generation;
            let (copies, clones): (Vec<&RestoredMember>, Vec<&RestoredMember>) = status
                .members
                .iter()
                .partition(|m| rbd_copies::is_rbd_copy(m));
            let nodes: std::collections::BTreeSet<&str> =
                clones.iter().map(|m| m.node.as_str()).collect();
            let mut message = format!(
                "cloning {} member(s) on {} node(s)",
                clones.len(),
                nodes.len()
            );
            if !copies.is_empty() {
                message.push_str(&format!(
                    ", copying {} RBD image(s) from {}",
                    copies.len(),
                    central.map(snapshot_path).unwrap_or_default()
                ));
            }
            clones::set_conditions(
                &mut status,
                restore.metadata.generation,
                (false, "Cloning", message.clone()),
                (
                    false,
                    "Cloning",
                    "the claims wait (Pending) until every member is cloned".into(),
                ),
            );
            // Recorded first: from here on the restore knows its members and rolls back whatever
            // it made for them.
            clones::write_status(&api, &name, &status).await?;
            info!(restore = %name, %namespace, members = status.member_count, "restore started");
            clones::publish(rctx, restore, EventType::Normal, "Cloning", message).await;
            Ok(Action::requeue(Duration::from_millis(10)))
        }
    }
}

/// The namespace's claims by name, from the cache.
fn claims_of(rctx: &RestoreContext, namespace: &str) -> BTreeMap<String, PersistentVolumeClaim> {
    rctx.ctx
        .claims
        .state()
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace))
        .map(|c| (c.name_any(), c.as_ref().clone()))
        .collect()
}

/// The targets of a started restore: its recorded members, with what the GroupSnapshot recorded
/// of each (cut time, filesystem, capacity, modes).
fn targets_of(status: &GroupRestoreStatus, snapshot: Option<&GroupSnapshot>) -> Vec<Target> {
    let recorded: Vec<MemberSnapshot> = snapshot
        .and_then(|s| s.status.as_ref())
        .map(|s| s.members.clone())
        .unwrap_or_default();
    status
        .members
        .iter()
        .map(|m| {
            let member = recorded
                .iter()
                .find(|r| r.claim == m.source_claim && r.node == m.node)
                .cloned()
                .unwrap_or_else(|| MemberSnapshot {
                    claim: m.source_claim.clone(),
                    node: m.node.clone(),
                    ..Default::default()
                });
            Target {
                member,
                claim: m.claim.clone(),
                persistent_volume: m.persistent_volume.clone(),
            }
        })
        .collect()
}

async fn drive(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
    binding: bool,
) -> Result<Action, Error> {
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let uid = restore.uid().ok_or(Error::MissingUid)?;
    let name = restore.name_any();
    let client = rctx.ctx.client.clone();
    let api: Api<GroupRestore> = Api::namespaced(client.clone(), &namespace);
    cache_ready(&rctx.node_restores, "NodeRestores").await?;
    cache_ready(&rctx.ctx.claims, "PersistentVolumeClaims").await?;
    if clones::past_deadline(restore) {
        return clones::roll_back(
            rctx,
            restore,
            status,
            "DeadlineExceeded",
            format!(
                "the restore did not complete within spec.deadlineSeconds ({} s)",
                restore.spec.deadline_seconds
            ),
        )
        .await;
    }
    let snapshot = Api::<GroupSnapshot>::namespaced(client.clone(), &namespace)
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?;
    if !binding
        && let Some((reason, message)) = validate::snapshot_problem(
            &namespace,
            &restore.spec.source.group_snapshot_name,
            snapshot.as_ref(),
            status.group_snapshot_uid.as_deref(),
        )
        && reason != "GroupSnapshotDeleting"
    {
        return clones::roll_back(rctx, restore, status, reason, message).await;
    }
    let targets = targets_of(&status, snapshot.as_ref());
    let central = snapshot
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.central.clone());
    // RBD members are copied by the controller; the rest by their nodes.
    let cloned_on_nodes: Vec<Target> = targets
        .iter()
        .filter(|t| rbd_copies::central_volume(central.as_ref(), t).is_none())
        .cloned()
        .collect();
    let class = storage_class_of(rctx).to_string();
    let owner = Owner::of(restore, &namespace, &uid, &class);

    // The claims: created (if tandem creates them) and still this restore's.
    let claims = claims_of(rctx, &namespace);
    let create = restore
        .spec
        .new_claims
        .as_ref()
        .is_none_or(|n| n.create_claims);
    let labels = restore
        .spec
        .new_claims
        .as_ref()
        .map(|n| n.labels.clone())
        .unwrap_or_default();
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    let mut missing = Vec::new();
    for target in &targets {
        match claims.get(&target.claim) {
            Some(c)
                if c.annotations()
                    .get(CREATED_BY_ANNOTATION)
                    .map(String::as_str)
                    == Some(uid.as_str())
                    || plan::refers_to(c, &name) => {}
            Some(_) => {
                return clones::roll_back(
                    rctx,
                    restore,
                    status,
                    "ClaimExists",
                    format!(
                        "claim {} was created by someone else while the restore ran",
                        target.claim
                    ),
                )
                .await;
            }
            None if create && !binding => {
                let object = plan::claim_object(&owner, target, &labels);
                match claims_api.create(&PostParams::default(), &object).await {
                    Ok(_) => {}
                    // Created a moment ago, not cached yet (checked on the next pass).
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 422) => {
                        return clones::roll_back(
                            rctx,
                            restore,
                            status,
                            "ClaimCreateFailed",
                            format!(
                                "cannot create claim {}: {} (HTTP {})",
                                target.claim, e.message, e.code
                            ),
                        )
                        .await;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            None => missing.push(target.claim.clone()),
        }
    }
    if binding && !missing.is_empty() {
        return clones::roll_back(
            rctx,
            restore,
            status,
            "ClaimDeleted",
            format!(
                "claim(s) {} were deleted before they were bound",
                missing.join(", ")
            ),
        )
        .await;
    }

    // One NodeRestore per node.
    let node_snapshot_uids: BTreeMap<String, String> = rctx
        .ctx
        .node_snapshots
        .state()
        .iter()
        .filter(|n| n.namespace().as_deref() == Some(namespace.as_str()))
        .filter_map(|n| Some((n.name_any(), n.uid()?)))
        .collect();
    let wanted = plan::node_restores(&owner, &cloned_on_nodes, &node_snapshot_uids);
    if !binding
        && let Err(problem) = clones::ensure_node_restores(rctx, &namespace, &uid, &wanted).await?
    {
        return clones::roll_back(rctx, restore, status, "NodeRestoreCreateFailed", problem).await;
    }
    let nodes: Vec<NodeRestore> = clones::node_restores_of(rctx, &namespace, &uid);
    let mut progress = clones::aggregate(&mut status.members, &nodes);
    if !binding
        && !matches!(progress, Progress::Failed(_))
        && let Some(central) = &central
    {
        match rbd_copies::copy_members(rctx, &uid, central, &targets, &mut status.members).await? {
            rbd_copies::Copying::Done => {}
            rbd_copies::Copying::Running => progress = Progress::Cloning,
            rbd_copies::Copying::Failed(problem) => progress = Progress::Failed(problem),
        }
    }
    let copying = status
        .members
        .iter()
        .any(|m| rbd_copies::is_rbd_copy(m) && m.cloned_at.is_none());
    match progress {
        Progress::Failed(message) => {
            clones::roll_back(rctx, restore, status, "CloneFailed", message).await
        }
        Progress::Cloning => {
            if !missing.is_empty() {
                let message = format!(
                    "waiting for claim(s) {} (spec.newClaims.createClaims is false)",
                    missing.join(", ")
                );
                status.message = Some(message);
            }
            if restore.status.as_ref() != Some(&status) {
                clones::write_status(&api, &name, &status).await?;
            }
            if copying {
                // The controller's own copies report no event: their progress is read here.
                return Ok(Action::requeue(COPY_POLL));
            }
            Ok(clones::until_deadline(restore))
        }
        Progress::Cloned if !missing.is_empty() => {
            // Cloned, but a claim a person is to create is not there yet.
            status.message = Some(format!(
                "every member is cloned; waiting for claim(s) {} (spec.newClaims.createClaims is false)",
                missing.join(", ")
            ));
            if restore.status.as_ref() != Some(&status) {
                clones::write_status(&api, &name, &status).await?;
            }
            Ok(clones::until_deadline(restore))
        }
        Progress::Cloned => {
            if let Err(problem) =
                clones::create_volumes(rctx, &owner, &targets, &nodes, central.as_ref()).await?
            {
                return clones::roll_back(rctx, restore, status, "PublishFailed", problem).await;
            }
            if clones::all_bound(&targets, &claims) {
                return complete(restore, status, rctx, &owner, &targets, &nodes).await;
            }
            if !binding {
                status.phase = RestorePhase::Binding;
                status.message = None;
                clones::set_conditions(
                    &mut status,
                    restore.metadata.generation,
                    (
                        false,
                        "Binding",
                        "every member is cloned; the claims are binding".into(),
                    ),
                    (
                        false,
                        "Binding",
                        "the volumes are published, pre-bound to the claims".into(),
                    ),
                );
            }
            if restore.status.as_ref() != Some(&status) {
                clones::write_status(&api, &name, &status).await?;
            }
            Ok(clones::until_deadline(restore))
        }
    }
}

async fn complete(
    restore: &GroupRestore,
    mut status: GroupRestoreStatus,
    rctx: &RestoreContext,
    owner: &Owner<'_>,
    targets: &[Target],
    nodes: &[NodeRestore],
) -> Result<Action, Error> {
    let client = rctx.ctx.client.clone();
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), owner.namespace);
    // Provenance on every claim, also those a person created.
    for target in targets {
        let annotations = plan::provenance(
            owner.namespace,
            owner.snapshot,
            &target.member,
            owner.consistency,
        );
        claims_api
            .patch(
                &target.claim,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
            )
            .await?;
    }
    // The clones now belong to bound claims: they outlive the GroupRestore.
    let nodes_api: Api<NodeRestore> = Api::namespaced(client.clone(), owner.namespace);
    for node in nodes {
        if node.annotations().contains_key(COMPLETED_ANNOTATION) {
            continue;
        }
        nodes_api
            .patch(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {COMPLETED_ANNOTATION: "true"}}})),
            )
            .await?;
    }
    let api: Api<GroupRestore> = Api::namespaced(client, owner.namespace);
    status.phase = RestorePhase::Completed;
    status.completion_time = Some(now());
    status.message = None;
    let message = format!(
        "{} claim(s) restored from GroupSnapshot {} and Bound",
        status.member_count, owner.snapshot
    );
    clones::set_conditions(
        &mut status,
        restore.metadata.generation,
        (true, "Restored", message.clone()),
        (
            true,
            "Bound",
            "every claim is Bound to its restored volume".into(),
        ),
    );
    clones::write_status(&api, &restore.name_any(), &status).await?;
    info!(restore = %restore.name_any(), namespace = %owner.namespace, "{message}");
    clones::publish(rctx, restore, EventType::Normal, "Restored", message).await;
    rctx.wake_snapshot(owner.namespace, owner.snapshot);
    Ok(Action::await_change())
}
