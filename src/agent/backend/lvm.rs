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
//!
//! LVM's default configuration scans every block device of the node, tenants' raw block volumes
//! included: a fake header with the same VG name would make name-addressed commands refuse or
//! pick the wrong VG (L11). So every command runs inside a [`VgScope`]: `--devices` lists only the
//! VG's PVs, found under its active LVs in the kernel's device-mapper tables (sysfs), and every
//! report is checked against the VG uuid those tables carry. A PV that no active LV uses is
//! admitted only by the PV uuid the VG's own metadata names (one read-only `pvs` label scan).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};

use super::clone::{CloneHandle, CloneInfo, Progress, detect_filesystem};
use super::{
    BackendError, BackendKind, Deleted, NAME_BUDGET, SnapshotHandle, SnapshotInfo, SnapshotPlan,
    SnapshotSource, dm_escaped_len, fit_name, run_tool,
};
use crate::agent::discovery::split_lvm_dm_name;
use crate::api::CloneMethod;

/// Where the kernel lists block devices by number (each entry links to the device's directory).
const SYSFS_BLOCK: &str = "/sys/dev/block";

/// How deep device-mapper devices of one VG may stack (thin volume, pool, its data, a mirror leg…)
/// before the walk gives up: a bound against a cycle in a corrupt or fake tree.
const MAX_DM_DEPTH: usize = 16;

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

/// One volume group as LVM commands of the agent may see it: only its PVs, and its uuid (L11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgScope {
    /// The VG's name.
    pub vg: String,
    /// The VG's uuid without dashes, as device-mapper uuids carry it.
    pub uuid: String,
    /// The device nodes of its PVs.
    pub devices: BTreeSet<PathBuf>,
}

impl VgScope {
    /// The arguments that restrict an LVM command to the scope's devices.
    pub fn device_args(&self) -> Vec<String> {
        self.devices
            .iter()
            .flat_map(|d| ["--devices".to_string(), d.display().to_string()])
            .collect()
    }

    fn refuse(&self, lv: &str, why: String) -> BackendError {
        BackendError::Unsupported {
            device: format!("/dev/{}/{lv}", self.vg).into(),
            why,
        }
    }
}

/// A device-mapper device as sysfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DmDevice {
    /// Its directory (`<sysfs_block>/<maj:min>`).
    dir: PathBuf,
    name: String,
    uuid: String,
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// The VG uuid in an LVM device-mapper uuid (`LVM-<32 vg><32 lv>`, hidden layers add `-<suffix>`).
fn vg_uuid_of_dm(dm_uuid: &str) -> Option<&str> {
    let rest = dm_uuid.strip_prefix("LVM-")?;
    let vg = rest.get(..32)?;
    (rest.len() >= 64 && vg.chars().all(|c| c.is_ascii_alphanumeric())).then_some(vg)
}

/// Every device-mapper device under `sysfs_block` (normally /sys/dev/block).
fn dm_devices(sysfs_block: &Path) -> Vec<DmDevice> {
    let Ok(entries) = fs::read_dir(sysfs_block) else {
        return Vec::new();
    };
    let mut found: Vec<DmDevice> = entries
        .flatten()
        .filter_map(|e| {
            let dir = e.path();
            let name = read_trimmed(&dir.join("dm/name"))?;
            let uuid = read_trimmed(&dir.join("dm/uuid")).unwrap_or_default();
            Some(DmDevice { dir, name, uuid })
        })
        .collect();
    found.sort_by(|a, b| a.dir.cmp(&b.dir));
    found
}

/// The device node of a kernel block device name (`sda1`; `cciss!c0d0` is `/dev/cciss/c0d0`).
fn device_node(kernel_name: &str) -> PathBuf {
    PathBuf::from("/dev").join(kernel_name.replace('!', "/"))
}

/// Adds to `pvs` the devices directly under `dir` that are not LVs of the VG `vg_uuid`: its PVs
/// (a disk, a partition, or a dm-crypt, multipath or other VG's device), walking down through the
/// VG's own layers (thin pool, its data and metadata, a snapshot's origin…).
fn collect_pvs(
    dir: &Path,
    vg_uuid: &str,
    depth: usize,
    pvs: &mut BTreeSet<PathBuf>,
) -> Result<(), String> {
    if depth > MAX_DM_DEPTH {
        return Err(format!(
            "{} stacks more than {MAX_DM_DEPTH} device-mapper layers",
            dir.display()
        ));
    }
    let slaves = dir.join("slaves");
    let entries = fs::read_dir(&slaves).map_err(|e| format!("{}: {e}", slaves.display()))?;
    for entry in entries.flatten() {
        let kernel_name = entry.file_name().to_string_lossy().into_owned();
        let slave = entry.path();
        let uuid = read_trimmed(&slave.join("dm/uuid")).unwrap_or_default();
        if vg_uuid_of_dm(&uuid) == Some(vg_uuid) {
            collect_pvs(&slave, vg_uuid, depth + 1, pvs)?;
        } else {
            pvs.insert(device_node(&kernel_name));
        }
    }
    Ok(())
}

/// The scope of the VG `vg_uuid` named `vg`: the PVs under all of its active LVs in `dms`.
fn scope_of_uuid(vg: &str, vg_uuid: &str, dms: &[DmDevice]) -> Result<VgScope, String> {
    let mut devices = BTreeSet::new();
    for dm in dms
        .iter()
        .filter(|d| vg_uuid_of_dm(&d.uuid) == Some(vg_uuid))
    {
        collect_pvs(&dm.dir, vg_uuid, 0, &mut devices)?;
    }
    if devices.is_empty() {
        return Err(format!(
            "the kernel shows no physical volume under the active logical volumes of {vg}"
        ));
    }
    Ok(VgScope {
        vg: vg.into(),
        uuid: vg_uuid.into(),
        devices,
    })
}

/// The device-mapper name LVM gives `vg/lv`.
fn lvm_dm_name(vg: &str, lv: &str) -> String {
    format!("{}-{}", vg.replace('-', "--"), lv.replace('-', "--"))
}

/// The scope of the VG of `vg/lv`, which must be active: its dm uuid names the VG unambiguously,
/// whatever other devices claim the name `vg`.
pub fn scope_of_active_lv(sysfs_block: &Path, vg: &str, lv: &str) -> Result<VgScope, String> {
    let dms = dm_devices(sysfs_block);
    let name = lvm_dm_name(vg, lv);
    let dm = dms
        .iter()
        .find(|d| d.name == name)
        .ok_or_else(|| format!("{vg}/{lv} is not active (no device-mapper device {name})"))?;
    let uuid = vg_uuid_of_dm(&dm.uuid).ok_or_else(|| {
        format!(
            "device-mapper device {name} has uuid {:?}, not an LVM one",
            dm.uuid
        )
    })?;
    scope_of_uuid(vg, uuid, &dms)
}

/// The scope of the VG named `vg` for an LV that may be inactive (a thin snapshot): by `lv`'s own
/// dm device when it is active, else by the one VG of that name with active LVs. Two such VGs
/// (a tenant's fake one activated on the node) are refused rather than guessed between.
pub fn scope_of_vg_name(sysfs_block: &Path, vg: &str, lv: &str) -> Result<VgScope, String> {
    if let Ok(scope) = scope_of_active_lv(sysfs_block, vg, lv) {
        return Ok(scope);
    }
    let dms = dm_devices(sysfs_block);
    let uuids: BTreeSet<&str> = dms
        .iter()
        .filter(|d| split_lvm_dm_name(&d.name).is_some_and(|(v, _)| v == vg))
        .filter_map(|d| vg_uuid_of_dm(&d.uuid))
        .collect();
    match uuids.len() {
        1 => scope_of_uuid(vg, uuids.into_iter().next().unwrap_or_default(), &dms),
        0 => Err(format!(
            "no logical volume of {vg} is active, so the kernel does not show which devices are its own"
        )),
        n => Err(format!(
            "{n} active volume groups are named {vg} (uuids {}); refusing to guess",
            uuids.into_iter().collect::<Vec<_>>().join(", ")
        )),
    }
}

/// A VG uuid as LVM reports it (`xxxxxx-xxxx-…`), without its dashes.
fn undashed(uuid: &str) -> String {
    uuid.trim().replace('-', "")
}

/// One row of `pvs --reportformat json`.
#[derive(Debug, Clone, serde::Deserialize)]
struct PvRow {
    #[serde(default)]
    pv_name: String,
    #[serde(default)]
    pv_uuid: String,
    #[serde(default)]
    pv_missing: String,
    #[serde(default)]
    vg_uuid: String,
}

#[derive(serde::Deserialize)]
struct PvReport {
    report: Vec<ReportPvs>,
}

#[derive(serde::Deserialize)]
struct ReportPvs {
    #[serde(default)]
    pv: Vec<PvRow>,
}

fn parse_pvs(out: &str, command: &str) -> Result<Vec<PvRow>, BackendError> {
    let report: PvReport = serde_json::from_str(out).map_err(|e| BackendError::Parse {
        command: command.into(),
        why: e.to_string(),
    })?;
    Ok(report.report.into_iter().flat_map(|r| r.pv).collect())
}

/// The devices of the PVs `missing` (by PV uuid) of the VG `vg_uuid`, among all PVs `seen` on the
/// node. Each must be found exactly once, carrying that VG's uuid.
fn find_missing_pvs(
    missing: &BTreeSet<String>,
    seen: &[PvRow],
    vg_uuid: &str,
) -> Result<BTreeSet<PathBuf>, String> {
    let mut found: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for row in seen {
        if missing.contains(&row.pv_uuid) && undashed(&row.vg_uuid) == vg_uuid {
            found
                .entry(row.pv_uuid.as_str())
                .or_default()
                .push(row.pv_name.as_str());
        }
    }
    let mut devices = BTreeSet::new();
    for pv in missing {
        match found.get(pv.as_str()).map(Vec::as_slice) {
            Some([one]) => {
                devices.insert(PathBuf::from(one));
            }
            None | Some([]) => {
                return Err(format!("no device carries its physical volume {pv}"));
            }
            Some(many) => {
                return Err(format!(
                    "its physical volume {pv} is claimed by {}; refusing to guess",
                    many.join(", ")
                ));
            }
        }
    }
    Ok(devices)
}

/// Adds to `scope` the PVs of its VG that no active LV uses (the kernel does not show them): the
/// VG's metadata, read from the devices already in scope, names their PV uuids, and a label scan
/// finds the one device carrying each.
fn admit_unused_pvs(scope: &mut VgScope, lv: &str) -> Result<(), BackendError> {
    // pvs takes PVs, not a VG, as arguments: all PVs in scope, those of other VGs left out here.
    let mut args: Vec<String> = ["--reportformat", "json", "-o", "pv_uuid,pv_missing,vg_uuid"]
        .map(String::from)
        .into();
    args.extend(scope.device_args());
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let missing: BTreeSet<String> = parse_pvs(&run_tool("pvs", &refs)?, "pvs")?
        .into_iter()
        .filter(|r| !r.pv_missing.trim().is_empty() && undashed(&r.vg_uuid) == scope.uuid)
        .map(|r| r.pv_uuid)
        .collect();
    let all = ["--reportformat", "json", "-o", "pv_name,pv_uuid,vg_uuid"];
    let seen = parse_pvs(&run_tool("pvs", &all)?, "pvs")?;
    let more = find_missing_pvs(&missing, &seen, &scope.uuid).map_err(|why| {
        scope.refuse(
            lv,
            format!(
                "{} has physical volumes no active LV uses, and {why}",
                scope.vg
            ),
        )
    })?;
    tracing::info!(vg = scope.vg, devices = ?more, "admitting physical volumes no active LV uses");
    scope.devices.extend(more);
    Ok(())
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
    #[serde(default)]
    vg_uuid: String,
    #[serde(default)]
    vg_missing_pv_count: String,
}

impl LvRow {
    fn has_tag(&self, tag: &str) -> bool {
        self.lv_tags.split(',').any(|t| t == tag)
    }

    fn missing_pvs(&self) -> u64 {
        self.vg_missing_pv_count.trim().parse().unwrap_or(0)
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

/// The LVM arguments of `lvs` of one LV in `scope`.
pub fn lvs_args(scope: &VgScope, lv: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "--reportformat",
        "json",
        "--units",
        "b",
        "--nosuffix",
        "-o",
        "lv_name,segtype,lv_size,lv_tags,vg_uuid,vg_missing_pv_count",
    ]
    .map(String::from)
    .into();
    args.extend(scope.device_args());
    args.push(format!("{}/{lv}", scope.vg));
    args
}

/// `lvs` of one LV in `scope`, or None when LVM says it does not exist. The row must be of the
/// scope's VG; PVs of it that no active LV uses are admitted to the scope once.
fn lv(scope: &mut VgScope, lv: &str) -> Result<Option<LvRow>, BackendError> {
    for attempt in 0..2 {
        let Some(row) = lv_once(scope, lv)? else {
            return Ok(None);
        };
        if undashed(&row.vg_uuid) != scope.uuid {
            return Err(scope.refuse(
                lv,
                format!(
                    "LVM reports VG uuid {:?}, the kernel's device-mapper tables {:?}",
                    row.vg_uuid, scope.uuid
                ),
            ));
        }
        if row.missing_pvs() == 0 {
            return Ok(Some(row));
        }
        if attempt == 0 {
            admit_unused_pvs(scope, lv)?;
        }
    }
    Err(scope.refuse(
        lv,
        format!(
            "{} still misses physical volumes with {} admitted",
            scope.vg,
            scope.device_args().join(" ")
        ),
    ))
}

/// Runs `lvs` with `args`; `None` when the LV it names does not exist.
fn lvs(args: &[String]) -> Result<Option<String>, BackendError> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match run_tool("lvs", &refs) {
        Ok(out) => Ok(Some(out)),
        Err(BackendError::Command { stderr, .. })
            if stderr.contains("Failed to find logical volume") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn lv_once(scope: &VgScope, lv: &str) -> Result<Option<LvRow>, BackendError> {
    let args = lvs_args(scope, lv);
    let Some(out) = lvs(&args)? else {
        return Ok(None);
    };
    let report: Report = serde_json::from_str(&out).map_err(|e| BackendError::Parse {
        command: format!("lvs {}/{lv}", scope.vg),
        why: e.to_string(),
    })?;
    Ok(report
        .report
        .into_iter()
        .flat_map(|r| r.lv)
        .find(|row| row.lv_name == lv))
}

/// The scope of the origin `vg/origin` (active: it is a mounted or open volume).
fn origin_scope(vg: &str, origin: &str) -> Result<VgScope, BackendError> {
    scope_of_active_lv(Path::new(SYSFS_BLOCK), vg, origin).map_err(|why| {
        BackendError::Unsupported {
            device: format!("/dev/{vg}/{origin}").into(),
            why,
        }
    })
}

/// The scope of the VG of the snapshot `vg/snap` (which may be inactive).
fn snapshot_scope(vg: &str, snap: &str) -> Result<VgScope, BackendError> {
    scope_of_vg_name(Path::new(SYSFS_BLOCK), vg, snap).map_err(|why| BackendError::Unsupported {
        device: format!("/dev/{vg}/{snap}").into(),
        why,
    })
}

/// Plans a snapshot of `vg/lv` for the cut `owner`: thin when the origin is a thin volume, thick
/// otherwise.
pub fn plan(vg: &str, origin: &str, name: &str, owner: &str) -> Result<SnapshotPlan, BackendError> {
    let (_, snap) = fit_lv_name(vg, name)?;
    let mut scope = origin_scope(vg, origin)?;
    let row = lv(&mut scope, origin)?.ok_or_else(|| BackendError::Unsupported {
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
    let mut scope = origin_scope(vg, origin)?;
    // The origin first: it checks the VG and admits PVs no active LV uses before LVM allocates.
    let origin_row = lv(&mut scope, origin)?.ok_or_else(|| BackendError::Unsupported {
        device: format!("/dev/{vg}/{origin}").into(),
        why: "LVM does not know this logical volume".into(),
    })?;
    if lv(&mut scope, snap)?.is_some() {
        return Err(BackendError::AlreadyExists {
            what: format!("logical volume {vg}/{snap}"),
        });
    }
    let origin_path = format!("{vg}/{origin}");
    let args = lvcreate_args(&scope, origin, snap, owner, backend, thick_cow_size);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    match run_tool("lvcreate", &refs) {
        Ok(_) => {}
        Err(BackendError::Command {
            stderr,
            command,
            status,
        }) => {
            // LVM can leave an inactive half-made snapshot behind ("Manual intervention required");
            // it carries the owner tag, and nothing without it is removed.
            match delete_in(&mut scope, snap, owner) {
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
    Ok(SnapshotInfo {
        size_bytes: size_of(&origin_row),
        handle,
    })
}

/// The LVM arguments of `lvcreate -s` of `origin` named `snap` in `scope`, tagged with its owner.
pub fn lvcreate_args(
    scope: &VgScope,
    origin: &str,
    snap: &str,
    owner: &str,
    backend: BackendKind,
    thick_cow_size: &str,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-q",
        "-s",
        "-n",
        snap,
        "--addtag",
        "tandem-snapshot",
        "--addtag",
        &owner_tag(owner),
    ]
    .map(String::from)
    .into();
    if backend == BackendKind::LvmThick {
        args.extend(["-L".to_string(), thick_cow_size.to_string()]);
    }
    args.extend(scope.device_args());
    args.push(format!("{}/{origin}", scope.vg));
    args
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
    delete_in(&mut snapshot_scope(vg, snap)?, snap, owner)
}

fn delete_in(scope: &mut VgScope, snap: &str, owner: &str) -> Result<Deleted, BackendError> {
    let Some(row) = lv(scope, snap)? else {
        return Ok(Deleted::Absent);
    };
    check_owner_tag(&scope.vg, &row, owner)?;
    let args = lvremove_args(scope, snap);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool("lvremove", &refs).map(|_| Deleted::Removed)
}

/// The LVM arguments of `lvremove` of `snap` in `scope`.
pub fn lvremove_args(scope: &VgScope, snap: &str) -> Vec<String> {
    // `@tag` would select every LV with it; the name selects this one, just checked.
    let mut args: Vec<String> = vec!["-q".into(), "-f".into()];
    args.extend(scope.device_args());
    args.push(format!("{}/{snap}", scope.vg));
    args
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
    let scope = snapshot_scope(vg, snap)?;
    let mut args: Vec<String> = [
        "--noheadings",
        "--separator",
        "|",
        "-o",
        "lv_attr,snap_percent",
    ]
    .map(String::from)
    .into();
    args.extend(scope.device_args());
    args.push(format!("{vg}/{snap}"));
    let Some(out) = lvs(&args)? else {
        return Ok(None);
    };
    let line = out.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
    let (attr, percent) = line.split_once('|').unwrap_or((line, ""));
    parse_health(attr, percent).map(Some)
}

// --- restore clones ---

/// The tag every restore clone carries (beside its owner's).
pub const CLONE_TAG: &str = "tandem-restore";

/// How long a new or activated LV's device node may take to appear.
const NODE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The copy buffer of a thick clone (a multiple of any logical block size).
const COPY_CHUNK: usize = 4 << 20;

/// How often (in bytes) a copy reports progress.
const PROGRESS_EVERY: u64 = 64 << 20;

fn gone(what: String) -> BackendError {
    BackendError::Io {
        what,
        source: std::io::ErrorKind::NotFound.into(),
    }
}

/// Whether the member snapshot `vg/snap` is thin (segment type `thin`) or thick.
pub fn snapshot_kind(vg: &str, snap: &str) -> Result<BackendKind, BackendError> {
    let mut scope = snapshot_scope(vg, snap)?;
    let row =
        lv(&mut scope, snap)?.ok_or_else(|| gone(format!("the member snapshot {vg}/{snap}")))?;
    Ok(kind_of(&row))
}

fn kind_of(row: &LvRow) -> BackendKind {
    if row.segtype == "thin" {
        BackendKind::LvmThin
    } else {
        BackendKind::LvmThick
    }
}

/// The device node LVM makes for `vg/lv`.
pub fn lv_path(vg: &str, lv: &str) -> PathBuf {
    PathBuf::from("/dev").join(vg).join(lv)
}

/// The LVM arguments of the thin clone `clone` of the thin snapshot `snap`: a thin snapshot of it,
/// without the activation-skip flag, tagged.
pub fn thin_clone_args(scope: &VgScope, snap: &str, clone: &str, owner: &str) -> Vec<String> {
    let mut args: Vec<String> = [
        "-q",
        "-s",
        "-kn",
        "-n",
        clone,
        "--addtag",
        CLONE_TAG,
        "--addtag",
        &owner_tag(owner),
    ]
    .map(String::from)
    .into();
    args.extend(scope.device_args());
    args.push(format!("{}/{snap}", scope.vg));
    args
}

/// The LVM arguments of the thick clone `clone` of `size` bytes: a plain LV in the VG, tagged, its
/// old signatures left (it is overwritten whole).
pub fn thick_clone_args(scope: &VgScope, clone: &str, owner: &str, size: u64) -> Vec<String> {
    let mut args: Vec<String> = [
        "-q",
        "-y",
        "-Wn",
        "-L",
        &format!("{size}b"),
        "-n",
        clone,
        "--addtag",
        CLONE_TAG,
        "--addtag",
        &owner_tag(owner),
    ]
    .map(String::from)
    .into();
    args.extend(scope.device_args());
    args.push(scope.vg.clone());
    args
}

fn activate_args(scope: &VgScope, lv: &str) -> Vec<String> {
    let mut args: Vec<String> = ["-q", "-ay", "-K"].map(String::from).into();
    args.extend(scope.device_args());
    args.push(format!("{}/{lv}", scope.vg));
    args
}

fn run(program: &str, args: &[String]) -> Result<String, BackendError> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    run_tool(program, &refs)
}

/// Waits for a device node (udev, or LVM itself, makes it after the command returns).
fn wait_for_node(path: &Path) -> Result<(), BackendError> {
    let start = std::time::Instant::now();
    while !path.exists() {
        if start.elapsed() > NODE_WAIT {
            return Err(gone(format!(
                "{} did not appear within {}s",
                path.display(),
                NODE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// The size of a block device (seek to its end).
fn device_size(path: &Path) -> Result<u64, BackendError> {
    let fd =
        rustix::fs::open(path, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| {
            BackendError::Io {
                what: format!("open {}", path.display()),
                source: e.into(),
            }
        })?;
    rustix::fs::seek(&fd, rustix::fs::SeekFrom::End(0)).map_err(|e| BackendError::Io {
        what: format!("size of {}", path.display()),
        source: e.into(),
    })
}

fn info(vg: &str, lv: &str, owner: &str, backend: BackendKind) -> Result<CloneInfo, BackendError> {
    let path = lv_path(vg, lv);
    let filesystem = std::fs::File::open(&path)
        .ok()
        .and_then(|f| detect_filesystem(&f));
    Ok(CloneInfo {
        handle: CloneHandle::Lvm {
            vg: vg.into(),
            lv: lv.into(),
            owner: owner.into(),
        },
        size_bytes: device_size(&path)?,
        path,
        block: true,
        method: match backend {
            BackendKind::LvmThick => CloneMethod::Copy,
            _ => CloneMethod::Clone,
        },
        filesystem,
    })
}

/// Clones the member snapshot `vg/snap` (which must carry `snap_owner`'s tag) into the new LV
/// `clone` tagged as `owner`'s, and activates it: thin, a thin snapshot of the snapshot (it shares
/// the pool and is independent of the snapshot once made); thick, a new LV of the snapshot's size
/// copied from it block by block ([`CloneMethod::Copy`], `progress` called as it goes). An existing
/// LV named `clone` is [`BackendError::AlreadyExists`]; a failure removes the new LV.
pub fn clone_create(
    vg: &str,
    snap: &str,
    snap_owner: &str,
    clone: &str,
    owner: &str,
    backend: BackendKind,
    progress: Progress<'_>,
) -> Result<CloneInfo, BackendError> {
    let mut scope = snapshot_scope(vg, snap)?;
    let row =
        lv(&mut scope, snap)?.ok_or_else(|| gone(format!("the member snapshot {vg}/{snap}")))?;
    check_owner_tag(vg, &row, snap_owner)?;
    if kind_of(&row) != backend {
        return Err(BackendError::Parse {
            command: format!("lvs {vg}/{snap}"),
            why: format!(
                "the snapshot is {} (segment type {:?}), the plan says {}",
                kind_of(&row).name(),
                row.segtype,
                backend.name()
            ),
        });
    }
    if lv(&mut scope, clone)?.is_some() {
        return Err(BackendError::AlreadyExists {
            what: format!("logical volume {vg}/{clone}"),
        });
    }
    let made = match backend {
        BackendKind::LvmThin => run("lvcreate", &thin_clone_args(&scope, snap, clone, owner))
            .and_then(|_| activate(&scope, clone)),
        _ => thick_clone(&mut scope, snap, clone, owner, progress),
    };
    match made.and_then(|()| info(vg, clone, owner, backend)) {
        Ok(info) => Ok(info),
        Err(e) => {
            match delete_in(&mut scope, clone, owner) {
                Ok(_) | Err(BackendError::NotOurs { .. }) => {}
                Err(d) => {
                    tracing::warn!(vg, clone, error = %d, "could not remove a half-made clone")
                }
            }
            Err(e)
        }
    }
}

fn activate(scope: &VgScope, lv: &str) -> Result<(), BackendError> {
    run("lvchange", &activate_args(scope, lv))?;
    wait_for_node(&lv_path(&scope.vg, lv))
}

/// A thick clone: the snapshot must be valid (not overflowed) and active; the new LV gets its size
/// and every byte of it.
fn thick_clone(
    scope: &mut VgScope,
    snap: &str,
    clone: &str,
    owner: &str,
    progress: Progress<'_>,
) -> Result<(), BackendError> {
    let vg = scope.vg.clone();
    if health(&vg, snap)? == Some(SnapshotHealth::Invalid) {
        return Err(BackendError::Unsupported {
            device: lv_path(&vg, snap),
            why: "the snapshot is invalid (its copy-on-write space overflowed): its data is gone"
                .into(),
        });
    }
    let src = lv_path(&vg, snap);
    if !src.exists() {
        activate(scope, snap)?;
    }
    let total = device_size(&src)?;
    run("lvcreate", &thick_clone_args(scope, clone, owner, total))?;
    let dst = lv_path(&vg, clone);
    wait_for_node(&dst)?;
    copy_device(&src, &dst, total, progress)
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Option<Self> {
        let layout = std::alloc::Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = std::ptr::NonNull::new(unsafe { std::alloc::alloc_zeroed(layout) })?;
        Some(Aligned { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes, owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Copies `total` bytes of `src` to `dst` (block devices), bypassing the page cache (O_DIRECT)
/// when both allow it, then fdatasync; calls `progress` every [`PROGRESS_EVERY`] bytes and at the end.
pub fn copy_device(
    src: &Path,
    dst: &Path,
    total: u64,
    progress: Progress<'_>,
) -> Result<(), BackendError> {
    let io_err = |what: String| {
        move |e: rustix::io::Errno| BackendError::Io {
            what,
            source: e.into(),
        }
    };
    let direct = total.is_multiple_of(4096);
    let open = |path: &Path, access: OFlags| {
        let flags = access | OFlags::CLOEXEC;
        if direct {
            match rustix::fs::open(path, flags | OFlags::DIRECT, Mode::empty()) {
                Err(rustix::io::Errno::INVAL) => {}
                other => return other,
            }
        }
        rustix::fs::open(path, flags, Mode::empty())
    };
    let from = open(src, OFlags::RDONLY).map_err(io_err(format!("open {}", src.display())))?;
    let to = open(dst, OFlags::WRONLY).map_err(io_err(format!("open {}", dst.display())))?;
    let mut buf = Aligned::new(COPY_CHUNK).ok_or_else(|| BackendError::Io {
        what: "allocate the copy buffer".into(),
        source: std::io::ErrorKind::OutOfMemory.into(),
    })?;
    let buf = buf.as_mut();
    let mut done: u64 = 0;
    let mut reported: u64 = 0;
    progress(0, total);
    while done < total {
        let want = usize::try_from((total - done).min(COPY_CHUNK as u64)).unwrap_or(COPY_CHUNK);
        let mut got = 0;
        while got < want {
            let n = rustix::io::pread(&from, &mut buf[got..want], done + got as u64).map_err(
                io_err(format!("read {} at {}", src.display(), done + got as u64)),
            )?;
            if n == 0 {
                return Err(BackendError::Io {
                    what: format!(
                        "read {}: it ends at {} of {total} bytes",
                        src.display(),
                        done + got as u64
                    ),
                    source: std::io::ErrorKind::UnexpectedEof.into(),
                });
            }
            got += n;
        }
        let mut put = 0;
        while put < want {
            let n = rustix::io::pwrite(&to, &buf[put..want], done + put as u64).map_err(io_err(
                format!("write {} at {}", dst.display(), done + put as u64),
            ))?;
            if n == 0 {
                return Err(BackendError::Io {
                    what: format!("write {}: no space at {}", dst.display(), done + put as u64),
                    source: std::io::ErrorKind::WriteZero.into(),
                });
            }
            put += n;
        }
        done += want as u64;
        if done - reported >= PROGRESS_EVERY {
            reported = done;
            progress(done, total);
        }
    }
    rustix::fs::fdatasync(&to).map_err(io_err(format!("fdatasync {}", dst.display())))?;
    progress(total, total);
    Ok(())
}

/// Activates a clone (idempotent): after a reboot, or a deactivation.
pub fn clone_attach(vg: &str, lv_name: &str, owner: &str) -> Result<CloneInfo, BackendError> {
    let mut scope = snapshot_scope(vg, lv_name)?;
    let row = lv(&mut scope, lv_name)?.ok_or_else(|| gone(format!("the clone {vg}/{lv_name}")))?;
    check_owner_tag(vg, &row, owner)?;
    activate(&scope, lv_name)?;
    // A thick clone is a plain LV: its method is Copy.
    let backend = if row.segtype == "thin" {
        BackendKind::LvmThin
    } else {
        BackendKind::LvmThick
    };
    info(vg, lv_name, owner, backend)
}

/// Removes a clone LV carrying `owner`'s tag (lvremove deactivates it; an LV in use is refused by
/// LVM and kept).
pub fn clone_delete(vg: &str, lv_name: &str, owner: &str) -> Result<Deleted, BackendError> {
    delete(vg, lv_name, owner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VG: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    const FAKE: &str = "FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF";

    fn lv_uuid(vg: &str, lv: char) -> String {
        format!("LVM-{vg}{}", lv.to_string().repeat(32))
    }

    /// One block device of a fake sysfs: maj:min, kernel name, dm name and uuid, slaves.
    type FakeDevice<'a> = (&'a str, &'a str, Option<(&'a str, &'a str)>, &'a [&'a str]);

    /// A fake /sys/dev/block, each slave linked the way sysfs links it (`slaves/<kernel name>` to
    /// the slave's directory).
    fn fake_sysfs(devices: &[FakeDevice]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let id_of = |name: &str| devices.iter().find(|d| d.1 == name).unwrap().0;
        for (id, _, dm, _) in devices {
            let dir = root.path().join(id);
            fs::create_dir_all(&dir).unwrap();
            if let Some((name, uuid)) = dm {
                fs::create_dir_all(dir.join("dm")).unwrap();
                fs::write(dir.join("dm/name"), format!("{name}\n")).unwrap();
                fs::write(dir.join("dm/uuid"), format!("{uuid}\n")).unwrap();
            }
        }
        for (id, _, _, slaves) in devices {
            let dir = root.path().join(id).join("slaves");
            fs::create_dir_all(&dir).unwrap();
            for slave in *slaves {
                std::os::unix::fs::symlink(
                    root.path().join(id_of(slave)),
                    dir.join(slave.replace('/', "!")),
                )
                .unwrap();
            }
        }
        root
    }

    /// The real vg0: a thin volume in a pool whose data spans vda and vdb, a thick volume on a
    /// dm-crypt PV over sda2, and a thick volume with a snapshot (origin, -real and -cow layers).
    fn node(with_fake_active: bool) -> tempfile::TempDir {
        let (a, b, c, d, e, f, g, h) = (
            lv_uuid(VG, 'a'),
            format!("{}-tpool", lv_uuid(VG, 'b')),
            format!("{}-tmeta", lv_uuid(VG, 'b')),
            format!("{}-tdata", lv_uuid(VG, 'b')),
            lv_uuid(VG, 'c'),
            lv_uuid(VG, 'd'),
            format!("{}-real", lv_uuid(VG, 'd')),
            format!("{}-cow", lv_uuid(VG, 'e')),
        );
        let snap = lv_uuid(VG, 'e');
        let fake = lv_uuid(FAKE, 'a');
        let mut devices: Vec<FakeDevice> = vec![
            ("252:0", "vda", None, &[]),
            ("252:16", "vdb", None, &[]),
            ("252:32", "vdc", None, &[]),
            ("8:2", "sda2", None, &[]),
            ("253:0", "dm-0", Some(("vg0-vol1", &a)), &["dm-1"]),
            (
                "253:1",
                "dm-1",
                Some(("vg0-pool-tpool", &b)),
                &["dm-2", "dm-3"],
            ),
            ("253:2", "dm-2", Some(("vg0-pool_tmeta", &c)), &["vda"]),
            (
                "253:3",
                "dm-3",
                Some(("vg0-pool_tdata", &d)),
                &["vda", "vdb"],
            ),
            (
                "253:4",
                "dm-4",
                Some(("luks-1", "CRYPT-LUKS2-1234-luks-1")),
                &["sda2"],
            ),
            ("253:5", "dm-5", Some(("vg0-thick1", &e)), &["dm-4"]),
            ("253:6", "dm-6", Some(("vg0-thick2", &f)), &["dm-7"]),
            ("253:7", "dm-7", Some(("vg0-thick2-real", &g)), &["vdb"]),
            (
                "253:8",
                "dm-8",
                Some(("vg0-snap", &snap)),
                &["dm-7", "dm-9"],
            ),
            ("253:9", "dm-9", Some(("vg0-snap-cow", &h)), &["vdb"]),
        ];
        if with_fake_active {
            devices.push(("253:10", "dm-10", Some(("vg0-tenant", &fake)), &["vdc"]));
        }
        fake_sysfs(&devices)
    }

    fn paths(list: &[&str]) -> BTreeSet<PathBuf> {
        list.iter().map(PathBuf::from).collect()
    }

    /// L11: the PVs come from the kernel's tables, through the VG's own layers only; a crypt
    /// device is the PV (not the partition under it); a fake vg0 is never in scope.
    #[test]
    fn scopes_a_vg_to_the_devices_under_its_lvs() {
        let sysfs = node(true);
        let want = paths(&["/dev/dm-4", "/dev/vda", "/dev/vdb"]);
        for lv in ["vol1", "thick1", "thick2", "snap"] {
            let scope = scope_of_active_lv(sysfs.path(), "vg0", lv).unwrap();
            assert_eq!(scope.uuid, VG, "{lv}");
            assert_eq!(scope.devices, want, "{lv}");
        }
        let fake = scope_of_active_lv(sysfs.path(), "vg0", "tenant").unwrap();
        assert_eq!(
            (fake.uuid.as_str(), fake.devices),
            (FAKE, paths(&["/dev/vdc"]))
        );
        let missing = scope_of_active_lv(sysfs.path(), "vg0", "gone").unwrap_err();
        assert!(missing.contains("not active"), "{missing}");
    }

    /// L11: an inactive snapshot is scoped by the one active VG of its name; two are refused.
    #[test]
    fn scopes_an_inactive_snapshot_by_its_vg_name() {
        let clean = node(false);
        let scope = scope_of_vg_name(clean.path(), "vg0", "thin-snap").unwrap();
        assert_eq!(scope.uuid, VG);
        assert_eq!(scope.devices, paths(&["/dev/dm-4", "/dev/vda", "/dev/vdb"]));
        let why = scope_of_vg_name(clean.path(), "vg1", "thin-snap").unwrap_err();
        assert!(why.contains("no logical volume of vg1 is active"), "{why}");

        let with_fake = node(true);
        let why = scope_of_vg_name(with_fake.path(), "vg0", "thin-snap").unwrap_err();
        assert!(
            why.contains("2 active volume groups are named vg0"),
            "{why}"
        );
        // An active snapshot names its VG itself.
        let scope = scope_of_vg_name(with_fake.path(), "vg0", "snap").unwrap();
        assert_eq!(scope.uuid, VG);
    }

    #[test]
    fn refuses_a_cycle_and_odd_uuids() {
        let a = lv_uuid(VG, 'a');
        let b = lv_uuid(VG, 'b');
        let cyclic = fake_sysfs(&[
            ("253:0", "dm-0", Some(("vg0-a", &a)), &["dm-1"]),
            ("253:1", "dm-1", Some(("vg0-b", &b)), &["dm-0"]),
        ]);
        let why = scope_of_active_lv(cyclic.path(), "vg0", "a").unwrap_err();
        assert!(why.contains("device-mapper layers"), "{why}");
        let not_lvm = fake_sysfs(&[("253:0", "dm-0", Some(("vg0-a", "CRYPT-x")), &[])]);
        let why = scope_of_active_lv(not_lvm.path(), "vg0", "a").unwrap_err();
        assert!(why.contains("not an LVM one"), "{why}");
        assert_eq!(vg_uuid_of_dm(&a), Some(VG));
        assert_eq!(vg_uuid_of_dm(&format!("{a}-cow")), Some(VG));
        for odd in [
            "LVM-short",
            "CRYPT-LUKS2-x",
            "",
            &format!("LVM-{}", "-".repeat(64)),
        ] {
            assert_eq!(vg_uuid_of_dm(odd), None, "{odd}");
        }
        assert_eq!(device_node("cciss!c0d0"), PathBuf::from("/dev/cciss/c0d0"));
        assert_eq!(lvm_dm_name("my-vg", "a-b"), "my--vg-a--b");
    }

    /// L11: what the agent passes to LVM.
    #[test]
    fn every_command_names_only_the_scope_devices() {
        let scope = VgScope {
            vg: "vg0".into(),
            uuid: VG.into(),
            devices: paths(&["/dev/vdb", "/dev/dm-4"]),
        };
        let devices = ["--devices", "/dev/dm-4", "--devices", "/dev/vdb"];
        let thick = lvcreate_args(&scope, "thick1", "s1", "uid-1", BackendKind::LvmThick, "1G");
        let mut want = vec![
            "-q",
            "-s",
            "-n",
            "s1",
            "--addtag",
            "tandem-snapshot",
            "--addtag",
            "tandem-owner-uid-1",
            "-L",
            "1G",
        ];
        want.extend(devices);
        want.push("vg0/thick1");
        assert_eq!(thick, want);
        let thin = lvcreate_args(&scope, "vol1", "s1", "uid-1", BackendKind::LvmThin, "1G");
        assert!(!thin.iter().any(|a| a == "-L"), "{thin:?}");
        assert!(thin.ends_with(&["--devices", "/dev/vdb", "vg0/vol1"].map(String::from)));
        let mut want = vec!["-q", "-f"];
        want.extend(devices);
        want.push("vg0/s1");
        assert_eq!(lvremove_args(&scope, "s1"), want);
        let lvs = lvs_args(&scope, "s1");
        assert!(lvs.windows(4).any(|w| w == devices), "{lvs:?}");
        assert_eq!(lvs.last().map(String::as_str), Some("vg0/s1"));
        assert!(
            lvs.iter()
                .any(|a| a.contains("vg_uuid,vg_missing_pv_count"))
        );
    }

    /// Restore clones: thin, a thin snapshot of the member snapshot without the activation-skip
    /// flag; thick, a plain LV of the snapshot's size in bytes; both tagged, both scoped.
    #[test]
    fn clone_commands_are_tagged_and_scoped() {
        let scope = VgScope {
            vg: "vg0".into(),
            uuid: VG.into(),
            devices: paths(&["/dev/vda"]),
        };
        let thin = thin_clone_args(&scope, "tandem.ns.g.pv.1", "tandem-r.ns.pv.2", "uid-r");
        assert_eq!(
            thin,
            [
                "-q",
                "-s",
                "-kn",
                "-n",
                "tandem-r.ns.pv.2",
                "--addtag",
                "tandem-restore",
                "--addtag",
                "tandem-owner-uid-r",
                "--devices",
                "/dev/vda",
                "vg0/tandem.ns.g.pv.1"
            ]
        );
        let thick = thick_clone_args(&scope, "tandem-r.ns.pv.2", "uid-r", 335_544_320);
        assert!(
            thick.windows(2).any(|w| w == ["-L", "335544320b"]),
            "{thick:?}"
        );
        assert!(thick.iter().any(|a| a == "tandem-owner-uid-r"));
        assert!(thick.ends_with(&["--devices", "/dev/vda", "vg0"].map(String::from)));
        assert_eq!(
            activate_args(&scope, "c"),
            ["-q", "-ay", "-K", "--devices", "/dev/vda", "vg0/c"]
        );
        let row = |segtype: &str| LvRow {
            lv_name: "s".into(),
            segtype: segtype.into(),
            lv_size: String::new(),
            lv_tags: String::new(),
            vg_uuid: String::new(),
            vg_missing_pv_count: String::new(),
        };
        assert_eq!(kind_of(&row("thin")), BackendKind::LvmThin);
        assert_eq!(kind_of(&row("linear")), BackendKind::LvmThick);
    }

    /// The thick copy: every byte, progress from 0 to the total (monotonic), and a source shorter
    /// than the total is an error, not a short clone.
    #[test]
    fn copies_every_byte_and_reports_progress() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src"), dir.path().join("dst"));
        let total: usize = (9 << 20) + 4096 * 3;
        let data: Vec<u8> = (0..total).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(&src, &data).unwrap();
        fs::write(&dst, vec![0xffu8; total]).unwrap();
        let mut seen = Vec::new();
        copy_device(&src, &dst, total as u64, &mut |done, all| {
            seen.push((done, all))
        })
        .unwrap();
        assert!(fs::read(&dst).unwrap() == data, "the copy differs");
        assert_eq!(seen.first(), Some(&(0, total as u64)));
        assert_eq!(seen.last(), Some(&(total as u64, total as u64)));
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");
        let err = copy_device(&src, &dst, total as u64 + 4096, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("it ends at"), "{err}");
    }

    /// L11: PVs no active LV uses are admitted by PV uuid, exactly one device each, of the VG.
    #[test]
    fn admits_unused_pvs_by_their_uuid_only() {
        let row = |name: &str, pv: &str, vg: &str| PvRow {
            pv_name: name.into(),
            pv_uuid: pv.into(),
            pv_missing: String::new(),
            vg_uuid: vg.into(),
        };
        let dashed = "AAAAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAAAA";
        assert_eq!(undashed(dashed), VG);
        let missing: BTreeSet<String> = ["pv-2".to_string()].into();
        let seen = [
            row("/dev/vda", "pv-1", dashed),
            row("/dev/vdc", "pv-2", dashed),
            row("/dev/vdd", "pv-2", "FFFFFF-FFFF-FFFF-FFFF-FFFF-FFFF-FFFFFF"),
        ];
        assert_eq!(
            find_missing_pvs(&missing, &seen, VG).unwrap(),
            paths(&["/dev/vdc"])
        );
        let why = find_missing_pvs(&missing, &seen[..1], VG).unwrap_err();
        assert!(why.contains("no device carries"), "{why}");
        let twice = [
            row("/dev/vdc", "pv-2", dashed),
            row("/dev/vde", "pv-2", dashed),
        ];
        let why = find_missing_pvs(&missing, &twice, VG).unwrap_err();
        assert!(why.contains("claimed by /dev/vdc, /dev/vde"), "{why}");
        let out = r#"{"report":[{"pv":[{"pv_uuid":"pv-2", "pv_missing":"missing"},{"pv_uuid":"pv-1", "pv_missing":""}]}]}"#;
        let rows = parse_pvs(out, "pvs").unwrap();
        assert_eq!(rows[0].pv_missing, "missing");
    }

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
                  {"lv_name":"vol1", "segtype":"thin", "lv_size":"1073741824", "lv_tags":"tandem-snapshot,tandem-owner-uid-1", "vg_uuid":"AAAAAA-AAAA-AAAA-AAAA-AAAA-AAAA-AAAAAA", "vg_missing_pv_count":"1"}
              ]
          }
      ]
  }"#;
        let r: Report = serde_json::from_str(out).unwrap();
        let row = &r.report[0].lv[0];
        assert_eq!(row.segtype, "thin");
        assert_eq!(size_of(row), 1 << 30);
        assert_eq!(undashed(&row.vg_uuid), VG);
        assert_eq!(row.missing_pvs(), 1);
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
