//! Release without the controller's hop: while a NodeSnapshot with `spec.groupNodes` is
//! prepared or held, the agent watches the NodeSnapshots of the same GroupSnapshot (by its uid
//! label) and releases its own cut once all of them show theirs ([`barrier::every_node_has_cut`]).
//! The decision over what was seen is [`sibling_views`], pure; the watch is a thin shell.

use crate::agent::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::mpsc::UnboundedSender;

use crate::api::{NodePhase, NodeSnapshot};
use crate::controller::GROUP_SNAPSHOT_UID_LABEL;
use crate::controller::barrier::NodeView;

/// The views of every node of `own`'s group, from the NodeSnapshots `seen`, with `own` (whose
/// cut this agent holds) as `Cut`. `None` unless each other node of `spec.groupNodes` has exactly
/// one NodeSnapshot controlled by the same GroupSnapshot, not being deleted, whose status
/// answers its current spec: anything missing, doubled or stale means "not yet".
pub fn sibling_views<'a>(
    own: &NodeSnapshot,
    seen: impl IntoIterator<Item = &'a NodeSnapshot> + Clone,
) -> Option<Vec<NodeView>> {
    let group = own.group_snapshot_uid()?;
    let nodes = &own.spec.group_nodes;
    if nodes.len() < 2 || !nodes.contains(&own.spec.node_name) {
        return None;
    }
    let mut views = vec![NodeView {
        node: own.spec.node_name.clone(),
        action: own.spec.action,
        phase: NodePhase::Cut,
        message: None,
    }];
    for node in nodes.iter().filter(|n| **n != own.spec.node_name) {
        let mut found = seen.clone().into_iter().filter(|s| {
            s.spec.node_name == *node
                && s.metadata.namespace == own.metadata.namespace
                && s.group_snapshot_uid() == Some(group)
                && s.spec.group_snapshot == own.spec.group_snapshot
        });
        let sibling = found.next()?;
        if found.next().is_some() || sibling.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let status = sibling.status.as_ref()?;
        if status.observed_generation != sibling.metadata.generation {
            return None;
        }
        views.push(NodeView {
            node: node.clone(),
            action: sibling.spec.action,
            phase: status.phase,
            message: None,
        });
    }
    Some(views)
}

/// Whether a sibling's status shows its cut made (the only change that can let this node go).
fn shows_its_cut(sibling: &NodeSnapshot) -> bool {
    sibling
        .status
        .as_ref()
        .is_some_and(|s| matches!(s.phase, NodePhase::Cut | NodePhase::Released))
}

/// The sibling watches of the NodeSnapshots this agent prepares or holds, by their uid.
#[derive(Default)]
pub struct Siblings {
    watches: Mutex<HashMap<String, Watch>>,
}

struct Watch {
    store: Store<NodeSnapshot>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Siblings {
    /// Starts watching `own`'s siblings unless already watching; every change to them wakes a
    /// reconcile of `own` through `wake`.
    pub fn watch(
        &self,
        client: &Client,
        own: &NodeSnapshot,
        wake: &UnboundedSender<ObjectRef<NodeSnapshot>>,
    ) {
        let (Some(uid), Some(group), Some(namespace)) =
            (own.uid(), own.group_snapshot_uid(), own.namespace())
        else {
            return;
        };
        let mut watches = lock(&self.watches);
        if watches.contains_key(&uid) {
            return;
        }
        let api: Api<NodeSnapshot> = Api::namespaced(client.clone(), &namespace);
        let config =
            watcher::Config::default().labels(&format!("{GROUP_SNAPSHOT_UID_LABEL}={group}"));
        let (store, writer) = reflector::store();
        let own_ref = ObjectRef::from_obj(own);
        let wake = wake.clone();
        let task = tokio::spawn(async move {
            let mut changes = watcher(api, config)
                .default_backoff()
                .reflect(writer)
                .applied_objects()
                .boxed();
            while let Some(change) = changes.next().await {
                match change {
                    // Only a sibling's cut can complete the group: its other changes (50 nodes
                    // preparing, say) would wake this agent for nothing inside the freeze window.
                    Ok(sibling) if shows_its_cut(&sibling) => {
                        if wake.send(own_ref.clone()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "sibling watch"),
                }
            }
        });
        tracing::debug!(%uid, "sibling watch started");
        watches.insert(uid, Watch { store, task });
    }

    /// Stops watching for `uid` (its cut ended, or the object is going).
    pub fn forget(&self, uid: &str) {
        if lock(&self.watches).remove(uid).is_some() {
            tracing::debug!(%uid, "sibling watch stopped");
        }
    }

    /// The views of `own`'s group as last seen (see [`sibling_views`]).
    pub fn views(&self, own: &NodeSnapshot) -> Option<Vec<NodeView>> {
        let store = lock(&self.watches).get(&own.uid()?)?.store.clone();
        let seen: Vec<Arc<NodeSnapshot>> = store.state();
        let views = sibling_views(own, seen.iter().map(|s| s.as_ref()));
        tracing::trace!(seen = seen.len(), ?views, "siblings");
        views
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{NodeAction, NodeSnapshotSpec, NodeSnapshotStatus};
    use crate::controller::barrier::every_node_has_cut;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};

    fn nsnap(node: &str, owner: &str, action: NodeAction, phase: NodePhase) -> NodeSnapshot {
        let mut n = NodeSnapshot::new(
            &format!("s-{node}"),
            NodeSnapshotSpec {
                node_name: node.into(),
                group_snapshot: "s".into(),
                action,
                group_nodes: vec!["a".into(), "b".into(), "c".into()],
                ..Default::default()
            },
        );
        n.metadata.namespace = Some("ns".into());
        n.metadata.uid = Some(format!("uid-{node}"));
        n.metadata.generation = Some(2);
        n.metadata.owner_references = Some(vec![OwnerReference {
            kind: "GroupSnapshot".into(),
            name: "s".into(),
            uid: owner.into(),
            controller: Some(true),
            ..Default::default()
        }]);
        n.status = Some(NodeSnapshotStatus {
            observed_generation: Some(2),
            phase,
            ..Default::default()
        });
        n
    }

    fn may_release(own: &NodeSnapshot, seen: &[NodeSnapshot]) -> bool {
        sibling_views(own, seen).is_some_and(|v| every_node_has_cut(&v))
    }

    #[test]
    fn releases_once_every_sibling_of_the_same_group_snapshot_shows_its_cut() {
        use NodeAction::Cut;
        let own = nsnap("a", "g1", Cut, NodePhase::Cut);
        let b = nsnap("b", "g1", Cut, NodePhase::Cut);
        let c = nsnap("c", "g1", Cut, NodePhase::Released);
        assert!(may_release(&own, &[own.clone(), b.clone(), c.clone()]));

        // A node not seen yet, or seen twice.
        assert!(!may_release(&own, &[own.clone(), b.clone()]));
        assert!(!may_release(&own, &[b.clone(), c.clone(), c.clone()]));
        // Another GroupSnapshot's (an earlier one of the same name): not a sibling.
        let foreign = nsnap("c", "g0", Cut, NodePhase::Cut);
        assert!(!may_release(&own, &[b.clone(), foreign]));
        // A status that does not answer the current spec yet (the Cut was just patched).
        let mut stale = nsnap("b", "g1", Cut, NodePhase::Cut);
        stale.metadata.generation = Some(3);
        assert!(!may_release(&own, &[stale, c.clone()]));
        // Being deleted, or still preparing, or aborted.
        let mut deleting = b.clone();
        deleting.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::UNIX_EPOCH));
        assert!(!may_release(&own, &[deleting, c.clone()]));
        let preparing = nsnap("b", "g1", NodeAction::Prepare, NodePhase::Prepared);
        assert!(!may_release(&own, &[preparing, c.clone()]));
        let aborting = nsnap("b", "g1", NodeAction::Abort, NodePhase::Cut);
        assert!(!may_release(&own, &[aborting, c.clone()]));
        // Asked to abort itself, or without a group to look at.
        let own_aborting = nsnap("a", "g1", NodeAction::Abort, NodePhase::Cut);
        assert!(!may_release(&own_aborting, &[b.clone(), c.clone()]));
        let mut alone = own.clone();
        alone.spec.group_nodes = vec![];
        assert!(!may_release(&alone, &[b.clone(), c.clone()]));
        let mut elsewhere = own.clone();
        elsewhere.spec.group_nodes = vec!["b".into(), "c".into()];
        assert!(!may_release(&elsewhere, &[b, c]));
    }
}
