//! `make demo`: tandem's main job on one machine, for real. Starts a local control plane, makes
//! loop-backed volumes on two simulated nodes, starts the controller and one agent per node,
//! applies examples/consistency-group.yaml and examples/group-snapshot.yaml, shows what kubectl
//! shows, proves the snapshot contents, and cleans everything up. Needs root.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/world/mod.rs"]
mod world;

use std::collections::BTreeMap;
use std::time::Instant;

use tandem::api::GroupSnapshotPhase;
use world::{World, clone_path};

fn step(text: &str) {
    println!("\n==> {text}");
}

fn kubectl(w: &World, args: &[&str]) {
    match w.env.kubectl(args) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("kubectl {args:?}: {e}"),
    }
}

#[tokio::main]
async fn main() {
    if !agent_support::is_root() {
        eprintln!(
            "the demo needs root: it makes loop devices, mounts filesystems and freezes them"
        );
        std::process::exit(1);
    }
    let started = Instant::now();
    step(
        "starting a local control plane (etcd, kube-apiserver, kube-controller-manager) and installing tandem's CRDs",
    );
    let mut w = World::new("demo").await;
    println!(
        "    namespace {} on {}",
        w.env.namespace, w.env.plane.server
    );

    step("making volumes: loop devices over images in a reflink XFS pool, published as local PVs");
    for (claim, node, fs) in [
        ("orders-data", "node-1", "xfs"),
        ("orders-wal", "node-1", "ext4"),
        ("orders-index", "node-2", "xfs"),
    ] {
        w.add_volume(claim, node, fs, &[("app", "orders-db")]).await;
        println!(
            "    {claim:<13} {fs:<5} on {} at {}",
            w.node(node),
            w.volumes[claim].mount.display()
        );
    }

    step("starting tandem controller and one tandem agent per node");
    w.start_controller();
    w.start_agent("node-1");
    w.start_agent("node-2");

    step("the application writes its state");
    let mut before = BTreeMap::new();
    for (claim, volume) in &w.volumes {
        let hash = agent_support::write_file(
            &volume.mount.join("state.bin"),
            4 << 20,
            claim.len() as u64,
            false,
        );
        println!("    {claim:<13} state.bin sha256 {}…", &hash[..16]);
        before.insert(claim.clone(), hash);
    }

    step("kubectl apply -f examples/consistency-group.yaml");
    kubectl(&w, &["apply", "-f", "examples/consistency-group.yaml"]);
    w.wait_group_ready("orders-db").await;
    kubectl(&w, &["get", "cg"]);

    step("kubectl apply -f examples/group-snapshot.yaml");
    let applied = Instant::now();
    kubectl(&w, &["apply", "-f", "examples/group-snapshot.yaml"]);
    let snapshot = w.wait_phase("orders-db-1", GroupSnapshotPhase::Ready).await;
    let to_ready = applied.elapsed();
    for volume in w.volumes.values() {
        agent_support::write_file(&volume.mount.join("after.bin"), 4096, 1, true);
    }
    kubectl(&w, &["get", "cg,gsnap,nsnap"]);
    let status = snapshot.status.expect("status");
    println!(
        "\n    consistency {:?}; freeze window {} ms overall ({}); apply to Ready {} ms",
        status.consistency.expect("consistency"),
        status.freeze_window_millis.unwrap_or_default(),
        status
            .nodes
            .iter()
            .map(|n| format!(
                "{} {} ms",
                n.node,
                n.freeze_window_millis.unwrap_or_default()
            ))
            .collect::<Vec<_>>()
            .join(", "),
        to_ready.as_millis()
    );

    step(
        "proving the snapshots: each mounts clean, holds the state from before and nothing written after",
    );
    for member in &status.members {
        let handle = member.snapshot_handle.as_deref().expect("handle");
        let fs = w.volumes[&member.claim].fs.clone();
        let mnt =
            agent_support::open_snapshot(&mut w.scratch, &clone_path(handle), &fs, &member.claim);
        let same = agent_support::sha256_file(&mnt.join("state.bin")) == before[&member.claim];
        let after = mnt.join("after.bin").exists();
        println!(
            "    {:<13} {handle}\n                  fsck clean, state.bin {}, after.bin {}",
            member.claim,
            if same { "identical" } else { "DIFFERENT" },
            if after { "PRESENT" } else { "absent" }
        );
        assert!(same && !after, "the snapshot of {} is wrong", member.claim);
        w.scratch.unmount(&mnt);
    }

    step("kubectl delete gsnap orders-db-1 (deletionPolicy Delete removes the member snapshots)");
    kubectl(
        &w,
        &[
            "delete",
            "gsnap",
            "orders-db-1",
            "--wait=true",
            "--timeout=60s",
        ],
    );
    println!("    snapshot files left: {}", w.snapshot_files().len());

    step("cleaning up: agents and controller stop, volumes unmount, loop devices detach");
    drop(w);
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
}
