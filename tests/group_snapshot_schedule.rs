//! GroupSnapshotSchedule end to end: the real control plane, the real `tandem controller` on a
//! test clock (TANDEM_TEST_ONLY_CLOCK_FILE: a time in a file, read by debug builds on every
//! evaluation) and real `tandem agent`s over loop-backed volumes. Needs root (CI is root); skips
//! with a message otherwise.
//!
//! The test clock reads early January 2025, before any schedule here was created: a new schedule
//! then starts from the clock's time, and every due time below is one the test moved the clock to.

mod agent_support;
mod support;
mod world;

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use support::process::Daemon;
use tandem::api::{GroupSnapshot, GroupSnapshotPhase, GroupSnapshotSchedule, NodeSnapshot};
use world::{WAIT, World, require_root};

const CLOCK_ENV: &str = "TANDEM_TEST_ONLY_CLOCK_FILE";

/// The test clock of one World: a file the controller reads.
struct TestClock {
    path: PathBuf,
}

impl TestClock {
    fn new(w: &World) -> TestClock {
        let path = w.scratch.path("clock");
        TestClock { path }
    }

    /// Sets the time (written whole, then renamed: the controller never reads half a time).
    fn set(&self, time: &str) {
        let tmp = self.path.with_extension("tmp");
        std::fs::write(&tmp, time).expect("write clock");
        std::fs::rename(&tmp, &self.path).expect("move clock");
    }
}

/// Starts the controller on the test clock, serving /metrics on `port`; `extra_env` for fault hooks.
fn start_controller(w: &mut World, clock: &TestClock, port: u16, extra_env: &[(&str, &str)]) {
    let namespace = w.env.namespace.clone();
    let addr = format!("127.0.0.1:{port}");
    let mut cmd = w.tandem(&[
        "controller",
        "--namespace",
        &namespace,
        "--http-addr",
        &addr,
    ]);
    cmd.env(CLOCK_ENV, &clock.path);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    w.controller = Some(Daemon::spawn("controller", &mut cmd, &w.logs()));
}

fn stop_controller(w: &mut World) {
    if let Some(mut controller) = w.controller.take() {
        controller.stop();
    }
}

async fn create_schedule(w: &World, name: &str, spec: serde_json::Value) {
    let api: Api<GroupSnapshotSchedule> = w.env.api();
    api.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))
            .expect("schedule"),
    )
    .await
    .expect("create schedule");
}

/// Waits until the schedule's status satisfies `check`.
async fn wait_schedule(
    w: &World,
    name: &str,
    what: &str,
    check: impl Fn(&GroupSnapshotSchedule) -> bool,
) -> GroupSnapshotSchedule {
    let api: Api<GroupSnapshotSchedule> = w.env.api();
    let check = &check;
    eventually(WAIT, &format!("schedule {name}: {what}"), || {
        let api = api.clone();
        async move {
            let s = api.get(name).await.ok()?;
            check(&s).then_some(s)
        }
    })
    .await
}

fn status_time(
    s: &GroupSnapshotSchedule,
    f: fn(&tandem::api::GroupSnapshotScheduleStatus) -> Option<String>,
) -> Option<String> {
    s.status.as_ref().and_then(f)
}

fn next_run(s: &GroupSnapshotSchedule) -> Option<String> {
    status_time(s, |st| st.next_run_time.as_ref().map(|t| t.0.to_string()))
}

fn last_schedule(s: &GroupSnapshotSchedule) -> Option<String> {
    status_time(s, |st| {
        st.last_schedule_time.as_ref().map(|t| t.0.to_string())
    })
}

/// The names of the schedule's GroupSnapshots (not being deleted), sorted.
async fn children(w: &World, schedule: &str) -> Vec<String> {
    let api: Api<GroupSnapshot> = w.env.api();
    let mut names: Vec<String> = api
        .list(&ListParams::default().labels(&format!("tandem.dev/schedule={schedule}")))
        .await
        .expect("list")
        .items
        .into_iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .map(|s| s.name_any())
        .collect();
    names.sort();
    names
}

async fn wait_children(w: &World, schedule: &str, want: &[&str]) {
    eventually(
        WAIT,
        &format!("{schedule}'s snapshots {want:?}"),
        || async { (children(w, schedule).await == want).then_some(()) },
    )
    .await;
}

fn finished(s: &GroupSnapshot) -> bool {
    matches!(
        s.status.as_ref().map(|s| s.phase),
        Some(GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed)
    )
}

fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The value of one sample line (`name{labels} value`) of the controller's /metrics.
async fn metric(port: u16, sample: &str) -> Option<f64> {
    let body = tokio::task::spawn_blocking(move || http_get(port, "/metrics"))
        .await
        .ok()??;
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// One volume on node `a`; the agent of `a` only if `agent`.
async fn world_with_volume(name: &str, agent: bool) -> World {
    let mut w = World::new(name).await;
    w.add_volume("data", "a", "xfs", &[]).await;
    if agent {
        w.start_agent("a");
    }
    w
}

/// The group `db` of that volume (once a controller runs: it waits for the group's members).
async fn create_group(w: &World) {
    w.create_group(
        "db",
        json!({"claims": ["data"], "freezeTimeoutSeconds": 60}),
    )
    .await;
}

fn hourly(extra: serde_json::Value) -> serde_json::Value {
    let mut spec = json!({"groupName": "db", "schedule": "0 * * * *", "timeZone": "Europe/Berlin"});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    spec
}

#[tokio::test]
async fn a_due_time_across_a_controller_crash_cuts_exactly_once() {
    if !require_root() {
        return;
    }
    let mut w = world_with_volume("gsched-crash", true).await;
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    // This controller exits right after creating a scheduled snapshot, before its status says so.
    start_controller(
        &mut w,
        &clock,
        port,
        &[("TANDEM_TEST_ONLY_SCHEDULE_EXIT_AFTER_CREATE", "1")],
    );
    create_group(&w).await;
    create_schedule(&w, "db", hourly(json!({}))).await;
    wait_schedule(&w, "db", "next run 11:00", |s| {
        next_run(s).as_deref() == Some("2025-01-06T11:00:00Z")
    })
    .await;

    clock.set("2025-01-06T11:00:05Z");
    eventually(WAIT, "the controller exited after creating", || {
        let exited = w.controller.as_mut().is_some_and(|c| !c.is_running());
        async move { exited.then_some(()) }
    })
    .await;
    assert_eq!(children(&w, "db").await, ["db-202501061100"]);
    let api: Api<GroupSnapshotSchedule> = w.env.api();
    let crashed = api.get("db").await.expect("schedule");
    assert_eq!(
        last_schedule(&crashed).as_deref(),
        Some("2025-01-06T10:59:00Z"),
        "the crash came before the status recorded the run"
    );

    // A new controller at the same due time: it finds the run taken, and takes nothing more.
    start_controller(&mut w, &clock, port, &[]);
    let s = wait_schedule(&w, "db", "the 11:00 run recorded and Ready", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.last_run_snapshot.as_deref() == Some("db-202501061100")
                && st.last_ready_snapshot.as_deref() == Some("db-202501061100")
        }) && last_schedule(s).as_deref() == Some("2025-01-06T11:00:00Z")
    })
    .await;
    assert_eq!(next_run(&s).as_deref(), Some("2025-01-06T12:00:00Z"));
    assert_eq!(children(&w, "db").await, ["db-202501061100"]);
    let status = s.status.expect("status");
    assert_eq!((status.missed_runs, status.skipped_runs), (0, 0));
    assert_eq!(status.kept.total, 1);

    // And the schedule goes on: the next due time is one more snapshot.
    clock.set("2025-01-06T12:00:05Z");
    wait_children(&w, "db", &["db-202501061100", "db-202501061200"]).await;
    assert_eq!(
        metric(port, "tandem_schedule_runs_total{outcome=\"started\"}").await,
        Some(1.0),
        "the restarted controller started the 12:00 run only"
    );
}

#[tokio::test]
async fn a_run_due_while_one_is_unfinished_is_skipped_and_counted() {
    if !require_root() {
        return;
    }
    // No agent on `a` yet: the first snapshot cannot finish.
    let mut w = world_with_volume("gsched-skip", false).await;
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    start_controller(&mut w, &clock, port, &[]);
    create_group(&w).await;
    create_schedule(&w, "db", hourly(json!({"startingDeadlineSeconds": 300}))).await;
    wait_schedule(&w, "db", "next run 11:00", |s| next_run(s).is_some()).await;

    clock.set("2025-01-06T11:00:05Z");
    wait_children(&w, "db", &["db-202501061100"]).await;
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let first = snapshots.get("db-202501061100").await.expect("first");
    assert!(!finished(&first), "{:?}", first.status);

    clock.set("2025-01-06T12:00:05Z");
    let s = wait_schedule(&w, "db", "one run skipped", |s| {
        s.status.as_ref().is_some_and(|st| st.skipped_runs == 1)
    })
    .await;
    assert_eq!(children(&w, "db").await, ["db-202501061100"]);
    let status = s.status.expect("status");
    assert_eq!(status.active.as_deref(), Some("db-202501061100"));
    assert_eq!(status.missed_runs, 0);
    assert_eq!(
        metric(port, "tandem_schedule_runs_total{outcome=\"skipped\"}").await,
        Some(1.0)
    );

    // The node comes: the first snapshot finishes, and the next due time is taken again.
    w.start_agent("a");
    eventually(WAIT, "the first snapshot finished", || {
        let snapshots = snapshots.clone();
        async move { finished(&snapshots.get("db-202501061100").await.ok()?).then_some(()) }
    })
    .await;
    clock.set("2025-01-06T13:00:05Z");
    wait_children(&w, "db", &["db-202501061100", "db-202501061300"]).await;
    let s = wait_schedule(&w, "db", "13:00 handled", |s| {
        last_schedule(s).as_deref() == Some("2025-01-06T13:00:00Z")
    })
    .await;
    assert_eq!(s.status.expect("status").skipped_runs, 1);
}

#[tokio::test]
async fn after_downtime_one_catch_up_and_the_rest_counted_missed() {
    if !require_root() {
        return;
    }
    let mut w = world_with_volume("gsched-catchup", true).await;
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    start_controller(&mut w, &clock, port, &[]);
    create_group(&w).await;
    create_schedule(&w, "db", hourly(json!({"startingDeadlineSeconds": 600}))).await;
    wait_schedule(&w, "db", "next run 11:00", |s| next_run(s).is_some()).await;

    // Down across 11:00, 12:00, 13:00 and 14:00; back three minutes after 14:00.
    stop_controller(&mut w);
    clock.set("2025-01-06T14:03:00Z");
    start_controller(&mut w, &clock, port, &[]);
    let s = wait_schedule(&w, "db", "14:00 handled", |s| {
        last_schedule(s).as_deref() == Some("2025-01-06T14:00:00Z")
    })
    .await;
    assert_eq!(children(&w, "db").await, ["db-202501061400"]);
    assert_eq!(s.status.as_ref().expect("status").missed_runs, 3);
    assert_eq!(next_run(&s).as_deref(), Some("2025-01-06T15:00:00Z"));

    // Down across 15:00 and back past its starting deadline: nothing is taken, one more missed.
    stop_controller(&mut w);
    clock.set("2025-01-06T15:30:00Z");
    start_controller(&mut w, &clock, port, &[]);
    let s = wait_schedule(&w, "db", "15:00 handled", |s| {
        last_schedule(s).as_deref() == Some("2025-01-06T15:00:00Z")
    })
    .await;
    assert_eq!(s.status.as_ref().expect("status").missed_runs, 4);
    assert_eq!(children(&w, "db").await, ["db-202501061400"]);
    assert_eq!(
        metric(port, "tandem_schedule_runs_total{outcome=\"missed\"}").await,
        Some(1.0)
    );
}

#[tokio::test]
async fn a_bad_cron_or_time_zone_is_refused_with_a_condition_and_takes_nothing() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gsched-bad").await;
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    start_controller(&mut w, &clock, port, &[]);
    for (name, spec, reason, says) in [
        (
            "cron",
            json!({"groupName": "db", "schedule": "61 * * * *"}),
            "InvalidSchedule",
            "minute",
        ),
        (
            "zone",
            json!({"groupName": "db", "schedule": "@hourly", "timeZone": "Mars/Olympus_Mons"}),
            "InvalidTimeZone",
            "Mars/Olympus_Mons",
        ),
        (
            "crontz",
            json!({"groupName": "db", "schedule": "CRON_TZ=Europe/Berlin 0 * * * *"}),
            "InvalidSchedule",
            "spec.timeZone",
        ),
    ] {
        create_schedule(&w, name, spec).await;
        let s = wait_schedule(&w, name, reason, |s| {
            s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "False" && c.reason == reason)
            })
        })
        .await;
        let status = s.status.expect("status");
        assert!(status.next_run_time.is_none(), "{status:?}");
        let message = status.message.unwrap_or_default();
        assert!(message.contains(says), "{name}: {message}");
    }
    // What a person sees.
    let table = w
        .env
        .kubectl(&["get", "groupsnapshotschedules", "-o", "wide"])
        .expect("kubectl get");
    assert!(
        table.contains("InvalidSchedule") && table.contains("InvalidTimeZone"),
        "{table}"
    );
    for column in ["NEXT-RUN", "LAST-READY", "KEPT", "MISSED", "SKIPPED"] {
        assert!(table.contains(column), "{column}: {table}");
    }

    // Fixed, the schedule runs.
    let api: Api<GroupSnapshotSchedule> = w.env.api();
    api.patch(
        "cron",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"schedule": "*/15 * * * *"}})),
    )
    .await
    .expect("fix");
    let s = wait_schedule(&w, "cron", "Ready", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        })
    })
    .await;
    assert_eq!(next_run(&s).as_deref(), Some("2025-01-06T11:00:00Z"));
    let snapshots: Api<GroupSnapshot> = w.env.api();
    assert!(
        snapshots
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );

    // The example applies and is Ready (its group does not exist: nothing is due before 11:00).
    let example = support::repo_root().join("examples/group-snapshot-schedule.yaml");
    w.env
        .kubectl(&["apply", "-f", &example.to_string_lossy()])
        .expect("apply the example");
    wait_schedule(&w, "orders-db-hourly", "the example Ready", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        }) && next_run(s).as_deref() == Some("2025-01-06T11:00:00Z")
    })
    .await;

    // A name too long for `<schedule>-<yyyymmddhhmm>` is refused by the API server.
    let long = "s".repeat(51);
    let refused = api
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": long},
                "spec": {"groupName": "db", "schedule": "@daily"}}))
            .expect("schedule"),
        )
        .await;
    assert!(
        refused.is_err(),
        "a 51-character schedule name was accepted"
    );
}

fn member_clones(snapshot: &GroupSnapshot) -> Vec<PathBuf> {
    snapshot
        .status
        .as_ref()
        .expect("status")
        .members
        .iter()
        .map(|m| world::clone_path(m.snapshot_handle.as_deref().expect("handle")))
        .collect()
}

fn all_exist(paths: &[PathBuf]) -> bool {
    paths.iter().all(|p| Path::new(p).exists())
}

#[tokio::test]
async fn retention_removes_the_backend_snapshots_from_the_nodes_and_retain_keeps_them() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gsched-retention").await;
    w.add_volume("data", "a", "xfs", &[]).await;
    w.add_volume("wal", "b", "ext4", &[]).await;
    w.start_agent("a");
    w.start_agent("b");
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    start_controller(&mut w, &clock, port, &[]);
    w.create_group(
        "db",
        json!({"claims": ["data", "wal"], "freezeTimeoutSeconds": 20}),
    )
    .await;
    let retention = json!({"keepLast": 1, "minReady": 1});
    create_schedule(&w, "drop", hourly(json!({"retention": retention}))).await;
    create_schedule(
        &w,
        "keep",
        hourly(
            json!({"retention": retention, "template": {"spec": {"deletionPolicy": "Retain"},
            "metadata": {"labels": {"tier": "gold"}}}}),
        ),
    )
    .await;
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let ready = |name: &'static str| {
        let snapshots = snapshots.clone();
        async move {
            eventually(WAIT, &format!("{name} Ready"), || {
                let snapshots = snapshots.clone();
                async move {
                    let s = snapshots.get(name).await.ok()?;
                    (s.status.as_ref()?.phase == GroupSnapshotPhase::Ready).then_some(s)
                }
            })
            .await
        }
    };
    for name in ["drop", "keep"] {
        wait_schedule(&w, name, "next run", |s| next_run(s).is_some()).await;
    }

    clock.set("2025-01-06T11:00:05Z");
    let drop_first = ready("drop-202501061100").await;
    let keep_first = ready("keep-202501061100").await;
    assert_eq!(
        keep_first.labels().get("tier").map(String::as_str),
        Some("gold")
    );
    let (drop_clones, keep_clones) = (member_clones(&drop_first), member_clones(&keep_first));
    assert_eq!((drop_clones.len(), keep_clones.len()), (2, 2));
    assert!(all_exist(&drop_clones) && all_exist(&keep_clones));

    clock.set("2025-01-06T12:00:05Z");
    ready("drop-202501061200").await;
    ready("keep-202501061200").await;
    // keepLast 1: each first snapshot goes, by ordinary deletion.
    wait_children(&w, "drop", &["drop-202501061200"]).await;
    wait_children(&w, "keep", &["keep-202501061200"]).await;
    eventually(WAIT, "the first snapshots gone", || {
        let snapshots = snapshots.clone();
        async move {
            let a = snapshots.get_opt("drop-202501061100").await.ok()?;
            let b = snapshots.get_opt("keep-202501061100").await.ok()?;
            (a.is_none() && b.is_none()).then_some(())
        }
    })
    .await;
    // Delete: gone from both nodes' disks. Retain: still there, as kept NodeSnapshots.
    eventually(WAIT, "the Delete clones removed from disk", || async {
        drop_clones.iter().all(|p| !p.exists()).then_some(())
    })
    .await;
    assert!(all_exist(&keep_clones), "Retain lost its clones");
    let nodes: Api<NodeSnapshot> = w.env.api();
    let kept = nodes
        .list(&ListParams::default().labels("tandem.dev/retained=true"))
        .await
        .expect("list")
        .items;
    assert_eq!(kept.len(), 2, "one kept NodeSnapshot per node");
    for name in ["drop", "keep"] {
        let s = wait_schedule(&w, name, "retention counted", |s| {
            s.status
                .as_ref()
                .is_some_and(|st| st.retention_deleted == 1 && st.kept.total == 1)
        })
        .await;
        let status = s.status.expect("status");
        assert_eq!(status.kept.ready, 1);
        assert_eq!(
            status.last_ready_snapshot.as_deref(),
            Some(format!("{name}-202501061200").as_str())
        );
    }
    // What a person sees: the next run, the newest Ready snapshot and how many are kept.
    let table = w
        .env
        .kubectl(&["get", "gsched", "-o", "wide"])
        .expect("kubectl get");
    eprintln!("{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with("drop "))
        .unwrap_or_default();
    for cell in [
        "db",
        "0 * * * *",
        "Europe/Berlin",
        "2025-01-06T13:00:00Z",
        "drop-202501061200",
        "Scheduled",
    ] {
        assert!(row.contains(cell), "{cell}: {table}");
    }
    assert_eq!(
        metric(port, "tandem_schedule_retention_deleted_total").await,
        Some(2.0)
    );
    let age = metric(
        port,
        &format!(
            "tandem_schedule_last_ready_age_seconds{{namespace=\"{}\",schedule=\"drop\"}}",
            w.env.namespace
        ),
    )
    .await;
    assert!(age.is_some_and(|a| a >= 0.0), "{age:?}");

    // Deleting a schedule keeps its snapshots (deleteSnapshotsWithSchedule is not set).
    let schedules: Api<GroupSnapshotSchedule> = w.env.api();
    schedules
        .delete("drop", &DeleteParams::default())
        .await
        .expect("delete schedule");
    eventually(WAIT, "schedule drop gone", || {
        let schedules = schedules.clone();
        async move {
            schedules
                .get_opt("drop")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert_eq!(children(&w, "drop").await, ["drop-202501061200"]);

    // Clean up what Retain kept (deleting a kept NodeSnapshot deletes its clones).
    for node in kept {
        nodes
            .delete(&node.name_any(), &DeleteParams::default())
            .await
            .expect("delete kept");
    }
    eventually(WAIT, "kept clones deleted", || async {
        keep_clones.iter().all(|p| !p.exists()).then_some(())
    })
    .await;
}

#[tokio::test]
async fn suspend_takes_nothing_and_delete_snapshots_with_schedule_spares_only_pinned() {
    if !require_root() {
        return;
    }
    let mut w = world_with_volume("gsched-suspend", true).await;
    let clock = TestClock::new(&w);
    clock.set("2025-01-06T10:59:00Z");
    let port = support::control_plane::free_port();
    start_controller(&mut w, &clock, port, &[]);
    create_group(&w).await;
    create_schedule(
        &w,
        "db",
        hourly(json!({"retention": {"keepLast": 5, "deleteSnapshotsWithSchedule": true}})),
    )
    .await;
    wait_schedule(&w, "db", "next run", |s| next_run(s).is_some()).await;
    clock.set("2025-01-06T11:00:05Z");
    wait_children(&w, "db", &["db-202501061100"]).await;
    // Finished before 13:00, or that run would (rightly) be skipped.
    let snapshots: Api<GroupSnapshot> = w.env.api();
    eventually(WAIT, "the first snapshot finished", || {
        let snapshots = snapshots.clone();
        async move { finished(&snapshots.get("db-202501061100").await.ok()?).then_some(()) }
    })
    .await;

    let api: Api<GroupSnapshotSchedule> = w.env.api();
    let suspend = |on: bool| {
        let api = api.clone();
        async move {
            api.patch(
                "db",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"suspend": on}})),
            )
            .await
            .expect("suspend");
        }
    };
    suspend(true).await;
    wait_schedule(&w, "db", "Suspended", |s| {
        s.status.as_ref().is_some_and(|st| {
            st.next_run_time.is_none() && st.conditions.iter().any(|c| c.reason == "Suspended")
        })
    })
    .await;
    clock.set("2025-01-06T12:00:05Z");
    wait_schedule(&w, "db", "12:00 passed while suspended", |s| {
        last_schedule(s).as_deref() == Some("2025-01-06T12:00:05Z")
    })
    .await;
    assert_eq!(children(&w, "db").await, ["db-202501061100"]);
    // Resumed: the run due while suspended is not taken later.
    suspend(false).await;
    let s = wait_schedule(&w, "db", "resumed", |s| next_run(s).is_some()).await;
    assert_eq!(next_run(&s).as_deref(), Some("2025-01-06T13:00:00Z"));
    assert_eq!(children(&w, "db").await, ["db-202501061100"]);
    clock.set("2025-01-06T13:00:05Z");
    wait_children(&w, "db", &["db-202501061100", "db-202501061300"]).await;

    // Pin the first; deleting the schedule deletes the other with it.
    snapshots
        .patch(
            "db-202501061100",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"tandem.dev/retain": "true"}}})),
        )
        .await
        .expect("pin");
    eventually(WAIT, "the schedule counts the pin", || {
        let api = api.clone();
        async move {
            let s = api.get("db").await.ok()?;
            (s.status?.kept.pinned == 1).then_some(())
        }
    })
    .await;
    api.delete("db", &DeleteParams::default())
        .await
        .expect("delete schedule");
    eventually(WAIT, "schedule and its unpinned snapshot gone", || {
        let (api, snapshots) = (api.clone(), snapshots.clone());
        async move {
            let schedule_gone = api.get_opt("db").await.ok()?.is_none();
            let other_gone = snapshots.get_opt("db-202501061300").await.ok()?.is_none();
            (schedule_gone && other_gone).then_some(())
        }
    })
    .await;
    assert!(
        snapshots
            .get_opt("db-202501061100")
            .await
            .expect("get")
            .is_some(),
        "the pinned snapshot went with the schedule"
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // The fields after the command name (which may hold spaces) start after its ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// A measurement (run with `--ignored`): idle schedules cost no writes and next to no CPU between
/// their due times. 500 yearly schedules on the system clock.
#[tokio::test]
#[ignore]
async fn idle_schedules_write_nothing_and_use_no_cpu_between_due_times() {
    let mut w = World::new("gsched-idle").await;
    w.start_controller();
    let pid = w.controller.as_mut().and_then(|c| c.pid()).expect("pid");
    let count = 500;
    let started = std::time::Instant::now();
    for i in 0..count {
        create_schedule(
            &w,
            &format!("s{i}"),
            json!({"groupName": "db", "schedule": "0 0 1 1 *"}),
        )
        .await;
    }
    let api: Api<GroupSnapshotSchedule> = w.env.api();
    let versions = eventually(Duration::from_secs(300), "every schedule evaluated", || {
        let api = api.clone();
        async move {
            let items = api.list(&ListParams::default()).await.ok()?.items;
            let done = items.len() == count && items.iter().all(|s| next_run(s).is_some());
            done.then(|| {
                items
                    .into_iter()
                    .map(|s| (s.name_any(), s.resource_version()))
                    .collect::<Vec<_>>()
            })
        }
    })
    .await;
    let settled = started.elapsed();
    let (cpu_before, rss) = (cpu_ticks(pid), rss_kib(pid));
    let window = Duration::from_secs(20);
    tokio::time::sleep(window).await;
    let cpu = cpu_ticks(pid) - cpu_before;
    let after: Vec<_> = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|s| (s.name_any(), s.resource_version()))
        .collect();
    eprintln!(
        "{count} schedules evaluated {settled:?} after the first create; then {window:?} idle: {cpu} CPU ticks, RSS {rss} KiB"
    );
    let mut before = versions;
    let mut after = after;
    before.sort();
    after.sort();
    assert_eq!(before, after, "an idle schedule was written");
    assert!(cpu < 100, "{cpu} ticks of CPU in {window:?} of idling");
}
