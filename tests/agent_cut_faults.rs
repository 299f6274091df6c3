//! The agent's cut under slow and failing calls, on real loop devices, real filesystems and real
//! FIFREEZE: a FIFREEZE that hangs (a writer held inside the filesystem by a userfaultfd page
//! fault), a state disk that stalls or fills, a second agent on one state directory, snapshots
//! that cannot be deleted, a freeze that is someone else's, and threads that cannot be started.
//! Needs root (skips with a message otherwise). Every image, loop device and mount is made here
//! and removed by `Scratch` even when a test fails.

mod agent_support;
mod support;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_support::{Scratch, Volume, sh, sh_status};
use tandem::agent::discovery::MountInfo;
use tandem::agent::engine::{
    CONDITION_DELETE_FAILED, CONDITION_JOURNAL_FAILED, CutRequest, Engine, EngineConfig,
    EngineError, FreezeOps, KernelOps, Spawner, VolumeRequest,
};
use tandem::agent::freeze::{self, FreezeError, Thawed};
use tandem::agent::journal::{FsIdentity, Journal, Stage};
use tandem::api::{FreezePolicy, NodePhase, NodeSnapshotStatus};

fn request(
    key: &str,
    volumes: &[(&str, &Path)],
    freeze: FreezePolicy,
    release: bool,
    timeout: Duration,
) -> CutRequest {
    CutRequest {
        key: key.into(),
        namespace: "ns1".into(),
        name: format!("{key}-node"),
        group_snapshot: key.into(),
        freeze,
        freeze_timeout: timeout,
        release_after_cut: release,
        volumes: volumes
            .iter()
            .map(|(pv, path)| VolumeRequest {
                claim: format!("claim-{pv}"),
                persistent_volume: pv.to_string(),
                path: path.to_path_buf(),
                allow_shared_filesystem: false,
                central: false,
            })
            .collect(),
    }
}

/// Whether the filesystem at `mount` is frozen: a probe FIFREEZE answers EBUSY. (If it was not
/// frozen the probe froze it, so thaw it again.)
fn is_frozen(mount: &Path) -> bool {
    let fd = freeze::open_dir(mount).expect("open");
    match freeze::freeze(&fd, mount) {
        Err(FreezeError::AlreadyFrozen { .. }) => true,
        Ok(()) => {
            freeze::thaw(&fd, mount).expect("thaw the probe");
            false
        }
        Err(e) => panic!("probe freeze of {}: {e}", mount.display()),
    }
}

fn clone_path(status: &NodeSnapshotStatus, i: usize) -> PathBuf {
    let handle = status.volumes[i]
        .snapshot_handle
        .clone()
        .expect("a snapshot handle");
    PathBuf::from(handle.strip_prefix("reflink:").expect("reflink handle"))
}

fn has_condition(status: &NodeSnapshotStatus, type_: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == "True")
}

/// Starts an engine on a state dir whose previous engine was just dropped (its watchdog threads,
/// which hold it, end as soon as they see the cut thawed).
fn start_again(state: &Path) -> (Engine, Vec<tandem::agent::journal::JournalEntry>) {
    let start = Instant::now();
    loop {
        match Engine::start(EngineConfig::new(state)) {
            Err(EngineError::Locked { .. }) if start.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(20))
            }
            other => return other.expect("engine"),
        }
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A small ext4 on its own loop device, for a state directory the test can stall or fill.
fn state_fs(s: &mut Scratch, size: u64) -> PathBuf {
    let img = s.path("state.img");
    s.image(&img, size);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "ext4");
    let mnt = s.path("statefs");
    s.mount(&dev, &mnt, &[]);
    mnt
}

// ---- a FIFREEZE that hangs: a writer parked inside the filesystem by a userfaultfd fault ----

const UFFD_API: u64 = 0xAA;
/// `_IOWR(0xAA, 0x3F, struct uffdio_api)` (24 bytes).
const UFFDIO_API: u64 = 0xc018_aa3f;
/// `_IOWR(0xAA, 0x00, struct uffdio_register)` (32 bytes).
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

/// A thread stuck in `write()` to a file on `mount`, with the filesystem's write protection
/// (sb_start_write) held: its source buffer is a page nobody has faulted in, and userfaultfd
/// makes the fault wait. A FIFREEZE of that filesystem waits for this writer, so it hangs until
/// [`ParkedWriter::release`] (closing the userfaultfd lets the fault complete).
struct ParkedWriter {
    uffd: Option<OwnedFd>,
    thread: Option<std::thread::JoinHandle<std::io::Result<usize>>>,
}

impl ParkedWriter {
    fn park(mount: &Path) -> ParkedWriter {
        const LEN: usize = 1 << 16;
        // SAFETY: plain syscalls with checked results; the mapping is private to this test and
        // outlives the writer (it is never unmapped).
        unsafe {
            let fd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32;
            assert!(fd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
            let uffd = OwnedFd::from_raw_fd(fd);
            let mut api = UffdioApi {
                api: UFFD_API,
                features: 0,
                ioctls: 0,
            };
            assert_eq!(
                libc::ioctl(fd, UFFDIO_API as _, &mut api),
                0,
                "UFFDIO_API: {}",
                std::io::Error::last_os_error()
            );
            let buf = libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(buf, libc::MAP_FAILED);
            let mut reg = UffdioRegister {
                start: buf as u64,
                len: LEN as u64,
                mode: UFFDIO_REGISTER_MODE_MISSING,
                ioctls: 0,
            };
            assert_eq!(
                libc::ioctl(fd, UFFDIO_REGISTER as _, &mut reg),
                0,
                "UFFDIO_REGISTER: {}",
                std::io::Error::last_os_error()
            );
            let path = mount.join("parked-writer.bin");
            let addr = buf as usize;
            let thread = std::thread::spawn(move || {
                use std::io::Write;
                let mut f = std::fs::File::create(&path)?;
                let data = std::slice::from_raw_parts(addr as *const u8, LEN);
                f.write(data)
            });
            // Wait for the fault: one uffd_msg (32 bytes) arrives when the writer touches the page.
            let mut msg = [0u8; 32];
            let n = libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len());
            assert_eq!(n, 32, "no page fault from the writer");
            ParkedWriter {
                uffd: Some(uffd),
                thread: Some(thread),
            }
        }
    }

    /// Lets the write (and with it any FIFREEZE waiting for it) complete.
    fn release(&mut self) {
        self.uffd.take();
        if let Some(t) = self.thread.take() {
            let written = t.join().expect("writer thread");
            assert!(written.is_ok(), "{written:?}");
        }
    }
}

impl Drop for ParkedWriter {
    fn drop(&mut self) {
        self.uffd.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// H1 on a real kernel: volume B's FIFREEZE hangs (it waits for a writer parked in B by a
/// userfaultfd fault) for 3x the freeze timeout. Volume A, frozen at once, must be thawed by the
/// watchdog within the timeout + 1 s, and B the moment its freeze returns; until then the agent
/// reports neither as thawed.
#[test]
fn a_hung_fifreeze_does_not_keep_its_sibling_frozen_past_the_timeout() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let a = s.volume(&pool, "ha", "ext4", 128 << 20);
    let b = s.volume(&pool, "hb", "ext4", 128 << 20);
    s.assert_owned(&a.mount);
    s.assert_owned(&b.mount);
    let mut writer = ParkedWriter::park(&b.mount);
    let (engine, _) = Engine::start(EngineConfig::new(s.path("state"))).expect("engine");
    let timeout = Duration::from_secs(2);
    let req = request(
        "hung",
        &[("pv-a", &a.mount), ("pv-b", &b.mount)],
        FreezePolicy::Required,
        false,
        timeout,
    );
    let start = Instant::now();
    let cutting = {
        let engine = engine.clone();
        std::thread::spawn(move || engine.cut(&req, None))
    };
    // A gets frozen (B is stuck in its FIFREEZE). A probe freeze racing the agent's own would
    // make the agent's fail with EBUSY, so probe only well after the intent was journaled.
    let journal = Journal::open(&s.path("state")).unwrap();
    wait_for("the intent to be journaled", Duration::from_secs(5), || {
        journal.get("hung").ok().flatten().is_some()
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(is_frozen(&a.mount), "A was frozen");
    // By the timeout + 1 s the watchdog has thawed A although B's freeze has not returned.
    let bound = timeout + Duration::from_secs(1);
    while start.elapsed() < bound && is_frozen(&a.mount) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let thawed_after = start.elapsed();
    assert!(
        !is_frozen(&a.mount),
        "A is still frozen {thawed_after:?} after the cut began (freezeTimeout {timeout:?}): a hung sibling freeze kept it frozen"
    );
    std::fs::write(a.mount.join("after-watchdog.txt"), "A accepts writes").unwrap();
    assert!(!cutting.is_finished(), "B's FIFREEZE is still in flight");
    // Nothing claims the cut is thawed while B's freeze can still happen.
    let st = engine.status("hung").unwrap().unwrap();
    assert_ne!(st.phase, NodePhase::Aborted, "{st:?}");
    assert_ne!(st.phase, NodePhase::Released, "{st:?}");
    assert!(journal.get("hung").unwrap().unwrap().stage.may_be_frozen());

    // 3x the timeout in, the writer goes on, B's FIFREEZE returns, and B is thawed at once.
    while start.elapsed() < timeout * 3 {
        std::thread::sleep(Duration::from_millis(50));
    }
    writer.release();
    let status = cutting.join().unwrap().unwrap();
    assert!(
        !is_frozen(&b.mount),
        "the freeze that returned after the abort was thawed at once"
    );
    std::fs::write(b.mount.join("after.txt"), "B accepts writes").unwrap();
    assert_eq!(status.phase, NodePhase::Aborted, "{status:?}");
    assert!(status.message.unwrap().contains("watchdog"));
    assert_eq!(journal.get("hung").unwrap().unwrap().stage, Stage::Aborted);
    eprintln!("A thawed {thawed_after:?} after the cut began (timeout {timeout:?})");
}

/// M1: a second engine (or `tandem agent --recover-only`) on the same state directory refuses
/// to start, and the first engine's held cut is left alone (not thawed, its snapshot kept).
#[test]
fn a_second_agent_on_the_same_state_dir_refuses_to_start() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "m1", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let (first, _) = Engine::start(EngineConfig::new(&state)).unwrap();
    let st = first
        .cut(
            &request(
                "m1",
                &[("pv", &v.mount)],
                FreezePolicy::Required,
                false,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "{st:?}");
    let clone = clone_path(&st, 0);

    let second = Engine::start(EngineConfig::new(&state));
    assert!(
        matches!(second, Err(EngineError::Locked { .. })),
        "a second engine started on the same state dir"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["agent", "--node-name", "n", "--recover-only", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("another tandem agent"), "{stderr}");
    assert!(
        is_frozen(&v.mount),
        "the first agent's freeze was left alone"
    );
    assert!(clone.exists(), "the first agent's snapshot was left alone");
    let released = first.release("m1").unwrap().unwrap();
    assert_eq!(released.phase, NodePhase::Released);
    assert!(clone.exists());
}

/// M2: the journal cannot be written (the state filesystem is full) when a held cut is released.
/// The volume is thawed anyway, but Released is not published until it is journaled; once there
/// is room again the retry journals it, and a restarted agent keeps the snapshot.
#[test]
fn released_is_published_only_once_journaled() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "m2", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let statefs = state_fs(&mut s, 16 << 20);
    let state = statefs.join("tandem");
    let (engine, _) = Engine::start(EngineConfig::new(&state)).unwrap();
    let st = engine
        .cut(
            &request(
                "m2",
                &[("pv", &v.mount)],
                FreezePolicy::Required,
                false,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "{st:?}");
    let clone = clone_path(&st, 0);

    // Fill the state filesystem to the last block (root may use the reserved ones too).
    let filler = statefs.join("filler");
    let (code, _) = sh_status("fallocate", &["-l", "64M", &filler.to_string_lossy()]);
    if code != 0 {
        let _ = sh_status(
            "dd",
            &[
                "if=/dev/zero",
                &format!("of={}", filler.display()),
                "bs=1M",
                "count=64",
            ],
        );
    }
    // Down to the last byte: a small ext4 has 1 KiB blocks, and a journal entry fits in the few
    // blocks a 4 KiB filler leaves (the test passed or failed on how many were left).
    let mut i = 0;
    for size in [4096usize, 1024, 1] {
        while i < 20_000
            && std::fs::write(statefs.join(format!("small-{i}")), vec![0u8; size]).is_ok()
        {
            i += 1;
        }
        i += 1;
    }

    let st = engine.release("m2").unwrap().unwrap();
    assert!(
        !is_frozen(&v.mount),
        "the thaw does not wait for the journal"
    );
    assert_ne!(
        st.phase,
        NodePhase::Released,
        "Released was published without being journaled: {st:?}"
    );
    assert!(has_condition(&st, CONDITION_JOURNAL_FAILED), "{st:?}");
    assert_ne!(
        engine.status("m2").unwrap().unwrap().phase,
        NodePhase::Released
    );
    assert!(engine.needs_retry("m2"));

    // Room again: the retry journals the release.
    std::fs::remove_file(&filler).unwrap();
    for i in 0..20_010 {
        let _ = std::fs::remove_file(statefs.join(format!("small-{i}")));
    }
    let st = engine.retry("m2").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{st:?}");
    assert!(!has_condition(&st, CONDITION_JOURNAL_FAILED));
    drop(engine);

    // A restart keeps what was reported Released.
    let (restarted, recovered) = start_again(&state);
    assert!(recovered.is_empty());
    assert_eq!(
        restarted.status("m2").unwrap().unwrap().phase,
        NodePhase::Released
    );
    assert!(clone.exists(), "a Released snapshot survives the restart");
}

/// Freezes the volume for real, then stalls the agent's state disk (a FIFREEZE of the state
/// filesystem, which this test made) while the volume is frozen.
struct StallStateDisk {
    state_fs: PathBuf,
    stalling: std::sync::atomic::AtomicBool,
    /// Set once the volume and then the state disk are frozen.
    stalled: std::sync::atomic::AtomicBool,
}

impl FreezeOps for StallStateDisk {
    fn open(&self, mount: &MountInfo) -> Result<OwnedFd, FreezeError> {
        KernelOps.open(mount)
    }
    fn syncfs(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError> {
        KernelOps.syncfs(fd, path)
    }
    fn freeze(&self, fd: &OwnedFd, path: &Path) -> Result<(), FreezeError> {
        KernelOps.freeze(fd, path)?;
        if !self
            .stalling
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            freeze::freeze(freeze::open_dir(&self.state_fs)?, &self.state_fs)?;
            self.stalled
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        Ok(())
    }
    fn thaw(&self, fd: &OwnedFd, path: &Path) -> Result<Thawed, FreezeError> {
        KernelOps.thaw(fd, path)
    }
    fn identity(&self, path: &Path) -> Option<FsIdentity> {
        KernelOps.identity(path)
    }
}

/// M6: the state disk stalls inside the freeze window (every journal write blocks). The watchdog
/// still thaws the volume on time; the end is journaled (and published) once the disk is back.
#[test]
fn a_stalled_state_disk_does_not_delay_the_watchdog() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "m6", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let statefs = state_fs(&mut s, 32 << 20);
    let mut config = EngineConfig::new(statefs.join("tandem"));
    let ops = Arc::new(StallStateDisk {
        state_fs: statefs.clone(),
        stalling: Default::default(),
        stalled: Default::default(),
    });
    config.freeze_ops = ops.clone();
    let (engine, _) = Engine::start(config).unwrap();
    let timeout = Duration::from_secs(2);
    let start = Instant::now();
    let cutting = {
        let engine = engine.clone();
        let req = request(
            "m6",
            &[("pv", &v.mount)],
            FreezePolicy::Required,
            false,
            timeout,
        );
        std::thread::spawn(move || engine.cut(&req, None))
    };
    wait_for(
        "the volume and the state disk to be frozen",
        Duration::from_secs(5),
        || ops.stalled.load(std::sync::atomic::Ordering::SeqCst),
    );
    assert!(is_frozen(&v.mount));
    let bound = timeout + Duration::from_secs(1);
    while start.elapsed() < bound && is_frozen(&v.mount) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let frozen_for = start.elapsed();
    let still_frozen = is_frozen(&v.mount);
    let state_stalled = is_frozen(&statefs);
    // Un-stall the state disk before asserting, so a failure cleans up.
    let _ = freeze::thaw_path(&statefs);
    assert!(state_stalled, "the state disk was stalled during the test");
    assert!(
        !still_frozen,
        "the volume was still frozen {frozen_for:?} after the cut began (timeout {timeout:?}) while the state disk stalled"
    );
    let status = cutting.join().unwrap().unwrap();
    wait_for("the abort to be published", Duration::from_secs(10), || {
        engine.status("m6").unwrap().unwrap().phase == NodePhase::Aborted
    });
    assert_ne!(status.phase, NodePhase::Released);
}

/// M7: a snapshot that cannot be deleted (immutable) keeps the journal entry and fails the
/// finalize with an error and a DeleteFailed condition; once deletable, a retry deletes it.
#[test]
fn a_snapshot_that_cannot_be_deleted_is_kept_journaled_and_retried() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "m7", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let (engine, _) = Engine::start(EngineConfig::new(&state)).unwrap();
    let st = engine
        .cut(
            &request(
                "m7",
                &[("pv", &v.mount)],
                FreezePolicy::Required,
                true,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{st:?}");
    let clone = clone_path(&st, 0);
    let c = clone.to_string_lossy().into_owned();
    sh("chattr", &["+i", &c]);
    let result = engine.finalize("m7", false);
    let still = clone.exists();
    let journaled = Journal::open(&state).unwrap().get("m7").unwrap();
    let status = engine.status("m7").unwrap();
    sh("chattr", &["-i", &c]);
    assert!(
        matches!(result, Err(EngineError::DeleteFailed { .. })),
        "{result:?}"
    );
    assert!(still);
    let journaled = journaled.expect("the entry stays journaled");
    assert!(
        journaled.made.iter().any(|h| h.to_string().ends_with(&c)),
        "{journaled:?}"
    );
    assert!(has_condition(&status.unwrap(), CONDITION_DELETE_FAILED));

    // A restart in between keeps it too, and the retry then deletes it.
    drop(engine);
    let (engine, _) = start_again(&state);
    assert!(clone.exists());
    engine.finalize("m7", false).unwrap();
    assert!(!clone.exists());
    assert!(Journal::open(&state).unwrap().get("m7").unwrap().is_none());
}

/// The child of the EBUSY test: cuts BestEffort (one volume is frozen by someone else), holds,
/// says so, and waits to be killed.
#[test]
fn child_holds_a_cut_with_someone_elses_freeze() {
    let (Ok(state), Ok(mine), Ok(theirs)) = (
        std::env::var("TANDEM_TEST_CHILD_STATE"),
        std::env::var("TANDEM_TEST_CHILD_MINE"),
        std::env::var("TANDEM_TEST_CHILD_THEIRS"),
    ) else {
        return; // only meaningful as the child of the test below
    };
    let e = Engine::start(EngineConfig::new(state)).unwrap().0;
    let st = e
        .cut(
            &request(
                "ebusy",
                &[("pv-m", Path::new(&mine)), ("pv-t", Path::new(&theirs))],
                FreezePolicy::BestEffort,
                false,
                Duration::from_secs(120),
            ),
            None,
        )
        .unwrap();
    println!("CHILD-PHASE {:?}", st.phase);
    std::thread::sleep(Duration::from_secs(120));
}

/// L8: recovery never thaws a freeze whose FIFREEZE answered EBUSY (someone else holds it).
#[test]
fn recovery_leaves_someone_elses_freeze_alone() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let mine = s.volume(&pool, "mine", "ext4", 64 << 20);
    let theirs = s.volume(&pool, "theirs", "ext4", 64 << 20);
    s.assert_owned(&mine.mount);
    s.assert_owned(&theirs.mount);
    let state = s.path("state");
    // Someone else's freeze.
    let their_fd = freeze::open_dir(&theirs.mount).unwrap();
    freeze::freeze(&their_fd, &theirs.mount).unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "child_holds_a_cut_with_someone_elses_freeze",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TANDEM_TEST_CHILD_STATE", &state)
            .env("TANDEM_TEST_CHILD_MINE", &mine.mount)
            .env("TANDEM_TEST_CHILD_THEIRS", &theirs.mount)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert!(n > 0, "child ended without holding a cut");
            if line.contains("CHILD-PHASE") {
                break;
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(line.contains("Cut"), "{line}");
        assert!(is_frozen(&mine.mount), "the killed agent left its freeze");
        let (_engine, recovered) = Engine::start(EngineConfig::new(&state)).unwrap();
        assert_eq!(recovered.len(), 1);
        (is_frozen(&mine.mount), is_frozen(&theirs.mount))
    }));
    let _ = freeze::thaw(&their_fd, &theirs.mount);
    let (mine_frozen, theirs_frozen) = outcome.expect("the test body");
    assert!(!mine_frozen, "recovery thawed the agent's own freeze");
    assert!(theirs_frozen, "recovery thawed someone else's freeze");
}

/// H6 on real filesystems: no thaw thread can be started, and release still thaws both volumes
/// (inline) before it reports Released.
#[test]
fn release_thaws_inline_when_no_thread_can_be_started() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let a: Volume = s.volume(&pool, "ta", "ext4", 64 << 20);
    let b: Volume = s.volume(&pool, "tb", "ext4", 64 << 20);
    s.assert_owned(&a.mount);
    s.assert_owned(&b.mount);
    let mut config = EngineConfig::new(s.path("state"));
    config.spawner = Spawner::refusing(|name| name == "tandem-thaw");
    let (engine, _) = Engine::start(config).unwrap();
    let st = engine
        .cut(
            &request(
                "h6",
                &[("pv-a", &a.mount), ("pv-b", &b.mount)],
                FreezePolicy::Required,
                false,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "{st:?}");
    assert!(is_frozen(&a.mount) && is_frozen(&b.mount));
    let st = engine.release("h6").unwrap().unwrap();
    assert_eq!(st.phase, NodePhase::Released, "{st:?}");
    assert!(!is_frozen(&a.mount), "A thawed");
    assert!(!is_frozen(&b.mount), "B thawed");
}

/// L9: a volume whose filesystem another cut holds is refused without naming that cut (its
/// NodeSnapshot uid) or its mount, which may belong to another tenant.
#[test]
fn the_busy_filesystem_message_does_not_name_the_other_cut() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "l9", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    // The same filesystem at a second place (as another tenant's volume would be).
    let other = s.path("other-tenant");
    s.mount(&v.mount.to_string_lossy(), &other, &["bind"]);
    let (engine, _) = Engine::start(EngineConfig::new(s.path("state"))).unwrap();
    let held = engine
        .cut(
            &request(
                "uid-of-tenant-a-4f2c",
                &[("pv-a", &v.mount)],
                FreezePolicy::Required,
                false,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(held.phase, NodePhase::Cut, "{held:?}");
    let refused = engine
        .cut(
            &request(
                "b",
                &[("pv-b", &other)],
                FreezePolicy::Required,
                true,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    engine.release("uid-of-tenant-a-4f2c").unwrap();
    assert_eq!(refused.phase, NodePhase::Failed);
    let message = refused.message.unwrap_or_default();
    assert!(!message.contains("uid-of-tenant-a-4f2c"), "{message}");
    assert!(!message.contains(&*v.mount.to_string_lossy()), "{message}");
}

/// C1 (engine side): a cut that failed before it made anything deletes nothing on finalize, not
/// even an object at the name it planned (an earlier, retained snapshot of a same-named
/// GroupSnapshot lives there).
#[test]
fn finalize_deletes_only_what_the_cut_made() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "c1", "ext4", 64 << 20);
    let busy = s.volume(&pool, "c1busy", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    s.assert_owned(&busy.mount);
    let retained = pool.join(".tandem-snapshots/tandem.ns1.daily.pv-v.img");
    std::fs::create_dir_all(retained.parent().unwrap()).unwrap();
    std::fs::write(&retained, b"yesterday's retained snapshot").unwrap();
    let (engine, _) = Engine::start(EngineConfig::new(s.path("state"))).unwrap();
    // Someone else's freeze makes the cut fail under Required before any snapshot is made.
    let fd = freeze::open_dir(&busy.mount).unwrap();
    freeze::freeze(&fd, &busy.mount).unwrap();
    let mut req = request(
        "daily",
        &[("pv-v", &v.mount), ("pv-busy", &busy.mount)],
        FreezePolicy::Required,
        true,
        Duration::from_secs(30),
    );
    req.group_snapshot = "daily".into();
    let st = engine.cut(&req, None);
    freeze::thaw(&fd, &busy.mount).unwrap();
    let st = st.unwrap();
    assert_eq!(st.phase, NodePhase::Failed, "{st:?}");
    engine.finalize("daily", false).unwrap();
    assert!(
        retained.exists(),
        "finalize of a failed cut deleted an object it never made"
    );
}

/// The safety record is read on its own: an entry whose other fields no longer parse is still
/// thawed from its `frozen` list on start, then set aside.
#[test]
fn recovery_thaws_from_an_entry_that_does_not_parse() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "dmg", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let dev = std::fs::metadata(&v.mount).unwrap();
    let dev = std::os::unix::fs::MetadataExt::dev(&dev);
    let entry = serde_json::json!({
        "version": 1, "key": "dmg", "namespace": "ns1", "name": "n", "group_snapshot": "g",
        "stage": "Freezing",
        "frozen": [{
            "mount_point": v.mount,
            "superblock": {"major": rustix::fs::major(dev), "minor": rustix::fs::minor(dev)}
        }],
        "snapshots": [{"SomeFutureBackend": {"id": 7}}],
    });
    let journal = Journal::open(&state).unwrap();
    std::fs::write(
        journal.dir().join("dmg.json"),
        serde_json::to_vec(&entry).unwrap(),
    )
    .unwrap();
    let fd = freeze::open_dir(&v.mount).unwrap();
    freeze::freeze(&fd, &v.mount).unwrap();
    let started = Engine::start(EngineConfig::new(&state));
    let frozen = is_frozen(&v.mount);
    let _ = freeze::thaw(&fd, &v.mount);
    started.unwrap();
    assert!(
        !frozen,
        "the damaged entry's filesystem was thawed on start"
    );
    assert!(journal.dir().join("dmg.json.damaged").exists());
    assert!(!journal.dir().join("dmg.json").exists());
}

/// L8: recovery thaws only the filesystem it recorded: not another one that now has the same
/// device number (another uuid), and nothing recorded in an earlier boot.
#[test]
fn recovery_skips_records_whose_filesystem_changed() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "idn", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let fd = freeze::open_dir(&v.mount).unwrap();
    let identity = tandem::agent::engine::identity_of(&fd).expect("identity");
    let uuid = identity
        .uuid
        .clone()
        .expect("this kernel reports filesystem uuids");
    let dev = std::os::unix::fs::MetadataExt::dev(&std::fs::metadata(&v.mount).unwrap());
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string();
    let entry = |key: &str, uuid: &str, boot: &str| {
        serde_json::json!({
            "version": 1, "key": key, "namespace": "ns1", "name": key, "group_snapshot": "g",
            "boot_id": boot, "stage": "Freezing",
            "frozen": [{
                "mount_point": v.mount,
                "superblock": {"major": rustix::fs::major(dev), "minor": rustix::fs::minor(dev)},
                "identity": {"uuid": uuid, "root_dev": identity.root_dev, "root_ino": identity.root_ino}
            }],
            "snapshots": [],
        })
    };
    let journal = Journal::open(&state).unwrap();
    let mut frozen_after = Vec::new();
    for (key, uuid, boot) in [
        (
            "other-fs",
            "00000000000000000000000000000000",
            boot.as_str(),
        ),
        ("other-boot", uuid.as_str(), "a-boot-before-the-last-reboot"),
        ("same", uuid.as_str(), boot.as_str()),
    ] {
        std::fs::write(
            journal.dir().join(format!("{key}.json")),
            serde_json::to_vec(&entry(key, uuid, boot)).unwrap(),
        )
        .unwrap();
        freeze::freeze(&fd, &v.mount).unwrap();
        let started = start_again(&state);
        frozen_after.push((key, is_frozen(&v.mount)));
        let _ = freeze::thaw(&fd, &v.mount);
        drop(started);
        std::fs::remove_file(journal.dir().join(format!("{key}.json"))).unwrap();
    }
    assert_eq!(
        frozen_after,
        [("other-fs", true), ("other-boot", true), ("same", false)]
    );
}

/// M7 on abort: a void snapshot that cannot be deleted is shown (DeleteFailed), kept journaled
/// and deleted by a later retry.
#[test]
fn an_abort_that_cannot_delete_retries_the_delete() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v = s.volume(&pool, "m7a", "ext4", 64 << 20);
    s.assert_owned(&v.mount);
    let state = s.path("state");
    let (engine, _) = Engine::start(EngineConfig::new(&state)).unwrap();
    let st = engine
        .cut(
            &request(
                "m7a",
                &[("pv", &v.mount)],
                FreezePolicy::Required,
                false,
                Duration::from_secs(30),
            ),
            None,
        )
        .unwrap();
    assert_eq!(st.phase, NodePhase::Cut, "{st:?}");
    let clone = clone_path(&st, 0);
    let c = clone.to_string_lossy().into_owned();
    sh("chattr", &["+i", &c]);
    let aborted = engine.abort("m7a", "test abort").unwrap().unwrap();
    let frozen = is_frozen(&v.mount);
    let kept = Journal::open(&state).unwrap().get("m7a").unwrap().unwrap();
    let needs_retry = engine.needs_retry("m7a");
    sh("chattr", &["-i", &c]);
    assert!(!frozen, "the abort thawed although the delete failed");
    assert_eq!(aborted.phase, NodePhase::Aborted);
    assert!(
        has_condition(&aborted, CONDITION_DELETE_FAILED),
        "{aborted:?}"
    );
    assert!(clone.exists());
    assert_eq!(kept.made.len(), 1, "{kept:?}");
    assert!(needs_retry);
    let retried = engine.retry("m7a").unwrap().unwrap();
    assert!(!clone.exists(), "the retry deleted it");
    assert!(
        !has_condition(&retried, CONDITION_DELETE_FAILED),
        "{retried:?}"
    );
    assert!(!engine.needs_retry("m7a"));
    assert!(
        Journal::open(&state)
            .unwrap()
            .get("m7a")
            .unwrap()
            .unwrap()
            .made
            .is_empty()
    );
}

// ---- the watch loop, against a real API server and the real agent binary ----

/// The agent binary as a child process; killed when dropped.
struct Agent(std::process::Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_snapshot(
    name: &str,
    timeout: i32,
    release_after_cut: bool,
    volumes: &[(&str, &str)],
) -> tandem::api::NodeSnapshot {
    let volumes: Vec<serde_json::Value> = volumes
        .iter()
        .map(|(claim, pv)| serde_json::json!({"claim": claim, "persistentVolume": pv}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "NodeSnapshot",
        "metadata": {"name": name},
        "spec": {
            "nodeName": "node-a",
            "groupSnapshot": name,
            "action": "Cut",
            "releaseAfterCut": release_after_cut,
            "freeze": "Required",
            "freezeTimeoutSeconds": timeout,
            "deletionPolicy": "Delete",
            "volumes": volumes,
        }
    }))
    .expect("NodeSnapshot")
}

/// H1 and M7 through the watch loop: while a member's FIFREEZE hangs, the NodeSnapshot's status
/// still comes from the agent's state (the watchdog's thaw is shown as FreezeInFlight, not as a
/// thaw that did not happen), and it turns Aborted the moment the freeze returns. A NodeSnapshot
/// whose snapshot cannot be deleted keeps the agent's finalizer, shows DeleteFailed with a
/// Warning event, and goes once the delete succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_loop_reports_from_engine_state_and_keeps_undeletable_snapshots() {
    use kube::api::{DeleteParams, ListParams, PostParams};
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let a = s.volume(&pool, "wa", "ext4", 64 << 20);
    let b = s.volume(&pool, "wb", "ext4", 64 << 20);
    s.assert_owned(&a.mount);
    s.assert_owned(&b.mount);
    let env = support::TestEnv::new("agent-cut-faults").await;
    let ns = env.namespace.clone();
    let (pva, pvb) = (format!("{ns}-pva"), format!("{ns}-pvb"));
    let pvs: kube::Api<k8s_openapi::api::core::v1::PersistentVolume> =
        kube::Api::all(env.client.clone());
    for (pv, v, claim) in [(&pva, &a, "data"), (&pvb, &b, "wal")] {
        let obj = support::objects::local_volume(
            pv,
            &v.mount.to_string_lossy(),
            "node-a",
            &ns,
            claim,
            &[],
        );
        pvs.create(&PostParams::default(), &obj).await.expect("PV");
    }
    let log = std::fs::File::create(s.path("agent.log")).unwrap();
    let _agent = Agent(
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem"))
            .args(["agent", "--node-name", "node-a", "--state-dir"])
            .arg(s.path("state"))
            .env("KUBECONFIG", &env.plane.kubeconfig)
            .env("RUST_LOG", "info,tandem=debug")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent"),
    );
    let api: kube::Api<tandem::api::NodeSnapshot> = env.api();

    // A hung FIFREEZE of B, 2 s timeout.
    let mut writer = tokio::task::spawn_blocking({
        let m = b.mount.clone();
        move || ParkedWriter::park(&m)
    })
    .await
    .unwrap();
    api.create(
        &PostParams::default(),
        &node_snapshot("hung", 2, false, &[("data", &pva), ("wal", &pvb)]),
    )
    .await
    .unwrap();
    let in_flight = support::eventually(
        Duration::from_secs(30),
        "the status to show the freeze still in flight",
        || async {
            let o = api.get("hung").await.ok()?;
            let st = o.status?;
            has_condition(&st, tandem::agent::engine::CONDITION_FREEZE_IN_FLIGHT).then_some(st)
        },
    )
    .await;
    assert_ne!(in_flight.phase, NodePhase::Aborted, "{in_flight:?}");
    assert!(!is_frozen(&a.mount), "the watchdog thawed A");
    tokio::task::spawn_blocking(move || writer.release())
        .await
        .unwrap();
    support::eventually(Duration::from_secs(30), "hung to be Aborted", || async {
        let o = api.get("hung").await.ok()?;
        (o.status?.phase == NodePhase::Aborted).then_some(())
    })
    .await;
    assert!(!is_frozen(&b.mount));

    // A snapshot that cannot be deleted keeps the NodeSnapshot (and its finalizer).
    api.create(
        &PostParams::default(),
        &node_snapshot("kept", 30, true, &[("data", &pva)]),
    )
    .await
    .unwrap();
    let released = support::eventually(Duration::from_secs(30), "kept Released", || async {
        let o = api.get("kept").await.ok()?;
        (o.status.as_ref()?.phase == NodePhase::Released).then_some(o)
    })
    .await;
    let clone = clone_path(released.status.as_ref().unwrap(), 0);
    let c = clone.to_string_lossy().into_owned();
    sh("chattr", &["+i", &c]);
    api.delete("kept", &DeleteParams::default()).await.unwrap();
    let stuck = support::eventually(Duration::from_secs(30), "DeleteFailed shown", || async {
        let o = api.get("kept").await.ok()?;
        has_condition(o.status.as_ref()?, CONDITION_DELETE_FAILED).then_some(o)
    })
    .await;
    let events: kube::Api<k8s_openapi::api::events::v1::Event> =
        kube::Api::namespaced(env.client.clone(), &ns);
    let warned = support::eventually(Duration::from_secs(30), "a DeleteFailed event", || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("DeleteFailed"))
    })
    .await;
    let still_there = clone.exists();
    sh("chattr", &["-i", &c]);
    assert!(still_there);
    assert!(
        stuck
            .metadata
            .finalizers
            .unwrap_or_default()
            .iter()
            .any(|f| f == "tandem.dev/agent")
    );
    assert_eq!(warned.type_.as_deref(), Some("Warning"));
    support::eventually(
        Duration::from_secs(90),
        "kept gone after the retry",
        || async { api.get_opt("kept").await.ok()?.is_none().then_some(()) },
    )
    .await;
    assert!(!clone.exists());

    let _ = api.delete("hung", &DeleteParams::default()).await;
    support::eventually(Duration::from_secs(60), "hung gone", || async {
        api.get_opt("hung").await.ok()?.is_none().then_some(())
    })
    .await;
    for pv in [&pva, &pvb] {
        let _ = pvs.delete(pv, &DeleteParams::default()).await;
    }
}
