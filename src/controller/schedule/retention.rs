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

#[cfg(test)]
mod tests {
    use super::*;
    use jiff::tz::TimeZoneDatabase;
    use proptest::prelude::*;

    /// From the tzdb bundled into the binary (feature `tzdb-bundle-always`), never the host's.
    fn zone(name: &str) -> TimeZone {
        TimeZoneDatabase::bundled()
            .get(name)
            .expect("the bundled tzdb has the zone")
    }

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("a timestamp with an offset")
    }

    /// A candidate named after its scheduled time as the zone's clock shows it.
    fn at(zone: &TimeZone, t: Timestamp, ready: bool, finished: bool) -> Candidate {
        Candidate {
            name: t
                .to_zoned(zone.clone())
                .strftime("%Y-%m-%dT%H:%M%:z")
                .to_string(),
            scheduled: t,
            ready,
            finished,
            pinned: false,
        }
    }

    fn ready(zone: &TimeZone, t: Timestamp) -> Candidate {
        at(zone, t, true, true)
    }

    fn failed(zone: &TimeZone, t: Timestamp) -> Candidate {
        at(zone, t, false, true)
    }

    /// `count` Ready runs `step` apart from `start`.
    fn series(
        zone: &TimeZone,
        start: Timestamp,
        step: SignedDuration,
        count: i32,
    ) -> Vec<Candidate> {
        (0..count).map(|i| ready(zone, start + step * i)).collect()
    }

    fn kept(verdicts: &[(String, Verdict)]) -> Vec<&str> {
        verdicts
            .iter()
            .filter(|(_, v)| v.is_keep())
            .map(|(n, _)| n.as_str())
            .collect()
    }

    fn verdict<'a>(verdicts: &'a [(String, Verdict)], name: &str) -> &'a Verdict {
        &verdicts
            .iter()
            .find(|(n, _)| n == name)
            .expect("every candidate has a verdict")
            .1
    }

    fn bucket_label(v: &Verdict) -> Option<&str> {
        match v {
            Verdict::Keep(KeepReason::Bucket { bucket, .. }) => Some(bucket),
            _ => None,
        }
    }

    const HOUR: SignedDuration = SignedDuration::from_hours(1);
    const DAY: SignedDuration = SignedDuration::from_hours(24);

    #[test]
    fn bundled_tzdb_serves_the_zones_without_the_host() {
        let db = TimeZoneDatabase::bundled();
        assert!(
            !db.is_definitively_empty(),
            "jiff feature tzdb-bundle-always is off"
        );
        let berlin = zone("Europe/Berlin");
        let summer = ts("2026-07-01T12:00:00Z").to_zoned(berlin.clone());
        let winter = ts("2026-01-01T12:00:00Z").to_zoned(berlin);
        assert_eq!(summer.offset().seconds(), 2 * 3600);
        assert_eq!(winter.offset().seconds(), 3600);
        for name in ["America/New_York", "Australia/Lord_Howe", "UTC"] {
            assert!(db.get(name).is_ok(), "{name}");
        }
    }

    #[test]
    fn berlin_fall_back_repeated_hour_is_two_hourly_buckets() {
        let berlin = zone("Europe/Berlin");
        // 00:00 CEST on 2026-10-25, every 30 minutes; clocks go from 03:00 CEST to 02:00 CET.
        let snaps = series(&berlin, ts("2026-10-24T22:00:00Z"), HOUR / 2, 9);
        let names: Vec<&str> = snaps.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names[4..],
            [
                "2026-10-25T02:00+02:00",
                "2026-10-25T02:30+02:00",
                "2026-10-25T02:00+01:00",
                "2026-10-25T02:30+01:00",
                "2026-10-25T03:00+01:00",
            ]
        );
        let policy = RetentionPolicy {
            hourly: Some(4),
            ..Default::default()
        };
        let v = decide(&policy, &berlin, ts("2026-10-25T02:10:00Z"), &snaps);
        assert_eq!(
            kept(&v),
            [
                "2026-10-25T03:00+01:00",
                "2026-10-25T02:30+01:00",
                "2026-10-25T02:30+02:00",
                "2026-10-25T01:30+02:00",
            ]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2026-10-25T02:30+02:00")),
            Some("2026-10-25 02:00+02:00")
        );
        assert_eq!(
            verdict(&v, "2026-10-25T02:00+01:00"),
            &Verdict::Delete(DeleteReason::NotRetained {
                rules: "hourly 4".into()
            })
        );
    }

    #[test]
    fn berlin_days_of_23_and_25_hours_are_one_day_each() {
        let berlin = zone("Europe/Berlin");
        let daily = RetentionPolicy {
            daily: Some(3),
            ..Default::default()
        };
        // Hourly runs from 00:00 CET on 2026-03-28 to 23:00 CEST on 2026-03-30.
        let spring = series(&berlin, ts("2026-03-27T23:00:00Z"), HOUR, 71);
        assert_eq!(
            spring
                .iter()
                .filter(|c| c.name.starts_with("2026-03-29T"))
                .count(),
            23
        );
        assert_eq!(
            spring.last().map(|c| c.name.as_str()),
            Some("2026-03-30T23:00+02:00")
        );
        let v = decide(&daily, &berlin, ts("2026-03-31T00:00:00Z"), &spring);
        assert_eq!(
            kept(&v),
            [
                "2026-03-30T23:00+02:00",
                "2026-03-29T23:00+02:00",
                "2026-03-28T23:00+01:00"
            ]
        );

        // Hourly runs from 00:00 CEST on 2026-10-24 to 23:00 CET on 2026-10-26.
        let autumn = series(&berlin, ts("2026-10-23T22:00:00Z"), HOUR, 73);
        assert_eq!(
            autumn
                .iter()
                .filter(|c| c.name.starts_with("2026-10-25T"))
                .count(),
            25
        );
        assert_eq!(
            autumn.last().map(|c| c.name.as_str()),
            Some("2026-10-26T23:00+01:00")
        );
        let v = decide(&daily, &berlin, ts("2026-10-27T00:00:00Z"), &autumn);
        assert_eq!(
            kept(&v),
            [
                "2026-10-26T23:00+01:00",
                "2026-10-25T23:00+01:00",
                "2026-10-24T23:00+02:00"
            ]
        );
    }

    #[test]
    fn new_york_days_and_hours_are_the_zones_not_utcs() {
        let ny = zone("America/New_York");
        let snaps: Vec<Candidate> = [
            "2026-11-01T03:30:00Z", // Oct 31 23:30 EDT
            "2026-11-01T05:30:00Z", // Nov 1 01:30 EDT
            "2026-11-01T06:30:00Z", // Nov 1 01:30 EST: the repeated hour
            "2026-11-02T03:30:00Z", // Nov 1 22:30 EST
            "2026-11-02T04:30:00Z", // Nov 1 23:30 EST
            "2026-11-02T05:30:00Z", // Nov 2 00:30 EST
        ]
        .into_iter()
        .map(|t| ready(&ny, ts(t)))
        .collect();
        let now = ts("2026-11-02T06:00:00Z");
        let v = decide(
            &RetentionPolicy {
                daily: Some(10),
                ..Default::default()
            },
            &ny,
            now,
            &snaps,
        );
        // In UTC the last three would be one day and the first two another.
        assert_eq!(
            kept(&v),
            [
                "2026-11-02T00:30-05:00",
                "2026-11-01T23:30-05:00",
                "2026-10-31T23:30-04:00"
            ]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2026-11-01T23:30-05:00")),
            Some("2026-11-01")
        );

        let v = decide(
            &RetentionPolicy {
                hourly: Some(10),
                ..Default::default()
            },
            &ny,
            now,
            &snaps,
        );
        assert_eq!(kept(&v).len(), 6);
        assert_eq!(
            bucket_label(verdict(&v, "2026-11-01T01:30-04:00")),
            Some("2026-11-01 01:00-04:00")
        );
        assert_eq!(
            bucket_label(verdict(&v, "2026-11-01T01:30-05:00")),
            Some("2026-11-01 01:00-05:00")
        );

        // Spring forward: 02:00 EST becomes 03:00 EDT; 01:xx and 03:xx are consecutive hours.
        let spring = series(&ny, ts("2026-03-08T06:30:00Z"), HOUR / 2, 4);
        let v = decide(
            &RetentionPolicy {
                hourly: Some(2),
                ..Default::default()
            },
            &ny,
            ts("2026-03-08T08:30:00Z"),
            &spring,
        );
        assert_eq!(
            kept(&v),
            ["2026-03-08T04:00-04:00", "2026-03-08T03:30-04:00"]
        );
        let v = decide(
            &RetentionPolicy {
                hourly: Some(3),
                ..Default::default()
            },
            &ny,
            ts("2026-03-08T08:30:00Z"),
            &spring,
        );
        assert_eq!(
            kept(&v),
            [
                "2026-03-08T04:00-04:00",
                "2026-03-08T03:30-04:00",
                "2026-03-08T01:30-05:00"
            ]
        );
    }

    #[test]
    fn lord_howe_half_hour_fall_back_is_two_hourly_buckets() {
        let lh = zone("Australia/Lord_Howe");
        // 02:00 +11:00 on 2026-04-05 becomes 01:30 +10:30.
        let snaps = series(&lh, ts("2026-04-04T14:30:00Z"), HOUR / 4, 5);
        let names: Vec<&str> = snaps.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "2026-04-05T01:30+11:00",
                "2026-04-05T01:45+11:00",
                "2026-04-05T01:30+10:30",
                "2026-04-05T01:45+10:30",
                "2026-04-05T02:00+10:30",
            ]
        );
        let v = decide(
            &RetentionPolicy {
                hourly: Some(3),
                ..Default::default()
            },
            &lh,
            ts("2026-04-04T16:00:00Z"),
            &snaps,
        );
        assert_eq!(
            kept(&v),
            [
                "2026-04-05T02:00+10:30",
                "2026-04-05T01:45+10:30",
                "2026-04-05T01:45+11:00"
            ]
        );
    }

    #[test]
    fn iso_week_53_spans_the_new_year() {
        let berlin = zone("Europe/Berlin");
        // Noon every day from 2026-12-20 (Sunday of 2026-W51) to 2027-01-10 (Sunday of 2027-W01).
        let snaps = series(&berlin, ts("2026-12-20T11:00:00Z"), DAY, 22);
        let v = decide(
            &RetentionPolicy {
                weekly: Some(4),
                ..Default::default()
            },
            &berlin,
            ts("2027-01-11T00:00:00Z"),
            &snaps,
        );
        assert_eq!(
            kept(&v),
            [
                "2027-01-10T12:00+01:00",
                "2027-01-03T12:00+01:00",
                "2026-12-27T12:00+01:00",
                "2026-12-20T12:00+01:00",
            ]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2027-01-03T12:00+01:00")),
            Some("2026-W53")
        );
        assert_eq!(
            bucket_label(verdict(&v, "2027-01-10T12:00+01:00")),
            Some("2027-W01")
        );

        // 2020 has a week 53 too: Monday 2020-12-28 to Sunday 2021-01-03.
        let utc = TimeZone::UTC;
        let snaps: Vec<Candidate> = [
            "2020-12-27",
            "2020-12-28",
            "2021-01-01",
            "2021-01-03",
            "2021-01-04",
        ]
        .into_iter()
        .map(|d| ready(&utc, ts(&format!("{d}T06:00:00Z"))))
        .collect();
        let v = decide(
            &RetentionPolicy {
                weekly: Some(3),
                ..Default::default()
            },
            &utc,
            ts("2021-01-05T00:00:00Z"),
            &snaps,
        );
        assert_eq!(
            kept(&v),
            [
                "2021-01-04T06:00+00:00",
                "2021-01-03T06:00+00:00",
                "2020-12-27T06:00+00:00"
            ]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2021-01-03T06:00+00:00")),
            Some("2020-W53")
        );
        assert_eq!(
            bucket_label(verdict(&v, "2020-12-27T06:00+00:00")),
            Some("2020-W52")
        );
    }

    #[test]
    fn new_year_is_the_zones_new_year() {
        let berlin = zone("Europe/Berlin");
        let snaps = vec![
            ready(&berlin, ts("2026-12-31T22:00:00Z")), // 23:00 in Berlin: 2026
            ready(&berlin, ts("2026-12-31T22:30:00Z")), // 23:30 in Berlin: 2026
            ready(&berlin, ts("2026-12-31T23:30:00Z")), // 00:30 in Berlin: 2027
        ];
        let v = decide(
            &RetentionPolicy {
                yearly: Some(5),
                ..Default::default()
            },
            &berlin,
            ts("2027-01-01T00:00:00Z"),
            &snaps,
        );
        assert_eq!(
            kept(&v),
            ["2027-01-01T00:30+01:00", "2026-12-31T23:30+01:00"]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2026-12-31T23:30+01:00")),
            Some("2026")
        );
    }

    #[test]
    fn month_ends_and_leap_day_in_new_york() {
        let ny = zone("America/New_York");
        // 23:30 every evening in New York (04:30 UTC the next day), 2028-01-29 to 2028-03-02.
        let snaps = series(&ny, ts("2028-01-30T04:30:00Z"), DAY, 34);
        assert_eq!(
            snaps.last().map(|c| c.name.as_str()),
            Some("2028-03-02T23:30-05:00")
        );
        let v = decide(
            &RetentionPolicy {
                monthly: Some(3),
                ..Default::default()
            },
            &ny,
            ts("2028-03-04T00:00:00Z"),
            &snaps,
        );
        assert_eq!(
            kept(&v),
            [
                "2028-03-02T23:30-05:00",
                "2028-02-29T23:30-05:00",
                "2028-01-31T23:30-05:00"
            ]
        );
        assert_eq!(
            bucket_label(verdict(&v, "2028-02-29T23:30-05:00")),
            Some("2028-02")
        );

        // Not a leap year: February ends on the 28th.
        let snaps = series(&ny, ts("2027-02-27T04:30:00Z"), DAY, 4);
        let v = decide(
            &RetentionPolicy {
                monthly: Some(2),
                daily: Some(1),
                ..Default::default()
            },
            &ny,
            ts("2027-03-04T00:00:00Z"),
            &snaps,
        );
        assert_eq!(snaps[0].name, "2027-02-26T23:30-05:00");
        assert_eq!(
            kept(&v),
            ["2027-03-01T23:30-05:00", "2027-02-28T23:30-05:00"]
        );
        // The coarsest rule names a snapshot that several keep.
        assert_eq!(
            bucket_label(verdict(&v, "2027-03-01T23:30-05:00")),
            Some("2027-03")
        );
    }

    /// 24 Ready hourly runs on 2026-06-01, then 48 failed ones; `now` is half an hour after the last.
    fn failure_streak() -> (Vec<Candidate>, Timestamp) {
        let utc = TimeZone::UTC;
        let start = ts("2026-06-01T00:00:00Z");
        let mut snaps = series(&utc, start, HOUR, 24);
        snaps.extend((24..72).map(|i| failed(&utc, start + HOUR * i)));
        (snaps, start + HOUR * 71 + HOUR / 2)
    }

    #[test]
    fn all_recent_runs_failed_keeps_the_last_good_ones() {
        let (snaps, now) = failure_streak();
        let policy = RetentionPolicy {
            hourly: Some(24),
            max_age: Some(DAY),
            min_ready: 2,
            ..Default::default()
        };
        let v = decide(&policy, &TimeZone::UTC, now, &snaps);
        assert_eq!(
            kept(&v),
            [
                "2026-06-03T23:00+00:00",
                "2026-06-03T22:00+00:00",
                "2026-06-01T23:00+00:00",
                "2026-06-01T22:00+00:00",
            ]
        );
        assert_eq!(
            verdict(&v, "2026-06-01T23:00+00:00"),
            &Verdict::Keep(KeepReason::MinReady { rank: 1, min: 2 })
        );
        assert_eq!(
            verdict(&v, "2026-06-03T22:00+00:00"),
            &Verdict::Keep(KeepReason::RecentFailure { rank: 2, window: 2 })
        );
        assert_eq!(
            verdict(&v, "2026-06-03T21:00+00:00"),
            &Verdict::Delete(DeleteReason::FailedBeyondHistory { window: 2 })
        );
        assert_eq!(
            verdict(&v, "2026-06-01T21:00+00:00"),
            &Verdict::Delete(DeleteReason::OlderThanMaxAge {
                age: SignedDuration::from_mins(50 * 60 + 30),
                max: DAY,
            })
        );

        // keepLast counts Ready snapshots only, and widens the failed history to 3 runs.
        let policy = RetentionPolicy {
            keep_last: Some(3),
            ..policy
        };
        let v = decide(&policy, &TimeZone::UTC, now, &snaps);
        assert_eq!(
            kept(&v),
            [
                "2026-06-03T23:00+00:00",
                "2026-06-03T22:00+00:00",
                "2026-06-03T21:00+00:00",
                "2026-06-01T23:00+00:00",
                "2026-06-01T22:00+00:00",
                "2026-06-01T21:00+00:00",
            ]
        );
        assert_eq!(
            verdict(&v, "2026-06-01T21:00+00:00"),
            &Verdict::Keep(KeepReason::KeepLast { rank: 3, of: 3 })
        );

        // minReady 0 and no keepLast: maxAge may take every Ready snapshot; that is what was asked.
        let policy = RetentionPolicy {
            keep_last: None,
            min_ready: 0,
            ..policy
        };
        let v = decide(&policy, &TimeZone::UTC, now, &snaps);
        assert_eq!(kept(&v), ["2026-06-03T23:00+00:00"]);
    }

    #[test]
    fn pinned_are_never_deleted() {
        let utc = TimeZone::UTC;
        let pin = |mut c: Candidate| {
            c.pinned = true;
            c
        };
        let snaps = vec![
            pin(ready(&utc, ts("2025-01-01T00:00:00Z"))),
            ready(&utc, ts("2025-01-02T00:00:00Z")),
            pin(failed(&utc, ts("2025-01-03T00:00:00Z"))),
            failed(&utc, ts("2025-01-04T00:00:00Z")),
            ready(&utc, ts("2026-01-01T00:00:00Z")),
        ];
        let policy = RetentionPolicy {
            keep_last: Some(1),
            max_age: Some(DAY),
            ..Default::default()
        };
        let v = decide(&policy, &utc, ts("2026-01-01T01:00:00Z"), &snaps);
        assert_eq!(
            v,
            [
                (
                    "2026-01-01T00:00+00:00".to_owned(),
                    Verdict::Keep(KeepReason::KeepLast { rank: 1, of: 1 })
                ),
                (
                    "2025-01-04T00:00+00:00".to_owned(),
                    Verdict::Delete(DeleteReason::FailedBeyondHistory { window: 1 })
                ),
                (
                    "2025-01-03T00:00+00:00".to_owned(),
                    Verdict::Keep(KeepReason::Pinned)
                ),
                (
                    "2025-01-02T00:00+00:00".to_owned(),
                    Verdict::Delete(DeleteReason::NotRetained {
                        rules: "keepLast 1, maxAge 24h".into()
                    })
                ),
                (
                    "2025-01-01T00:00+00:00".to_owned(),
                    Verdict::Keep(KeepReason::Pinned)
                ),
            ]
        );
    }

    #[test]
    fn unfinished_are_kept_and_not_counted() {
        let utc = TimeZone::UTC;
        let snaps = vec![
            at(&utc, ts("2026-01-01T00:00:00Z"), false, false), // an old run that never finished
            at(&utc, ts("2026-01-01T01:00:00Z"), true, false),  // says ready, not finished
            ready(&utc, ts("2026-01-01T02:00:00Z")),
            ready(&utc, ts("2026-01-01T03:00:00Z")),
            at(&utc, ts("2026-01-01T04:00:00Z"), false, false), // running now
        ];
        let policy = RetentionPolicy {
            keep_last: Some(1),
            max_age: Some(HOUR),
            ..Default::default()
        };
        let v = decide(&policy, &utc, ts("2026-02-01T00:00:00Z"), &snaps);
        assert_eq!(
            kept(&v),
            [
                "2026-01-01T04:00+00:00",
                "2026-01-01T03:00+00:00",
                "2026-01-01T01:00+00:00",
                "2026-01-01T00:00+00:00",
            ]
        );
        assert_eq!(
            verdict(&v, "2026-01-01T01:00+00:00"),
            &Verdict::Keep(KeepReason::Unfinished)
        );
    }

    #[test]
    fn max_age_alone_with_min_ready() {
        let utc = TimeZone::UTC;
        let now = ts("2026-05-10T00:00:00Z");
        let aged = |hours: &[i64]| -> Vec<Candidate> {
            hours
                .iter()
                .map(|h| ready(&utc, now - SignedDuration::from_hours(*h)))
                .collect()
        };
        let policy = RetentionPolicy {
            max_age: Some(DAY),
            min_ready: 1,
            ..Default::default()
        };
        let v = decide(&policy, &utc, now, &aged(&[10, 20, 30, 40]));
        assert_eq!(
            kept(&v),
            ["2026-05-09T14:00+00:00", "2026-05-09T04:00+00:00"]
        );
        assert_eq!(
            verdict(&v, "2026-05-09T14:00+00:00"),
            &Verdict::Keep(KeepReason::WithinMaxAge {
                age: SignedDuration::from_hours(10),
                max: DAY
            })
        );
        assert_eq!(
            verdict(&v, "2026-05-08T18:00+00:00"),
            &Verdict::Delete(DeleteReason::OlderThanMaxAge {
                age: SignedDuration::from_hours(30),
                max: DAY
            })
        );

        // Everything is older than maxAge: minReady keeps the newest.
        let v = decide(&policy, &utc, now, &aged(&[30, 40, 50]));
        assert_eq!(kept(&v), ["2026-05-08T18:00+00:00"]);
        assert_eq!(
            verdict(&v, "2026-05-08T18:00+00:00"),
            &Verdict::Keep(KeepReason::MinReady { rank: 1, min: 1 })
        );
        let v = decide(
            &RetentionPolicy {
                min_ready: 0,
                ..policy
            },
            &utc,
            now,
            &aged(&[30, 40, 50]),
        );
        assert!(kept(&v).is_empty());
    }

    #[test]
    fn max_age_never_overrides_keep_last() {
        let utc = TimeZone::UTC;
        let snaps = series(&utc, ts("2026-01-01T00:00:00Z"), DAY, 5);
        let policy = RetentionPolicy {
            keep_last: Some(2),
            daily: Some(4),
            max_age: Some(HOUR),
            ..Default::default()
        };
        let v = decide(&policy, &utc, ts("2026-03-01T00:00:00Z"), &snaps);
        assert_eq!(
            kept(&v),
            ["2026-01-05T00:00+00:00", "2026-01-04T00:00+00:00"]
        );
        assert!(matches!(
            verdict(&v, "2026-01-03T00:00+00:00"),
            Verdict::Delete(DeleteReason::OlderThanMaxAge { .. })
        ));
        assert!(matches!(
            verdict(&v, "2026-01-01T00:00+00:00"),
            Verdict::Delete(DeleteReason::NotRetained { .. })
        ));
    }

    #[test]
    fn no_rules_keeps_every_ready_and_the_newest_failure() {
        let utc = TimeZone::UTC;
        let mut snaps = series(&utc, ts("2020-01-01T00:00:00Z"), DAY * 100, 10);
        snaps.push(failed(&utc, ts("2019-01-01T00:00:00Z")));
        snaps.push(failed(&utc, ts("2023-01-01T00:00:00Z")));
        for policy in [
            RetentionPolicy::default(),
            RetentionPolicy {
                keep_last: Some(0),
                yearly: Some(0),
                ..Default::default()
            },
        ] {
            let v = decide(&policy, &utc, ts("2026-01-01T00:00:00Z"), &snaps);
            assert_eq!(kept(&v).len(), 11, "{policy:?}");
            assert_eq!(
                verdict(&v, "2020-01-01T00:00+00:00"),
                &Verdict::Keep(KeepReason::NoRules)
            );
            assert_eq!(
                verdict(&v, "2019-01-01T00:00+00:00"),
                &Verdict::Delete(DeleteReason::FailedBeyondHistory { window: 1 })
            );
        }
    }

    #[test]
    fn reasons_read_well() {
        let cases: [(Verdict, &str); 6] = [
            (
                Verdict::Keep(KeepReason::Bucket {
                    period: Period::Weekly,
                    bucket: "2026-W53".into(),
                    rank: 2,
                    of: 4,
                }),
                "kept: weekly 4: the newest Ready snapshot of ISO week 2026-W53 (ISO week 2 of 4)",
            ),
            (
                Verdict::Keep(KeepReason::MinReady { rank: 1, min: 2 }),
                "kept: minReady 2: Ready snapshot 1 of the newest 2, kept whatever the other rules say",
            ),
            (
                Verdict::Keep(KeepReason::WithinMaxAge {
                    age: SignedDuration::from_mins(90),
                    max: DAY * 7,
                }),
                "kept: younger than maxAge 168h (age 1h 30m)",
            ),
            (
                Verdict::Delete(DeleteReason::OlderThanMaxAge {
                    age: SignedDuration::from_hours(30),
                    max: DAY,
                }),
                "deleted: older than maxAge 24h (age 30h)",
            ),
            (
                Verdict::Delete(DeleteReason::NotRetained {
                    rules: RetentionPolicy {
                        keep_last: Some(3),
                        hourly: Some(24),
                        weekly: Some(0),
                        max_age: Some(DAY * 30),
                        min_ready: 1,
                        ..Default::default()
                    }
                    .summary(),
                }),
                "deleted: no retention rule keeps it (keepLast 3, hourly 24, maxAge 720h, minReady 1)",
            ),
            (
                Verdict::Delete(DeleteReason::FailedBeyondHistory { window: 3 }),
                "deleted: failed, and not among the newest 3 finished runs",
            ),
        ];
        for (verdict, text) in cases {
            assert_eq!(verdict.to_string(), text);
        }
    }

    // ---- properties ----

    fn arb_zone() -> impl Strategy<Value = TimeZone> {
        prop_oneof![
            Just("UTC"),
            Just("Europe/Berlin"),
            Just("America/New_York"),
            Just("Australia/Lord_Howe"),
        ]
        .prop_map(zone)
    }

    fn arb_policy() -> impl Strategy<Value = RetentionPolicy> {
        let rule = || proptest::option::of(0u32..5);
        (
            rule(),
            rule(),
            rule(),
            rule(),
            rule(),
            rule(),
            proptest::option::of(0i64..3000),
            0u32..4,
        )
            .prop_map(
                |(keep_last, hourly, daily, weekly, monthly, yearly, max_age, min_ready)| {
                    RetentionPolicy {
                        keep_last,
                        hourly,
                        daily,
                        weekly,
                        monthly,
                        yearly,
                        max_age: max_age.map(SignedDuration::from_hours),
                        min_ready,
                    }
                },
            )
    }

    /// Around the DST changes of 2025-2027; a mix of runs spread over years and runs crowded into
    /// three days, so buckets both collide and spread.
    fn arb_candidates() -> impl Strategy<Value = Vec<Candidate>> {
        let minute = prop_oneof![0i64..(3 * 366 * 24 * 60), 0i64..(3 * 24 * 60)];
        proptest::collection::vec((minute, 0u8..10, proptest::bool::weighted(0.15)), 0..40)
            .prop_map(|runs| {
                let base = ts("2025-03-01T00:00:00Z");
                runs.into_iter()
                    .enumerate()
                    .map(|(i, (minute, state, pinned))| Candidate {
                        name: format!("run-{i}"),
                        scheduled: base + SignedDuration::from_mins(minute),
                        // 0..6 Ready, 6..8 Failed, 8 running, 9 running with a stale ready flag
                        ready: state < 6 || state == 9,
                        finished: state < 8,
                        pinned,
                    })
                    .collect()
            })
    }

    fn newest(candidates: &[Candidate]) -> Timestamp {
        candidates
            .iter()
            .map(|c| c.scheduled)
            .max()
            .unwrap_or(ts("2025-03-01T00:00:00Z"))
    }

    /// The case a property runs on: the policy, the zone, `now` after every run, the runs.
    fn arb_case() -> impl Strategy<Value = (RetentionPolicy, TimeZone, Timestamp, Vec<Candidate>)> {
        (
            arb_policy(),
            arb_zone(),
            arb_candidates(),
            0i64..(2000 * 60),
        )
            .prop_map(|(policy, zone, candidates, later)| {
                let now = newest(&candidates) + SignedDuration::from_mins(later);
                (policy, zone, now, candidates)
            })
    }

    fn is_ready(c: &Candidate) -> bool {
        c.finished && c.ready
    }

    fn deleted(verdicts: &[(String, Verdict)]) -> HashSet<String> {
        verdicts
            .iter()
            .filter(|(_, v)| v.is_delete())
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// The newest `min(minReady, #ready)` Ready candidates.
    fn floor(policy: &RetentionPolicy, candidates: &[Candidate]) -> Vec<String> {
        let mut ready: Vec<&Candidate> = candidates.iter().filter(|c| is_ready(c)).collect();
        ready.sort_by(|a, b| {
            b.scheduled
                .cmp(&a.scheduled)
                .then_with(|| a.name.cmp(&b.name))
        });
        ready
            .into_iter()
            .take(policy.min_ready as usize)
            .map(|c| c.name.clone())
            .collect()
    }

    fn check_invariants(
        policy: &RetentionPolicy,
        candidates: &[Candidate],
        verdicts: &[(String, Verdict)],
    ) -> Result<(), TestCaseError> {
        prop_assert_eq!(verdicts.len(), candidates.len());
        let gone = deleted(verdicts);
        for c in candidates {
            if c.pinned || !c.finished {
                prop_assert!(
                    !gone.contains(&c.name),
                    "{} is pinned or unfinished",
                    c.name
                );
            }
        }
        for name in floor(policy, candidates) {
            prop_assert!(!gone.contains(&name), "{} is within minReady", name);
        }
        let ready = candidates.iter().filter(|c| is_ready(c)).count();
        let ready_kept = candidates
            .iter()
            .filter(|c| is_ready(c) && !gone.contains(&c.name))
            .count();
        prop_assert!(ready_kept >= ready.min(policy.min_ready as usize));
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn pinned_unfinished_and_min_ready_are_kept((policy, zone, now, candidates) in arb_case()) {
            let v = decide(&policy, &zone, now, &candidates);
            check_invariants(&policy, &candidates, &v)?;
        }

        #[test]
        fn the_decision_does_not_depend_on_input_order(
            ((policy, zone, now, candidates), shuffled) in arb_case().prop_flat_map(|case| {
                let shuffled = Just(case.3.clone()).prop_shuffle();
                (Just(case), shuffled)
            })
        ) {
            prop_assert_eq!(
                decide(&policy, &zone, now, &candidates),
                decide(&policy, &zone, now, &shuffled)
            );
        }

        #[test]
        fn a_newer_ready_snapshot_keeps_min_ready_and_revives_nothing(
            (policy, zone, now, mut candidates) in arb_case(),
            after in 1i64..(200 * 60),
        ) {
            let before = decide(&policy, &zone, now, &candidates);
            let scheduled = newest(&candidates) + SignedDuration::from_mins(after);
            candidates.push(Candidate {
                name: "newer".into(),
                scheduled,
                ready: true,
                finished: true,
                pinned: false,
            });
            let now = now.max(scheduled);
            let after = decide(&policy, &zone, now, &candidates);
            check_invariants(&policy, &candidates, &after)?;
            // What was deleted stays deleted: acting on a verdict is never undone by the next.
            let gone = deleted(&after);
            for name in deleted(&before) {
                prop_assert!(gone.contains(&name), "{} came back", name);
            }
        }

        #[test]
        fn failed_or_unfinished_runs_never_change_a_ready_verdict(
            (policy, zone, now, mut candidates) in arb_case(),
            extra in proptest::collection::vec((0i64..(3 * 366 * 24 * 60), any::<bool>()), 1..10),
        ) {
            let before = decide(&policy, &zone, now, &candidates);
            let base = ts("2025-03-01T00:00:00Z");
            for (i, (minute, finished)) in extra.into_iter().enumerate() {
                candidates.push(Candidate {
                    name: format!("not-ready-{i}"),
                    scheduled: base + SignedDuration::from_mins(minute),
                    ready: false,
                    finished,
                    pinned: false,
                });
            }
            let after = decide(&policy, &zone, now, &candidates);
            for (name, verdict) in &before {
                let ready = candidates.iter().any(|c| &c.name == name && is_ready(c));
                if ready {
                    let again = after.iter().find(|(n, _)| n == name).map(|(_, v)| v);
                    prop_assert_eq!(Some(verdict), again, "{}", name);
                }
            }
        }

        #[test]
        fn time_passing_revives_nothing((policy, zone, now, candidates) in arb_case(), later in 0i64..(5000 * 60)) {
            let before = deleted(&decide(&policy, &zone, now, &candidates));
            let after = deleted(&decide(&policy, &zone, now + SignedDuration::from_mins(later), &candidates));
            prop_assert!(before.is_subset(&after));
        }

        #[test]
        fn deciding_again_after_the_deletions_deletes_nothing((policy, zone, now, candidates) in arb_case()) {
            let gone = deleted(&decide(&policy, &zone, now, &candidates));
            let rest: Vec<Candidate> = candidates.into_iter().filter(|c| !gone.contains(&c.name)).collect();
            let again = decide(&policy, &zone, now, &rest);
            prop_assert!(deleted(&again).is_empty(), "{:?}", again);
        }
    }
}
