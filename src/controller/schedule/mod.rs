//! GroupSnapshotSchedule: cuts GroupSnapshots on a cron schedule and trims them by retention.
//!
//! The decisions are pure ([`cron`], [`plan`], [`retention`]); this is the shell that reads the
//! clock and the schedule's snapshots (a watch cache of the GroupSnapshots that carry the label
//! `tandem.dev/schedule`), creates and deletes GroupSnapshots and writes the status. Idle cost:
//! one requeue at the next due time; snapshot changes wake their schedule; no resync loop.

pub mod clock;
pub mod cron;
pub mod plan;
pub mod retention;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use self::clock::Clock;
use self::cron::Cron;
use self::plan::{Inputs, RunAction, snapshot_name};
use self::retention::{Candidate, RetentionPolicy, Verdict, decide};
use super::{CONTROLLER_NAME, Context, Error, cache_ready, drive_in_background, publish_event};
use crate::api::{
    CONDITION_READY, GroupRestore, GroupSnapshot, GroupSnapshotPhase, GroupSnapshotSchedule,
    GroupSnapshotScheduleStatus, KeptCounts, RestorePhase, SnapshotRetention,
};
use crate::conditions::condition;
use crate::finalizer;

/// On each GroupSnapshot a schedule made: the schedule's name.
pub const SCHEDULE_LABEL: &str = "tandem.dev/schedule";
/// On each GroupSnapshot a schedule made: the due time it was made for (RFC 3339, UTC).
pub const SCHEDULED_FOR_ANNOTATION: &str = "tandem.dev/scheduled-for";
/// `"true"` on a GroupSnapshot: retention never deletes it.
pub const RETAIN_ANNOTATION: &str = "tandem.dev/retain";
/// On a schedule with `retention.deleteSnapshotsWithSchedule`: its snapshots go with it.
pub const SCHEDULE_FINALIZER: &str = "tandem.dev/schedule";

/// The longest a schedule sleeps before it looks at the clock again.
const MAX_REQUEUE: Duration = Duration::from_secs(24 * 3600);

struct ScheduleContext {
    ctx: Arc<Context>,
    clock: Arc<dyn Clock>,
    /// Every GroupSnapshot that carries [`SCHEDULE_LABEL`].
    children: Store<GroupSnapshot>,
    /// Per schedule uid: the last status written. The controller is the status's only writer (one
    /// leader; a lost lease ends the process), so this is never older than the watch cache, which
    /// may not have caught up yet (a snapshot event can wake the schedule before its own status
    /// write comes back): a due time or a deletion is never counted twice, nor lost.
    written: Mutex<HashMap<String, GroupSnapshotScheduleStatus>>,
    /// Snapshots (namespace, name) retention or the schedule's deletion asked to delete, until the
    /// cache shows them going: never deleted (and counted) twice.
    deleting: Mutex<HashSet<(String, String)>>,
}

/// Runs the GroupSnapshotSchedule controller.
pub async fn run_schedule_controller(ctx: Arc<Context>, namespace: Option<&str>) {
    let schedules: Api<GroupSnapshotSchedule> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let snapshots: Api<GroupSnapshot> = match namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (children, writer) = reflector::store();
    let events = reflector(
        writer,
        watcher(snapshots, watcher::Config::default().labels(SCHEDULE_LABEL)),
    )
    .default_backoff()
    .touched_objects();
    let events = drive_in_background("scheduled groupsnapshots", events, None, None);
    let (clock, ticks) = clock::from_env();
    let ticks = match ticks {
        Some(rx) => {
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|t| (t, rx)) })
                .boxed()
        }
        None => futures::stream::pending().boxed(),
    };
    let sc = Arc::new(ScheduleContext {
        ctx,
        clock,
        children,
        written: Mutex::default(),
        deleting: Mutex::default(),
    });
    Controller::new(schedules, watcher::Config::default())
        .watches_stream(events, |snapshot: GroupSnapshot| {
            let namespace = snapshot.namespace().unwrap_or_default();
            snapshot
                .labels()
                .get(SCHEDULE_LABEL)
                .map(|name| ObjectRef::<GroupSnapshotSchedule>::new(name).within(&namespace))
        })
        // The test clock moved: evaluate every schedule at the new time.
        .reconcile_all_on(ticks)
        .shutdown_on_signal()
        .run(reconcile, error_policy, sc)
        .for_each(|result| async move {
            if let Err(e) = result {
                warn!(error = %e, "schedule reconcile failed");
            }
        })
        .await;
}

fn error_policy(
    schedule: Arc<GroupSnapshotSchedule>,
    error: &Error,
    sc: Arc<ScheduleContext>,
) -> Action {
    warn!(schedule = %schedule.name_any(), error = %error, "will retry");
    sc.ctx.metrics.reconcile_error("group_snapshot_schedule");
    Action::requeue(Duration::from_secs(5))
}

/// One of the schedule's snapshots, as the decisions see it.
struct Child {
    name: String,
    scheduled: Timestamp,
    phase: GroupSnapshotPhase,
    pinned: bool,
    completion: Option<Timestamp>,
}

impl Child {
    fn finished(&self) -> bool {
        matches!(
            self.phase,
            GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
        )
    }

    fn of(snapshot: &GroupSnapshot) -> Child {
        let scheduled = snapshot
            .annotations()
            .get(SCHEDULED_FOR_ANNOTATION)
            .and_then(|t| t.parse().ok())
            .or_else(|| snapshot.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or_default();
        let status = snapshot.status.as_ref();
        Child {
            name: snapshot.name_any(),
            scheduled,
            phase: status.map(|s| s.phase).unwrap_or_default(),
            pinned: snapshot
                .annotations()
                .get(RETAIN_ANNOTATION)
                .is_some_and(|v| v == "true"),
            completion: status.and_then(|s| s.completion_time.as_ref()).map(|t| t.0),
        }
    }
}

/// The retention policy of the spec (None: keep everything), or why it is not one.
pub fn retention_policy(
    retention: Option<&SnapshotRetention>,
) -> Result<Option<RetentionPolicy>, String> {
    let Some(r) = retention else {
        return Ok(None);
    };
    let max_age = r.max_age.as_deref().map(plan::parse_max_age).transpose()?;
    Ok(Some(RetentionPolicy {
        keep_last: r.keep_last,
        hourly: r.hourly,
        daily: r.daily,
        weekly: r.weekly,
        monthly: r.monthly,
        yearly: r.yearly,
        max_age,
        min_ready: r.min_ready,
    }))
}

async fn reconcile(
    schedule: Arc<GroupSnapshotSchedule>,
    sc: Arc<ScheduleContext>,
) -> Result<Action, Error> {
    let ctx = &sc.ctx;
    let namespace = schedule.namespace().ok_or(Error::MissingNamespace)?;
    let uid = schedule.uid().ok_or(Error::MissingUid)?;
    let name = schedule.name_any();
    let api: Api<GroupSnapshotSchedule> = Api::namespaced(ctx.client.clone(), &namespace);
    let snapshots: Api<GroupSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    cache_ready(&sc.children, "GroupSnapshots of schedules").await?;
    let mine: Vec<Arc<GroupSnapshot>> = sc
        .children
        .state()
        .into_iter()
        .filter(|s| {
            s.namespace().as_deref() == Some(namespace.as_str())
                && s.labels().get(SCHEDULE_LABEL) == Some(&name)
        })
        .collect();
    let mut children: Vec<Child> = {
        let mut deleting = sc.deleting.lock().unwrap_or_else(|p| p.into_inner());
        // Forget the deletions the cache has caught up with.
        for s in &mine {
            if s.metadata.deletion_timestamp.is_some() {
                deleting.remove(&(namespace.clone(), s.name_any()));
            }
        }
        mine.iter()
            .filter(|s| {
                s.metadata.deletion_timestamp.is_none()
                    && !deleting.contains(&(namespace.clone(), s.name_any()))
            })
            .map(|s| Child::of(s))
            .collect()
    };
    children.sort_by(|a, b| a.scheduled.cmp(&b.scheduled).then(a.name.cmp(&b.name)));

    let delete_with_schedule = schedule
        .spec
        .retention
        .as_ref()
        .is_some_and(|r| r.delete_snapshots_with_schedule);
    if schedule.metadata.deletion_timestamp.is_some() {
        if finalizer::has(schedule.as_ref(), SCHEDULE_FINALIZER) {
            if delete_with_schedule {
                for child in children.iter().filter(|c| !c.pinned) {
                    delete_snapshot(&snapshots, &child.name).await?;
                }
                info!(%namespace, schedule = %name, "deleted the schedule's snapshots with it");
            }
            if let Some(patch) = finalizer::removing(schedule.as_ref(), SCHEDULE_FINALIZER) {
                api.patch(&name, &PatchParams::default(), &patch).await?;
            }
        }
        ctx.metrics.schedule_last_ready(&namespace, &name, None);
        forget(&sc, &uid);
        return Ok(Action::await_change());
    }
    let finalizer_patch = if delete_with_schedule {
        finalizer::adding(schedule.as_ref(), SCHEDULE_FINALIZER)
    } else {
        finalizer::removing(schedule.as_ref(), SCHEDULE_FINALIZER)
    };
    if let Some(patch) = finalizer_patch {
        api.patch(&name, &PatchParams::default(), &patch).await?;
        return Ok(Action::await_change());
    }

    let cached = schedule.status.clone().unwrap_or_default();
    let mut status = sc
        .written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&uid)
        .cloned()
        .unwrap_or_else(|| cached.clone());
    let generation = schedule.metadata.generation;

    // A schedule that cannot run says why, and waits for a change.
    let zone = match TimeZone::get(&schedule.spec.time_zone) {
        Ok(zone) => zone,
        Err(_) => {
            let message = format!(
                "spec.timeZone {:?} is not an IANA time zone (like UTC, Europe/Berlin or America/New_York)",
                schedule.spec.time_zone
            );
            return refuse(&sc, &schedule, status, "InvalidTimeZone", message).await;
        }
    };
    let cron: Cron = match schedule.spec.schedule.parse() {
        Ok(cron) => cron,
        Err(e) => {
            let message = format!("spec.schedule: {e}");
            return refuse(&sc, &schedule, status, "InvalidSchedule", message).await;
        }
    };
    let policy = match retention_policy(schedule.spec.retention.as_ref()) {
        Ok(policy) => policy,
        Err(e) => {
            let message = format!("spec.retention: {e}");
            return refuse(&sc, &schedule, status, "InvalidRetention", message).await;
        }
    };

    let now = sc.clock.now();
    let created = schedule
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let last = [
        status.last_schedule_time.as_ref().map(|t| t.0),
        children.last().map(|c| c.scheduled),
    ]
    .into_iter()
    .flatten()
    .max()
    // A new schedule starts from its creation (or now, if the clock reads earlier).
    .unwrap_or(created.min(now));
    // A changed spec (another cron, resumed, ...) starts from the change: runs its old or new
    // schedule would have had before are neither caught up nor counted.
    let spec_changed =
        status.observed_generation.is_some() && status.observed_generation != generation;
    let last = if spec_changed { last.max(now) } else { last };
    let run = plan::plan(&Inputs {
        cron: &cron,
        zone: &zone,
        last,
        now,
        starting_deadline: schedule
            .spec
            .starting_deadline_seconds
            .map(SignedDuration::from_secs),
        suspended: schedule.spec.suspend,
        unfinished: false,
    });
    // At most one unfinished run: the due time's own snapshot (made before a restart) does not
    // count against it.
    let action = match run.action {
        RunAction::Take(t) => {
            let own = snapshot_name(&name, t);
            match children
                .iter()
                .rev()
                .find(|c| !c.finished() && c.name != own)
            {
                Some(other) => {
                    status.active = Some(other.name.clone());
                    RunAction::Skip(t)
                }
                None => RunAction::Take(t),
            }
        }
        other => other,
    };
    if run.missed > 0 {
        status.missed_runs += run.missed as i64;
        ctx.metrics.schedule_runs("missed", run.missed);
        info!(%namespace, schedule = %name, missed = run.missed, "due runs missed while the controller was away");
    }
    match action {
        RunAction::Take(t) => {
            let child = snapshot_name(&name, t);
            if take(&snapshots, &schedule, &child, t).await? {
                crash_after_create_for_tests();
                ctx.metrics.schedule_runs("started", 1);
                info!(%namespace, schedule = %name, snapshot = %child, "took a scheduled snapshot");
                publish(
                    ctx,
                    &schedule,
                    EventType::Normal,
                    "SnapshotCreated",
                    format!("GroupSnapshot {child} for the run due at {t}"),
                )
                .await;
                children.push(Child {
                    name: child.clone(),
                    scheduled: t,
                    phase: GroupSnapshotPhase::Pending,
                    pinned: false,
                    completion: None,
                });
            }
            status.last_run_time = Some(Time(t));
            status.last_run_snapshot = Some(child);
        }
        RunAction::Skip(t) => {
            status.skipped_runs += 1;
            ctx.metrics.schedule_runs("skipped", 1);
            let active = status.active.clone().unwrap_or_default();
            publish(
                ctx,
                &schedule,
                EventType::Warning,
                "RunSkipped",
                format!("the run due at {t} was skipped: GroupSnapshot {active} is unfinished"),
            )
            .await;
        }
        RunAction::TooLate(t) => {
            status.missed_runs += 1;
            ctx.metrics.schedule_runs("missed", 1);
            publish(
                ctx,
                &schedule,
                EventType::Warning,
                "RunMissed",
                format!(
                    "the run due at {t} was not taken: it is past startingDeadlineSeconds ({}s)",
                    schedule.spec.starting_deadline_seconds.unwrap_or_default()
                ),
            )
            .await;
        }
        RunAction::Idle | RunAction::Suspended => {}
    }
    // A snapshot taken just before a crash (its status never written) is the last run too.
    if let Some(newest) = children.last()
        && status
            .last_run_time
            .as_ref()
            .is_none_or(|t| t.0 < newest.scheduled)
    {
        status.last_run_time = Some(Time(newest.scheduled));
        status.last_run_snapshot = Some(newest.name.clone());
    }
    status.last_schedule_time = Some(Time(run.handled_up_to));
    status.next_run_time = run.next.map(Time);

    // Retention, over what exists now (a change of policy applies to existing snapshots).
    if let Some(policy) = &policy {
        let deleted = apply_retention(&sc, &schedule, policy, &zone, now, &mut children).await?;
        status.retention_deleted += deleted;
    }

    record_outcomes(ctx, &namespace, &name, &children, &mut status);
    status.active = children
        .iter()
        .rev()
        .find(|c| !c.finished())
        .map(|c| c.name.clone());
    status.kept = KeptCounts {
        total: children.len() as i32,
        ready: count(&children, |c| c.phase == GroupSnapshotPhase::Ready),
        failed: count(&children, |c| c.phase == GroupSnapshotPhase::Failed),
        pinned: count(&children, |c| c.pinned),
    };
    let (reason, message) = if schedule.spec.suspend {
        ("Suspended", "suspended: no new snapshots".to_string())
    } else {
        match run.next {
            Some(next) => (
                "Scheduled",
                format!(
                    "next run at {} ({})",
                    next.to_zoned(zone.clone()).strftime("%Y-%m-%d %H:%M %Z"),
                    schedule.spec.time_zone
                ),
            ),
            None => ("Scheduled", "no further run is due".to_string()),
        }
    };
    status.message = None;
    status.observed_generation = generation;
    status.conditions = vec![condition(
        &status.conditions,
        CONDITION_READY,
        true,
        reason,
        message,
        generation,
    )];
    if status != cached {
        write_status(&api, &name, &status).await?;
    }
    sc.written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(uid, status);

    Ok(match run.next {
        Some(next) => {
            // At most a day: the runtime's timer wheel holds about two years, and a schedule of
            // 29 February waits up to eight.
            let wait = Duration::try_from(next.duration_since(now)).unwrap_or_default();
            Action::requeue(wait.clamp(Duration::from_millis(200), MAX_REQUEUE))
        }
        None => Action::await_change(),
    })
}

/// Debug builds only (what `cargo test` builds): with `TANDEM_TEST_ONLY_SCHEDULE_EXIT_AFTER_CREATE`
/// set, the process exits right after creating a scheduled snapshot, before the status records it:
/// the worst moment for a crash.
fn crash_after_create_for_tests() {
    if cfg!(debug_assertions)
        && std::env::var_os("TANDEM_TEST_ONLY_SCHEDULE_EXIT_AFTER_CREATE").is_some()
    {
        warn!("test-only: exiting right after creating a scheduled snapshot");
        std::process::exit(3);
    }
}

fn count(children: &[Child], f: impl Fn(&Child) -> bool) -> i32 {
    children.iter().filter(|c| f(c)).count() as i32
}

fn forget(sc: &ScheduleContext, uid: &str) {
    sc.written
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(uid);
}

/// The newest Ready snapshot, and each newly finished run's outcome (counted once: the newest
/// finished snapshot is remembered in the status; names sort by their scheduled time).
fn record_outcomes(
    ctx: &Context,
    namespace: &str,
    name: &str,
    children: &[Child],
    status: &mut GroupSnapshotScheduleStatus,
) {
    let ready = children
        .iter()
        .rev()
        .find(|c| c.phase == GroupSnapshotPhase::Ready);
    status.last_ready_snapshot = ready.map(|c| c.name.clone());
    status.last_ready_time = ready.and_then(|c| c.completion).map(Time);
    ctx.metrics.schedule_last_ready(
        namespace,
        name,
        ready
            .and_then(|c| c.completion)
            .map(|t| t.as_millisecond() as f64 / 1000.0),
    );
    if let Some(finished) = children.iter().rev().find(|c| c.finished())
        && status
            .last_finished_snapshot
            .as_ref()
            .is_none_or(|previous| finished.name > *previous)
    {
        let outcome = if finished.phase == GroupSnapshotPhase::Ready {
            "ready"
        } else {
            "failed"
        };
        ctx.metrics.schedule_runs(outcome, 1);
        status.last_finished_snapshot = Some(finished.name.clone());
    }
}

/// Creates the snapshot of the run due at `scheduled`; false when it exists already (this run
/// was taken before a restart).
async fn take(
    snapshots: &Api<GroupSnapshot>,
    schedule: &GroupSnapshotSchedule,
    child: &str,
    scheduled: Timestamp,
) -> Result<bool, Error> {
    let template = &schedule.spec.template;
    let mut labels: BTreeMap<String, String> = template.metadata.labels.clone();
    labels.insert(SCHEDULE_LABEL.into(), schedule.name_any());
    let mut annotations = template.metadata.annotations.clone();
    annotations.insert(SCHEDULED_FOR_ANNOTATION.into(), scheduled.to_string());
    let snapshot: GroupSnapshot = serde_json::from_value(json!({
        "apiVersion": GroupSnapshot::api_version(&()),
        "kind": GroupSnapshot::kind(&()),
        "metadata": {"name": child, "labels": labels, "annotations": annotations},
        "spec": {
            "groupName": schedule.spec.group_name,
            "deletionPolicy": template.spec.deletion_policy,
            "hooks": template.spec.hooks,
        },
    }))?;
    match snapshots.create(&PostParams::default(), &snapshot).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn delete_snapshot(snapshots: &Api<GroupSnapshot>, name: &str) -> Result<(), Error> {
    match snapshots.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes the snapshots the policy no longer keeps (through ordinary GroupSnapshot deletion:
/// each one's deletionPolicy decides about its member snapshots) and drops them from `children`.
/// Returns how many were deleted.
async fn apply_retention(
    sc: &ScheduleContext,
    schedule: &GroupSnapshotSchedule,
    policy: &RetentionPolicy,
    zone: &TimeZone,
    now: Timestamp,
    children: &mut Vec<Child>,
) -> Result<i64, Error> {
    let candidates = |children: &[Child]| -> Vec<Candidate> {
        children
            .iter()
            .map(|c| Candidate {
                name: c.name.clone(),
                scheduled: c.scheduled,
                ready: c.phase == GroupSnapshotPhase::Ready,
                finished: c.finished(),
                pinned: c.pinned,
            })
            .collect()
    };
    let verdicts = decide(policy, zone, now, &candidates(children));
    if !verdicts.iter().any(|(_, v)| v.is_delete()) {
        return Ok(0);
    }
    // Only when something would go: the sources of unfinished restores are pinned too.
    let namespace = schedule.namespace().unwrap_or_default();
    let restores: Api<GroupRestore> = Api::namespaced(sc.ctx.client.clone(), &namespace);
    let restores = restores.list(&ListParams::default()).await?;
    for restore in &restores.items {
        let running = !matches!(
            restore.status.as_ref().map(|s| s.phase),
            Some(RestorePhase::Completed | RestorePhase::Failed)
        );
        if running {
            let source = &restore.spec.source.group_snapshot_name;
            for child in children.iter_mut().filter(|c| &c.name == source) {
                child.pinned = true;
            }
        }
    }
    let verdicts = decide(policy, zone, now, &candidates(children));
    let snapshots: Api<GroupSnapshot> = Api::namespaced(sc.ctx.client.clone(), &namespace);
    let mut deleted = 0;
    for (child, verdict) in &verdicts {
        let Verdict::Delete(reason) = verdict else {
            continue;
        };
        delete_snapshot(&snapshots, child).await?;
        sc.deleting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.clone(), child.clone()));
        deleted += 1;
        sc.ctx.metrics.retention_deleted();
        info!(%namespace, schedule = %schedule.name_any(), snapshot = %child, %reason, "retention deleted a snapshot");
        publish(
            &sc.ctx,
            schedule,
            EventType::Normal,
            "RetentionDeleted",
            format!("deleted GroupSnapshot {child}: {reason}"),
        )
        .await;
        children.retain(|c| &c.name != child);
    }
    Ok(deleted)
}

/// Reports a schedule that cannot run (Ready=False with `reason`), once, and waits for a change.
async fn refuse(
    sc: &ScheduleContext,
    schedule: &GroupSnapshotSchedule,
    mut status: GroupSnapshotScheduleStatus,
    reason: &str,
    message: String,
) -> Result<Action, Error> {
    let generation = schedule.metadata.generation;
    let before = schedule.status.clone().unwrap_or_default();
    status.next_run_time = None;
    status.message = Some(message.clone());
    status.observed_generation = generation;
    status.conditions = vec![condition(
        &status.conditions,
        CONDITION_READY,
        false,
        reason,
        message.clone(),
        generation,
    )];
    if status != before {
        let name = schedule.name_any();
        let namespace = schedule.namespace().unwrap_or_default();
        let api: Api<GroupSnapshotSchedule> = Api::namespaced(sc.ctx.client.clone(), &namespace);
        write_status(&api, &name, &status).await?;
        warn!(%namespace, schedule = %name, %reason, %message, "schedule refused");
        publish(&sc.ctx, schedule, EventType::Warning, reason, message).await;
    }
    if let Some(uid) = schedule.uid() {
        sc.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(uid, status);
    }
    Ok(Action::await_change())
}

async fn write_status(
    api: &Api<GroupSnapshotSchedule>,
    name: &str,
    status: &GroupSnapshotScheduleStatus,
) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": GroupSnapshotSchedule::api_version(&()),
        "kind": GroupSnapshotSchedule::kind(&()),
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
    schedule: &GroupSnapshotSchedule,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let reference = schedule.object_ref(&());
    publish_event(
        ctx,
        &reference,
        type_,
        reason.into(),
        Some(note),
        "Schedule",
    )
    .await;
}
