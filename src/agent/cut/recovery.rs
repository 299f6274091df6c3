//! Crash recovery on start: every journal entry that may still be frozen is thawed (only where the
//! filesystem is still the one recorded, and never a freeze that was someone else's), its snapshots
//! are deleted, and it is journaled as aborted. An entry that does not parse is still thawed from
//! its `frozen` list, then set aside.

use std::collections::BTreeMap;

use crate::api::NodePhase;

use super::snapshots::delete_own;
use crate::agent::discovery::MountInfo;
use crate::agent::freeze::{self, Thawed};
use crate::agent::journal::{FrozenRecord, JournalEntry, Loaded, Stage};

use super::state::condition;
use super::{
    CONDITION_DELETE_FAILED, CONDITION_READY, Engine, EngineError, FreezeOps, identity_of,
};

/// What became of one record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RecordThaw {
    Thawed(Thawed),
    /// Not thawed on purpose: the reason.
    Skipped(String),
}

pub(super) fn recover(
    engine: &Engine,
    mounts: &[MountInfo],
) -> Result<Vec<JournalEntry>, EngineError> {
    let inner = &engine.inner;
    let ops = inner.config.freeze_ops.as_ref();
    let mut recovered = Vec::new();
    for loaded in inner.journal.all()? {
        let mut entry = match loaded {
            Loaded::Entry(e) => *e,
            Loaded::Damaged {
                path,
                key,
                frozen,
                may_be_frozen,
                error,
            } => {
                tracing::error!(%error, key = key.as_deref().unwrap_or("?"), "unreadable journal entry: thawing what it lists, leaving its snapshots alone; check it by hand");
                if may_be_frozen {
                    for record in frozen.iter().filter(|r| !r.not_ours) {
                        match thaw_record(record, mounts, ops) {
                            Ok(how) => {
                                tracing::info!(mount = %record.mount_point.display(), ?how, "thawed on start")
                            }
                            Err(e) => tracing::error!(error = %e, "cannot thaw on start"),
                        }
                    }
                }
                if let Err(e) = inner.journal.set_aside(&path) {
                    tracing::error!(error = %e, "cannot set the unreadable entry aside");
                }
                continue;
            }
        };
        if !entry.stage.may_be_frozen() {
            continue;
        }
        tracing::warn!(key = %entry.key, stage = ?entry.stage, "found an unfinished cut in the journal: thawing and deleting its snapshots");
        let mut problems = Vec::new();
        let rebooted =
            matches!((&entry.boot_id, &inner.boot_id), (Some(then), Some(now)) if then != now);
        if rebooted {
            tracing::info!(key = %entry.key, "the node rebooted since: nothing of this cut can still be frozen");
        } else {
            for record in &entry.frozen {
                if record.not_ours {
                    tracing::info!(mount = %record.mount_point.display(), "not thawing a freeze that was someone else's (EBUSY)");
                    continue;
                }
                match thaw_record(record, mounts, ops) {
                    Ok(how) => {
                        tracing::info!(mount = %record.mount_point.display(), ?how, "thawed on start")
                    }
                    Err(e) => problems.push(e),
                }
            }
        }
        // What the cut made, and what it planned (a create may have returned after the last
        // write). Deleting a planned name relies on the backend's identity check (C1).
        let mut to_delete = entry.made.clone();
        for h in &entry.snapshots {
            if !to_delete.contains(h) {
                to_delete.push(h.clone());
            }
        }
        let mut left = Vec::new();
        let mut delete_problems = Vec::new();
        for handle in to_delete {
            match delete_own(&handle, &inner.config.backend) {
                Ok(()) => {}
                Err(e) => {
                    delete_problems.push(format!("cannot delete snapshot {handle}: {e}"));
                    left.push(handle);
                }
            }
        }
        let mut message = "the agent restarted while this cut was in progress: it thawed the volumes on start and deleted the snapshots".to_string();
        if !problems.is_empty() {
            message.push_str(&format!("; problems: {}", problems.join("; ")));
        }
        let mut report = entry.report.clone().unwrap_or_default();
        report.phase = NodePhase::Aborted;
        report.message = Some(message.clone());
        for v in &mut report.volumes {
            v.snapshot_handle = None;
        }
        report.conditions = vec![condition(
            &report.conditions,
            CONDITION_READY,
            false,
            "Aborted",
            message,
            report.observed_generation,
        )];
        if !delete_problems.is_empty() {
            report.conditions.push(condition(
                &[],
                CONDITION_DELETE_FAILED,
                true,
                "DeleteFailed",
                format!(
                    "{}; the agent keeps them journaled and retries",
                    delete_problems.join("; ")
                ),
                report.observed_generation,
            ));
        }
        entry.stage = Stage::Aborted;
        entry.made = left;
        entry.report = Some(report);
        inner.journal.write(&entry)?;
        recovered.push(entry);
    }
    Ok(recovered)
}

/// Thaws a journal record on start: through the mount at the recorded place if it is still the same
/// filesystem, else through any mount of that superblock; never a filesystem whose identity
/// changed since it was recorded.
pub(crate) fn thaw_record(
    record: &FrozenRecord,
    mounts: &[MountInfo],
    ops: &dyn FreezeOps,
) -> Result<RecordThaw, String> {
    let candidates = mounts
        .iter()
        .filter(|m| m.dev == record.superblock)
        .map(|m| m.mount_point.clone());
    let preferred = std::iter::once(record.mount_point.clone()).filter(|p| {
        mounts
            .iter()
            .any(|m| &m.mount_point == p && m.dev == record.superblock)
    });
    let mut tried = Vec::new();
    let mut seen = BTreeMap::new();
    for path in preferred.chain(candidates) {
        if seen.insert(path.clone(), ()).is_some() {
            continue;
        }
        let fd = match freeze::open_dir(&path) {
            Ok(fd) => fd,
            Err(e) => {
                tried.push(e.to_string());
                continue;
            }
        };
        if let (Some(then), Some(now)) = (
            record.identity.as_ref().and_then(|i| i.uuid.as_ref()),
            identity_of(&fd).and_then(|i| i.uuid),
        ) && then != &now
        {
            return Ok(RecordThaw::Skipped(format!(
                "{} ({}) is another filesystem now (uuid {now}, journaled {then})",
                path.display(),
                record.superblock
            )));
        }
        match ops.thaw(&fd, &path) {
            Ok(t) => return Ok(RecordThaw::Thawed(t)),
            Err(e) => tried.push(e.to_string()),
        }
    }
    Err(format!(
        "cannot thaw {} ({}): no mount of that filesystem is left{}",
        record.mount_point.display(),
        record.superblock,
        if tried.is_empty() {
            String::new()
        } else {
            format!(" ({})", tried.join("; "))
        }
    ))
}
