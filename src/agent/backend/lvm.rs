//! `lvm-thin` and `lvm-thick`: the volume is an LVM logical volume; the snapshot is `lvcreate -s`
//! (thin: shares the pool, no size; thick: a classic copy-on-write snapshot of a configured size).
//!
//! LVM suspends the origin (with a filesystem freeze of its own) to cut the snapshot. On kernels
//! without freeze holders (before about 6.6, so Debian 12's 6.1) that suspend fails with EBUSY when
//! the filesystem is already frozen by FIFREEZE; this module detects that, removes whatever
//! half-made snapshot LVM left behind, and says so ([`BackendError::FrozenOriginBusy`]).

use super::{
    BackendError, BackendKind, SnapshotHandle, SnapshotInfo, SnapshotPlan, SnapshotSource, run_tool,
};

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
    origin: String,
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
            "lv_name,segtype,lv_size,origin",
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

/// Plans a snapshot of `vg/lv`: thin when the origin is a thin volume, thick otherwise.
pub fn plan(vg: &str, origin: &str, name: &str) -> Result<SnapshotPlan, BackendError> {
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
            lv: name.into(),
        },
        source: SnapshotSource::LogicalVolume {
            vg: vg.into(),
            lv: origin.into(),
        },
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

/// `lvcreate -s` of `vg/origin` named `snap` (kept if it already exists and is a snapshot of origin).
pub fn create(
    vg: &str,
    origin: &str,
    snap: &str,
    backend: BackendKind,
    thick_cow_size: &str,
) -> Result<SnapshotInfo, BackendError> {
    if let Some(existing) = lv(vg, snap)? {
        if existing.origin == origin {
            return Ok(SnapshotInfo {
                size_bytes: size_of(&existing),
            });
        }
        return Err(BackendError::Unsupported {
            device: format!("/dev/{vg}/{snap}").into(),
            why: format!("a logical volume named {snap} exists and is not a snapshot of {origin}"),
        });
    }
    let origin_path = format!("{vg}/{origin}");
    let mut args = vec!["-q", "-s", "-n", snap, "--addtag", "tandem-snapshot"];
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
            // LVM can leave an inactive half-made snapshot behind ("Manual intervention required").
            if let Err(e) = delete(vg, snap) {
                tracing::warn!(vg, snap, error = %e, "could not remove a half-made snapshot");
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
    })
}

/// `lvremove` of the snapshot (nothing to do when it does not exist).
pub fn delete(vg: &str, snap: &str) -> Result<(), BackendError> {
    if lv(vg, snap)?.is_none() {
        return Ok(());
    }
    run_tool("lvremove", &["-q", "-f", &format!("{vg}/{snap}")]).map(|_| ())
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
                  {"lv_name":"vol1", "segtype":"thin", "lv_size":"1073741824", "origin":""}
              ]
          }
      ]
  }"#;
        let r: Report = serde_json::from_str(out).unwrap();
        let row = &r.report[0].lv[0];
        assert_eq!(row.segtype, "thin");
        assert_eq!(size_of(row), 1 << 30);
    }
}
