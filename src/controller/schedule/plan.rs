//! What one evaluation of a schedule does: which due time (if any) to take, skip or count as
//! missed, and when to look again. Pure: the reconciler hands in the clock's reading.

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp};

use super::cron::Cron;

/// How many due times one evaluation walks at most (`* * * * *` after a long outage); the rest
/// are not counted.
pub const MAX_WALK: u64 = 100_000;

/// The name of the GroupSnapshot of the run due at `scheduled`: `<schedule>-<yyyymmddhhmm>` in UTC,
/// so a restarted controller creating it again gets AlreadyExists, never a second snapshot.
pub fn snapshot_name(schedule: &str, scheduled: Timestamp) -> String {
    format!("{schedule}-{}", scheduled.strftime("%Y%m%d%H%M"))
}

/// What to do with the newest due time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunAction {
    /// Nothing is due.
    Idle,
    /// Take the snapshot of this due time.
    Take(Timestamp),
    /// A snapshot of this schedule is unfinished: this due time is skipped (and counted).
    Skip(Timestamp),
    /// This due time is past the starting deadline: missed (and counted).
    TooLate(Timestamp),
    /// Suspended: due times pass untaken and uncounted.
    Suspended,
}

/// The outcome of one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunPlan {
    pub action: RunAction,
    /// Due times before the newest one that were not taken (downtime): counted as missed.
    pub missed: u64,
    /// The newest due time now handled (the next evaluation starts after it).
    pub handled_up_to: Timestamp,
    /// The next due time after `now` (None while suspended, or if none ever comes).
    pub next: Option<Timestamp>,
}

/// What the schedule looks at.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    pub cron: &'a Cron,
    pub zone: &'a TimeZone,
    /// The newest due time already handled (from the status, the newest snapshot of the schedule
    /// or its creation).
    pub last: Timestamp,
    pub now: Timestamp,
    pub starting_deadline: Option<SignedDuration>,
    pub suspended: bool,
    /// A snapshot of this schedule (other than the one of the newest due time) is unfinished.
    pub unfinished: bool,
}

/// Decides one evaluation. Of several due times since `last` only the newest is taken (one
/// catch-up after downtime), if within the starting deadline; the others count as missed.
pub fn plan(inputs: &Inputs) -> RunPlan {
    let Inputs {
        cron,
        zone,
        last,
        now,
        starting_deadline,
        suspended,
        unfinished,
    } = *inputs;
    if suspended {
        return RunPlan {
            action: RunAction::Suspended,
            missed: 0,
            handled_up_to: now.max(last),
            next: None,
        };
    }
    let mut newest = None;
    let mut due = 0u64;
    let mut at = last;
    let next = loop {
        match cron.next_after(zone, at) {
            Some(t) if t <= now && due < MAX_WALK => {
                newest = Some(t);
                due += 1;
                at = t;
            }
            Some(t) if t <= now => {
                // Too many to walk: jump to now and take what is due after that.
                at = now;
                let _ = t;
            }
            other => break other,
        }
    };
    let Some(newest) = newest else {
        return RunPlan {
            action: RunAction::Idle,
            missed: 0,
            handled_up_to: last,
            next,
        };
    };
    let late = now.duration_since(newest);
    let action = if starting_deadline.is_some_and(|deadline| late > deadline) {
        RunAction::TooLate(newest)
    } else if unfinished {
        RunAction::Skip(newest)
    } else {
        RunAction::Take(newest)
    };
    RunPlan {
        action,
        missed: due - 1,
        handled_up_to: newest,
        next,
    }
}

/// Parses `maxAge`: numbers with units `d` (24 h), `h`, `m`, `s`, summed (`1d12h`).
pub fn parse_max_age(text: &str) -> Result<SignedDuration, String> {
    let mut total = SignedDuration::ZERO;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => {
                return Err(format!(
                    "maxAge {text:?}: unknown unit {c:?} (use d, h, m, s)"
                ));
            }
        };
        let n: i64 = number
            .parse()
            .map_err(|_| format!("maxAge {text:?}: a unit needs a number before it"))?;
        let secs = n
            .checked_mul(unit)
            .ok_or_else(|| format!("maxAge {text:?} is too long"))?;
        total = total
            .checked_add(SignedDuration::from_secs(secs))
            .ok_or_else(|| format!("maxAge {text:?} is too long"))?;
        number.clear();
    }
    if !number.is_empty() || text.is_empty() {
        return Err(format!(
            "maxAge {text:?}: end each number with a unit (d, h, m, s)"
        ));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn run(
        expr: &str,
        last: &str,
        now: &str,
        deadline: Option<i64>,
        suspended: bool,
        unfinished: bool,
    ) -> RunPlan {
        let cron: Cron = expr.parse().expect("cron");
        plan(&Inputs {
            cron: &cron,
            zone: &TimeZone::UTC,
            last: ts(last),
            now: ts(now),
            starting_deadline: deadline.map(SignedDuration::from_secs),
            suspended,
            unfinished,
        })
    }

    #[test]
    fn plans_of_one_evaluation() {
        let hourly = "0 * * * *";
        let t = |s: &str| ts(s);
        // (what, plan, expected action, missed, handled up to, next)
        type Case<'a> = (&'a str, RunPlan, RunAction, u64, &'a str, Option<&'a str>);
        let cases: Vec<Case> = vec![
            (
                "nothing due yet",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T12:59:59Z",
                    None,
                    false,
                    false,
                ),
                RunAction::Idle,
                0,
                "2026-12-01T12:00:00Z",
                Some("2026-12-01T13:00:00Z"),
            ),
            (
                "due exactly now",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T13:00:00Z",
                    None,
                    false,
                    false,
                ),
                RunAction::Take(t("2026-12-01T13:00:00Z")),
                0,
                "2026-12-01T13:00:00Z",
                Some("2026-12-01T14:00:00Z"),
            ),
            (
                "after downtime: the newest is caught up, the rest missed",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T16:10:00Z",
                    Some(900),
                    false,
                    false,
                ),
                RunAction::Take(t("2026-12-01T16:00:00Z")),
                3,
                "2026-12-01T16:00:00Z",
                Some("2026-12-01T17:00:00Z"),
            ),
            (
                "after downtime past the deadline: all missed",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T16:20:00Z",
                    Some(900),
                    false,
                    false,
                ),
                RunAction::TooLate(t("2026-12-01T16:00:00Z")),
                3,
                "2026-12-01T16:00:00Z",
                Some("2026-12-01T17:00:00Z"),
            ),
            (
                "no deadline: the newest is taken however late",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T13:59:00Z",
                    None,
                    false,
                    false,
                ),
                RunAction::Take(t("2026-12-01T13:00:00Z")),
                0,
                "2026-12-01T13:00:00Z",
                Some("2026-12-01T14:00:00Z"),
            ),
            (
                "one unfinished: skipped",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T13:00:05Z",
                    Some(60),
                    false,
                    true,
                ),
                RunAction::Skip(t("2026-12-01T13:00:00Z")),
                0,
                "2026-12-01T13:00:00Z",
                Some("2026-12-01T14:00:00Z"),
            ),
            (
                "late and unfinished: missed, not skipped",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T13:30:00Z",
                    Some(60),
                    false,
                    true,
                ),
                RunAction::TooLate(t("2026-12-01T13:00:00Z")),
                0,
                "2026-12-01T13:00:00Z",
                Some("2026-12-01T14:00:00Z"),
            ),
            (
                "suspended: nothing, and the due times pass",
                run(
                    hourly,
                    "2026-12-01T12:00:00Z",
                    "2026-12-01T16:10:00Z",
                    None,
                    true,
                    false,
                ),
                RunAction::Suspended,
                0,
                "2026-12-01T16:10:00Z",
                None,
            ),
        ];
        for (what, got, action, missed, handled, next) in cases {
            assert_eq!(got.action, action, "{what}");
            assert_eq!(got.missed, missed, "{what}");
            assert_eq!(got.handled_up_to, ts(handled), "{what}");
            assert_eq!(got.next, next.map(ts), "{what}");
        }
    }

    #[test]
    fn a_long_outage_of_a_minutely_schedule_is_bounded() {
        let got = run(
            "* * * * *",
            "2026-01-01T00:00:00Z",
            "2026-12-01T00:00:30Z",
            None,
            false,
            false,
        );
        assert_eq!(got.missed, MAX_WALK - 1);
        assert_eq!(got.next, Some(ts("2026-12-01T00:01:00Z")));
    }

    #[test]
    fn names_come_from_the_scheduled_time_in_utc() {
        assert_eq!(
            snapshot_name("db-hourly", ts("2026-12-01T13:05:00Z")),
            "db-hourly-202612011305"
        );
        // A Berlin midnight is the UTC evening before.
        let cron: Cron = "@daily".parse().expect("cron");
        let berlin = TimeZone::get("Europe/Berlin").expect("zone");
        let next = cron
            .next_after(&berlin, ts("2026-12-01T12:00:00Z"))
            .expect("next");
        assert_eq!(snapshot_name("db", next), "db-202612012300");
        // The longest schedule name still makes a DNS label.
        let longest = "a".repeat(crate::api::MAX_SCHEDULE_NAME);
        assert_eq!(snapshot_name(&longest, next).len(), 63);
    }

    #[test]
    fn max_age_units_sum() {
        assert_eq!(
            parse_max_age("90d"),
            Ok(SignedDuration::from_hours(90 * 24))
        );
        assert_eq!(
            parse_max_age("1d12h30m5s"),
            Ok(SignedDuration::from_secs(86_400 + 12 * 3600 + 30 * 60 + 5))
        );
        for bad in ["", "12", "h", "3w", "1.5h"] {
            assert!(parse_max_age(bad).is_err(), "{bad}");
        }
    }
}
