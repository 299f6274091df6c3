//! The freeze barrier's decisions, as pure logic: given what every node reported, what the
//! controller does next. Across nodes, every node first prepares (checks and flushes, freezing
//! nothing) and all freeze on one trigger. Every member must be frozen before any is thawed, so
//! nodes are released only when all of them have cut; any failure or a deadline aborts all.
//!
//! Members whose snapshot is one cluster-side call (an RBD group snapshot) are frozen by their
//! nodes and cut by the controller: once every node holds its freeze, the controller takes that
//! central snapshot, and only then releases anyone. A node thaws early only by aborting, so every
//! node that answers the release as `Released` was frozen for the whole central cut.

use crate::api::{NodeAction, NodePhase};

/// What the controller knows of one node's part.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeView {
    pub node: String,
    pub action: NodeAction,
    pub phase: NodePhase,
    pub message: Option<String>,
}

/// Where the group's central snapshot stands (see the module's comment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Central {
    /// The group has no member cut centrally.
    None,
    /// Not taken (or taken and removed again).
    Pending,
    /// Taken: it exists under the GroupSnapshot's name.
    Taken,
    /// The call failed and left nothing; the group snapshot fails.
    Failed(String),
}

/// The controller's next move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing to do until a node reports (or the deadline passes).
    Wait,
    /// Every node has prepared (checked and flushed, nothing frozen): tell these nodes to
    /// freeze and cut, all at once.
    Cut(Vec<String>),
    /// Every node holds its freeze (and has cut its own members): take the central snapshot now.
    CentralCut,
    /// Every node has cut (and the central snapshot is taken): tell these nodes to thaw and keep
    /// their snapshots.
    Release(Vec<String>),
    /// The group snapshot is failing: remove the central snapshot before anything is reported.
    RemoveCentral,
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

/// Decides the next step. `central`: the central snapshot, when the group has one.
/// `deadline_passed`: the nodes did not all cut in time (or too little of their freeze budget is
/// left for the central cut). `give_up`: an abort was sent long enough ago that nodes which still
/// have not answered are reported as such.
pub fn next_step(
    nodes: &[NodeView],
    central: &Central,
    deadline_passed: bool,
    give_up: bool,
) -> Step {
    if nodes.is_empty() {
        return match central {
            Central::Taken => Step::RemoveCentral,
            _ => Step::Failed("the snapshot has no nodes".into()),
        };
    }
    let any_failed = nodes.iter().any(|n| is_terminal_failure(n.phase));
    let all_cut = nodes
        .iter()
        .all(|n| matches!(n.phase, NodePhase::Cut | NodePhase::Released));
    let all_released = nodes.iter().all(|n| n.phase == NodePhase::Released);
    let aborting = nodes.iter().any(|n| n.action == NodeAction::Abort);
    let central_taken = matches!(central, Central::None | Central::Taken);
    let central_failed = matches!(central, Central::Failed(_));

    if all_released && !aborting && central_taken {
        return Step::Ready;
    }
    // Released before the central cut (a node released itself, or a stale release): nothing is
    // frozen any more, so the central snapshot can no longer be one instant with the others.
    let released_too_early = all_released && !central_taken;
    // A release that a node never confirms (its agent died and did not return) must not hold
    // the snapshot forever either: once the controller gives up, the group is aborted.
    let release_unconfirmed = give_up && !all_released;
    if any_failed
        || aborting
        || central_failed
        || released_too_early
        || (deadline_passed && !all_cut)
        || (deadline_passed && *central == Central::Pending)
        || release_unconfirmed
    {
        let to_abort: Vec<String> = nodes
            .iter()
            .filter(|n| n.action != NodeAction::Abort && !is_terminal_failure(n.phase))
            .map(|n| n.node.clone())
            .collect();
        if !to_abort.is_empty() {
            return Step::Abort(to_abort);
        }
        if *central == Central::Taken {
            return Step::RemoveCentral;
        }
        let unanswered: Vec<&str> = nodes
            .iter()
            .filter(|n| !is_terminal_failure(n.phase))
            .map(|n| n.node.as_str())
            .collect();
        if unanswered.is_empty() || give_up {
            return Step::Failed(failure_message(
                nodes,
                central,
                deadline_passed,
                &unanswered,
            ));
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
    if all_cut && *central == Central::Pending {
        return Step::CentralCut;
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

/// Who thaws the nodes once every one has cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReleasePlan {
    /// The one node's agent, right after its cut (`releaseAfterCut`).
    AfterCut,
    /// Each agent, once the NodeSnapshots of all these nodes show their cut (`groupNodes`).
    BySiblings(Vec<String>),
    /// The controller's `Release`.
    ByController,
}

/// The most nodes whose agents release each other. Each agent of a group watches every other's
/// NodeSnapshot, so the watch events grow with the square of the nodes while the controller's
/// hop they save stays one round trip: on 100 agents sharing 2 cores, a burst of fifty 18-node
/// groups ran out of its 60 s freeze budget that way, where the controller's release did not.
pub const SIBLING_RELEASE_MAX_NODES: usize = 16;

/// What keeps the release with the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReleaseConstraints {
    /// The group's quiesce holds, checked by the controller before any node may thaw.
    pub holds: bool,
    /// Members the controller cuts centrally once every node holds: nobody may thaw before.
    pub central: bool,
    /// Agents may release each other (off only for tests that hold every node's freeze).
    pub siblings_allowed: bool,
}

/// With quiesce holds or central members only the controller releases; otherwise nobody waits
/// for the controller's hop, up to [`SIBLING_RELEASE_MAX_NODES`].
pub fn release_plan<'a>(
    nodes: impl Iterator<Item = &'a str>,
    constraints: ReleaseConstraints,
) -> ReleasePlan {
    let nodes: Vec<String> = nodes.map(str::to_string).collect();
    let ReleaseConstraints {
        holds,
        central,
        siblings_allowed,
    } = constraints;
    match nodes.len() {
        _ if holds || central => ReleasePlan::ByController,
        1 => ReleasePlan::AfterCut,
        n if siblings_allowed && n <= SIBLING_RELEASE_MAX_NODES => ReleasePlan::BySiblings(nodes),
        _ => ReleasePlan::ByController,
    }
}

fn failure_message(
    nodes: &[NodeView],
    central: &Central,
    deadline_passed: bool,
    unanswered: &[&str],
) -> String {
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
    if let Central::Failed(why) = central {
        parts.push(format!("the central snapshot failed: {why}"));
    }
    let all_released = nodes.iter().all(|n| n.phase == NodePhase::Released);
    if all_released && *central == Central::Pending {
        parts.push("the nodes thawed before the central snapshot was taken".into());
    }
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
    if parts.is_empty() {
        parts.push("the nodes were aborted".into());
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
    fn the_central_snapshot_is_taken_while_every_node_holds_and_before_anyone_is_released() {
        use Central::{Failed as CentralFailed, Pending, Taken};
        use NodeAction::{Abort, Cut, Release};
        use NodePhase::{Aborted, Cut as Held, Failed, Released};
        let both = |a: (NodeAction, NodePhase), b: (NodeAction, NodePhase)| {
            vec![node("a", a.0, a.1), node("b", b.0, b.1)]
        };
        let all = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // (what, nodes, central, deadline passed, give up, step)
        type Row = (&'static str, Vec<NodeView>, Central, bool, bool, Step);
        let table: Vec<Row> = vec![
            (
                "one node still cutting: nobody is cut centrally",
                both((Cut, Held), (Cut, NodePhase::Pending)),
                Pending,
                false,
                false,
                Step::Wait,
            ),
            (
                "every node holds: the central cut, not a release",
                both((Cut, Held), (Cut, Held)),
                Pending,
                false,
                false,
                Step::CentralCut,
            ),
            (
                "taken: every node is released",
                both((Cut, Held), (Cut, Held)),
                Taken,
                false,
                false,
                Step::Release(all(&["a", "b"])),
            ),
            (
                "taken after the deadline, every node still holding: released (as without one)",
                both((Cut, Held), (Cut, Held)),
                Taken,
                true,
                false,
                Step::Release(all(&["a", "b"])),
            ),
            (
                "too little budget left for the central cut: abort, never cut late",
                both((Cut, Held), (Cut, Held)),
                Pending,
                true,
                false,
                Step::Abort(all(&["a", "b"])),
            ),
            (
                "every node released after the central cut: Ready",
                both((Release, Released), (Release, Released)),
                Taken,
                false,
                false,
                Step::Ready,
            ),
            (
                "the call failed: every node aborts",
                both((Cut, Held), (Cut, Held)),
                CentralFailed("image mapped exclusively".into()),
                false,
                false,
                Step::Abort(all(&["a", "b"])),
            ),
            (
                "a node aborted on its own clock after the central cut: abort the other",
                both((Cut, Aborted), (Cut, Held)),
                Taken,
                false,
                false,
                Step::Abort(all(&["b"])),
            ),
            (
                "every node aborted and the central snapshot exists: remove it first",
                both((Abort, Aborted), (Abort, Aborted)),
                Taken,
                false,
                false,
                Step::RemoveCentral,
            ),
            (
                "a failed node with the central snapshot taken: remove it before Failed",
                both((Abort, Aborted), (Cut, Failed)),
                Taken,
                false,
                false,
                Step::RemoveCentral,
            ),
            (
                "thawed before the central cut (released on their own): abort, not Ready",
                both((Release, Released), (Release, Released)),
                Pending,
                false,
                false,
                Step::Abort(all(&["a", "b"])),
            ),
        ];
        for (what, nodes, central, deadline, give_up, want) in table {
            assert_eq!(
                next_step(&nodes, &central, deadline, give_up),
                want,
                "{what}"
            );
        }
        // Once removed, the failure is reported with its cause.
        let aborted = both((Abort, Aborted), (Abort, Aborted));
        let failed = next_step(&aborted, &CentralFailed("EROFS".into()), false, false);
        assert!(
            matches!(&failed, Step::Failed(m) if m.contains("the central snapshot failed: EROFS")),
            "{failed:?}"
        );
        let early = next_step(&aborted, &Pending, false, false);
        assert!(matches!(early, Step::Failed(_)), "{early:?}");
        // Without central members nothing changes: every node holding is a release.
        assert_eq!(
            next_step(
                &both((Cut, Held), (Cut, Held)),
                &Central::None,
                false,
                false
            ),
            Step::Release(all(&["a", "b"]))
        );
    }

    #[test]
    fn nodes_release_themselves_unless_holds_central_members_or_a_test_keep_the_release_with_the_controller()
     {
        let nodes = ["a", "b"];
        let siblings = ReleasePlan::BySiblings(vec!["a".into(), "b".into()]);
        let many: Vec<String> = (0..=SIBLING_RELEASE_MAX_NODES)
            .map(|i| format!("n{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let free = ReleaseConstraints {
            siblings_allowed: true,
            ..Default::default()
        };
        assert_eq!(
            release_plan(many.iter().copied(), free),
            ReleasePlan::ByController
        );
        let holds = ReleaseConstraints {
            holds: true,
            ..free
        };
        let central = ReleaseConstraints {
            central: true,
            ..free
        };
        let table = [
            (&nodes[..1], free, ReleasePlan::AfterCut),
            (&nodes[..1], holds, ReleasePlan::ByController),
            (&nodes[..1], central, ReleasePlan::ByController),
            (&nodes[..], free, siblings),
            (&nodes[..], holds, ReleasePlan::ByController),
            (&nodes[..], central, ReleasePlan::ByController),
            (
                &nodes[..],
                ReleaseConstraints::default(),
                ReleasePlan::ByController,
            ),
        ];
        for (i, (nodes, constraints, want)) in table.into_iter().enumerate() {
            assert_eq!(
                release_plan(nodes.iter().copied(), constraints),
                want,
                "row {i}"
            );
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
            assert_eq!(
                next_step(&nodes, &Central::None, deadline, false),
                want,
                "row {i}"
            );
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
        assert_eq!(
            next_step(&partial, &Central::None, false, false),
            Step::Wait
        );
        let all = [
            node("a", NodeAction::Cut, NodePhase::Cut),
            node("b", NodeAction::Cut, NodePhase::Cut),
        ];
        assert_eq!(
            next_step(&all, &Central::None, false, false),
            Step::Release(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn ready_only_when_every_node_released() {
        let releasing = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Cut),
        ];
        assert_eq!(
            next_step(&releasing, &Central::None, false, false),
            Step::Wait
        );
        let done = [
            node("a", NodeAction::Release, NodePhase::Released),
            node("b", NodeAction::Release, NodePhase::Released),
        ];
        assert_eq!(next_step(&done, &Central::None, false, false), Step::Ready);
        // A single-node group releases on its own (releaseAfterCut).
        let single = [node("a", NodeAction::Cut, NodePhase::Released)];
        assert_eq!(
            next_step(&single, &Central::None, false, false),
            Step::Ready
        );
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
            next_step(&nodes, &Central::None, false, false),
            Step::Abort(vec!["a".into(), "c".into()])
        );
        let aborting = [
            node("a", NodeAction::Abort, NodePhase::Cut),
            failed.clone(),
            node("c", NodeAction::Abort, NodePhase::Aborted),
        ];
        assert_eq!(
            next_step(&aborting, &Central::None, false, false),
            Step::Wait
        );
        let done = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            failed,
            node("c", NodeAction::Abort, NodePhase::Aborted),
        ];
        match next_step(&done, &Central::None, false, false) {
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
            next_step(&nodes, &Central::None, false, false),
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
            next_step(&nodes, &Central::None, true, false),
            Step::Abort(vec!["a".into(), "b".into()])
        );
        // A node that never answers does not hold the snapshot hostage forever.
        let stuck = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            node("b", NodeAction::Abort, NodePhase::Pending),
        ];
        assert_eq!(next_step(&stuck, &Central::None, true, false), Step::Wait);
        match next_step(&stuck, &Central::None, true, true) {
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
        assert_eq!(
            next_step(&releasing, &Central::None, true, false),
            Step::Wait
        );
        assert_eq!(
            next_step(&releasing, &Central::None, true, true),
            Step::Abort(vec!["a".into(), "b".into()])
        );
        let aborting = [
            node("a", NodeAction::Abort, NodePhase::Aborted),
            node("b", NodeAction::Abort, NodePhase::Cut),
        ];
        match next_step(&aborting, &Central::None, true, true) {
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
        assert_eq!(next_step(&nodes, &Central::None, true, false), Step::Wait);
    }
}
