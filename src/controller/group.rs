//! Reconciles ConsistencyGroups: resolves members and reports them in status.

use crate::controller::cache::CachedVolume;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, watcher::Error as WatchError};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::membership::{
    HOSTNAME_LABEL, REASON_CLAIM_NOT_FOUND, REASON_VOLUME_NOT_FOUND, claim_may_affect, name_nodes,
    nodes_by_hostname, resolve_members_with, volume_may_affect,
};
use super::{CONTROLLER_NAME, Context, Error, caches_ready, publish_event};
use crate::api::{CONDITION_READY, ConsistencyGroup, ConsistencyGroupStatus, GroupMember};
use crate::conditions::condition;

/// How many groups reconcile at once.
const RECONCILE_CONCURRENCY: u16 = 16;

/// Runs the ConsistencyGroup controller; a PVC or PV change re-reconciles the groups it can affect.
pub async fn run_group_controller(
    ctx: Arc<Context>,
    namespace: Option<&str>,
    claim_events: BoxStream<'static, Result<PersistentVolumeClaim, WatchError>>,
    volume_events: BoxStream<'static, Result<CachedVolume, WatchError>>,
) {
    let groups_api: Api<ConsistencyGroup> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Bounded: 10,000 groups reconciled at once held 10,000 requests in flight, and the heap
    // they grew stayed the process's for good.
    let controller = super::cache::slim_controller(groups_api, watcher::Config::default())
        .with_config(
            kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY),
        );
    let groups = controller.store();
    let groups_for_volumes = groups.clone();
    let (claims, volumes) = (ctx.claims.clone(), ctx.volumes.clone());
    controller
        .watches_stream(claim_events, move |claim| {
            let volume_labels = claim
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_deref())
                .and_then(|v| volumes.get(&ObjectRef::new(v)));
            let volume_labels = volume_labels.as_ref().map(|v| v.labels());
            groups_affected(&groups, claim.namespace().as_deref(), |group| {
                claim_may_affect(group, &claim.name_any(), claim.labels(), volume_labels)
            })
        })
        .watches_stream(volume_events, move |volume| {
            let claim_ref = volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
            let namespace = claim_ref.and_then(|r| r.namespace.clone());
            let claim = claim_ref
                .zip(namespace.as_deref())
                .and_then(|(r, ns)| claims.get(&ObjectRef::new(r.name.as_deref()?).within(ns)));
            let claim_name = claim_ref.and_then(|r| r.name.as_deref());
            // Once per event, not once per group of the namespace.
            let claim_labels = claim
                .as_ref()
                .map(|c| c.labels().clone())
                .unwrap_or_default();
            groups_affected(&groups_for_volumes, namespace.as_deref(), |group| {
                let claim_affects = claim_name.is_some_and(|name| {
                    claim_may_affect(group, name, &claim_labels, Some(volume.labels()))
                });
                volume_may_affect(group, &volume.name_any(), volume.labels(), claim_affects)
            })
        })
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "consistency group reconcile failed");
            }
        })
        .await;
}

/// The groups of `namespace` that `affected` picks: a PVC or PV change can only affect groups of
/// the claim's namespace, and of those only the ones that name, select or list it.
fn groups_affected(
    groups: &kube::runtime::reflector::Store<ConsistencyGroup>,
    namespace: Option<&str>,
    affected: impl Fn(&ConsistencyGroup) -> bool,
) -> Vec<ObjectRef<ConsistencyGroup>> {
    let Some(namespace) = namespace else {
        return Vec::new();
    };
    groups
        .state()
        .iter()
        .filter(|g| g.metadata.namespace.as_deref() == Some(namespace))
        .filter(|g| affected(g))
        .map(|g| ObjectRef::from_obj(g.as_ref()))
        .collect()
}

async fn reconcile(group: Arc<ConsistencyGroup>, ctx: Arc<Context>) -> Result<Action, Error> {
    tracing::debug!(group = %group.name_any(), "reconcile");
    ctx.metrics.reconciled("consistency_group");
    caches_ready(&ctx).await?;
    tracing::debug!(group = %group.name_any(), "caches ready");
    let namespace = group.namespace().ok_or(Error::MissingNamespace)?;
    let claims = ctx.claims.state();
    let previous = group.status.clone().unwrap_or_default();
    let generation = group.metadata.generation;
    let cached_volume = |name: &str| ctx.volumes.get(&ObjectRef::new(name));

    let mut resolved = resolve_members_with(
        &namespace,
        &group.spec,
        claims.iter().map(Arc::as_ref),
        cached_volume,
        || ctx.volumes.state(),
    );
    // The caches trail the API server: a claim created a moment before its group may not be in
    // them yet. A member newly reported missing is looked up live before anyone is told so.
    if let Ok(members) = &resolved {
        let (missing_claims, missing_volumes) = new_absences(&previous.members, members);
        if !missing_claims.is_empty() || !missing_volumes.is_empty() {
            let (live_claims, live_volumes) =
                fetch_live(&ctx, &namespace, &missing_claims, &missing_volumes).await?;
            if !live_claims.is_empty() || !live_volumes.is_empty() {
                let live_volumes: Vec<Arc<CachedVolume>> =
                    live_volumes.into_iter().map(Arc::new).collect();
                let volume = |name: &str| {
                    live_volumes
                        .iter()
                        .find(|v| v.metadata.name.as_deref() == Some(name))
                        .cloned()
                        .or_else(|| cached_volume(name))
                };
                resolved = resolve_members_with(
                    &namespace,
                    &group.spec,
                    claims.iter().map(Arc::as_ref).chain(&live_claims),
                    volume,
                    || {
                        let mut all = ctx.volumes.state();
                        all.extend(live_volumes.iter().cloned());
                        all
                    },
                );
            }
        }
    }

    let status = match resolved {
        Ok(mut members) => {
            let nodes = ctx.nodes.state();
            let by_hostname = nodes_by_hostname(nodes.iter().map(|n| {
                (
                    n.metadata.name.as_deref().unwrap_or_default(),
                    n.labels().get(HOSTNAME_LABEL).map(String::as_str),
                )
            }));
            name_nodes(&mut members, &by_hostname);
            summarize(members, &previous, generation)
        }
        Err(e) => ConsistencyGroupStatus {
            observed_generation: generation,
            conditions: vec![condition(
                &previous.conditions,
                CONDITION_READY,
                false,
                e.reason(),
                e.to_string(),
                generation,
            )],
            ..Default::default()
        },
    };
    if status == previous {
        return Ok(Action::await_change());
    }

    publish_member_events(&group, &previous.members, &status.members, &ctx).await;
    let api: Api<ConsistencyGroup> = Api::namespaced(ctx.client.clone(), &namespace);
    let patch = json!({
        "apiVersion": ConsistencyGroup::api_version(&()),
        "kind": ConsistencyGroup::kind(&()),
        "status": status,
    });
    api.patch_status(
        &group.name_any(),
        &PatchParams::apply(CONTROLLER_NAME).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    info!(
        group = %group.name_any(),
        namespace = %namespace,
        members = status.ready_members,
        unsupported = status.unsupported_members,
        "membership updated"
    );
    if status.members != previous.members {
        super::rbd_members::follow_members(&ctx, &group, &previous.members, &status.members).await;
    }
    Ok(Action::await_change())
}

/// Counts, nodes and the Ready condition of a member list.
fn summarize(
    members: Vec<GroupMember>,
    previous: &ConsistencyGroupStatus,
    generation: Option<i64>,
) -> ConsistencyGroupStatus {
    let ready = members.iter().filter(|m| m.supported).count();
    let unsupported = members.len() - ready;
    let nodes: BTreeSet<String> = members
        .iter()
        .filter(|m| m.supported)
        .filter_map(|m| m.node.clone())
        .collect();
    let (is_ready, reason, message) = if members.is_empty() {
        (
            false,
            "NoMembers",
            "the group selects no volume".to_string(),
        )
    } else if unsupported > 0 {
        let names: Vec<&str> = members
            .iter()
            .filter(|m| !m.supported)
            .map(|m| m.claim.as_str())
            .collect();
        (
            false,
            "UnsupportedMembers",
            format!(
                "{unsupported} of {} members cannot be snapshotted: {}",
                members.len(),
                names.join(", ")
            ),
        )
    } else {
        (
            true,
            "AllMembersReady",
            format!("{ready} members on {} nodes", nodes.len()),
        )
    };
    ConsistencyGroupStatus {
        observed_generation: generation,
        ready_members: count(ready),
        unsupported_members: count(unsupported),
        node_count: count(nodes.len()),
        nodes: nodes.into_iter().collect(),
        conditions: vec![condition(
            &previous.conditions,
            CONDITION_READY,
            is_ready,
            reason,
            message,
            generation,
        )],
        members,
    }
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// One Warning event per reconcile for the members that became unsupported (or changed reason),
/// so `kubectl describe` tells the story without an event per claim on every change.
async fn publish_member_events(
    group: &ConsistencyGroup,
    before: &[GroupMember],
    after: &[GroupMember],
    ctx: &Context,
) {
    let Some(note) = unsupported_members_note(before, after) else {
        return;
    };
    publish_event(
        ctx,
        &group.object_ref(&()),
        EventType::Warning,
        "MembersUnsupported".into(),
        Some(note),
        "ResolveMembers",
    )
    .await;
}

/// The most members one event names; the rest are counted.
const MEMBERS_PER_EVENT: usize = 10;

/// The note of the aggregated event: the members newly unsupported, with their reasons; None when
/// nothing changed.
fn unsupported_members_note(before: &[GroupMember], after: &[GroupMember]) -> Option<String> {
    let changed: Vec<&GroupMember> = after
        .iter()
        .filter(|m| !m.supported)
        .filter(|m| {
            !before
                .iter()
                .any(|b| b.claim == m.claim && b.reason == m.reason && !b.supported)
        })
        .collect();
    if changed.is_empty() {
        return None;
    }
    let mut named: Vec<String> = changed
        .iter()
        .take(MEMBERS_PER_EVENT)
        .map(|m| {
            format!(
                "{} ({}: {})",
                m.claim,
                m.reason.as_deref().unwrap_or("MemberUnsupported"),
                m.message.as_deref().unwrap_or("cannot be snapshotted")
            )
        })
        .collect();
    if changed.len() > MEMBERS_PER_EVENT {
        named.push(format!("and {} more", changed.len() - MEMBERS_PER_EVENT));
    }
    // Events notes are limited to 1 kB.
    let mut note = format!(
        "{} member(s) cannot be snapshotted: {}",
        changed.len(),
        named.join("; ")
    );
    if note.len() > 1000 {
        let mut cut = 997;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    Some(note)
}

/// The claims and volumes that `members` newly reports as missing (not already so in `previous`):
/// the ones a trailing cache may only not have seen yet. Bounded by what changed, so a group with
/// long-missing members costs no API call per reconcile.
fn new_absences(previous: &[GroupMember], members: &[GroupMember]) -> (Vec<String>, Vec<String>) {
    let already = |m: &GroupMember| {
        previous
            .iter()
            .any(|p| p.claim == m.claim && p.reason == m.reason && !p.supported)
    };
    let mut claims = Vec::new();
    let mut volumes = Vec::new();
    for member in members.iter().filter(|m| !m.supported && !already(m)) {
        match member.reason.as_deref() {
            Some(REASON_CLAIM_NOT_FOUND) => claims.push(member.claim.clone()),
            Some(REASON_VOLUME_NOT_FOUND) => volumes.extend(member.persistent_volume.clone()),
            _ => {}
        }
    }
    (claims, volumes)
}

/// Reads `claims` (of `namespace`) and `volumes` from the API server; the ones that do not exist
/// are left out.
async fn fetch_live(
    ctx: &Context,
    namespace: &str,
    claims: &[String],
    volumes: &[String],
) -> Result<(Vec<PersistentVolumeClaim>, Vec<CachedVolume>), Error> {
    let claims_api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), namespace);
    let volumes_api: Api<CachedVolume> = Api::all(ctx.client.clone());
    let mut live_claims = Vec::new();
    for name in claims {
        live_claims.extend(claims_api.get_opt(name).await?);
    }
    let mut live_volumes = Vec::new();
    for name in volumes {
        live_volumes.extend(volumes_api.get_opt(name).await?);
    }
    // A claim that exists live may be bound to a volume the cache has not seen either.
    for claim in &live_claims {
        let volume = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
        if let Some(volume) =
            volume.filter(|v| !v.is_empty() && ctx.volumes.get(&ObjectRef::new(v)).is_none())
        {
            live_volumes.extend(volumes_api.get_opt(volume).await?);
        }
    }
    Ok((live_claims, live_volumes))
}

fn error_policy(group: Arc<ConsistencyGroup>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(group = %group.name_any(), error = %error, "will retry");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(claim: &str, reason: Option<&str>) -> GroupMember {
        GroupMember {
            claim: claim.into(),
            supported: reason.is_none(),
            reason: reason.map(String::from),
            message: reason.map(|r| format!("{claim} is {r}")),
            ..Default::default()
        }
    }

    #[test]
    fn one_note_names_every_newly_unsupported_member_and_caps_the_list() {
        let after: Vec<GroupMember> = (0..512)
            .map(|i| member(&format!("c{i}"), Some("ClaimNotFound")))
            .collect();
        let note = unsupported_members_note(&[], &after).expect("a note");
        assert!(note.starts_with("512 member(s)"), "{note}");
        assert!(note.contains("and 502 more"), "{note}");
        assert!(note.len() <= 1000);
        // Nothing changed: no event.
        assert_eq!(unsupported_members_note(&after, &after), None);
        // One changed reason: only that member.
        let mut changed = after.clone();
        changed[3] = member("c3", Some("ClaimNotBound"));
        let note = unsupported_members_note(&after, &changed).expect("a note");
        assert!(
            note.starts_with("1 member(s)") && note.contains("c3 (ClaimNotBound"),
            "{note}"
        );
        // Supported members never appear.
        assert_eq!(unsupported_members_note(&[], &[member("ok", None)]), None);
    }

    #[test]
    fn only_newly_missing_claims_and_volumes_are_looked_up_live() {
        let lost = GroupMember {
            persistent_volume: Some("pv-lost".into()),
            ..member("lost", Some(REASON_VOLUME_NOT_FOUND))
        };
        let now = vec![
            member("ok", None),
            member("new", Some(REASON_CLAIM_NOT_FOUND)),
            member("old", Some(REASON_CLAIM_NOT_FOUND)),
            member("pending", Some("ClaimNotBound")),
            lost.clone(),
        ];
        // (case, previous members, claims to look up, volumes to look up)
        type Case<'a> = (&'a str, Vec<GroupMember>, Vec<&'a str>, Vec<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "first reconcile",
                vec![],
                vec!["new", "old"],
                vec!["pv-lost"],
            ),
            (
                "already missing before",
                vec![member("old", Some(REASON_CLAIM_NOT_FOUND)), lost.clone()],
                vec!["new"],
                vec![],
            ),
            (
                "was supported, now missing",
                vec![member("new", None), member("old", None)],
                vec!["new", "old"],
                vec!["pv-lost"],
            ),
            (
                "missing for another reason before",
                vec![member("new", Some("ClaimNotBound"))],
                vec!["new", "old"],
                vec!["pv-lost"],
            ),
        ];
        for (case, previous, claims, volumes) in cases {
            let (c, v) = new_absences(&previous, &now);
            assert_eq!(c, claims, "{case}: claims");
            assert_eq!(v, volumes, "{case}: volumes");
        }
    }
}
