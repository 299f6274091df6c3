//! The end-to-end world of GroupSnapshot tests: volumes on simulated nodes, one real
//! `tandem agent` process per node, a real `tandem controller`, on the real control plane.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;
use tandem::api::{ConsistencyGroup, GroupSnapshot, GroupSnapshotPhase, NodePhase, NodeSnapshot};

use crate::agent_support::{self, Scratch, Volume};
use crate::support::objects::{claim, local_volume};
use crate::support::process::Daemon;
use crate::support::{TestEnv, eventually};

pub const WAIT: Duration = Duration::from_secs(60);

/// One test's cluster: volumes on simulated nodes, their agents and a controller.
/// Field order is drop order: processes stop (agents thaw) before the volumes go.
pub struct World {
    pub agents: BTreeMap<String, Daemon>,
    pub controller: Option<Daemon>,
    pub volumes: BTreeMap<String, Volume>,
    pub pool: PathBuf,
    pub scratch: Scratch,
    pub env: TestEnv,
}

impl Drop for World {
    fn drop(&mut self) {
        // Restore clones a test left attached (loop devices over images in the pool) would keep
        // the pool busy: detach exactly those (by backing file), whatever the test did.
        for image in self.restore_files() {
            let out = Command::new("losetup")
                .args(["-j", &image.to_string_lossy(), "-O", "NAME", "-n"])
                .output();
            if let Ok(out) = out {
                for dev in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("losetup").args(["-d", dev]).status();
                }
            }
        }
        // Kept when the test failed, or on request (TANDEM_KEEP_LOGS=1) to study a timeline.
        if !std::thread::panicking() && std::env::var_os("TANDEM_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(self.logs());
        }
    }
}

impl World {
    pub async fn new(name: &str) -> World {
        Self::with_env(TestEnv::new(name).await)
    }

    pub fn with_env(env: TestEnv) -> World {
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
    pub fn node(&self, short: &str) -> String {
        format!("{}-{short}", self.env.namespace)
    }

    /// Process logs live outside the scratch area and stay behind when a test fails.
    pub fn logs(&self) -> PathBuf {
        std::env::temp_dir()
            .join("tandem-test-logs")
            .join(&self.env.namespace)
    }

    /// Makes a loop-backed volume, publishes it as a local PV on `node` and a claim bound to it.
    pub async fn add_volume(
        &mut self,
        claim_name: &str,
        node: &str,
        fs: &str,
        labels: &[(&str, &str)],
    ) {
        let volume = self
            .scratch
            .volume(&self.pool.clone(), claim_name, fs, volume_size(fs));
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

    pub fn tandem(&self, args: &[&str]) -> Command {
        // Tests get the binary cargo built for them; the demo (an example) the debug build.
        let binary = option_env!("CARGO_BIN_EXE_tandem")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::support::repo_root().join("target/debug/tandem"));
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .env("KUBECONFIG", &self.env.plane.kubeconfig)
            .env("RUST_LOG", "info,tandem=debug,kube_runtime=debug");
        cmd
    }

    pub fn start_agent(&mut self, node: &str) {
        let node = self.node(node);
        let state = self.scratch.path(&format!("state-{node}"));
        // Each node links its restore clones in a folder of its own (a node's /dev/tandem).
        let links = self.scratch.path(&format!("links-{node}"));
        let cmd = &mut self.tandem(&[
            "agent",
            "--node-name",
            &node,
            "--state-dir",
            &state.to_string_lossy(),
            "--restore-link-dir",
            &links.to_string_lossy(),
        ]);
        let daemon = Daemon::spawn(&format!("agent-{node}"), cmd, &self.logs());
        self.agents.insert(node, daemon);
    }

    pub fn agent(&mut self, node: &str) -> &mut Daemon {
        let node = self.node(node);
        self.agents.get_mut(&node).expect("agent")
    }

    pub fn start_controller(&mut self) {
        let cmd = &mut self.tandem(&["controller", "--namespace", &self.env.namespace.clone()]);
        self.controller = Some(Daemon::spawn("controller", cmd, &self.logs()));
    }

    /// Waits until a group's members are resolved and all can be snapshotted.
    pub async fn wait_group_ready(&self, name: &str) {
        let groups: Api<ConsistencyGroup> = self.env.api();
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

    pub async fn create_group(&self, name: &str, spec: serde_json::Value) {
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
        self.wait_group_ready(name).await;
    }

    pub async fn create_snapshot(&self, name: &str, group: &str, policy: &str) {
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

    pub async fn wait_phase(&self, name: &str, phase: GroupSnapshotPhase) -> GroupSnapshot {
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

    pub async fn node_snapshots(&self) -> Vec<NodeSnapshot> {
        let api: Api<NodeSnapshot> = self.env.api();
        api.list(&ListParams::default())
            .await
            .expect("list nsnap")
            .items
    }

    pub async fn wait_node_phase(&self, node: &str, phase: NodePhase) {
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

    /// Whether a write to the volume finishes within `wait` (a write to a frozen filesystem
    /// blocks in the kernel until the thaw). The probe runs on its own thread: if it blocks, it
    /// finishes whenever the filesystem is thawed.
    pub fn accepts_writes(&self, claim: &str, wait: Duration) -> bool {
        let probe = self.volumes[claim].mount.join("thaw-probe");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let written = std::fs::write(&probe, b"probe")
                .and_then(|_| std::fs::File::open(&probe)?.sync_all());
            let _ = tx.send(written.is_ok());
        });
        rx.recv_timeout(wait).unwrap_or(false)
    }

    /// Every volume accepts a write within 5 s: nothing is left frozen.
    pub fn assert_nothing_frozen(&self) {
        for claim in self.volumes.keys() {
            assert!(
                self.accepts_writes(claim, Duration::from_secs(5)),
                "volume {claim} is still frozen (a write did not finish in 5 s)"
            );
        }
    }

    /// Clone images (and half-made ones) the agents left in the pool.
    pub fn snapshot_files(&self) -> Vec<PathBuf> {
        let dir = self.pool.join(".tandem-snapshots");
        std::fs::read_dir(&dir)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }
}

/// Writes numbered lines to every volume in a fixed order, one round after another, until stopped.
/// In any crash-consistent cut the counts can only decrease along that order, by at most one.
pub fn ordered_writer(mounts: Vec<PathBuf>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
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

pub fn count_lines(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
}

/// 64 MiB, or what mkfs.btrfs needs at least (about 109 MiB).
fn volume_size(fs: &str) -> u64 {
    if fs == "btrfs" { 128 << 20 } else { 64 << 20 }
}

pub fn require_root() -> bool {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: this test needs root (loop devices, mounts, FIFREEZE)");
        return false;
    }
    true
}

pub fn clone_path(handle: &str) -> PathBuf {
    PathBuf::from(handle.strip_prefix("reflink:").expect("a reflink handle"))
}

impl World {
    /// Creates a ResourceQuota and waits until kube-controller-manager has counted every resource
    /// it names (admission refuses or lets through wrongly until then). The quota monitor of a
    /// custom resource starts at its next discovery sync (every 30 s).
    pub async fn create_quota(&self, name: &str, hard: serde_json::Value) {
        use k8s_openapi::api::core::v1::ResourceQuota;
        let quotas: Api<ResourceQuota> = self.env.api();
        let keys: Vec<String> = hard.as_object().expect("hard").keys().cloned().collect();
        quotas
            .create(
                &PostParams::default(),
                &serde_json::from_value(
                    json!({"metadata": {"name": name}, "spec": {"hard": hard}}),
                )
                .expect("quota"),
            )
            .await
            .expect("create quota");
        eventually(Duration::from_secs(120), "quota status", || {
            let quotas = quotas.clone();
            let keys = keys.clone();
            async move {
                let used = quotas.get(name).await.ok()?.status?.used?;
                keys.iter().all(|k| used.contains_key(k)).then_some(())
            }
        })
        .await;
    }

    /// Deletes a GroupSnapshot and waits until it is gone.
    pub async fn delete_snapshot(&self, name: &str) {
        let snapshots: Api<GroupSnapshot> = self.env.api();
        snapshots
            .delete(name, &Default::default())
            .await
            .expect("delete snapshot");
        eventually(WAIT, &format!("GroupSnapshot {name} gone"), || {
            let snapshots = snapshots.clone();
            async move { snapshots.get_opt(name).await.ok()?.is_none().then_some(()) }
        })
        .await;
    }

    /// The clone file of a member of a Ready snapshot.
    pub fn member_clone(snapshot: &GroupSnapshot, claim: &str) -> PathBuf {
        let member = snapshot
            .status
            .as_ref()
            .expect("status")
            .members
            .iter()
            .find(|m| m.claim == claim)
            .expect("member");
        clone_path(member.snapshot_handle.as_deref().expect("handle"))
    }
}

/// Restores (GroupRestore): the restore StorageClass, creating and waiting for restores, and what
/// a restore made.
impl World {
    /// Starts the controller with extra flags (for example `--restore-storage-class`).
    pub fn start_controller_with(&mut self, extra: &[&str]) {
        let namespace = self.env.namespace.clone();
        let mut args = vec!["controller", "--namespace", namespace.as_str()];
        args.extend_from_slice(extra);
        let cmd = &mut self.tandem(&args);
        self.controller = Some(Daemon::spawn("controller", cmd, &self.logs()));
    }

    /// Creates a StorageClass (cluster-wide, shared by the tests of this binary; an existing one
    /// is left as it is).
    pub async fn ensure_storage_class(&self, name: &str, provisioner: &str) {
        use k8s_openapi::api::storage::v1::StorageClass;
        let classes: Api<StorageClass> = Api::all(self.env.client.clone());
        let class: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": name},
            "provisioner": provisioner,
            "volumeBindingMode": "Immediate",
            "reclaimPolicy": "Delete",
        }))
        .expect("class");
        match classes.create(&PostParams::default(), &class).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => panic!("create StorageClass {name}: {e}"),
        }
    }

    /// The chart's restore class: `tandem-restore`, provisioner `tandem.dev/restore`.
    pub async fn ensure_restore_class(&self) {
        self.ensure_storage_class(
            tandem::api::DEFAULT_RESTORE_STORAGE_CLASS,
            tandem::api::RESTORE_PROVISIONER,
        )
        .await;
    }

    pub async fn create_restore(&self, name: &str, spec: serde_json::Value) {
        use tandem::api::GroupRestore;
        let restores: Api<GroupRestore> = self.env.api();
        restores
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))
                    .expect("restore"),
            )
            .await
            .expect("create restore");
    }

    /// Waits for a restore's phase; panics if it ends in the other terminal phase.
    pub async fn wait_restore_phase(
        &self,
        name: &str,
        phase: tandem::api::RestorePhase,
    ) -> tandem::api::GroupRestore {
        self.wait_restore_phase_for(name, phase, WAIT).await
    }

    pub async fn wait_restore_phase_for(
        &self,
        name: &str,
        phase: tandem::api::RestorePhase,
        timeout: Duration,
    ) -> tandem::api::GroupRestore {
        use tandem::api::{GroupRestore, RestorePhase};
        let restores: Api<GroupRestore> = self.env.api();
        eventually(timeout, &format!("GroupRestore {name} {phase:?}"), || {
            let restores = restores.clone();
            async move {
                let r = restores.get(name).await.ok()?;
                let got = r.status.as_ref()?.phase;
                if got != phase && matches!(got, RestorePhase::Completed | RestorePhase::Failed) {
                    panic!(
                        "GroupRestore {name} ended {got:?} instead of {phase:?}: {:?}",
                        r.status
                    );
                }
                (got == phase).then_some(r)
            }
        })
        .await
    }

    /// What carries the label `tandem.dev/group-restore=<restore>`: claims, PVs, NodeRestores.
    pub async fn restore_objects(&self, restore: &str) -> (Vec<String>, Vec<String>, Vec<String>) {
        use kube::ResourceExt;
        use tandem::api::NodeRestore;
        let selector = format!("{}={restore}", tandem::api::GROUP_RESTORE_LABEL);
        let params = ListParams::default().labels(&selector);
        let claims: Api<PersistentVolumeClaim> = self.env.api();
        let volumes: Api<PersistentVolume> = Api::all(self.env.client.clone());
        let nodes: Api<NodeRestore> = self.env.api();
        let names = |items: Vec<String>| items;
        let pvs: Vec<String> = volumes
            .list(&params)
            .await
            .expect("list PVs")
            .items
            .into_iter()
            .filter(|v| {
                v.spec
                    .as_ref()
                    .and_then(|s| s.claim_ref.as_ref())
                    .and_then(|r| r.namespace.as_deref())
                    == Some(self.env.namespace.as_str())
            })
            .map(|v| v.name_any())
            .collect();
        (
            names(
                claims
                    .list(&params)
                    .await
                    .expect("list claims")
                    .items
                    .iter()
                    .map(|c| c.name_any())
                    .collect(),
            ),
            pvs,
            names(
                nodes
                    .list(&params)
                    .await
                    .expect("list nrestore")
                    .items
                    .iter()
                    .map(|n| n.name_any())
                    .collect(),
            ),
        )
    }

    /// The folder where `node`'s agent links its restore clones.
    pub fn link_dir(&self, node: &str) -> PathBuf {
        self.scratch.path(&format!("links-{}", self.node(node)))
    }

    /// Restore clone images (and half-made ones) the agents left in the pool.
    pub fn restore_files(&self) -> Vec<PathBuf> {
        let dir = self.pool.join(".tandem-restores");
        std::fs::read_dir(&dir)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.path())).collect())
            .unwrap_or_default()
    }

    /// A claim of this namespace, if it exists.
    pub async fn claim(&self, name: &str) -> Option<PersistentVolumeClaim> {
        let claims: Api<PersistentVolumeClaim> = self.env.api();
        claims.get_opt(name).await.expect("get claim")
    }
}

/// The reason of a condition of a restore.
pub fn condition_reason(restore: &tandem::api::GroupRestore, type_: &str) -> Option<String> {
    restore
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

/// Benchmarks: many volumes and namespaces, objects without devices, a controller of every
/// namespace.
impl World {
    /// A world whose reflink pool has `pool_size` bytes (sparse), for many volumes.
    pub async fn with_pool_size(name: &str, pool_size: u64) -> World {
        let env = TestEnv::new(name).await;
        let mut scratch = Scratch::new();
        let pool = scratch.pool_sized("xfs", pool_size);
        World {
            agents: BTreeMap::new(),
            controller: None,
            volumes: BTreeMap::new(),
            pool,
            scratch,
            env,
        }
    }

    /// Publishes a local PV at `path` on `node` (a short node name) and a claim of `namespace`
    /// bound to it; nothing is made on the machine (the path need not exist).
    pub async fn publish_volume(
        &self,
        namespace: &str,
        claim_name: &str,
        node: &str,
        path: &str,
        labels: &[(&str, &str)],
    ) {
        let node = self.node(node);
        let pv = format!("{namespace}-{claim_name}");
        let volumes: Api<PersistentVolume> = Api::all(self.env.client.clone());
        volumes
            .create(
                &PostParams::default(),
                &local_volume(&pv, path, &node, namespace, claim_name, &[]),
            )
            .await
            .expect("create PV");
        let claims: Api<PersistentVolumeClaim> =
            Api::namespaced(self.env.client.clone(), namespace);
        claims
            .create(
                &PostParams::default(),
                &claim(claim_name, Some(&pv), labels),
            )
            .await
            .expect("create PVC");
    }

    /// Like [`World::add_volume`] with a size and a namespace of the claim's own; says what failed
    /// (no free loop device, say) instead of panicking. The claim name is the volume's key.
    pub async fn try_add_volume_in(
        &mut self,
        namespace: &str,
        claim_name: &str,
        node: &str,
        size: u64,
        labels: &[(&str, &str)],
    ) -> Result<(), String> {
        let volume = self
            .scratch
            .try_volume(&self.pool.clone(), claim_name, "ext4", size)?;
        self.scratch.assert_owned(&volume.mount);
        self.publish_volume(
            namespace,
            claim_name,
            node,
            &volume.mount.to_string_lossy(),
            labels,
        )
        .await;
        self.volumes.insert(claim_name.into(), volume);
        Ok(())
    }

    /// Starts a controller of every namespace (no `--namespace`), with extra flags.
    pub fn start_controller_all_namespaces(&mut self, extra: &[&str]) {
        let mut args = vec!["controller"];
        args.extend_from_slice(extra);
        let cmd = &mut self.tandem(&args);
        self.controller = Some(Daemon::spawn("controller", cmd, &self.logs()));
    }

    /// Creates a ConsistencyGroup in `namespace` (no wait).
    pub async fn create_group_in(&self, namespace: &str, name: &str, spec: serde_json::Value) {
        let groups: Api<ConsistencyGroup> = Api::namespaced(self.env.client.clone(), namespace);
        groups
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))
                    .expect("group"),
            )
            .await
            .expect("create group");
    }

    /// Waits until a group of `namespace` is Ready with `members` members.
    pub async fn wait_group_members_in(
        &self,
        namespace: &str,
        name: &str,
        members: usize,
        timeout: Duration,
    ) {
        let groups: Api<ConsistencyGroup> = Api::namespaced(self.env.client.clone(), namespace);
        eventually(timeout, &format!("group {namespace}/{name} Ready"), || {
            let groups = groups.clone();
            async move {
                let g = groups.get(name).await.ok()?;
                let status = g.status?;
                let ready = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True");
                (status.observed_generation == g.metadata.generation
                    && ready
                    && status.members.len() == members)
                    .then_some(())
            }
        })
        .await;
    }

    /// Creates a GroupSnapshot in `namespace` (no wait).
    pub async fn create_snapshot_in(&self, namespace: &str, name: &str, group: &str) {
        let snapshots: Api<GroupSnapshot> = Api::namespaced(self.env.client.clone(), namespace);
        snapshots
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name},
                    "spec": {"groupName": group, "deletionPolicy": "Delete"}}))
                .expect("snapshot"),
            )
            .await
            .expect("create snapshot");
    }
}

/// Benchmarks: what a process costs, and what the metrics endpoints say.
pub mod measure {
    use std::io::{Read, Write};
    use std::time::Duration;

    /// Resident memory of a process, in KiB (0 if it is gone).
    pub fn rss_kib(pid: u32) -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// User plus system CPU time of a process, in clock ticks (1/100 s).
    pub fn cpu_ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime is 14th, stime 15th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        field(11) + field(12)
    }

    /// A plain HTTP GET on loopback (the controller's /metrics); the body, or None.
    pub fn http_get(addr: &str, path: &str) -> Option<String> {
        let mut s = std::net::TcpStream::connect(addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut text = String::new();
        s.read_to_string(&mut text).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_string())
    }

    /// The sum of every sample of the Prometheus metric `name` whose labels contain all of
    /// `labels` (`key="value"` each) and none of `without`; None if no sample matched.
    pub fn metric_sum(text: &str, name: &str, labels: &[&str], without: &[&str]) -> Option<f64> {
        let mut sum = None;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (set, value) = match rest.strip_prefix('{') {
                Some(r) => match r.rsplit_once("} ") {
                    Some((set, value)) => (set, value),
                    None => continue,
                },
                None if rest.starts_with(' ') => ("", rest),
                None => continue,
            };
            if !labels.iter().all(|l| set.contains(l)) || without.iter().any(|l| set.contains(l)) {
                continue;
            }
            if let Ok(v) = value.trim().parse::<f64>() {
                *sum.get_or_insert(0.0) += v;
            }
        }
        sum
    }

    /// The median of some numbers (0 for none).
    pub fn median(mut v: Vec<f64>) -> f64 {
        if v.is_empty() {
            return 0.0;
        }
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    }
}

/// Trace: the timestamps of a process log (tracing-subscriber's default format, microseconds).
pub mod trace {
    use std::path::Path;

    /// One log line: when (µs since the epoch) and the whole text.
    pub struct Line {
        pub micros: i64,
        pub text: String,
    }

    pub fn read(path: &Path) -> Vec<Line> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (stamp, _) = l.split_once(' ')?;
                let t: jiff::Timestamp = stamp.parse().ok()?;
                Some(Line {
                    micros: t.as_microsecond(),
                    text: l.to_string(),
                })
            })
            .collect()
    }

    /// The first line that contains every one of `needles`.
    pub fn first(lines: &[Line], needles: &[&str]) -> Option<i64> {
        lines
            .iter()
            .find(|l| needles.iter().all(|n| l.text.contains(n)))
            .map(|l| l.micros)
    }
}
