//! GroupRestore end to end, measured: the time from applying a GroupRestore (mode NewClaims) to
//! every restored claim Bound, for groups of 2, 8 and 32 members over 1 and 3 nodes (real control
//! plane, real controller and agent processes, ext4 volumes on loop devices over one reflink XFS
//! pool, so every member is a reflink clone), and next to it the clone time of each node as its
//! NodeRestore shows it (seen by a watch: from the NodeRestore's creation to its phase Cloned),
//! the controller's share before the nodes start (apply to the last NodeRestore created) and after
//! they finish (last Cloned to the last PV created, then to every claim Bound by the PV
//! controller).
//!
//! Run as root: `cargo bench --bench group_restore` (ROUNDS=N rounds per size, default 3;
//! NODES=1,3 and VOLUMES=2,8,32 pick the sizes). Prints numbers; asserts no timing.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/world/mod.rs"]
mod world;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use support::eventually;
use tandem::api::{
    DEFAULT_RESTORE_STORAGE_CLASS, GROUP_RESTORE_LABEL, GroupRestore, GroupSnapshotPhase,
    NodeRestore, NodeRestorePhase, RESTORE_PROVISIONER, RestorePhase,
};
use world::World;

const WAIT: Duration = Duration::from_secs(300);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The restore StorageClass, as the chart installs it (the World has no chart).
async fn ensure_restore_class(w: &World) {
    let classes: Api<StorageClass> = Api::all(w.env.client.clone());
    let class: StorageClass = serde_json::from_value(json!({
        "metadata": {"name": DEFAULT_RESTORE_STORAGE_CLASS},
        "provisioner": RESTORE_PROVISIONER,
        "volumeBindingMode": "Immediate",
        "reclaimPolicy": "Delete"
    }))
    .expect("class");
    match classes.create(&PostParams::default(), &class).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create StorageClass: {e}"),
    }
}

/// When each thing was first seen, by one watch per kind started before the apply.
#[derive(Default)]
struct Seen {
    /// NodeRestore name -> (node, first seen, first seen Cloned).
    nodes: BTreeMap<String, (String, Instant, Option<Instant>)>,
    /// Restored claim name -> first seen Bound.
    bound: BTreeMap<String, Instant>,
    /// Restored PV name -> first seen.
    volumes: BTreeMap<String, Instant>,
}

fn watch_restore(w: &World, restore: &str) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let label = format!("{GROUP_RESTORE_LABEL}={restore}");
    let node_restores: Api<NodeRestore> = w.env.api();
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let nodes = watcher(node_restores, watcher::Config::default().labels(&label));
    let claims = watcher(claims, watcher::Config::default().labels(&label));
    let pvs: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let pvs = watcher(pvs, watcher::Config::default().labels(&label));
    let (s1, s2, s3) = (seen.clone(), seen.clone(), seen.clone());
    let task = tokio::spawn(async move {
        let nodes = nodes.for_each(move |event| {
            let seen = s1.clone();
            async move {
                let now = Instant::now();
                if let Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) = event {
                    let mut seen = seen.lock().expect("lock");
                    let entry = seen
                        .nodes
                        .entry(n.name_any())
                        .or_insert_with(|| (n.spec.node_name.clone(), now, None));
                    let cloned = n
                        .status
                        .as_ref()
                        .is_some_and(|s| s.phase == NodeRestorePhase::Cloned);
                    if cloned && entry.2.is_none() {
                        entry.2 = Some(now);
                    }
                }
            }
        });
        let claims = claims.for_each(move |event| {
            let seen = s2.clone();
            async move {
                let now = Instant::now();
                if let Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) = event {
                    let bound = c
                        .status
                        .as_ref()
                        .and_then(|s| s.phase.as_deref())
                        .is_some_and(|p| p == "Bound");
                    if bound {
                        seen.lock()
                            .expect("lock")
                            .bound
                            .entry(c.name_any())
                            .or_insert(now);
                    }
                }
            }
        });
        let pvs = pvs.for_each(move |event| {
            let seen = s3.clone();
            async move {
                let now = Instant::now();
                if let Ok(watcher::Event::Apply(v) | watcher::Event::InitApply(v)) = event {
                    seen.lock()
                        .expect("lock")
                        .volumes
                        .entry(v.name_any())
                        .or_insert(now);
                }
            }
        });
        futures::join!(nodes, claims, pvs);
    });
    (seen, task)
}

struct Round {
    to_bound: Duration,
    /// Apply to the last NodeRestore seen (the controller's validation and planning).
    to_nodes: Duration,
    /// Per node: NodeRestore seen to Cloned.
    clone_per_node: Vec<Duration>,
    /// Last node Cloned to the last PV created (the controller makes the PVs).
    to_volumes: Duration,
    /// Last PV created to every claim Bound (the PV controller binds).
    to_bind: Duration,
}

async fn one_round(w: &World, members: usize, round: usize) -> Round {
    let name = format!("r{round}");
    let (seen, task) = watch_restore(w, &name);
    // The watches list first: give them that moment before the clock starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let restores: Api<GroupRestore> = w.env.api();
    let applied = Instant::now();
    restores
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
                "source": {"groupSnapshotName": "bench"},
                "mode": "NewClaims"
            }}))
            .expect("restore"),
        )
        .await
        .expect("create GroupRestore");
    let bound_at = eventually(WAIT, &format!("{members} claims of {name} Bound"), || {
        let seen = seen.clone();
        let restores = restores.clone();
        let name = name.clone();
        async move {
            let all = {
                let seen = seen.lock().expect("lock");
                (seen.bound.len() == members).then(|| seen.bound.values().max().copied())
            };
            if all.is_none()
                && let Ok(r) = restores.get(&name).await
                && r.status.as_ref().map(|s| s.phase) == Some(RestorePhase::Failed)
            {
                panic!("GroupRestore {name} Failed: {:?}", r.status);
            }
            all.flatten()
        }
    })
    .await;
    task.abort();
    let seen = seen.lock().expect("lock");
    let last_node = seen
        .nodes
        .values()
        .map(|(_, at, _)| *at)
        .max()
        .unwrap_or(applied);
    let clone_per_node: Vec<Duration> = seen
        .nodes
        .values()
        .map(|(_, at, cloned)| cloned.map(|c| c - *at).unwrap_or_default())
        .collect();
    let last_cloned = seen
        .nodes
        .values()
        .filter_map(|(_, _, c)| *c)
        .max()
        .unwrap_or(bound_at);
    let last_volume = seen.volumes.values().max().copied().unwrap_or(last_cloned);
    Round {
        to_bound: bound_at - applied,
        to_nodes: last_node.saturating_duration_since(applied),
        clone_per_node,
        to_volumes: last_volume.saturating_duration_since(last_cloned),
        to_bind: bound_at.saturating_duration_since(last_volume),
    }
}

/// Deletes the restored claims (tandem, the external deleter, deletes their clones and PVs) and
/// the GroupRestore, and waits until every PV and NodeRestore of it is gone.
async fn clean_round(w: &World, round: usize) {
    let name = format!("r{round}");
    let label = format!("{GROUP_RESTORE_LABEL}={name}");
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    claims
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&label),
        )
        .await
        .expect("delete restored claims");
    let restores: Api<GroupRestore> = w.env.api();
    restores
        .delete(&name, &DeleteParams::default())
        .await
        .expect("delete GroupRestore");
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let node_restores: Api<NodeRestore> = w.env.api();
    eventually(WAIT, &format!("the clones of {name} deleted"), || {
        let (volumes, node_restores, label) =
            (volumes.clone(), node_restores.clone(), label.clone());
        async move {
            let pvs = volumes
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?;
            let nrs = node_restores
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?;
            (pvs.items.is_empty() && nrs.items.is_empty()).then_some(())
        }
    })
    .await;
}

async fn one_size(nodes: usize, volumes: usize, rounds: usize) {
    let mut w = World::new(&format!("rbench-{nodes}n{volumes}v")).await;
    ensure_restore_class(&w).await;
    for i in 0..volumes {
        w.add_volume(
            &format!("v{i}"),
            &format!("n{}", i % nodes),
            "ext4",
            &[("app", "bench")],
        )
        .await;
    }
    for n in 0..nodes {
        w.start_agent(&format!("n{n}"));
    }
    w.start_controller();
    w.create_group(
        "bench",
        json!({"selector": {"matchLabels": {"app": "bench"}}, "freezeTimeoutSeconds": 60}),
    )
    .await;
    for (i, v) in w.volumes.values().enumerate() {
        agent_support::write_file(&v.mount.join("data.bin"), 4 << 20, i as u64, false);
    }
    w.create_snapshot("bench", "bench", "Delete").await;
    w.wait_phase("bench", GroupSnapshotPhase::Ready).await;

    let (mut to_bound, mut to_nodes, mut clone, mut to_volumes, mut to_bind) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let r = one_round(&w, volumes, round).await;
        to_bound.push(r.to_bound);
        to_nodes.push(r.to_nodes);
        clone.extend(r.clone_per_node);
        to_volumes.push(r.to_volumes);
        to_bind.push(r.to_bind);
        clean_round(&w, round).await;
    }
    let (b_min, b_med, b_max) = agent_support::stats(to_bound);
    let (c_min, c_med, c_max) = agent_support::stats(clone);
    let (_, n_med, _) = agent_support::stats(to_nodes);
    let (_, v_med, _) = agent_support::stats(to_volumes);
    let (_, p_med, _) = agent_support::stats(to_bind);
    println!(
        "{nodes:>5} | {volumes:>7} | {b_min:>7.0} / {b_med:>7.0} / {b_max:>7.0} | {c_min:>7.0} / {c_med:>7.0} / {c_max:>7.0} | {n_med:>14.0} | {v_med:>17.0} | {p_med:>14.0}"
    );
    w.delete_snapshot("bench").await;
}

#[tokio::main]
async fn main() {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: the group restore benchmark needs root (loop devices, FIFREEZE)");
        return;
    }
    let rounds = env_usize("ROUNDS", 3).max(1);
    println!(
        "group restore (NewClaims): ext4 volumes on loop devices over one reflink XFS pool (method Clone), 4 MiB written per volume, {rounds} rounds per size"
    );
    println!(
        "nodes | members | apply->all Bound min/med/max ms | clone per node min/med/max ms | ->nodes med ms | cloned->PVs med ms | PVs->Bound med ms"
    );
    let list = |name: &str, default: &str| -> Vec<usize> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    };
    for nodes in list("NODES", "1,3") {
        for volumes in list("VOLUMES", "2,8,32") {
            one_size(nodes, volumes, rounds).await;
        }
    }
}
