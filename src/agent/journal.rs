//! The agent's journal: before it freezes anything, the agent writes down what it is about to freeze
//! and which snapshots it is about to cut, in `--state-dir` on the host (never on a filesystem it
//! freezes). On start it thaws whatever an unfinished entry says may still be frozen and deletes
//! that entry's snapshots, so neither a freeze nor a half-cut snapshot outlives a crash.
//!
//! One JSON file per NodeSnapshot (by uid), replaced atomically (write, fsync, rename, fsync dir).
//! The schema is the journal's own and versioned ([`JOURNAL_VERSION`]); the status last published
//! is kept beside it as a report only, so an API change can never make the safety record
//! unreadable. An entry that does not parse as a whole is still read for its `frozen` list.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::api::NodeSnapshotStatus;

use super::backend::SnapshotHandle;
use super::discovery::DevId;

/// The schema version this agent writes. Entries without a version are version 0 (the first
/// agents), which it also reads.
pub const JOURNAL_VERSION: u32 = 1;

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
    #[error(
        "journal entry {path} has schema version {version}, newer than this agent's {JOURNAL_VERSION}"
    )]
    TooNew { path: PathBuf, version: u64 },
}

/// How far a cut got, as journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    /// About to freeze (or frozen, or cutting): everything listed may be frozen and may exist.
    Freezing,
    /// Frozen, snapshots cut, freeze held until release (written by older agents only; the same
    /// as `Freezing` for recovery).
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

/// Which filesystem a record is about, beyond its device number (device numbers of loop devices
/// are reused): recovery thaws only a filesystem that is still the same one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsIdentity {
    /// The filesystem uuid (FS_IOC_GETFSUUID), when the filesystem has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Device and inode of the mount's root directory.
    pub root_dev: u64,
    pub root_ino: u64,
}

/// A filesystem the agent is about to freeze.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrozenRecord {
    pub mount_point: PathBuf,
    pub superblock: DevId,
    /// Who the filesystem was when the intent was written (absent in version 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<FsIdentity>,
    /// Set when FIFREEZE answered EBUSY: someone else holds that freeze, never thaw it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_ours: bool,
}

/// One NodeSnapshot's cut, as written down.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JournalEntry {
    /// The schema version ([`JOURNAL_VERSION`]; 0 when absent).
    #[serde(default)]
    pub version: u32,
    /// The NodeSnapshot's uid (or a one-shot run's name).
    pub key: String,
    pub namespace: String,
    pub name: String,
    pub group_snapshot: String,
    /// The boot the entry was written in: no freeze survives a reboot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    pub stage: Stage,
    /// What is (or may be) frozen while the stage says so.
    pub frozen: Vec<FrozenRecord>,
    /// Every snapshot planned for this cut (its own names; journaled before the freeze so that a
    /// crash can clean up).
    pub snapshots: Vec<SnapshotHandle>,
    /// The snapshots the cut made, as each create returned them, and not deleted yet.
    #[serde(default)]
    pub made: Vec<SnapshotHandle>,
    /// The status last published (a report, not part of the safety record: an entry whose report
    /// does not parse is still recovered).
    #[serde(
        default,
        alias = "status",
        deserialize_with = "lenient",
        skip_serializing_if = "Option::is_none"
    )]
    pub report: Option<NodeSnapshotStatus>,
}

fn lenient<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<NodeSnapshotStatus>, D::Error> {
    let value = <serde_json::Value as serde::Deserialize>::deserialize(d)?;
    Ok(serde_json::from_value(value).ok())
}

/// One file of the journal as read back.
#[derive(Debug)]
pub enum Loaded {
    Entry(Box<JournalEntry>),
    /// An entry that does not parse as a whole (or is from a newer agent); what of its safety
    /// record could be read. `may_be_frozen` is true unless its stage says otherwise.
    Damaged {
        path: PathBuf,
        key: Option<String>,
        frozen: Vec<FrozenRecord>,
        may_be_frozen: bool,
        error: JournalError,
    },
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

/// Parses one file: the whole entry, or what of its safety record can be read.
fn load(path: PathBuf, data: &[u8]) -> Loaded {
    let value: serde_json::Value = match serde_json::from_slice(data) {
        Ok(v) => v,
        Err(source) => {
            return Loaded::Damaged {
                path: path.clone(),
                key: None,
                frozen: Vec::new(),
                may_be_frozen: true,
                error: JournalError::Corrupt { path, source },
            };
        }
    };
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    let parsed = if version > u64::from(JOURNAL_VERSION) {
        Err(JournalError::TooNew {
            path: path.clone(),
            version,
        })
    } else {
        serde_json::from_value::<JournalEntry>(value.clone()).map_err(|source| {
            JournalError::Corrupt {
                path: path.clone(),
                source,
            }
        })
    };
    match parsed {
        Ok(entry) => Loaded::Entry(Box::new(entry)),
        Err(error) => {
            // Salvage every record that parses on its own.
            let frozen = value
                .get("frozen")
                .and_then(|f| f.as_array())
                .map(|records| {
                    records
                        .iter()
                        .filter_map(|r| serde_json::from_value(r.clone()).ok())
                        .collect()
                })
                .unwrap_or_default();
            let may_be_frozen = value
                .get("stage")
                .and_then(|s| serde_json::from_value::<Stage>(s.clone()).ok())
                .is_none_or(Stage::may_be_frozen);
            Loaded::Damaged {
                path,
                key: value
                    .get("key")
                    .and_then(|k| k.as_str())
                    .map(str::to_string),
                frozen,
                may_be_frozen,
                error,
            }
        }
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

    /// Writes an entry durably before returning (stamped with this agent's schema version).
    pub fn write(&self, entry: &JournalEntry) -> Result<(), JournalError> {
        let path = self.path_of(&entry.key);
        let tmp = path.with_extension("json.tmp");
        let mut entry = entry.clone();
        entry.version = JOURNAL_VERSION;
        let data = serde_json::to_vec_pretty(&entry).map_err(|source| JournalError::Corrupt {
            path: path.clone(),
            source,
        })?;
        let written = (|| {
            let mut f = File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(&data).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))
        })();
        if let Err(e) = written {
            // Leave no partial temp file behind on a full disk.
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
    pub fn get(&self, key: &str) -> Result<Option<JournalEntry>, JournalError> {
        let path = self.path_of(key);
        match fs::read(&path) {
            Ok(data) => match load(path, &data) {
                Loaded::Entry(e) => Ok(Some(*e)),
                Loaded::Damaged { error, .. } => Err(error),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Reads every entry; an entry that does not parse is returned with what could be salvaged.
    pub fn all(&self) -> Result<Vec<Loaded>, JournalError> {
        let mut out = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(io(&self.dir))? {
            let item = item.map_err(io(&self.dir))?;
            let path = item.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            out.push(match fs::read(&path) {
                Ok(data) => load(path, &data),
                Err(e) => Loaded::Damaged {
                    path: path.clone(),
                    key: None,
                    frozen: Vec::new(),
                    may_be_frozen: true,
                    error: io(&path)(e),
                },
            });
        }
        Ok(out)
    }

    /// Sets a damaged entry aside (`<file>.damaged`) once what it could say was acted on, so a
    /// restart does not act on it again; it stays for a person to read.
    pub fn set_aside(&self, path: &Path) -> Result<(), JournalError> {
        let mut to = path.as_os_str().to_owned();
        to.push(".damaged");
        fs::rename(path, PathBuf::from(to)).map_err(io(path))
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

    fn entry() -> JournalEntry {
        JournalEntry {
            version: JOURNAL_VERSION,
            key: "uid-1".into(),
            namespace: "ns".into(),
            name: "n".into(),
            group_snapshot: "g".into(),
            boot_id: Some("b".into()),
            stage: Stage::Freezing,
            frozen: vec![FrozenRecord {
                mount_point: "/mnt/a".into(),
                superblock: DevId { major: 7, minor: 3 },
                identity: Some(FsIdentity {
                    uuid: Some("u".into()),
                    root_dev: 1795,
                    root_ino: 2,
                }),
                not_ours: false,
            }],
            snapshots: vec![SnapshotHandle::Lvm {
                vg: "vg0".into(),
                lv: "tandem.ns.g.pv".into(),
                owner: "uid-1".into(),
            }],
            made: Vec::new(),
            report: Some(NodeSnapshotStatus::default()),
        }
    }

    #[test]
    fn entries_round_trip_and_are_replaced_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut e = entry();
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
            Some(Loaded::Damaged {
                error: JournalError::Corrupt { .. },
                may_be_frozen: true,
                ..
            })
        ));
    }

    /// The safety record survives a report (or anything else) that no longer parses.
    #[test]
    fn frozen_records_are_salvaged_from_an_entry_that_does_not_parse() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut value = serde_json::to_value(entry()).unwrap();
        value["snapshots"] = serde_json::json!([{"NoSuchBackend": {}}]);
        fs::write(
            j.dir().join("uid-1.json"),
            serde_json::to_vec(&value).unwrap(),
        )
        .unwrap();
        let Some(Loaded::Damaged {
            key,
            frozen,
            may_be_frozen,
            ..
        }) = j.all().unwrap().pop()
        else {
            panic!("expected a damaged entry");
        };
        assert_eq!(key.as_deref(), Some("uid-1"));
        assert!(may_be_frozen);
        assert_eq!(frozen, entry().frozen);

        // A report of another shape is only a lost report.
        value = serde_json::to_value(entry()).unwrap();
        value["report"] = serde_json::json!({"phase": "RenamedPhase"});
        fs::write(
            j.dir().join("uid-1.json"),
            serde_json::to_vec(&value).unwrap(),
        )
        .unwrap();
        let e = j.get("uid-1").unwrap().unwrap();
        assert_eq!(e.report, None);
        assert_eq!(e.frozen, entry().frozen);

        // A newer schema is not guessed at, but its frozen list is still read.
        value = serde_json::to_value(entry()).unwrap();
        value["version"] = serde_json::json!(99);
        fs::write(
            j.dir().join("uid-1.json"),
            serde_json::to_vec(&value).unwrap(),
        )
        .unwrap();
        assert!(matches!(
            j.all().unwrap().pop(),
            Some(Loaded::Damaged { error: JournalError::TooNew { .. }, frozen, .. }) if frozen.len() == 1
        ));
    }

    /// Entries of the first agents (no version, the API status inline) are still read.
    #[test]
    fn version_0_entries_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let v0 = serde_json::json!({
            "key": "old", "namespace": "ns", "name": "n", "group_snapshot": "g",
            "stage": "Held",
            "frozen": [{"mount_point": "/mnt/a", "superblock": {"major": 7, "minor": 3}}],
            "snapshots": [{"Reflink": {"clone": "/p/.tandem-snapshots/x.img"}}],
            "status": {"phase": "Cut"}
        });
        fs::write(j.dir().join("old.json"), serde_json::to_vec(&v0).unwrap()).unwrap();
        let e = j.get("old").unwrap().unwrap();
        assert_eq!(e.version, 0);
        assert_eq!(e.stage, Stage::Held);
        assert_eq!(e.frozen[0].identity, None);
        assert!(!e.frozen[0].not_ours);
        assert_eq!(e.report.map(|r| r.phase), Some(crate::api::NodePhase::Cut));
        j.write(&e_with_key(&j, "old")).unwrap();
        assert_eq!(j.get("old").unwrap().unwrap().version, JOURNAL_VERSION);
    }

    fn e_with_key(j: &Journal, key: &str) -> JournalEntry {
        j.get(key).unwrap().unwrap()
    }
}
