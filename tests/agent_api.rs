//! The agent's watch loop against a real API server (etcd + kube-apiserver + kube-controller-manager
//! from tests/support), driving real freezes of loop-backed filesystems this test makes: the field
//! selector (another node's NodeSnapshot is left alone), Cut / Release / Abort, the watchdog, status
//! written by the agent, tenancy checks, and finalizer-driven deletion of the snapshots.
//! Needs root (skips with a message otherwise).

mod agent_support;
mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agent_support::{Scratch, Volume};
use k8s_openapi::api::core::v1::PersistentVolume;
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use support::{TestEnv, eventually, objects};
use tandem::agent::freeze;
use tandem::api::{NodePhase, NodeSnapshot};

/// The agent binary as a child process; killed when dropped.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_agent(env: &TestEnv, node: &str, state: &Path, log: &Path) -> Agent {
    let log = std::fs::File::create(log).expect("agent log");
    let child = Command::new(env!("CARGO_BIN_EXE_tandem"))
        .args(["agent", "--node-name", node, "--state-dir"])
        .arg(state)
        .env("KUBECONFIG", &env.plane.kubeconfig)
        .env("RUST_LOG", "info,tandem=debug")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start tandem agent");
    Agent(child)
}

fn is_frozen(mount: &Path) -> bool {
    let fd = freeze::open_dir(mount).expect("open");
    match freeze::freeze(&fd, mount) {
        Err(freeze::FreezeError::AlreadyFrozen { .. }) => true,
        Ok(()) => {
            freeze::thaw(&fd, mount).expect("thaw the probe");
            false
        }
        Err(e) => panic!("probe: {e}"),
    }
}

fn node_snapshot(
    name: &str,
    node: &str,
    timeout: i32,
    release_after_cut: bool,
    volumes: &[(&str, &str)],
) -> NodeSnapshot {
    let volumes: Vec<serde_json::Value> = volumes
        .iter()
        .map(|(claim, pv)| serde_json::json!({"claim": claim, "persistentVolume": pv}))
        .collect();
    serde_json::from_value(serde_json::json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "NodeSnapshot",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
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

async fn publish_volume(env: &TestEnv, pv: &str, v: &Volume, node: &str, claim: &str) {
    let api: Api<PersistentVolume> = Api::all(env.client.clone());
    let obj = objects::local_volume(
        pv,
        &v.mount.to_string_lossy(),
        node,
        &env.namespace,
        claim,
        &[],
    );
    api.create(&PostParams::default(), &obj)
        .await
        .expect("create PV");
}

async fn wait_phase(api: &Api<NodeSnapshot>, name: &str, phase: NodePhase) -> NodeSnapshot {
    eventually(
        Duration::from_secs(60),
        &format!("{name} to be {phase:?}"),
        || async {
            let o = api.get(name).await.ok()?;
            (o.status.as_ref()?.phase == phase).then_some(o)
        },
    )
    .await
}

async fn set_action(api: &Api<NodeSnapshot>, name: &str, action: &str) {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(&serde_json::json!({"spec": {"action": action}})),
    )
    .await
    .expect("patch action");
}

fn clone_of(o: &NodeSnapshot, i: usize) -> PathBuf {
    let h = o.status.as_ref().unwrap().volumes[i]
        .snapshot_handle
        .clone()
        .expect("handle");
    PathBuf::from(h.strip_prefix("reflink:").expect("reflink handle"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_acts_on_its_node_only_and_drives_cut_release_abort_watchdog_and_deletion() {
    require_root!();
    let mut s = Scratch::new();
    let pool = s.pool("xfs");
    let v1 = s.volume(&pool, "api1", "xfs", 320 << 20);
    let v2 = s.volume(&pool, "api2", "ext4", 128 << 20);
    s.assert_owned(&v1.mount);
    s.assert_owned(&v2.mount);
    let env = TestEnv::new("agent-api").await;
    let ns = env.namespace.clone();
    let pv1 = format!("{ns}-pv1");
    let pv2 = format!("{ns}-pv2");
    publish_volume(&env, &pv1, &v1, "node-a", "data").await;
    publish_volume(&env, &pv2, &v2, "node-a", "wal").await;
    let agent_log = s.path("agent.log");
    let _agent = start_agent(&env, "node-a", &s.path("state"), &agent_log);
    let api: Api<NodeSnapshot> = env.api();
    let members = [("data", pv1.as_str()), ("wal", pv2.as_str())];

    // Another node's NodeSnapshot: this agent must never act on it.
    api.create(
        &PostParams::default(),
        &node_snapshot("other-node", "node-b", 30, false, &members),
    )
    .await
    .unwrap();

    // Cut and hold.
    api.create(
        &PostParams::default(),
        &node_snapshot("held", "node-a", 60, false, &members),
    )
    .await
    .unwrap();
    let cut = wait_phase(&api, "held", NodePhase::Cut).await;
    let st = cut.status.clone().unwrap();
    assert!(
        cut.metadata
            .finalizers
            .as_ref()
            .is_some_and(|f| f.iter().any(|f| f == "tandem.dev/agent"))
    );
    assert_eq!(st.volumes.len(), 2);
    assert!(
        st.volumes
            .iter()
            .all(|v| v.frozen && v.backend.as_deref() == Some("reflink"))
    );
    assert!(st.freeze_start.is_some());
    assert!(is_frozen(&v1.mount) && is_frozen(&v2.mount), "held frozen");
    let (c1, c2) = (clone_of(&cut, 0), clone_of(&cut, 1));
    assert!(c1.exists() && c2.exists());

    // Release: thawed, snapshots kept, window reported.
    set_action(&api, "held", "Release").await;
    let rel = wait_phase(&api, "held", NodePhase::Released).await;
    assert!(rel.status.as_ref().unwrap().freeze_window_millis.is_some());
    assert!(!is_frozen(&v1.mount) && !is_frozen(&v2.mount));
    assert!(c1.exists() && c2.exists());

    // Deleting the NodeSnapshot deletes its snapshots, then the finalizer lets it go.
    api.delete("held", &DeleteParams::default()).await.unwrap();
    eventually(
        Duration::from_secs(60),
        "held NodeSnapshot gone",
        || async { api.get_opt("held").await.ok()?.is_none().then_some(()) },
    )
    .await;
    assert!(
        !c1.exists() && !c2.exists(),
        "snapshots deleted with the NodeSnapshot"
    );

    // Abort after a cut: thawed, snapshots deleted.
    api.create(
        &PostParams::default(),
        &node_snapshot("aborted", "node-a", 60, false, &members),
    )
    .await
    .unwrap();
    let cut = wait_phase(&api, "aborted", NodePhase::Cut).await;
    let c = clone_of(&cut, 0);
    set_action(&api, "aborted", "Abort").await;
    wait_phase(&api, "aborted", NodePhase::Aborted).await;
    assert!(!c.exists());
    assert!(!is_frozen(&v1.mount));

    // Nobody releases: the agent's watchdog thaws and reports Aborted.
    api.create(
        &PostParams::default(),
        &node_snapshot("timed-out", "node-a", 2, false, &members),
    )
    .await
    .unwrap();
    let cut = wait_phase(&api, "timed-out", NodePhase::Cut).await;
    let c = clone_of(&cut, 0);
    let ab = wait_phase(&api, "timed-out", NodePhase::Aborted).await;
    assert!(
        ab.status
            .unwrap()
            .message
            .unwrap_or_default()
            .contains("watchdog"),
        "reported as the watchdog's doing"
    );
    assert!(!c.exists());
    assert!(!is_frozen(&v1.mount) && !is_frozen(&v2.mount));

    // Single-node group: released right after the cut.
    api.create(
        &PostParams::default(),
        &node_snapshot("single", "node-a", 30, true, &members),
    )
    .await
    .unwrap();
    wait_phase(&api, "single", NodePhase::Released).await;
    assert!(!is_frozen(&v1.mount));

    // Tenancy: a claim name that is not the PV's claim fails before anything is frozen.
    api.create(
        &PostParams::default(),
        &node_snapshot(
            "wrong-claim",
            "node-a",
            30,
            true,
            &[("someone-else", pv1.as_str())],
        ),
    )
    .await
    .unwrap();
    let failed = wait_phase(&api, "wrong-claim", NodePhase::Failed).await;
    let msg = failed.status.unwrap().message.unwrap_or_default();
    assert!(msg.contains("not to"), "{msg}");

    // The other node's object was never touched.
    let other = api.get("other-node").await.unwrap();
    assert!(
        other.status.is_none(),
        "agent of node-a wrote status on node-b's object"
    );
    assert!(other.metadata.finalizers.unwrap_or_default().is_empty());

    // Clean up the objects that hold snapshots (the agent deletes them) before the volumes go.
    for name in ["single", "aborted", "timed-out", "wrong-claim"] {
        let _ = api.delete(name, &DeleteParams::default()).await;
    }
    eventually(
        Duration::from_secs(60),
        "agent-finalized objects gone",
        || async {
            let list = api.list(&Default::default()).await.ok()?;
            list.items
                .iter()
                .all(|o| o.metadata.name.as_deref() == Some("other-node"))
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        std::fs::read_dir(pool.join(".tandem-snapshots"))
            .map(|d| d.count())
            .unwrap_or(0),
        0,
        "no snapshot leaked"
    );
    for pv in [&pv1, &pv2] {
        let _ = Api::<PersistentVolume>::all(env.client.clone())
            .delete(pv, &DeleteParams::default())
            .await;
    }
    if std::env::var("TANDEM_SHOW_AGENT_LOG").is_ok() {
        eprintln!(
            "{}",
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        );
    }
}
