//! Planning a cut before anything is frozen: resolve every volume, refuse what may not be frozen,
//! plan every snapshot, and group the volumes by the filesystem to freeze. A cut that cannot be
//! planned whole fails here, with nothing frozen.

use crate::api::{FreezePolicy, VolumeStatus};

use crate::agent::backend::{self, BackendOptions, SnapshotPlan};
use crate::agent::discovery::{self, DevId, MountInfo, ResolvedVolume};
use crate::agent::freeze::Guardrails;

use super::{CutRequest, VolumeRequest};

/// Why a cut could not be planned, with what was found of each volume.
#[derive(Debug)]
pub(crate) struct Failure {
    pub volumes: Vec<VolumeStatus>,
    pub message: String,
}

/// A volume ready to be cut.
#[derive(Debug)]
pub(crate) struct PreparedVolume {
    pub request: VolumeRequest,
    pub resolved: ResolvedVolume,
    pub plan: SnapshotPlan,
    pub superblock: DevId,
    /// Whether its filesystem is frozen for the cut.
    pub freeze: bool,
    pub status: VolumeStatus,
}

/// Every volume of a cut, planned.
#[derive(Debug, Default)]
pub(crate) struct Prepared {
    pub volumes: Vec<PreparedVolume>,
}

/// A filesystem to freeze and the volumes on it.
#[derive(Debug, Clone)]
pub(crate) struct FreezeTarget {
    pub superblock: DevId,
    pub mount: MountInfo,
    pub volumes: Vec<usize>,
}

impl FreezeTarget {
    /// "volume pv (claim c) and … at /mount", for messages.
    pub fn describe(&self, prepared: &Prepared) -> String {
        let claims: Vec<String> = self
            .volumes
            .iter()
            .filter_map(|&i| prepared.volumes.get(i))
            .map(|v| {
                format!(
                    "volume {} (claim {})",
                    v.request.persistent_volume, v.request.claim
                )
            })
            .collect();
        format!(
            "{} at {}",
            claims.join(" and "),
            self.mount.mount_point.display()
        )
    }
}

impl Prepared {
    /// One target per superblock to freeze, in volume order.
    pub fn freeze_targets(&self) -> Vec<FreezeTarget> {
        let mut targets: Vec<FreezeTarget> = Vec::new();
        for (i, v) in self.volumes.iter().enumerate() {
            if !v.freeze {
                continue;
            }
            let Some(mount) = &v.resolved.mount else {
                continue;
            };
            if let Some(t) = targets.iter_mut().find(|t| t.superblock == v.superblock) {
                t.volumes.push(i);
            } else {
                targets.push(FreezeTarget {
                    superblock: v.superblock,
                    mount: mount.clone(),
                    volumes: vec![i],
                });
            }
        }
        targets
    }
}

/// Resolves and plans every volume of `req` against the mount table `mounts`.
pub(crate) fn prepare(
    req: &CutRequest,
    mounts: &[MountInfo],
    guard: &Guardrails,
    options: &BackendOptions,
    sysfs_block: &std::path::Path,
) -> Result<Prepared, Failure> {
    let mut volumes = Vec::new();
    let mut statuses = Vec::new();
    let mut problems = Vec::new();
    for request in &req.volumes {
        let mut status = VolumeStatus {
            claim: request.claim.clone(),
            ..Default::default()
        };
        let who = format!(
            "volume {} (claim {})",
            request.persistent_volume, request.claim
        );
        let mut refuse = |status: VolumeStatus, why: String, problem: String| {
            let mut status = status;
            status.reason = Some(why);
            problems.push(problem);
            statuses.push(status);
        };
        let resolved = match discovery::resolve_volume(&request.path, mounts, sysfs_block) {
            Ok(r) => r,
            Err(e) => {
                refuse(status, e.to_string(), format!("{who}: {e}"));
                continue;
            }
        };
        status.device = Some(resolved.device.display().to_string());
        status.filesystem = resolved.fs_type().map(str::to_string);
        // Refuse the node's own filesystems before anything else is considered.
        if let Some(mount) = &resolved.mount
            && let Err(refusal) = guard.check_volume(
                &request.path,
                mount,
                mounts,
                &request.persistent_volume,
                request.allow_shared_filesystem,
            )
        {
            refuse(status, refusal.to_string(), format!("{who}: {refusal}"));
            continue;
        }
        // The name and mark carry the cut's identity (the NodeSnapshot uid): a later cut with the
        // same names never adopts nor deletes this one's snapshot.
        let plan = match backend::snapshot_name(
            &req.namespace,
            &req.group_snapshot,
            &request.persistent_volume,
            &req.key,
        )
        .and_then(|name| {
            if request.central {
                backend::rbd::plan(&resolved, &req.key)
            } else {
                backend::plan(&resolved, &name, &req.key, options)
            }
        }) {
            Ok(p) => p,
            Err(e) => {
                refuse(status, e.to_string(), format!("{who}: {e}"));
                continue;
            }
        };
        status.backend = Some(plan.backend.name().to_string());
        // Why this volume will not be frozen, if it will not.
        let no_freeze = if req.freeze == FreezePolicy::Disabled {
            Some("freeze is Disabled for this group".to_string())
        } else if resolved.mount.is_none() {
            Some("a block-mode volume has no filesystem to freeze".into())
        } else if !plan.backend.snapshots_under_freeze() {
            Some("a btrfs snapshot cannot be taken while its filesystem is frozen (it would block until the thaw); the snapshot is atomic for this subvolume only".into())
        } else {
            None
        };
        if let Some(why) = &no_freeze {
            if req.freeze == FreezePolicy::Required {
                refuse(
                    status,
                    why.clone(),
                    format!("{who} cannot be frozen: {why}"),
                );
                continue;
            }
            status.reason = Some(why.clone());
        }
        let superblock = resolved
            .mount
            .as_ref()
            .map(|m| m.dev)
            .unwrap_or(resolved.block_dev);
        statuses.push(status.clone());
        volumes.push(PreparedVolume {
            request: request.clone(),
            resolved,
            plan,
            superblock,
            freeze: no_freeze.is_none(),
            status,
        });
    }
    if !problems.is_empty() {
        return Err(Failure {
            volumes: statuses,
            message: problems.join("; "),
        });
    }
    Ok(Prepared { volumes })
}
