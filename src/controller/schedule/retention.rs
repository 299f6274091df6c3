//! The retention decision of a GroupSnapshotSchedule: which of its GroupSnapshots to keep.
//!
//! Pure: no I/O, no clock. The reconciler hands in the policy, the schedule's time zone, the
//! current time and the schedule's GroupSnapshots, and deletes the ones marked [`Verdict::Delete`]
//! through ordinary GroupSnapshot deletion.

use std::fmt;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

/// `spec.retention` of a schedule, as the decision reads it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub keep_last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    pub max_age: Option<SignedDuration>,
    pub min_ready: u32,
}

/// One GroupSnapshot of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// The scheduled time of the run that made it (not its creation time).
    pub scheduled: Timestamp,
    pub ready: bool,
    /// Ready or Failed.
    pub finished: bool,
    pub pinned: bool,
}

/// What to do with one GroupSnapshot, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep(KeepReason),
    Delete(DeleteReason),
}

impl Verdict {
    pub fn is_keep(&self) -> bool {
        matches!(self, Verdict::Keep(_))
    }
}

/// Why a GroupSnapshot is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Still running: never deleted.
    Unfinished,
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Unfinished => f.write_str("unfinished: never deleted"),
        }
    }
}

/// Why a GroupSnapshot is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// No retention rule keeps it.
    NotRetained,
}

impl fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeleteReason::NotRetained => f.write_str("no retention rule keeps it"),
        }
    }
}

/// Decides every candidate's fate. Skeleton: keeps everything.
pub fn decide(
    _policy: &RetentionPolicy,
    _zone: &TimeZone,
    _now: Timestamp,
    candidates: &[Candidate],
) -> Vec<(String, Verdict)> {
    candidates
        .iter()
        .map(|c| (c.name.clone(), Verdict::Keep(KeepReason::Unfinished)))
        .collect()
}
