//! GroupSnapshot end to end: the real control plane, the real `tandem controller` and one real
//! `tandem agent` process per simulated node, over loop-backed XFS/ext4 volumes published as
//! local PVs. Needs root (CI is root); skips with a message otherwise.

mod agent_support;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use agent_support::{Scratch, Volume, open_snapshot, sh_status};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::objects::{claim, local_volume};
use support::process::Daemon;
use support::{TestEnv, eventually};
use tandem::api::{
    Consistency, ConsistencyGroup, GroupSnapshot, GroupSnapshotPhase, NodeAction, NodePhase,
    NodeSnapshot,
};

const WAIT: Duration = Duration::from_secs(60);

/// One test's cluster: volumes on simulated nodes, their agents and a controller.
/// Field order is drop order: processes stop (agents thaw) before the volumes go.
struct World {
    agents: BTreeMap<String, Daemon>,
    controller: Option<Daemon>,
    volumes: BTreeMap<String, Volume>,
    pool: PathBuf,
    scratch: Scratch,
    env: TestEnv,
}

impl Drop for World {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(self.logs());
        }
    }
}

impl World {
    async fn new(name: &str) -> World {
        let env = TestEnv::new(name).await;
        let mut scratch = Scratch::new();
        let pool = scratch.pool("xfs");
        World {
            agents: BTreeMap::new(),
            controller: None,
            volumes: BTreeMap::new(),
            pool,
            scratch,
            env,
        }
    }

    /// Node names are unique per test: agents watch every namespace.
    fn node(&self, short: &str) -> String {
        format!("{}-{short}", self.env.namespace)
    }

    /// Process logs live outside the scratch area and stay behind when a test fails.
    fn logs(&self) -> PathBuf {
        std::env::temp_dir()
            .join("tandem-test-logs")
            .join(&self.env.namespace)
    }

    /// Makes a loop-backed volume, publishes it as a local PV on `node` and a claim bound to it.
    async fn add_volume(
        &mut self,
        claim_name: &str,
        node: &str,
        fs: &str,
        labels: &[(&str, &str)],
    ) {
        let volume = self
            .scratch
            .volume(&self.pool.clone(), claim_name, fs, 64 << 20);
        self.scratch.assert_owned(&volume.mount);
        let node = self.node(node);
        let pv = format!("{}-{claim_name}", self.env.namespace);
        let volumes: Api<PersistentVolume> = Api::all(self.env.client.clone());
        volumes
            .create(
                &PostParams::default(),
                &local_volume(
                    &pv,
                    &volume.mount.to_string_lossy(),
                    &node,
                    &self.env.namespace,
                    claim_name,
                    &[],
                ),
            )
            .await
            .expect("create PV");
        let claims: Api<PersistentVolumeClaim> = self.env.api();
        claims
            .create(
                &PostParams::default(),
                &claim(claim_name, Some(&pv), labels),
            )
            .await
            .expect("create PVC");
        self.volumes.insert(claim_name.into(), volume);
    }

    fn tandem(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args(args)
            .env("KUBECONFIG", &self.env.plane.kubeconfig)
            .env("RUST_LOG", "info,tandem=debug,kube_runtime=debug");
        cmd
    }

    fn start_agent(&mut self, node: &str) {
        let node = self.node(node);
        let state = self.scratch.path(&format!("state-{node}"));
        let cmd = &mut self.tandem(&[
            "agent",
            "--node-name",
            &node,
            "--state-dir",
            &state.to_string_lossy(),
        ]);
        let daemon = Daemon::spawn(&format!("agent-{node}"), cmd, &self.logs());
        self.agents.insert(node, daemon);
    }

    fn agent(&mut self, node: &str) -> &mut Daemon {
        let node = self.node(node);
        self.agents.get_mut(&node).expect("agent")
    }

    fn start_controller(&mut self) {
        let cmd = &mut self.tandem(&["controller", "--namespace", &self.env.namespace.clone()]);
        self.controller = Some(Daemon::spawn("controller", cmd, &self.logs()));
    }

    async fn create_group(&self, name: &str, spec: serde_json::Value) {
        let groups: Api<ConsistencyGroup> = self.env.api();
        groups
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))
                    .expect("group"),
            )
            .await
            .expect("create group");
        // The snapshot reads the group's resolved members: wait until all can be snapshotted
        // (kube-controller-manager binds the claims).
        eventually(WAIT, "group Ready", || {
            let groups = groups.clone();
            async move {
                let g = groups.get(name).await.ok()?;
                let status = g.status?;
                let ready = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                (status.observed_generation == g.metadata.generation && ready).then_some(())
            }
        })
        .await;
    }

    async fn create_snapshot(&self, name: &str, group: &str, policy: &str) {
        let snapshots: Api<GroupSnapshot> = self.env.api();
        snapshots
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"groupName": group, "deletionPolicy": policy}}))
                .expect("snapshot"),
            )
            .await
            .expect("create snapshot");
    }

    async fn wait_phase(&self, name: &str, phase: GroupSnapshotPhase) -> GroupSnapshot {
        let snapshots: Api<GroupSnapshot> = self.env.api();
        eventually(WAIT, &format!("GroupSnapshot {name} {phase:?}"), || {
            let snapshots = snapshots.clone();
            async move {
                let s = snapshots.get(name).await.ok()?;
                let got = s.status.as_ref()?.phase;
                if got != phase
                    && matches!(got, GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed)
                {
                    panic!(
                        "GroupSnapshot {name} ended {got:?} instead of {phase:?}: {:?}",
                        s.status
                    );
                }
                (got == phase).then_some(s)
            }
        })
        .await
    }

    async fn node_snapshots(&self) -> Vec<NodeSnapshot> {
        let api: Api<NodeSnapshot> = self.env.api();
        api.list(&ListParams::default())
            .await
            .expect("list nsnap")
            .items
    }

    async fn wait_node_phase(&self, node: &str, phase: NodePhase) {
        let node = self.node(node);
        let api: Api<NodeSnapshot> = self.env.api();
        eventually(WAIT, &format!("node {node} {phase:?}"), || {
            let api = api.clone();
            let node = node.clone();
            async move {
                let list = api.list(&ListParams::default()).await.ok()?;
                list.items
                    .iter()
                    .any(|n| {
                        n.spec.node_name == node
                            && n.status.as_ref().is_some_and(|s| s.phase == phase)
                    })
                    .then_some(())
            }
        })
        .await
    }

    /// Every volume accepts a write within 5 s: nothing is left frozen.
    fn assert_nothing_frozen(&self) {
        for (claim, volume) in &self.volumes {
            let probe = volume.mount.join("thaw-probe");
            let (code, out) = sh_status(
                "timeout",
                &[
                    "5",
                    "sh",
                    "-c",
                    &format!(
                        "echo probe > {} && sync -f {}",
                        probe.display(),
                        probe.display()
                    ),
                ],
            );
            assert_eq!(
                code, 0,
                "volume {claim} is still frozen (a write did not finish in 5 s): {out}"
            );
        }
    }

    /// Clone images (and half-made ones) the agents left in the pool.
    fn snapshot_files(&self) -> Vec<PathBuf> {
        let dir = self.pool.join(".tandem-snapshots");
        std::fs::read_dir(&dir)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }
}

/// Writes numbered lines to every volume in a fixed order, one round after another, until stopped.
/// In any crash-consistent cut the counts can only decrease along that order, by at most one.
fn ordered_writer(mounts: Vec<PathBuf>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut files: Vec<std::fs::File> = mounts
            .iter()
            .map(|m| std::fs::File::create(m.join("sequence")).expect("sequence file"))
            .collect();
        let mut round = 0u64;
        while !stop.load(Ordering::Relaxed) {
            for f in &mut files {
                writeln!(f, "{round}").expect("write sequence");
            }
            round += 1;
        }
        round
    })
}

fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

fn require_root() -> bool {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: this test needs root (loop devices, mounts, FIFREEZE)");
        return false;
    }
    true
}

fn clone_path(handle: &str) -> PathBuf {
    PathBuf::from(handle.strip_prefix("reflink:").expect("a reflink handle"))
}

#[tokio::test]
async fn cross_node_group_snapshot_is_one_point_in_time() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-cross").await;
    for (claim, node, fs) in [
        ("data", "a", "xfs"),
        ("wal", "a", "ext4"),
        ("index", "b", "xfs"),
        ("queue", "c", "ext4"),
    ] {
        w.add_volume(claim, node, fs, &[("app", "shop")]).await;
    }
    for node in ["a", "b", "c"] {
        w.start_agent(node);
    }
    w.start_controller();
    w.create_group(
        "shop",
        json!({"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20}),
    )
    .await;

    // Data written (and synced) before the snapshot.
    let mut before = BTreeMap::new();
    for (claim, volume) in &w.volumes {
        let hash = agent_support::write_file(
            &volume.mount.join("before.bin"),
            1 << 20,
            claim.len() as u64,
            true,
        );
        before.insert(claim.clone(), hash);
    }
    let order: Vec<String> = w.volumes.keys().cloned().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = ordered_writer(
        order.iter().map(|c| w.volumes[c].mount.clone()).collect(),
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    w.create_snapshot("shop-1", "shop", "Delete").await;
    let snapshot = w.wait_phase("shop-1", GroupSnapshotPhase::Ready).await;
    stop.store(true, Ordering::Relaxed);
    let rounds = writer.join().expect("writer");
    assert!(rounds > 0);
    for (claim, volume) in &w.volumes {
        agent_support::write_file(&volume.mount.join("after.bin"), 4096, 7, true);
        let _ = claim;
    }

    let status = snapshot.status.expect("status");
    assert_eq!(status.consistency, Some(Consistency::FilesystemFrozen));
    assert_eq!(status.member_count, 4);
    assert_eq!(status.nodes.len(), 3);
    assert!(status.freeze_window_millis.is_some(), "{status:?}");
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.freeze_window_millis.is_some()),
        "{status:?}"
    );
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True");
    for member in &status.members {
        assert!(member.frozen, "{member:?}");
        assert!(
            member.cut_time.is_some() && member.size.is_some(),
            "{member:?}"
        );
        assert_eq!(
            member.node,
            w.node(match member.claim.as_str() {
                "data" | "wal" => "a",
                "index" => "b",
                _ => "c",
            })
        );
    }
    for n in w.node_snapshots().await {
        assert_eq!(n.spec.action, NodeAction::Release);
        assert_eq!(n.status.expect("status").phase, NodePhase::Released);
    }
    w.assert_nothing_frozen();

    // Every member's snapshot: clean filesystem, the data from before, nothing from after, and
    // the ordered writer's counts form one point in time across all four volumes and three nodes.
    let mut counts = Vec::new();
    for claim in &order {
        let member = status
            .members
            .iter()
            .find(|m| &m.claim == claim)
            .expect("member");
        let clone = clone_path(member.snapshot_handle.as_deref().expect("handle"));
        let fs = w.volumes[claim].fs.clone();
        let mnt = open_snapshot(&mut w.scratch, &clone, &fs, claim);
        assert_eq!(
            agent_support::sha256_file(&mnt.join("before.bin")),
            before[claim],
            "{claim}"
        );
        assert!(
            !mnt.join("after.bin").exists(),
            "{claim}: data written after the snapshot is in it"
        );
        counts.push(count_lines(&mnt.join("sequence")));
        w.scratch.unmount(&mnt);
    }
    for pair in counts.windows(2) {
        assert!(
            pair[0] >= pair[1] && pair[0] <= pair[1] + 1,
            "the snapshots are not one point in time: sequence counts {counts:?} in order {order:?}"
        );
    }

    // Re-applying the same object (GitOps) never cuts again.
    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .patch(
            "shop-1",
            &PatchParams::apply("gitops").force(),
            &Patch::Apply(
                json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
                "metadata": {"name": "shop-1", "labels": {"synced": "yes"}},
                "spec": {"groupName": "shop", "deletionPolicy": "Delete"}}),
            ),
        )
        .await
        .expect("re-apply");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let again = snapshots
        .get("shop-1")
        .await
        .expect("snapshot")
        .status
        .expect("status");
    assert_eq!(again.phase, GroupSnapshotPhase::Ready);
    assert_eq!(
        again.start_time, status.start_time,
        "re-applying started a new cut"
    );
    assert_eq!(w.node_snapshots().await.len(), 3);
    assert_eq!(w.snapshot_files().len(), 4, "{:?}", w.snapshot_files());

    // A member snapshot cannot be deleted on its own: its NodeSnapshot waits for the group.
    let nodes: Api<NodeSnapshot> = w.env.api();
    let first = w.node_snapshots().await.remove(0);
    let first_name = first.metadata.name.clone().expect("name");
    nodes
        .delete(&first_name, &DeleteParams::default())
        .await
        .expect("delete nsnap");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        nodes.get_opt(&first_name).await.expect("get").is_some(),
        "a member snapshot was deleted on its own"
    );
    assert_eq!(w.snapshot_files().len(), 4, "{:?}", w.snapshot_files());

    // deletionPolicy Delete: the clones go with the GroupSnapshot.
    snapshots
        .delete("shop-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "GroupSnapshot and NodeSnapshots gone", || {
        let snapshots = snapshots.clone();
        let nodes = nodes.clone();
        async move {
            let gone = snapshots.get_opt("shop-1").await.ok()?.is_none();
            let nodes_gone = nodes
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            (gone && nodes_gone).then_some(())
        }
    })
    .await;
    assert!(
        w.snapshot_files().is_empty(),
        "clones left behind: {:?}",
        w.snapshot_files()
    );
}

#[tokio::test]
async fn single_node_snapshot_with_retain_keeps_the_clones() {
    if !require_root() {
        return;
    }
    let mut w = World::new("gs-retain").await;
    w.add_volume("one", "a", "xfs", &[]).await;
    w.add_volume("two", "a", "ext4", &[]).await;
    w.start_agent("a");
    w.start_controller();
    w.create_group("solo", json!({"claims": ["one", "two"]}))
        .await;
    w.create_snapshot("solo-1", "solo", "Retain").await;
    let snapshot = w.wait_phase("solo-1", GroupSnapshotPhase::Ready).await;
    let status = snapshot.status.expect("status");
    assert_eq!(status.consistency, Some(Consistency::FilesystemFrozen));
    // One node: the agent thawed right after its cut, without waiting for a release.
    let nodes = w.node_snapshots().await;
    assert_eq!(nodes.len(), 1);
    assert!(nodes[0].spec.release_after_cut);
    assert_eq!(nodes[0].spec.action, NodeAction::Cut);
    assert_eq!(w.snapshot_files().len(), 2);

    let snapshots: Api<GroupSnapshot> = w.env.api();
    snapshots
        .delete("solo-1", &DeleteParams::default())
        .await
        .expect("delete");
    let nodes_api: Api<NodeSnapshot> = w.env.api();
    eventually(WAIT, "GroupSnapshot gone", || {
        let snapshots = snapshots.clone();
        let nodes_api = nodes_api.clone();
        async move {
            let gone = snapshots.get_opt("solo-1").await.ok()?.is_none()
                && nodes_api
                    .list(&ListParams::default())
                    .await
                    .ok()?
                    .items
                    .is_empty();
            gone.then_some(())
        }
    })
    .await;
    assert_eq!(w.snapshot_files().len(), 2, "Retain must keep the clones");
    w.assert_nothing_frozen();
    for file in w.snapshot_files() {
        std::fs::remove_file(file).expect("remove retained clone");
    }
}
