//! The freeze barrier's decisions, as pure logic: given what every node reported, what the
//! controller does next. Across nodes, every node first prepares (checks and flushes, freezing
//! nothing) and all freeze on one trigger. Every member must be frozen before any is thawed, so
//! nodes are released only when all of them have cut; any failure or a deadline aborts all.

use crate::api::{NodeAction, NodePhase};

/// What the controller knows of one node's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub node: String,
    pub action: NodeAction,
    pub phase: NodePhase,
    pub message: Option<String>,
}

/// The controller's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until a node reports (or the deadline passes).
    Wait,
    /// Every node has prepared (checked and flushed, nothing frozen): tell these nodes to
    /// freeze and cut, all at once.
    Cut(Vec<String>),
    /// Every node has cut: tell these nodes to thaw and keep their snapshots.
    Release(Vec<String>),
    /// Tell these nodes to thaw and delete their snapshots.
    Abort(Vec<String>),
    /// Every node released: the group snapshot is complete.
    Ready,
    /// Every node has aborted or failed: the group snapshot failed, nothing is left behind.
    Failed(String),
}

fn is_terminal_failure(phase: NodePhase) -> bool {
    matches!(phase, NodePhase::Failed | NodePhase::Aborted)
}

/// Decides the next step. `deadline_passed`: the nodes did not all cut in time. `give_up`: an
/// abort was sent long enough ago that nodes which still have not answered are reported as such.
pub fn next_step(nodes: &[NodeView], deadline_passed: bool, give_up: bool) -> Step {
    if nodes.is_empty() {
        return Step::Failed("the snapshot has no nodes".into());
    }
    let any_failed = nodes.iter().any(|n| is_terminal_failure(n.phase));
    let all_cut = nodes
        .iter()
        .all(|n| matches!(n.phase, NodePhase::Cut | NodePhase::Released));
    let all_released = nodes.iter().all(|n| n.phase == NodePhase::Released);
    let aborting = nodes.iter().any(|n| n.action == NodeAction::Abort);

    if all_released && !aborting {
        return Step::Ready;
    }
    // A release that a node never confirms (its agent died and did not return) must not hold
    // the snapshot forever either: once the controller gives up, the group is aborted.
    let release_unconfirmed = give_up && !all_released;
    if any_failed || aborting || (deadline_passed && !all_cut) || release_unconfirmed {
        let to_abort: Vec<String> = nodes
            .iter()
            .filter(|n| n.action != NodeAction::Abort && !is_terminal_failure(n.phase))
            .map(|n| n.node.clone())
            .collect();
        if !to_abort.is_empty() {
            return Step::Abort(to_abort);
        }
        let unanswered: Vec<&str> = nodes
            .iter()
            .filter(|n| !is_terminal_failure(n.phase))
            .map(|n| n.node.as_str())
            .collect();
        if unanswered.is_empty() || give_up {
            return Step::Failed(failure_message(nodes, deadline_passed, &unanswered));
        }
        return Step::Wait;
    }
    // A node asked to prepare either has (Prepared) or has not yet; the trigger waits for all.
    let preparing: Vec<&NodeView> = nodes
        .iter()
        .filter(|n| n.action == NodeAction::Prepare)
        .collect();
    if !preparing.is_empty() {
        if preparing.iter().all(|n| n.phase == NodePhase::Prepared) {
            return Step::Cut(preparing.iter().map(|n| n.node.clone()).collect());
        }
        return Step::Wait;
    }
    if all_cut {
        let to_release: Vec<String> = nodes
            .iter()
            .filter(|n| n.action == NodeAction::Cut)
            .map(|n| n.node.clone())
            .collect();
        if !to_release.is_empty() {
            return Step::Release(to_release);
        }
    }
    Step::Wait
}

/// Whether an agent that holds its cut may release itself without the controller's `Release`
/// (`spec.groupNodes`): the views of every node of the group, its own included, show the cut
/// made (or already released by an agent that saw the same) and none is asked to abort. Then
/// every member is frozen and cut, the very state in which the controller would release them all.
pub fn every_node_has_cut(nodes: &[NodeView]) -> bool {
    !nodes.is_empty()
        && nodes.iter().all(|n| {
            matches!(n.action, NodeAction::Cut | NodeAction::Release)
                && matches!(n.phase, NodePhase::Cut | NodePhase::Released)
        })
}

fn failure_message(nodes: &[NodeView], deadline_passed: bool, unanswered: &[&str]) -> String {
    let mut parts: Vec<String> = nodes
        .iter()
        .filter(|n| n.phase == NodePhase::Failed)
        .map(|n| {
            format!(
                "node {}: {}",
                n.node,
                n.message.as_deref().unwrap_or("failed without a message")
            )
        })
        .collect();
    // An agent's own watchdog abort says why; a controller-requested abort says nothing new.
    parts.extend(
        nodes
            .iter()
            .filter(|n| n.phase == NodePhase::Aborted && n.action == NodeAction::Cut)
            .map(|n| {
                format!(
                    "node {}: {}",
                    n.node,
                    n.message.as_deref().unwrap_or("aborted")
                )
            }),
    );
    if deadline_passed && parts.is_empty() {
        let slow: Vec<&str> = nodes
            .iter()
            .filter(|n| n.phase == NodePhase::Pending)
            .map(|n| n.node.as_str())
            .collect();
        parts.push(if slow.is_empty() {
            "the nodes did not all cut and release within freezeTimeoutSeconds".to_string()
        } else {
            format!(
                "node(s) {} did not cut within freezeTimeoutSeconds (is the tandem agent running there?)",
                slow.join(", ")
            )
        });
    }
    if !unanswered.is_empty() {
        parts.push(format!(
            "node(s) {} did not confirm the abort; their agents clean up when they return",
            unanswered.join(", ")
        ));
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, action: NodeAction, phase: NodePhase) -> NodeView {
        NodeView {
            node: name.into(),
            action,
            phase,
            message: None,
        }
    }

    #[test]
    fn every_node_prepares_then_all_cut_on_one_trigger() {
        use NodeAction::{Abort, Cut, Prepare};
        use NodePhase::{Failed, Pending, Prepared};
        let prepared = |n| node(n, Prepare, Prepared);
        let table: [(Vec<NodeView>, bool, Step); 6] = [
            (
                vec![prepared("a"), prepared("b")],
                false,
                Step::Cut(vec!["a".into(), "b".into()]),
            ),
            // Nobody freezes while one node is still preparing.
            (
                vec![prepared("a"), node("b", Prepare, Pending)],
                false,
                Step::Wait,
            ),
            // A trigger that reached only some nodes is sent to the rest.
            (
                vec![node("a", Cut, Pending), prepared("b")],
                false,
                Step::Cut(vec!["b".into()]),
            ),
            // A node that cannot cut fails its Prepare: nothing was frozen anywhere.
            (
                vec![prepared("a"), node("b", Prepare, Failed)],
                false,
                Step::Abort(vec!["a".into()]),
            ),
            (
                vec![prepared("a"), node("b", Prepare, Pending)],
                true,
                Step::Abort(vec!["a".into(), "b".into()]),
            ),
            (
                vec![
                    node("a", Abort, NodePhase::Aborted),
                    node("b", Prepare, Failed),
                ],
                false,
                Step::Failed("node b: failed without a message".into()),
            ),
        ];
        for (i, (nodes, deadline, want)) in table.into_iter().enumerate() {
            assert_eq!(next_step(&nodes, deadline, false), want, "row {i}");
        }
    }

    #[test]
    fn an_agent_releases_itself_only_once_every_node_has_cut() {
        use NodeAction::{Abort, Cut, Prepare, Release};
        use NodePhase::{Aborted, Failed, Pending, Prepared, Released};
        let table: [(Vec<NodeView>, bool); 9] = [
            (
                vec![
                    node("a", Cut, NodePhase::Cut),
                    node("b", Cut, NodePhase::Cut),
                ],
                true,
            ),
            // A sibling that released itself had seen every node cut, this one included.
            (
                vec![node("a", Cut, NodePhase::Cut), node("b", Cut, Released)],
                true,
            ),
            (
                vec![
                    node("a", Cut, NodePhase::Cut),
                    node("b", Release, NodePhase::Cut),
                ],
                true,
            ),
            (
                vec![node("a", Cut, NodePhase::Cut), node("b", Cut, Pending)],
                false,
            ),
            (
                vec![node("a", Cut, NodePhase::Cut), node("b", Prepare, Prepared)],
                false,
            ),
            // An abort asked, or a node that failed or thawed on its watchdog: never.
            (
                vec![
                    node("a", Cut, NodePhase::Cut),
                    node("b", Abort, NodePhase::Cut),
                ],
                false,
            ),
            (
                vec![node("a", Cut, NodePhase::Cut), node("b", Cut, Failed)],
                false,
            ),
            (
                vec![node("a", Cut, NodePhase::Cut), node("b", Cut, Aborted)],
                false,
            ),
            (vec![], false),
        ];
        for (i, (nodes, want)) in table.into_iter().enumerate() {
            assert_eq!(every_node_has_cut(&nodes), want, "row {i}");
        }
    }

    #[test]
    fn waits_until_every_node_has_cut_then_releases_all() {
        let partial = [
            node("a", NodeAction::Cut, NodePhase::Cut),
            node("b", NodeAction::Cut, NodePhase::Pending),
        ];
        assert_eq!(next_step(&partial, false, false), Step::Wait);
        let all = [
            node("a", NodeAction::Cut, NodePhase::Cut),
            node("b", NodeAction::Cut, NodePhase::Cut),
        ];
        assert_eq!(
            next_step(&all, false, false),
            Step::Release(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn ready_only_when_every_node_released() {
        let releasing = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Cut),
        ];
        assert_eq!(next_step(&releasing, false, false), Step::Wait);
        let done = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Released),
        ];
        assert_eq!(next_step(&done, false, false), Step::Ready);
        // A single-node group releases on its own (releaseAfterCut).
        let single = [node("a", NodeAction::Cut, NodePhase::Released)];
        assert_eq!(next_step(&single, false, false), Step::Ready);
    }

    #[test]
    fn one_failure_aborts_every_other_node_then_fails() {
        let mut failed = node("b", NodeAction::Cut, NodePhase::Failed);
        failed.message = Some("volume pv-1 cannot be frozen".into());
        let nodes = [
            node("a", NodeAction::Cut, NodePhase::Cut),
            failed.clone(),
            node("c", NodeAction::Cut, NodePhase::Pending),
        ];
        assert_eq!(
            next_step(&nodes, false, false),
            Step::Abort(vec!["a".into(), "c".into()])
        );
        let aborting = [
            node("a", NodeAction::Abort, NodePhase::Cut),
            failed.clone(),
            node("c", NodeAction::Abort, NodePhase::Aborted),
        ];
        assert_eq!(next_step(&aborting, false, false), Step::Wait);
        let done = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            failed,
            node("c", NodeAction::Abort, NodePhase::Aborted),
        ];
        match next_step(&done, false, false) {
            Step::Failed(message) => assert!(message.contains("pv-1"), "{message}"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn a_watchdog_abort_on_one_node_aborts_the_released_ones_too() {
        let mut watchdog = node("b", NodeAction::Release, NodePhase::Aborted);
        watchdog.message = Some("freeze held longer than 10 s".into());
        let nodes = [
            node("a", NodeAction::Release, NodePhase::Released),
            watchdog,
        ];
        assert_eq!(
            next_step(&nodes, false, false),
            Step::Abort(vec!["a".into()])
        );
    }

    #[test]
    fn the_deadline_aborts_nodes_that_have_not_cut() {
        let nodes = [
            node("a", NodeAction::Cut, NodePhase::Cut),
            node("b", NodeAction::Cut, NodePhase::Pending),
        ];
        assert_eq!(
            next_step(&nodes, true, false),
            Step::Abort(vec!["a".into(), "b".into()])
        );
        // A node that never answers does not hold the snapshot hostage forever.
        let stuck = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            node("b", NodeAction::Abort, NodePhase::Pending),
        ];
        assert_eq!(next_step(&stuck, true, false), Step::Wait);
        match next_step(&stuck, true, true) {
            Step::Failed(message) => assert!(message.contains("b"), "{message}"),
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    /// Found by the model check (tests/model_check.rs): a node that was released and whose agent
    /// died before confirming kept the GroupSnapshot Releasing forever.
    #[test]
    fn a_release_never_confirmed_fails_once_the_controller_gives_up() {
        let releasing = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Cut),
        ];
        assert_eq!(next_step(&releasing, true, false), Step::Wait);
        assert_eq!(
            next_step(&releasing, true, true),
            Step::Abort(vec!["a".into(), "b".into()])
        );
        let aborting = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            node("b", NodeAction::Abort, NodePhase::Cut),
        ];
        match next_step(&aborting, true, true) {
            Step::Failed(message) => {
                assert!(message.contains("did not all cut and release"), "{message}");
                assert!(message.contains("node(s) b did not confirm"), "{message}");
            }
            other => panic!("expected Failed, got {other:?}"),
        }
    }

    #[test]
    fn a_deadline_after_every_node_cut_does_not_abort() {
        let nodes = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Cut),
        ];
        assert_eq!(next_step(&nodes, true, false), Step::Wait);
    }
}
