//! tandem as the external deleter of its restored PVs, and the NodeRestore cleanup.
//!
//! - A tandem PV (`pv.kubernetes.io/provisioned-by: tandem.dev/restore`) whose claim is gone
//!   (phase Released or Failed) or that is being deleted: its NodeRestore volume gets
//!   `release: true`; once the agent reports it Deleted, the PV's finalizer goes and the PV is
//!   deleted.
//! - A NodeRestore whose volumes are all Deleted (or that is Aborted) is deleted, once no PV of
//!   it is left.
//! - A NodeRestore whose GroupRestore is gone and never Completed gets `action: Abort`.

use crate::controller::cache::CachedVolume;
use std::collections::BTreeMap;

use kube::ResourceExt;

use super::plan::{
    CLONE_FINALIZER, COMPLETED_ANNOTATION, GROUP_RESTORE_UID_LABEL, NODE_RESTORE_ANNOTATION,
    PROVISIONED_BY_ANNOTATION,
};
use crate::api::{
    CloneState, NodeRestore, NodeRestoreAction, NodeRestorePhase, RESTORE_PROVISIONER,
};

/// What to do about one NodeRestore and its PVs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Steps {
    /// Volumes (by PV) to mark `release: true`.
    pub release: Vec<String>,
    /// PVs whose clone is gone: delete them and drop their finalizer.
    pub finalize: Vec<String>,
    /// Set `action: Abort`.
    pub abort: bool,
    /// Delete the NodeRestore.
    pub delete: bool,
}

/// Whether a PV is this NodeRestore's (made by tandem for it).
fn is_ours(pv: &CachedVolume, node: &NodeRestore) -> bool {
    let uid = node.labels().get(GROUP_RESTORE_UID_LABEL);
    pv.annotations()
        .get(PROVISIONED_BY_ANNOTATION)
        .map(String::as_str)
        == Some(RESTORE_PROVISIONER)
        && pv.annotations().get(NODE_RESTORE_ANNOTATION) == node.metadata.name.as_ref()
        && uid.is_some()
        && pv.labels().get(GROUP_RESTORE_UID_LABEL) == uid
}

/// Whether a PV's claim is gone (or the PV is being deleted): its clone may go. A PV set to
/// reclaim Retain (an InPlace restore's undo point) is kept until it is deleted.
fn released(pv: &CachedVolume) -> bool {
    let retained = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Retain");
    pv.metadata.deletion_timestamp.is_some()
        || !retained
            && matches!(
                pv.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Released" | "Failed")
            )
}

/// Decides, from the NodeRestore, the PVs by name and whether its GroupRestore (same name and uid)
/// still exists.
pub fn steps(
    node: &NodeRestore,
    volumes: &BTreeMap<String, CachedVolume>,
    restore_exists: bool,
) -> Steps {
    let mut out = Steps::default();
    let status = node.status.clone().unwrap_or_default();
    let state = |pv: &str| {
        status
            .volumes
            .iter()
            .find(|v| v.persistent_volume == pv)
            .map(|v| v.state)
    };
    // Failed: the agent deleted whatever it made; kept until the restore has seen it (it
    // answers with Abort) or the restore is gone.
    let failed_and_seen = status.phase == NodeRestorePhase::Failed
        && (node.spec.action == NodeRestoreAction::Abort || !restore_exists);
    let all_gone = matches!(status.phase, NodeRestorePhase::Aborted)
        || failed_and_seen
        || (!node.spec.volumes.is_empty()
            && node
                .spec
                .volumes
                .iter()
                .all(|v| state(&v.persistent_volume) == Some(CloneState::Deleted)));
    let mut pvs_left = false;
    for volume in &node.spec.volumes {
        let Some(pv) = volumes
            .get(&volume.persistent_volume)
            .filter(|pv| is_ours(pv, node))
        else {
            continue;
        };
        let clone_gone = all_gone || state(&volume.persistent_volume) == Some(CloneState::Deleted);
        if clone_gone && (released(pv) || all_gone) {
            if crate::finalizer::has(pv, CLONE_FINALIZER)
                || pv.metadata.deletion_timestamp.is_none()
            {
                out.finalize.push(volume.persistent_volume.clone());
            }
            pvs_left = true;
        } else if released(pv) && !volume.release {
            out.release.push(volume.persistent_volume.clone());
            pvs_left = true;
        } else {
            pvs_left = true;
        }
    }
    let completed = node.annotations().contains_key(COMPLETED_ANNOTATION);
    if !restore_exists && !completed && node.spec.action != NodeRestoreAction::Abort {
        out.abort = true;
    }
    if all_gone && !pvs_left && node.metadata.deletion_timestamp.is_none() {
        out.delete = true;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ClonedVolume, NodeRestoreSpec, NodeRestoreStatus, RestoreVolume};
    use serde_json::json;

    fn node(volumes: &[(&str, bool, Option<CloneState>)], phase: NodeRestorePhase) -> NodeRestore {
        let mut n = NodeRestore::new(
            "nr",
            NodeRestoreSpec {
                node_name: "a".into(),
                group_restore: "r".into(),
                action: NodeRestoreAction::Clone,
                volumes: volumes
                    .iter()
                    .map(|(pv, release, _)| RestoreVolume {
                        persistent_volume: (*pv).into(),
                        release: *release,
                        ..Default::default()
                    })
                    .collect(),
            },
        );
        n.metadata.labels = Some(BTreeMap::from([(
            GROUP_RESTORE_UID_LABEL.into(),
            "u".into(),
        )]));
        n.status = Some(NodeRestoreStatus {
            phase,
            volumes: volumes
                .iter()
                .filter_map(|(pv, _, state)| {
                    Some(ClonedVolume {
                        persistent_volume: (*pv).into(),
                        state: (*state)?,
                        ..Default::default()
                    })
                })
                .collect(),
            ..Default::default()
        });
        n
    }

    fn pv(name: &str, phase: &str, deleting: bool) -> (String, CachedVolume) {
        let mut v: CachedVolume = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {GROUP_RESTORE_UID_LABEL: "u"},
                "annotations": {PROVISIONED_BY_ANNOTATION: RESTORE_PROVISIONER, NODE_RESTORE_ANNOTATION: "nr"},
                "finalizers": [CLONE_FINALIZER]},
            "status": {"phase": phase},
        }))
        .expect("pv");
        if deleting {
            v.metadata.deletion_timestamp = Some(crate::controller::restore::now());
        }
        (name.into(), v)
    }

    use CloneState::{Cloned, Deleted};
    use NodeRestorePhase as P;

    #[test]
    fn a_released_volume_is_released_then_finalized_once_the_clone_is_gone() {
        let volumes = BTreeMap::from([pv("p1", "Released", false), pv("p2", "Bound", false)]);
        let n = node(
            &[("p1", false, Some(Cloned)), ("p2", false, Some(Cloned))],
            P::Cloned,
        );
        let s = steps(&n, &volumes, true);
        assert_eq!(s.release, ["p1"]);
        assert!(s.finalize.is_empty() && !s.delete && !s.abort);
        // Asked already: nothing more until the agent answers.
        let n = node(
            &[("p1", true, Some(Cloned)), ("p2", false, Some(Cloned))],
            P::Cloned,
        );
        assert_eq!(steps(&n, &volumes, true), Steps::default());
        // The agent deleted it: the PV goes.
        let n = node(
            &[("p1", true, Some(Deleted)), ("p2", false, Some(Cloned))],
            P::Cloned,
        );
        let s = steps(&n, &volumes, true);
        assert_eq!(s.finalize, ["p1"]);
        assert!(!s.delete);
    }

    #[test]
    fn a_bound_volume_is_never_released_and_someone_elses_pv_is_never_touched() {
        let n = node(&[("p1", false, Some(Cloned))], P::Cloned);
        assert_eq!(
            steps(&n, &BTreeMap::from([pv("p1", "Bound", false)]), true),
            Steps::default()
        );
        // A PV of the same name that tandem did not make for this NodeRestore.
        let (name, mut other) = pv("p1", "Released", false);
        other.metadata.annotations = None;
        assert_eq!(
            steps(&n, &BTreeMap::from([(name, other)]), true),
            Steps::default()
        );
        // A PV deleted by hand is released too.
        let s = steps(&n, &BTreeMap::from([pv("p1", "Bound", true)]), true);
        assert_eq!(s.release, ["p1"]);
        // Kept (Retain: an InPlace restore replaced its claim): released only once deleted.
        let (name, mut kept) = pv("p1", "Released", false);
        kept.spec = Some(crate::controller::cache::CachedVolumeSpec {
            persistent_volume_reclaim_policy: Some("Retain".into()),
            ..Default::default()
        });
        assert_eq!(
            steps(&n, &BTreeMap::from([(name.clone(), kept.clone())]), true),
            Steps::default()
        );
        kept.metadata.deletion_timestamp = Some(crate::controller::restore::now());
        assert_eq!(
            steps(&n, &BTreeMap::from([(name, kept)]), true).release,
            ["p1"]
        );
    }

    #[test]
    fn a_node_restore_goes_once_every_clone_and_pv_is_gone() {
        let n = node(&[("p1", true, Some(Deleted))], P::Cloned);
        let s = steps(&n, &BTreeMap::new(), true);
        assert!(s.delete, "{s:?}");
        // Not while a PV of it is left.
        let s = steps(&n, &BTreeMap::from([pv("p1", "Released", true)]), true);
        assert_eq!(s.finalize, ["p1"]);
        assert!(!s.delete);
        // Aborted: every clone is gone; its PVs (rolled back) go, then it.
        let n = node(&[("p1", false, None)], P::Aborted);
        let s = steps(&n, &BTreeMap::from([pv("p1", "Available", true)]), false);
        assert_eq!(s.finalize, ["p1"]);
        assert!(!s.delete);
        assert!(steps(&n, &BTreeMap::new(), false).delete);
        // Still cloning: stays.
        let n = node(&[("p1", false, Some(Cloned))], P::Cloned);
        assert!(!steps(&n, &BTreeMap::new(), true).delete);
    }

    #[test]
    fn a_failed_node_restore_goes_once_its_restore_has_seen_it() {
        let mut n = node(&[("p1", false, Some(CloneState::Failed))], P::Failed);
        assert!(
            !steps(&n, &BTreeMap::new(), true).delete,
            "the restore must see it first"
        );
        n.spec.action = NodeRestoreAction::Abort;
        assert!(steps(&n, &BTreeMap::new(), true).delete);
        n.spec.action = NodeRestoreAction::Clone;
        assert!(
            steps(&n, &BTreeMap::new(), false).delete,
            "its restore is gone"
        );
    }

    #[test]
    fn an_orphan_of_a_restore_that_never_completed_is_aborted() {
        let mut n = node(&[("p1", false, Some(Cloned))], P::Cloned);
        assert!(steps(&n, &BTreeMap::new(), false).abort);
        assert!(!steps(&n, &BTreeMap::new(), true).abort);
        n.metadata.annotations = Some(BTreeMap::from([(
            COMPLETED_ANNOTATION.into(),
            "true".into(),
        )]));
        assert!(
            !steps(&n, &BTreeMap::new(), false).abort,
            "a completed restore's clones are kept"
        );
    }
}
