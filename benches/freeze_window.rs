//! Freeze window of the agent's reflink cut for 1, 4, 16 and 32 volumes on one node, next to the raw
//! floor: the same syscalls (parallel syncfs, parallel FIFREEZE, FICLONE of each image, parallel
//! FITHAW) in a tight loop on the same volumes, measured in the same run.
//!
//! Run as root: `cargo bench --bench freeze_window` (ROUNDS=N to change the rounds per size,
//! DIRTY_KIB=N the data left dirty in each volume before each round, VOLUMES=1,4,16,32 the sizes). Prints numbers; asserts no
//! timing.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;

use std::path::PathBuf;
use std::time::Duration;

use agent_support::{Scratch, Volume, floor_round, stats, write_file};
use tandem::agent::engine::{CutRequest, Engine, EngineConfig, VolumeRequest};
use tandem::api::{FreezePolicy, NodePhase};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dirty(volumes: &[Volume], round: usize, kib: usize) {
    for (i, v) in volumes.iter().enumerate() {
        write_file(
            &v.mount.join("dirty.bin"),
            kib * 1024,
            (round * 1000 + i) as u64,
            false,
        );
    }
}

fn main() {
    if !agent_support::is_root() {
        eprintln!("SKIPPED: the freeze-window benchmark needs root (loop devices, FIFREEZE)");
        return;
    }
    let rounds = env_usize("ROUNDS", 7).max(1);
    let dirty_kib = env_usize("DIRTY_KIB", 1024);
    println!(
        "freeze window, reflink backend, ext4 volumes on loop devices over images in one XFS pool; {rounds} rounds per size, {dirty_kib} KiB dirty per volume before each round"
    );
    println!(
        "{:>7} | {:>28} | {:>28} | {:>9} | target: median within floor + 5 ms",
        "volumes", "agent min / median / max ms", "floor min / median / max ms", "median Δ"
    );
    let sizes: Vec<usize> = std::env::var("VOLUMES")
        .unwrap_or_else(|_| "1,4,16,32".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    for n in sizes {
        let mut s = Scratch::new();
        let pool = s.pool("xfs");
        let volumes: Vec<Volume> = (0..n)
            .map(|i| s.volume(&pool, &format!("b{i}"), "ext4", 64 << 20))
            .collect();
        for v in &volumes {
            s.assert_owned(&v.mount);
        }
        let (engine, _) = Engine::start(EngineConfig::new(s.path("state"))).expect("engine");
        let clones: Vec<PathBuf> = (0..n)
            .map(|i| pool.join(format!("floor-{i}.img")))
            .collect();
        let mut agent = Vec::new();
        let mut floor = Vec::new();
        for round in 0..rounds {
            // Alternate which goes first so neither always meets a warmer cache.
            for first_agent in [round % 2 == 0, round % 2 != 0] {
                dirty(&volumes, round, dirty_kib);
                if first_agent {
                    let key = format!("bench-{n}-{round}");
                    let req = CutRequest {
                        key: key.clone(),
                        namespace: "bench".into(),
                        name: key.clone(),
                        group_snapshot: key.clone(),
                        freeze: FreezePolicy::Required,
                        freeze_timeout: Duration::from_secs(30),
                        release_after_cut: true,
                        volumes: volumes
                            .iter()
                            .enumerate()
                            .map(|(i, v)| VolumeRequest {
                                claim: format!("c{i}"),
                                persistent_volume: format!("pv{i}"),
                                path: v.mount.clone(),
                                allow_shared_filesystem: false,
                                central: false,
                            })
                            .collect(),
                    };
                    let st = engine.cut(&req, None).expect("cut");
                    assert_eq!(st.phase, NodePhase::Released, "{:?}", st.message);
                    agent.push(engine.freeze_window(&key).expect("window"));
                    engine.finalize(&key, false).expect("delete snapshots");
                } else {
                    floor.push(floor_round(&volumes, &clones));
                }
            }
        }
        let (a0, a1, a2) = stats(agent);
        let (f0, f1, f2) = stats(floor);
        let verdict = if a1 - f1 <= 5.0 { "met" } else { "NOT met" };
        println!(
            "{n:>7} | {a0:>8.2} / {a1:>7.2} / {a2:>7.2} | {f0:>8.2} / {f1:>7.2} / {f2:>7.2} | {:>+8.2} | {verdict}",
            a1 - f1
        );
    }
}
