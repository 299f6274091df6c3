//! The clone journal: one JSON file per NodeRestore (by uid) under `<state_dir>/restores/`,
//! written before a clone is made and again as each clone is made or deleted, so that a restart
//! knows every clone that may exist. Replaced atomically (write, fsync, rename, fsync dir), like
//! the cut journal, with a schema of its own ([`RESTORE_JOURNAL_VERSION`]).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::agent::backend::clone::ClonePlan;
use crate::api::CloneMethod;

/// The schema version this agent writes.
pub const RESTORE_JOURNAL_VERSION: u32 = 1;

/// A clone journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RestoreJournalError {
    #[error("restore journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("restore journal entry {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "restore journal entry {path} has schema version {version}, newer than this agent's {RESTORE_JOURNAL_VERSION}"
    )]
    TooNew { path: PathBuf, version: u64 },
}

/// How a restore that does not keep its clones ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Outcome {
    /// A clone could not be made (or the agent restarted while cloning).
    Failed,
    /// The controller asked (Abort), or the NodeRestore was deleted.
    Aborted,
}

/// How far a restore got, as journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    /// The intent is journaled and clones are being made: every record may exist.
    Cloning,
    /// Every clone was made; they are kept (each until it is released).
    Cloned,
    /// Every clone not deleted yet is being deleted; the restore then ends as `outcome`.
    RollingBack { outcome: Outcome },
    /// Ended: nothing is kept.
    Ended { outcome: Outcome },
}

/// Where one clone stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum CloneState {
    /// Journaled before `create`: the clone may exist (made, half made, or not at all).
    Intent,
    /// Made (and attached); `made` says where.
    Made,
    /// `create` failed (and removed what it half made); nothing of ours is there.
    Failed,
    /// Deleted (or found absent, or found not ours and left alone).
    Deleted,
}

/// Where a made clone is published.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MadeClone {
    pub path: PathBuf,
    pub block: bool,
    pub size_bytes: u64,
    pub method: CloneMethod,
    /// RFC 3339.
    pub cloned_at: String,
}

/// One clone of a restore.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CloneRecord {
    /// The PersistentVolume the clone is for (its key).
    pub persistent_volume: String,
    pub claim: String,
    /// The snapshot, the clone's place and its owner.
    pub plan: ClonePlan,
    /// The filesystem in the snapshot (as the cut reported it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filesystem: Option<String>,
    pub state: CloneState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub made: Option<MadeClone>,
    /// Why the clone failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// A delete or attach of this clone that failed and is retried (this run only).
    #[serde(skip)]
    pub problem: Option<Problem>,
}

/// Something about a clone that failed and is retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    Delete(String),
    Attach(String),
}

impl CloneRecord {
    /// Whether something of ours may be at the clone's place.
    pub fn may_exist(&self) -> bool {
        matches!(self.state, CloneState::Intent | CloneState::Made)
    }
}

/// One NodeRestore's clones, as written down.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RestoreEntry {
    #[serde(default)]
    pub version: u32,
    /// The NodeRestore's uid (every clone's owner).
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub stage: Stage,
    /// Why the restore is rolled back or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub clones: Vec<CloneRecord>,
}

impl RestoreEntry {
    /// Whether any clone may still exist.
    pub fn holds_clones(&self) -> bool {
        self.clones.iter().any(CloneRecord::may_exist)
    }

    pub fn clone_of(&self, pv: &str) -> Option<&CloneRecord> {
        self.clones.iter().find(|c| c.persistent_volume == pv)
    }

    pub fn clone_of_mut(&mut self, pv: &str) -> Option<&mut CloneRecord> {
        self.clones.iter_mut().find(|c| c.persistent_volume == pv)
    }
}

/// The directory of clone journal entries.
#[derive(Debug, Clone)]
pub struct RestoreJournal {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RestoreJournalError + '_ {
    move |source| RestoreJournalError::Io {
        path: path.into(),
        source,
    }
}

fn parse(path: &Path, data: &[u8]) -> Result<RestoreEntry, RestoreJournalError> {
    let corrupt = |source| RestoreJournalError::Corrupt {
        path: path.into(),
        source,
    };
    let value: serde_json::Value = serde_json::from_slice(data).map_err(corrupt)?;
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version > u64::from(RESTORE_JOURNAL_VERSION) {
        return Err(RestoreJournalError::TooNew {
            path: path.into(),
            version,
        });
    }
    serde_json::from_value(value).map_err(corrupt)
}

impl RestoreJournal {
    /// Opens (creating) `<state_dir>/restores`.
    pub fn open(state_dir: &Path) -> Result<Self, RestoreJournalError> {
        let dir = state_dir.join("restores");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(RestoreJournal { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_of(&self, key: &str) -> PathBuf {
        let safe: String = key
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.json"))
    }

    /// Writes an entry durably before returning.
    pub fn write(&self, entry: &RestoreEntry) -> Result<(), RestoreJournalError> {
        let path = self.path_of(&entry.key);
        let tmp = path.with_extension("json.tmp");
        let mut entry = entry.clone();
        entry.version = RESTORE_JOURNAL_VERSION;
        let data =
            serde_json::to_vec_pretty(&entry).map_err(|source| RestoreJournalError::Corrupt {
                path: path.clone(),
                source,
            })?;
        let written = (|| {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// Reads one entry.
    pub fn get(&self, key: &str) -> Result<Option<RestoreEntry>, RestoreJournalError> {
        let path = self.path_of(key);
        match fs::read(&path) {
            Ok(data) => parse(&path, &data).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Reads every entry, with the key its file is named after; one that cannot be read is
    /// returned as its error (and kept on disk: the clones it names are never forgotten silently).
    #[allow(clippy::type_complexity)]
    pub fn all(
        &self,
    ) -> Result<Vec<(String, Result<RestoreEntry, RestoreJournalError>)>, RestoreJournalError> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let path = item.map_err(io(&self.dir))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let key = path
                .file_stem()
                .map(|k| k.to_string_lossy().into_owned())
                .unwrap_or_default();
            out.push((
                key,
                fs::read(&path)
                    .map_err(io(&path))
                    .and_then(|data| parse(&path, &data)),
            ));
        }
        Ok(out)
    }

    /// Forgets an entry (once nothing of it may exist).
    pub fn remove(&self, key: &str) -> Result<(), RestoreJournalError> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::agent::backend::clone::CloneHandle;
    use crate::agent::backend::{BackendKind, SnapshotHandle};

    pub(crate) fn record(pv: &str, state: CloneState) -> CloneRecord {
        CloneRecord {
            persistent_volume: pv.into(),
            claim: format!("{pv}-claim"),
            plan: ClonePlan {
                backend: BackendKind::Reflink,
                snapshot: SnapshotHandle::Reflink {
                    clone: format!("/pool/.tandem-snapshots/{pv}.img").into(),
                    owner: "cut-uid".into(),
                },
                handle: CloneHandle::Reflink {
                    image: format!("/pool/.tandem-restores/{pv}.img").into(),
                    link: format!("/dev/tandem/{pv}").into(),
                    owner: "restore-uid".into(),
                },
            },
            filesystem: Some("xfs".into()),
            state,
            made: None,
            message: None,
            problem: None,
        }
    }

    fn entry() -> RestoreEntry {
        RestoreEntry {
            version: RESTORE_JOURNAL_VERSION,
            key: "restore-uid".into(),
            namespace: "ns".into(),
            name: "r".into(),
            stage: Stage::Cloning,
            message: None,
            clones: vec![
                record("pv-a", CloneState::Intent),
                record("pv-b", CloneState::Intent),
            ],
        }
    }

    #[test]
    fn entries_round_trip_are_replaced_atomically_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let j = RestoreJournal::open(dir.path()).unwrap();
        let mut e = entry();
        j.write(&e).unwrap();
        assert_eq!(j.get("restore-uid").unwrap().unwrap(), e);
        e.clones[0].state = CloneState::Made;
        e.clones[0].made = Some(MadeClone {
            path: "/dev/tandem/pv-a".into(),
            block: true,
            size_bytes: 1 << 20,
            method: CloneMethod::Clone,
            cloned_at: "2026-12-01T10:00:00Z".into(),
        });
        e.stage = Stage::RollingBack {
            outcome: Outcome::Failed,
        };
        j.write(&e).unwrap();
        assert_eq!(j.get("restore-uid").unwrap().unwrap(), e);
        assert_eq!(fs::read_dir(j.dir()).unwrap().count(), 1, "no temp file");
        assert_eq!(j.all().unwrap().len(), 1);
        j.remove("restore-uid").unwrap();
        assert!(j.get("restore-uid").unwrap().is_none());
        j.remove("restore-uid").unwrap();
    }

    #[test]
    fn corrupt_and_newer_entries_are_errors_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let j = RestoreJournal::open(dir.path()).unwrap();
        fs::write(j.dir().join("bad.json"), b"{").unwrap();
        let mut newer = serde_json::to_value(entry()).unwrap();
        newer["version"] = serde_json::json!(7);
        newer["key"] = serde_json::json!("newer");
        fs::write(
            j.dir().join("newer.json"),
            serde_json::to_vec(&newer).unwrap(),
        )
        .unwrap();
        let all = j.all().unwrap();
        assert_eq!(all.len(), 2);
        assert!(
            all.iter()
                .any(|(k, e)| k == "bad" && matches!(e, Err(RestoreJournalError::Corrupt { .. })))
        );
        assert!(all.iter().any(|(k, e)| k == "newer"
            && matches!(e, Err(RestoreJournalError::TooNew { version: 7, .. }))));
        assert!(j.dir().join("bad.json").exists());
    }

    #[test]
    fn holds_clones_while_any_may_exist() {
        let mut e = entry();
        assert!(e.holds_clones());
        e.clones[0].state = CloneState::Deleted;
        e.clones[1].state = CloneState::Failed;
        assert!(!e.holds_clones());
        e.clones[1].state = CloneState::Made;
        assert!(e.holds_clones());
    }
}
