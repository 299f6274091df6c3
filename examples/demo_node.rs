//! `make demo-node`: the same story as `make demo`, the way users run tandem. Builds tandem's
//! image with no registry, starts a control plane and one real node (kubelet + containerd),
//! installs the chart with helm, runs PostgreSQL (data and WAL on two local volumes) with pgbench
//! in another pod, applies examples/consistency-group.yaml and examples/group-snapshot.yaml,
//! shows what kubectl shows, restores the snapshot to new claims (examples/group-restore.yaml),
//! starts PostgreSQL on them and checks pgbench's balances, deletes the restored claims, and
//! cleans everything up. Needs root and `make deps tools`.

#[path = "../tests/agent_support/mod.rs"]
mod agent_support;
#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::node::{Cluster, PGBENCH_BALANCED, images, pgbench_pod, postgres_pod};
use support::repo_root;

fn step(text: &str) {
    println!("\n==> {text}");
}

fn show(cluster: &Cluster, args: &[&str]) {
    match cluster.kubectl(args) {
        Ok(out) => print!("{out}"),
        Err(e) => println!("kubectl {args:?}: {e}"),
    }
}

fn apply(cluster: &Cluster, ns: &str, name: &str, object: &serde_json::Value) {
    let file = cluster.root.join(format!("{name}.json"));
    std::fs::write(&file, object.to_string()).expect("manifest");
    show(
        cluster,
        &["-n", ns, "apply", "-f", &file.display().to_string()],
    );
}

fn wait_ready(cluster: &Cluster, ns: &str, pod: &str) {
    if let Err(e) = cluster.kubectl_timeout(
        &[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=90s",
        ],
        Duration::from_secs(100),
    ) {
        panic!("{pod} not Ready: {e}");
    }
}

/// A loop-backed filesystem in `pool`, mounted at `mount` and published as a local PV + claim.
fn volume(
    cluster: &Cluster,
    scratch: &mut agent_support::Scratch,
    ns: &str,
    pool: &Path,
    name: &str,
    fs: &str,
) {
    let mount = cluster.nodes[0].disks_dir.join(ns).join(name);
    let image = pool.join(format!("{name}.img"));
    scratch.image(&image, 320 << 20);
    let device = scratch.attach(&image, false);
    scratch.mkfs(&device, fs);
    scratch.mount(&device, &mount, &[]);
    println!("    {name:<12} {fs:<5} {device} at {}", mount.display());
    let pv = format!("{ns}-{name}");
    let node = &cluster.nodes[0].name;
    apply(
        cluster,
        ns,
        &pv,
        &serde_json::to_value(support::objects::local_volume(
            &pv,
            &mount.to_string_lossy(),
            node,
            ns,
            name,
            &[],
        ))
        .expect("pv"),
    );
    let claim = serde_json::to_value(support::objects::claim(
        name,
        Some(&pv),
        &[("app", "orders-db")],
    ))
    .expect("claim");
    apply(cluster, ns, &format!("{ns}-{name}-claim"), &claim);
}

fn main() {
    if !agent_support::is_root() {
        eprintln!("the demo needs root: a kubelet, containerd, loop devices, mounts and freezes");
        std::process::exit(1);
    }
    let started = Instant::now();
    step("building tandem's image with no registry (hack/image/build.sh) and the PostgreSQL image");
    for (key, path) in images() {
        if key.ends_with("_ref") {
            println!("    {key:<13} {path}");
        }
    }

    step(
        "starting a control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler) and one real node (kubelet + containerd)",
    );
    let cluster = Cluster::start(1);
    cluster.nodes[0].import(&images()["postgres"]);
    show(&cluster, &["get", "nodes", "-o", "wide"]);

    step("helm install tandem charts/tandem (the image is already on the node)");
    let node = &cluster.nodes[0];
    match cluster.helm(&[
        "install",
        "tandem",
        &repo_root().join("charts/tandem").display().to_string(),
        "--namespace",
        "tandem-system",
        "--create-namespace",
        "--set",
        &format!("agent.kubeletDir={}", node.kubelet_dir.display()),
        "--set",
        &format!("agent.stateDir={}", node.state_dir.display()),
        "--set",
        &format!("agent.extraHostPaths={{{}}}", node.disks_dir.display()),
        "--wait",
        "--timeout=180s",
    ]) {
        Ok(out) => println!("{}", out.lines().take(6).collect::<Vec<_>>().join("\n")),
        Err(e) => panic!("helm install: {e}"),
    }
    show(
        &cluster,
        &["-n", "tandem-system", "get", "pods", "-o", "wide"],
    );

    let ns = "orders";
    show(&cluster, &["create", "namespace", ns]);
    step("volumes: loop devices over images in a reflink XFS pool, published as local PVs");
    let mut scratch = agent_support::Scratch::new();
    let pool_image = node.images_dir().join("pool.img");
    scratch.image(&pool_image, 2 << 30);
    let pool_device = scratch.attach(&pool_image, false);
    scratch.mkfs(&pool_device, "xfs");
    let pool = node.disks_dir.join(ns).join("pool");
    scratch.mount(&pool_device, &pool, &[]);
    volume(&cluster, &mut scratch, ns, &pool, "orders-data", "xfs");
    volume(&cluster, &mut scratch, ns, &pool, "orders-wal", "ext4");

    step("PostgreSQL in a pod (data on orders-data, WAL on orders-wal), pgbench in another pod");
    apply(
        &cluster,
        ns,
        "pg",
        &postgres_pod(ns, "pg", "orders-data", "orders-wal", true),
    );
    wait_ready(&cluster, ns, "pg");
    let ip = cluster
        .kubectl(&[
            "-n",
            ns,
            "get",
            "pod",
            "pg",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .expect("pod IP");
    apply(&cluster, ns, "pgbench", &pgbench_pod(ns, &ip));
    std::thread::sleep(Duration::from_secs(8));
    show(&cluster, &["-n", ns, "get", "pods,pvc", "-o", "wide"]);

    step(
        "kubectl apply -f examples/consistency-group.yaml, then examples/group-snapshot.yaml under load",
    );
    let examples = repo_root().join("examples");
    show(
        &cluster,
        &[
            "-n",
            ns,
            "apply",
            "-f",
            &examples
                .join("consistency-group.yaml")
                .display()
                .to_string(),
        ],
    );
    std::thread::sleep(Duration::from_secs(3));
    show(
        &cluster,
        &[
            "-n",
            ns,
            "apply",
            "-f",
            &examples.join("group-snapshot.yaml").display().to_string(),
        ],
    );
    let _ = cluster.kubectl_timeout(
        &[
            "-n",
            ns,
            "wait",
            "--for=jsonpath={.status.phase}=Ready",
            "groupsnapshot/orders-db-1",
            "--timeout=60s",
        ],
        Duration::from_secs(70),
    );
    show(
        &cluster,
        &[
            "-n",
            ns,
            "get",
            "consistencygroup,groupsnapshot,nodesnapshot",
            "-o",
            "wide",
        ],
    );
    show(
        &cluster,
        &[
            "-n",
            ns,
            "get",
            "groupsnapshot",
            "orders-db-1",
            "-o",
            "jsonpath=consistency: {.status.consistency}{\"\\n\"}freeze window: {.status.freezeWindowMillis} ms{\"\\n\"}{range .status.members[*]}  {.claim}: {.snapshotHandle}{\"\\n\"}{end}",
        ],
    );

    step("the load went on after the thaw");
    let count = || {
        cluster
            .kubectl_timeout(
                &[
                    "-n",
                    ns,
                    "exec",
                    "pg",
                    "--",
                    "psql",
                    "-qAt",
                    "-h",
                    "/tmp",
                    "-U",
                    "postgres",
                    "-c",
                    "select count(*) from pgbench_history",
                ],
                Duration::from_secs(15),
            )
            .unwrap_or_default()
    };
    println!("    pgbench transactions: {}", count().trim());
    std::thread::sleep(Duration::from_secs(2));
    println!("    two seconds later:    {}", count().trim());

    step("kubectl apply -f examples/group-restore.yaml: the snapshot to new claims, under load");
    show(
        &cluster,
        &[
            "-n",
            ns,
            "apply",
            "-f",
            &examples.join("group-restore.yaml").display().to_string(),
        ],
    );
    let restored = Instant::now();
    if let Err(e) = cluster.kubectl_timeout(
        &[
            "-n",
            ns,
            "wait",
            "--for=jsonpath={.status.phase}=Completed",
            "grouprestore/orders-db-1-restore",
            "--timeout=120s",
        ],
        Duration::from_secs(130),
    ) {
        show(&cluster, &["-n", ns, "get", "grouprestore", "-o", "yaml"]);
        panic!("the restore did not complete: {e}");
    }
    println!(
        "    apply to every claim Bound: {:.1} s",
        restored.elapsed().as_secs_f64()
    );
    show(&cluster, &["-n", ns, "get", "grouprestore,noderestore"]);
    show(
        &cluster,
        &["-n", ns, "get", "pvc", "-l", "tandem.dev/group-restore"],
    );

    step("PostgreSQL on the restored claims: crash recovery, then pgbench's balance invariant");
    apply(
        &cluster,
        ns,
        "restored",
        &postgres_pod(
            ns,
            "restored",
            "orders-data-restored",
            "orders-wal-restored",
            false,
        ),
    );
    wait_ready(&cluster, ns, "restored");
    let sql = |sql: &str| {
        cluster
            .kubectl_timeout(
                &[
                    "-n", ns, "exec", "restored", "--", "psql", "-qAt", "-h", "/tmp", "-U",
                    "postgres", "-c", sql,
                ],
                Duration::from_secs(15),
            )
            .unwrap_or_else(|e| format!("psql: {e}"))
    };
    println!(
        "    recovered transactions: {}",
        sql("select count(*) from pgbench_history").trim()
    );
    let balanced = sql(PGBENCH_BALANCED);
    println!(
        "    sum(abalance) = sum(bbalance) = sum(tbalance) = sum(history.delta): {}",
        if balanced.trim() == "t" { "yes" } else { "NO" }
    );
    assert_eq!(
        balanced.trim(),
        "t",
        "the restored database is not balanced"
    );

    step("kubectl delete pvc -l tandem.dev/group-restore (tandem deletes the clones and PVs)");
    let _ = cluster.kubectl_timeout(
        &[
            "-n",
            ns,
            "delete",
            "pod",
            "restored",
            "--grace-period=0",
            "--force",
            "--wait=true",
        ],
        Duration::from_secs(60),
    );
    show(
        &cluster,
        &[
            "-n",
            ns,
            "delete",
            "pvc",
            "-l",
            "tandem.dev/group-restore",
            "--timeout=60s",
        ],
    );
    let _ = cluster.kubectl_timeout(
        &[
            "wait",
            "--for=delete",
            "pv",
            "-l",
            "tandem.dev/group-restore",
            "--timeout=60s",
        ],
        Duration::from_secs(70),
    );
    show(&cluster, &["get", "pv", "-l", "tandem.dev/group-restore"]);

    step(
        "kubectl delete groupsnapshot orders-db-1 (deletionPolicy Delete: the agent pod removes the clones); cleaning up",
    );
    show(
        &cluster,
        &[
            "-n",
            ns,
            "delete",
            "groupsnapshot",
            "orders-db-1",
            "--timeout=60s",
        ],
    );
    let _ = cluster.kubectl_timeout(
        &[
            "-n",
            ns,
            "delete",
            "pod",
            "--all",
            "--grace-period=0",
            "--force",
        ],
        Duration::from_secs(60),
    );
    // The kubelet's bind mounts go before the volumes.
    std::thread::sleep(Duration::from_secs(3));
    drop(scratch);
    drop(cluster);
    println!("\ndone in {:.0} s", started.elapsed().as_secs_f64());
}
