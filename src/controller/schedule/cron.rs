//! Cron expressions (five fields, or `@daily` and friends) and their due times in an IANA zone.
//!
//! Pure: no clock, no I/O. Written over jiff (already tandem's time library, with its bundled
//! tzdb) rather than taking `cron` or `croner`, which bring chrono and chrono-tz: a second time
//! library and a second zone database. The daylight-saving rules are ours and table-tested:
//! - a local time skipped by a change (02:30 on the spring-forward night in Berlin) runs at the
//!   first instant after the gap (03:00 local), once, however many skipped times matched;
//! - a local time that happens twice (02:30 on the fall-back night) runs once, at its first
//!   occurrence.
//!
//! Day of month and day of week follow Vixie cron: when both are restricted (neither starts with
//! `*`), a day matching either runs.

use jiff::civil::DateTime;
use jiff::tz::{AmbiguousOffset, TimeZone};
use jiff::{Timestamp, ToSpan};

/// Why an expression is not a schedule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CronError {
    #[error(
        "{0:?} has {1} fields; a schedule has five (minute hour day-of-month month day-of-week) or is one of @yearly, @monthly, @weekly, @daily, @hourly"
    )]
    FieldCount(String, usize),
    #[error(
        "unknown macro {0:?}; use @yearly, @annually, @monthly, @weekly, @daily, @midnight or @hourly"
    )]
    UnknownMacro(String),
    #[error("{field}: {value:?} is not a number or name in {min}-{max}")]
    BadValue {
        field: &'static str,
        value: String,
        min: u32,
        max: u32,
    },
    #[error("{field}: the range {value:?} runs backwards")]
    BackwardsRange { field: &'static str, value: String },
    #[error("{field}: step {value:?} must be a number of at least 1")]
    BadStep { field: &'static str, value: String },
    #[error("put the time zone in spec.timeZone, not in the schedule ({0:?})")]
    ZoneInExpression(String),
    #[error("{0:?} never happens (no date matches its day and month)")]
    Never(String),
}

/// A parsed schedule: one bit per allowed value of each field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days_of_month: u32,
    months: u16,
    days_of_week: u8,
    /// Whether day-of-month / day-of-week started with `*` (Vixie's OR rule applies only when
    /// neither did).
    dom_star: bool,
    dow_star: bool,
}

struct Field {
    name: &'static str,
    min: u32,
    max: u32,
    names: &'static [&'static str],
}

const MINUTE: Field = Field {
    name: "minute",
    min: 0,
    max: 59,
    names: &[],
};
const HOUR: Field = Field {
    name: "hour",
    min: 0,
    max: 23,
    names: &[],
};
const DAY_OF_MONTH: Field = Field {
    name: "day of month",
    min: 1,
    max: 31,
    names: &[],
};
const MONTH: Field = Field {
    name: "month",
    min: 1,
    max: 12,
    names: &[
        "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
    ],
};
// 7 is Sunday too.
const DAY_OF_WEEK: Field = Field {
    name: "day of week",
    min: 0,
    max: 7,
    names: &["sun", "mon", "tue", "wed", "thu", "fri", "sat"],
};

impl Field {
    fn value(&self, text: &str) -> Result<u32, CronError> {
        let lower = text.to_ascii_lowercase();
        if let Some(i) = self.names.iter().position(|n| *n == lower) {
            // Month names start at 1, day names at 0.
            return Ok(i as u32 + u32::from(self.min == 1));
        }
        match text.parse::<u32>() {
            Ok(v) if (self.min..=self.max).contains(&v) => Ok(v),
            _ => Err(CronError::BadValue {
                field: self.name,
                value: text.into(),
                min: self.min,
                max: self.max,
            }),
        }
    }

    /// The bits of one field (`*`, `5`, `1-5`, `*/15`, `10-50/10`, `mon-fri`, lists of these).
    fn parse(&self, text: &str) -> Result<u64, CronError> {
        let mut bits = 0u64;
        for item in text.split(',') {
            let (range, step) = match item.split_once('/') {
                Some((range, step)) => {
                    let step = step
                        .parse::<u32>()
                        .ok()
                        .filter(|s| *s >= 1)
                        .ok_or_else(|| CronError::BadStep {
                            field: self.name,
                            value: item.into(),
                        })?;
                    (range, step)
                }
                None => (item, 1),
            };
            let (low, high) = if range == "*" {
                (self.min, self.max)
            } else if let Some((a, b)) = range.split_once('-') {
                (self.value(a)?, self.value(b)?)
            } else {
                let v = self.value(range)?;
                // `5/15` means from 5 to the end, every 15.
                (v, if item.contains('/') { self.max } else { v })
            };
            if low > high {
                return Err(CronError::BackwardsRange {
                    field: self.name,
                    value: item.into(),
                });
            }
            let mut v = low;
            while v <= high {
                bits |= 1 << v;
                v += step;
            }
        }
        Ok(bits)
    }
}

impl std::str::FromStr for Cron {
    type Err = CronError;

    fn from_str(expression: &str) -> Result<Cron, CronError> {
        let trimmed = expression.trim();
        if trimmed.starts_with("CRON_TZ=") || trimmed.starts_with("TZ=") {
            return Err(CronError::ZoneInExpression(trimmed.into()));
        }
        let expanded = if trimmed.starts_with('@') {
            match trimmed.to_ascii_lowercase().as_str() {
                "@yearly" | "@annually" => "0 0 1 1 *",
                "@monthly" => "0 0 1 * *",
                "@weekly" => "0 0 * * 0",
                "@daily" | "@midnight" => "0 0 * * *",
                "@hourly" => "0 * * * *",
                _ => return Err(CronError::UnknownMacro(trimmed.into())),
            }
        } else {
            trimmed
        };
        let fields: Vec<&str> = expanded.split_whitespace().collect();
        let [minute, hour, dom, month, dow] = fields[..] else {
            return Err(CronError::FieldCount(trimmed.into(), fields.len()));
        };
        let mut days_of_week = DAY_OF_WEEK.parse(dow)?;
        if days_of_week & (1 << 7) != 0 {
            days_of_week = (days_of_week | 1) & 0x7f;
        }
        let cron = Cron {
            minutes: MINUTE.parse(minute)?,
            hours: HOUR.parse(hour)? as u32,
            days_of_month: DAY_OF_MONTH.parse(dom)? as u32,
            months: MONTH.parse(month)? as u16,
            days_of_week: days_of_week as u8,
            dom_star: dom.starts_with('*'),
            dow_star: dow.starts_with('*'),
        };
        if !cron.can_happen() {
            return Err(CronError::Never(trimmed.into()));
        }
        Ok(cron)
    }
}

/// The longest a month with each day count lasts: a day that no allowed month has never comes.
const MONTH_DAYS: [u32; 13] = [0, 31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

impl Cron {
    /// Whether some date matches (`0 0 30 2 *` never does; with a restricted day of week it would,
    /// by Vixie's OR rule).
    fn can_happen(&self) -> bool {
        if !self.dom_star && !self.dow_star {
            return true;
        }
        (1..=12).any(|m| {
            self.months & (1 << m) != 0
                && (1..=MONTH_DAYS[m]).any(|d| self.days_of_month & (1 << d) != 0)
        })
    }

    fn day_matches(&self, date: jiff::civil::Date) -> bool {
        let dom = self.days_of_month & (1 << date.day()) != 0;
        let dow = self.days_of_week & (1 << date.weekday().to_sunday_zero_offset()) != 0;
        if self.dom_star || self.dow_star {
            dom && dow
        } else {
            dom || dow
        }
    }

    /// The first due time strictly after `after`, read in `zone`. None only if none comes within
    /// eight years (29 February on a Monday can take that long).
    pub fn next_after(&self, zone: &TimeZone, after: Timestamp) -> Option<Timestamp> {
        let start = after.to_zoned(zone.clone()).datetime();
        let limit = start.year() + 8;
        let mut at = start
            .with()
            .second(0)
            .subsec_nanosecond(0)
            .build()
            .ok()?
            .checked_add(1.minute())
            .ok()?;
        loop {
            if at.year() > limit {
                return None;
            }
            if self.months & (1 << at.month()) == 0 {
                at = first_of_next_month(at)?;
                continue;
            }
            if !self.day_matches(at.date()) {
                at = at
                    .date()
                    .tomorrow()
                    .ok()?
                    .to_datetime(jiff::civil::Time::midnight());
                continue;
            }
            if self.hours & (1 << at.hour()) == 0 {
                at = at
                    .with()
                    .minute(0)
                    .build()
                    .ok()?
                    .checked_add(1.hour())
                    .ok()?;
                continue;
            }
            if self.minutes & (1 << at.minute()) == 0 {
                at = at.checked_add(1.minute()).ok()?;
                continue;
            }
            let instant = instant_of(zone, at)?;
            if instant > after {
                return Some(instant);
            }
            // The second pass of a repeated hour, or a gap already run: later local times.
            at = at.checked_add(1.minute()).ok()?;
        }
    }
}

fn first_of_next_month(at: DateTime) -> Option<DateTime> {
    let first = at.date().first_of_month().checked_add(1.month()).ok()?;
    Some(first.to_datetime(jiff::civil::Time::midnight()))
}

/// The instant of a local time: the first of two in a repeated hour, the end of the gap for one
/// that is skipped.
fn instant_of(zone: &TimeZone, at: DateTime) -> Option<Timestamp> {
    let ambiguous = zone.to_ambiguous_timestamp(at);
    match ambiguous.offset() {
        AmbiguousOffset::Unambiguous { offset } | AmbiguousOffset::Fold { before: offset, .. } => {
            offset.to_timestamp(at).ok()
        }
        AmbiguousOffset::Gap { after, .. } => {
            // Read with the offset after the change, the time lies before the change: the next
            // transition is the end of the gap.
            let early = after.to_timestamp(at).ok()?;
            zone.following(early).next().map(|t| t.timestamp())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().expect("timestamp")
    }

    fn runs(expr: &str, zone: &str, after: &str, n: usize) -> Vec<String> {
        let cron: Cron = expr.parse().expect("cron");
        let zone = TimeZone::get(zone).expect("zone");
        let mut at = ts(after);
        let mut out = Vec::new();
        for _ in 0..n {
            at = cron.next_after(&zone, at).expect("next");
            out.push(at.to_string());
        }
        out
    }

    #[test]
    fn next_due_times_in_utc_and_in_zones() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            (
                "*/15 * * * *",
                "UTC",
                "2026-12-01T12:07:31Z",
                &["2026-12-01T12:15:00Z", "2026-12-01T12:30:00Z"],
            ),
            // On a due time exactly: the next one, never the same.
            (
                "0 * * * *",
                "UTC",
                "2026-12-01T12:00:00Z",
                &["2026-12-01T13:00:00Z"],
            ),
            (
                "@daily",
                "Europe/Berlin",
                "2026-12-01T12:00:00Z",
                &["2026-12-01T23:00:00Z", "2026-12-02T23:00:00Z"],
            ),
            (
                "30 9 * * mon-fri",
                "America/New_York",
                "2026-12-04T15:00:00Z",
                &["2026-12-07T14:30:00Z", "2026-12-08T14:30:00Z"],
            ),
            // Vixie's OR: the 1st, and every Friday.
            (
                "0 0 1 * fri",
                "UTC",
                "2026-12-01T00:00:00Z",
                &["2026-12-04T00:00:00Z", "2026-12-11T00:00:00Z"],
            ),
            // 7 is Sunday.
            (
                "0 12 * * 7",
                "UTC",
                "2026-12-01T00:00:00Z",
                &["2026-12-06T12:00:00Z"],
            ),
            (
                "@yearly",
                "UTC",
                "2026-12-01T00:00:00Z",
                &["2027-01-01T00:00:00Z", "2028-01-01T00:00:00Z"],
            ),
            // 29 February only.
            (
                "0 0 29 2 *",
                "UTC",
                "2026-12-01T00:00:00Z",
                &["2028-02-29T00:00:00Z", "2032-02-29T00:00:00Z"],
            ),
            (
                "5/20 1 31 jan,mar *",
                "UTC",
                "2027-01-31T01:30:00Z",
                &["2027-01-31T01:45:00Z", "2027-03-31T01:05:00Z"],
            ),
        ];
        for (expr, zone, after, want) in cases {
            assert_eq!(
                runs(expr, zone, after, want.len()),
                *want,
                "{expr} in {zone} after {after}"
            );
        }
    }

    #[test]
    fn daylight_saving_gaps_run_once_at_their_end_and_folds_once_at_first() {
        let cases: &[(&str, &str, &str, &[&str])] = &[
            // Berlin, 2027-03-28: 02:00 CET jumps to 03:00 CEST (01:00Z). 02:30 runs at 03:00.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2027-03-27T12:00:00Z",
                &["2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"],
            ),
            // Every 15 minutes across the gap: one run at its end, then on.
            (
                "*/15 * * * *",
                "Europe/Berlin",
                "2027-03-28T00:40:00Z",
                &[
                    "2027-03-28T00:45:00Z",
                    "2027-03-28T01:00:00Z",
                    "2027-03-28T01:15:00Z",
                ],
            ),
            // Berlin, 2027-10-31: 03:00 CEST goes back to 02:00 CET. 02:30 runs once, in CEST.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2027-10-30T12:00:00Z",
                &["2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"],
            ),
            // Hourly across the fold: 02:00 CEST, then 03:00 CET (the repeated 02:00 runs once).
            (
                "0 * * * *",
                "Europe/Berlin",
                "2027-10-30T23:30:00Z",
                &["2027-10-31T00:00:00Z", "2027-10-31T02:00:00Z"],
            ),
            // Starting inside the second pass of the repeated hour: nothing before it again.
            (
                "30 2 * * *",
                "Europe/Berlin",
                "2027-10-31T01:10:00Z",
                &["2027-11-01T01:30:00Z"],
            ),
            // New York, 2027-03-14: 02:00 EST jumps to 03:00 EDT (07:00Z).
            (
                "30 2 * * *",
                "America/New_York",
                "2027-03-13T12:00:00Z",
                &["2027-03-14T07:00:00Z", "2027-03-15T06:30:00Z"],
            ),
            // Lord Howe, 2027-10-03: 02:00 +10:30 jumps to 02:30 +11 (15:30Z the day before).
            (
                "15 2 * * *",
                "Australia/Lord_Howe",
                "2027-10-02T12:00:00Z",
                &["2027-10-02T15:30:00Z"],
            ),
        ];
        for (expr, zone, after, want) in cases {
            assert_eq!(
                runs(expr, zone, after, want.len()),
                *want,
                "{expr} in {zone} after {after}"
            );
        }
    }

    #[test]
    fn bad_expressions_say_what_is_wrong() {
        let cases: &[(&str, &str)] = &[
            ("* * * *", "has 4 fields"),
            ("@every 5m", "unknown macro"),
            ("60 * * * *", "minute: \"60\""),
            ("* 24 * * *", "hour"),
            ("* * 0 * *", "day of month"),
            ("* * * 13 *", "month"),
            ("* * * * 8", "day of week"),
            ("5-1 * * * *", "runs backwards"),
            ("*/0 * * * *", "step"),
            ("CRON_TZ=Europe/Berlin 0 * * * *", "spec.timeZone"),
            ("0 0 30 feb *", "never happens"),
            ("x * * * *", "minute"),
        ];
        for (expr, want) in cases {
            let error = expr.parse::<Cron>().expect_err(expr).to_string();
            assert!(error.contains(want), "{expr}: {error}");
        }
        assert!("0 0 30 feb mon".parse::<Cron>().is_ok(), "OR rule");
    }
}
