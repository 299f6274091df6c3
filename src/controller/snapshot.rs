//! Reconciles GroupSnapshots: records the members, drives one NodeSnapshot per node through the
//! freeze barrier (see [`super::barrier`]), reports, and cleans up on deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Error as WatchError};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::barrier::{NodeView, Step, next_step};
use super::conditions::condition;
use super::{CONTROLLER_NAME, Context, Error, cache_ready, publish_event};
use crate::api::{
    CONDITION_READY, Consistency, ConsistencyGroup, FreezePolicy, GroupSnapshot,
    GroupSnapshotPhase, GroupSnapshotStatus, MemberSnapshot, NodeAction, NodeFreezeWindow,
    NodePhase, NodeSnapshot, NodeSnapshotSpec, NodeVolume,
};
use crate::finalizer;

/// The controller's finalizer on GroupSnapshots and on the NodeSnapshots it creates: member
/// snapshots go only with their GroupSnapshot, never on their own.
pub const FINALIZER: &str = "tandem.dev/group-snapshot";
/// The label that ties a NodeSnapshot to its GroupSnapshot.
pub const GROUP_SNAPSHOT_LABEL: &str = "tandem.dev/group-snapshot";
/// How long a GroupSnapshot waits for its ConsistencyGroup to appear (GitOps may apply both at once).
const GROUP_GRACE: Duration = Duration::from_secs(10);
/// Time an agent gets, beyond the freeze timeout, to pick up and answer a NodeSnapshot.
const AGENT_GRACE: Duration = Duration::from_secs(5);

/// Runs the GroupSnapshot controller; NodeSnapshot changes re-reconcile their GroupSnapshot.
pub async fn run_snapshot_controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    node_snapshot_events: BoxStream<'static, Result<NodeSnapshot, WatchError>>,
) {
    let snapshots: Api<GroupSnapshot> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // NodeSnapshots come from the shared cache (no list on the release path) and wake their owner.
    Controller::new(snapshots, watcher::Config::default())
        .watches_stream(node_snapshot_events, |node: NodeSnapshot| {
            let namespace = node.namespace();
            node.owner_references()
                .iter()
                .filter(|o| o.kind == "GroupSnapshot" && o.controller == Some(true))
                .map(|o| {
                    ObjectRef::<GroupSnapshot>::new(&o.name)
                        .within(namespace.as_deref().unwrap_or(""))
                })
                .collect::<Vec<_>>()
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "group snapshot reconcile failed");
            }
        })
        .await;
}

fn error_policy(snapshot: Arc<GroupSnapshot>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(snapshot = %snapshot.name_any(), error = %error, "will retry");
    ctx.metrics.reconcile_error("group_snapshot");
    Action::requeue(Duration::from_secs(2))
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn elapsed_since(time: &Time) -> Duration {
    let since = Timestamp::now().duration_since(time.0);
    Duration::try_from(since).unwrap_or_default()
}

async fn reconcile(snapshot: Arc<GroupSnapshot>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let name = snapshot.name_any();
    let api: Api<GroupSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let nodes_api: Api<NodeSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);

    if snapshot.metadata.deletion_timestamp.is_some() {
        return cleanup(&snapshot, &api, &nodes_api).await;
    }
    if let Some(patch) = finalizer::adding(snapshot.as_ref(), FINALIZER) {
        api.patch(&name, &PatchParams::default(), &patch).await?;
        return Ok(Action::await_change());
    }

    let status = snapshot.status.clone().unwrap_or_default();
    match status.phase {
        // Done: re-applying the same object (GitOps) never cuts again.
        GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed => Ok(Action::await_change()),
        GroupSnapshotPhase::Pending if status.members.is_empty() => {
            start(&snapshot, status, &api, &ctx).await
        }
        _ => drive(&snapshot, status, &api, &nodes_api, &ctx).await,
    }
}

/// Writes the status (server-side apply, whole status owned by the controller).
async fn write_status(
    api: &Api<GroupSnapshot>,
    name: &str,
    status: &GroupSnapshotStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": GroupSnapshot::api_version(&()),
        "kind": GroupSnapshot::kind(&()),
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

async fn publish(
    ctx: &Context,
    snapshot: &GroupSnapshot,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference = snapshot.object_ref(&());
    publish_event(
        ctx,
        &reference,
        type_,
        reason.into(),
        Some(note),
        "Snapshot",
    )
    .await;
}

/// Ends the snapshot as Failed with a message a person can act on.
async fn fail(
    snapshot: &GroupSnapshot,
    mut status: GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    status.phase = GroupSnapshotPhase::Failed;
    status.completion_time = Some(now());
    status.message = Some(message.clone());
    status.observed_generation = snapshot.metadata.generation;
    status.conditions = vec![condition(
        &status.conditions,
        CONDITION_READY,
        false,
        reason,
        message.clone(),
        snapshot.metadata.generation,
    )];
    write_status(api, &snapshot.name_any(), &status).await?;
    ctx.metrics.snapshot_finished("failed");
    publish(ctx, snapshot, EventType::Warning, reason, message).await;
    Ok(Action::await_change())
}

/// Records the member list and creates the NodeSnapshots, unless the group cannot be snapshotted
/// or another snapshot is freezing one of the same volumes.
async fn start(
    snapshot: &GroupSnapshot,
    mut status: GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let group_name = &snapshot.spec.group_name;
    let age = snapshot
        .metadata
        .creation_timestamp
        .as_ref()
        .map(elapsed_since)
        .unwrap_or_default();
    // GitOps may apply a group, its claims and a snapshot at once: give them a moment to settle
    // before calling the snapshot failed.
    let settling = age < GROUP_GRACE;
    let wait = |status: &mut GroupSnapshotStatus, message: String| {
        let changed = status.message.as_deref() != Some(message.as_str());
        status.message = Some(message);
        changed
    };
    let retry = Action::requeue(Duration::from_millis(500));

    let Some(group) = groups.get_opt(group_name).await? else {
        if settling {
            if wait(
                &mut status,
                format!("waiting for ConsistencyGroup {group_name}"),
            ) {
                write_status(api, &snapshot.name_any(), &status).await?;
            }
            return Ok(retry);
        }
        return fail(
            snapshot,
            status,
            api,
            ctx,
            "GroupNotFound",
            format!(
                "ConsistencyGroup {group_name} does not exist in namespace {namespace}; create it, then create a new GroupSnapshot"
            ),
        )
        .await;
    };
    let group_status = group.status.clone().unwrap_or_default();
    if group_status.observed_generation != group.metadata.generation {
        // The group's members are not resolved yet for its current spec.
        return Ok(retry);
    }
    if group_status.members.is_empty() {
        return fail(
            snapshot,
            status,
            api,
            ctx,
            "EmptyGroup",
            format!("ConsistencyGroup {group_name} selects no volume; nothing to snapshot"),
        )
        .await;
    }
    let unsupported: Vec<String> = group_status
        .members
        .iter()
        .filter(|m| !m.supported)
        .map(|m| {
            format!(
                "{} ({})",
                m.claim,
                m.message.as_deref().unwrap_or("cannot be snapshotted")
            )
        })
        .collect();
    if !unsupported.is_empty() {
        let message = format!(
            "ConsistencyGroup {group_name} has members that cannot be snapshotted: {}",
            unsupported.join("; ")
        );
        if settling {
            if wait(&mut status, format!("waiting: {message}")) {
                write_status(api, &snapshot.name_any(), &status).await?;
            }
            return Ok(retry);
        }
        return fail(snapshot, status, api, ctx, "UnsupportedMembers", message).await;
    }

    let members: Vec<MemberSnapshot> = group_status
        .members
        .iter()
        .filter_map(|m| {
            Some(MemberSnapshot {
                claim: m.claim.clone(),
                persistent_volume: m.persistent_volume.clone()?,
                node: m.node.clone()?,
                ..Default::default()
            })
        })
        .collect();

    // One snapshot at a time per volume: checked and claimed under a lock, against the API (not a
    // cache), so two reconciles can never both start on the same volume.
    let _guard = ctx.start_lock.lock().await;
    let all: Api<GroupSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let ours: BTreeSet<&str> = members
        .iter()
        .map(|m| m.persistent_volume.as_str())
        .collect();
    for other in all.list(&ListParams::default()).await? {
        if other.uid() == snapshot.uid() {
            continue;
        }
        let Some(other_status) = other.status.as_ref() else {
            continue;
        };
        if !matches!(
            other_status.phase,
            GroupSnapshotPhase::Cutting | GroupSnapshotPhase::Releasing
        ) {
            continue;
        }
        if let Some(shared) = other_status
            .members
            .iter()
            .find(|m| ours.contains(m.persistent_volume.as_str()))
        {
            let message = format!(
                "waiting for GroupSnapshot {} that is snapshotting volume {} (claim {})",
                other.name_any(),
                shared.persistent_volume,
                shared.claim
            );
            if status.message.as_deref() != Some(message.as_str()) {
                status.message = Some(message);
                write_status(api, &snapshot.name_any(), &status).await?;
            }
            return Ok(Action::requeue(Duration::from_millis(500)));
        }
    }

    let nodes: BTreeSet<String> = members.iter().map(|m| m.node.clone()).collect();
    status.phase = GroupSnapshotPhase::Cutting;
    status.member_count = i32::try_from(members.len()).unwrap_or(i32::MAX);
    status.members = members;
    status.nodes = nodes
        .iter()
        .map(|n| NodeFreezeWindow {
            node: n.clone(),
            freeze_window_millis: None,
        })
        .collect();
    status.start_time = Some(now());
    status.message = None;
    status.observed_generation = snapshot.metadata.generation;
    status.conditions = vec![condition(
        &status.conditions,
        CONDITION_READY,
        false,
        "Cutting",
        format!(
            "cutting {} volumes on {} nodes",
            status.member_count,
            nodes.len()
        ),
        snapshot.metadata.generation,
    )];
    write_status(api, &snapshot.name_any(), &status).await?;
    drop(_guard);
    info!(snapshot = %snapshot.name_any(), %namespace, members = status.member_count, nodes = nodes.len(), "snapshot started");
    publish(
        ctx,
        snapshot,
        EventType::Normal,
        "Cutting",
        format!(
            "freezing and cutting {} volumes on {} nodes",
            status.member_count,
            nodes.len()
        ),
    )
    .await;
    Ok(Action::requeue(Duration::from_millis(10)))
}

/// The NodeSnapshot name for a node: `<snapshot>-<node>`, shortened with a hash when too long.
pub fn node_snapshot_name(snapshot: &str, node: &str) -> String {
    let name = format!("{snapshot}-{node}");
    if name.len() <= 253 {
        return name;
    }
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{snapshot}-{}-{hash:016x}", &node[..170])
}

fn node_snapshot_for(
    snapshot: &GroupSnapshot,
    group_freeze: (FreezePolicy, i32),
    node: &str,
    members: &[&MemberSnapshot],
    single_node: bool,
) -> Result<NodeSnapshot, Error> {
    let name = snapshot.name_any();
    let owner = OwnerReference {
        api_version: GroupSnapshot::api_version(&()).into(),
        kind: GroupSnapshot::kind(&()).into(),
        name: name.clone(),
        uid: snapshot.uid().ok_or(Error::MissingNamespace)?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut object = NodeSnapshot::new(
        &node_snapshot_name(&name, node),
        NodeSnapshotSpec {
            node_name: node.into(),
            group_snapshot: name.clone(),
            action: NodeAction::Cut,
            release_after_cut: single_node,
            freeze: group_freeze.0,
            freeze_timeout_seconds: group_freeze.1,
            deletion_policy: snapshot.spec.deletion_policy,
            volumes: members
                .iter()
                .map(|m| NodeVolume {
                    claim: m.claim.clone(),
                    persistent_volume: m.persistent_volume.clone(),
                })
                .collect(),
        },
    );
    object.metadata.owner_references = Some(vec![owner]);
    object.metadata.finalizers = Some(vec![FINALIZER.into()]);
    object.metadata.labels = Some(BTreeMap::from([(GROUP_SNAPSHOT_LABEL.into(), name)]));
    Ok(object)
}

/// Drives a started snapshot: creates missing NodeSnapshots, then follows the barrier.
async fn drive(
    snapshot: &GroupSnapshot,
    mut status: GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    nodes_api: &Api<NodeSnapshot>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut by_node: BTreeMap<&str, Vec<&MemberSnapshot>> = BTreeMap::new();
    for member in &status.members {
        by_node
            .entry(member.node.as_str())
            .or_default()
            .push(member);
    }

    // Never judge from a cache that has not listed everything yet (after a restart, say).
    cache_ready(&ctx.node_snapshots, "NodeSnapshots").await?;
    // From the cache: it is updated before the event that woke us is delivered. A NodeSnapshot
    // created a moment ago and not cached yet is created again, which the API answers with 409.
    let existing: BTreeMap<String, NodeSnapshot> = ctx
        .node_snapshots
        .state()
        .iter()
        .filter(|n| n.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|n| {
            n.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == snapshot.uid().as_ref())
        })
        .map(|n| (n.spec.node_name.clone(), n.as_ref().clone()))
        .collect();
    let missing: Vec<&str> = by_node
        .keys()
        .copied()
        .filter(|n| !existing.contains_key(*n))
        .collect();
    if !missing.is_empty() {
        if status.phase != GroupSnapshotPhase::Cutting {
            // NodeSnapshots vanished after the cut started (deleted by hand): that is a failure.
            let message = format!(
                "NodeSnapshots of node(s) {} disappeared",
                missing.join(", ")
            );
            return fail(snapshot, status, api, ctx, "NodeSnapshotLost", message).await;
        }
        // The group's freeze settings as of now; the member list is already fixed in status.
        let group = groups.get_opt(&snapshot.spec.group_name).await?;
        let freeze = group
            .map(|g| (g.spec.freeze, g.spec.freeze_timeout_seconds))
            .unwrap_or((FreezePolicy::Required, 10));
        let single_node = by_node.len() == 1;
        let objects = missing
            .iter()
            .map(|node| node_snapshot_for(snapshot, freeze, node, &by_node[node], single_node))
            .collect::<Result<Vec<_>, _>>()?;
        // All nodes at once: a node that hears late freezes late and widens the group's window.
        let params = PostParams::default();
        futures::future::try_join_all(objects.iter().map(|object| async {
            match nodes_api.create(&params, object).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }))
        .await?;
        return Ok(Action::await_change());
    }

    let freeze_timeout = existing
        .values()
        .map(|n| n.spec.freeze_timeout_seconds)
        .max()
        .unwrap_or(10);
    let freeze_timeout = Duration::from_secs(u64::try_from(freeze_timeout).unwrap_or(10));
    let started = status
        .start_time
        .as_ref()
        .map(elapsed_since)
        .unwrap_or_default();
    let deadline = freeze_timeout + AGENT_GRACE;
    let views: Vec<NodeView> = existing
        .values()
        .map(|n| NodeView {
            node: n.spec.node_name.clone(),
            action: n.spec.action,
            phase: n.status.as_ref().map(|s| s.phase).unwrap_or_default(),
            message: n.status.as_ref().and_then(|s| s.message.clone()),
        })
        .collect();
    let step = next_step(
        &views,
        started > deadline,
        started > deadline * 2 + AGENT_GRACE,
    );
    let wake =
        |d: Duration| Action::requeue(d.saturating_sub(started) + Duration::from_millis(100));

    match step {
        Step::Wait => {
            fill_members(&mut status, &existing);
            // While nodes hold their freezes, a status write here would only delay noticing the
            // last node's cut; progress is visible on the NodeSnapshots meanwhile.
            let holding = existing
                .values()
                .any(|n| n.status.as_ref().is_some_and(|s| s.phase == NodePhase::Cut));
            if !holding && status_changed(snapshot, &status) {
                write_status(api, &name, &status).await?;
            }
            Ok(if started <= deadline {
                wake(deadline)
            } else {
                wake(deadline * 2 + AGENT_GRACE)
            })
        }
        Step::Release(nodes) => {
            let cut_duration = started.as_secs_f64();
            ctx.metrics.cut_duration(cut_duration);
            set_action(nodes_api, &name, &nodes, NodeAction::Release).await?;
            status.phase = GroupSnapshotPhase::Releasing;
            fill_members(&mut status, &existing);
            write_status(api, &name, &status).await?;
            Ok(Action::await_change())
        }
        Step::Abort(nodes) => {
            set_action(nodes_api, &name, &nodes, NodeAction::Abort).await?;
            Ok(wake(deadline * 2 + AGENT_GRACE))
        }
        Step::Ready => {
            fill_members(&mut status, &existing);
            let all_frozen = status.members.iter().all(|m| m.frozen);
            let consistency = if all_frozen {
                Consistency::FilesystemFrozen
            } else {
                Consistency::Independent
            };
            status.phase = GroupSnapshotPhase::Ready;
            status.consistency = Some(consistency);
            status.completion_time = Some(now());
            status.message = None;
            let window = status.freeze_window_millis;
            let message = format!(
                "{} volumes on {} nodes, {consistency:?}, freeze window {} ms",
                status.member_count,
                existing.len(),
                window.map_or("-".into(), |w| w.to_string())
            );
            status.conditions = vec![condition(
                &status.conditions,
                CONDITION_READY,
                true,
                "SnapshotReady",
                message.clone(),
                snapshot.metadata.generation,
            )];
            write_status(api, &name, &status).await?;
            if let Some(window) = window {
                ctx.metrics.freeze_window(window as f64 / 1000.0);
            }
            ctx.metrics.snapshot_finished(match consistency {
                Consistency::FilesystemFrozen => "ready_frozen",
                Consistency::Independent => "ready_independent",
            });
            info!(snapshot = %name, %namespace, "{message}");
            publish(ctx, snapshot, EventType::Normal, "SnapshotReady", message).await;
            Ok(Action::await_change())
        }
        Step::Failed(message) => {
            fill_members(&mut status, &existing);
            let message = format!("{message}; every partial snapshot was removed");
            fail(snapshot, status, api, ctx, "SnapshotFailed", message).await
        }
    }
}

fn status_changed(snapshot: &GroupSnapshot, status: &GroupSnapshotStatus) -> bool {
    snapshot.status.as_ref() != Some(status)
}

/// Tells nodes what to do next, all at once: the release is on the freeze window's critical path.
async fn set_action(
    nodes_api: &Api<NodeSnapshot>,
    snapshot: &str,
    nodes: &[String],
    action: NodeAction,
) -> Result<(), Error> {
    let patch = Patch::Merge(json!({"spec": {"action": action}}));
    let params = PatchParams::default();
    futures::future::try_join_all(nodes.iter().map(|node| {
        let name = node_snapshot_name(snapshot, node);
        let (patch, params) = (&patch, &params);
        async move { nodes_api.patch(&name, params, patch).await }
    }))
    .await?;
    Ok(())
}

/// Copies what the agents reported into the member list and the freeze windows.
fn fill_members(status: &mut GroupSnapshotStatus, nodes: &BTreeMap<String, NodeSnapshot>) {
    for member in &mut status.members {
        let reported = nodes
            .get(&member.node)
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.volumes.iter().find(|v| v.claim == member.claim));
        if let Some(v) = reported {
            member.snapshot_handle = v.snapshot_handle.clone();
            member.size = v.size_bytes.map(|b| Quantity(b.to_string()));
            member.cut_time = v.cut_time.clone();
            member.frozen = v.frozen;
            member.message = v.reason.clone();
        }
    }
    let mut first_freeze: Option<Timestamp> = None;
    let mut last_thaw: Option<Timestamp> = None;
    status.nodes = nodes
        .iter()
        .map(|(node, n)| {
            let reported = n.status.as_ref();
            let window = reported.and_then(|s| s.freeze_window_millis);
            if let (Some(start), Some(window)) =
                (reported.and_then(|s| s.freeze_start.as_ref()), window)
            {
                let end = start.0 + k8s_openapi::jiff::SignedDuration::from_millis(window);
                first_freeze = Some(first_freeze.map_or(start.0, |f| f.min(start.0)));
                last_thaw = Some(last_thaw.map_or(end, |l| l.max(end)));
            }
            NodeFreezeWindow {
                node: node.clone(),
                freeze_window_millis: window,
            }
        })
        .collect();
    status.freeze_window_millis = match (first_freeze, last_thaw) {
        (Some(first), Some(last))
            if nodes.values().all(|n| {
                n.status
                    .as_ref()
                    .is_some_and(|s| s.freeze_window_millis.is_some())
            }) =>
        {
            Some(last.duration_since(first).as_millis() as i64)
        }
        _ => None,
    };
}

/// Deletion: NodeSnapshots go first (their agents delete or keep the snapshots as the
/// deletionPolicy says), then the GroupSnapshot's own finalizer.
async fn cleanup(
    snapshot: &GroupSnapshot,
    api: &Api<GroupSnapshot>,
    nodes_api: &Api<NodeSnapshot>,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let mut status = snapshot.status.clone().unwrap_or_default();
    if status.phase != GroupSnapshotPhase::Deleting {
        // `kubectl get gsnap` shows what is going on while the agents delete (or keep) snapshots.
        status.phase = GroupSnapshotPhase::Deleting;
        status.message = Some(match snapshot.spec.deletion_policy {
            crate::api::DeletionPolicy::Delete => {
                "deleting the member snapshots on their nodes".into()
            }
            crate::api::DeletionPolicy::Retain => {
                "releasing the member snapshots, which are kept on their nodes".into()
            }
        });
        write_status(api, &name, &status).await?;
    }
    let remaining = nodes_api
        .list(&ListParams::default().labels(&format!("{GROUP_SNAPSHOT_LABEL}={name}")))
        .await?;
    for node in &remaining {
        if node.metadata.deletion_timestamp.is_none() {
            match nodes_api
                .delete(&node.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(patch) = finalizer::removing(node, FINALIZER) {
            match nodes_api
                .patch(&node.name_any(), &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {}
                // Gone, or changed under us (a conflict): the next reconcile sees it anew.
                Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    if !remaining.items.is_empty() {
        // The agents finish the deletion; their NodeSnapshots' removal wakes us up.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if let Some(patch) = finalizer::removing(snapshot, FINALIZER) {
        api.patch(&name, &PatchParams::default(), &patch).await?;
    }
    info!(snapshot = %name, policy = ?snapshot.spec.deletion_policy, "deleted");
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeSnapshotSpec, NodeSnapshotStatus};

    fn reported(node: &str, start: &str, window: i64) -> NodeSnapshot {
        // Through JSON, as the status travels through the API server.
        let status: NodeSnapshotStatus = serde_json::from_value(json!({
            "phase": "Released", "freezeStart": start, "freezeWindowMillis": window
        }))
        .expect("status");
        let status: NodeSnapshotStatus =
            serde_json::from_value(serde_json::to_value(&status).expect("json")).expect("status");
        let mut object = NodeSnapshot::new(
            node,
            NodeSnapshotSpec {
                node_name: node.into(),
                freeze_timeout_seconds: 10,
                ..Default::default()
            },
        );
        object.status = Some(status);
        object
    }

    #[test]
    fn the_overall_window_spans_first_freeze_to_last_thaw_across_a_second_boundary() {
        let nodes = BTreeMap::from([
            (
                "a".to_string(),
                reported("a", "2026-11-21T12:00:00.990000Z", 50),
            ),
            (
                "b".to_string(),
                reported("b", "2026-11-21T12:00:01.010000Z", 40),
            ),
        ]);
        let mut status = GroupSnapshotStatus::default();
        fill_members(&mut status, &nodes);
        // a: 0.990 → 1.040, b: 1.010 → 1.050: 60 ms from the first freeze to the last thaw.
        assert_eq!(status.freeze_window_millis, Some(60));
        assert_eq!(status.nodes.len(), 2);
        assert_eq!(status.nodes[1].freeze_window_millis, Some(40));
    }

    #[test]
    fn no_overall_window_until_every_node_reported_one() {
        let mut pending = reported("b", "2026-11-21T12:00:01.010000Z", 40);
        if let Some(s) = pending.status.as_mut() {
            s.freeze_window_millis = None;
        }
        let nodes = BTreeMap::from([
            (
                "a".to_string(),
                reported("a", "2026-11-21T12:00:00.990000Z", 50),
            ),
            ("b".to_string(), pending),
        ]);
        let mut status = GroupSnapshotStatus::default();
        fill_members(&mut status, &nodes);
        assert_eq!(status.freeze_window_millis, None);
    }

    #[test]
    fn node_snapshot_names_stay_valid_for_long_node_names() {
        assert_eq!(node_snapshot_name("s", "node-1"), "s-node-1");
        let long = "n".repeat(253);
        let name = node_snapshot_name(&"s".repeat(63), &long);
        assert!(name.len() <= 253, "{}", name.len());
        assert_ne!(name, node_snapshot_name(&"s".repeat(63), &"m".repeat(253)));
    }
}
