//! tandem the way users run it: a real node (kubelet + containerd), tandem's image built with no
//! registry, the chart installed with helm, and the pods (not host processes) cutting a
//! GroupSnapshot of local volumes. Needs root (CI is root); skips with a message otherwise.

mod agent_support;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use serde_json::json;
use support::node::{
    self, PGBENCH_BALANCED, PodVolume, images, pgbench_pod, postgres_pod_with, shared_cluster,
    with_cluster,
};
use support::objects::{claim, local_volume};
use support::{client_for, eventually, repo_root};
use tandem::api::{
    Consistency, GROUP_RESTORE_LABEL, GroupRestore, GroupSnapshot, GroupSnapshotPhase, NodePhase,
    NodeSnapshot, RestorePhase,
};

const WAIT: Duration = Duration::from_secs(90);
/// Every exec into a pod whose volume may be frozen ends on the host side after this.
const EXEC_TIMEOUT: Duration = Duration::from_secs(15);
const RELEASE: &str = "tandem";
const RELEASE_NAMESPACE: &str = "tandem-system";

fn require_root() -> bool {
    if !node::can_run_nodes() {
        eprintln!("SKIPPED: the real node needs root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// The programs the agent runs (every `run_tool("<program>"` in src/agent), read from the
/// source so a new one is checked without editing this test.
fn programs_the_agent_runs() -> Vec<String> {
    let mut programs = Vec::new();
    let mut dirs = vec![repo_root().join("src/agent")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("src/agent").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            for call in text.split("run_tool(").skip(1) {
                let call = call.trim_start();
                if let Some(rest) = call.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    programs.push(rest[..end].to_string());
                }
            }
        }
    }
    programs.sort();
    programs.dedup();
    programs
}

/// The Dockerfile's runtime stage: its apt-get packages, ENTRYPOINT, CMD and USER.
fn dockerfile_runtime() -> (Vec<String>, String, String, String) {
    let text = fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let runtime = text.rsplit("\nFROM ").next().expect("a runtime stage");
    let joined = runtime.replace("\\\n", " ");
    let install = joined
        .lines()
        .find_map(|l| l.split("apt-get install").nth(1))
        .expect("apt-get install in the runtime stage");
    let mut packages: Vec<String> = install
        .split("&&")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .map(String::from)
        .collect();
    packages.sort();
    let directive = |name: &str| {
        runtime
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile's runtime stage"))
            .trim()
            .to_string()
    };
    (
        packages,
        directive("ENTRYPOINT"),
        directive("CMD"),
        directive("USER"),
    )
}

/// The Dockerfile (for users with a registry) and hack/image (no registry) make the same image.
#[test]
fn the_dockerfile_and_the_local_image_agree() {
    let mut listed: Vec<String> = fs::read_to_string(repo_root().join("hack/image/packages"))
        .expect("hack/image/packages")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    listed.sort();
    let (packages, entrypoint, cmd, user) = dockerfile_runtime();
    assert_eq!(packages, listed, "Dockerfile vs hack/image/packages");
    let dockerfile = fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("hack/image/configure-rootfs.sh"),
        "the Dockerfile must configure its rootfs with hack/image/configure-rootfs.sh"
    );
    let ignored = fs::read_to_string(repo_root().join(".dockerignore")).expect(".dockerignore");
    assert!(
        ignored
            .lines()
            .any(|l| l.trim() == "!hack/image/configure-rootfs.sh"),
        ".dockerignore must let hack/image/configure-rootfs.sh into the build context"
    );
    if !require_root() {
        return;
    }
    let config: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&images()["tandem_config"]).expect("image config"),
    )
    .expect("image config JSON");
    let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("exec form");
    assert_eq!(config["Entrypoint"], as_json(&entrypoint));
    assert_eq!(config["Cmd"], as_json(&cmd));
    assert_eq!(config["User"], user.as_str());
}

/// Every program the agent runs is in the image, checked inside a pod of the real node.
#[test]
fn every_program_the_agent_runs_is_in_the_image() {
    if !require_root() {
        return;
    }
    let programs = programs_the_agent_runs();
    assert!(
        programs.iter().any(|p| p == "lvcreate"),
        "reading src/agent found {programs:?}"
    );
    shared_cluster();
    let image = images()["tandem_ref"].clone();
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "image-check", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "check", "image": image, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", "sleep 3600"]}]
        }
    });
    with_cluster(|c| {
        let manifest = c.root.join("image-check.json");
        fs::write(&manifest, pod.to_string()).expect("manifest");
        c.kubectl(&["apply", "-f", &manifest.display().to_string()])
            .expect("apply");
        c.kubectl_timeout(
            &[
                "wait",
                "--for=condition=Ready",
                "pod/image-check",
                "--timeout=60s",
            ],
            Duration::from_secs(70),
        )
        .expect("pod Ready");
        let mut args = vec!["exec", "image-check", "--", "/bin/sh", "-c"];
        let script = programs
            .iter()
            .map(|p| format!("command -v {p} || echo MISSING {p}"))
            .collect::<Vec<_>>()
            .join("; ");
        args.push(&script);
        let out = c
            .kubectl_timeout(&args, Duration::from_secs(20))
            .expect("exec");
        let _ = c.kubectl(&["delete", "pod", "image-check", "--wait=false"]);
        assert!(
            !out.contains("MISSING"),
            "programs the agent runs are not in the image:\n{out}"
        );
        assert_eq!(out.lines().count(), programs.len(), "{out}");
    });
}

/// The chart, installed once per test binary with the image imported into the node, and pointed
/// at the node's folders: the kubelet root, the agent's journal, and the shared folder where the
/// tests' local volumes and their pools live (the pools must be visible to the agent too: a
/// reflink clone is made next to the volume's image).
fn install_chart() -> &'static str {
    static INSTALLED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        shared_cluster();
        with_cluster(|c| {
            let n = &c.nodes[0];
            let started = std::time::Instant::now();
            let out = c
                .helm(&[
                    "install",
                    RELEASE,
                    &repo_root().join("charts/tandem").display().to_string(),
                    "--namespace",
                    RELEASE_NAMESPACE,
                    "--create-namespace",
                    "--set",
                    &format!("agent.kubeletDir={}", n.kubelet_dir.display()),
                    "--set",
                    &format!("agent.stateDir={}", n.state_dir.display()),
                    "--set",
                    &format!("agent.extraHostPaths={{{}}}", n.disks_dir.display()),
                    "--set",
                    "logLevel=info\\,tandem=debug",
                    "--wait",
                    "--timeout=180s",
                ])
                .unwrap_or_else(|e| {
                    panic!(
                        "helm install: {e}\n{}",
                        c.kubectl(&["get", "pods", "-A", "-o", "wide"])
                            .unwrap_or_default()
                    )
                });
            eprintln!(
                "[chart] installed and Ready in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            out
        })
    })
}

/// Thaws the test's volumes from the host when it ends, however it ends.
struct ThawOnDrop(Vec<PathBuf>);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        for mount in &self.0 {
            if let Ok(fd) = tandem::agent::freeze::open_dir(mount) {
                let _ = tandem::agent::freeze::thaw(&fd, mount);
            }
        }
    }
}

/// A loop-backed filesystem in `pool`, mounted under the node's shared folder.
fn volume(
    scratch: &mut agent_support::Scratch,
    pool: &Path,
    mount: &Path,
    fs: &str,
) -> agent_support::Volume {
    let image = pool.join(format!(
        "{}.img",
        mount.file_name().expect("name").to_string_lossy()
    ));
    scratch.image(&image, 320 << 20);
    let device = scratch.attach(&image, false);
    scratch.mkfs(&device, fs);
    scratch.mount(&device, mount, &[]);
    scratch.assert_owned(mount);
    agent_support::Volume {
        image,
        device,
        mount: mount.to_path_buf(),
        fs: fs.into(),
    }
}

fn apply(c: &support::node::Cluster, name: &str, object: &serde_json::Value) {
    let file = c.root.join(format!("{name}.json"));
    fs::write(&file, object.to_string()).expect("manifest");
    c.kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// The application pod of the snapshot tests: it appends a counter to /data/sequence, then to
/// /wal/sequence, 20 times a second (the writes a freeze must hold). Waits until it runs.
fn start_writer(c: &node::Cluster, ns: &str) {
    let image = images()["tandem_ref"].clone();
    apply(
        c,
        &format!("{ns}-writer"),
        &json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "writer", "namespace": ns},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "securityContext": {"runAsUser": 0},
                "containers": [{"name": "writer", "image": image, "imagePullPolicy": "Never",
                    "command": ["/bin/sh", "-c",
                        "i=0; while true; do i=$((i+1)); echo $i >> /data/sequence; echo $i >> /wal/sequence; sleep 0.05; done"],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                     {"name": "wal", "mountPath": "/wal"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                            {"name": "wal", "persistentVolumeClaim": {"claimName": "wal"}}]
            }
        }),
    );
    c.kubectl_timeout(
        &[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            "pod/writer",
            "--timeout=60s",
        ],
        Duration::from_secs(70),
    )
    .unwrap_or_else(|e| panic!("writer Ready: {e}"));
}

/// Creates the group `shop` (the claims labelled app=shop) and cuts `shop-1` (Delete). Returns its
/// status once Ready, after checking it is FilesystemFrozen with both members frozen on
/// `node_name` and every NodeSnapshot Released, and how long it took from create to Ready.
async fn snapshot_shop(
    client: &kube::Client,
    ns: &str,
    node_name: &str,
) -> (tandem::api::GroupSnapshotStatus, Duration) {
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20}}))
            .expect("group"),
        )
        .await
        .expect("group");
    eventually(WAIT, "group Ready with both members supported", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("shop").await.ok()?.status?;
            let ready = status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            (ready && status.members.len() == 2 && status.members.iter().all(|m| m.supported))
                .then_some(())
        }
    })
    .await;
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), ns);
    let started = std::time::Instant::now();
    snapshots
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop-1"},
                "spec": {"groupName": "shop", "deletionPolicy": "Delete"}}))
            .expect("snapshot"),
        )
        .await
        .expect("snapshot");
    let status = eventually(WAIT, "GroupSnapshot Ready", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("shop-1").await.ok()?.status?;
            assert_ne!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
            (status.phase == GroupSnapshotPhase::Ready).then_some(status)
        }
    })
    .await;
    let took = started.elapsed();
    assert_eq!(
        status.consistency,
        Some(Consistency::FilesystemFrozen),
        "{status:?}"
    );
    assert_eq!(status.member_count, 2);
    for member in &status.members {
        assert!(member.frozen, "{member:?}");
        assert_eq!(member.node, node_name);
    }
    let nodes: Api<NodeSnapshot> = Api::namespaced(client.clone(), ns);
    for n in nodes
        .list(&ListParams::default())
        .await
        .expect("nsnaps")
        .items
    {
        assert_eq!(n.status.expect("status").phase, NodePhase::Released);
    }
    (status, took)
}

/// Mounts the reflink clone of each member (data on XFS, wal on ext4, at `<prefix><claim>`):
/// each is in `pool` and a clean filesystem, and the two hold one point in time of the writer's
/// sequence (it appends to data, then to wal: equal counts, or data ahead by one). Returns the
/// line counts of data and wal.
fn assert_clones_one_point_in_time(
    scratch: &mut agent_support::Scratch,
    status: &tandem::api::GroupSnapshotStatus,
    pool: &Path,
    prefix: &str,
) -> (usize, usize) {
    let mut lines = Vec::new();
    for (claim_name, fs) in [("data", "xfs"), ("wal", "ext4")] {
        let member = status
            .members
            .iter()
            .find(|m| m.claim == claim_name)
            .expect("member");
        let handle = member.snapshot_handle.as_deref().expect("handle");
        let clone = PathBuf::from(handle.strip_prefix("reflink:").expect("reflink handle"));
        assert!(clone.starts_with(pool), "{clone:?} is not in the pool");
        let mnt =
            agent_support::open_snapshot(scratch, &clone, fs, &format!("{prefix}{claim_name}"));
        let sequence = fs::read_to_string(mnt.join("sequence")).expect("sequence");
        lines.push(sequence.lines().count());
        scratch.unmount(&mnt);
    }
    let (data_lines, wal_lines) = (lines[0], lines[1]);
    assert!(
        data_lines > 0,
        "the data snapshot holds none of the writer's lines"
    );
    assert!(
        data_lines == wal_lines || data_lines == wal_lines + 1,
        "data and wal snapshots are not one point in time: {data_lines} vs {wal_lines} lines"
    );
    (data_lines, wal_lines)
}

/// Deletes `shop-1` (deletionPolicy Delete) and waits until it and its NodeSnapshots are gone;
/// the agent pod must have removed every clone from the pool.
async fn delete_shop_snapshot(client: &kube::Client, ns: &str, pool: &Path) {
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), ns);
    let nodes: Api<NodeSnapshot> = Api::namespaced(client.clone(), ns);
    snapshots
        .delete("shop-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "GroupSnapshot and NodeSnapshots gone", || {
        let snapshots = snapshots.clone();
        let nodes = nodes.clone();
        async move {
            let gone = snapshots.get_opt("shop-1").await.ok()?.is_none();
            let nodes_gone = nodes
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty();
            (gone && nodes_gone).then_some(())
        }
    })
    .await;
    let left: Vec<_> = fs::read_dir(pool.join(".tandem-snapshots"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "clones left behind: {left:?}");
}

/// The chart on a real node: the controller becomes Ready through its probes, the agent runs
/// privileged with the chart's host mounts, neither writes colour codes into its log, and a
/// GroupSnapshot of two local volumes (XFS and ext4 images in an XFS reflink pool) that a pod
/// writes to is cut, released and deleted by the pods.
#[tokio::test(flavor = "multi_thread")]
async fn the_chart_on_a_real_node_snapshots_local_volumes() {
    if !require_root() {
        return;
    }
    let cluster = tokio::task::spawn_blocking(shared_cluster)
        .await
        .expect("cluster");
    tokio::task::spawn_blocking(install_chart)
        .await
        .expect("chart");
    let client = client_for(&cluster.kubeconfig).await;
    let node_name = cluster.nodes[0].clone();

    // The controller: Ready means its readiness probe (GET /readyz from the kubelet) passed.
    let deploy = with_cluster(|c| {
        c.kubectl(&[
            "-n",
            RELEASE_NAMESPACE,
            "get",
            "deploy",
            "-l",
            "app.kubernetes.io/component=controller",
            "-o",
            "json",
        ])
    })
    .expect("controller deployment");
    let deploy: serde_json::Value = serde_json::from_str(&deploy).expect("json");
    let deploy = &deploy["items"][0];
    assert_eq!(deploy["status"]["readyReplicas"], 1, "{deploy}");
    let probes = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert!(probes["readinessProbe"]["httpGet"].is_object(), "{probes}");

    // The agent: privileged, on the node, with the chart's host mounts.
    let agent: serde_json::Value = serde_json::from_str(
        &with_cluster(|c| {
            c.kubectl(&[
                "-n",
                RELEASE_NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "json",
            ])
        })
        .expect("agent pods"),
    )
    .expect("json");
    let agent = &agent["items"][0];
    assert_eq!(agent["status"]["phase"], "Running", "{agent}");
    assert_eq!(agent["spec"]["nodeName"], node_name.as_str());
    let container = &agent["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let (kubelet_dir, disks_dir) = with_cluster(|c| {
        (
            c.nodes[0].kubelet_dir.display().to_string(),
            c.nodes[0].disks_dir.display().to_string(),
        )
    });
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    for (path, propagation) in [
        ("/dev", None),
        (kubelet_dir.as_str(), Some("Bidirectional")),
        (disks_dir.as_str(), Some("Bidirectional")),
    ] {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("no mount at {path}: {mounts:?}"));
        if let Some(p) = propagation {
            assert_eq!(mount["mountPropagation"], p, "{mount}");
        }
    }

    // Storage the test makes itself, under the node's shared folder.
    let ns = format!("rn-gs-{}", std::process::id());
    let mut scratch = agent_support::Scratch::new();
    let disks = PathBuf::from(&disks_dir).join(&ns);
    let pool_image = with_cluster(|c| c.nodes[0].images_dir()).join(format!("{ns}-pool.img"));
    scratch.image(&pool_image, 2 << 30);
    let pool_dev = scratch.attach(&pool_image, false);
    scratch.mkfs(&pool_dev, "xfs");
    let pool = disks.join("pool");
    scratch.mount(&pool_dev, &pool, &[]);
    let data = volume(&mut scratch, &pool, &disks.join("data"), "xfs");
    let wal = volume(&mut scratch, &pool, &disks.join("wal"), "ext4");
    let _thaw = ThawOnDrop(vec![data.mount.clone(), wal.mount.clone()]);

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    for (name, v) in [("data", &data), ("wal", &wal)] {
        let pv = format!("{ns}-{name}");
        pvs.create(
            &PostParams::default(),
            &local_volume(&pv, &v.mount.to_string_lossy(), &node_name, &ns, name, &[]),
        )
        .await
        .expect("PV");
        claims
            .create(
                &PostParams::default(),
                &claim(name, Some(&pv), &[("app", "shop")]),
            )
            .await
            .expect("PVC");
    }

    // An application pod writing to both volumes (the writes a freeze must hold).
    with_cluster(|c| start_writer(c, &ns));

    let (status, _) = snapshot_shop(&client, &ns, &node_name).await;
    let nodes: Api<NodeSnapshot> = Api::namespaced(client.clone(), &ns);

    // The agent's real projected token is bound to its node: the chart's admission policy lets it
    // write its own node's NodeSnapshots and refuses another node's.
    let own = nodes
        .list(&ListParams::default())
        .await
        .expect("nsnaps")
        .items[0]
        .metadata
        .name
        .clone()
        .expect("name");
    with_cluster(|c| {
        let agent_pod = c
            .kubectl(&[
                "-n",
                RELEASE_NAMESPACE,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=agent",
                "-o",
                "jsonpath={.items[0].metadata.name}",
            ])
            .expect("agent pod");
        let token = c
            .kubectl_timeout(
                &[
                    "-n",
                    RELEASE_NAMESPACE,
                    "exec",
                    &agent_pod,
                    "--",
                    "cat",
                    "/var/run/secrets/kubernetes.io/serviceaccount/token",
                ],
                EXEC_TIMEOUT,
            )
            .expect("the agent's token");
        apply(
            c,
            &format!("{ns}-foreign"),
            &json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
                "metadata": {"name": "foreign", "namespace": ns},
                "spec": {"nodeName": "elsewhere", "groupSnapshot": "none", "freezeTimeoutSeconds": 10}}),
        );
        let denied = c
            .kubectl_with_token(
                &token,
                &[
                    "-n",
                    &ns,
                    "annotate",
                    "nodesnapshot",
                    "foreign",
                    "probe=agent",
                ],
            )
            .expect_err("the agent's token wrote another node's NodeSnapshot");
        assert!(
            denied.contains("of node elsewhere"),
            "not refused by the node restriction: {denied}"
        );
        c.kubectl_with_token(
            &token,
            &["-n", &ns, "annotate", "nodesnapshot", &own, "probe=agent"],
        )
        .unwrap_or_else(|e| {
            panic!("the agent's token may not write its own node's NodeSnapshot: {e}")
        });
        let _ = c.kubectl(&[
            "-n",
            &ns,
            "delete",
            "nodesnapshot",
            "foreign",
            "--wait=false",
        ]);
    });

    // Thawed: the writer goes on (an exec with a host-side timeout reads its progress twice).
    let count = |file: &str| {
        with_cluster(|c| {
            c.kubectl_timeout(
                &[
                    "-n",
                    &ns,
                    "exec",
                    "writer",
                    "--",
                    "/bin/sh",
                    "-c",
                    &format!("wc -l < {file}"),
                ],
                EXEC_TIMEOUT,
            )
        })
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(0)
    };
    let before = count("/data/sequence");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        count("/data/sequence") > before,
        "the writer is stuck after the snapshot"
    );

    // The clones are the agent pod's work, in the pool, and each is a clean filesystem with the
    // writer's sequence in it; the data clone and the wal clone are one point in time.
    let (data_lines, wal_lines) = assert_clones_one_point_in_time(&mut scratch, &status, &pool, "");
    eprintln!(
        "[chart] cut in a freeze window of {:?} ms: data {data_lines} lines, wal {wal_lines} lines",
        status.freeze_window_millis
    );

    // Both binaries log plain text in a container (no ANSI colour codes).
    for selector in [
        "app.kubernetes.io/component=controller",
        "app.kubernetes.io/component=agent",
    ] {
        let logs = with_cluster(|c| {
            c.kubectl_timeout(
                &[
                    "-n",
                    RELEASE_NAMESPACE,
                    "logs",
                    "-l",
                    selector,
                    "--tail=200",
                ],
                EXEC_TIMEOUT,
            )
        })
        .expect("logs");
        assert!(!logs.trim().is_empty(), "no logs from {selector}");
        assert!(
            !logs.contains('\u{1b}'),
            "{selector} writes ANSI escape codes into its log:\n{}",
            logs.lines().take(5).collect::<Vec<_>>().join("\n")
        );
    }

    // deletionPolicy Delete: the agent pod removes the clones with the GroupSnapshot.
    delete_shop_snapshot(&client, &ns, &pool).await;

    // The writer goes before the volumes (the kubelet's bind mounts hold the loop devices).
    with_cluster(|c| {
        let _ = c.kubectl_timeout(
            &[
                "-n",
                &ns,
                "delete",
                "pod",
                "writer",
                "--grace-period=0",
                "--force",
                "--wait=true",
            ],
            Duration::from_secs(60),
        );
    });
    let pods_dir = format!("{kubelet_dir}/pods/");
    eventually(WAIT, "the kubelet unmounted the writer's volumes", || {
        let pods_dir = pods_dir.clone();
        let ns = ns.clone();
        async move {
            let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
            let held = info.lines().any(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.starts_with(&pods_dir) && m.contains(&ns))
            });
            (!held).then_some(())
        }
    })
    .await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    for name in ["data", "wal"] {
        let _ = pvs
            .delete(&format!("{ns}-{name}"), &DeleteParams::default())
            .await;
    }
}

/// A claim's name, the mount its local PV points at, and the claim's labels.
type Published<'a> = (&'a str, &'a Path, &'a [(&'a str, &'a str)]);

/// Publishes mounted volumes as local PVs on the node, with claims bound to them.
async fn publish(client: &kube::Client, ns: &str, node_name: &str, volumes: &[Published<'_>]) {
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns);
    for (name, mount, labels) in volumes {
        let pv = format!("{ns}-{name}");
        pvs.create(
            &PostParams::default(),
            &local_volume(&pv, &mount.to_string_lossy(), node_name, ns, name, &[]),
        )
        .await
        .expect("PV");
        claims
            .create(&PostParams::default(), &claim(name, Some(&pv), labels))
            .await
            .expect("PVC");
    }
}

/// SQL run in a pod of cluster `c` with psql over its socket, behind a host-side timeout.
fn psql_in(c: &node::Cluster, ns: &str, pod: &str, sql: &str) -> Result<String, String> {
    c.kubectl_timeout(
        &[
            "-n", ns, "exec", pod, "--", "psql", "-qAt", "-h", "/tmp", "-U", "postgres", "-c", sql,
        ],
        EXEC_TIMEOUT,
    )
}

/// The chart on each node of a cluster whose nodes have folders of their own (the test harness
/// runs every node's kubelet on one host): one release per node, its agent pinned there and
/// pointed at that node's folders. The first release has the controller, the CRDs and the
/// restore StorageClass; the others only an agent (no controller, no finalizer guard: it lets
/// only its own release's controller through).
fn install_chart_per_node(c: &node::Cluster) {
    let chart = repo_root().join("charts/tandem").display().to_string();
    for (i, n) in c.nodes.iter().enumerate() {
        let release = if i == 0 {
            RELEASE.to_string()
        } else {
            format!("{RELEASE}-n{i}")
        };
        let mut args = vec![
            "install".to_string(),
            release,
            chart.clone(),
            "--namespace".into(),
            RELEASE_NAMESPACE.into(),
            "--create-namespace".into(),
            "--set".into(),
            format!("agent.kubeletDir={}", n.kubelet_dir.display()),
            "--set".into(),
            format!("agent.stateDir={}", n.state_dir.display()),
            "--set".into(),
            format!("agent.extraHostPaths={{{}}}", n.disks_dir.display()),
            "--set".into(),
            format!("agent.nodeSelector.kubernetes\\.io/hostname={}", n.name),
            "--set".into(),
            "logLevel=info\\,tandem=debug".into(),
            "--wait".into(),
            "--timeout=180s".into(),
        ];
        if i > 0 {
            args.extend([
                "--set".into(),
                "controller.replicas=0,crds.install=false,restore.storageClass.create=false,controller.finalizerGuard.enabled=false,rbac.aggregateToDefaultRoles=false,metrics.service.enabled=false".into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.helm(&args).unwrap_or_else(|e| {
            panic!(
                "helm install for {}: {e}\n{}",
                n.name,
                c.kubectl(&["get", "pods", "-A", "-o", "wide"])
                    .unwrap_or_default()
            )
        });
    }
}

/// A reflink pool (a loop-backed XFS) under a node's shared folder, where that node's agent
/// sees the images of its volumes and makes their snapshots and clones.
fn pool_on(scratch: &mut agent_support::Scratch, n: &node::Node, ns: &str) -> PathBuf {
    let image = n.images_dir().join(format!("{ns}-pool.img"));
    scratch.image(&image, 1 << 30);
    let dev = scratch.attach(&image, false);
    scratch.mkfs(&dev, "xfs");
    let pool = n.disks_dir.join(ns).join("pool");
    scratch.mount(&dev, &pool, &[]);
    pool
}

fn wait_ready(c: &node::Cluster, ns: &str, pod: &str) {
    c.kubectl_timeout(
        &[
            "-n",
            ns,
            "wait",
            "--for=condition=Ready",
            &format!("pod/{pod}"),
            "--timeout=90s",
        ],
        Duration::from_secs(100),
    )
    .unwrap_or_else(|e| {
        panic!(
            "pod {pod} not Ready: {e}\n{}\n{}",
            c.kubectl(&["-n", ns, "describe", "pod", pod])
                .unwrap_or_default(),
            c.kubectl(&["-n", ns, "logs", pod]).unwrap_or_default()
        )
    });
}

fn pinned(mut pod: serde_json::Value, node: &str) -> serde_json::Value {
    pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    pod
}

/// PostgreSQL under pgbench load with its data on a claim of one node and its WAL on a claim of
/// another, group-snapshotted (a cut on each node, one point in time), restored with a
/// GroupRestore to new claims (a clone on each node, both claims bound together), started on
/// them: it recovers, and pgbench's balance invariant holds (sum of abalance = bbalance =
/// tbalance = sum of history.delta). Deleting the restored claims then deletes their clones.
///
/// One pod cannot mount local volumes of two nodes; this harness runs both nodes' kubelets on one
/// host, so PostgreSQL runs on node 0 with its data claim mounted by that node's kubelet and its
/// WAL, a volume of node 1, reached through a host folder: for the snapshot the WAL volume's
/// mount, for the restore the mount node 1's kubelet made of the restored WAL claim for a pod
/// there. Each claim is thus a volume of its own node to tandem (agent, NodeSnapshot, clone and
/// PV per node), and each restored claim is mounted by a real kubelet from the PV tandem made.
#[test]
fn postgres_on_two_nodes_under_pgbench_group_restore_recovers_balanced() {
    if !require_root() {
        return;
    }
    let cluster = node::Cluster::start(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(two_node_restore(&cluster));
}

async fn two_node_restore(c: &node::Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let started = std::time::Instant::now();
    n0.import(&images()["postgres"]);
    install_chart_per_node(c);
    eprintln!(
        "[pg2] PostgreSQL image imported, the chart installed on both nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let client = client_for(&c.plane.kubeconfig).await;
    let ns = format!("rn-pg2-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");

    // Data (XFS) on node 0, WAL (ext4) on node 1, each in a reflink pool of its node.
    let mut scratch = agent_support::Scratch::new();
    let pool0 = pool_on(&mut scratch, n0, &ns);
    let pool1 = pool_on(&mut scratch, n1, &ns);
    let data = volume(
        &mut scratch,
        &pool0,
        &n0.disks_dir.join(&ns).join("pgdata"),
        "xfs",
    );
    let wal = volume(
        &mut scratch,
        &pool1,
        &n1.disks_dir.join(&ns).join("pgwal"),
        "ext4",
    );
    let _thaw = ThawOnDrop(vec![data.mount.clone(), wal.mount.clone()]);
    publish(
        &client,
        &ns,
        &n0.name,
        &[("pgdata", &data.mount, &[("app", "pg")])],
    )
    .await;
    publish(
        &client,
        &ns,
        &n1.name,
        &[("pgwal", &wal.mount, &[("app", "pg")])],
    )
    .await;

    let wal_path = wal.mount.display().to_string();
    apply(
        c,
        &format!("{ns}-pg"),
        &postgres_pod_with(
            &ns,
            "pg",
            PodVolume::Claim("pgdata"),
            PodVolume::HostPath(&wal_path),
            true,
        ),
    );
    wait_ready(c, &ns, "pg");
    let pg_ip = c
        .kubectl(&[
            "-n",
            &ns,
            "get",
            "pod",
            "pg",
            "-o",
            "jsonpath={.status.podIP}",
        ])
        .expect("pod IP");
    // pgbench beside PostgreSQL (pods reach pods of their own node only).
    apply(
        c,
        &format!("{ns}-bench"),
        &pinned(pgbench_pod(&ns, &pg_ip), &n0.name),
    );
    let history = |pod: &str| {
        psql_in(c, &ns, pod, "select count(*) from pgbench_history")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    eventually(WAIT, "pgbench running", || {
        let n = history("pg");
        async move { n.filter(|n| *n > 50) }
    })
    .await;

    // The group snapshot under load: a cut on each node.
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), &ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "pg"},
                "spec": {"selector": {"matchLabels": {"app": "pg"}}, "freezeTimeoutSeconds": 20}}))
            .expect("group"),
        )
        .await
        .expect("group");
    eventually(WAIT, "group Ready", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("pg").await.ok()?.status?;
            (status.members.len() == 2
                && status.members.iter().all(|m| m.supported)
                && status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True"))
            .then_some(())
        }
    })
    .await;
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), &ns);
    snapshots
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "pg-1"},
                "spec": {"groupName": "pg", "deletionPolicy": "Delete"}}))
            .expect("snapshot"),
        )
        .await
        .expect("snapshot");
    let status = eventually(WAIT, "GroupSnapshot Ready", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("pg-1").await.ok()?.status?;
            assert_ne!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
            (status.phase == GroupSnapshotPhase::Ready).then_some(status)
        }
    })
    .await;
    assert_eq!(
        status.consistency,
        Some(Consistency::FilesystemFrozen),
        "{status:?}"
    );
    assert!(status.members.iter().all(|m| m.frozen), "{status:?}");
    assert_eq!(status.nodes.len(), 2, "a cut on each node: {status:?}");
    let at_snapshot = history("pg").expect("history");
    eventually(WAIT, "pgbench goes on after the snapshot", || {
        let n = history("pg");
        async move { n.filter(|n| *n > at_snapshot + 50) }
    })
    .await;

    // The restore, to new claims: a clone on each node, both claims bound together.
    let restores: Api<GroupRestore> = Api::namespaced(client.clone(), &ns);
    let applied = std::time::Instant::now();
    restores
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "pg-back"}, "spec": {
                "source": {"groupSnapshotName": "pg-1"},
                "mode": "NewClaims",
                "newClaims": {"nameTemplate": "{claim}-restored", "labels": {"app": "pg-restored"}}
            }}))
            .expect("restore"),
        )
        .await
        .expect("GroupRestore");
    let restored = eventually(Duration::from_secs(180), "GroupRestore Completed", || {
        let restores = restores.clone();
        async move {
            let status = restores.get("pg-back").await.ok()?.status?;
            assert_ne!(status.phase, RestorePhase::Failed, "{status:?}");
            (status.phase == RestorePhase::Completed).then_some(status)
        }
    })
    .await;
    let to_bound = applied.elapsed();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for (source, node, fs) in [("pgdata", n0, "xfs"), ("pgwal", n1, "ext4")] {
        let member = restored
            .members
            .iter()
            .find(|m| m.source_claim == source)
            .unwrap_or_else(|| panic!("no member {source}: {restored:?}"));
        assert_eq!(member.claim, format!("{source}-restored"));
        assert_eq!(member.node, node.name, "the clone is on the member's node");
        let claim = claims.get(&member.claim).await.expect("restored claim");
        let annotations = claim.metadata.annotations.clone().unwrap_or_default();
        assert_eq!(
            annotations
                .get("tandem.dev/restored-from")
                .map(String::as_str),
            Some(format!("{ns}/pg-1").as_str()),
            "{annotations:?}"
        );
        assert_eq!(
            annotations
                .get("tandem.dev/consistency")
                .map(String::as_str),
            Some("FilesystemFrozen")
        );
        let claim_status = claim.status.as_ref().and_then(|s| s.phase.as_deref());
        assert_eq!(claim_status, Some("Bound"));
        let pv = pvs
            .get(&member.persistent_volume)
            .await
            .expect("restored PV");
        let spec = pv.spec.clone().expect("PV spec");
        let claim_ref = spec.claim_ref.clone().expect("pre-bound");
        assert_eq!(claim_ref.uid, claim.metadata.uid, "pre-bound to this claim");
        let local = spec.local.clone().expect("a local PV");
        assert_eq!(local.fs_type.as_deref(), Some(fs), "{spec:?}");
        if fs == "xfs" {
            assert_eq!(spec.mount_options, Some(vec!["nouuid".to_string()]));
        }
        let affinity = serde_json::to_value(&spec.node_affinity).expect("json");
        assert!(
            affinity.to_string().contains(&format!("\"{}\"", node.name)),
            "{affinity}"
        );
        assert_eq!(
            pv.metadata
                .annotations
                .unwrap_or_default()
                .get("pv.kubernetes.io/provisioned-by")
                .map(String::as_str),
            Some("tandem.dev/restore")
        );
    }
    eprintln!(
        "[pg2] restored to new claims on {} and {} in {:.1} s (apply to both Bound)",
        n0.name,
        n1.name,
        to_bound.as_secs_f64()
    );

    // The restored WAL claim, mounted by node 1's kubelet for a pod there...
    let holder = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "wal-holder", "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "hold", "image": images()["tandem_ref"], "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "test -d /wal/pg && sleep 3600"],
                "volumeMounts": [{"name": "wal", "mountPath": "/wal"}]}],
            "volumes": [{"name": "wal", "persistentVolumeClaim": {"claimName": "pgwal-restored"}}]
        }
    });
    apply(c, &format!("{ns}-holder"), &holder);
    wait_ready(c, &ns, "wal-holder");
    let holder_uid = c
        .kubectl(&[
            "-n",
            &ns,
            "get",
            "pod",
            "wal-holder",
            "-o",
            "jsonpath={.metadata.uid} {.spec.nodeName}",
        ])
        .expect("holder");
    let (holder_uid, holder_node) = holder_uid.split_once(' ').expect("uid and node");
    assert_eq!(holder_node, n1.name);
    let wal_pv = &restored
        .members
        .iter()
        .find(|m| m.source_claim == "pgwal")
        .expect("wal")
        .persistent_volume;
    let restored_wal = n1
        .kubelet_dir
        .join("pods")
        .join(holder_uid)
        .join("volumes/kubernetes.io~local-volume")
        .join(wal_pv);
    assert!(
        restored_wal.join("pg").is_dir(),
        "the kubelet of {} mounted the restored WAL at {}",
        n1.name,
        restored_wal.display()
    );
    // ...and PostgreSQL on node 0 on the restored data claim and that WAL: crash recovery.
    let restored_wal = restored_wal.display().to_string();
    apply(
        c,
        &format!("{ns}-restored"),
        &postgres_pod_with(
            &ns,
            "restored",
            PodVolume::Claim("pgdata-restored"),
            PodVolume::HostPath(&restored_wal),
            false,
        ),
    );
    wait_ready(c, &ns, "restored");
    let recovered = history("restored").expect("history of the restored database");
    assert!(
        recovered > 0,
        "the restored database has no pgbench history"
    );
    let balanced = psql_in(c, &ns, "restored", PGBENCH_BALANCED).expect("balance check");
    assert_eq!(
        balanced.trim(),
        "t",
        "pgbench's balances do not add up in the restored database"
    );
    eprintln!(
        "[pg2] snapshot under load across two nodes: {at_snapshot} transactions in history around the cut, {recovered} recovered on the restored claims, balances intact; freeze window {:?} ms",
        status.freeze_window_millis
    );

    // Pods first (the kubelets' mounts hold the clones), then the restored claims: tandem, the
    // external deleter, deletes their clones on both nodes and the PVs.
    let _ = c.kubectl_timeout(
        &[
            "-n",
            &ns,
            "delete",
            "pod",
            "--all",
            "--grace-period=0",
            "--force",
            "--wait=true",
        ],
        Duration::from_secs(60),
    );
    let label = format!("{GROUP_RESTORE_LABEL}=pg-back");
    claims
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&label),
        )
        .await
        .expect("delete restored claims");
    eventually(WAIT, "the restored PVs deleted by tandem", || {
        let pvs = pvs.clone();
        let label = label.clone();
        async move {
            let left = pvs.list(&ListParams::default().labels(&label)).await.ok()?;
            left.items.is_empty().then_some(())
        }
    })
    .await;
    for pool in [&pool0, &pool1] {
        let clones = fs::read_dir(pool.join(".tandem-restores"))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(clones, 0, "clones left in {}", pool.display());
    }
    restores
        .delete("pg-back", &DeleteParams::default())
        .await
        .expect("delete GroupRestore");
    snapshots
        .delete("pg-1", &DeleteParams::default())
        .await
        .expect("delete");
    eventually(WAIT, "GroupSnapshot gone", || {
        let snapshots = snapshots.clone();
        async move {
            snapshots
                .get_opt("pg-1")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    for name in ["pgdata", "pgwal"] {
        let _ = pvs
            .delete(&format!("{ns}-{name}"), &DeleteParams::default())
            .await;
    }
}

/// More than one real node: each Ready, each running a pod the scheduler put there, and the API
/// server reaching each kubelet (exec) through that node's own network namespace.
#[test]
fn two_real_nodes_run_pods_of_their_own() {
    if !require_root() {
        return;
    }
    let image = images()["tandem_ref"].clone();
    // Its own cluster, in this thread (its processes die with it).
    let cluster = node::Cluster::start(2);
    for n in &cluster.nodes {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("on-{}", n.name), "namespace": "default"},
            "spec": {
                "terminationGracePeriodSeconds": 0,
                "nodeSelector": {"kubernetes.io/hostname": n.name},
                "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                                "command": ["/bin/sh", "-c", "sleep 3600"]}]
            }
        });
        apply(&cluster, &format!("on-{}", n.name), &pod);
    }
    for n in &cluster.nodes {
        let pod = format!("on-{}", n.name);
        cluster
            .kubectl_timeout(
                &[
                    "wait",
                    "--for=condition=Ready",
                    &format!("pod/{pod}"),
                    "--timeout=60s",
                ],
                Duration::from_secs(70),
            )
            .unwrap_or_else(|e| panic!("{pod} Ready: {e}"));
        let placed = cluster
            .kubectl(&[
                "get",
                "pod",
                &pod,
                "-o",
                "jsonpath={.spec.nodeName} {.status.hostIP}",
            ])
            .expect("pod");
        assert_eq!(placed, format!("{} {}", n.name, n.address));
        let out = cluster
            .kubectl_timeout(
                &["exec", &pod, "--", "cat", "/etc/debian_version"],
                EXEC_TIMEOUT,
            )
            .unwrap_or_else(|e| panic!("exec into {pod}: {e}"));
        assert!(out.starts_with("12."), "{out}");
    }
}

/// Whether the one member of a group is supported: the group becomes Ready, or (given 20 s once
/// its claim is bound) its member stays refused with a reason.
async fn member_supported(groups: &Api<tandem::api::ConsistencyGroup>, name: &str) -> bool {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = groups.get(name).await.ok().and_then(|g| g.status) {
            if status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
            {
                return true;
            }
            let refused = status
                .members
                .first()
                .and_then(|m| m.reason.as_deref())
                .is_some_and(|r| r != "ClaimNotBound");
            if refused && tokio::time::Instant::now() > deadline {
                return false;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline + WAIT,
            "group {name} never resolved its member"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The first fault: a local volume whose loop image lives where the agent pod cannot see
/// it (`agent.extraHostPaths` lists where the volumes are mounted, not the pool holding their
/// images). Today the group says every member is supported and the snapshot then fails with
/// `statfs <image>: No such file or directory`; the user must be told which value to set.
#[tokio::test(flavor = "multi_thread")]
async fn a_volume_whose_image_the_agent_cannot_see_names_the_value_to_set() {
    if !require_root() {
        return;
    }
    let cluster = tokio::task::spawn_blocking(shared_cluster)
        .await
        .expect("cluster");
    tokio::task::spawn_blocking(install_chart)
        .await
        .expect("chart");
    let client = client_for(&cluster.kubeconfig).await;
    let node_name = cluster.nodes[0].clone();
    let (node_dir, disks_dir, images_dir) = with_cluster(|c| {
        let n = &c.nodes[0];
        (n.dir.clone(), n.disks_dir.clone(), n.images_dir())
    });
    let ns = format!("rn-hidden-{}", std::process::id());
    let mut scratch = agent_support::Scratch::new();
    // The pool is mounted on the host only: not under the chart's host paths.
    let pool_image = images_dir.join(format!("{ns}-pool.img"));
    scratch.image(&pool_image, 1 << 30);
    let pool_dev = scratch.attach(&pool_image, false);
    scratch.mkfs(&pool_dev, "xfs");
    let pool = node_dir.join("hidden").join(&ns);
    scratch.mount(&pool_dev, &pool, &[]);
    let data = volume(
        &mut scratch,
        &pool,
        &disks_dir.join(&ns).join("data"),
        "xfs",
    );
    let _thaw = ThawOnDrop(vec![data.mount.clone()]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    publish(
        &client,
        &ns,
        &node_name,
        &[("data", &data.mount, &[("app", "hidden")])],
    )
    .await;
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), &ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "hidden"},
                "spec": {"selector": {"matchLabels": {"app": "hidden"}}, "freezeTimeoutSeconds": 10}}))
            .expect("group"),
        )
        .await
        .expect("group");
    let member_supported = member_supported(&groups, "hidden").await;
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), &ns);
    let mut said = String::new();
    if member_supported {
        snapshots
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "hidden-1"},
                    "spec": {"groupName": "hidden", "deletionPolicy": "Delete"}}))
                .expect("snapshot"),
            )
            .await
            .expect("snapshot");
        let status = eventually(WAIT, "the GroupSnapshot ended", || {
            let snapshots = snapshots.clone();
            async move {
                let status = snapshots.get("hidden-1").await.ok()?.status?;
                matches!(
                    status.phase,
                    GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
                )
                .then_some(status)
            }
        })
        .await;
        said.push_str(&serde_json::to_string(&status).expect("json"));
        let nodes: Api<NodeSnapshot> = Api::namespaced(client.clone(), &ns);
        for n in nodes
            .list(&ListParams::default())
            .await
            .expect("nsnaps")
            .items
        {
            said.push_str(&serde_json::to_string(&n.status).expect("json"));
        }
        let _ = snapshots.delete("hidden-1", &DeleteParams::default()).await;
    }
    let group = groups.get("hidden").await.expect("group");
    said.push_str(&serde_json::to_string(&group.status).expect("json"));
    assert!(
        said.contains("extraHostPaths"),
        "nothing tells the user to add the pool's folder to agent.extraHostPaths:\n{said}"
    );
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let _ = pvs
        .delete(&format!("{ns}-data"), &DeleteParams::default())
        .await;
}

/// M3: in the agent's container `/` is an overlay, so guarding "the root filesystem" there
/// protects nothing on the host. A local PV at the kubelet's own folder (here a test-made
/// filesystem, in a pool the agent can see, so nothing else stops the cut) must be refused, and
/// the kubelet's filesystem never frozen.
#[tokio::test(flavor = "multi_thread")]
async fn the_kubelets_filesystem_is_never_frozen() {
    if !require_root() {
        return;
    }
    let cluster = tokio::task::spawn_blocking(shared_cluster)
        .await
        .expect("cluster");
    tokio::task::spawn_blocking(install_chart)
        .await
        .expect("chart");
    let client = client_for(&cluster.kubeconfig).await;
    let node_name = cluster.nodes[0].clone();
    let kubelet_dir = with_cluster(|c| c.nodes[0].kubelet_dir.clone());
    let _thaw = ThawOnDrop(vec![kubelet_dir.clone()]);
    let ns = format!("rn-m3-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    publish(
        &client,
        &ns,
        &node_name,
        &[("kubelet", &kubelet_dir, &[("app", "m3")])],
    )
    .await;
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), &ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "m3"},
                "spec": {"selector": {"matchLabels": {"app": "m3"}}, "freezeTimeoutSeconds": 10}}))
            .expect("group"),
        )
        .await
        .expect("group");
    let supported = member_supported(&groups, "m3").await;
    if supported {
        let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), &ns);
        snapshots
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "m3-1"},
                    "spec": {"groupName": "m3", "deletionPolicy": "Delete"}}))
                .expect("snapshot"),
            )
            .await
            .expect("snapshot");
        let status = eventually(WAIT, "the GroupSnapshot ended", || {
            let snapshots = snapshots.clone();
            async move {
                let status = snapshots.get("m3-1").await.ok()?.status?;
                matches!(
                    status.phase,
                    GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
                )
                .then_some(status)
            }
        })
        .await;
        let _ = snapshots.delete("m3-1", &DeleteParams::default()).await;
        eventually(WAIT, "GroupSnapshot gone", || {
            let snapshots = snapshots.clone();
            async move {
                snapshots
                    .get_opt("m3-1")
                    .await
                    .ok()?
                    .is_none()
                    .then_some(())
            }
        })
        .await;
        assert!(
            status.phase == GroupSnapshotPhase::Failed && status.members.iter().all(|m| !m.frozen),
            "the agent froze (or cut) the kubelet's filesystem: {status:?}"
        );
        // Failed because the agent refused, not because no agent answered.
        let message = status.message.clone().unwrap_or_default();
        assert!(
            message.contains("refusing to freeze") && message.contains("kubelet"),
            "the snapshot failed for another reason than the kubelet guard: {message}"
        );
    }
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let _ = pvs
        .delete(&format!("{ns}-kubelet"), &DeleteParams::default())
        .await;
}

// ---------------------------------------------------------------------------------------------
// `kubectl apply -f deploy/` on a real node.

/// The host paths deploy/tandem.yaml carries (the chart's defaults: `agent.kubeletDir`,
/// `agent.stateDir`, `agent.extraHostPaths`) and the test node's folders that replace them. A test
/// node cannot use the defaults: other runs share the host, and the host's own /var/lib/kubelet
/// is not the node's.
fn deploy_paths_on(n: &node::Node) -> [(&'static str, String); 3] {
    [
        ("/var/lib/kubelet", n.kubelet_dir.display().to_string()),
        ("/var/lib/tandem", n.state_dir.display().to_string()),
        ("/mnt/disks", n.disks_dir.display().to_string()),
    ]
}

/// deploy/ as committed, with only the three host paths of tandem.yaml replaced by the node's
/// (namespace.yaml and crds.yaml are copied byte for byte), written to `out`. Asserts that this is
/// the only change: mapping the node's paths back gives the committed file exactly, and the result
/// is what the chart renders with those three values set.
fn deploy_for_node(c: &node::Cluster, out: &Path) -> Vec<String> {
    let deploy = repo_root().join("deploy");
    fs::create_dir_all(out).expect("deploy copy");
    let mut names: Vec<String> = fs::read_dir(&deploy)
        .expect("deploy/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["crds.yaml", "namespace.yaml", "tandem.yaml"]);
    for name in ["crds.yaml", "namespace.yaml"] {
        fs::copy(deploy.join(name), out.join(name)).expect("copy");
    }
    let committed = fs::read_to_string(deploy.join("tandem.yaml")).expect("tandem.yaml");
    let paths = deploy_paths_on(&c.nodes[0]);
    let mut on_node = committed.clone();
    for (default, node_path) in &paths {
        assert!(
            committed.contains(default),
            "deploy/tandem.yaml lost {default}"
        );
        assert!(!committed.contains(node_path.as_str()));
        on_node = on_node.replace(default, node_path);
    }
    let mut back = on_node.clone();
    for (default, node_path) in &paths {
        back = back.replace(node_path.as_str(), default);
    }
    assert_eq!(back, committed, "more than the host paths changed");
    let rendered = c
        .helm(&[
            "template",
            RELEASE,
            &repo_root().join("charts/tandem").display().to_string(),
            "--namespace",
            RELEASE_NAMESPACE,
            "--set",
            "crds.install=false",
            "--set",
            &format!("agent.kubeletDir={}", paths[0].1),
            "--set",
            &format!("agent.stateDir={}", paths[1].1),
            "--set",
            &format!("agent.extraHostPaths={{{}}}", paths[2].1),
        ])
        .expect("helm template");
    let body: String = on_node
        .split_inclusive('\n')
        .skip_while(|l| l.starts_with("# Generated") || l.starts_with("# release"))
        .collect();
    assert_eq!(
        body, rendered,
        "deploy/tandem.yaml with the node's paths is not the chart with those values"
    );
    fs::write(out.join("tandem.yaml"), &on_node).expect("tandem.yaml");
    let changed: Vec<String> = on_node
        .lines()
        .zip(committed.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("{} -> {}", b.trim(), a.trim()))
        .collect();
    assert_eq!(on_node.lines().count(), committed.lines().count());
    changed
}

/// The generation of every object in a manifest folder (a spec change bumps it).
fn generations(c: &node::Cluster, dir: &str) -> String {
    c.kubectl(&[
        "get",
        "-f",
        dir,
        "-o",
        "jsonpath={range .items[*]}{.kind}/{.metadata.name} {.metadata.generation} {.metadata.uid}{\"\\n\"}{end}",
    ])
    .expect("get deploy objects")
}

/// tandem's pods anywhere in the cluster.
fn tandem_pods(c: &node::Cluster) -> String {
    c.kubectl(&[
        "get",
        "pods",
        "-A",
        "-l",
        "app.kubernetes.io/name=tandem",
        "-o",
        "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name}{\"\\n\"}{end}",
    ])
    .expect("pods")
}

/// `kubectl apply -f deploy/` on a real node of its own cluster (helm's release in the shared one
/// would collide): the committed manifests with only the three host paths made the node's (see
/// deploy_for_node). The controller becomes Ready through its probes, the agent pod runs
/// privileged with the node's host paths, a GroupSnapshot of two local volumes a pod writes to is
/// cut (Ready, FilesystemFrozen), and deleted with its clones by the pods; a second apply changes
/// nothing; the README's uninstall (`kubectl delete -f deploy/tandem.yaml`) leaves no tandem pod
/// and keeps the CRDs, and `kubectl delete -f deploy/` then removes everything else.
#[test]
fn kubectl_apply_of_deploy_on_a_real_node_snapshots_and_uninstalls() {
    if !require_root() {
        return;
    }
    let cluster = node::Cluster::start(1);
    let c = &cluster;
    let n = &c.nodes[0];
    let dir = c.root.join("deploy");
    let changed = deploy_for_node(c, &dir);
    eprintln!(
        "[deploy] deploy/tandem.yaml with the node's host paths ({} lines changed):\n  {}",
        changed.len(),
        changed.join("\n  ")
    );
    let dir_arg = dir.display().to_string();

    let started = std::time::Instant::now();
    let first = c
        .kubectl(&["apply", "-f", &dir_arg])
        .expect("kubectl apply");
    assert!(
        first.contains("daemonset.apps/tandem-agent created"),
        "{first}"
    );
    for workload in ["deployment/tandem-controller", "daemonset/tandem-agent"] {
        c.kubectl_timeout(
            &[
                "-n",
                RELEASE_NAMESPACE,
                "rollout",
                "status",
                workload,
                "--timeout=120s",
            ],
            Duration::from_secs(130),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{workload} not ready: {e}\n{}",
                c.kubectl(&["get", "pods", "-A", "-o", "wide"])
                    .unwrap_or_default()
            )
        });
    }
    eprintln!(
        "[deploy] applied and rolled out in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // The controller: Ready through its readiness probe (GET /readyz from the kubelet).
    let deploy: serde_json::Value = serde_json::from_str(
        &c.kubectl(&[
            "-n",
            RELEASE_NAMESPACE,
            "get",
            "deployment",
            "tandem-controller",
            "-o",
            "json",
        ])
        .expect("deployment"),
    )
    .expect("json");
    assert_eq!(deploy["status"]["readyReplicas"], 1, "{deploy}");
    let controller = &deploy["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(controller["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(controller["livenessProbe"]["httpGet"]["path"], "/healthz");

    // The agent: running privileged on the node, its host mounts the node's folders.
    let agent: serde_json::Value = serde_json::from_str(
        &c.kubectl(&[
            "-n",
            RELEASE_NAMESPACE,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/component=agent",
            "-o",
            "json",
        ])
        .expect("agent pods"),
    )
    .expect("json");
    let items = agent["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "one agent pod per node");
    let agent = &items[0];
    assert_eq!(agent["status"]["phase"], "Running", "{agent}");
    assert_eq!(agent["spec"]["nodeName"], n.name.as_str());
    let container = &agent["spec"]["containers"][0];
    assert_eq!(container["securityContext"]["privileged"], true);
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    for (path, propagation) in [
        (n.kubelet_dir.display().to_string(), Some("Bidirectional")),
        (n.disks_dir.display().to_string(), Some("Bidirectional")),
        (n.state_dir.display().to_string(), None),
        ("/host".to_string(), None),
    ] {
        let mount = mounts
            .iter()
            .find(|m| m["mountPath"] == path.as_str())
            .unwrap_or_else(|| panic!("no mount at {path}: {mounts:?}"));
        assert_eq!(mount["mountPropagation"].as_str(), propagation, "{mount}");
    }
    assert!(
        n.state_dir.is_dir(),
        "the agent's journal folder was not made on the node"
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut scratch = agent_support::Scratch::new();
    runtime.block_on(snapshot_with_deploy(c, &mut scratch));

    // A second apply, after the controller and the agent have worked: nothing changes.
    let before = generations(c, &dir_arg);
    let second = c.kubectl(&["apply", "-f", &dir_arg]).expect("second apply");
    let changed: Vec<&str> = second
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with(" unchanged"))
        .collect();
    assert!(changed.is_empty(), "a second apply changed: {changed:?}");
    assert_eq!(generations(c, &dir_arg), before, "objects changed");
    // kubectl diff (a server-side dry run): exit 0 means no difference.
    c.kubectl(&["diff", "-f", &dir_arg])
        .unwrap_or_else(|e| panic!("kubectl diff after two applies: {e}"));

    // The README's uninstall: tandem.yaml only. No tandem pod is left; the CRDs (and so every
    // group snapshot) stay.
    let started = std::time::Instant::now();
    c.kubectl_timeout(
        &[
            "delete",
            "-f",
            &dir.join("tandem.yaml").display().to_string(),
        ],
        Duration::from_secs(120),
    )
    .expect("kubectl delete -f tandem.yaml");
    runtime.block_on(eventually(WAIT, "no tandem pod left", || async {
        tandem_pods(c).trim().is_empty().then_some(())
    }));
    eprintln!(
        "[deploy] uninstalled (no tandem pod) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let crds = c.kubectl(&["get", "crd", "-o", "name"]).expect("crds");
    for crd in [
        "consistencygroups.tandem.dev",
        "groupsnapshots.tandem.dev",
        "nodesnapshots.tandem.dev",
    ] {
        assert!(crds.contains(crd), "{crd} went with tandem.yaml: {crds}");
    }

    // `kubectl delete -f deploy/`: the rest (namespace, CRDs) goes too, nothing of tandem stays.
    let started = std::time::Instant::now();
    c.kubectl_timeout(
        &["delete", "-f", &dir_arg, "--ignore-not-found"],
        Duration::from_secs(120),
    )
    .expect("kubectl delete -f deploy/");
    eprintln!(
        "[deploy] kubectl delete -f deploy/ (namespace and CRDs) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let left = c
        .kubectl(&[
            "get",
            "crd,clusterroles,clusterrolebindings,validatingadmissionpolicies,validatingadmissionpolicybindings",
            "-l",
            "app.kubernetes.io/part-of=tandem",
            "-o",
            "name",
        ])
        .expect("left");
    assert!(left.trim().is_empty(), "left behind: {left}");
    assert!(tandem_pods(c).trim().is_empty());
    assert!(
        c.kubectl(&["get", "namespace", RELEASE_NAMESPACE]).is_err(),
        "namespace {RELEASE_NAMESPACE} left behind"
    );
}

/// The GroupSnapshot part of the deploy/ test: two local volumes (XFS and ext4 in an XFS reflink
/// pool) a pod writes to, cut Ready with FilesystemFrozen by the pods, clones one point in time,
/// deleted with its clones.
async fn snapshot_with_deploy(c: &node::Cluster, scratch: &mut agent_support::Scratch) {
    let client = client_for(&c.plane.kubeconfig).await;
    let n = &c.nodes[0];
    let ns = format!("rn-deploy-{}", std::process::id());
    let disks = n.disks_dir.join(&ns);
    let pool_image = n.images_dir().join(format!("{ns}-pool.img"));
    scratch.image(&pool_image, 2 << 30);
    let pool_dev = scratch.attach(&pool_image, false);
    scratch.mkfs(&pool_dev, "xfs");
    let pool = disks.join("pool");
    scratch.mount(&pool_dev, &pool, &[]);
    let data = volume(scratch, &pool, &disks.join("data"), "xfs");
    let wal = volume(scratch, &pool, &disks.join("wal"), "ext4");
    let _thaw = ThawOnDrop(vec![data.mount.clone(), wal.mount.clone()]);
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    publish(
        &client,
        &ns,
        &n.name,
        &[
            ("data", &data.mount, &[("app", "shop")]),
            ("wal", &wal.mount, &[("app", "shop")]),
        ],
    )
    .await;
    start_writer(c, &ns);

    let (status, took) = snapshot_shop(&client, &ns, &n.name).await;
    eprintln!(
        "[deploy] GroupSnapshot Ready {:.1} s after it was created (freeze window {:?} ms)",
        took.as_secs_f64(),
        status.freeze_window_millis
    );
    // The clones are the agent pod's, in the pool, and one point in time.
    assert_clones_one_point_in_time(scratch, &status, &pool, "deploy-");

    delete_shop_snapshot(&client, &ns, &pool).await;

    // The writer goes before the volumes (the kubelet's bind mounts hold the loop devices).
    let _ = c.kubectl_timeout(
        &[
            "-n",
            &ns,
            "delete",
            "pod",
            "writer",
            "--grace-period=0",
            "--force",
            "--wait=true",
        ],
        Duration::from_secs(60),
    );
    let pods_dir = format!("{}/pods/", n.kubelet_dir.display());
    eventually(WAIT, "the kubelet unmounted the writer's volumes", || {
        let pods_dir = pods_dir.clone();
        let ns = ns.clone();
        async move {
            let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
            let held = info.lines().any(|l| {
                l.split(' ')
                    .nth(4)
                    .is_some_and(|m| m.starts_with(&pods_dir) && m.contains(&ns))
            });
            (!held).then_some(())
        }
    })
    .await;
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
