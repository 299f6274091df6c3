//! GroupRestore end to end, measured: the time from applying a NewClaims GroupRestore to every
//! claim Bound (Completed), for groups of 2, 8 and 32 reflink members (ext4 images on an XFS pool)
//! over 1 and 3 nodes, with the real control plane (the PV controller binds the pre-bound PVs),
//! the real controller and real agents; split into apply → every clone made (Binding) and the
//! binding after it. Each round's restored claims are deleted again (their clones go with them).
//!
//! Run as root: `cargo bench --bench group_restore` (ROUNDS=N, default 3; NODES=1,3 and
//! VOLUMES=2,8,32 pick the sizes). Prints numbers; asserts no timing.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/world/mod.rs"]
mod world;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::ListParams;
use serde_json::json;
use support::eventually;
use tandem::api::{GroupRestore, GroupSnapshotPhase, NodeRestore, RestorePhase};
use world::World;

fn stats(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(ms).sum::<f64>() / v.len().max(1) as f64;
    format!(
        "min {:7.1} ms  mean {:7.1} ms  max {:7.1} ms",
        v.first().map(ms).unwrap_or(0.0),
        mean,
        v.last().map(ms).unwrap_or(0.0)
    )
}

async fn one_size(nodes: usize, volumes: usize, rounds: usize) {
    let mut w = World::new(&format!("rbench-{nodes}n{volumes}v")).await;
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
    w.ensure_restore_class().await;
    w.start_controller();
    w.create_group(
        "bench",
        json!({"selector": {"matchLabels": {"app": "bench"}}, "freezeTimeoutSeconds": 60}),
    )
    .await;
    w.create_snapshot("snap", "bench", "Delete").await;
    w.wait_phase("snap", GroupSnapshotPhase::Ready).await;
    let restores: Api<GroupRestore> = w.env.api();
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let volumes_api: Api<PersistentVolume> = Api::all(w.env.client.clone());
    let nodes_api: Api<NodeRestore> = w.env.api();
    let (mut total, mut cloned, mut bound) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let name = format!("r{round}");
        let start = Instant::now();
        w.create_restore(&name, json!({"source": {"groupSnapshotName": "snap"}}))
            .await;
        // Polled every 10 ms: the split is as fine as that.
        let mut binding_at = None;
        let done = loop {
            assert!(
                start.elapsed() < Duration::from_secs(300),
                "restore {name} not Completed"
            );
            let phase = restores
                .get(&name)
                .await
                .ok()
                .and_then(|r| r.status)
                .map(|s| s.phase);
            if matches!(phase, Some(RestorePhase::Binding | RestorePhase::Completed))
                && binding_at.is_none()
            {
                binding_at = Some(start.elapsed());
            }
            assert_ne!(phase, Some(RestorePhase::Failed), "restore {name} failed");
            if phase == Some(RestorePhase::Completed) {
                break start.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let at_binding = binding_at.unwrap_or(done);
        total.push(done);
        cloned.push(at_binding);
        bound.push(done.saturating_sub(at_binding));
        // Clean up: the claims go, tandem deletes their PVs and clones.
        let r = restores.get(&name).await.expect("restore");
        for m in &r.status.expect("status").members {
            let _ = claims.delete(&m.claim, &Default::default()).await;
        }
        eventually(
            Duration::from_secs(120),
            "PVs and NodeRestores gone",
            || async {
                let pvs = volumes_api
                    .list(
                        &ListParams::default().labels(&format!("tandem.dev/group-restore={name}")),
                    )
                    .await
                    .ok()?
                    .items;
                let nrs = nodes_api.list(&ListParams::default()).await.ok()?.items;
                (pvs.is_empty() && nrs.is_empty()).then_some(())
            },
        )
        .await;
    }
    println!(
        "{nodes} node(s), {volumes:2} members: apply→Completed {}\n                        apply→every clone made {}\n                        binding after {}",
        stats(total),
        stats(cloned),
        stats(bound)
    );
}

fn list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

#[tokio::main]
async fn main() {
    if !world::require_root() {
        return;
    }
    let rounds = list("ROUNDS", "3").first().copied().unwrap_or(3);
    for nodes in list("NODES", "1,3") {
        for volumes in list("VOLUMES", "2,8,32") {
            one_size(nodes, volumes, rounds).await;
        }
    }
}
