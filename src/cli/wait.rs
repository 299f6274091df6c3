//! `--wait`: where a snapshot or restore stands, as a decision (done, failed, still going) and a
//! progress line a person can follow. Pure; the polling loop is in the CLI shell.

use kube::ResourceExt;

use crate::api::{
    GroupRestore, GroupSnapshot, GroupSnapshotPhase, NodeAction, NodePhase, NodeRestore,
    NodeSnapshot, RestorePhase,
};

/// Where a waited-for object stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Reached what was waited for.
    Done(String),
    /// Will not get there: why.
    Failed(String),
    /// Still going: what is happening, and what it waits for.
    Going(String),
}

/// A GroupSnapshot's progress: its phase, how many nodes have prepared or cut, and which not yet.
pub fn snapshot_progress(snapshot: &GroupSnapshot, node_snapshots: &[NodeSnapshot]) -> Progress {
    let name = snapshot.name_any();
    let status = snapshot.status.clone().unwrap_or_default();
    if snapshot.metadata.deletion_timestamp.is_some() {
        return Progress::Failed(format!("groupsnapshot {name} is being deleted"));
    }
    match status.phase {
        GroupSnapshotPhase::Ready => {
            return Progress::Done(format!(
                "groupsnapshot {name} Ready: {} members, consistency {}, freeze window {}",
                status.member_count,
                status
                    .consistency
                    .map(|c| format!("{c:?}"))
                    .unwrap_or_else(|| "<none>".into()),
                status
                    .freeze_window_millis
                    .map(|ms| format!("{ms} ms"))
                    .unwrap_or_else(|| "<none>".into())
            ));
        }
        GroupSnapshotPhase::Failed => {
            return Progress::Failed(format!(
                "groupsnapshot {name} Failed: {}",
                status
                    .message
                    .clone()
                    .unwrap_or_else(|| "no message".into())
            ));
        }
        GroupSnapshotPhase::Deleting => {
            return Progress::Failed(format!("groupsnapshot {name} is being deleted"));
        }
        _ => {}
    }
    let mine: Vec<&NodeSnapshot> = node_snapshots
        .iter()
        .filter(|n| n.spec.group_snapshot == name)
        .collect();
    if mine.is_empty() {
        let why = status
            .message
            .clone()
            .map(|m| format!(": {m}"))
            .unwrap_or_default();
        return Progress::Going(format!("{:?}: no node asked to cut yet{why}", status.phase));
    }
    // Across nodes, every node prepares before any cuts: say which ones the trigger waits for.
    let preparing = mine.iter().any(|n| n.spec.action == NodeAction::Prepare);
    let (goal, verb) = if preparing {
        ("prepared", "preparing")
    } else {
        ("cut", "cutting")
    };
    let done = |p: NodePhase| {
        if preparing {
            p == NodePhase::Prepared
        } else {
            matches!(p, NodePhase::Cut | NodePhase::Released)
        }
    };
    let mut waiting = Vec::new();
    let mut reached = 0;
    for n in &mine {
        let phase = n.status.as_ref().map(|s| s.phase).unwrap_or_default();
        if done(phase) {
            reached += 1;
        } else {
            waiting.push(format!("{} ({phase:?})", n.spec.node_name));
        }
    }
    waiting.sort();
    let mut line = format!("{:?}: {reached}/{} nodes {goal}", status.phase, mine.len());
    if !waiting.is_empty() {
        line.push_str(&format!("; still {verb}: {}", waiting.join(", ")));
    }
    Progress::Going(line)
}

/// A GroupRestore's progress: its phase, members cloned, and which nodes are still cloning.
pub fn restore_progress(restore: &GroupRestore, node_restores: &[NodeRestore]) -> Progress {
    let name = restore.name_any();
    let status = restore.status.clone().unwrap_or_default();
    match status.phase {
        RestorePhase::Completed => {
            return Progress::Done(format!(
                "grouprestore {name} Completed: {} claims restored",
                status.member_count
            ));
        }
        RestorePhase::Failed => {
            return Progress::Failed(format!(
                "grouprestore {name} Failed: {}",
                status
                    .message
                    .clone()
                    .unwrap_or_else(|| "no message".into())
            ));
        }
        _ => {}
    }
    let cloned = status
        .members
        .iter()
        .filter(|m| m.cloned_at.is_some())
        .count();
    let mut line = format!(
        "{:?}: {cloned}/{} members cloned",
        status.phase,
        status.members.len()
    );
    let mut waiting: Vec<String> = node_restores
        .iter()
        .filter(|n| n.spec.group_restore == name)
        .filter_map(|n| {
            let phase = n.status.as_ref().map(|s| s.phase).unwrap_or_default();
            let finished = matches!(
                phase,
                crate::api::NodeRestorePhase::Cloned | crate::api::NodeRestorePhase::Aborted
            );
            (!finished).then(|| format!("{} ({phase:?})", n.spec.node_name))
        })
        .collect();
    waiting.sort();
    if !waiting.is_empty() {
        line.push_str(&format!("; still cloning: {}", waiting.join(", ")));
    }
    for m in &status.members {
        if let Some(p) = m.progress_percent
            && m.cloned_at.is_none()
        {
            line.push_str(&format!("; {} copied {p}%", m.claim));
        }
    }
    if let Some(message) = &status.message {
        line.push_str(&format!(" ({message})"));
    }
    Progress::Going(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn gsnap(phase: &str) -> GroupSnapshot {
        serde_json::from_value(json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
            "metadata": {"name": "s"}, "spec": {"groupName": "g"},
            "status": {"phase": phase, "memberCount": 2, "consistency": "FilesystemFrozen",
                       "freezeWindowMillis": 12, "message": "group g not found"}
        }))
        .expect("gsnap")
    }

    fn nsnap(node: &str, snapshot: &str, phase: Option<&str>) -> NodeSnapshot {
        let mut v = json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
            "metadata": {"name": format!("{snapshot}-{node}")},
            "spec": {"nodeName": node, "groupSnapshot": snapshot, "freezeTimeoutSeconds": 10},
        });
        if let Some(p) = phase {
            v["status"] = json!({"phase": p});
        }
        serde_json::from_value(v).expect("nsnap")
    }

    #[test]
    fn snapshot_progress_lines() {
        assert!(
            matches!(snapshot_progress(&gsnap("Ready"), &[]), Progress::Done(l) if l.contains("FilesystemFrozen") && l.contains("12 ms"))
        );
        assert_eq!(
            snapshot_progress(&gsnap("Failed"), &[]),
            Progress::Failed("groupsnapshot s Failed: group g not found".into())
        );
        assert!(matches!(
            snapshot_progress(&gsnap("Deleting"), &[]),
            Progress::Failed(_)
        ));
        let nodes = [
            nsnap("b", "s", Some("Pending")),
            nsnap("a", "s", Some("Cut")),
            nsnap("c", "s", None),
            nsnap("a", "other", Some("Pending")),
        ];
        assert_eq!(
            snapshot_progress(&gsnap("Cutting"), &nodes),
            Progress::Going(
                "Cutting: 1/3 nodes cut; still cutting: b (Pending), c (Pending)".into()
            )
        );
        let mut preparing = [
            nsnap("a", "s", Some("Prepared")),
            nsnap("b", "s", Some("Pending")),
        ];
        for n in &mut preparing {
            n.spec.action = NodeAction::Prepare;
        }
        assert_eq!(
            snapshot_progress(&gsnap("Cutting"), &preparing),
            Progress::Going("Cutting: 1/2 nodes prepared; still preparing: b (Pending)".into())
        );
        assert_eq!(
            snapshot_progress(&gsnap("Pending"), &[]),
            Progress::Going("Pending: no node asked to cut yet: group g not found".into())
        );
    }

    #[test]
    fn restore_progress_lines() {
        let restore = |phase: &str| -> GroupRestore {
            serde_json::from_value(json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "GroupRestore",
                "metadata": {"name": "r"}, "spec": {"source": {"groupSnapshotName": "s"}},
                "status": {"phase": phase, "memberCount": 2, "members": [
                    {"sourceClaim": "a", "claim": "a-r", "persistentVolume": "p1", "node": "n1",
                     "clonedAt": "2026-01-01T00:00:00Z"},
                    {"sourceClaim": "b", "claim": "b-r", "persistentVolume": "p2", "node": "n2",
                     "progressPercent": 40}]}
            }))
            .expect("restore")
        };
        let nrestore: NodeRestore = serde_json::from_value(json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeRestore",
            "metadata": {"name": "r-n2"},
            "spec": {"nodeName": "n2", "groupRestore": "r", "volumes": []},
            "status": {"phase": "Cloning"}
        }))
        .expect("nrestore");
        assert!(matches!(
            restore_progress(&restore("Completed"), &[]),
            Progress::Done(_)
        ));
        assert!(matches!(
            restore_progress(&restore("Failed"), &[]),
            Progress::Failed(_)
        ));
        assert_eq!(
            restore_progress(&restore("Cloning"), &[nrestore]),
            Progress::Going(
                "Cloning: 1/2 members cloned; still cloning: n2 (Cloning); b-r copied 40%".into()
            )
        );
    }
}
