//! `make demo`: tandem's main job on one machine, for real. Starts a local control plane, makes
//! loop-backed volumes on two simulated nodes, starts the controller and one agent per node,
//! applies examples/consistency-group.yaml and examples/group-snapshot.yaml, shows what kubectl
//! shows, proves the snapshot contents, restores the snapshot to new claims
//! (examples/group-restore.yaml) and proves theirs, deletes the restored claims (their clones go
//! with them), and cleans everything up. Needs root.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;
#[path = "../tests/world/mod.rs"]
mod world;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::ListParams;
use tandem::api::{GROUP_RESTORE_LABEL, GroupRestore, GroupSnapshotPhase, RestorePhase};
use world::{World, clone_path};

const RESTORE: &str = "orders-db-1-restore";

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

    restore(&mut w, &before).await;

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

/// The restore: examples/group-restore.yaml to new claims, their contents proved against the
/// snapshot, writes to them kept off the source, and their deletion taking the clones along.
async fn restore(w: &mut World, before: &BTreeMap<String, String>) {
    step("installing the restore StorageClass from the chart (provisioner tandem.dev/restore)");
    let class = support::helm::helm(&[
        "template",
        "tandem",
        &support::helm::chart_dir().display().to_string(),
        "--show-only",
        "templates/restore-storageclass.yaml",
    ])
    .expect("helm template of the StorageClass");
    let dir = w.scratch.path("restore-class");
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("storageclass.yaml");
    std::fs::write(&file, class).expect("write");
    kubectl(w, &["apply", "-f", &file.display().to_string()]);

    step("kubectl apply -f examples/group-restore.yaml");
    let applied = Instant::now();
    kubectl(w, &["apply", "-f", "examples/group-restore.yaml"]);
    let restores: Api<GroupRestore> = w.env.api();
    let done = support::eventually(Duration::from_secs(120), "GroupRestore Completed", || {
        let restores = restores.clone();
        async move {
            let r = restores.get(RESTORE).await.ok()?;
            let status = r.status.clone()?;
            match status.phase {
                RestorePhase::Completed => Some(r),
                RestorePhase::Failed => panic!("the restore failed: {:?}", status.message),
                _ => None,
            }
        }
    })
    .await;
    let to_bound = applied.elapsed();
    let label = format!("{GROUP_RESTORE_LABEL}={RESTORE}");
    kubectl(w, &["get", "grestore,nrestore"]);
    kubectl(w, &["get", "pvc", "-l", &label]);
    kubectl(
        w,
        &[
            "get",
            "pv",
            "-l",
            &label,
            "-o",
            "custom-columns=NAME:.metadata.name,CLAIM:.spec.claimRef.name,PATH:.spec.local.path,FS:.spec.local.fsType,NODE:.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]",
        ],
    );
    let status = done.status.expect("status");
    println!(
        "\n    {} members restored, consistency {}; apply to every claim Bound {} ms",
        status.member_count,
        status
            .consistency
            .map(|c| format!("{c:?}"))
            .unwrap_or_else(|| "MISSING".into()),
        to_bound.as_millis()
    );
    let claims: Api<PersistentVolumeClaim> = w.env.api();
    let annotations = claims
        .get(&format!("{}-restored", status.members[0].source_claim))
        .await
        .expect("restored claim")
        .metadata
        .annotations
        .unwrap_or_default();
    for key in [
        "tandem.dev/restored-from",
        "tandem.dev/cut-time",
        "tandem.dev/consistency",
    ] {
        println!(
            "    {key}: {}",
            annotations
                .get(key)
                .map(String::as_str)
                .unwrap_or("MISSING")
        );
    }

    step(
        "proving the restored claims: each holds the state from before the snapshot, nothing after, and writes to it stay off the source",
    );
    let volumes: Api<PersistentVolume> = Api::all(w.env.client.clone());
    for member in &status.members {
        let pv = volumes
            .get(&member.persistent_volume)
            .await
            .expect("restored PV");
        let spec = pv.spec.expect("PV spec");
        let path = spec.local.as_ref().expect("a local PV").path.clone();
        let fs = w.volumes[&member.source_claim].fs.clone();
        let mnt = w.scratch.path(&format!("restored-{}", member.claim));
        let options: &[&str] = if fs == "xfs" { &["nouuid"] } else { &[] };
        w.scratch.mount(&path, &mnt, options);
        let same =
            agent_support::sha256_file(&mnt.join("state.bin")) == before[&member.source_claim];
        let after = mnt.join("after.bin").exists();
        agent_support::write_file(&mnt.join("state.bin"), 4096, 99, true);
        let source_same =
            agent_support::sha256_file(&w.volumes[&member.source_claim].mount.join("state.bin"))
                == before[&member.source_claim];
        println!(
            "    {:<22} on {} ({}, {path})\n                           state.bin {}, after.bin {}, source after a write here {}",
            member.claim,
            member.node,
            member
                .method
                .map(|m| format!("{m:?}"))
                .unwrap_or_else(|| "method MISSING".into()),
            if same { "identical" } else { "DIFFERENT" },
            if after { "PRESENT" } else { "absent" },
            if source_same { "untouched" } else { "CHANGED" }
        );
        assert!(
            same && !after && source_same,
            "the restore of {} is wrong",
            member.source_claim
        );
        w.scratch.unmount(&mnt);
    }

    let clone_files = || {
        std::fs::read_dir(w.pool.join(".tandem-restores"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let clones_before = clone_files();
    step(
        "kubectl delete pvc -l tandem.dev/group-restore (tandem, the external deleter, deletes the clones and PVs)",
    );
    kubectl(
        w,
        &[
            "delete",
            "pvc",
            "-l",
            &label,
            "--wait=true",
            "--timeout=60s",
        ],
    );
    support::eventually(Duration::from_secs(60), "restored PVs deleted", || {
        let volumes = volumes.clone();
        let label = label.clone();
        async move {
            let list = volumes
                .list(&ListParams::default().labels(&label))
                .await
                .ok()?;
            list.items.is_empty().then_some(())
        }
    })
    .await;
    println!(
        "    restored PVs left: 0; clone files: {clones_before} before, {} left",
        clone_files()
    );
    kubectl(w, &["delete", "grestore", RESTORE]);
}
