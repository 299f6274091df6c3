//! The orphan sweep: a NodeSnapshot whose GroupSnapshot is gone without tandem's cleanup (someone
//! removed the GroupSnapshot's finalizer) would keep the controller's finalizer forever, and its
//! snapshots would stay on the node with nothing to account for them. The sweep releases such a
//! NodeSnapshot to its agent with `deletionPolicy: Delete`, so the snapshots go with it.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use super::snapshot::{FINALIZER, RETAINED_FROM_UID_ANNOTATION};
use super::{Context, Error, cache_ready, publish_event};
use crate::api::{DeletionPolicy, GroupSnapshot, NodeSnapshot};

/// How often the sweep looks even when no NodeSnapshot changed.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);

/// Runs forever: after NodeSnapshot events (and every [`SWEEP_INTERVAL`]), releases orphans.
pub async fn sweep(ctx: Arc<Context>) {
    loop {
        tokio::select! {
            _ = ctx.node_snapshots_changed.notified() => {}
            _ = tokio::time::sleep(SWEEP_INTERVAL) => {}
        }
        if cache_ready(&ctx.node_snapshots, "NodeSnapshots")
            .await
            .is_err()
        {
            continue;
        }
        let candidates: Vec<_> = ctx
            .node_snapshots
            .state()
            .into_iter()
            .filter(|n| may_be_orphan(n))
            .collect();
        for node in candidates {
            if let Err(e) = release_if_orphan(&ctx, &node).await {
                warn!(nodesnapshot = %node.name_any(), error = %e, "orphan sweep");
            }
        }
    }
}

/// Only a NodeSnapshot being deleted that still has the controller's finalizer can be stuck; one
/// kept by a `Retain` deletion holds it on purpose (it is the record of the kept snapshots).
fn may_be_orphan(node: &NodeSnapshot) -> bool {
    node.metadata.deletion_timestamp.is_some()
        && crate::finalizer::has(node, FINALIZER)
        && !node
            .annotations()
            .contains_key(RETAINED_FROM_UID_ANNOTATION)
}

/// The GroupSnapshot (name, uid) that controls a NodeSnapshot.
fn owner(node: &NodeSnapshot) -> Option<(&str, &str)> {
    node.owner_references()
        .iter()
        .find(|o| o.kind == "GroupSnapshot" && o.controller == Some(true))
        .map(|o| (o.name.as_str(), o.uid.as_str()))
}

/// Whether the owner found in the API (its uid, if any object has the name) is the NodeSnapshot's.
fn owner_is_gone(owner_uid: Option<&str>, found_uid: Option<&str>) -> bool {
    match (owner_uid, found_uid) {
        (Some(owner), Some(found)) => owner != found,
        _ => true,
    }
}

async fn release_if_orphan(ctx: &Context, node: &NodeSnapshot) -> Result<(), Error> {
    let namespace = node.namespace().ok_or(Error::MissingNamespace)?;
    let found_uid = match owner(node) {
        Some((name, _)) => {
            let snapshots: Api<GroupSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
            snapshots.get_opt(name).await?.and_then(|s| s.uid())
        }
        None => None,
    };
    if !owner_is_gone(owner(node).map(|(_, uid)| uid), found_uid.as_deref()) {
        // Its GroupSnapshot is there: its own cleanup decides.
        return Ok(());
    }
    let finalizers: Vec<&String> = node
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = Patch::Merge(json!({
        "metadata": {"resourceVersion": node.resource_version(), "finalizers": finalizers},
        "spec": {"deletionPolicy": DeletionPolicy::Delete},
    }));
    let api: Api<NodeSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    match api
        .patch(&node.name_any(), &PatchParams::default(), &patch)
        .await
    {
        Ok(_) => {}
        // Gone or changed meanwhile: the next event brings it back if it still needs us.
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    let owner_name = owner(node).map_or("none".to_string(), |(name, uid)| {
        format!("{name} (uid {uid})")
    });
    let note = format!(
        "its GroupSnapshot {owner_name} is gone without tandem's cleanup; releasing it so the agent of node {} deletes its snapshots",
        node.spec.node_name
    );
    info!(%namespace, nodesnapshot = %node.name_any(), "orphan released: {note}");
    publish_event(
        ctx,
        &node.object_ref(&()),
        EventType::Warning,
        "OrphanReleased".into(),
        Some(note),
        "Cleanup",
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
    use k8s_openapi::jiff::Timestamp;

    fn node(finalizers: &[&str], deleting: bool, owner_uid: Option<&str>) -> NodeSnapshot {
        let mut n = NodeSnapshot::new("n", Default::default());
        n.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        n.metadata.deletion_timestamp = deleting.then(|| Time(Timestamp::now()));
        n.metadata.owner_references = owner_uid.map(|uid| {
            vec![OwnerReference {
                kind: "GroupSnapshot".into(),
                name: "g".into(),
                uid: uid.into(),
                controller: Some(true),
                ..Default::default()
            }]
        });
        n
    }

    #[test]
    fn only_terminating_nodesnapshots_with_the_controller_finalizer_are_candidates() {
        assert!(may_be_orphan(&node(
            &[FINALIZER, "tandem.dev/agent"],
            true,
            Some("u")
        )));
        assert!(!may_be_orphan(&node(&[FINALIZER], false, Some("u"))));
        assert!(!may_be_orphan(&node(
            &["tandem.dev/agent"],
            true,
            Some("u")
        )));
    }

    #[test]
    fn a_kept_nodesnapshot_is_no_orphan() {
        let mut kept = node(&[FINALIZER], true, None);
        kept.metadata.annotations =
            Some([(RETAINED_FROM_UID_ANNOTATION.to_string(), "u".to_string())].into());
        assert!(!may_be_orphan(&kept));
    }

    #[test]
    fn an_owner_is_gone_when_no_object_or_another_instance_has_its_name() {
        assert!(!owner_is_gone(Some("u1"), Some("u1")));
        // A new GroupSnapshot of the same name is not the owner.
        assert!(owner_is_gone(Some("u1"), Some("u2")));
        assert!(owner_is_gone(Some("u1"), None));
        // No owner reference at all: nothing will ever release it.
        assert!(owner_is_gone(None, Some("u2")));
        assert_eq!(owner(&node(&[], true, Some("u"))), Some(("g", "u")));
    }
}
