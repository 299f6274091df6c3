//! The executor against a fake backend (files in a temp dir marked with their owner): all or
//! nothing, restart recovery, cancel, release, foreign objects, failed deletes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::backend::clone::{CloneHandle, CloneInfo, ClonePlan, Progress};
use crate::agent::backend::{BackendError, BackendKind, Deleted, SnapshotHandle};
use crate::api::CloneMethod;

use super::executor::{CloneOps, Recovered, Restores};
use super::journal::{CloneRecord, CloneState, Outcome, RestoreJournal, Stage};
use super::lifecycle::{Journaled, RESTARTED};

#[derive(Default)]
struct Fake {
    dir: PathBuf,
    fail_create: Mutex<HashSet<String>>,
    fail_delete: Mutex<HashSet<String>>,
    /// Volumes whose create reports 10 of 100 bytes copied, many times, then waits this long.
    slow: Mutex<Option<(String, Duration)>>,
    attached: Mutex<Vec<String>>,
}

fn image_of(h: &CloneHandle) -> &Path {
    match h {
        CloneHandle::Reflink { image, .. } => image,
        _ => unreachable!("the fake makes reflink handles only"),
    }
}

fn owner_of(h: &CloneHandle) -> &str {
    match h {
        CloneHandle::Reflink { owner, .. }
        | CloneHandle::Lvm { owner, .. }
        | CloneHandle::Btrfs { owner, .. } => owner,
    }
}

fn pv_of(h: &CloneHandle) -> String {
    image_of(h)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl CloneOps for Fake {
    fn plan(
        &self,
        snapshot: &SnapshotHandle,
        _namespace: &str,
        pv: &str,
        owner: &str,
    ) -> Result<ClonePlan, BackendError> {
        Ok(ClonePlan {
            backend: BackendKind::Reflink,
            snapshot: snapshot.clone(),
            handle: CloneHandle::Reflink {
                image: self.dir.join(format!("{pv}.img")),
                link: self.dir.join(format!("{pv}.link")),
                owner: owner.into(),
            },
        })
    }
    fn create(&self, plan: &ClonePlan, progress: Progress<'_>) -> Result<CloneInfo, BackendError> {
        let image = image_of(&plan.handle);
        if self
            .fail_create
            .lock()
            .unwrap()
            .contains(&pv_of(&plan.handle))
        {
            return Err(BackendError::Io {
                what: format!("clone {}", image.display()),
                source: std::io::Error::other("no space left (fake)"),
            });
        }
        if image.exists() {
            return Err(BackendError::AlreadyExists {
                what: image.display().to_string(),
            });
        }
        let slow = self.slow.lock().unwrap().clone();
        if let Some((pv, wait)) = slow.filter(|(pv, _)| *pv == pv_of(&plan.handle)) {
            let _ = pv;
            for copied in 1..=10 {
                progress(copied, 100);
            }
            std::thread::sleep(wait);
        }
        progress(50, 100);
        progress(100, 100);
        std::fs::write(image, owner_of(&plan.handle)).unwrap();
        Ok(CloneInfo {
            handle: plan.handle.clone(),
            path: image.with_extension("link"),
            block: true,
            size_bytes: 100,
            method: CloneMethod::Clone,
            filesystem: Some("ext4".into()),
        })
    }
    fn attach(&self, handle: &CloneHandle) -> Result<CloneInfo, BackendError> {
        self.attached.lock().unwrap().push(pv_of(handle));
        Ok(CloneInfo {
            handle: handle.clone(),
            path: image_of(handle).with_extension("link"),
            block: true,
            size_bytes: 100,
            method: CloneMethod::Clone,
            filesystem: Some("ext4".into()),
        })
    }
    fn delete(&self, handle: &CloneHandle) -> Result<Deleted, BackendError> {
        let image = image_of(handle);
        if self.fail_delete.lock().unwrap().contains(&pv_of(handle)) {
            return Err(BackendError::Io {
                what: format!("delete {}", image.display()),
                source: std::io::Error::other("busy (fake)"),
            });
        }
        match std::fs::read_to_string(image) {
            Err(_) => Ok(Deleted::Absent),
            Ok(owner) if owner != owner_of(handle) => Err(BackendError::NotOurs {
                what: image.display().to_string(),
                why: format!("owned by {owner}"),
            }),
            Ok(_) => {
                std::fs::remove_file(image).unwrap();
                Ok(Deleted::Removed)
            }
        }
    }
}

struct World {
    state: tempfile::TempDir,
    fake: Arc<Fake>,
}

impl World {
    fn new() -> World {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("clones");
        std::fs::create_dir_all(&dir).unwrap();
        World {
            state,
            fake: Arc::new(Fake {
                dir,
                ..Default::default()
            }),
        }
    }

    fn open(&self, pause: Option<Duration>) -> (Restores, Vec<Recovered>) {
        Restores::open(self.state.path(), self.fake.clone(), pause).unwrap()
    }

    fn image(&self, pv: &str) -> PathBuf {
        self.fake.dir.join(format!("{pv}.img"))
    }

    fn records(&self, r: &Restores, pvs: &[&str]) -> Vec<CloneRecord> {
        pvs.iter()
            .map(|pv| CloneRecord {
                persistent_volume: pv.to_string(),
                claim: format!("{pv}-claim"),
                plan: r
                    .plan(
                        &SnapshotHandle::Reflink {
                            clone: format!("/pool/.tandem-snapshots/{pv}.img").into(),
                            owner: "cut".into(),
                        },
                        "ns",
                        pv,
                        "restore",
                    )
                    .unwrap(),
                filesystem: Some("xfs".into()),
                state: CloneState::Intent,
                made: None,
                message: None,
                problem: None,
            })
            .collect()
    }
}

fn wait_done(r: &Restores, key: &str) {
    let start = Instant::now();
    while r.view(key).is_some_and(|v| v.running) {
        assert!(start.elapsed() < Duration::from_secs(10), "job never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn states(r: &Restores, key: &str) -> Vec<CloneState> {
    r.view(key)
        .unwrap()
        .entry
        .clones
        .iter()
        .map(|c| c.state)
        .collect()
}

#[test]
fn every_clone_is_made_journaled_and_reported() {
    let w = World::new();
    let (r, _) = w.open(None);
    let notified = Arc::new(Mutex::new(0));
    {
        let n = notified.clone();
        r.set_change_notifier(Box::new(move |_| *n.lock().unwrap() += 1));
    }
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    wait_done(&r, "restore");
    let v = r.view("restore").unwrap();
    assert_eq!(v.entry.stage, Stage::Cloned);
    assert_eq!(states(&r, "restore"), [CloneState::Made, CloneState::Made]);
    assert!(
        v.entry.clones[0]
            .made
            .as_ref()
            .unwrap()
            .cloned_at
            .ends_with('Z')
    );
    assert_eq!(v.journaled, Journaled::Yes);
    assert!(w.image("a").exists() && w.image("b").exists());
    assert!(*notified.lock().unwrap() >= 3, "made, made, ended");
    let journaled = RestoreJournal::open(w.state.path())
        .unwrap()
        .get("restore")
        .unwrap()
        .unwrap();
    assert_eq!(journaled.stage, Stage::Cloned);
    // Never begun twice.
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    assert_eq!(r.view("restore").unwrap().entry.stage, Stage::Cloned);
}

#[test]
fn one_failed_clone_deletes_every_clone_of_the_restore() {
    let w = World::new();
    w.fake.fail_create.lock().unwrap().insert("b".into());
    let (r, _) = w.open(None);
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b", "c"]))
        .unwrap();
    wait_done(&r, "restore");
    let v = r.view("restore").unwrap();
    assert_eq!(
        v.entry.stage,
        Stage::Ended {
            outcome: Outcome::Failed
        }
    );
    assert_eq!(
        states(&r, "restore"),
        [CloneState::Deleted, CloneState::Failed, CloneState::Deleted]
    );
    let message = v.entry.message.unwrap();
    assert!(
        message.contains("b-claim") && message.contains("no space"),
        "{message}"
    );
    assert!(!w.image("a").exists() && !w.image("b").exists() && !w.image("c").exists());
    r.forget("restore").unwrap();
    assert!(r.view("restore").is_none());
    assert!(
        RestoreJournal::open(w.state.path())
            .unwrap()
            .get("restore")
            .unwrap()
            .is_none()
    );
}

#[test]
fn something_already_at_a_clones_place_is_never_touched() {
    let w = World::new();
    std::fs::write(w.image("b"), "someone else").unwrap();
    let (r, _) = w.open(None);
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    wait_done(&r, "restore");
    assert_eq!(
        states(&r, "restore"),
        [CloneState::Deleted, CloneState::Failed]
    );
    assert!(!w.image("a").exists());
    assert_eq!(
        std::fs::read_to_string(w.image("b")).unwrap(),
        "someone else"
    );
}

#[test]
fn a_restart_mid_clone_rolls_back_and_a_restart_after_cloned_attaches() {
    let w = World::new();
    {
        // Killed after the first clone: the journal says Cloning, [Made, Intent].
        let (r, _) = w.open(Some(Duration::from_secs(30)));
        r.begin("mid", "ns", "nr", w.records(&r, &["a", "b"]))
            .unwrap();
        let start = Instant::now();
        while states(&r, "mid") != [CloneState::Made, CloneState::Intent] {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(w.image("a").exists());
        while r.view("mid").unwrap().journaled != Journaled::Yes {
            assert!(start.elapsed() < Duration::from_secs(10));
            std::thread::sleep(Duration::from_millis(5));
        }
        // The job thread sleeps on; this Restores is dropped and the journal opened anew.
    }
    let j = RestoreJournal::open(w.state.path()).unwrap();
    assert_eq!(j.get("mid").unwrap().unwrap().stage, Stage::Cloning);
    // A kept restore beside it.
    let mut kept = j.get("mid").unwrap().unwrap();
    kept.key = "kept".into();
    kept.stage = Stage::Cloned;
    kept.clones[1].state = CloneState::Deleted;
    j.write(&kept).unwrap();

    let (r, recovered) = w.open(None);
    assert!(recovered.contains(&Recovered::RolledBack {
        key: "mid".into(),
        complete: true
    }));
    assert!(recovered.contains(&Recovered::Kept {
        key: "kept".into(),
        attached: 1,
        total: 1
    }));
    let v = r.view("mid").unwrap();
    assert_eq!(
        v.entry.stage,
        Stage::Ended {
            outcome: Outcome::Failed
        }
    );
    assert_eq!(v.entry.message.as_deref(), Some(RESTARTED));
    assert!(
        !w.image("a").exists(),
        "the clone made before the restart is deleted"
    );
    assert_eq!(*w.fake.attached.lock().unwrap(), ["a"]);
}

#[test]
fn a_cancel_stops_between_clones_and_deletes_what_was_made() {
    let w = World::new();
    let (r, _) = w.open(Some(Duration::from_millis(300)));
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    let start = Instant::now();
    while states(&r, "restore")[0] != CloneState::Made {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(5));
    }
    r.cancel("restore", "aborted");
    wait_done(&r, "restore");
    let v = r.view("restore").unwrap();
    assert_eq!(
        v.entry.stage,
        Stage::Ended {
            outcome: Outcome::Aborted
        }
    );
    assert_eq!(
        states(&r, "restore"),
        [CloneState::Deleted, CloneState::Deleted]
    );
    assert!(!w.image("a").exists() && !w.image("b").exists());
}

#[test]
fn release_deletes_only_that_clone_and_a_failed_delete_is_kept_and_retried() {
    let w = World::new();
    let (r, _) = w.open(None);
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    wait_done(&r, "restore");
    assert!(r.release("restore", &["b".to_string()]));
    assert_eq!(
        states(&r, "restore"),
        [CloneState::Made, CloneState::Deleted]
    );
    assert!(w.image("a").exists() && !w.image("b").exists());
    assert_eq!(r.view("restore").unwrap().entry.stage, Stage::Cloned);

    // Abort with a delete that fails: still rolling back, the clone still journaled.
    w.fake.fail_delete.lock().unwrap().insert("a".into());
    assert!(!r.roll_back("restore", Outcome::Aborted, "aborted"));
    let v = r.view("restore").unwrap();
    assert_eq!(
        v.entry.stage,
        Stage::RollingBack {
            outcome: Outcome::Aborted
        }
    );
    assert!(v.entry.clones[0].problem.is_some());
    r.forget("restore").unwrap();
    assert!(
        r.view("restore").is_some(),
        "never forgotten while it holds a clone"
    );
    w.fake.fail_delete.lock().unwrap().clear();
    assert!(r.roll_back("restore", Outcome::Aborted, "aborted"));
    assert_eq!(
        r.view("restore").unwrap().entry.stage,
        Stage::Ended {
            outcome: Outcome::Aborted
        }
    );
    assert!(!w.image("a").exists());
}

#[test]
fn a_copy_reports_its_progress_at_most_every_second_and_forgets_it_once_done() {
    let w = World::new();
    *w.fake.slow.lock().unwrap() = Some(("b".into(), Duration::from_millis(400)));
    let (r, _) = w.open(None);
    let notified = Arc::new(Mutex::new(0));
    {
        let n = notified.clone();
        r.set_change_notifier(Box::new(move |_| *n.lock().unwrap() += 1));
    }
    r.begin("restore", "ns", "nr", w.records(&r, &["a", "b"]))
        .unwrap();
    let start = Instant::now();
    let seen = loop {
        let v = r.view("restore").unwrap();
        if let Some(p) = v.progress.get("b") {
            break *p;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no progress seen"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    // The first call is reported, the nine that follow within the second are not.
    assert_eq!(seen, (1, 100));
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        r.view("restore").unwrap().progress.get("b"),
        Some(&(1, 100))
    );
    let status = super::lifecycle::status(
        &r.view("restore").unwrap().entry,
        &r.view("restore").unwrap().progress,
        Journaled::Yes,
        &[],
        None,
    );
    assert_eq!(status.volumes[1].copied_bytes, Some(1));
    wait_done(&r, "restore");
    let v = r.view("restore").unwrap();
    assert_eq!(v.entry.stage, Stage::Cloned);
    assert!(v.progress.is_empty());
    // made a, progress of b (1, then the final 100 of 100), made b, Cloned, job ended.
    assert!(
        *notified.lock().unwrap() <= 8,
        "{}",
        notified.lock().unwrap()
    );
}

#[test]
fn an_unreadable_entry_is_kept_and_its_restore_left_alone() {
    let w = World::new();
    let j = RestoreJournal::open(w.state.path()).unwrap();
    std::fs::write(j.dir().join("broken-uid.json"), b"{ not json").unwrap();
    let (r, recovered) = w.open(None);
    assert!(matches!(
        recovered.as_slice(),
        [Recovered::Unreadable { key, .. }] if key == "broken-uid"
    ));
    assert!(r.view("broken-uid").is_none());
    assert!(r.unreadable("broken-uid").unwrap().contains("corrupt"));
    assert!(r.unreadable("other").is_none());
    assert!(
        j.dir().join("broken-uid.json").exists(),
        "kept for a person"
    );
}
