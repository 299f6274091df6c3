//! Reconciles GroupSnapshots: records the members, drives one NodeSnapshot per node through the
//! freeze barrier (see [`super::barrier`]), reports, and cleans up on deletion.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher::{self, Error as WatchError};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::barrier::{NodeView, ReleaseConstraints, ReleasePlan, Step, next_step, release_plan};
use super::ceph::{self, CephError, PrepareError};
use super::hooks::{self, plan as hook_plan};
use super::{CONTROLLER_NAME, Context, Error, cache_ready, publish_event};
use crate::api::{
    CONDITION_READY, CentralPhase, CentralSnapshot, Consistency, ConsistencyGroup, DeletionPolicy,
    FreezePolicy, GroupRestore, GroupSnapshot, GroupSnapshotPhase, GroupSnapshotStatus, HookMode,
    HooksPolicy, MemberSnapshot, NodeAction, NodeFreezeWindow, NodePhase, NodeSnapshot,
    NodeSnapshotSpec, NodeVolume, QuiesceSpec, RestorePhase,
};
use crate::conditions::condition;
use crate::finalizer;

/// The controller's finalizer on GroupSnapshots and on the NodeSnapshots it creates: member
/// snapshots go only with their GroupSnapshot, never on their own.
pub const FINALIZER: &str = "tandem.dev/group-snapshot";
/// The label that ties a NodeSnapshot to its GroupSnapshot (by name; the owner reference says
/// which instance).
pub const GROUP_SNAPSHOT_LABEL: &str = "tandem.dev/group-snapshot";
/// The label with the uid of the GroupSnapshot a NodeSnapshot was made for.
pub const GROUP_SNAPSHOT_UID_LABEL: &str = "tandem.dev/group-snapshot-uid";
/// On a NodeSnapshot kept by a `Retain` GroupSnapshot's deletion: "true".
pub const RETAINED_LABEL: &str = "tandem.dev/retained";
/// On a kept NodeSnapshot: the uid of the GroupSnapshot it was kept from.
pub const RETAINED_FROM_UID_ANNOTATION: &str = "tandem.dev/retained-from-uid";
/// The condition an agent sets on a NodeSnapshot whose snapshots it cannot delete (it retries).
pub const CONDITION_DELETE_FAILED: &str = "DeleteFailed";
/// How often a snapshot waiting behind another one looks again on its own; it is normally woken
/// as soon as the other one finishes.
const WAITER_FALLBACK: Duration = Duration::from_secs(10);
/// Page size of the list of GroupSnapshots in the overlap check.
const LIST_PAGE: u32 = 250;
/// How long a GroupSnapshot waits for its ConsistencyGroup to appear (GitOps may apply both at once).
const GROUP_GRACE: Duration = Duration::from_secs(10);
/// Time an agent gets, beyond the freeze timeout, to pick up and answer a NodeSnapshot.
const AGENT_GRACE: Duration = Duration::from_secs(5);
/// What must be left of every node's freeze beyond the RBD group snapshot call's expected time:
/// the release has to reach the node before its own clock thaws it.
const CENTRAL_MARGIN: Duration = Duration::from_secs(1);

/// Runs the GroupSnapshot controller; NodeSnapshot changes re-reconcile their GroupSnapshot.
pub async fn run_snapshot_controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    node_snapshot_events: BoxStream<'static, Result<NodeSnapshot, WatchError>>,
    woken: BoxStream<'static, ObjectRef<GroupSnapshot>>,
) {
    let snapshots: Api<GroupSnapshot> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // NodeSnapshots come from the shared cache (no list on the release path) and wake their owner.
    super::cache::slim_controller(snapshots, watcher::Config::default())
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
        // Snapshots that waited behind another one, woken when it finished.
        .reconcile_on(woken)
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

    let active = matches!(
        snapshot.status.as_ref().map(|s| s.phase),
        Some(
            GroupSnapshotPhase::Quiescing
                | GroupSnapshotPhase::Cutting
                | GroupSnapshotPhase::Releasing
        )
    );
    if !active || snapshot.metadata.deletion_timestamp.is_some() {
        // Whoever waited for this snapshot to finish with its volumes may start now.
        ctx.wake_waiters(&namespace, &name);
    }
    if snapshot.metadata.deletion_timestamp.is_some() {
        if let Some(uid) = snapshot.uid() {
            ctx.hooks.abandon(&uid);
        }
        return cleanup(&snapshot, &api, &nodes_api, &ctx).await;
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
        GroupSnapshotPhase::Quiescing => quiesce(&snapshot, status, &api, &ctx).await,
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
    // So does a controller that just started: its groups may not be resolved again yet.
    let settling = age < GROUP_GRACE || ctx.started.elapsed() < GROUP_GRACE;
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
        let message = format!(
            "ConsistencyGroup {group_name} has not resolved its members for its current spec (generation {}, resolved {})",
            group.metadata.generation.unwrap_or_default(),
            group_status
                .observed_generation
                .map_or("none".into(), |g| g.to_string())
        );
        if settling {
            if wait(&mut status, format!("waiting: {message}")) {
                write_status(api, &snapshot.name_any(), &status).await?;
            }
            return Ok(retry);
        }
        return fail(
            snapshot,
            status,
            api,
            ctx,
            "GroupNotResolved",
            format!("{message}; see the tandem controller's log"),
        )
        .await;
    }
    // A group whose members cannot be resolved at all says why in its Ready condition.
    if let Some(refusal) = group_status
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_READY && UNRESOLVABLE_GROUP.contains(&c.reason.as_str()))
    {
        return fail(
            snapshot,
            status,
            api,
            ctx,
            &refusal.reason.clone(),
            format!("ConsistencyGroup {group_name}: {}", refusal.message),
        )
        .await;
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

    // Hooks need exec rights in this namespace: checked before anything is quiesced or cut.
    let quiesce_spec = hooks_of(snapshot, &group);
    if quiesce_spec.is_some()
        && let Some(message) = hooks::exec_denied(&ctx.client, &namespace).await?
    {
        return fail(
            snapshot,
            status,
            api,
            ctx,
            hooks::REASON_NOT_PERMITTED,
            message,
        )
        .await;
    }

    // RBD volumes have no node affinity: they are on the node that maps them.
    let attached = if group_status
        .members
        .iter()
        .any(|m| m.node.is_none() && m.persistent_volume.is_some())
    {
        ceph::attached_nodes(&ctx.client).await?
    } else {
        BTreeMap::new()
    };
    let unattached: Vec<&str> = group_status
        .members
        .iter()
        .filter(|m| {
            m.node.is_none()
                && m.persistent_volume
                    .as_ref()
                    .is_some_and(|pv| !attached.contains_key(pv))
        })
        .map(|m| m.claim.as_str())
        .collect();
    if !unattached.is_empty() {
        return fail(
            snapshot,
            status,
            api,
            ctx,
            "RbdVolumeNotAttached",
            format!(
                "the RBD volume(s) of claim(s) {} are attached to no node (no VolumeAttachment); tandem freezes an RBD volume on the node that maps it, so run the pod that uses it first",
                unattached.join(", ")
            ),
        )
        .await;
    }
    let members: Vec<MemberSnapshot> = group_status
        .members
        .iter()
        .filter_map(|m| {
            let persistent_volume = m.persistent_volume.clone()?;
            let node = m
                .node
                .clone()
                .or_else(|| attached.get(&persistent_volume).cloned())?;
            let mut member = MemberSnapshot {
                claim: m.claim.clone(),
                persistent_volume,
                node,
                ..Default::default()
            };
            // What a restore needs even when the source PV and claim are gone by then.
            let volume = ctx.volumes.get(&ObjectRef::new(&member.persistent_volume));
            let claim = ctx
                .claims
                .get(&ObjectRef::new(&member.claim).within(&namespace));
            record_shape(&mut member, volume.as_deref(), claim.as_deref());
            Some(member)
        })
        .collect();

    // One snapshot at a time per volume: checked and claimed under a lock, against the API (not a
    // cache), so two reconciles can never both start on the same volume. A volume is claimed from
    // one namespace only, so the lock is per namespace: other tenants never wait for it.
    let lock = ctx.start_lock(&namespace);
    let _guard = lock.lock().await;
    let all: Api<GroupSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let ours: BTreeSet<&str> = members
        .iter()
        .map(|m| m.persistent_volume.as_str())
        .collect();
    if let Some((other, volume, claim)) = first_overlap(&all, snapshot, &ours).await? {
        let message = format!(
            "waiting for GroupSnapshot {other} that is snapshotting volume {volume} (claim {claim})"
        );
        if status.message.as_deref() != Some(message.as_str()) {
            status.message = Some(message);
            write_status(api, &snapshot.name_any(), &status).await?;
        }
        // Woken when `other` finishes; the fallback covers a wake-up lost to a restart.
        ctx.wait_for(&namespace, &other, ObjectRef::from_obj(snapshot));
        return Ok(Action::requeue(WAITER_FALLBACK));
    }

    // RBD members: their group in the Ceph cluster made to hold exactly them, before anything
    // is frozen; an image in another group is refused here.
    let volumes: Vec<(String, Option<Arc<super::cache::CachedVolume>>)> = members
        .iter()
        .map(|m| {
            (
                m.persistent_volume.clone(),
                ctx.volumes.get(&ObjectRef::new(&m.persistent_volume)),
            )
        })
        .collect();
    let volume_refs: Vec<(String, Option<&super::cache::CachedVolume>)> = volumes
        .iter()
        .map(|(pv, v)| (pv.clone(), v.as_deref()))
        .collect();
    let group_uid = group.uid().ok_or(Error::MissingUid)?;
    let snapshot_uid = snapshot.uid().ok_or(Error::MissingUid)?;
    // Their claims are held on deletion before their images join the group (`rbd_members`).
    let rbd_claims: Vec<String> = members
        .iter()
        .filter(|m| {
            volumes.iter().any(|(pv, v)| {
                *pv == m.persistent_volume
                    && v.as_deref().and_then(super::central::rbd_volume).is_some()
            })
        })
        .map(|m| m.claim.clone())
        .collect();
    super::rbd_members::protect(ctx, &namespace, &rbd_claims).await?;
    match ceph::prepare(
        &ctx.client,
        &ctx.ceph,
        &volume_refs,
        &group_uid,
        &snapshot_uid,
    )
    .await
    {
        Ok(central) => status.central = central,
        Err(PrepareError::Kube(e)) => return Err(e.into()),
        Err(PrepareError::Refused { reason, message }) => {
            return fail(snapshot, status, api, ctx, reason, message).await;
        }
    }

    let nodes: BTreeSet<String> = members.iter().map(|m| m.node.clone()).collect();
    status.phase = GroupSnapshotPhase::Cutting;
    if let Some(spec) = &quiesce_spec {
        let pods = hooks::list_pods(&ctx.client, &namespace).await?;
        let claims: BTreeSet<&str> = members.iter().map(|m| m.claim.as_str()).collect();
        status.hooks = hooks::plan_runs(spec, &pods, &claims);
        status.phase = GroupSnapshotPhase::Quiescing;
    }
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
        if status.phase == GroupSnapshotPhase::Quiescing {
            "Quiescing"
        } else {
            "Cutting"
        },
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

/// Records a member's capacity, volume mode, access modes and StorageClass from its PV and claim.
fn record_shape(
    member: &mut MemberSnapshot,
    volume: Option<&super::cache::CachedVolume>,
    claim: Option<&k8s_openapi::api::core::v1::PersistentVolumeClaim>,
) {
    let volume_spec = volume.and_then(|v| v.spec.as_ref());
    let claim_spec = claim.and_then(|c| c.spec.as_ref());
    member.capacity = volume_spec
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage").cloned());
    member.volume_mode = volume_spec
        .and_then(|s| s.volume_mode.clone())
        .or_else(|| claim_spec.and_then(|s| s.volume_mode.clone()))
        .or_else(|| Some("Filesystem".into()));
    member.access_modes = claim_spec
        .and_then(|s| s.access_modes.clone())
        .or_else(|| volume_spec.and_then(|s| s.access_modes.clone()))
        .unwrap_or_default();
    member.storage_class_name = claim_spec
        .and_then(|s| s.storage_class_name.clone())
        .or_else(|| volume_spec.and_then(|s| s.storage_class_name.clone()));
}

/// The group's quiesce hooks, when this snapshot runs them (`spec.hooks: Run` and at least one).
fn hooks_of(snapshot: &GroupSnapshot, group: &ConsistencyGroup) -> Option<QuiesceSpec> {
    if snapshot.spec.hooks == HooksPolicy::Skip {
        return None;
    }
    group.spec.quiesce.clone().filter(|q| !q.hooks.is_empty())
}

/// The quiesce spec a running snapshot's hooks follow (the group's, as of now).
async fn running_hooks(snapshot: &GroupSnapshot, ctx: &Context) -> Result<QuiesceSpec, Error> {
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    Ok(groups
        .get_opt(&snapshot.spec.group_name)
        .await?
        .and_then(|g| g.spec.quiesce)
        .unwrap_or_default())
}

/// Runs every Pre hook and opens every hold, then lets the barrier start; or, when a `Fail` hook
/// failed, releases what was opened, runs the Post hooks and fails with nothing cut.
async fn quiesce(
    snapshot: &GroupSnapshot,
    mut status: GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let uid = snapshot.uid().ok_or(Error::MissingUid)?;
    let spec = running_hooks(snapshot, ctx).await?;
    let freeze_timeout = {
        let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
        groups
            .get_opt(&snapshot.spec.group_name)
            .await?
            .map_or(10, |g| g.spec.freeze_timeout_seconds)
    };
    // Bounded: a quiesce whose status cannot be written is given up at its deadline.
    let deadline = hook_plan::quiesce_deadline(&spec, freeze_timeout);
    let expired = status
        .start_time
        .as_ref()
        .is_some_and(|t| elapsed_since(t) > deadline);
    let started = status.hooks.iter().any(|r| r.started_at.is_some());
    if let Some(runs) = ctx.hooks.unrecorded(&uid) {
        // The quiesce ran in this process, but its status write failed: write it again.
        status.hooks = runs;
        let now = MicroTime(Timestamp::now());
        if hook_plan::unrecorded_expired(&status.hooks, freeze_timeout, &now).unwrap_or(expired) {
            let bound = Duration::from_secs(u64::try_from(freeze_timeout).unwrap_or(10));
            return give_up_quiesce(snapshot, status, api, ctx, &spec, bound).await;
        }
    } else if started && !ctx.hooks.active(&uid) {
        // This process restarted mid-quiesce: what ran is unknown, and no hold holds any more.
        hook_plan::mark_lost(&mut status.hooks, |_| false, MicroTime(Timestamp::now()));
    } else if !started {
        if expired {
            return give_up_quiesce(snapshot, status, api, ctx, &spec, deadline).await;
        }
        // Recorded before any exec, so a restart from here on knows hooks may have run.
        let now = MicroTime(Timestamp::now());
        for run in status.hooks.iter_mut().filter(|r| hooks::is_quiesce(r)) {
            run.started_at.get_or_insert(now.clone());
        }
        write_status(api, &name, &status).await?;
        hooks::quiesce(
            &ctx.client,
            &namespace,
            &uid,
            &ctx.hooks,
            &spec,
            freeze_timeout,
            &mut status.hooks,
        )
        .await;
    } else if expired {
        // Holds of this process with no result to record (cannot happen; bounded anyway).
        hook_plan::mark_lost(&mut status.hooks, |_| false, MicroTime(Timestamp::now()));
        return give_up_quiesce(snapshot, status, api, ctx, &spec, deadline).await;
    } else {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    match hook_plan::may_cut(&spec, &status.hooks) {
        Ok(()) => {
            status.phase = GroupSnapshotPhase::Cutting;
            status.failed_hooks = hook_plan::failed(&status.hooks);
            if let Err(e) = write_status(api, &name, &status).await {
                // Kept here, so the next reconcile writes it again instead of waiting on it.
                ctx.hooks.remember(&uid, &status.hooks);
                return Err(e);
            }
            Ok(Action::requeue(Duration::from_millis(10)))
        }
        Err(failed) => {
            hooks::release(&uid, &ctx.hooks, &spec, &mut status.hooks).await;
            run_post(api, &name, &namespace, ctx, &spec, &mut status).await?;
            let message = hook_failure_message(&status, &failed, "nothing was cut");
            finish_hook_fields(&mut status);
            fail(
                snapshot,
                status,
                api,
                ctx,
                hooks::REASON_HOOK_FAILED,
                message,
            )
            .await
        }
    }
}

/// A quiesce that could not be recorded within its deadline: every hold released, the Post hooks
/// run, and the snapshot failed with nothing cut.
async fn give_up_quiesce(
    snapshot: &GroupSnapshot,
    mut status: GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    ctx: &Context,
    spec: &QuiesceSpec,
    deadline: Duration,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let uid = snapshot.uid().ok_or(Error::MissingUid)?;
    hooks::release(&uid, &ctx.hooks, spec, &mut status.hooks).await;
    run_post(api, &name, &namespace, ctx, spec, &mut status).await?;
    finish_hook_fields(&mut status);
    let message = format!(
        "the quiesce could not be recorded within its deadline ({} s); nothing was cut",
        deadline.as_secs()
    );
    fail(
        snapshot,
        status,
        api,
        ctx,
        hooks::REASON_HOOK_FAILED,
        message,
    )
    .await
}

/// Runs the Post hooks left, each recorded as started before it runs (at most once, even across
/// a restart of the controller).
async fn run_post(
    api: &Api<GroupSnapshot>,
    name: &str,
    namespace: &str,
    ctx: &Context,
    spec: &QuiesceSpec,
    status: &mut GroupSnapshotStatus,
) -> Result<(), Error> {
    if !hooks::post_left(&status.hooks) {
        return Ok(());
    }
    let base = status.clone();
    hooks::post(&ctx.client, namespace, spec, &mut status.hooks, |runs| {
        let mut recorded = base.clone();
        recorded.hooks = runs;
        async move { write_status(api, name, &recorded).await }
    })
    .await
}

fn hook_failure_message(status: &GroupSnapshotStatus, failed: &[String], outcome: &str) -> String {
    let details: Vec<String> = status
        .hooks
        .iter()
        .filter(|r| failed.contains(&hook_plan::label(r)))
        .map(|r| {
            format!(
                "{}: {}",
                hook_plan::label(r),
                r.message.as_deref().unwrap_or("failed")
            )
        })
        .collect();
    format!("hook(s) failed ({}); {outcome}", details.join("; "))
}

fn finish_hook_fields(status: &mut GroupSnapshotStatus) {
    status.failed_hooks = hook_plan::failed(&status.hooks);
    status.quiesce_window_millis = hook_plan::quiesce_window_millis(&status.hooks);
}

/// Group conditions that mean its members cannot be resolved at all (no point in waiting).
const UNRESOLVABLE_GROUP: [&str; 2] = ["TooManyMembers", "InvalidSelector"];

/// The first other snapshot of the namespace that is freezing one of `volumes`: its name, the
/// volume and the claim. Lists page by page.
async fn first_overlap(
    all: &Api<GroupSnapshot>,
    snapshot: &GroupSnapshot,
    volumes: &BTreeSet<&str>,
) -> Result<Option<(String, String, String)>, Error> {
    let mut params = ListParams::default().limit(LIST_PAGE);
    loop {
        let page = all.list(&params).await?;
        for other in &page.items {
            if other.uid() == snapshot.uid() {
                continue;
            }
            let Some(other_status) = other.status.as_ref() else {
                continue;
            };
            if !matches!(
                other_status.phase,
                GroupSnapshotPhase::Quiescing
                    | GroupSnapshotPhase::Cutting
                    | GroupSnapshotPhase::Releasing
            ) {
                continue;
            }
            if let Some(shared) = other_status
                .members
                .iter()
                .find(|m| volumes.contains(m.persistent_volume.as_str()))
            {
                return Ok(Some((
                    other.name_any(),
                    shared.persistent_volume.clone(),
                    shared.claim.clone(),
                )));
            }
        }
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(None),
        }
    }
}

/// The NodeSnapshot name for a node: `<snapshot>-<hash of the snapshot's uid and the node>`.
///
/// Names never collide: not across nodes (`x` on `gpu-node-1` and `x-gpu` on `node-1`), and not
/// with a NodeSnapshot kept from an earlier GroupSnapshot of the same name (another uid). The
/// node is in `spec.nodeName` and the snapshot in labels.
pub fn node_snapshot_name(snapshot: &str, snapshot_uid: &str, node: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(snapshot_uid.as_bytes())
        .chain_update(b"/")
        .chain_update(node.as_bytes())
        .finalize();
    let hash: String = digest.iter().take(5).map(|b| format!("{b:02x}")).collect();
    format!("{snapshot}-{hash}")
}

/// Whether a NodeSnapshot is one this GroupSnapshot made: same namespace, controlled by this
/// uid, for one of its nodes and under the name it would give it. Anything else (a copy with a
/// forged owner reference, say) is ignored.
fn is_ours(
    node: &NodeSnapshot,
    namespace: &str,
    snapshot: &str,
    snapshot_uid: &str,
    nodes: &BTreeSet<&str>,
) -> bool {
    node.namespace().as_deref() == Some(namespace)
        && node.group_snapshot_uid() == Some(snapshot_uid)
        && nodes.contains(node.spec.node_name.as_str())
        && {
            let name = node.name_any();
            // Or the `<snapshot>-<node>` of earlier controllers, for a cut in flight across
            // an upgrade (the owner uid already proves whose it is).
            name == node_snapshot_name(snapshot, snapshot_uid, &node.spec.node_name)
                || name == format!("{snapshot}-{}", node.spec.node_name)
        }
}

fn node_snapshot_for(
    snapshot: &GroupSnapshot,
    group_freeze: (FreezePolicy, i32),
    node: &str,
    members: &[&MemberSnapshot],
    release: &ReleasePlan,
    prepare_first: bool,
    central: Option<&CentralSnapshot>,
) -> Result<NodeSnapshot, Error> {
    let name = snapshot.name_any();
    let uid = snapshot.uid().ok_or(Error::MissingUid)?;
    let owner = OwnerReference {
        api_version: GroupSnapshot::api_version(&()).into(),
        kind: GroupSnapshot::kind(&()).into(),
        name: name.clone(),
        uid: uid.clone(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let mut object = NodeSnapshot::new(
        &node_snapshot_name(&name, &uid, node),
        NodeSnapshotSpec {
            node_name: node.into(),
            group_snapshot: name.clone(),
            action: if prepare_first {
                NodeAction::Prepare
            } else {
                NodeAction::Cut
            },
            release_after_cut: *release == ReleasePlan::AfterCut,
            group_nodes: match release {
                ReleasePlan::BySiblings(nodes) => nodes.clone(),
                _ => Vec::new(),
            },
            freeze: group_freeze.0,
            freeze_timeout_seconds: group_freeze.1,
            deletion_policy: snapshot.spec.deletion_policy,
            volumes: members
                .iter()
                .map(|m| NodeVolume {
                    claim: m.claim.clone(),
                    persistent_volume: m.persistent_volume.clone(),
                    // Frozen and held by the agent, cut by the controller's RBD group snapshot.
                    central: central.is_some_and(|c| {
                        c.volumes
                            .iter()
                            .any(|v| v.persistent_volume == m.persistent_volume)
                    }),
                })
                .collect(),
        },
    );
    object.metadata.owner_references = Some(vec![owner]);
    object.metadata.finalizers = Some(vec![FINALIZER.into()]);
    object.metadata.labels = Some(BTreeMap::from([
        (GROUP_SNAPSHOT_LABEL.into(), name),
        (GROUP_SNAPSHOT_UID_LABEL.into(), uid),
    ]));
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
    let uid = snapshot.uid().ok_or(Error::MissingUid)?;
    let node_names: BTreeSet<&str> = by_node.keys().copied().collect();
    // From the cache: it is updated before the event that woke us is delivered. A NodeSnapshot
    // created a moment ago and not cached yet is created again, which the API answers with 409.
    let existing: BTreeMap<String, NodeSnapshot> = ctx
        .node_snapshots
        .state()
        .iter()
        .filter(|n| is_ours(n, &namespace, &name, &uid, &node_names))
        .map(|n| (n.spec.node_name.clone(), n.as_ref().clone()))
        .collect();
    let missing: Vec<&str> = by_node
        .keys()
        .copied()
        .filter(|n| !existing.contains_key(*n))
        .collect();
    let barrier_start = hook_plan::barrier_start(&status.hooks)
        .map(|t| Time(t.0))
        .or_else(|| status.start_time.clone());
    let started = barrier_start
        .as_ref()
        .map(elapsed_since)
        .unwrap_or_default();
    let has_hooks = !status.hooks.is_empty();
    let holds = status.hooks.iter().any(|r| r.mode == HookMode::Hold);
    let hook_spec = if has_hooks {
        running_hooks(snapshot, ctx).await?
    } else {
        QuiesceSpec::default()
    };
    if has_hooks && status.phase == GroupSnapshotPhase::Cutting {
        let live = |r: &crate::api::HookRun| ctx.hooks.live(&uid, r);
        // A cached object older than this process's last write shows holds it has released since
        // as still held, and so as lost: before calling any hold lost, make sure this is the
        // latest status (only then: the barrier's usual path reads nothing more).
        let mut probe = status.hooks.clone();
        if hook_plan::mark_lost(&mut probe, live, MicroTime(Timestamp::now())) > 0 {
            let latest = api.get(&name).await?;
            if latest.resource_version() != snapshot.resource_version() {
                return Ok(Action::requeue(Duration::from_millis(200)));
            }
        }
        // A hold lost to a restart, or one that ended on its own, no longer holds: under Fail
        // nothing may be cut, so every node aborts.
        let lost = hook_plan::mark_lost(&mut status.hooks, live, MicroTime(Timestamp::now()));
        hooks::check_holds(&uid, &ctx.hooks, &mut status.hooks);
        if hook_plan::may_cut(&hook_spec, &status.hooks).is_err() {
            let to_abort: Vec<String> = existing
                .values()
                .filter(|n| matches!(n.spec.action, NodeAction::Cut | NodeAction::Prepare))
                .map(|n| n.name_any())
                .collect();
            if !to_abort.is_empty() || lost > 0 {
                info!(snapshot = %name, "a hook failed before the release: aborting every node");
                hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks).await;
                set_action(nodes_api, &to_abort, NodeAction::Abort).await?;
                write_status(api, &name, &status).await?;
            }
        }
    }
    if !missing.is_empty() && hook_plan::may_cut(&hook_spec, &status.hooks).is_err() {
        // Nothing was created yet (or only some): nothing more is.
        let message = hook_failure_message(
            &status,
            &hook_plan::may_cut(&hook_spec, &status.hooks)
                .err()
                .unwrap_or_default(),
            "nothing was cut",
        );
        let others: Vec<String> = existing.values().map(|n| n.name_any()).collect();
        set_action(nodes_api, &others, NodeAction::Abort).await?;
        hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks).await;
        run_post(api, &name, &namespace, ctx, &hook_spec, &mut status).await?;
        finish_hook_fields(&mut status);
        return fail(
            snapshot,
            status,
            api,
            ctx,
            hooks::REASON_HOOK_FAILED,
            message,
        )
        .await;
    }
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
        let deadline = Duration::from_secs(u64::try_from(freeze.1).unwrap_or(10)) + AGENT_GRACE;
        let release = release_plan(
            by_node.keys().copied(),
            ReleaseConstraints {
                holds,
                central: status.central.is_some(),
                siblings_allowed: !ctx.test_only_no_sibling_release,
            },
        );
        // Across nodes, every node first checks and flushes (Prepare); they freeze on one Cut.
        let prepare_first = by_node.len() > 1;
        let objects = missing
            .iter()
            .map(|node| {
                node_snapshot_for(
                    snapshot,
                    freeze,
                    node,
                    &by_node[node],
                    &release,
                    prepare_first,
                    status.central.as_ref(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        // All nodes at once: a node that hears late freezes late and widens the group's window.
        let params = PostParams::default();
        let outcomes = futures::future::join_all(objects.iter().map(|object| async {
            let outcome = match nodes_api.create(&params, object).await {
                Ok(_) => {
                    tracing::debug!(snapshot = %name, node = %object.spec.node_name, "NodeSnapshot created");
                    CreateOutcome::Created
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    // Ours (created a moment ago, not cached yet), or someone else's object.
                    let found = nodes_api.get_opt(&object.name_any()).await?;
                    match found.as_ref().map(NodeSnapshot::group_snapshot_uid) {
                        Some(Some(owner)) if owner == uid => CreateOutcome::Created,
                        Some(owner) => CreateOutcome::Refused {
                            permanent: true,
                            message: format!(
                                "NodeSnapshot {} already exists and belongs to {}",
                                object.name_any(),
                                owner.map_or("no GroupSnapshot".into(), |o| format!(
                                    "another GroupSnapshot (uid {o})"
                                ))
                            ),
                        },
                        // Deleted in between: try again.
                        None => CreateOutcome::Refused {
                            permanent: false,
                            message: format!(
                                "NodeSnapshot {} was in the way and is being removed",
                                object.name_any()
                            ),
                        },
                    }
                }
                Err(kube::Error::Api(e)) => classify_create_error(e.code, &e.message),
                Err(e) => return Err(e),
            };
            Ok::<_, kube::Error>((object.spec.node_name.clone(), outcome))
        }))
        .await;
        let mut refusals = Vec::new();
        let mut permanent = false;
        for outcome in outcomes {
            match outcome? {
                (_, CreateOutcome::Created) => {}
                (
                    node,
                    CreateOutcome::Refused {
                        permanent: p,
                        message,
                    },
                ) => {
                    permanent |= p;
                    refusals.push(format!("node {node}: {message}"));
                }
            }
        }
        if refusals.is_empty() {
            return Ok(Action::await_change());
        }
        let message = format!("cannot create the NodeSnapshot of {}", refusals.join("; "));
        if permanent || started > deadline {
            // The nodes that did get theirs thaw and delete what they cut.
            let others: Vec<String> = existing
                .values()
                .filter(|n| n.spec.action != NodeAction::Abort)
                .map(|n| n.name_any())
                .collect();
            set_action(nodes_api, &others, NodeAction::Abort).await?;
            return fail(
                snapshot,
                status,
                api,
                ctx,
                "NodeSnapshotCreateFailed",
                message,
            )
            .await;
        }
        if wait_message(&mut status, format!("retrying: {message}")) {
            write_status(api, &name, &status).await?;
        }
        return Ok(Action::requeue(Duration::from_secs(2)));
    }

    let freeze_timeout = existing
        .values()
        .map(|n| n.spec.freeze_timeout_seconds)
        .max()
        .unwrap_or(10);
    let freeze_timeout = Duration::from_secs(u64::try_from(freeze_timeout).unwrap_or(10));
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
    let central = super::central::barrier_view(status.central.as_ref());
    let mut step = next_step(
        &views,
        &central,
        started > deadline,
        started > deadline * 2 + AGENT_GRACE,
    );
    let wake =
        |d: Duration| Action::requeue(d.saturating_sub(started) + Duration::from_millis(100));

    loop {
        return match std::mem::replace(&mut step, Step::Wait) {
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
                if let Some(delay) = ctx.test_only_release_delay.filter(|d| started < *d) {
                    // Look again every second, as the barrier's own wake-ups would: a watch that
                    // recovers slowly from an API server outage must not hide the nodes' aborts.
                    return Ok(Action::requeue(
                        (delay - started).min(Duration::from_secs(1)),
                    ));
                }
                let cut_duration = started.as_secs_f64();
                ctx.metrics.cut_duration(cut_duration);
                // Every hold is released at once, together with the thaw.
                let names = names_of(&existing, &nodes);
                tracing::debug!(snapshot = %name, nodes = names.len(), "every node cut: releasing");
                let (released, ()) = futures::join!(
                    set_action(nodes_api, &names, NodeAction::Release),
                    hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks),
                );
                released?;
                tracing::debug!(snapshot = %name, "release patched");
                status.phase = GroupSnapshotPhase::Releasing;
                fill_members(&mut status, &existing);
                write_status(api, &name, &status).await?;
                // Wake up even if no node ever answers the release (its agent died with it), so the
                // barrier can give up on it.
                Ok(wake(deadline * 2 + AGENT_GRACE))
            }
            Step::CentralCut => {
                let Some(mut record) = status.central.clone() else {
                    return Ok(wake(deadline));
                };
                if let Some(delay) = ctx.test_only_release_delay.filter(|d| started < *d) {
                    // Fault tests act here too: every node holds, nothing is cut yet.
                    return Ok(Action::requeue(
                        (delay - started).min(Duration::from_secs(1)),
                    ));
                }
                match central_cut(ctx, &status, &existing, &record, freeze_timeout).await? {
                    Ok(took) => {
                        record.phase = CentralPhase::Taken;
                        record.call_millis = i64::try_from(took.as_millis()).ok();
                        record.message = None;
                        info!(snapshot = %name, group = %record.group, ms = took.as_millis(), "RBD group snapshot cut");
                        status.central = Some(record);
                        // Released at once, by the step the barrier takes next.
                        step = next_step(
                            &views,
                            &super::central::barrier_view(status.central.as_ref()),
                            started > deadline,
                            started > deadline * 2 + AGENT_GRACE,
                        );
                        continue;
                    }
                    Err(message) => {
                        warn!(snapshot = %name, %message, "the RBD group snapshot was not cut");
                        record.phase = CentralPhase::Failed;
                        record.message = Some(message);
                        status.central = Some(record);
                        write_status(api, &name, &status).await?;
                        // The barrier aborts every node next.
                        return Ok(Action::requeue(Duration::from_millis(10)));
                    }
                }
            }
            Step::RemoveCentral => {
                if let Some(action) = remove_central(ctx, api, &name, &mut status).await? {
                    return Ok(action);
                }
                Ok(Action::requeue(Duration::from_millis(10)))
            }
            Step::Cut(nodes) => {
                // Every node prepared: all freeze on this one trigger.
                let names = names_of(&existing, &nodes);
                set_action(nodes_api, &names, NodeAction::Cut).await?;
                tracing::debug!(snapshot = %name, nodes = names.len(), "cut patched");
                Ok(wake(deadline))
            }
            Step::Abort(nodes) => {
                let names = names_of(&existing, &nodes);
                let (aborted, ()) = futures::join!(
                    set_action(nodes_api, &names, NodeAction::Abort),
                    hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks),
                );
                aborted?;
                if has_hooks {
                    write_status(api, &name, &status).await?;
                }
                Ok(wake(deadline * 2 + AGENT_GRACE))
            }
            Step::Ready => {
                fill_members(&mut status, &existing);
                if has_hooks {
                    hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks).await;
                    run_post(api, &name, &namespace, ctx, &hook_spec, &mut status).await?;
                    finish_hook_fields(&mut status);
                }
                let all_frozen = status.members.iter().all(|m| m.frozen);
                let consistency = hook_plan::consistency(all_frozen, has_hooks, &status.hooks);
                let consistency = if has_hooks || consistency == Consistency::Independent {
                    consistency
                } else {
                    Consistency::FilesystemFrozen
                };
                status.phase = GroupSnapshotPhase::Ready;
                status.consistency = Some(consistency);
                status.completion_time = Some(now());
                status.message = None;
                let window = status.freeze_window_millis;
                let mut message = format!(
                    "{} volumes on {} nodes, {consistency:?}, freeze window {} ms",
                    status.member_count,
                    existing.len(),
                    window.map_or("-".into(), |w| w.to_string())
                );
                if let Some(quiesce) = status.quiesce_window_millis {
                    message.push_str(&format!(", quiesce window {quiesce} ms"));
                }
                if let Some(c) = &status.central {
                    message.push_str(&format!(
                        ", RBD group snapshot {} in {} ms",
                        super::central::snapshot_path(c),
                        c.call_millis.map_or("-".into(), |m| m.to_string())
                    ));
                }
                if !status.failed_hooks.is_empty() {
                    message.push_str(&format!(
                        "; hook(s) failed: {}",
                        status.failed_hooks.join(", ")
                    ));
                    status.message = Some(hook_failure_message(
                        &status,
                        &status.failed_hooks.clone(),
                        "cut anyway (onError: Continue)",
                    ));
                }
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
                    Consistency::ApplicationQuiesced => "ready_quiesced",
                    Consistency::FilesystemFrozen => "ready_frozen",
                    Consistency::Independent => "ready_independent",
                });
                info!(snapshot = %name, %namespace, "{message}");
                publish(ctx, snapshot, EventType::Normal, "SnapshotReady", message).await;
                Ok(Action::await_change())
            }
            Step::Failed(message) => {
                // Whatever this process recorded (it may have cut and died before recording it), no
                // RBD group snapshot of a failed GroupSnapshot is left.
                if let Some(action) = remove_central(ctx, api, &name, &mut status).await? {
                    return Ok(action);
                }
                fill_members(&mut status, &existing);
                let mut message = format!("{message}; every partial snapshot was removed");
                let mut reason = "SnapshotFailed";
                if has_hooks {
                    hooks::release(&uid, &ctx.hooks, &hook_spec, &mut status.hooks).await;
                    run_post(api, &name, &namespace, ctx, &hook_spec, &mut status).await?;
                    if let Err(failed) = hook_plan::may_cut(&hook_spec, &status.hooks) {
                        reason = hooks::REASON_HOOK_FAILED;
                        message = hook_failure_message(&status, &failed, "nothing was kept");
                    }
                    finish_hook_fields(&mut status);
                }
                fail(snapshot, status, api, ctx, reason, message).await
            }
        };
    }
}

/// The central cut, if every node has enough of its freeze left and froze the images its
/// PersistentVolumes name: how long the call took, or why nothing was cut (Err(Error) only for
/// the Kubernetes API, which is retried).
async fn central_cut(
    ctx: &Context,
    status: &GroupSnapshotStatus,
    existing: &BTreeMap<String, NodeSnapshot>,
    record: &CentralSnapshot,
    freeze_timeout: Duration,
) -> Result<Result<Duration, String>, Error> {
    let timeout_ms = i64::try_from(freeze_timeout.as_millis()).unwrap_or(i64::MAX);
    let now = Timestamp::now();
    let left: Vec<i64> = existing
        .values()
        .map(|n| {
            let frozen_for = n
                .status
                .as_ref()
                .and_then(|s| s.freeze_start.as_ref())
                .map(|t| i64::try_from(now.duration_since(t.0).as_millis()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            timeout_ms - frozen_for.max(0)
        })
        .collect();
    let expected = ctx.ceph.expected_cut(&record.cluster_id);
    let margin = i64::try_from(CENTRAL_MARGIN.as_millis()).unwrap_or(1000);
    let expected_ms = i64::try_from(expected.as_millis()).unwrap_or(i64::MAX);
    if !super::central::enough_budget(&left, expected_ms, margin) {
        return Ok(Err(format!(
            "too little of the freeze budget was left for the RBD group snapshot ({} ms on the node whose freeze ends first; the call is expected to take {expected_ms} ms, plus {margin} ms for the release); nothing was cut: raise freezeTimeoutSeconds",
            left.iter().min().copied().unwrap_or_default()
        )));
    }
    let reported: Vec<(String, Option<String>)> = record
        .volumes
        .iter()
        .map(|v| {
            let member = status
                .members
                .iter()
                .find(|m| m.persistent_volume == v.persistent_volume);
            let handle = member.and_then(|m| {
                existing
                    .get(&m.node)?
                    .status
                    .as_ref()?
                    .volumes
                    .iter()
                    .find(|x| x.claim == m.claim)?
                    .snapshot_handle
                    .clone()
            });
            (v.persistent_volume.clone(), handle)
        })
        .collect();
    let cluster = match connect_for(ctx, record).await {
        Ok(cluster) => cluster,
        Err(CephError::Kube(e)) => return Err(e.into()),
        Err(e) => return Ok(Err(e.to_string())),
    };
    let outcome = {
        let record = record.clone();
        tokio::task::spawn_blocking(move || ceph::cut_checked(&cluster, &record, &reported))
            .await
            .unwrap_or_else(|e| Err(format!("the group snapshot call did not return: {e}")))
    };
    match &outcome {
        Ok(took) => ctx.ceph.record_cut(&record.cluster_id, *took),
        Err(_) => ctx.ceph.forget(&record.cluster_id),
    }
    Ok(outcome)
}

/// A deleted GroupSnapshot's RBD group snapshot goes with it (a Ready one under `Retain` stays,
/// as its NodeSnapshots do); the RBD group goes with its last snapshot once its
/// ConsistencyGroup is gone. Some(action) while the removal must be tried again.
async fn cleanup_central(
    snapshot: &GroupSnapshot,
    status: &mut GroupSnapshotStatus,
    api: &Api<GroupSnapshot>,
    ctx: &Context,
    was_ready: bool,
) -> Result<Option<Action>, Error> {
    let Some(record) = status.central.clone() else {
        return Ok(None);
    };
    let name = snapshot.name_any();
    if snapshot.spec.deletion_policy == DeletionPolicy::Retain
        && was_ready
        && record.phase == CentralPhase::Taken
    {
        info!(snapshot = %name, rbd_snapshot = %super::central::snapshot_path(&record), "RBD group snapshot kept (Retain)");
        return Ok(None);
    }
    if let Some(action) = remove_central(ctx, api, &name, status).await? {
        return Ok(Some(action));
    }
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let groups: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let group_alive = groups
        .get_opt(&snapshot.spec.group_name)
        .await?
        .and_then(|g| g.uid())
        .is_some_and(|uid| super::central::rbd_group_name(&uid) == record.group);
    if !group_alive {
        let removed = match connect_for(ctx, &record).await {
            Ok(cluster) => {
                let r = record.clone();
                ceph::blocking(move || ceph::remove_group_if_unused(&cluster, &r)).await
            }
            Err(e) => Err(e),
        };
        match removed {
            Ok(true) => info!(group = %record.group, "RBD group removed with its last snapshot"),
            Ok(false) => {}
            // The group outlives this snapshot; the next deletion of one of its snapshots tries again.
            Err(e) => warn!(group = %record.group, error = %e, "cannot remove the RBD group"),
        }
    }
    Ok(None)
}

async fn connect_for(
    ctx: &Context,
    record: &CentralSnapshot,
) -> Result<Arc<super::rbd::Cluster>, CephError> {
    ceph::connect_for(&ctx.ceph, &ctx.client, &ctx.volumes, record).await
}

/// Removes the GroupSnapshot's RBD group snapshot, if it has one not removed yet, and records it.
/// Some(action) when it could not be removed (a message says why; tried again).
async fn remove_central(
    ctx: &Context,
    api: &Api<GroupSnapshot>,
    name: &str,
    status: &mut GroupSnapshotStatus,
) -> Result<Option<Action>, Error> {
    let Some(mut record) = status
        .central
        .clone()
        .filter(|c| c.phase != CentralPhase::Removed)
    else {
        return Ok(None);
    };
    let removed = match connect_for(ctx, &record).await {
        Ok(cluster) => {
            let r = record.clone();
            ceph::blocking(move || ceph::remove_snapshot(&cluster, &r)).await
        }
        Err(e) => Err(e),
    };
    match removed {
        Ok(()) => {
            info!(snapshot = %name, group = %record.group, rbd_snapshot = %record.snapshot, "RBD group snapshot removed");
            // A failed call keeps its phase and message for people to read.
            if record.phase != CentralPhase::Failed {
                record.phase = CentralPhase::Removed;
            }
            status.central = Some(record);
            write_status(api, name, status).await?;
            Ok(None)
        }
        Err(CephError::Kube(e)) => Err(e.into()),
        Err(e) => {
            ctx.ceph.forget(&record.cluster_id);
            let message = format!(
                "cannot remove the RBD group snapshot {} yet ({e}); retrying",
                super::central::snapshot_path(&record)
            );
            warn!(snapshot = %name, %message);
            if wait_message(status, message) {
                write_status(api, name, status).await?;
            }
            Ok(Some(Action::requeue(Duration::from_secs(5))))
        }
    }
}

fn status_changed(snapshot: &GroupSnapshot, status: &GroupSnapshotStatus) -> bool {
    snapshot.status.as_ref() != Some(status)
}

/// The NodeSnapshot names of `nodes`.
fn names_of(existing: &BTreeMap<String, NodeSnapshot>, nodes: &[String]) -> Vec<String> {
    nodes
        .iter()
        .filter_map(|n| existing.get(n))
        .map(|n| n.name_any())
        .collect()
}

/// Tells nodes what to do next, all at once: the release is on the freeze window's critical path.
async fn set_action(
    nodes_api: &Api<NodeSnapshot>,
    names: &[String],
    action: NodeAction,
) -> Result<(), Error> {
    let patch = Patch::Merge(json!({"spec": {"action": action}}));
    let params = PatchParams::default();
    futures::future::try_join_all(names.iter().map(|name| {
        let (patch, params) = (&patch, &params);
        async move { nodes_api.patch(name, params, patch).await }
    }))
    .await?;
    Ok(())
}

/// What came of creating one NodeSnapshot.
#[derive(Debug, PartialEq, Eq)]
enum CreateOutcome {
    Created,
    /// Refused; `permanent` when trying again cannot help.
    Refused {
        permanent: bool,
        message: String,
    },
}

/// An API refusal of a NodeSnapshot create: a quota or a webhook (403) may let it through later,
/// until the deadline; an invalid object (400, 422) never will.
fn classify_create_error(code: u16, message: &str) -> CreateOutcome {
    CreateOutcome::Refused {
        permanent: matches!(code, 400 | 422),
        message: format!("{message} (HTTP {code})"),
    }
}

/// Sets a waiting message; whether it changed.
fn wait_message(status: &mut GroupSnapshotStatus, message: String) -> bool {
    let changed = status.message.as_deref() != Some(message.as_str());
    status.message = Some(message);
    changed
}

/// Copies what the agents reported into the member list and the freeze windows.
fn fill_members(status: &mut GroupSnapshotStatus, nodes: &BTreeMap<String, NodeSnapshot>) {
    for member in &mut status.members {
        let node = nodes.get(&member.node);
        if let Some(n) = node {
            member.node_snapshot = Some(n.name_any());
        }
        let reported = node
            .and_then(|n| n.status.as_ref())
            .and_then(|s| s.volumes.iter().find(|v| v.claim == member.claim));
        if let Some(v) = reported {
            member.backend = v.backend.clone();
            member.filesystem = v.filesystem.clone();
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
            // Agents' numbers are checked, never trusted: a window that does not fit the
            // calendar is an unknown window, not a panic.
            let span = reported
                .and_then(|s| s.freeze_start.as_ref())
                .zip(window)
                .and_then(|(start, window)| {
                    let end = start
                        .0
                        .checked_add(k8s_openapi::jiff::SignedDuration::from_millis(window))
                        .ok()?;
                    Some((start.0, end))
                });
            if let Some((start, end)) = span {
                first_freeze = Some(first_freeze.map_or(start, |f| f.min(start)));
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
            i64::try_from(last.duration_since(first).as_millis()).ok()
        }
        _ => None,
    };
}

/// What happens to one NodeSnapshot when its GroupSnapshot is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposal {
    /// Kept as an object of its own (no owner, `deletionPolicy: Delete`): the snapshots stay on
    /// the node, counted by the namespace's NodeSnapshot quota, until someone deletes it. One
    /// already being deleted (a foreground deletion of the GroupSnapshot deletes its dependents
    /// first) keeps the controller's finalizer and stays Terminating as the record, until someone
    /// removes that finalizer.
    Keep,
    /// Deleted: its agent deletes the snapshots.
    Delete,
}

/// `Retain` keeps what a Ready snapshot made, node by node; anything else (a failed or
/// unfinished cut, whose snapshots are not a consistent set) is deleted.
fn disposal(policy: DeletionPolicy, was_ready: bool, node: &NodeSnapshot) -> Disposal {
    let released = node
        .status
        .as_ref()
        .is_some_and(|s| s.phase == NodePhase::Released);
    if policy == DeletionPolicy::Retain && was_ready && released {
        Disposal::Keep
    } else {
        Disposal::Delete
    }
}

/// The agent's report that it cannot delete a NodeSnapshot's snapshots (it keeps retrying).
fn delete_failure(node: &NodeSnapshot) -> Option<String> {
    let condition = node
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == CONDITION_DELETE_FAILED && c.status == "True")?;
    Some(format!(
        "NodeSnapshot {} on node {} cannot delete its snapshots: {}",
        node.name_any(),
        node.spec.node_name,
        condition.message
    ))
}

/// What the Deleting status says: what is deleted, what is kept and where, what is stuck.
fn deletion_message(deleting: usize, kept: &[String], failures: &[String]) -> String {
    let mut parts = Vec::new();
    if !kept.is_empty() {
        parts.push(format!(
            "kept the member snapshots as NodeSnapshot(s) {} (deleting one deletes its snapshots)",
            kept.join(", ")
        ));
    }
    if deleting > 0 {
        parts.push(format!(
            "deleting the member snapshots of {deleting} node(s)"
        ));
    }
    if parts.is_empty() {
        parts.push("no member snapshot left".into());
    }
    let mut message = parts.join("; ");
    if !failures.is_empty() {
        message.push_str(&format!(
            "; waiting: {} (the agent retries)",
            failures.join("; ")
        ));
    }
    message
}

/// The patch that turns a NodeSnapshot into a kept snapshot: no owner (nothing garbage-collects
/// it), no controller finalizer, and `deletionPolicy: Delete` so deleting it deletes its
/// snapshots. Guarded by its resourceVersion.
fn keeping_patch(node: &NodeSnapshot, from_uid: &str) -> Patch<serde_json::Value> {
    let terminating = node.metadata.deletion_timestamp.is_some();
    let finalizers: Vec<&String> = node
        .finalizers()
        .iter()
        .filter(|f| terminating || *f != FINALIZER)
        .collect();
    Patch::Merge(json!({
        "metadata": {
            "resourceVersion": node.resource_version(),
            "ownerReferences": null,
            "finalizers": finalizers,
            "labels": {RETAINED_LABEL: "true"},
            "annotations": {RETAINED_FROM_UID_ANNOTATION: from_uid},
        },
        "spec": {"deletionPolicy": DeletionPolicy::Delete},
    }))
}

/// Deletion: NodeSnapshots go first (deleted, so their agents delete the snapshots, or kept as
/// objects of their own under `Retain`), then the GroupSnapshot's own finalizer.
async fn cleanup(
    snapshot: &GroupSnapshot,
    api: &Api<GroupSnapshot>,
    nodes_api: &Api<NodeSnapshot>,
    ctx: &Context,
) -> Result<Action, Error> {
    let name = snapshot.name_any();
    let uid = snapshot.uid().ok_or(Error::MissingUid)?;
    let mut status = snapshot.status.clone().unwrap_or_default();
    // A restore from this snapshot that has not ended still needs its member snapshots.
    let namespace = snapshot.namespace().ok_or(Error::MissingNamespace)?;
    let restores: Api<GroupRestore> = Api::namespaced(ctx.client.clone(), &namespace);
    let running = restores_running(
        &restores.list(&ListParams::default()).await?.items,
        &name,
        &uid,
    );
    if !running.is_empty() {
        let message = format!(
            "waiting for GroupRestore(s) {} from this snapshot to complete or fail before deleting it",
            running.join(", ")
        );
        if status.message.as_deref() != Some(message.as_str()) {
            status.message = Some(message);
            write_status(api, &name, &status).await?;
        }
        // The restore wakes this snapshot when it ends; the fallback covers a restart.
        return Ok(Action::requeue(Duration::from_secs(30)));
    }
    // Ready is the only phase that sets a consistency.
    let was_ready = status.consistency.is_some();
    let listed = nodes_api
        .list(&ListParams::default().labels(&format!("{GROUP_SNAPSHOT_LABEL}={name}")))
        .await?;
    let ours: Vec<&NodeSnapshot> = listed
        .items
        .iter()
        .filter(|n| n.group_snapshot_uid() == Some(uid.as_str()))
        .collect();
    let mut kept: Vec<String> = listed
        .items
        .iter()
        .filter(|n| n.annotations().get(RETAINED_FROM_UID_ANNOTATION) == Some(&uid))
        .map(|n| n.name_any())
        .collect();
    let plan: Vec<(&NodeSnapshot, Disposal)> = ours
        .iter()
        .map(|n| (*n, disposal(snapshot.spec.deletion_policy, was_ready, n)))
        .collect();
    let newly_kept: Vec<String> = plan
        .iter()
        .filter(|(_, d)| *d == Disposal::Keep)
        .map(|(n, _)| n.name_any())
        .collect();
    kept.extend(newly_kept.iter().cloned());
    kept.sort();
    kept.dedup();
    let deleting = plan.iter().filter(|(_, d)| *d == Disposal::Delete).count();
    let failures: Vec<String> = ours.iter().filter_map(|n| delete_failure(n)).collect();
    let message = deletion_message(deleting, &kept, &failures);

    if status.phase != GroupSnapshotPhase::Deleting || status.message.as_deref() != Some(&message) {
        // `kubectl get gsnap` shows what is going on while the agents delete (or keep) snapshots.
        let newly_failing = !failures.is_empty()
            && !status.conditions.iter().any(|c| {
                c.type_ == CONDITION_DELETE_FAILED
                    && c.status == "True"
                    && c.message == failures.join("; ")
            });
        status.phase = GroupSnapshotPhase::Deleting;
        status.message = Some(message.clone());
        status
            .conditions
            .retain(|c| c.type_ != CONDITION_DELETE_FAILED);
        if !failures.is_empty() {
            status.conditions.push(condition(
                &snapshot
                    .status
                    .as_ref()
                    .map(|s| s.conditions.clone())
                    .unwrap_or_default(),
                CONDITION_DELETE_FAILED,
                true,
                "AgentCannotDelete",
                failures.join("; "),
                snapshot.metadata.generation,
            ));
        }
        write_status(api, &name, &status).await?;
        if newly_failing {
            publish(
                ctx,
                snapshot,
                EventType::Warning,
                CONDITION_DELETE_FAILED,
                failures.join("; "),
            )
            .await;
        }
    }

    for (node, disposal) in &plan {
        let node_name = node.name_any();
        let result = match disposal {
            Disposal::Keep => nodes_api
                .patch(
                    &node_name,
                    &PatchParams::default(),
                    &keeping_patch(node, &uid),
                )
                .await
                .map(|_| ()),
            Disposal::Delete => delete_node_snapshot(nodes_api, node).await,
        };
        match result {
            Ok(()) => {}
            // Gone, or changed under us (a conflict): the next reconcile sees it anew.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !newly_kept.is_empty() {
        let terminating: Vec<String> = plan
            .iter()
            .filter(|(n, d)| *d == Disposal::Keep && n.metadata.deletion_timestamp.is_some())
            .map(|(n, _)| n.name_any())
            .collect();
        let mut note = format!(
            "kept the member snapshots of {} node(s) as NodeSnapshot(s) {}; they count against the namespace's count/nodesnapshots.tandem.dev quota, and deleting one deletes its snapshots",
            newly_kept.len(),
            newly_kept.join(", ")
        );
        if !terminating.is_empty() {
            note.push_str(&format!(
                "; {} were already being deleted (foreground deletion) and stay Terminating: remove their finalizer {FINALIZER} to delete their snapshots",
                terminating.join(", ")
            ));
        }
        info!(snapshot = %name, kept = ?newly_kept, "member snapshots kept");
        publish(ctx, snapshot, EventType::Normal, "Retained", note).await;
    }
    if deleting > 0 {
        // The agents finish the deletion; their NodeSnapshots' removal wakes us up.
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if !newly_kept.is_empty() {
        // Look once more: the kept ones must show as detached before the GroupSnapshot goes.
        return Ok(Action::requeue(Duration::from_millis(200)));
    }
    if let Some(action) = cleanup_central(snapshot, &mut status, api, ctx, was_ready).await? {
        return Ok(action);
    }
    if let Some(patch) = finalizer::removing(snapshot, FINALIZER) {
        api.patch(&name, &PatchParams::default(), &patch).await?;
    }
    info!(snapshot = %name, policy = ?snapshot.spec.deletion_policy, kept = ?kept, "deleted");
    Ok(Action::await_change())
}

/// The GroupRestores of `restores` that restore from this snapshot (by name, and by uid once
/// started) and have not ended.
fn restores_running(restores: &[GroupRestore], snapshot: &str, uid: &str) -> Vec<String> {
    let mut names: Vec<String> = restores
        .iter()
        .filter(|r| r.spec.source.group_snapshot_name == snapshot)
        .filter(|r| {
            let status = r.status.clone().unwrap_or_default();
            !matches!(status.phase, RestorePhase::Completed | RestorePhase::Failed)
                && status
                    .group_snapshot_uid
                    .as_deref()
                    .is_none_or(|u| u == uid)
        })
        .map(|r| r.name_any())
        .collect();
    names.sort();
    names
}

/// Deletes one NodeSnapshot so its agent deletes its snapshots: the policy is set to `Delete`
/// first (what is not kept is never left behind unaccounted), then the object is deleted and the
/// controller's finalizer removed.
async fn delete_node_snapshot(
    nodes_api: &Api<NodeSnapshot>,
    node: &NodeSnapshot,
) -> Result<(), kube::Error> {
    let name = node.name_any();
    let mut current = node.clone();
    if current.spec.deletion_policy != DeletionPolicy::Delete {
        current = nodes_api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"deletionPolicy": DeletionPolicy::Delete}})),
            )
            .await?;
    }
    if current.metadata.deletion_timestamp.is_none() {
        match nodes_api.delete(&name, &DeleteParams::background()).await {
            Ok(deleted) => match deleted.left() {
                Some(deleting) => current = deleting,
                // Deleted at once: nothing held it.
                None => return Ok(()),
            },
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(e) => return Err(e),
        }
    }
    if let Some(patch) = finalizer::removing(&current, FINALIZER) {
        nodes_api
            .patch(&name, &PatchParams::default(), &patch)
            .await?;
    }
    Ok(())
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
    fn node_snapshot_names_never_collide_and_stay_short() {
        // `x` on `gpu-node-1` and `x-gpu` on `node-1` were both `x-gpu-node-1`.
        let a = node_snapshot_name("x", "uid-1", "gpu-node-1");
        let b = node_snapshot_name("x-gpu", "uid-2", "node-1");
        assert_ne!(a, b);
        assert!(a.starts_with("x-") && b.starts_with("x-gpu-"), "{a} {b}");
        // The same name again (a GroupSnapshot recreated): another uid, another name.
        assert_ne!(
            node_snapshot_name("daily", "uid-1", "n"),
            node_snapshot_name("daily", "uid-2", "n")
        );
        let long = node_snapshot_name(&"s".repeat(63), "uid", &"n".repeat(253));
        assert_eq!(long.len(), 63 + 1 + 10, "{long}");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    fn owned(name: &str, node: &str, uid: &str, controller: bool) -> NodeSnapshot {
        let mut n = NodeSnapshot::new(
            name,
            NodeSnapshotSpec {
                node_name: node.into(),
                ..Default::default()
            },
        );
        n.metadata.namespace = Some("ns".into());
        n.metadata.owner_references = Some(vec![OwnerReference {
            kind: "GroupSnapshot".into(),
            name: "g".into(),
            uid: uid.into(),
            controller: Some(controller),
            ..Default::default()
        }]);
        n
    }

    #[test]
    fn only_nodesnapshots_this_snapshot_made_count() {
        let nodes = BTreeSet::from(["a", "b"]);
        let name = |node| node_snapshot_name("g", "u", node);
        assert!(is_ours(
            &owned(&name("a"), "a", "u", true),
            "ns",
            "g",
            "u",
            &nodes
        ));
        // A forged owner reference on another node's object, on a node not in the snapshot,
        // under another name, without controller: true, or from another namespace.
        assert!(!is_ours(
            &owned(&name("a"), "a", "v", true),
            "ns",
            "g",
            "u",
            &nodes
        ));
        assert!(!is_ours(
            &owned(&name("c"), "c", "u", true),
            "ns",
            "g",
            "u",
            &nodes
        ));
        assert!(!is_ours(
            &owned("evil", "a", "u", true),
            "ns",
            "g",
            "u",
            &nodes
        ));
        assert!(!is_ours(
            &owned(&name("a"), "a", "u", false),
            "ns",
            "g",
            "u",
            &nodes
        ));
        assert!(!is_ours(
            &owned(&name("a"), "a", "u", true),
            "other",
            "g",
            "u",
            &nodes
        ));
    }

    #[test]
    fn huge_windows_from_an_agent_do_not_panic() {
        let nodes = BTreeMap::from([
            (
                "a".to_string(),
                reported("a", "2026-11-21T12:00:00Z", i64::MAX),
            ),
            // The last day the calendar holds, plus a day.
            (
                "b".to_string(),
                reported("b", "9999-12-30T00:00:00Z", 86_400_000),
            ),
        ]);
        let mut status = GroupSnapshotStatus::default();
        fill_members(&mut status, &nodes);
        assert_eq!(status.freeze_window_millis, None);
        assert_eq!(status.nodes[0].freeze_window_millis, Some(i64::MAX));
    }

    #[test]
    fn create_refusals_are_permanent_only_when_retrying_cannot_help() {
        let refused = |code| match classify_create_error(code, "no") {
            CreateOutcome::Refused { permanent, message } => {
                assert!(message.contains(&code.to_string()));
                permanent
            }
            CreateOutcome::Created => panic!("created"),
        };
        assert!(refused(422));
        assert!(refused(400));
        assert!(!refused(403), "a quota may free up before the deadline");
        assert!(!refused(500));
    }

    fn released(deleting: bool) -> NodeSnapshot {
        let mut n = reported("a", "2026-11-21T12:00:00Z", 5);
        n.metadata.deletion_timestamp = deleting.then(now);
        n
    }

    #[test]
    fn retain_keeps_only_what_a_ready_snapshot_released() {
        use DeletionPolicy::{Delete, Retain};
        assert_eq!(disposal(Retain, true, &released(false)), Disposal::Keep);
        assert_eq!(disposal(Delete, true, &released(false)), Disposal::Delete);
        // A failed or unfinished snapshot is not a consistent set: deleted whatever the policy.
        assert_eq!(disposal(Retain, false, &released(false)), Disposal::Delete);
        let mut cut = released(false);
        if let Some(s) = cut.status.as_mut() {
            s.phase = NodePhase::Cut;
        }
        assert_eq!(disposal(Retain, true, &cut), Disposal::Delete);
        // Already being deleted (foreground): kept all the same, as a Terminating record.
        assert_eq!(disposal(Retain, true, &released(true)), Disposal::Keep);
        let mut terminating = released(true);
        terminating.metadata.finalizers = Some(vec![FINALIZER.into()]);
        let Patch::Merge(body) = keeping_patch(&terminating, "u") else {
            panic!("a merge patch")
        };
        assert_eq!(body["metadata"]["finalizers"], json!([FINALIZER]));
    }

    #[test]
    fn the_deletion_message_says_what_is_kept_and_what_is_stuck() {
        let kept = ["g-1".to_string(), "g-2".to_string()];
        let m = deletion_message(0, &kept, &[]);
        assert!(m.contains("kept") && m.contains("g-1, g-2"), "{m}");
        assert!(!m.contains("deleting the member"), "{m}");
        let m = deletion_message(2, &[], &["NodeSnapshot x on node a cannot delete".into()]);
        assert!(
            m.contains("deleting the member snapshots of 2 node(s)"),
            "{m}"
        );
        assert!(m.contains("cannot delete") && m.contains("retries"), "{m}");
    }

    #[test]
    fn a_snapshot_waits_only_for_restores_from_it_that_have_not_ended() {
        let restore = |name: &str, from: &str, phase: &str, uid: Option<&str>| -> GroupRestore {
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "spec": {"source": {"groupSnapshotName": from}},
                "status": {"phase": phase, "groupSnapshotUid": uid},
            }))
            .expect("restore")
        };
        let restores = [
            restore("cloning", "s", "Cloning", Some("u")),
            restore("pending", "s", "Pending", None),
            restore("done", "s", "Completed", Some("u")),
            restore("failed", "s", "Failed", Some("u")),
            restore("other-snapshot", "t", "Cloning", Some("v")),
            // Started from an earlier snapshot of the same name.
            restore("earlier", "s", "Binding", Some("old")),
        ];
        assert_eq!(
            restores_running(&restores, "s", "u"),
            ["cloning", "pending"]
        );
        assert!(restores_running(&restores[2..4], "s", "u").is_empty());
    }

    #[test]
    fn a_member_records_the_shape_a_restore_recreates() {
        let pv: crate::controller::cache::CachedVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv"},
            "spec": {"capacity": {"storage": "5Gi"}, "volumeMode": "Block",
                "accessModes": ["ReadWriteOnce"], "storageClassName": "local"}
        }))
        .expect("pv");
        let claim: k8s_openapi::api::core::v1::PersistentVolumeClaim =
            serde_json::from_value(json!({
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOncePod"], "storageClassName": "fast"}
            }))
            .expect("claim");
        let mut m = MemberSnapshot::default();
        record_shape(&mut m, Some(&pv), Some(&claim));
        assert_eq!(m.capacity, Some(Quantity("5Gi".into())));
        assert_eq!(m.volume_mode.as_deref(), Some("Block"));
        assert_eq!(m.access_modes, ["ReadWriteOncePod"]);
        assert_eq!(m.storage_class_name.as_deref(), Some("fast"));
        let mut m = MemberSnapshot::default();
        record_shape(&mut m, None, None);
        assert_eq!(m.volume_mode.as_deref(), Some("Filesystem"));
        assert_eq!(m.capacity, None);
    }

    #[test]
    fn members_record_the_cut_that_holds_them_with_its_backend_and_filesystem() {
        let mut node = reported("a", "2026-11-21T12:00:00Z", 5);
        node.metadata.name = Some("g-abc".into());
        if let Some(s) = node.status.as_mut() {
            s.volumes = vec![crate::api::VolumeStatus {
                claim: "data".into(),
                backend: Some("reflink".into()),
                filesystem: Some("xfs".into()),
                snapshot_handle: Some("reflink:/x".into()),
                ..Default::default()
            }];
        }
        let mut status = GroupSnapshotStatus {
            members: vec![MemberSnapshot {
                claim: "data".into(),
                node: "a".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        fill_members(&mut status, &BTreeMap::from([("a".to_string(), node)]));
        let m = &status.members[0];
        assert_eq!(m.node_snapshot.as_deref(), Some("g-abc"));
        assert_eq!(m.backend.as_deref(), Some("reflink"));
        assert_eq!(m.filesystem.as_deref(), Some("xfs"));
    }

    #[test]
    fn keeping_detaches_and_makes_deletion_delete() {
        let mut n = owned("g-1", "a", "u", true);
        n.metadata.resource_version = Some("9".into());
        n.metadata.finalizers = Some(vec![FINALIZER.into(), "tandem.dev/agent".into()]);
        let Patch::Merge(body) = keeping_patch(&n, "u") else {
            panic!("a merge patch")
        };
        assert_eq!(body["metadata"]["ownerReferences"], serde_json::Value::Null);
        assert_eq!(body["metadata"]["finalizers"], json!(["tandem.dev/agent"]));
        assert_eq!(body["metadata"]["resourceVersion"], "9");
        assert_eq!(
            body["metadata"]["annotations"][RETAINED_FROM_UID_ANNOTATION],
            "u"
        );
        assert_eq!(body["spec"]["deletionPolicy"], "Delete");
    }
}
