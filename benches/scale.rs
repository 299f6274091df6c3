//! tandem at scale, measured: SCALE_NODES simulated nodes (one real `tandem agent` process each,
//! as the GroupSnapshot tests start them) and SCALE_VOLUMES volumes spread over them (ext4 on loop
//! devices over one reflink XFS pool: as many as the machine gives), one controller of every
//! namespace, on the bench's own control plane. Then
//! - `group`: one group of GROUP_VOLUMES volumes on GROUP_NODES nodes snapshots: apply->Ready and
//!   the freeze window;
//! - `burst`: BURST_GROUPS GroupSnapshots of as many disjoint groups in BURST_NAMESPACES namespaces,
//!   all created at once: per namespace min/median/max apply->Ready, and whether a namespace was
//!   delayed by another (first namespace 0's snapshots alone, then all of them at once).
//!
//! Before the parts: the agents' idle RSS and CPU (median over agents). Setup times are printed.
//!
//! Run as root: `cargo bench --bench scale` (SCALE_NODES=100 SCALE_VOLUMES=1000 by default;
//! `SCALE_NODES=10 SCALE_VOLUMES=40` is a run of a few minutes; PARTS=group,burst picks the parts;
//! SCALE_VOLUME_MIB=16, IDLE_SECS=20, GROUP_VOLUMES=100, GROUP_NODES=50, BURST_GROUPS=50,
//! BURST_NAMESPACES=5, BURST_SOLO=1 (0 skips the alone run)). Prints numbers; asserts no timing.

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
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::json;
use support::{TestEnv, eventually};
use tandem::api::{GroupSnapshot, GroupSnapshotPhase, NodeSnapshot};
use world::World;
use world::measure::{cpu_ticks, median, rss_kib};

const WAIT: Duration = Duration::from_secs(900);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One volume of the plan: its claim, namespace index, node index and group.
struct Planned {
    claim: String,
    ns: usize,
    node: usize,
    group: String,
}

/// A group that got at least one volume: namespace index, name, members.
struct Group {
    ns: usize,
    name: String,
    members: Vec<usize>,
}

/// When each GroupSnapshot was first seen in a final phase, by a watch of every namespace.
type Finished =
    Arc<Mutex<BTreeMap<(String, String), (Instant, GroupSnapshotPhase, String, Option<i64>)>>>;

fn watch_snapshots(client: kube::Client) -> (Finished, tokio::task::JoinHandle<()>) {
    let seen: Finished = Arc::default();
    let api: Api<GroupSnapshot> = Api::all(client);
    let s = seen.clone();
    let task = tokio::spawn(async move {
        watcher(api, watcher::Config::default())
            .for_each(move |event| {
                let seen = s.clone();
                async move {
                    let now = Instant::now();
                    if let Ok(watcher::Event::Apply(g) | watcher::Event::InitApply(g)) = event {
                        let Some(status) = g.status.as_ref() else {
                            return;
                        };
                        if matches!(
                            status.phase,
                            GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
                        ) {
                            let key = (g.namespace().unwrap_or_default(), g.name_any());
                            let message = status.message.clone().unwrap_or_default();
                            seen.lock().expect("lock").entry(key).or_insert((
                                now,
                                status.phase,
                                message,
                                status.freeze_window_millis,
                            ));
                        }
                    }
                }
            })
            .await
    });
    (seen, task)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// What came of one snapshot: namespace index, apply->final, phase, message, freeze window (ms).
type Outcome = (usize, Duration, GroupSnapshotPhase, String, Option<i64>);

/// Creates every snapshot at once and waits until all are final.
async fn snapshot_all(
    w: &World,
    namespaces: &[String],
    groups: &[&Group],
    prefix: &str,
    seen: &Finished,
) -> Vec<Outcome> {
    let applied: Vec<(usize, String, Instant)> =
        futures::future::join_all(groups.iter().map(|g| async move {
            let ns = &namespaces[g.ns];
            let name = format!("{prefix}-{}", g.name);
            let at = Instant::now();
            w.create_snapshot_in(ns, &name, &g.name).await;
            (g.ns, name, at)
        }))
        .await;
    let wanted = applied.len();
    eventually(WAIT, "every snapshot final", || {
        let done = seen
            .lock()
            .expect("lock")
            .keys()
            .filter(|(ns, name)| {
                applied
                    .iter()
                    .any(|(i, n, _)| &namespaces[*i] == ns && n == name)
            })
            .count();
        async move { (done == wanted).then_some(()) }
    })
    .await;
    let seen = seen.lock().expect("lock");
    applied
        .iter()
        .map(|(i, name, at)| {
            let (end, phase, message, window) = &seen[&(namespaces[*i].clone(), name.clone())];
            (
                *i,
                end.duration_since(*at),
                *phase,
                message.clone(),
                *window,
            )
        })
        .collect()
}

/// Deletes the snapshots (their clones go with them) and waits until they are gone.
async fn delete_all(w: &World, namespaces: &[String], groups: &[&Group], prefix: &str) {
    futures::future::join_all(groups.iter().map(|g| async move {
        let api: Api<GroupSnapshot> = Api::namespaced(w.env.client.clone(), &namespaces[g.ns]);
        let name = format!("{prefix}-{}", g.name);
        let _ = api.delete(&name, &Default::default()).await;
        eventually(WAIT, "snapshot deleted", || {
            let api = api.clone();
            let name = name.clone();
            async move { api.get_opt(&name).await.ok()?.is_none().then_some(()) }
        })
        .await;
    }))
    .await;
}

/// 64 KiB of new data on each member, so every syncfs has something to flush.
fn dirty(w: &World, plan: &[Planned], members: &[usize], seed: u64) {
    for &i in members {
        if let Some(v) = w.volumes.get(&plan[i].claim) {
            agent_support::write_file(&v.mount.join("dirty.bin"), 64 << 10, seed + i as u64, false);
        }
    }
}

#[tokio::main]
async fn main() {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: the scale benchmark needs root (loop devices, FIFREEZE)");
        return;
    }
    let nodes = env_usize("SCALE_NODES", 100).max(1);
    let volumes = env_usize("SCALE_VOLUMES", 1000).max(1);
    let size = (env_usize("SCALE_VOLUME_MIB", 16) as u64) << 20;
    let idle = Duration::from_secs(env_usize("IDLE_SECS", 20) as u64);
    let parts = std::env::var("PARTS").unwrap_or_else(|_| "group,burst".into());
    let part_group = parts.split(',').any(|p| p.trim() == "group");
    let part_burst = parts.split(',').any(|p| p.trim() == "burst");
    let n_ns = env_usize("BURST_NAMESPACES", 5).max(1);

    // The plan: group A's volumes first (2 per node on its nodes), then the burst's, each burst
    // group on consecutive nodes; every volume on node (index % nodes) of its part.
    let a_volumes = match (part_group, part_burst) {
        (true, true) => env_usize("GROUP_VOLUMES", 100).min(volumes / 2).max(1),
        (true, false) => env_usize("GROUP_VOLUMES", 100).min(volumes),
        _ => 0,
    };
    let a_nodes = env_usize("GROUP_NODES", 50)
        .min(nodes)
        .min(a_volumes.max(1));
    let mut plan: Vec<Planned> = (0..a_volumes)
        .map(|k| Planned {
            claim: format!("a{k}"),
            ns: 0,
            node: k % a_nodes.max(1),
            group: "a".into(),
        })
        .collect();
    let rest = if part_burst { volumes - a_volumes } else { 0 };
    let b_groups = env_usize("BURST_GROUPS", 50).min(rest / 2).max(1);
    let per = rest / b_groups;
    if part_burst {
        for b in 0..b_groups * per {
            let g = b / per;
            plan.push(Planned {
                claim: format!("b{b}"),
                ns: g * n_ns / b_groups,
                node: b % nodes,
                group: format!("b{g}"),
            });
        }
    }
    println!(
        "scale: {nodes} simulated nodes (one tandem agent process each), {} volumes planned (ext4, {} MiB, loop devices over one reflink XFS pool); parts: {}",
        plan.len(),
        size >> 20,
        parts
    );
    if part_group {
        println!("  group: 1 group of {a_volumes} volumes on {a_nodes} nodes");
    }
    if part_burst {
        println!(
            "  burst: {b_groups} disjoint groups of {per} volumes in {n_ns} namespaces (group b<g> in namespace g*{n_ns}/{b_groups}), snapshotted all at once"
        );
    }

    let setup = Instant::now();
    let pool_size = (plan.len() as u64 * (8 << 20) + (2 << 30)).max(4 << 30);
    let mut w = World::with_pool_size("scale", pool_size).await;
    // Namespace 0 is the world's; the others are test namespaces of their own (deleted at the end).
    let mut extra: Vec<TestEnv> = Vec::new();
    for i in 1..n_ns {
        extra.push(TestEnv::new(&format!("scale-ns{i}")).await);
    }
    let namespaces: Vec<String> = std::iter::once(w.env.namespace.clone())
        .chain(extra.iter().map(|e| e.namespace.clone()))
        .collect();
    let started = Instant::now();
    let mut made = 0;
    let mut stopped = None;
    for (i, p) in plan.iter().enumerate() {
        let label = if p.group == "a" { "part" } else { "burst" };
        let value = if p.group == "a" {
            "a"
        } else {
            p.group.as_str()
        };
        match w
            .try_add_volume_in(
                &namespaces[p.ns],
                &p.claim,
                &format!("n{}", p.node),
                size,
                &[(label, value)],
            )
            .await
        {
            Ok(()) => made += 1,
            Err(e) => {
                stopped = Some(format!("volume {i} ({}): {e}", p.claim));
                break;
            }
        }
        if (i + 1) % 100 == 0 {
            eprintln!(
                "[scale] {} volumes in {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let volumes_took = started.elapsed();
    match &stopped {
        None => println!(
            "setup: {made} volumes (loop device, mkfs, mount, PV, PVC) in {:.1} s",
            volumes_took.as_secs_f64()
        ),
        Some(why) => println!(
            "setup: only {made} of {} volumes could be made ({why}); going on with those, in {:.1} s",
            plan.len(),
            volumes_took.as_secs_f64()
        ),
    }
    let plan = &plan[..made];
    let mut groups: Vec<Group> = Vec::new();
    for (i, p) in plan.iter().enumerate() {
        match groups.iter_mut().find(|g| g.name == p.group) {
            Some(g) => g.members.push(i),
            None => groups.push(Group {
                ns: p.ns,
                name: p.group.clone(),
                members: vec![i],
            }),
        }
    }

    let started = Instant::now();
    for n in 0..nodes {
        w.start_agent(&format!("n{n}"));
    }
    let logs = w.logs();
    let node_names: Vec<String> = (0..nodes).map(|n| w.node(&format!("n{n}"))).collect();
    eventually(Duration::from_secs(300), "every agent watching", || {
        let all = node_names.iter().all(|node| {
            std::fs::read_to_string(logs.join(format!("agent-{node}.log")))
                .is_ok_and(|t| t.contains("agent watching NodeSnapshots"))
        });
        async move { all.then_some(()) }
    })
    .await;
    println!(
        "setup: {nodes} agents started and watching in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let port = support::control_plane::free_port();
    w.start_controller_all_namespaces(&["--http-addr", &format!("127.0.0.1:{port}")]);
    for g in &groups {
        let selector = if g.name == "a" {
            json!({"part": "a"})
        } else {
            json!({"burst": g.name})
        };
        w.create_group_in(
            &namespaces[g.ns],
            &g.name,
            json!({"selector": {"matchLabels": selector}, "freezeTimeoutSeconds": 60}),
        )
        .await;
    }
    for g in &groups {
        w.wait_group_members_in(&namespaces[g.ns], &g.name, g.members.len(), WAIT)
            .await;
    }
    println!(
        "setup: controller (every namespace) started and {} groups Ready in {:.1} s; setup in all {:.1} s",
        groups.len(),
        started.elapsed().as_secs_f64(),
        setup.elapsed().as_secs_f64()
    );

    // The agents idle: nothing to do, every watch open.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pids: Vec<u32> = w.agents.values().filter_map(|a| a.pid()).collect();
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect();
    tokio::time::sleep(idle).await;
    let ticks: Vec<f64> = pids
        .iter()
        .zip(&before)
        .map(|(&p, &b)| cpu_ticks(p).saturating_sub(b) as f64)
        .collect();
    let rss: Vec<f64> = pids.iter().map(|&p| rss_kib(p) as f64 / 1024.0).collect();
    let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!(
        "agents idle ({} agents, {} s): RSS median {:.1} MiB (max {:.1}); CPU median {:.0} ticks (1/100 s) in {} s (max {:.0}); controller RSS {} MiB",
        pids.len(),
        idle.as_secs(),
        median(rss.clone()),
        max(&rss),
        median(ticks.clone()),
        idle.as_secs(),
        max(&ticks),
        w.controller
            .as_ref()
            .and_then(|c| c.pid())
            .map_or(0, rss_kib)
            / 1024
    );

    let (seen, watch) = watch_snapshots(w.env.client.clone());
    if part_group && let Some(a) = groups.iter().find(|g| g.name == "a") {
        dirty(&w, plan, &a.members, 1);
        let results = snapshot_all(&w, &namespaces, &[a], "snap", &seen).await;
        let (_, took, phase, message, _) = &results[0];
        let api: Api<GroupSnapshot> = Api::namespaced(w.env.client.clone(), &namespaces[0]);
        let done = api.get("snap-a").await.expect("snapshot");
        let window = done.status.as_ref().and_then(|s| s.freeze_window_millis);
        let nsnaps: Api<NodeSnapshot> = Api::namespaced(w.env.client.clone(), &namespaces[0]);
        let per_node: Vec<f64> = nsnaps
            .list(&Default::default())
            .await
            .expect("list nsnap")
            .items
            .iter()
            .filter(|n| n.spec.group_snapshot == "snap-a")
            .filter_map(|n| n.status.as_ref()?.freeze_window_millis)
            .map(|w| w as f64)
            .collect();
        let on_nodes = a
            .members
            .iter()
            .map(|&i| plan[i].node)
            .collect::<std::collections::BTreeSet<_>>()
            .len();
        println!(
            "group: {} volumes on {on_nodes} nodes: {phase:?}{}; apply->Ready {:.0} ms; freeze window {} ms (per node median {:.0} ms, max {:.0} ms)",
            a.members.len(),
            if message.is_empty() {
                String::new()
            } else {
                format!(" ({message})")
            },
            ms(*took),
            window.map_or("-".into(), |w| w.to_string()),
            median(per_node.clone()),
            max(&per_node)
        );
        delete_all(&w, &namespaces, &[a], "snap").await;
    }

    if part_burst {
        let burst: Vec<&Group> = groups.iter().filter(|g| g.name != "a").collect();
        for g in &burst {
            dirty(&w, plan, &g.members, 2);
        }
        let report = |label: &str, results: &[Outcome]| {
            println!("{label}");
            println!(
                "  namespace | snapshots | apply->Ready min / median / max ms | freeze window median / max ms | failed"
            );
            let mut spans = Vec::new();
            for (i, ns) in namespaces.iter().enumerate() {
                let mine: Vec<&Outcome> = results.iter().filter(|r| r.0 == i).collect();
                if mine.is_empty() {
                    continue;
                }
                let mut t: Vec<f64> = mine.iter().map(|r| ms(r.1)).collect();
                t.sort_by(|a, b| a.total_cmp(b));
                let failed: Vec<&str> = mine
                    .iter()
                    .filter(|r| r.2 != GroupSnapshotPhase::Ready)
                    .map(|r| r.3.as_str())
                    .collect();
                let windows: Vec<f64> = mine.iter().filter_map(|r| r.4).map(|w| w as f64).collect();
                println!(
                    "  {:>9} | {:>9} | {:>8.0} / {:>8.0} / {:>8.0} | {:>12.0} / {:>8.0} | {}{}",
                    format!("ns{i}"),
                    mine.len(),
                    t[0],
                    t[t.len() / 2],
                    t[t.len() - 1],
                    median(windows.clone()),
                    windows.iter().copied().fold(0.0, f64::max),
                    failed.len(),
                    failed.first().map_or(String::new(), |m| format!(" ({m})"))
                );
                spans.push((i, ns, t[0], t[t.len() - 1]));
            }
            spans
        };
        let mut solo_max = None;
        if env_usize("BURST_SOLO", 1) == 1 && n_ns > 1 {
            let alone: Vec<&Group> = burst.iter().copied().filter(|g| g.ns == 0).collect();
            let results = snapshot_all(&w, &namespaces, &alone, "solo", &seen).await;
            let spans = report(
                &format!(
                    "burst, namespace 0 alone: {} GroupSnapshots created at once",
                    alone.len()
                ),
                &results,
            );
            solo_max = spans.first().map(|s| s.3);
            delete_all(&w, &namespaces, &alone, "solo").await;
            for g in &burst {
                dirty(&w, plan, &g.members, 3);
            }
        }
        let results = snapshot_all(&w, &namespaces, &burst, "burst", &seen).await;
        let spans = report(
            &format!(
                "burst: {} GroupSnapshots of {} disjoint groups in {} namespaces, created at once",
                burst.len(),
                burst.len(),
                namespaces.len()
            ),
            &results,
        );
        // A namespace waited for another if its first snapshot was Ready only after the other's
        // last (it was served after the other, not alongside it).
        for (i, _, first, _) in &spans {
            let behind: Vec<String> = spans
                .iter()
                .filter(|(j, _, _, last)| j != i && first > last)
                .map(|(j, _, _, _)| format!("ns{j}"))
                .collect();
            println!(
                "  ns{i} delayed by another namespace: {}",
                if behind.is_empty() {
                    "no (its first snapshot was Ready before every other namespace's last)"
                        .to_string()
                } else {
                    format!(
                        "yes, its first was Ready after the last of {}",
                        behind.join(", ")
                    )
                }
            );
        }
        if let (Some(solo), Some(ns0)) = (solo_max, spans.iter().find(|s| s.0 == 0)) {
            println!(
                "  ns0: slowest snapshot {solo:.0} ms alone, {:.0} ms with every namespace at once",
                ns0.3
            );
        }
        delete_all(&w, &namespaces, &burst, "burst").await;
    }
    watch.abort();
    let teardown = Instant::now();
    drop(w);
    drop(extra);
    eprintln!(
        "[scale] teardown in {:.1} s",
        teardown.elapsed().as_secs_f64()
    );
}
