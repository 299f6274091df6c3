//! Unit tests of the cut with injected syscalls and thread spawns (no root needed): slow and hung
//! freezes, failing thaws, threads that cannot be started. The real-kernel versions are in
//! tests/agent_cut_faults.rs.

use std::collections::{HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::agent::discovery::{DevId, MountInfo};
use crate::agent::freeze::{self, FreezeError, Thawed};
use crate::agent::journal::{FsIdentity, Stage};
use crate::api::{FreezePolicy, NodePhase};

use super::plan::{FreezeTarget, Prepared};
use super::{
    Begun, CONDITION_FREEZE_IN_FLIGHT, CONDITION_THAW_FAILED, CutRequest, Engine, EngineConfig,
    FreezeOps, Spawner,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Freeze,
    Thaw,
}

/// Freezes and thaws that only pretend, with chosen delays and failures.
#[derive(Default)]
struct FakeOps {
    freeze_delay: HashMap<PathBuf, Duration>,
    /// How many thaws of a path fail before one succeeds.
    thaw_failures: Mutex<HashMap<PathBuf, usize>>,
    frozen: Mutex<HashSet<PathBuf>>,
    log: Mutex<Vec<(PathBuf, Call, Instant)>>,
}

impl FakeOps {
    fn when(&self, path: &Path, call: Call) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .find(|(p, c, _)| p == path && *c == call)
            .map(|(_, _, t)| *t)
    }
    fn is_frozen(&self, path: &Path) -> bool {
        self.frozen.lock().unwrap().contains(path)
    }
}

impl FreezeOps for FakeOps {
    fn open(&self, mount: &MountInfo) -> Result<OwnedFd, FreezeError> {
        freeze::open_dir(&mount.mount_point)
    }
    fn syncfs(&self, _: &OwnedFd, _: &Path) -> Result<(), FreezeError> {
        Ok(())
    }
    fn freeze(&self, _: &OwnedFd, path: &Path) -> Result<(), FreezeError> {
        if let Some(d) = self.freeze_delay.get(path) {
            std::thread::sleep(*d);
        }
        self.frozen.lock().unwrap().insert(path.into());
        self.log
            .lock()
            .unwrap()
            .push((path.into(), Call::Freeze, Instant::now()));
        Ok(())
    }
    fn thaw(&self, _: &OwnedFd, path: &Path) -> Result<Thawed, FreezeError> {
        if let Some(n) = self.thaw_failures.lock().unwrap().get_mut(path)
            && *n > 0
        {
            *n -= 1;
            return Err(FreezeError::Other {
                what: "FITHAW",
                path: path.into(),
                errno: rustix::io::Errno::IO,
            });
        }
        let was = self.frozen.lock().unwrap().remove(path);
        self.log
            .lock()
            .unwrap()
            .push((path.into(), Call::Thaw, Instant::now()));
        Ok(if was {
            Thawed::Thawed
        } else {
            Thawed::WasNotFrozen
        })
    }
    fn identity(&self, _: &Path) -> Option<FsIdentity> {
        None
    }
}

struct World {
    _dir: tempfile::TempDir,
    engine: Engine,
    ops: Arc<FakeOps>,
    mounts: Vec<PathBuf>,
}

fn world(ops: FakeOps, spawner: Spawner, mounts: &[&str]) -> World {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<PathBuf> = mounts.iter().map(|m| dir.path().join(m)).collect();
    for p in &paths {
        std::fs::create_dir_all(p).unwrap();
    }
    let ops = Arc::new(FakeOps {
        freeze_delay: ops
            .freeze_delay
            .into_iter()
            .map(|(k, v)| (dir.path().join(k), v))
            .collect(),
        thaw_failures: Mutex::new(
            ops.thaw_failures
                .into_inner()
                .unwrap()
                .into_iter()
                .map(|(k, v)| (dir.path().join(k), v))
                .collect(),
        ),
        ..Default::default()
    });
    let mut config = EngineConfig::new(dir.path().join("state"));
    config.freeze_ops = ops.clone();
    config.spawner = spawner;
    let engine = Engine::start(config).unwrap().0;
    World {
        _dir: dir,
        engine,
        ops,
        mounts: paths,
    }
}

fn target(i: u32, mount: &Path) -> FreezeTarget {
    FreezeTarget {
        // Made-up device numbers: nothing real is frozen here.
        superblock: DevId {
            major: 4095,
            minor: 1000 + i,
        },
        mount: MountInfo {
            mount_id: 0,
            parent_id: 0,
            dev: DevId {
                major: 4095,
                minor: 1000 + i,
            },
            root: "/".into(),
            mount_point: mount.into(),
            options: String::new(),
            fs_type: "fake".into(),
            source: "fake".into(),
            super_options: String::new(),
        },
        volumes: Vec::new(),
    }
}

fn request(key: &str, timeout: Duration, release: bool) -> CutRequest {
    CutRequest {
        key: key.into(),
        namespace: "ns".into(),
        name: key.into(),
        group_snapshot: key.into(),
        freeze: FreezePolicy::Required,
        freeze_timeout: timeout,
        release_after_cut: release,
        volumes: Vec::new(),
    }
}

/// Starts a cut of `targets` on its own thread (as the watch loop does).
fn start_cut(w: &World, req: CutRequest) -> std::thread::JoinHandle<()> {
    let engine = w.engine.clone();
    let targets: Vec<FreezeTarget> = w
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| target(i as u32, m))
        .collect();
    let Begun::New(cut) = engine.begin(&req, None).unwrap() else {
        panic!("a new cut");
    };
    std::thread::spawn(move || engine.freeze_and_cut(&req, &cut, &Prepared::default(), &targets))
}

fn stage_on_disk(w: &World, key: &str) -> Stage {
    w.engine.inner.journal.get(key).unwrap().unwrap().stage
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// H1: one target's FIFREEZE takes 3x the timeout; its sibling, frozen at once, is thawed by the
/// watchdog on time, and the slow one is thawed the moment its freeze returns. Until then the
/// cut is not reported (nor journaled) as thawed.
#[test]
fn a_slow_freeze_does_not_keep_its_siblings_frozen_past_the_timeout() {
    let timeout = Duration::from_millis(300);
    let mut ops = FakeOps::default();
    ops.freeze_delay.insert("slow".into(), timeout * 3);
    let w = world(ops, Spawner::default(), &["fast", "slow"]);
    let (fast, slow) = (w.mounts[0].clone(), w.mounts[1].clone());
    let start = Instant::now();
    let cutting = start_cut(&w, request("h1", timeout, false));

    wait_for("the fast target to thaw", timeout * 3, || {
        w.ops.when(&fast, Call::Thaw).is_some()
    });
    let thawed_at = w.ops.when(&fast, Call::Thaw).unwrap() - start;
    assert!(
        thawed_at < timeout + Duration::from_millis(200),
        "the fast target was thawed {thawed_at:?} after the cut began (timeout {timeout:?})"
    );
    assert!(w.ops.is_frozen(&slow) || w.ops.when(&slow, Call::Freeze).is_none());
    // The slow freeze is still in flight: nothing says "thawed".
    let status = w.engine.status("h1").unwrap().unwrap();
    assert_eq!(status.phase, NodePhase::Pending, "{status:?}");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == CONDITION_FREEZE_IN_FLIGHT),
        "{status:?}"
    );
    assert!(stage_on_disk(&w, "h1").may_be_frozen());

    cutting.join().unwrap();
    let froze = w
        .ops
        .when(&slow, Call::Freeze)
        .expect("the slow freeze returned");
    let thawed = w
        .ops
        .when(&slow, Call::Thaw)
        .expect("the late freeze was thawed");
    assert!(thawed >= froze);
    assert!(
        thawed - froze < Duration::from_millis(200),
        "a freeze of an abandoned cut is thawed at once"
    );
    assert!(!w.ops.is_frozen(&fast) && !w.ops.is_frozen(&slow));
    wait_for("the abort to be journaled", Duration::from_secs(2), || {
        stage_on_disk(&w, "h1") == Stage::Aborted
    });
    let status = w.engine.status("h1").unwrap().unwrap();
    assert_eq!(status.phase, NodePhase::Aborted);
    assert!(status.message.unwrap().contains("watchdog"));
    assert!(status.conditions.iter().all(|c| c.type_ == "Ready"));
}

/// L14a: a watchdog that fires before the barrier lets nothing be frozen at all.
#[test]
fn nothing_is_frozen_after_the_cut_was_abandoned() {
    let w = world(FakeOps::default(), Spawner::default(), &["a", "b"]);
    let req = request("late", Duration::from_secs(30), false);
    let Begun::New(cut) = w.engine.begin(&req, None).unwrap() else {
        panic!()
    };
    // Abandoned before it got anywhere.
    w.engine.abort("late", "test").unwrap();
    let targets: Vec<FreezeTarget> = w
        .mounts
        .iter()
        .enumerate()
        .map(|(i, m)| target(i as u32, m))
        .collect();
    w.engine
        .freeze_and_cut(&req, &cut, &Prepared::default(), &targets);
    assert!(w.ops.log.lock().unwrap().is_empty(), "no FIFREEZE issued");
    assert_eq!(
        w.engine.status("late").unwrap().unwrap().phase,
        NodePhase::Aborted
    );
    assert_eq!(stage_on_disk(&w, "late"), Stage::Aborted);
}

/// H6: when no thaw thread can be started, the thaws run inline; nothing is left frozen and
/// Released is reported only after both thaws returned.
#[test]
fn thaws_run_inline_when_no_thread_can_be_started() {
    let w = world(
        FakeOps::default(),
        Spawner::refusing(|name| name == "tandem-thaw"),
        &["a", "b"],
    );
    start_cut(&w, request("h6", Duration::from_secs(30), false))
        .join()
        .unwrap();
    assert_eq!(
        w.engine.status("h6").unwrap().unwrap().phase,
        NodePhase::Cut
    );
    assert!(w.ops.is_frozen(&w.mounts[0]) && w.ops.is_frozen(&w.mounts[1]));
    let st = w.engine.release("h6").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{st:?}");
    assert!(!w.ops.is_frozen(&w.mounts[0]) && !w.ops.is_frozen(&w.mounts[1]));
    assert_eq!(stage_on_disk(&w, "h6"), Stage::Released);
}

/// H6: a freeze thread that cannot be started fails the cut (Required) without leaving its
/// started siblings waiting at the barrier, and without anything left frozen.
#[test]
fn a_freeze_thread_that_cannot_start_fails_the_cut_cleanly() {
    let started = AtomicUsize::new(0);
    let w = world(
        FakeOps::default(),
        Spawner::refusing(move |name| {
            name == "tandem-freeze" && started.fetch_add(1, Ordering::SeqCst) == 1
        }),
        &["a", "b", "c"],
    );
    start_cut(&w, request("nothread", Duration::from_secs(30), false))
        .join()
        .unwrap();
    let st = w.engine.status("nothread").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{st:?}");
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("cannot run a thread"),
        "{st:?}"
    );
    for m in &w.mounts {
        assert!(!w.ops.is_frozen(m), "{} left frozen", m.display());
    }
}

/// L7: a failing FITHAW keeps the filesystem listed as frozen, shows a condition, keeps the
/// journal at "may be frozen", and is retried until it works.
#[test]
fn a_failed_thaw_is_reported_and_retried() {
    let ops = FakeOps::default();
    ops.thaw_failures.lock().unwrap().insert("a".into(), 5);
    let w = world(ops, Spawner::default(), &["a", "b"]);
    start_cut(&w, request("l7", Duration::from_secs(30), false))
        .join()
        .unwrap();
    let st = w.engine.release("l7").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "not Released while a thaw failed");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == CONDITION_THAW_FAILED),
        "{st:?}"
    );
    assert!(w.ops.is_frozen(&w.mounts[0]));
    assert!(!w.ops.is_frozen(&w.mounts[1]));
    assert!(stage_on_disk(&w, "l7").may_be_frozen());
    assert!(w.engine.needs_retry("l7"));
    assert!(
        w.engine.deadline("l7").is_some(),
        "the watchdog stays armed"
    );

    let st = w.engine.retry("l7").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{st:?}");
    assert!(st.conditions.iter().all(|c| c.type_ == "Ready"));
    assert!(!w.ops.is_frozen(&w.mounts[0]));
    assert_eq!(stage_on_disk(&w, "l7"), Stage::Released);
    assert!(!w.engine.needs_retry("l7"));
}

/// M1: one engine per state directory.
#[test]
fn a_second_engine_on_the_same_state_dir_refuses_to_start() {
    let w = world(FakeOps::default(), Spawner::default(), &[]);
    let state = w.engine.inner.config.state_dir.clone();
    let err = match Engine::start(EngineConfig::new(&state)) {
        Err(e) => e,
        Ok(_) => panic!("a second engine started on {}", state.display()),
    };
    let text = err.to_string();
    assert!(text.contains("another tandem agent"), "{text}");
    assert!(text.contains(&std::process::id().to_string()), "{text}");
    drop(w);
}
