//! `lvm-thin` and `lvm-thick`: the volume is an LVM logical volume; the snapshot is `lvcreate -s`
//! (thin: shares the pool, no size; thick: a classic copy-on-write snapshot of a configured size).
//!
//! LVM suspends the origin (with a filesystem freeze of its own) to cut the snapshot. On kernels
//! without freeze holders (before about 6.6, so Debian 12's 6.1) that suspend fails with EBUSY when
//! the filesystem is already frozen by FIFREEZE; this module detects that, removes whatever
//! half-made snapshot LVM left behind, and says so ([`BackendError::FrozenOriginBusy`]).
//!
//! Every snapshot is tagged `tandem-owner-<owner>` at creation; `delete` removes only a logical
//! volume carrying its handle's tag, and `create` never adopts an existing one.

use super::{
    BackendError, BackendKind, Deleted, NAME_BUDGET, SnapshotHandle, SnapshotInfo, SnapshotPlan,
    SnapshotSource, dm_escaped_len, fit_name, run_tool,
};

/// The tag that marks a snapshot as the cut `owner`'s.
pub fn owner_tag(owner: &str) -> String {
    format!("tandem-owner-{owner}")
}

/// The device-mapper name of a snapshot (`<vg>-<lv>`, each `-` doubled) plus the `-cow` suffix of a
/// thick snapshot must stay below DM_NAME_LEN (128 bytes with its NUL).
const DM_NAME_MAX: usize = 127;

/// The LV name for a snapshot name in `vg`: shortened (see [`fit_name`]) so that
/// `<vg>-<lv>-cow` fits a device-mapper name; returns the budget used and the name.
pub fn fit_lv_name(vg: &str, name: &str) -> Result<(usize, String), BackendError> {
    let budget = DM_NAME_MAX
        .saturating_sub(dm_escaped_len(vg) + 1 + "-cow".len())
        .min(NAME_BUDGET);
    // Room for a start, the hash and the owner hash.
    if budget < 40 {
        return Err(BackendError::Unsupported {
            device: format!("/dev/{vg}").into(),
            why: format!(
                "the volume group name {vg:?} is too long to leave room for a snapshot name in a device-mapper name"
            ),
        });
    }
    Ok((budget, fit_name(name, budget)))
}

/// One row of `lvs --reportformat json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct LvRow {
    #[serde(default)]
    lv_name: String,
    #[serde(default)]
    segtype: String,
    #[serde(default)]
    lv_size: String,
    #[serde(default)]
    lv_tags: String,
}

impl LvRow {
    fn has_tag(&self, tag: &str) -> bool {
        self.lv_tags.split(',').any(|t| t == tag)
    }
}

#[derive(serde::Deserialize)]
struct Report {
    report: Vec<ReportLvs>,
}

#[derive(serde::Deserialize)]
struct ReportLvs {
    #[serde(default)]
    lv: Vec<LvRow>,
}

/// `lvs` of one LV, or None when LVM says it does not exist.
fn lv(vg: &str, lv: &str) -> Result<Option<LvRow>, BackendError> {
    let target = format!("{vg}/{lv}");
    let out = match run_tool(
        "lvs",
        &[
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_name,segtype,lv_size,lv_tags",
            &target,
        ],
    ) {
        Ok(out) => out,
        Err(BackendError::Command { stderr, .. })
            if stderr.contains("Failed to find logical volume") =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let report: Report = serde_json::from_str(&out).map_err(|e| BackendError::Parse {
        command: format!("lvs {target}"),
        why: e.to_string(),
    })?;
    Ok(report
        .report
        .into_iter()
        .flat_map(|r| r.lv)
        .find(|row| row.lv_name == lv))
}

/// Plans a snapshot of `vg/lv` for the cut `owner`: thin when the origin is a thin volume, thick
/// otherwise.
pub fn plan(vg: &str, origin: &str, name: &str, owner: &str) -> Result<SnapshotPlan, BackendError> {
    let (_, snap) = fit_lv_name(vg, name)?;
    let row = lv(vg, origin)?.ok_or_else(|| BackendError::Unsupported {
        device: format!("/dev/{vg}/{origin}").into(),
        why: "LVM does not know this logical volume".into(),
    })?;
    let backend = match row.segtype.as_str() {
        "thin" => BackendKind::LvmThin,
        "linear" | "striped" => BackendKind::LvmThick,
        other => {
            return Err(BackendError::Unsupported {
                device: format!("/dev/{vg}/{origin}").into(),
                why: format!("LVM segment type {other:?} cannot be snapshotted by tandem"),
            });
        }
    };
    Ok(SnapshotPlan {
        backend,
        handle: SnapshotHandle::Lvm {
            vg: vg.into(),
            lv: snap,
            owner: owner.into(),
        },
        source: SnapshotSource::LogicalVolume {
            vg: vg.into(),
            lv: origin.into(),
        },
        owner: owner.into(),
    })
}

fn size_of(row: &LvRow) -> u64 {
    row.lv_size.trim().parse().unwrap_or(0)
}

/// Whether lvcreate failed because the origin could not be suspended while frozen.
pub fn is_frozen_origin_busy(stderr: &str) -> bool {
    stderr.contains("Device or resource busy")
        && (stderr.contains("suspend") || stderr.contains("Suspend"))
}

/// `lvcreate -s` of `vg/origin` named `snap`, tagged with its owner. An existing logical volume of
/// that name is [`BackendError::AlreadyExists`].
pub fn create(
    vg: &str,
    origin: &str,
    snap: &str,
    owner: &str,
    backend: BackendKind,
    thick_cow_size: &str,
) -> Result<SnapshotInfo, BackendError> {
    let handle = SnapshotHandle::Lvm {
        vg: vg.into(),
        lv: snap.into(),
        owner: owner.into(),
    };
    if lv(vg, snap)?.is_some() {
        return Err(BackendError::AlreadyExists {
            what: format!("logical volume {vg}/{snap}"),
        });
    }
    let origin_path = format!("{vg}/{origin}");
    let tag = owner_tag(owner);
    let mut args = vec![
        "-q",
        "-s",
        "-n",
        snap,
        "--addtag",
        "tandem-snapshot",
        "--addtag",
        &tag,
    ];
    if backend == BackendKind::LvmThick {
        args.extend(["-L", thick_cow_size]);
    }
    args.push(&origin_path);
    match run_tool("lvcreate", &args) {
        Ok(_) => {}
        Err(BackendError::Command {
            stderr,
            command,
            status,
        }) => {
            // LVM can leave an inactive half-made snapshot behind ("Manual intervention required");
            // it carries the owner tag, and nothing without it is removed.
            match delete(vg, snap, owner) {
                Ok(_) | Err(BackendError::NotOurs { .. }) => {}
                Err(e) => {
                    tracing::warn!(vg, snap, error = %e, "could not remove a half-made snapshot")
                }
            }
            if is_frozen_origin_busy(&stderr) {
                return Err(BackendError::FrozenOriginBusy {
                    origin: origin_path,
                    stderr,
                });
            }
            return Err(BackendError::Command {
                command,
                status,
                stderr,
            });
        }
        Err(e) => return Err(e),
    }
    let origin_row = lv(vg, origin)?;
    Ok(SnapshotInfo {
        size_bytes: origin_row.as_ref().map(size_of).unwrap_or(0),
        handle,
    })
}

/// Whether a logical volume may be removed as `owner`'s snapshot: it carries the owner tag.
fn check_owner_tag(vg: &str, row: &LvRow, owner: &str) -> Result<(), BackendError> {
    if !owner.is_empty() && row.has_tag(&owner_tag(owner)) {
        return Ok(());
    }
    Err(BackendError::NotOurs {
        what: format!("logical volume {vg}/{}", row.lv_name),
        why: format!(
            "its tags are [{}], without {}",
            row.lv_tags,
            owner_tag(owner)
        ),
    })
}

/// `lvremove` of the snapshot if it carries `owner`'s tag (nothing to do when it does not exist).
pub fn delete(vg: &str, snap: &str, owner: &str) -> Result<Deleted, BackendError> {
    let Some(row) = lv(vg, snap)? else {
        return Ok(Deleted::Absent);
    };
    check_owner_tag(vg, &row, owner)?;
    // `@tag` would select every LV with it; the name selects this one, just checked.
    run_tool("lvremove", &["-q", "-f", &format!("{vg}/{snap}")]).map(|_| Deleted::Removed)
}

/// What `lvs -o lv_attr,snap_percent` says about a thick snapshot (L3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SnapshotHealth {
    /// Usable; `used_percent` of its copy-on-write space is taken (None for thin snapshots).
    Valid { used_percent: Option<f64> },
    /// LVM invalidated it (its copy-on-write space overflowed, or a merge failed): its data is gone.
    Invalid,
}

/// Reads a snapshot's `lv_attr` (5th character: the state) and `snap_percent` (L3). A thick
/// snapshot whose copy-on-write space overflowed is invalid (state `I`, or 100% used).
pub fn parse_health(lv_attr: &str, snap_percent: &str) -> Result<SnapshotHealth, BackendError> {
    let parse_err = |why: String| BackendError::Parse {
        command: "lvs -o lv_attr,snap_percent".into(),
        why,
    };
    let attr = lv_attr.trim();
    let state = attr
        .chars()
        .nth(4)
        .ok_or_else(|| parse_err(format!("lv_attr {attr:?} is too short")))?;
    // I: invalid snapshot; S: invalid suspended snapshot; m/M: snapshot merge failed.
    if matches!(state, 'I' | 'S' | 'm' | 'M') {
        return Ok(SnapshotHealth::Invalid);
    }
    let percent = snap_percent.trim();
    if percent.is_empty() {
        return Ok(SnapshotHealth::Valid { used_percent: None });
    }
    let used: f64 = percent
        .parse()
        .map_err(|_| parse_err(format!("snap_percent {percent:?} is not a number")))?;
    if used >= 100.0 {
        return Ok(SnapshotHealth::Invalid);
    }
    Ok(SnapshotHealth::Valid {
        used_percent: Some(used),
    })
}

/// The health of the snapshot `vg/snap` (None when it does not exist).
pub fn health(vg: &str, snap: &str) -> Result<Option<SnapshotHealth>, BackendError> {
    let target = format!("{vg}/{snap}");
    let out = match run_tool(
        "lvs",
        &[
            "--noheadings",
            "--separator",
            "|",
            "-o",
            "lv_attr,snap_percent",
            &target,
        ],
    ) {
        Ok(out) => out,
        Err(BackendError::Command { stderr, .. })
            if stderr.contains("Failed to find logical volume") =>
        {
            return Ok(None);
        }
        Err(e) => return Err(e),
    };
    let line = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let (attr, percent) = line.split_once('|').unwrap_or((line, ""));
    parse_health(attr, percent).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_the_61_suspend_failure() {
        // Recorded in a QEMU guest on Debian 12's 6.1 kernel.
        let thin = "  device-mapper: suspend ioctl on  (253:4) failed: Device or resource busy\n  Unable to suspend vg0-vol1 (253:4)\n  Failed to suspend thin snapshot origin vg0/vol1.";
        assert!(is_frozen_origin_busy(thin));
        let thick = "  device-mapper: suspend ioctl on  (253:9) failed: Device or resource busy\n  Failed to suspend logical volume vg0/thick.\n  Aborting. Manual intervention required.";
        assert!(is_frozen_origin_busy(thick));
        assert!(!is_frozen_origin_busy(
            "  Volume group \"vg0\" has insufficient free space"
        ));
    }

    #[test]
    fn parses_lvs_json() {
        let out = r#"  {
      "report": [
          {
              "lv": [
                  {"lv_name":"vol1", "segtype":"thin", "lv_size":"1073741824", "lv_tags":"tandem-snapshot,tandem-owner-uid-1"}
              ]
          }
      ]
  }"#;
        let r: Report = serde_json::from_str(out).unwrap();
        let row = &r.report[0].lv[0];
        assert_eq!(row.segtype, "thin");
        assert_eq!(size_of(row), 1 << 30);
        assert!(check_owner_tag("vg0", row, "uid-1").is_ok());
        for other in ["uid-2", "uid", ""] {
            assert!(matches!(
                check_owner_tag("vg0", row, other),
                Err(BackendError::NotOurs { .. })
            ));
        }
    }

    /// L3: lvs output of a valid, a filling and an overflowed thick snapshot, and a thin one.
    #[test]
    fn tells_invalid_snapshots() {
        assert_eq!(
            parse_health("  swi-a-s---", "  12.50").unwrap(),
            SnapshotHealth::Valid {
                used_percent: Some(12.5)
            }
        );
        assert_eq!(
            parse_health("  swi-I-s---", "100.00").unwrap(),
            SnapshotHealth::Invalid
        );
        assert_eq!(
            parse_health("swi-a-s---", "100.00").unwrap(),
            SnapshotHealth::Invalid
        );
        assert_eq!(
            parse_health("Vwi---tz-k", "").unwrap(),
            SnapshotHealth::Valid { used_percent: None }
        );
        assert!(parse_health("sw", "1").is_err());
        assert!(parse_health("swi-a-s---", "lots").is_err());
    }
}
