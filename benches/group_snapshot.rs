//! GroupSnapshot end to end, measured: freeze window and time from apply to Ready for groups of
//! 2, 8 and 32 volumes over 1 and 3 nodes (real control plane, real controller and agent
//! processes, ext4 volumes on loop devices over a reflink XFS pool), next to the raw floor (syncfs,
//! parallel FIFREEZE, FICLONE and FITHAW done directly on the same volumes in the same run); then
//! the controller's memory and CPU with 1,000 idle groups.
//!
//! Run as root: `cargo bench --bench group_snapshot` (ROUNDS=N rounds per size, default 3;
//! NODES=1,3 and VOLUMES=2,8,32 pick the sizes; IDLE_GROUPS=1000, 0 to skip).
//! Prints numbers; asserts no timing.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/world/mod.rs"]
mod world;

use std::time::{Duration, Instant};

use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use support::eventually;
use tandem::api::{ConsistencyGroup, GroupSnapshot, GroupSnapshotPhase};
use world::World;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn one_size(nodes: usize, volumes: usize, rounds: usize) {
    let mut w = World::new(&format!("bench-{nodes}n{volumes}v")).await;
    let claims: Vec<String> = (0..volumes).map(|i| format!("v{i}")).collect();
    for (i, claim) in claims.iter().enumerate() {
        w.add_volume(
            claim,
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
    let snapshots: Api<GroupSnapshot> = w.env.api();
    let (mut windows, mut to_ready, mut floors) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for (i, v) in w.volumes.values().enumerate() {
            agent_support::write_file(
                &v.mount.join("dirty.bin"),
                1 << 20,
                (round * 100 + i) as u64,
                false,
            );
        }
        let name = format!("bench-{round}");
        let applied = Instant::now();
        w.create_snapshot(&name, "bench", "Delete").await;
        let done = w.wait_phase(&name, GroupSnapshotPhase::Ready).await;
        to_ready.push(applied.elapsed());
        let window = done
            .status
            .and_then(|s| s.freeze_window_millis)
            .unwrap_or_default();
        windows.push(Duration::from_millis(
            u64::try_from(window).unwrap_or_default(),
        ));
        snapshots
            .delete(&name, &DeleteParams::default())
            .await
            .expect("delete");
        eventually(Duration::from_secs(60), "snapshot deleted", || {
            let snapshots = snapshots.clone();
            let name = name.clone();
            async move { snapshots.get_opt(&name).await.ok()?.is_none().then_some(()) }
        })
        .await;

        for (i, v) in w.volumes.values().enumerate() {
            agent_support::write_file(
                &v.mount.join("dirty.bin"),
                1 << 20,
                (round * 100 + i + 50) as u64,
                false,
            );
        }
        let volumes: Vec<agent_support::Volume> = w.volumes.values().cloned().collect();
        let clones: Vec<std::path::PathBuf> = volumes
            .iter()
            .map(|v| v.image.with_extension("floor-clone"))
            .collect();
        floors.push(agent_support::floor_round(&volumes, &clones));
    }
    let (w_min, w_med, w_max) = agent_support::stats(windows);
    let (f_min, f_med, f_max) = agent_support::stats(floors);
    let (r_min, r_med, r_max) = agent_support::stats(to_ready);
    println!(
        "{nodes:>5} | {volumes:>7} | {w_min:>7.1} / {w_med:>7.1} / {w_max:>7.1} | {f_min:>7.1} / {f_med:>7.1} / {f_max:>7.1} | {r_min:>7.0} / {r_med:>7.0} / {r_max:>7.0}"
    );
}

async fn idle_controller(groups: usize) {
    let mut w = World::new("bench-idle").await;
    let api: Api<ConsistencyGroup> = w.env.api();
    let created = Instant::now();
    for i in 0..groups {
        api.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": format!("g{i}")},
                "spec": {"selector": {"matchLabels": {"group": format!("g{i}")}}}}))
            .expect("group"),
        )
        .await
        .expect("create group");
    }
    let creation = created.elapsed();
    w.start_controller();
    let started = Instant::now();
    eventually(Duration::from_secs(300), "every group reconciled", || {
        let api = api.clone();
        async move {
            let list = api.list(&Default::default()).await.ok()?;
            list.items.iter().all(|g| g.status.is_some()).then_some(())
        }
    })
    .await;
    let settle = started.elapsed();
    let pid = w
        .controller
        .as_ref()
        .and_then(|c| c.pid())
        .expect("controller pid");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let cpu_after = cpu_ticks(pid);
    let ticks = cpu_after.saturating_sub(cpu_before);
    println!(
        "controller with {groups} idle groups: RSS {} MiB; {ticks} CPU ticks (1/100 s) in 20 s idle; first reconcile of all in {:.1} s (creating them took {:.1} s)",
        rss_kib(pid) / 1024,
        settle.as_secs_f64(),
        creation.as_secs_f64()
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is 14th, stime 15th overall.
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

#[tokio::main]
async fn main() {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: the group snapshot benchmark needs root (loop devices, FIFREEZE)");
        return;
    }
    let rounds = env_usize("ROUNDS", 3).max(1);
    println!(
        "group snapshot: ext4 volumes on loop devices over one reflink XFS pool, 1 MiB dirty per volume, {rounds} rounds per size"
    );
    println!(
        "nodes | volumes | freeze window min/med/max ms  | raw floor min/med/max ms      | apply->Ready min/med/max ms"
    );
    let list = |name: &str, default: &str| -> Vec<usize> {
        std::env::var(name)
            .unwrap_or_else(|_| default.into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect()
    };
    // NODES=1,3 VOLUMES=2,8,32 IDLE_GROUPS=1000 by default; IDLE_GROUPS=0 skips the idle part.
    for nodes in list("NODES", "1,3") {
        for volumes in list("VOLUMES", "2,8,32") {
            one_size(nodes, volumes, rounds).await;
        }
    }
    let idle = env_usize("IDLE_GROUPS", 1000);
    if idle > 0 {
        idle_controller(idle).await;
    }
}
