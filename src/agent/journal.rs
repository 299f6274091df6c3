//! The agent's journal: before it freezes anything, the agent writes down what it is about to freeze
//! and which snapshots it is about to cut, in `--state-dir` on the host (never on a filesystem it
//! freezes). On start it thaws whatever an unfinished entry says may still be frozen and deletes
//! that entry's snapshots, so neither a freeze nor a half-cut snapshot outlives a crash.
//!
//! One JSON file per NodeSnapshot (by uid), replaced atomically (write, fsync, rename, fsync dir).

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::api::NodeSnapshotStatus;

use super::backend::SnapshotHandle;
use super::discovery::DevId;

/// A journal that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal entry {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// How far a cut got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    /// About to freeze (or frozen, or cutting): everything listed may be frozen and may exist.
    Freezing,
    /// Frozen, snapshots cut, freeze held until release.
    Held,
    /// Thawed; the snapshots are kept.
    Released,
    /// Thawed; the snapshots are deleted.
    Aborted,
    /// Thawed; nothing was kept.
    Failed,
}

impl Stage {
    /// Whether the filesystems may still be frozen in this stage.
    pub fn may_be_frozen(self) -> bool {
        matches!(self, Stage::Freezing | Stage::Held)
    }
}

/// A filesystem the agent is about to freeze.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrozenRecord {
    pub mount_point: PathBuf,
    pub superblock: DevId,
}

/// One NodeSnapshot's cut, as written down.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JournalEntry {
    /// The NodeSnapshot's uid (or a one-shot run's name).
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub group_snapshot: String,
    pub stage: Stage,
    /// What is (or may be) frozen while the stage says so.
    pub frozen: Vec<FrozenRecord>,
    /// Every snapshot planned or cut (deleting one that was never made is a no-op).
    pub snapshots: Vec<SnapshotHandle>,
    /// The last status the agent computed.
    pub status: NodeSnapshotStatus,
}

/// The journal directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.into(),
        source,
    }
}

impl Journal {
    /// Opens (creating) `<state_dir>/journal`.
    pub fn open(state_dir: &Path) -> Result<Self, JournalError> {
        let dir = state_dir.join("journal");
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Journal { dir })
    }

    /// The directory the entries are in.
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
    pub fn write(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let path = self.path_of(&entry.key);
        let tmp = path.with_extension("json.tmp");
        let data = serde_json::to_vec_pretty(entry).map_err(|source| JournalError::Corrupt {
            path: path.clone(),
            source,
        })?;
        {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        fs::rename(&tmp, &path).map_err(io(&path))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }

    /// Reads one entry.
    pub fn get(&self, key: &str) -> Result<Option<JournalEntry>, JournalError> {
        let path = self.path_of(key);
        match fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data)
                .map(Some)
                .map_err(|source| JournalError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Reads every entry (corrupt ones are reported, not skipped silently).
    pub fn all(&self) -> Result<Vec<Result<JournalEntry, JournalError>>, JournalError> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let item = item.map_err(io(&self.dir))?;
            let path = item.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            out.push(match fs::read(&path) {
                Ok(data) => serde_json::from_slice(&data)
                    .map_err(|source| JournalError::Corrupt { path, source }),
                Err(e) => Err(io(&path)(e)),
            });
        }
        Ok(out)
    }

    /// Forgets an entry (after its snapshots are deleted or handed over).
    pub fn remove(&self, key: &str) -> Result<(), JournalError> {
        let path = self.path_of(key);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_are_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut e = JournalEntry {
            key: "uid-1".into(),
            namespace: "ns".into(),
            name: "n".into(),
            group_snapshot: "g".into(),
            stage: Stage::Freezing,
            frozen: vec![FrozenRecord {
                mount_point: "/mnt/a".into(),
                superblock: DevId { major: 7, minor: 3 },
            }],
            snapshots: vec![SnapshotHandle::Lvm {
                vg: "vg0".into(),
                lv: "tandem.ns.g.pv".into(),
            }],
            status: NodeSnapshotStatus::default(),
        };
        j.write(&e).unwrap();
        assert_eq!(j.get("uid-1").unwrap().unwrap(), e);
        e.stage = Stage::Held;
        j.write(&e).unwrap();
        assert_eq!(j.get("uid-1").unwrap().unwrap().stage, Stage::Held);
        assert_eq!(j.all().unwrap().len(), 1);
        assert!(
            fs::read_dir(j.dir()).unwrap().count() == 1,
            "no temp file left"
        );
        j.remove("uid-1").unwrap();
        assert!(j.get("uid-1").unwrap().is_none());
        j.remove("uid-1").unwrap();
    }

    #[test]
    fn corrupt_entries_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        fs::write(j.dir().join("bad.json"), b"{").unwrap();
        assert!(matches!(
            j.all().unwrap().pop(),
            Some(Err(JournalError::Corrupt { .. }))
        ));
    }
}
