//! The retention decision of a GroupSnapshotSchedule: which of its GroupSnapshots to keep.
//!
//! Pure: no I/O, no clock. The reconciler hands in the policy, the schedule's time zone, the
//! current time and the schedule's GroupSnapshots, and deletes the ones marked [`Verdict::Delete`]
//! through ordinary GroupSnapshot deletion.
//!
//! Semantics (README "Retention"):
//! - Only Ready snapshots are counted by `keepLast`, the buckets and `minReady`; a failed run
//!   never uses up a slot, so a run of failures never pushes out the last good snapshot.
//! - `keepLast: N` keeps the newest N Ready snapshots.
//! - `hourly`/`daily`/`weekly`/`monthly`/`yearly: N` keep the newest Ready snapshot of each of the
//!   newest N hours/days/ISO weeks/months/years *that have a Ready snapshot* (as restic and borg
//!   count), in the schedule's time zone. An hour is a clock hour at one UTC offset, so the hour
//!   repeated when the clocks go back is two buckets; a day is a calendar day, 23 or 25 hours long
//!   across a change.
//! - `maxAge` deletes bucket picks older than it; with no count rule at all it is the rule itself
//!   (keep what is younger). It never overrides `keepLast`, `minReady`, pins or unfinished runs.
//! - `minReady: N`: the newest N Ready snapshots are always kept, whatever the other rules say.
//! - No count rule and no `maxAge` (or only zeros): every Ready snapshot is kept.
//! - Failed snapshots are kept while they are among the newest `max(keepLast, minReady, 1)`
//!   finished runs (for inspection), and deleted after that.
//! - Pinned and unfinished snapshots are never deleted. A pinned Ready snapshot still counts as a
//!   Ready snapshot for the rules.
//!
//! The decision depends only on the set of candidates, not their order; it is stable (a newer
//! snapshot or a later `now` never brings back one it deleted) and idempotent (deciding again
//! after the deletions deletes nothing more), so one pass converges.

use std::collections::HashSet;
use std::fmt;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, Zoned};

/// `spec.retention` of a schedule, as the decision reads it. `None` and `Some(0)` are the same: no
/// such rule.
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

impl RetentionPolicy {
    fn count(rule: Option<u32>) -> usize {
        rule.map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
    }

    fn buckets(&self) -> impl Iterator<Item = (Period, usize)> + '_ {
        [
            (Period::Hourly, self.hourly),
            (Period::Daily, self.daily),
            (Period::Weekly, self.weekly),
            (Period::Monthly, self.monthly),
            (Period::Yearly, self.yearly),
        ]
        .into_iter()
        .map(|(period, rule)| (period, Self::count(rule)))
        .filter(|(_, n)| *n > 0)
    }

    fn has_count_rule(&self) -> bool {
        Self::count(self.keep_last) > 0 || self.buckets().next().is_some()
    }

    /// The rules that are set, as a person writes them: `keepLast 3, daily 7, maxAge 30d`.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.keep_last.filter(|n| *n > 0) {
            parts.push(format!("keepLast {n}"));
        }
        for (period, n) in self.buckets() {
            parts.push(format!("{period} {n}"));
        }
        if let Some(max) = self.max_age {
            parts.push(format!("maxAge {max:#}"));
        }
        if self.min_ready > 0 {
            parts.push(format!("minReady {}", self.min_ready));
        }
        if parts.is_empty() {
            "no rules".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

/// One GroupSnapshot of the schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub name: String,
    /// The scheduled time of the run that made it (not its creation time).
    pub scheduled: Timestamp,
    pub ready: bool,
    /// Ready or Failed. A candidate that is not finished is unfinished whatever `ready` says.
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

    pub fn is_delete(&self) -> bool {
        matches!(self, Verdict::Delete(_))
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Keep(reason) => write!(f, "kept: {reason}"),
            Verdict::Delete(reason) => write!(f, "deleted: {reason}"),
        }
    }
}

/// A calendar bucket of the GFS rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    /// The bucket of `at`, as a label that names it (also its identity).
    fn bucket(self, at: &Zoned) -> String {
        match self {
            // The offset makes the repeated hour of a fall-back change two buckets.
            Period::Hourly => at.strftime("%Y-%m-%d %H:00%:z").to_string(),
            Period::Daily => at.strftime("%Y-%m-%d").to_string(),
            Period::Weekly => {
                let week = at.date().iso_week_date();
                format!("{:04}-W{:02}", week.year(), week.week())
            }
            Period::Monthly => at.strftime("%Y-%m").to_string(),
            Period::Yearly => at.strftime("%Y").to_string(),
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Period::Hourly => "hour",
            Period::Daily => "day",
            Period::Weekly => "ISO week",
            Period::Monthly => "month",
            Period::Yearly => "year",
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        })
    }
}

/// Why a GroupSnapshot is kept. Ranks count from 1 (the newest).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeepReason {
    /// Still running: never deleted.
    Unfinished,
    /// Pinned (annotation, or used by a restore): never deleted.
    Pinned,
    /// One of the newest `of` Ready snapshots.
    KeepLast { rank: usize, of: u32 },
    /// The newest Ready snapshot of its bucket, the `rank`th newest bucket of `of`.
    Bucket {
        period: Period,
        bucket: String,
        rank: usize,
        of: u32,
    },
    /// No count rule: younger than maxAge.
    WithinMaxAge {
        age: SignedDuration,
        max: SignedDuration,
    },
    /// No retention rule at all: every Ready snapshot is kept.
    NoRules,
    /// Only minReady keeps it: one of the newest `min` Ready snapshots.
    MinReady { rank: usize, min: u32 },
    /// A failed run among the newest `window` finished runs, kept for inspection.
    RecentFailure { rank: usize, window: usize },
}

impl fmt::Display for KeepReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeepReason::Unfinished => {
                f.write_str("still running; unfinished snapshots are never deleted")
            }
            KeepReason::Pinned => f.write_str("pinned; pinned snapshots are never deleted"),
            KeepReason::KeepLast { rank, of } => {
                write!(f, "keepLast {of}: Ready snapshot {rank} of the newest {of}")
            }
            KeepReason::Bucket {
                period,
                bucket,
                rank,
                of,
            } => write!(
                f,
                "{period} {of}: the newest Ready snapshot of {unit} {bucket} ({unit} {rank} of {of})",
                unit = period.unit()
            ),
            KeepReason::WithinMaxAge { age, max } => {
                write!(f, "younger than maxAge {max:#} (age {age:#})")
            }
            KeepReason::NoRules => {
                f.write_str("no retention rule is set; every Ready snapshot is kept")
            }
            KeepReason::MinReady { rank, min } => write!(
                f,
                "minReady {min}: Ready snapshot {rank} of the newest {min}, kept whatever the other rules say"
            ),
            KeepReason::RecentFailure { rank, window } => write!(
                f,
                "failed, kept for inspection: run {rank} of the newest {window} finished runs"
            ),
        }
    }
}

/// Why a GroupSnapshot is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeleteReason {
    /// No rule keeps it; `rules` is the policy's summary.
    NotRetained { rules: String },
    /// A rule would keep it, but it is older than maxAge.
    OlderThanMaxAge {
        age: SignedDuration,
        max: SignedDuration,
    },
    /// A failed run older than the newest `window` finished runs.
    FailedBeyondHistory { window: usize },
}

impl fmt::Display for DeleteReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeleteReason::NotRetained { rules } => {
                write!(f, "no retention rule keeps it ({rules})")
            }
            DeleteReason::OlderThanMaxAge { age, max } => {
                write!(f, "older than maxAge {max:#} (age {age:#})")
            }
            DeleteReason::FailedBeyondHistory { window } => {
                write!(f, "failed, and not among the newest {window} finished runs")
            }
        }
    }
}

/// Decides every candidate's fate. The result lists every candidate once, newest first (ties by
/// name), whatever the order of `candidates`.
pub fn decide(
    policy: &RetentionPolicy,
    zone: &TimeZone,
    now: Timestamp,
    candidates: &[Candidate],
) -> Vec<(String, Verdict)> {
    let mut order: Vec<&Candidate> = candidates.iter().collect();
    order.sort_by(|a, b| {
        b.scheduled
            .cmp(&a.scheduled)
            .then_with(|| a.name.cmp(&b.name))
            .then_with(|| (a.finished, a.ready, a.pinned).cmp(&(b.finished, b.ready, b.pinned)))
    });

    let is_ready = |c: &Candidate| c.finished && c.ready;
    let ready: Vec<usize> = (0..order.len()).filter(|&i| is_ready(order[i])).collect();

    // Per position in `order`: the reasons the rules give a Ready snapshot.
    let mut keep_last: Vec<Option<KeepReason>> = vec![None; order.len()];
    let mut bucket: Vec<Option<KeepReason>> = vec![None; order.len()];
    let mut min_ready: Vec<Option<KeepReason>> = vec![None; order.len()];

    let last = RetentionPolicy::count(policy.keep_last);
    let floor = RetentionPolicy::count(Some(policy.min_ready));
    for (rank, &i) in ready.iter().enumerate() {
        if rank < last {
            keep_last[i] = Some(KeepReason::KeepLast {
                rank: rank + 1,
                of: policy.keep_last.unwrap_or(0),
            });
        }
        if rank < floor {
            min_ready[i] = Some(KeepReason::MinReady {
                rank: rank + 1,
                min: policy.min_ready,
            });
        }
    }

    // Coarsest period first, so a snapshot that is the pick of several says the longest-lived.
    let zoned: Vec<Zoned> = order
        .iter()
        .map(|c| c.scheduled.to_zoned(zone.clone()))
        .collect();
    let mut periods: Vec<(Period, usize)> = policy.buckets().collect();
    periods.reverse();
    for (period, n) in periods {
        let of = u32::try_from(n).unwrap_or(u32::MAX);
        let mut seen = HashSet::new();
        for &i in &ready {
            if seen.len() >= n {
                break;
            }
            let label = period.bucket(&zoned[i]);
            if seen.insert(label.clone()) && bucket[i].is_none() {
                bucket[i] = Some(KeepReason::Bucket {
                    period,
                    bucket: label,
                    rank: seen.len(),
                    of,
                });
            }
        }
    }

    let count_rules = policy.has_count_rule();
    let window = last.max(floor).max(1);
    let mut finished_rank = 0usize;

    order
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let verdict = if !c.finished {
                Verdict::Keep(KeepReason::Unfinished)
            } else if !c.ready {
                finished_rank += 1;
                if c.pinned {
                    Verdict::Keep(KeepReason::Pinned)
                } else if finished_rank <= window {
                    Verdict::Keep(KeepReason::RecentFailure {
                        rank: finished_rank,
                        window,
                    })
                } else {
                    Verdict::Delete(DeleteReason::FailedBeyondHistory { window })
                }
            } else {
                finished_rank += 1;
                let age = now.duration_since(c.scheduled);
                let too_old = policy.max_age.filter(|max| age > *max).map(|max| {
                    DeleteReason::OlderThanMaxAge {
                        age: SignedDuration::from_secs(age.as_secs()),
                        max,
                    }
                });
                let by_rule = if count_rules {
                    bucket[i].clone()
                } else {
                    Some(match policy.max_age {
                        Some(max) => KeepReason::WithinMaxAge {
                            age: SignedDuration::from_secs(age.as_secs()),
                            max,
                        },
                        None => KeepReason::NoRules,
                    })
                };
                if c.pinned {
                    Verdict::Keep(KeepReason::Pinned)
                } else if let Some(reason) = keep_last[i].clone() {
                    Verdict::Keep(reason)
                } else if let (Some(reason), None) = (&by_rule, &too_old) {
                    Verdict::Keep(reason.clone())
                } else if let Some(reason) = min_ready[i].clone() {
                    Verdict::Keep(reason)
                } else if let (Some(_), Some(old)) = (by_rule, too_old) {
                    Verdict::Delete(old)
                } else {
                    Verdict::Delete(DeleteReason::NotRetained {
                        rules: policy.summary(),
                    })
                }
            };
            (c.name.clone(), verdict)
        })
        .collect()
}
