//! The barrier under faults. Each test ends with nothing frozen and no snapshot left behind:
//! an agent killed mid-freeze, the controller killed between cut and release, the API server
//! stopped during a freeze, a node that never answers, members that cannot be frozen, overlapping
//! groups and bad specs. Needs root (CI is root); skips with a message otherwise.

mod agent_support;
mod support;
mod world;

use std::time::Duration;

use kube::Api;
use serde_json::json;
use support::{ControlPlane, TestEnv, eventually};
use tandem::api::{Consistency, GroupSnapshot, GroupSnapshotPhase, NodePhase};
use world::{WAIT, World, require_root};

/// A failed snapshot: its message, after checking that nothing is frozen and nothing leaked.
async fn assert_failed_clean(w: &World, name: &str) -> String {
    let snapshot = w.wait_phase(name, GroupSnapshotPhase::Failed).await;
    let status = snapshot.status.expect("status");
    let message = status.message.clone().expect("a failure message");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "False");
    w.assert_nothing_frozen();
    // Agents delete void snapshots as they abort: give the last one a moment to answer.
    eventually(WAIT, "no snapshot left behind", || async {
        w.snapshot_files().is_empty().then_some(())
    })
    .await;
    message
}

/// Two nodes, one volume each; only node a's agent runs, so once the snapshot `s` of group `g`
/// starts, node a cuts and holds its freeze while it waits for node b.
async fn both_nodes_holding_their_freeze(mut w: World, fs: (&str, &str), timeout: u32) -> World {
    w.add_volume("a1", "a", fs.0, &[]).await;
    w.add_volume("b1", "b", fs.1, &[]).await;
    w.start_agent("a");
    w.start_agent("b");
    // Both nodes prepare, freeze on one trigger and cut; the release waits (test-only delay,
    // and only the controller releases).
    w.start_controller_with(&[
        "--test-only-release-delay-ms",
        "600000",
        "--test-only-no-sibling-release",
    ]);
    w.create_group(
        "g",
        json!({"claims": ["a1", "b1"], "freezeTimeoutSeconds": timeout}),
    )
    .await;
    w.create_snapshot("s", "g", "Delete").await;
    w.wait_node_phase("a", NodePhase::Cut).await;
    w.wait_node_phase("b", NodePhase::Cut).await;
    w
}

#[tokio::test]
async fn an_agent_killed_mid_freeze_thaws_when_it_restarts() {
    if !require_root() {
        return;
    }
    let mut w =
        both_nodes_holding_their_freeze(World::new("fault-agent").await, ("xfs", "ext4"), 30).await;
    assert!(
        !w.accepts_writes("a1", Duration::from_millis(500)),
        "node a should hold its freeze"
    );

    // A crash while frozen: the kernel keeps the filesystem frozen.
    w.agent("a").kill9();
    assert!(
        !w.accepts_writes("a1", Duration::from_secs(1)),
        "a1 thawed without anyone thawing it"
    );
    // The restarted agent thaws what its journal says it froze, long before the 30 s watchdog.
    w.start_agent("a");
    assert!(
        w.accepts_writes("a1", Duration::from_secs(10)),
        "the restarted agent did not thaw a1"
    );
    // Node b, still holding, is aborted by the controller.
    let message = assert_failed_clean(&w, "s").await;
    assert!(
        w.accepts_writes("b1", Duration::from_secs(5)),
        "b1 stayed frozen"
    );
    assert!(message.contains(&w.node("a")), "{message}");
}

#[tokio::test]
async fn the_controller_killed_between_cut_and_release_leaves_nothing_frozen() {
    if !require_root() {
        return;
    }
    let mut w =
        both_nodes_holding_their_freeze(World::new("fault-ctl").await, ("ext4", "xfs"), 4).await;
    // Both hold their freeze, and nobody is left to release them.
    w.controller.as_mut().expect("controller").kill9();
    // Each agent's own watchdog thaws and deletes the void snapshots.
    w.wait_node_phase("a", NodePhase::Aborted).await;
    w.wait_node_phase("b", NodePhase::Aborted).await;
    w.assert_nothing_frozen();
    assert!(w.snapshot_files().is_empty(), "{:?}", w.snapshot_files());
    // The controller, back, reports what happened.
    w.start_controller();
    let message = assert_failed_clean(&w, "s").await;
    assert!(message.contains("freeze"), "{message}");
}

#[tokio::test]
async fn a_node_that_never_answers_times_the_snapshot_out() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-timeout").await;
    w.add_volume("a1", "a", "xfs", &[]).await;
    w.add_volume("b1", "b", "xfs", &[]).await;
    w.start_agent("a"); // node b never gets an agent
    w.start_controller();
    w.create_group(
        "g",
        json!({"claims": ["a1", "b1"], "freezeTimeoutSeconds": 2}),
    )
    .await;
    w.create_snapshot("s", "g", "Delete").await;
    // Node a prepares and waits for the trigger: a node that never answers freezes nobody.
    w.wait_node_phase("a", NodePhase::Prepared).await;
    assert!(
        w.accepts_writes("a1", Duration::from_millis(500)),
        "node a froze while node b had not prepared"
    );
    let message = assert_failed_clean(&w, "s").await;
    assert!(
        message.contains(&w.node("b")),
        "the message does not name the silent node: {message}"
    );
}

#[tokio::test]
async fn the_api_server_stopped_during_a_freeze_does_not_keep_it_frozen() {
    if !require_root() {
        return;
    }
    // A control plane of this test's own: it stops the API server. Started from the test's
    // thread, which outlives it.
    let mut plane = ControlPlane::start(&support::repo_root().join("crds"));
    let env = TestEnv::on_private(&plane, "fault-api").await;
    let w = both_nodes_holding_their_freeze(World::with_env(env), ("xfs", "ext4"), 4).await;
    plane.kill("kube-apiserver");
    // With no API server at all, node a's watchdog thaws on the agent's own clock.
    assert!(
        w.accepts_writes("a1", Duration::from_secs(15)),
        "a1 stayed frozen while the API server was down"
    );
    assert!(
        w.accepts_writes("b1", Duration::from_secs(15)),
        "b1 stayed frozen while the API server was down"
    );
    // Each watchdog deletes its void snapshots right after its thaw: both nodes', no API needed.
    eventually(
        WAIT,
        "no snapshot left while the API server was down",
        || async { w.snapshot_files().is_empty().then_some(()) },
    )
    .await;
    plane.restart("kube-apiserver");
    let message = assert_failed_clean(&w, "s").await;
    assert!(message.contains("freezeTimeoutSeconds"), "{message}");
    drop(w);
    plane.stop();
}

#[tokio::test]
async fn a_member_that_cannot_be_frozen_fails_required_and_is_independent_under_best_effort() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-freeze").await;
    w.add_volume("ok", "a", "xfs", &[]).await;
    w.add_volume("stuck", "b", "ext4", &[]).await;
    w.start_agent("a");
    w.start_agent("b");
    w.start_controller();
    // Someone else (this test) holds a freeze on "stuck": the agent's FIFREEZE gets EBUSY.
    let stuck = w.volumes["stuck"].mount.clone();
    w.scratch.assert_owned(&stuck);
    let fd = tandem::agent::freeze::open_dir(&stuck).expect("open stuck");
    tandem::agent::freeze::freeze(&fd, &stuck).expect("freeze stuck");

    w.create_group(
        "required",
        json!({"claims": ["ok", "stuck"], "freeze": "Required"}),
    )
    .await;
    w.create_snapshot("required-1", "required", "Delete").await;
    let snapshot = w.wait_phase("required-1", GroupSnapshotPhase::Failed).await;
    let message = snapshot.status.expect("status").message.expect("message");
    assert!(
        message.contains("stuck") || message.contains(&stuck.display().to_string()),
        "{message}"
    );
    assert!(
        w.accepts_writes("ok", Duration::from_secs(5)),
        "the healthy member stayed frozen"
    );

    w.create_group(
        "lenient",
        json!({"claims": ["ok", "stuck"], "freeze": "BestEffort"}),
    )
    .await;
    w.create_snapshot("lenient-1", "lenient", "Delete").await;
    let snapshot = w.wait_phase("lenient-1", GroupSnapshotPhase::Ready).await;
    let status = snapshot.status.expect("status");
    assert_eq!(
        status.consistency,
        Some(Consistency::Independent),
        "{status:?}"
    );
    let member = |claim: &str| {
        status
            .members
            .iter()
            .find(|m| m.claim == claim)
            .expect("member")
    };
    assert!(member("ok").frozen);
    assert!(!member("stuck").frozen);
    assert!(
        member("stuck").message.is_some(),
        "an unfrozen member must say why"
    );
    assert!(member("stuck").snapshot_handle.is_some());

    tandem::agent::freeze::thaw(&fd, &stuck).expect("thaw stuck");
    w.assert_nothing_frozen();
    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .delete("lenient-1", &Default::default())
        .await
        .expect("delete");
    eventually(WAIT, "clones deleted", || async {
        w.snapshot_files().is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn overlapping_groups_never_freeze_the_same_volume_at_once() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-overlap").await;
    w.add_volume("shared", "a", "xfs", &[]).await;
    w.add_volume("first", "b", "xfs", &[]).await;
    w.add_volume("second", "a", "ext4", &[]).await;
    w.start_agent("a");
    w.start_agent("b");
    // The first snapshot holds "shared" for a while before its release (test-only delay; only
    // the controller releases).
    w.start_controller_with(&[
        "--test-only-release-delay-ms",
        "10000",
        "--test-only-no-sibling-release",
    ]);
    w.create_group(
        "one",
        json!({"claims": ["shared", "first"], "freezeTimeoutSeconds": 60}),
    )
    .await;
    w.create_group("two", json!({"claims": ["shared", "second"]}))
        .await;
    w.create_snapshot("one-1", "one", "Delete").await;
    w.wait_node_phase("a", NodePhase::Cut).await;
    w.create_snapshot("two-1", "two", "Delete").await;

    // The second waits, names the first, and has not asked any node for anything.
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let waiting = eventually(WAIT, "two-1 waiting", || {
        let snapshots = snapshots.clone();
        async move {
            let s = snapshots.get("two-1").await.ok()?.status?;
            let message = s.message?;
            (s.phase == GroupSnapshotPhase::Pending && message.contains("one-1")).then_some(message)
        }
    })
    .await;
    assert!(
        waiting.contains("shared") || waiting.contains(&format!("{}-shared", w.env.namespace)),
        "{waiting}"
    );
    let nodes = w.node_snapshots().await;
    assert!(
        nodes.iter().all(|n| n.spec.group_snapshot == "one-1"),
        "two-1 started while one-1 froze the shared volume"
    );

    w.wait_phase("one-1", GroupSnapshotPhase::Ready).await;
    let second = w.wait_phase("two-1", GroupSnapshotPhase::Ready).await;
    assert_eq!(
        second.status.expect("status").consistency,
        Some(Consistency::FilesystemFrozen)
    );
    w.assert_nothing_frozen();
}

#[tokio::test]
async fn bad_specs_fail_with_a_message_a_person_can_act_on() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-spec").await;
    w.start_controller();
    let groups: Api<tandem::api::ConsistencyGroup> = w.env.api();
    groups
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "empty"},
                "spec": {"selector": {"matchLabels": {"app": "nothing-has-this"}}}}))
            .expect("group"),
        )
        .await
        .expect("create group");
    w.create_snapshot("empty-1", "empty", "Delete").await;
    w.create_snapshot("missing-1", "no-such-group", "Delete")
        .await;
    let empty = w.wait_phase("empty-1", GroupSnapshotPhase::Failed).await;
    let message = empty.status.expect("status").message.expect("message");
    assert!(message.contains("selects no volume"), "{message}");
    let missing = w.wait_phase("missing-1", GroupSnapshotPhase::Failed).await;
    let status = missing.status.expect("status");
    let message = status.message.expect("message");
    assert!(
        message.contains("no-such-group") && message.contains("does not exist"),
        "{message}"
    );
    assert_eq!(status.conditions[0].reason, "GroupNotFound");
    assert!(w.node_snapshots().await.is_empty());
}

#[tokio::test]
async fn a_nodesnapshot_quota_of_zero_fails_the_snapshot_within_its_deadline() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-quota").await;
    w.add_volume("a1", "a", "xfs", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_quota(
        "no-nodesnapshots",
        json!({"count/nodesnapshots.tandem.dev": "0"}),
    )
    .await;
    w.create_group("g", json!({"claims": ["a1"], "freezeTimeoutSeconds": 2}))
        .await;
    let created = std::time::Instant::now();
    w.create_snapshot("s", "g", "Delete").await;
    let message = assert_failed_clean(&w, "s").await;
    assert!(
        created.elapsed() < Duration::from_secs(2 + 10),
        "failed only after {:?}",
        created.elapsed()
    );
    assert!(
        message.contains("cannot create the NodeSnapshot") && message.contains("exceeded quota"),
        "{message}"
    );
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let status = snapshots
        .get("s")
        .await
        .expect("get")
        .status
        .expect("status");
    assert_eq!(status.conditions[0].reason, "NodeSnapshotCreateFailed");
}

#[tokio::test]
async fn nodesnapshot_names_never_collide_across_snapshots_and_nodes() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-collide").await;
    let ns = w.env.namespace.clone();
    // `<snapshot>-<node>` made `x` on node `<ns>-c-<ns>-b` and `x-<ns>-c` on node `<ns>-b` the
    // same name.
    let long_node = format!("c-{ns}-b");
    w.add_volume("one", &long_node, "xfs", &[]).await;
    w.add_volume("two", "b", "ext4", &[]).await;
    w.start_agent(&long_node);
    w.start_agent("b");
    w.start_controller();
    w.create_group("g1", json!({"claims": ["one"]})).await;
    w.create_group("g2", json!({"claims": ["two"]})).await;
    let second = format!("x-{ns}-c");
    assert!(second.len() <= 63, "{second}");
    w.create_snapshot("x", "g1", "Delete").await;
    w.create_snapshot(&second, "g2", "Delete").await;
    w.wait_phase("x", GroupSnapshotPhase::Ready).await;
    w.wait_phase(&second, GroupSnapshotPhase::Ready).await;
    let nodes = w.node_snapshots().await;
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    assert_ne!(nodes[0].metadata.name, nodes[1].metadata.name);
    w.assert_nothing_frozen();
}

#[tokio::test]
async fn huge_numbers_from_an_agent_do_not_crash_the_controller() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-huge").await;
    w.add_volume("a1", "a", "xfs", &[]).await;
    // No agent: the test writes node a's reports itself, as a buggy or hostile agent would.
    w.start_controller();
    w.create_group("g", json!({"claims": ["a1"], "freezeTimeoutSeconds": 2}))
        .await;
    w.create_snapshot("s", "g", "Delete").await;
    let nodes: Api<tandem::api::NodeSnapshot> = w.env.api();
    let name = eventually(WAIT, "the NodeSnapshot", || async {
        w.node_snapshots().await.first()?.metadata.name.clone()
    })
    .await;
    // Released with a window that runs past the end of the calendar (jiff panics on that).
    let mut refused = Vec::new();
    for status in [
        json!({"phase": "Released", "freezeStart": "2026-12-01T00:00:00.000000Z",
               "freezeWindowMillis": i64::MAX}),
        json!({"phase": "Released", "freezeStart": "9999-12-30T00:00:00.000000Z",
               "freezeWindowMillis": 86_400_000}),
    ] {
        if let Err(e) = nodes
            .patch_status(
                &name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "status": status })),
            )
            .await
        {
            refused.push(e.to_string());
        }
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let controller = w.controller.as_mut().expect("controller");
    assert!(
        controller.is_running(),
        "the controller died: {}",
        controller.log_tail(20)
    );
    // The schema refuses both; the snapshot ends (the node never really answered).
    assert_eq!(refused.len(), 2, "{refused:?}");
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let phase = eventually(WAIT, "the snapshot to end", || {
        let snapshots = snapshots.clone();
        async move {
            let phase = snapshots.get("s").await.ok()?.status?.phase;
            matches!(
                phase,
                GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
            )
            .then_some(phase)
        }
    })
    .await;
    assert_eq!(phase, GroupSnapshotPhase::Failed);
    assert!(w.controller.as_mut().expect("controller").is_running());
}

/// The API server's count of GroupSnapshot LIST requests so far (every namespace).
fn group_snapshot_lists(w: &World) -> u64 {
    let metrics = w
        .env
        .kubectl(&["get", "--raw", "/metrics"])
        .expect("metrics");
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| l.contains("resource=\"groupsnapshots\"") && l.contains("verb=\"LIST\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test]
async fn snapshots_waiting_behind_another_are_woken_not_polled() {
    if !require_root() {
        return;
    }
    let mut w = World::new("fault-waiters").await;
    w.add_volume("shared", "a", "xfs", &[]).await;
    // No agent: the first snapshot holds "shared" (Cutting) until it gives node a up.
    w.start_controller();
    w.create_group(
        "one",
        json!({"claims": ["shared"], "freezeTimeoutSeconds": 10}),
    )
    .await;
    w.create_group("two", json!({"claims": ["shared"]})).await;
    w.create_snapshot("one-1", "one", "Delete").await;
    w.wait_phase("one-1", GroupSnapshotPhase::Cutting).await;
    const WAITERS: usize = 20;
    for i in 0..WAITERS {
        w.create_snapshot(&format!("two-{i}"), "two", "Delete")
            .await;
    }
    let snapshots: Api<GroupSnapshot> = w.env.api();
    eventually(WAIT, "every waiter waiting", || {
        let snapshots = snapshots.clone();
        async move {
            let list = snapshots.list(&Default::default()).await.ok()?;
            let waiting = list
                .items
                .iter()
                .filter(|s| {
                    s.status
                        .as_ref()
                        .and_then(|s| s.message.as_deref())
                        .is_some_and(|m| m.contains("waiting for GroupSnapshot one-1"))
                })
                .count();
            (waiting == WAITERS).then_some(())
        }
    })
    .await;
    // Polling at 2 Hz, 20 waiters listed the namespace 200 times in 5 s.
    let before = group_snapshot_lists(&w);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let lists = group_snapshot_lists(&w) - before;
    assert!(
        lists < 60,
        "{lists} GroupSnapshot lists in 5 s while {WAITERS} snapshots waited"
    );
    // When the first one ends, a waiter starts at once (it was woken).
    w.wait_phase("one-1", GroupSnapshotPhase::Failed).await;
    let started = std::time::Instant::now();
    eventually(WAIT, "a waiter to start", || {
        let snapshots = snapshots.clone();
        async move {
            let list = snapshots.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .any(|s| {
                    s.status
                        .as_ref()
                        .is_some_and(|s| s.phase == GroupSnapshotPhase::Cutting)
                })
                .then_some(())
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the first waiter started {:?} after the blocker ended",
        started.elapsed()
    );
}
