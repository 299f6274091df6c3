//! The manifests the CLI's `create` commands write: pure functions from flags to objects, so
//! `--dry-run=client -o yaml` prints exactly what a create would send.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

use crate::api::{GROUP, VERSION};

/// A flag that could not be turned into a manifest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> ManifestError {
    ManifestError::Invalid(message.into())
}

fn api_version() -> String {
    format!("{GROUP}/{VERSION}")
}

fn metadata(name: &str, namespace: Option<&str>, labels: &BTreeMap<String, String>) -> Value {
    let mut meta = json!({ "name": name });
    if let Some(ns) = namespace {
        meta["namespace"] = json!(ns);
    }
    if !labels.is_empty() {
        meta["labels"] = json!(labels);
    }
    meta
}

/// Parses `k=v,k2=v2` (what `kubectl label` and `-l` take, equality only) into a map.
pub fn parse_labels(text: &str) -> Result<BTreeMap<String, String>, ManifestError> {
    let mut labels = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("{pair:?} is not key=value")))?;
        let key = key.trim();
        if key.is_empty() {
            return Err(invalid(format!("{pair:?} has an empty key")));
        }
        labels.insert(key.to_string(), value.trim().to_string());
    }
    Ok(labels)
}

/// Parses a duration as kubectl writes them: `90s`, `5m`, `1h`, `1m30s`, `500ms`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<Duration, ManifestError> {
    let text = text.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Ok(Duration::from_secs(seconds));
    }
    let mut total = Duration::ZERO;
    let mut rest = text;
    if rest.is_empty() {
        return Err(invalid("an empty duration"));
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(invalid(format!(
                "{text:?} is not a duration (like 90s, 5m, 1h30m)"
            )));
        }
        let number: u64 = rest[..digits]
            .parse()
            .map_err(|_| invalid(format!("{text:?} is too large")))?;
        rest = &rest[digits..];
        let unit_len = rest.chars().take_while(|c| c.is_ascii_alphabetic()).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number.saturating_mul(60)),
            "h" => Duration::from_secs(number.saturating_mul(3600)),
            _ => {
                return Err(invalid(format!(
                    "{text:?}: unknown unit {unit:?} (use ms, s, m or h)"
                )));
            }
        };
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// Flags of `group create`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupFlags {
    pub name: String,
    pub namespace: Option<String>,
    pub selector: Option<String>,
    pub volume_selector: Option<String>,
    pub claims: Vec<String>,
    pub freeze: Option<String>,
    pub freeze_timeout: Option<Duration>,
    pub labels: BTreeMap<String, String>,
}

fn selector(text: &str, flag: &str) -> Result<Value, ManifestError> {
    let labels = parse_labels(text)?;
    if labels.is_empty() {
        return Err(invalid(format!(
            "{flag} needs at least one key=value: an empty selector would select everything"
        )));
    }
    Ok(json!({ "matchLabels": labels }))
}

/// A ConsistencyGroup from `group create` flags.
pub fn consistency_group(flags: &GroupFlags) -> Result<Value, ManifestError> {
    let mut spec = serde_json::Map::new();
    if let Some(s) = &flags.selector {
        spec.insert("selector".into(), selector(s, "--selector")?);
    }
    if let Some(s) = &flags.volume_selector {
        spec.insert("volumeSelector".into(), selector(s, "--volume-selector")?);
    }
    if !flags.claims.is_empty() {
        spec.insert("claims".into(), json!(flags.claims));
    }
    if spec.is_empty() {
        return Err(invalid(
            "say which claims are members: --selector app=db, --volume-selector, or --claims a,b",
        ));
    }
    if let Some(freeze) = &flags.freeze {
        spec.insert("freeze".into(), json!(freeze));
    }
    if let Some(timeout) = flags.freeze_timeout {
        let seconds = timeout.as_secs();
        if timeout.subsec_nanos() != 0 || !(1..=300).contains(&seconds) {
            return Err(invalid(
                "--freeze-timeout must be whole seconds from 1s to 300s",
            ));
        }
        spec.insert("freezeTimeoutSeconds".into(), json!(seconds));
    }
    Ok(json!({
        "apiVersion": api_version(),
        "kind": "ConsistencyGroup",
        "metadata": metadata(&flags.name, flags.namespace.as_deref(), &flags.labels),
        "spec": spec,
    }))
}

/// A GroupSnapshot of `group`.
pub fn group_snapshot(
    name: &str,
    namespace: Option<&str>,
    group: &str,
    deletion_policy: Option<&str>,
    labels: &BTreeMap<String, String>,
) -> Value {
    let mut spec = json!({ "groupName": group });
    if let Some(policy) = deletion_policy {
        spec["deletionPolicy"] = json!(policy);
    }
    json!({
        "apiVersion": api_version(),
        "kind": "GroupSnapshot",
        "metadata": metadata(name, namespace, labels),
        "spec": spec,
    })
}

/// The name `snapshot create` gives a snapshot when none is given: the group and the time (UTC),
/// like a schedule's `<schedule>-<yyyymmddhhmm>`, with seconds so two cuts a minute apart differ.
pub fn default_snapshot_name(group: &str, now: jiff::Timestamp) -> String {
    let stamp = now.strftime("%Y%m%d%H%M%S").to_string();
    // A DNS label: at most 63 characters, so a long group name is shortened.
    let room = 63 - stamp.len() - 1;
    let prefix: String = group.chars().take(room).collect();
    format!("{}-{stamp}", prefix.trim_end_matches('-'))
}

/// How `restore create` restores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestoreTarget {
    /// New claims, named by `name_template` or the explicit `from=to` pairs.
    NewClaims {
        name_template: Option<String>,
        claims: Vec<String>,
        claim_labels: BTreeMap<String, String>,
    },
    /// The group's own claims, optionally scaling down the workloads that use them.
    InPlace { scale_down: bool },
}

/// A GroupRestore of `snapshot`.
pub fn group_restore(
    name: &str,
    namespace: Option<&str>,
    snapshot: &str,
    target: &RestoreTarget,
    deadline: Option<Duration>,
    labels: &BTreeMap<String, String>,
) -> Result<Value, ManifestError> {
    let mut spec = json!({ "source": { "groupSnapshotName": snapshot } });
    match target {
        RestoreTarget::NewClaims {
            name_template,
            claims,
            claim_labels,
        } => {
            spec["mode"] = json!("NewClaims");
            let mut new_claims = serde_json::Map::new();
            if let Some(template) = name_template {
                new_claims.insert("nameTemplate".into(), json!(template));
            }
            let mut mappings = Vec::new();
            for pair in claims {
                let (from, to) = pair
                    .split_once('=')
                    .ok_or_else(|| invalid(format!("--claim {pair:?} is not member=new-claim")))?;
                if from.is_empty() || to.is_empty() {
                    return Err(invalid(format!("--claim {pair:?} is not member=new-claim")));
                }
                mappings.push(json!({ "from": from, "to": to }));
            }
            if !mappings.is_empty() {
                new_claims.insert("claims".into(), json!(mappings));
            }
            if !claim_labels.is_empty() {
                new_claims.insert("labels".into(), json!(claim_labels));
            }
            if !new_claims.is_empty() {
                spec["newClaims"] = Value::Object(new_claims);
            }
        }
        RestoreTarget::InPlace { scale_down } => {
            spec["mode"] = json!("InPlace");
            if *scale_down {
                spec["inPlace"] = json!({ "workloads": "ScaleDown" });
            }
        }
    }
    if let Some(deadline) = deadline {
        let seconds = deadline.as_secs();
        if !(10..=86400).contains(&seconds) {
            return Err(invalid("--deadline must be from 10s to 24h"));
        }
        spec["deadlineSeconds"] = json!(seconds);
    }
    Ok(json!({
        "apiVersion": api_version(),
        "kind": "GroupRestore",
        "metadata": metadata(name, namespace, labels),
        "spec": spec,
    }))
}

/// The new `spec.claims` of a group after `group add` (`add = true`) or `group remove`: the list
/// stays sorted and unique; removing a claim that is not listed is an error that says why.
pub fn edit_claims(
    current: &[String],
    claims: &[String],
    add: bool,
) -> Result<Vec<String>, ManifestError> {
    let mut set: std::collections::BTreeSet<String> = current.iter().cloned().collect();
    for claim in claims {
        if add {
            set.insert(claim.clone());
        } else if !set.remove(claim) {
            return Err(invalid(format!(
                "{claim} is not in the group's spec.claims (a member picked by a selector leaves when its labels no longer match)"
            )));
        }
    }
    Ok(set.into_iter().collect())
}

/// Flags of `schedule create`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScheduleFlags {
    pub name: String,
    pub namespace: Option<String>,
    pub group: String,
    pub cron: String,
    pub time_zone: Option<String>,
    pub suspend: bool,
    pub starting_deadline: Option<Duration>,
    pub deletion_policy: Option<String>,
    pub keep_last: Option<u32>,
    pub hourly: Option<u32>,
    pub daily: Option<u32>,
    pub weekly: Option<u32>,
    pub monthly: Option<u32>,
    pub yearly: Option<u32>,
    pub max_age: Option<String>,
    pub min_ready: Option<u32>,
    pub delete_snapshots_with_schedule: bool,
}

/// A GroupSnapshotSchedule from `schedule create` flags. The cron expression and the zone are
/// checked here (the controller's own parser, the bundled tzdb), so a typo is a usage error.
pub fn group_snapshot_schedule(flags: &ScheduleFlags) -> Result<Value, ManifestError> {
    if flags.name.len() > crate::api::MAX_SCHEDULE_NAME {
        return Err(invalid(format!(
            "a schedule's name has at most {} characters (its snapshots are <schedule>-<yyyymmddhhmm>)",
            crate::api::MAX_SCHEDULE_NAME
        )));
    }
    flags
        .cron
        .parse::<crate::controller::schedule::cron::Cron>()
        .map_err(|e| invalid(format!("--cron {:?}: {e}", flags.cron)))?;
    let zone = flags.time_zone.clone().unwrap_or_else(|| "UTC".into());
    jiff::tz::TimeZone::get(&zone).map_err(|e| invalid(format!("--time-zone {zone:?}: {e}")))?;
    let mut spec = json!({
        "groupName": flags.group,
        "schedule": flags.cron,
        "timeZone": zone,
    });
    if flags.suspend {
        spec["suspend"] = json!(true);
    }
    if let Some(deadline) = flags.starting_deadline {
        spec["startingDeadlineSeconds"] = json!(deadline.as_secs().max(1));
    }
    if let Some(policy) = &flags.deletion_policy {
        spec["template"] = json!({ "spec": { "deletionPolicy": policy } });
    }
    let mut retention = serde_json::Map::new();
    for (key, value) in [
        ("keepLast", flags.keep_last),
        ("hourly", flags.hourly),
        ("daily", flags.daily),
        ("weekly", flags.weekly),
        ("monthly", flags.monthly),
        ("yearly", flags.yearly),
        ("minReady", flags.min_ready),
    ] {
        if let Some(v) = value {
            retention.insert(key.into(), json!(v));
        }
    }
    if let Some(age) = &flags.max_age {
        if !is_max_age(age) {
            return Err(invalid(format!(
                "--max-age {age:?}: like 30d, 12h or 1d12h"
            )));
        }
        retention.insert("maxAge".into(), json!(age));
    }
    if flags.delete_snapshots_with_schedule {
        retention.insert("deleteSnapshotsWithSchedule".into(), json!(true));
    }
    if !retention.is_empty() {
        spec["retention"] = Value::Object(retention);
    }
    Ok(json!({
        "apiVersion": api_version(),
        "kind": "GroupSnapshotSchedule",
        "metadata": metadata(&flags.name, flags.namespace.as_deref(), &BTreeMap::new()),
        "spec": spec,
    }))
}

/// What the API accepts as `retention.maxAge`: `([0-9]+(d|h|m|s))+`.
fn is_max_age(text: &str) -> bool {
    let mut rest = text;
    if rest.is_empty() {
        return false;
    }
    while !rest.is_empty() {
        let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 || !matches!(rest[digits..].chars().next(), Some('d' | 'h' | 'm' | 's')) {
            return false;
        }
        rest = &rest[digits + 1..];
    }
    true
}

#[cfg(test)]
mod schedule_tests {
    use super::*;

    #[test]
    fn schedule_manifest() {
        let flags = ScheduleFlags {
            name: "nightly".into(),
            group: "shop".into(),
            cron: "30 2 * * *".into(),
            time_zone: Some("Europe/Berlin".into()),
            deletion_policy: Some("Retain".into()),
            keep_last: Some(3),
            daily: Some(7),
            max_age: Some("30d".into()),
            ..Default::default()
        };
        assert_eq!(
            group_snapshot_schedule(&flags).expect("ok")["spec"],
            json!({"groupName": "shop", "schedule": "30 2 * * *", "timeZone": "Europe/Berlin",
                   "template": {"spec": {"deletionPolicy": "Retain"}},
                   "retention": {"keepLast": 3, "daily": 7, "maxAge": "30d"}})
        );
        let defaults = ScheduleFlags {
            name: "h".into(),
            group: "g".into(),
            cron: "@hourly".into(),
            ..Default::default()
        };
        assert_eq!(
            group_snapshot_schedule(&defaults).expect("ok")["spec"]["timeZone"],
            "UTC"
        );
        assert!(is_max_age("1d12h") && is_max_age("90m") && !is_max_age("d") && !is_max_age("5x"));
        for bad in [
            ScheduleFlags {
                cron: "61 * * * *".into(),
                ..defaults.clone()
            },
            ScheduleFlags {
                cron: "* * *".into(),
                ..defaults.clone()
            },
            ScheduleFlags {
                time_zone: Some("Mars/Olympus".into()),
                ..defaults.clone()
            },
            ScheduleFlags {
                name: "x".repeat(51),
                ..defaults.clone()
            },
            ScheduleFlags {
                max_age: Some("soon".into()),
                ..defaults.clone()
            },
            ScheduleFlags {
                max_age: Some("30".into()),
                ..defaults.clone()
            },
        ] {
            assert!(group_snapshot_schedule(&bad).is_err(), "{bad:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        for (text, want) in [
            ("30", Some(30_000)),
            ("90s", Some(90_000)),
            ("5m", Some(300_000)),
            ("1h30m", Some(5_400_000)),
            ("1m30s", Some(90_000)),
            ("500ms", Some(500)),
            ("", None),
            ("s", None),
            ("5d", None),
            ("-1s", None),
            ("5m3", None),
        ] {
            let got = parse_duration(text).ok().map(|d| d.as_millis() as u64);
            // "5m3": a bare number after a unit has no unit: refused.
            assert_eq!(got, want, "{text:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(
            parse_labels("app=db, tier=data").expect("ok"),
            BTreeMap::from([("app".into(), "db".into()), ("tier".into(), "data".into())])
        );
        assert!(parse_labels("app").is_err());
        assert!(parse_labels("=db").is_err());
        assert!(parse_labels("").expect("ok").is_empty());
    }

    #[test]
    fn group_manifest() {
        let flags = GroupFlags {
            name: "orders".into(),
            selector: Some("app=orders".into()),
            claims: vec!["wal".into()],
            freeze: Some("BestEffort".into()),
            freeze_timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        assert_eq!(
            consistency_group(&flags).expect("ok"),
            json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "ConsistencyGroup",
                "metadata": {"name": "orders"},
                "spec": {"selector": {"matchLabels": {"app": "orders"}}, "claims": ["wal"],
                         "freeze": "BestEffort", "freezeTimeoutSeconds": 20}
            })
        );
        for bad in [
            GroupFlags {
                name: "x".into(),
                ..Default::default()
            },
            GroupFlags {
                name: "x".into(),
                selector: Some("".into()),
                ..Default::default()
            },
            GroupFlags {
                name: "x".into(),
                claims: vec!["a".into()],
                freeze_timeout: Some(Duration::from_millis(1500)),
                ..Default::default()
            },
            GroupFlags {
                name: "x".into(),
                claims: vec!["a".into()],
                freeze_timeout: Some(Duration::from_secs(301)),
                ..Default::default()
            },
        ] {
            assert!(consistency_group(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn snapshot_names() {
        let now: jiff::Timestamp = "2026-11-21T03:04:05Z".parse().expect("time");
        assert_eq!(
            default_snapshot_name("orders", now),
            "orders-20261121030405"
        );
        let long = "a".repeat(70);
        let name = default_snapshot_name(&long, now);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("-20261121030405"));
        assert_eq!(
            default_snapshot_name(&format!("{}-b", "a".repeat(47)), now),
            format!("{}-20261121030405", "a".repeat(47))
        );
    }

    #[test]
    fn restore_manifests() {
        let new = RestoreTarget::NewClaims {
            name_template: Some("{claim}-tue".into()),
            claims: vec!["data=data-copy".into()],
            claim_labels: BTreeMap::from([("restored".into(), "yes".into())]),
        };
        assert_eq!(
            group_restore("r", None, "s", &new, None, &BTreeMap::new()).expect("ok")["spec"],
            json!({"source": {"groupSnapshotName": "s"}, "mode": "NewClaims",
                   "newClaims": {"nameTemplate": "{claim}-tue",
                                 "claims": [{"from": "data", "to": "data-copy"}],
                                 "labels": {"restored": "yes"}}})
        );
        let in_place = RestoreTarget::InPlace { scale_down: true };
        assert_eq!(
            group_restore(
                "r",
                Some("ns"),
                "s",
                &in_place,
                Some(Duration::from_secs(60)),
                &BTreeMap::new()
            )
            .expect("ok"),
            json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupRestore",
                   "metadata": {"name": "r", "namespace": "ns"},
                   "spec": {"source": {"groupSnapshotName": "s"}, "mode": "InPlace",
                            "inPlace": {"workloads": "ScaleDown"}, "deadlineSeconds": 60}})
        );
        let bad = RestoreTarget::NewClaims {
            name_template: None,
            claims: vec!["data".into()],
            claim_labels: BTreeMap::new(),
        };
        assert!(group_restore("r", None, "s", &bad, None, &BTreeMap::new()).is_err());
        assert!(
            group_restore(
                "r",
                None,
                "s",
                &in_place,
                Some(Duration::from_secs(5)),
                &BTreeMap::new()
            )
            .is_err()
        );
    }

    #[test]
    fn claims_edits() {
        let current = vec!["b".to_string(), "a".to_string()];
        assert_eq!(
            edit_claims(&current, &["c".into(), "a".into()], true).expect("ok"),
            ["a", "b", "c"]
        );
        assert_eq!(
            edit_claims(&current, &["a".into()], false).expect("ok"),
            ["b"]
        );
        assert!(edit_claims(&current, &["z".into()], false).is_err());
    }
}
