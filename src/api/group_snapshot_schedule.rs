use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::DeletionPolicy;

/// The longest name of a schedule: its GroupSnapshots are named `<schedule>-<yyyymmddhhmm>`, which
/// must stay a DNS label (63 characters).
pub const MAX_SCHEDULE_NAME: usize = 50;

/// Takes GroupSnapshots of a ConsistencyGroup on a cron schedule and keeps only those its
/// retention says.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "tandem.dev",
    version = "v1alpha1",
    kind = "GroupSnapshotSchedule",
    namespaced,
    shortname = "gsched",
    category = "tandem",
    status = "GroupSnapshotScheduleStatus",
    doc = "Takes GroupSnapshots of a ConsistencyGroup on a cron schedule in a declared time zone, and deletes those its retention no longer keeps.",
    validation = Rule::new("size(self.metadata.name) <= 50 && self.metadata.name.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$')").message("metadata.name must be a DNS label of at most 50 characters (its snapshots are named <schedule>-<yyyymmddhhmm>)"),
    printcolumn(name = "Group", type_ = "string", json_path = ".spec.groupName"),
    printcolumn(name = "Schedule", type_ = "string", json_path = ".spec.schedule"),
    printcolumn(name = "Zone", type_ = "string", json_path = ".spec.timeZone"),
    printcolumn(name = "Suspend", type_ = "boolean", json_path = ".spec.suspend"),
    printcolumn(name = "Next-Run", type_ = "string", description = "When the next snapshot is due (UTC; a date column would say <invalid> for a time to come)", json_path = ".status.nextRunTime"),
    printcolumn(name = "Last-Ready", type_ = "string", description = "The newest Ready snapshot", json_path = ".status.lastReadySnapshot"),
    printcolumn(name = "Ready-Age", type_ = "date", priority = 1, description = "How long ago the newest Ready snapshot became Ready", json_path = ".status.lastReadyTime"),
    printcolumn(name = "Kept", type_ = "integer", description = "Snapshots of this schedule that exist", json_path = ".status.kept.total"),
    printcolumn(name = "Ready", type_ = "string", json_path = ".status.conditions[?(@.type==\"Ready\")].status"),
    printcolumn(name = "Reason", type_ = "string", priority = 1, json_path = ".status.conditions[?(@.type==\"Ready\")].reason"),
    printcolumn(name = "Missed", type_ = "integer", priority = 1, description = "Due runs not taken because they were too late", json_path = ".status.missedRuns"),
    printcolumn(name = "Skipped", type_ = "integer", priority = 1, description = "Due runs not taken because one was unfinished", json_path = ".status.skippedRuns"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotScheduleSpec {
    /// The ConsistencyGroup (in this namespace) to snapshot.
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub group_name: String,

    /// When to snapshot: five cron fields (minute hour day-of-month month day-of-week, with `*`,
    /// lists, ranges, steps and names like `mon` or `jan`) or one of `@yearly`, `@annually`,
    /// `@monthly`, `@weekly`, `@daily`, `@midnight`, `@hourly`. Read in `timeZone`.
    #[schemars(length(min = 1, max = 256))]
    pub schedule: String,

    /// The IANA time zone `schedule` and the retention buckets are read in (`Europe/Berlin`,
    /// `America/New_York`, `UTC`). Default `UTC`; never the controller's local zone. A local time
    /// skipped by a daylight-saving change runs at the first instant after the gap; a local time
    /// that happens twice runs once, at its first occurrence.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    pub time_zone: String,

    /// Stops taking new snapshots (retention still applies). Due runs while suspended are not
    /// taken later.
    #[serde(default)]
    pub suspend: bool,

    /// A due run that could not start within this many seconds of its time (the controller was
    /// down, or suspended) is not taken, and is counted in `status.missedRuns`. Unset: the newest
    /// missed run is taken however late. After downtime at most one run is caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub starting_deadline_seconds: Option<i64>,

    /// What the GroupSnapshots this schedule makes look like.
    #[serde(default)]
    pub template: GroupSnapshotTemplate,

    /// Which snapshots to keep; the others are deleted (like any GroupSnapshot, so each one's
    /// `deletionPolicy` decides what happens to the snapshots on the nodes). Unset: keep all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<SnapshotRetention>,
}

fn default_time_zone() -> String {
    "UTC".into()
}

/// The labels, annotations and spec of the GroupSnapshots a schedule makes.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotTemplate {
    /// Labels and annotations of each GroupSnapshot (tandem adds `tandem.dev/schedule` and
    /// `tandem.dev/scheduled-for`).
    #[serde(default)]
    pub metadata: TemplateMetadata,
    /// Spec fields of each GroupSnapshot; `groupName` comes from the schedule.
    #[serde(default)]
    pub spec: GroupSnapshotTemplateSpec,
}

/// Labels and annotations.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TemplateMetadata {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The GroupSnapshot spec fields a schedule sets.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotTemplateSpec {
    /// `Delete` (default): deleting a snapshot (also by retention) removes its member snapshots
    /// from the nodes. `Retain`: they are kept as standalone NodeSnapshots.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// `Run` (default): each run's snapshot runs the group's quiesce hooks around its cut.
    /// `Skip`: the scheduled snapshots are at most FilesystemFrozen.
    #[serde(default)]
    pub hooks: crate::api::HooksPolicy,
}

/// Which of a schedule's snapshots to keep. Each rule keeps some; a snapshot kept by any rule is
/// kept. Failed snapshots never count toward a rule. Pinned snapshots (annotation
/// `tandem.dev/retain: "true"`, or the source of an unfinished GroupRestore) and unfinished ones
/// are never deleted. A change applies to the snapshots that exist.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRetention {
    /// The newest N Ready snapshots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    /// The newest Ready snapshot of each of the last N hours (in `timeZone`) that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hourly: Option<u32>,
    /// The newest Ready snapshot of each of the last N days that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily: Option<u32>,
    /// The newest Ready snapshot of each of the last N ISO weeks that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weekly: Option<u32>,
    /// The newest Ready snapshot of each of the last N months that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly: Option<u32>,
    /// The newest Ready snapshot of each of the last N years that have one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yearly: Option<u32>,
    /// Snapshots older than this (by scheduled time) go, unless `minReady` keeps them: a number
    /// and a unit, summed (`90d`, `36h`, `1d12h`, `45m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(d|h|m|s))+$"), length(max = 32))]
    pub max_age: Option<String>,
    /// Never delete a Ready snapshot if fewer than this many Ready ones would remain (default 1):
    /// a run of failures never removes the last good snapshot.
    #[serde(default = "default_min_ready")]
    pub min_ready: u32,
    /// When the schedule is deleted, delete its snapshots too (except pinned ones). Default false:
    /// they stay.
    #[serde(default)]
    pub delete_snapshots_with_schedule: bool,
}

fn default_min_ready() -> u32 {
    1
}

/// What a schedule did and holds.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupSnapshotScheduleStatus {
    /// The `metadata.generation` this status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// When the next snapshot is due (unset while suspended or invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_run_time: Option<Time>,

    /// The newest due time handled: taken, skipped or missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<Time>,

    /// The scheduled time of the newest snapshot taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_time: Option<Time>,

    /// The newest snapshot taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run_snapshot: Option<String>,

    /// The unfinished snapshot of this schedule, if any (there is at most one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<String>,

    /// The newest Ready snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ready_snapshot: Option<String>,

    /// When the newest Ready snapshot became Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ready_time: Option<Time>,

    /// The newest finished snapshot whose outcome was counted (metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_finished_snapshot: Option<String>,

    /// Due runs not taken because they were later than `startingDeadlineSeconds`, or one of several
    /// missed while the controller was down (only the newest is caught up).
    #[serde(default)]
    pub missed_runs: i64,

    /// Due runs not taken because a snapshot of this schedule was still unfinished.
    #[serde(default)]
    pub skipped_runs: i64,

    /// The snapshots of this schedule that exist.
    #[serde(default)]
    pub kept: KeptCounts,

    /// Snapshots retention deleted so far.
    #[serde(default)]
    pub retention_deleted: i64,

    /// What went wrong, in words a person can act on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// `Ready` (reasons `Scheduled`, `Suspended`, `InvalidSchedule`, `InvalidTimeZone`,
    /// `InvalidRetention`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// Counts of a schedule's snapshots.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeptCounts {
    /// Every snapshot of the schedule that is not being deleted.
    pub total: i32,
    /// Ready ones.
    pub ready: i32,
    /// Failed ones.
    pub failed: i32,
    /// Pinned ones (never deleted by retention).
    pub pinned: i32,
}
