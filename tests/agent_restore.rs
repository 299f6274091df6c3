//! The agent's side of restores against a real API server (etcd + kube-apiserver +
//! kube-controller-manager from tests/support) with a real `tandem agent` process on loop-backed
//! XFS and ext4 volumes this test makes: a NodeSnapshot is cut and released by the agent, then a
//! NodeRestore clones its members (reflink clones published as loop devices behind links); abort,
//! release, deletion, refusals, a failing clone, an agent killed mid-clone and an agent restarted
//! after the clones were made. Needs root (skips with a message otherwise).
//!
//! Every image, loop device and mount is made here and removed even when a test fails: `Scratch`
//! for the test's own, [`LoopGuard`] for the loop devices the agent attached over clones.

mod agent_support;
mod support;

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_support::{Scratch, Volume, sh, sh_status, sha256_file, write_file};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use support::{TestEnv, eventually, objects};
use tandem::api::{CloneState, NodePhase, NodeRestore, NodeRestorePhase, NodeSnapshot};

const MIB: usize = 1 << 20;

/// The agent binary as a child process; killed when dropped.
struct Agent(Child);

impl Agent {
    fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Detaches, on drop, every loop device whose backing file is a restore clone under `dir` (what
/// the agent attached, should a test fail before the agent deleted it). Declared after the
/// Scratch, so it runs first.
struct LoopGuard(PathBuf);

fn clone_loops(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(backing) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        let backing = backing.trim();
        if backing.starts_with(&*dir.to_string_lossy()) && backing.contains("/.tandem-restores/") {
            out.push(format!("/dev/{name}"));
        }
    }
    out
}

/// Mount points under `dir` the agent made (its btrfs top-level mounts under the state
/// directory, the bind mounts of btrfs clones), deepest first.
fn agent_mounts(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let state = dir.join("state").to_string_lossy().into_owned();
    let restores = dir.join("restores").to_string_lossy().into_owned();
    let mut out: Vec<String> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&state) || m.starts_with(&restores))
        .map(str::to_string)
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.len()));
    out.dedup();
    out
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        for m in agent_mounts(&self.0) {
            let _ = sh_status("umount", &["-l", &m]);
        }
        for dev in clone_loops(&self.0) {
            let _ = sh_status("umount", &[&dev]);
            let _ = sh_status("losetup", &["-d", &dev]);
        }
    }
}

struct Setup {
    env: TestEnv,
    node: String,
    state: PathBuf,
    links: PathBuf,
    pool: PathBuf,
    volumes: Vec<Volume>,
    /// The snapshot images of the cut, by claim order (data, wal).
    snapshots: Vec<PathBuf>,
    /// sha256 of the file written into each volume before the cut.
    before: Vec<String>,
    snapshot_uid: String,
    agent: Option<Agent>,
}

const CLAIMS: [&str; 3] = ["data", "wal", "log"];

impl Setup {
    /// Two volumes (XFS and ext4), their PVs, an agent, and a NodeSnapshot of both cut and
    /// released, with a file written before the cut and another after it.
    async fn new(s: &mut Scratch, name: &str) -> Setup {
        let pool = s.pool("xfs");
        let v1 = s.volume(&pool, &format!("{name}1"), "xfs", 320 << 20);
        let v2 = s.volume(&pool, &format!("{name}2"), "ext4", 128 << 20);
        Setup::with_volumes(s, name, pool, vec![v1, v2]).await
    }

    /// The same over the given volumes (of the pool `pool`), claimed as data, wal, ...
    async fn with_volumes(
        s: &mut Scratch,
        name: &str,
        pool: PathBuf,
        volumes: Vec<Volume>,
    ) -> Setup {
        for v in &volumes {
            s.assert_owned(&v.mount);
        }
        let before: Vec<String> = volumes
            .iter()
            .enumerate()
            .map(|(i, v)| {
                write_file(
                    &v.mount.join("before"),
                    (4 - 2 * i) * MIB,
                    i as u64 + 1,
                    true,
                )
            })
            .collect();
        let env = TestEnv::new(name).await;
        let node = format!("{}-node", env.namespace);
        let pvs = api_pvs(&env);
        for (i, v) in volumes.iter().enumerate() {
            let obj = objects::local_volume(
                &source_pv(&env, i),
                &v.mount.to_string_lossy(),
                &node,
                &env.namespace,
                CLAIMS[i],
                &[],
            );
            pvs.create(&PostParams::default(), &obj)
                .await
                .expect("create PV");
        }
        let mut setup = Setup {
            state: s.path("state"),
            links: s.path("links"),
            pool,
            volumes,
            snapshots: Vec::new(),
            before,
            snapshot_uid: String::new(),
            agent: None,
            env,
            node,
        };
        setup.start_agent(s, None);
        let api: Api<NodeSnapshot> = setup.env.api();
        let volumes: Vec<serde_json::Value> = (0..setup.volumes.len())
            .map(|i| {
                serde_json::json!({"claim": CLAIMS[i], "persistentVolume": source_pv(&setup.env, i)})
            })
            .collect();
        let nsnap: NodeSnapshot = serde_json::from_value(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "NodeSnapshot",
            "metadata": {"name": "snap"},
            "spec": {
                "nodeName": setup.node,
                "groupSnapshot": "snap",
                "action": "Cut",
                "releaseAfterCut": true,
                // btrfs is never frozen (its snapshot writes to the filesystem itself).
                "freeze": if setup.volumes.iter().any(|v| v.fs == "btrfs") { "BestEffort" } else { "Required" },
                "freezeTimeoutSeconds": 30,
                "deletionPolicy": "Delete",
                "volumes": volumes,
            }
        }))
        .unwrap();
        api.create(&PostParams::default(), &nsnap).await.unwrap();
        let released = eventually(Duration::from_secs(60), "the cut released", || async {
            let o = api.get("snap").await.ok()?;
            matches!(
                o.status.as_ref()?.phase,
                NodePhase::Released | NodePhase::Failed | NodePhase::Aborted
            )
            .then_some(o)
        })
        .await;
        assert_eq!(
            released.status.as_ref().unwrap().phase,
            NodePhase::Released,
            "{:?}",
            released.status
        );
        setup.snapshot_uid = released.metadata.uid.clone().unwrap();
        setup.snapshots = released
            .status
            .unwrap()
            .volumes
            .iter()
            .map(|v| {
                let h = v.snapshot_handle.as_deref().unwrap();
                // A reflink snapshot's image; other backends' handles as they are.
                PathBuf::from(h.strip_prefix("reflink:").unwrap_or(h))
            })
            .collect();
        // Written after the cut: in no clone.
        for v in &setup.volumes {
            write_file(&v.mount.join("after"), MIB, 9, true);
        }
        setup
    }

    fn start_agent(&mut self, s: &Scratch, pause_ms: Option<u64>) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(s.path("agent.log"))
            .expect("agent log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(["agent", "--node-name", &self.node, "--state-dir"])
            .arg(&self.state)
            .arg("--restore-link-dir")
            .arg(&self.links)
            .arg("--restore-mount-dir")
            .arg(s.path("restores"))
            .env("KUBECONFIG", &self.env.plane.kubeconfig)
            .env("RUST_LOG", "info,tandem=debug")
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(ms) = pause_ms {
            // Test-only (debug builds): a pause after each clone, to kill the agent mid-restore.
            cmd.env("TANDEM_TEST_ONLY_CLONE_PAUSE_MS", ms.to_string());
        }
        self.agent = Some(Agent(cmd.spawn().expect("start tandem agent")));
    }

    fn kill_agent(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill();
        }
    }

    fn restores(&self) -> Api<NodeRestore> {
        self.env.api()
    }

    /// A NodeRestore of both members (or of `which`), with the spec's volumes edited by `edit`.
    async fn create_restore(
        &self,
        name: &str,
        which: &[usize],
        edit: impl Fn(usize, &mut serde_json::Value),
    ) {
        let volumes: Vec<serde_json::Value> = which
            .iter()
            .map(|&i| {
                let mut v = serde_json::json!({
                    "persistentVolume": restored_pv(name, i),
                    "claim": format!("{}-restored", CLAIMS[i]),
                    "sourceClaim": CLAIMS[i],
                    "sourcePersistentVolume": source_pv(&self.env, i),
                    "nodeSnapshot": "snap",
                    "nodeSnapshotUid": self.snapshot_uid,
                });
                edit(i, &mut v);
                v
            })
            .collect();
        let obj: NodeRestore = serde_json::from_value(serde_json::json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "NodeRestore",
            "metadata": {"name": name},
            "spec": {
                "nodeName": self.node,
                "groupRestore": name,
                "action": "Clone",
                "volumes": volumes,
            }
        }))
        .unwrap();
        self.restores()
            .create(&PostParams::default(), &obj)
            .await
            .expect("create NodeRestore");
    }

    async fn wait_phase(&self, name: &str, phase: NodeRestorePhase) -> NodeRestore {
        let api = self.restores();
        eventually(
            Duration::from_secs(60),
            &format!("NodeRestore {name} to be {phase:?}"),
            || async {
                let o = api.get(name).await.ok()?;
                (o.status.as_ref()?.phase == phase).then_some(o)
            },
        )
        .await
    }

    async fn delete_restore(&self, name: &str) {
        let api = self.restores();
        let _ = api.delete(name, &DeleteParams::default()).await;
        eventually(
            Duration::from_secs(60),
            &format!("NodeRestore {name} gone"),
            || async { api.get_opt(name).await.ok()?.is_none().then_some(()) },
        )
        .await;
    }

    fn clone_images(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.pool.join(".tandem-restores"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    fn assert_no_clone(&self, s: &Scratch) {
        assert_eq!(
            self.clone_images(),
            Vec::<PathBuf>::new(),
            "no clone image left"
        );
        assert_eq!(
            clone_loops(s.dir.path()),
            Vec::<String>::new(),
            "no clone loop device left"
        );
    }

    /// Deletes what the test made in the API (the agent deletes the snapshots) and stops the agent.
    async fn finish(mut self, s: &Scratch) {
        let restores = self.restores();
        for r in restores.list(&Default::default()).await.unwrap().items {
            let name = r.metadata.name.unwrap();
            let _ = restores.delete(&name, &DeleteParams::default()).await;
        }
        let snaps: Api<NodeSnapshot> = self.env.api();
        let _ = snaps.delete("snap", &DeleteParams::default()).await;
        eventually(Duration::from_secs(60), "everything finalized", || async {
            let r = restores.list(&Default::default()).await.ok()?;
            let n = snaps.list(&Default::default()).await.ok()?;
            (r.items.is_empty() && n.items.is_empty()).then_some(())
        })
        .await;
        self.assert_no_clone(s);
        self.kill_agent();
        for i in 0..self.volumes.len() {
            let _ = api_pvs(&self.env)
                .delete(&source_pv(&self.env, i), &DeleteParams::default())
                .await;
        }
        if std::env::var("TANDEM_SHOW_AGENT_LOG").is_ok() {
            eprintln!(
                "{}",
                std::fs::read_to_string(s.path("agent.log")).unwrap_or_default()
            );
        }
    }
}

fn api_pvs(env: &TestEnv) -> Api<PersistentVolume> {
    Api::all(env.client.clone())
}

fn source_pv(env: &TestEnv, i: usize) -> String {
    format!("{}-{}", env.namespace, CLAIMS[i])
}

fn restored_pv(restore: &str, i: usize) -> String {
    format!("tandem-{restore}-{i}")
}

fn has_finalizer(o: &NodeRestore) -> bool {
    o.metadata
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == "tandem.dev/agent"))
}

fn message(o: &NodeRestore) -> String {
    o.status
        .as_ref()
        .and_then(|s| s.message.clone())
        .unwrap_or_default()
}

/// Checks a Cloned restore: each volume a block device behind its link, its bytes the snapshot's,
/// its filesystem mountable with the file written before the cut and not the one written after.
fn check_clones(s: &mut Scratch, setup: &Setup, o: &NodeRestore, which: &[usize], label: &str) {
    let st = o.status.as_ref().unwrap();
    assert_eq!(st.volumes.len(), which.len());
    for (v, &i) in st.volumes.iter().zip(which) {
        assert_eq!(v.state, CloneState::Cloned, "{v:?}");
        assert!(v.block, "{v:?}");
        assert_eq!(v.backend.as_deref(), Some("reflink"));
        assert_eq!(v.filesystem.as_deref(), Some(setup.volumes[i].fs.as_str()));
        assert!(v.cloned_at.is_some() && v.clone_handle.is_some());
        let path = PathBuf::from(v.path.as_deref().unwrap());
        assert_eq!(path, setup.links.join(&v.persistent_volume));
        let meta = std::fs::metadata(&path).expect("the clone's path");
        assert!(
            meta.file_type().is_block_device(),
            "{} is a block device",
            path.display()
        );
        assert_eq!(
            v.size_bytes,
            Some(std::fs::metadata(&setup.snapshots[i]).unwrap().len() as i64)
        );
        // Byte for byte the snapshot.
        let dev = std::fs::canonicalize(&path).unwrap();
        let (code, out) = sh_status(
            "cmp",
            &[
                &dev.to_string_lossy(),
                &setup.snapshots[i].to_string_lossy(),
            ],
        );
        assert_eq!(code, 0, "the clone differs from the snapshot: {out}");
        // And a filesystem holding what was written before the cut only.
        let mnt = s.path(&format!("clone-{label}-{i}"));
        let opts: &[&str] = if setup.volumes[i].fs == "xfs" {
            &["ro", "nouuid"]
        } else {
            &["ro"]
        };
        s.mount(&dev.to_string_lossy(), &mnt, opts);
        assert_eq!(sha256_file(&mnt.join("before")), setup.before[i]);
        assert!(!mnt.join("after").exists());
        s.unmount(&mnt);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_clones_every_member_and_abort_deletes_every_clone() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let setup = Setup::new(&mut s, "rs-abort").await;
    let started = std::time::Instant::now();
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    let cloned = setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    // A measurement, not a bound: create to Cloned as the API shows it (polled every 100 ms).
    eprintln!(
        "NodeRestore of 2 reflink members (320 MiB XFS, 128 MiB ext4): Cloned {:?} after create",
        started.elapsed()
    );
    assert!(has_finalizer(&cloned));
    check_clones(&mut s, &setup, &cloned, &[0, 1], "abort");
    assert_eq!(setup.clone_images().len(), 2);
    // The journal: written before the clones, kept while they exist.
    let uid = cloned.metadata.uid.clone().unwrap();
    assert!(
        setup
            .state
            .join("restores")
            .join(format!("{uid}.json"))
            .exists()
    );

    setup
        .restores()
        .patch(
            "r",
            &PatchParams::default(),
            &Patch::Merge(&serde_json::json!({"spec": {"action": "Abort"}})),
        )
        .await
        .unwrap();
    let aborted = setup.wait_phase("r", NodeRestorePhase::Aborted).await;
    assert!(
        aborted
            .status
            .unwrap()
            .volumes
            .iter()
            .all(|v| v.state == CloneState::Deleted)
    );
    setup.assert_no_clone(&s);
    for i in 0..2 {
        assert!(
            !setup.links.join(restored_pv("r", i)).exists(),
            "link removed"
        );
    }
    // The snapshots themselves are untouched.
    assert!(setup.snapshots.iter().all(|p| p.exists()));
    setup.delete_restore("r").await;
    assert!(
        !setup
            .state
            .join("restores")
            .join(format!("{uid}.json"))
            .exists()
    );
    setup.finish(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_deletes_only_that_clone_and_deleting_the_restore_removes_the_rest() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let setup = Setup::new(&mut s, "rs-release").await;
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    let api = setup.restores();
    let mut o = api.get("r").await.unwrap();
    o.spec.volumes[1].release = true;
    o.metadata.managed_fields = None;
    api.replace("r", &PostParams::default(), &o).await.unwrap();
    let released = eventually(Duration::from_secs(60), "wal's clone Deleted", || async {
        let o = api.get("r").await.ok()?;
        let st = o.status.clone()?;
        (st.volumes.get(1)?.state == CloneState::Deleted).then_some(o)
    })
    .await;
    let st = released.status.as_ref().unwrap();
    assert_eq!(st.phase, NodeRestorePhase::Cloned);
    assert_eq!(st.volumes[0].state, CloneState::Cloned);
    assert_eq!(
        setup.clone_images().len(),
        1,
        "only the released clone is gone"
    );
    assert!(!setup.links.join(restored_pv("r", 1)).exists());
    let mut kept = released.clone();
    kept.status.as_mut().unwrap().volumes.truncate(1);
    check_clones(&mut s, &setup, &kept, &[0], "release");

    // Deleting the NodeRestore deletes the clone left, then lets the object go.
    setup.delete_restore("r").await;
    setup.assert_no_clone(&s);
    setup.finish(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_uid_or_a_missing_snapshot_fails_with_a_message_and_nothing_is_made() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let setup = Setup::new(&mut s, "rs-refuse").await;
    let cases: [(&str, &str, serde_json::Value); 3] = [
        (
            "wrong-uid",
            "it was recreated",
            serde_json::json!({"nodeSnapshotUid": "00000000-0000-4000-8000-000000000000"}),
        ),
        (
            "no-such-snapshot",
            "does not exist any more",
            serde_json::json!({"nodeSnapshot": "nope"}),
        ),
        (
            "no-such-claim",
            "has no volume of claim other",
            serde_json::json!({"sourceClaim": "other"}),
        ),
    ];
    for (name, needle, patch) in &cases {
        // The first volume is fine, the second is not: nothing at all is made.
        setup
            .create_restore(name, &[0, 1], |i, v| {
                if i == 1 {
                    for (k, val) in patch.as_object().unwrap() {
                        v[k] = val.clone();
                    }
                }
            })
            .await;
        let failed = setup.wait_phase(name, NodeRestorePhase::Failed).await;
        let msg = message(&failed);
        assert!(
            msg.contains(needle) && msg.contains("nothing was cloned"),
            "{name}: {msg}"
        );
        assert!(
            msg.contains(&restored_pv(name, 1)),
            "{name} names the volume: {msg}"
        );
        setup.assert_no_clone(&s);
    }
    // A Warning event says why.
    let events = setup
        .env
        .kubectl(&["get", "events", "-o", "jsonpath={.items[*].reason}"])
        .unwrap();
    assert!(events.contains("RestoreFailed"), "{events}");
    for (name, _, _) in &cases {
        setup.delete_restore(name).await;
    }
    setup.finish(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_two_clones_failing_leaves_no_clone() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let setup = Setup::new(&mut s, "rs-half").await;
    // Something that is not a link already sits where the second clone would be published.
    std::fs::create_dir_all(&setup.links).unwrap();
    let squatter = setup.links.join(restored_pv("r", 1));
    std::fs::write(&squatter, "not tandem's").unwrap();
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    let failed = setup.wait_phase("r", NodeRestorePhase::Failed).await;
    let msg = message(&failed);
    assert!(
        msg.contains("wal-restored") && msg.contains("every clone"),
        "{msg}"
    );
    let st = failed.status.unwrap();
    assert_eq!(
        st.volumes[0].state,
        CloneState::Deleted,
        "the first clone was made, then deleted"
    );
    assert_eq!(st.volumes[1].state, CloneState::Failed);
    setup.assert_no_clone(&s);
    assert!(!setup.links.join(restored_pv("r", 0)).exists());
    assert_eq!(
        std::fs::read_to_string(&squatter).unwrap(),
        "not tandem's",
        "left alone"
    );
    setup.delete_restore("r").await;
    setup.finish(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_clone_reports_failed_at_restart_and_leaves_no_clone() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let mut setup = Setup::new(&mut s, "rs-killed").await;
    // Restart the agent with the test-only pause after each clone.
    setup.kill_agent();
    setup.start_agent(&s, Some(120_000));
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    let api = setup.restores();
    eventually(Duration::from_secs(60), "the first clone made", || async {
        let st = api.get("r").await.ok()?.status?;
        (st.phase == NodeRestorePhase::Cloning && st.volumes.first()?.state == CloneState::Cloned)
            .then_some(())
    })
    .await;
    assert_eq!(setup.clone_images().len(), 1);
    // SIGKILL mid-restore: nothing of the agent runs any more.
    setup.kill_agent();
    setup.start_agent(&s, None);
    let failed = setup.wait_phase("r", NodeRestorePhase::Failed).await;
    assert_eq!(
        message(&failed),
        "the agent restarted while cloning; the restore is rolled back"
    );
    setup.assert_no_clone(&s);
    assert!(!setup.links.join(restored_pv("r", 0)).exists());
    setup.delete_restore("r").await;
    setup.finish(&s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_after_cloned_keeps_the_clones_and_attaches_them_again() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let mut setup = Setup::new(&mut s, "rs-reboot").await;
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    let cloned = setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    setup.kill_agent();
    // A reboot, as far as clones go: loop devices and links gone.
    for dev in clone_loops(s.dir.path()) {
        sh("losetup", &["-d", &dev]);
    }
    for i in 0..2 {
        std::fs::remove_file(setup.links.join(restored_pv("r", i))).unwrap();
    }
    eventually(Duration::from_secs(10), "loop devices detached", || async {
        clone_loops(s.dir.path()).is_empty().then_some(())
    })
    .await;
    setup.start_agent(&s, None);
    eventually(Duration::from_secs(60), "links back", || async {
        (0..2)
            .all(|i| setup.links.join(restored_pv("r", i)).exists())
            .then_some(())
    })
    .await;
    let again = setup.restores().get("r").await.unwrap();
    assert_eq!(
        again.status.as_ref().unwrap().phase,
        NodeRestorePhase::Cloned
    );
    assert_eq!(clone_loops(s.dir.path()).len(), 2);
    check_clones(&mut s, &setup, &again, &[0, 1], "reboot");
    assert_eq!(
        cloned.status.unwrap().volumes[0].clone_handle,
        again.status.unwrap().volumes[0].clone_handle
    );
    // Deleting the NodeRestore removes the clones.
    setup.delete_restore("r").await;
    setup.assert_no_clone(&s);
    setup.finish(&s).await;
}

/// A btrfs member: its clone is a writable subvolume, published as a directory (`block: false`)
/// bind-mounted at `<mount dir>/<pv>`, the PV path `<mount dir>/<pv>/volume`; after a "reboot"
/// (the bind mount gone) the path does not exist until the restarted agent attaches it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_btrfs_member_is_restored_as_a_directory_and_attached_again_after_a_reboot() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let img = s.path("btrfs.img");
    s.image(&img, 512 << 20);
    let dev = s.attach(&img, false);
    s.mkfs(&dev, "btrfs");
    let top = s.path("top");
    s.mount(&dev, &top, &[]);
    sh(
        "btrfs",
        &[
            "-q",
            "subvolume",
            "create",
            &top.join("vol1").to_string_lossy(),
        ],
    );
    // Only the subvolume stays mounted: another mount of the same btrfs would make the volume a
    // shared filesystem, which the agent refuses.
    s.unmount(&top);
    let mount = s.path("vol-btrfs");
    s.mount(&dev, &mount, &["subvol=vol1"]);
    let volume = Volume {
        image: img.clone(),
        device: dev.clone(),
        mount,
        fs: "btrfs".into(),
    };
    let mut setup = Setup::with_volumes(&mut s, "rs-btrfs", top.clone(), vec![volume]).await;
    assert!(
        setup.snapshots[0].to_string_lossy().starts_with("btrfs:"),
        "{:?}",
        setup.snapshots
    );
    setup.create_restore("r", &[0], |_, _| {}).await;
    let cloned = setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    let v = cloned.status.as_ref().unwrap().volumes[0].clone();
    assert_eq!(v.backend.as_deref(), Some("btrfs"));
    assert!(!v.block);
    let bind = s.path("restores").join(restored_pv("r", 0));
    let path = PathBuf::from(v.path.as_deref().unwrap());
    assert_eq!(path, bind.join("volume"));
    assert!(path.is_dir());
    assert_eq!(sha256_file(&path.join("before")), setup.before[0]);
    assert!(!path.join("after").exists());
    // Writable, and its writes reach neither the origin nor the snapshot.
    std::fs::write(path.join("restored-only"), "x").unwrap();
    assert!(!setup.volumes[0].mount.join("restored-only").exists());

    // A reboot: the bind mount goes; the PV path with it.
    setup.kill_agent();
    sh("umount", &[&bind.to_string_lossy()]);
    assert!(!path.exists(), "no PV path without the bind mount");
    setup.start_agent(&s, None);
    eventually(Duration::from_secs(60), "the bind mount back", || async {
        path.join("restored-only").exists().then_some(())
    })
    .await;
    assert_eq!(
        setup
            .restores()
            .get("r")
            .await
            .unwrap()
            .status
            .unwrap()
            .phase,
        NodeRestorePhase::Cloned
    );

    // Deleting the NodeRestore deletes the subvolume and the mount.
    setup.delete_restore("r").await;
    assert!(!path.exists());
    s.mount(&dev, &top, &[]);
    assert!(
        agent_mounts(s.dir.path())
            .iter()
            .all(|m| !m.starts_with(&*bind.to_string_lossy()))
    );
    assert_eq!(
        setup.clone_images(),
        Vec::<PathBuf>::new(),
        "no clone subvolume left"
    );
    setup.finish(&s).await;
}

/// A clone that cannot be deleted (`chattr +i` on its image) keeps the NodeRestore (and its
/// finalizer) with a DeleteFailed condition and a Warning event, and is retried until it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_that_cannot_be_deleted_keeps_the_finalizer_and_is_retried() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let setup = Setup::new(&mut s, "rs-stuck").await;
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    let images = setup.clone_images();
    assert_eq!(images.len(), 2);
    let stuck = images[0].to_string_lossy().into_owned();
    sh("chattr", &["+i", &stuck]);
    struct Mutable(String);
    impl Drop for Mutable {
        fn drop(&mut self) {
            let _ = sh_status("chattr", &["-i", &self.0]);
        }
    }
    let mutable = Mutable(stuck.clone());

    let api = setup.restores();
    api.delete("r", &DeleteParams::default()).await.unwrap();
    let shown = eventually(Duration::from_secs(60), "DeleteFailed shown", || async {
        let o = api.get_opt("r").await.ok()??;
        let st = o.status.clone()?;
        st.conditions
            .iter()
            .any(|c| c.type_ == "DeleteFailed" && c.status == "True")
            .then_some(o)
    })
    .await;
    assert!(
        has_finalizer(&shown),
        "the finalizer stays while a clone is left"
    );
    assert_eq!(
        shown.status.as_ref().unwrap().phase,
        NodeRestorePhase::Cloning
    );
    assert!(
        message(&shown).contains("rolling back"),
        "{}",
        message(&shown)
    );
    assert_eq!(
        setup.clone_images(),
        vec![PathBuf::from(&stuck)],
        "only the stuck one is left"
    );
    let events = setup
        .env
        .kubectl(&["get", "events", "-o", "jsonpath={.items[*].reason}"])
        .unwrap();
    assert!(events.contains("DeleteFailed"), "{events}");

    drop(mutable);
    eventually(
        Duration::from_secs(90),
        "the NodeRestore gone once the delete works",
        || async { api.get_opt("r").await.ok()?.is_none().then_some(()) },
    )
    .await;
    setup.assert_no_clone(&s);
    setup.finish(&s).await;
}

/// A clone journal entry that cannot be read leaves its NodeRestore as it is (never "lost", never
/// finalized, a Warning event), and once repaired the agent knows its clones again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_journal_entry_leaves_the_restore_alone_until_repaired() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let mut setup = Setup::new(&mut s, "rs-corrupt").await;
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    let cloned = setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    let uid = cloned.metadata.uid.clone().unwrap();
    let file = setup.state.join("restores").join(format!("{uid}.json"));
    setup.kill_agent();
    let good = std::fs::read(&file).unwrap();
    std::fs::write(&file, b"{ damaged").unwrap();
    setup.start_agent(&s, None);
    let api = setup.restores();
    api.delete("r", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "a JournalUnreadable event",
        || async {
            let events = setup
                .env
                .kubectl(&["get", "events", "-o", "jsonpath={.items[*].reason}"])
                .ok()?;
            events.contains("JournalUnreadable").then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let left = api.get("r").await.unwrap();
    assert!(
        has_finalizer(&left),
        "never finalized without knowing its clones"
    );
    assert_eq!(
        left.status.unwrap().phase,
        NodeRestorePhase::Cloned,
        "never reported lost"
    );
    assert_eq!(setup.clone_images().len(), 2, "the clones are untouched");

    // Repaired, and the agent restarted: the deletion goes through.
    setup.kill_agent();
    std::fs::write(&file, good).unwrap();
    setup.start_agent(&s, None);
    for _ in 0..600 {
        if api.get_opt("r").await.unwrap().is_none() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(o) = api.get_opt("r").await.unwrap() {
        let log = std::fs::read_to_string(s.path("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "the NodeRestore is still there: {:?}\nagent log (last lines, newest first):\n{}",
            o.status,
            tail.join("\n")
        );
    }
    setup.assert_no_clone(&s);
    setup.finish(&s).await;
}

/// An agent restarted without a reboot (a DaemonSet rollout): the clones are still attached, the
/// agent's start attaches them again without a second loop device, and it goes on working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restarted_without_a_reboot_keeps_its_clones_and_goes_on_working() {
    require_root!();
    let mut s = Scratch::new();
    let _loops = LoopGuard(s.dir.path().to_path_buf());
    let mut setup = Setup::new(&mut s, "rs-rollout").await;
    setup.create_restore("r", &[0, 1], |_, _| {}).await;
    setup.wait_phase("r", NodeRestorePhase::Cloned).await;
    let loops = clone_loops(s.dir.path());
    assert_eq!(loops.len(), 2);
    setup.kill_agent();
    setup.start_agent(&s, None);
    // The restarted agent works: a second restore of the same snapshot is cloned.
    setup.create_restore("r2", &[0], |_, _| {}).await;
    setup.wait_phase("r2", NodeRestorePhase::Cloned).await;
    let again = setup.restores().get("r").await.unwrap();
    assert_eq!(
        again.status.as_ref().unwrap().phase,
        NodeRestorePhase::Cloned
    );
    let mut now = clone_loops(s.dir.path());
    now.retain(|d| loops.contains(d));
    assert_eq!(now.len(), 2, "the same loop devices, none added for r");
    assert_eq!(clone_loops(s.dir.path()).len(), 3, "r's two and r2's one");
    check_clones(&mut s, &setup, &again, &[0, 1], "rollout");
    setup.delete_restore("r").await;
    setup.delete_restore("r2").await;
    setup.assert_no_clone(&s);
    setup.finish(&s).await;
}
