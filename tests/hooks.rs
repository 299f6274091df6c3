//! Quiesce hooks: the API's validation against the real API server, and fault tests on the real
//! node (an exec needs a kubelet and a container runtime).

mod agent_support;
mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use support::node::{self, images, shared_cluster, with_cluster};
use support::objects::{claim, local_volume};
use support::{TestEnv, client_for, eventually, repo_root};
use tandem::api::{
    Consistency, GroupSnapshot, GroupSnapshotPhase, GroupSnapshotStatus, HookRunState, NodeSnapshot,
};

fn group_yaml(name: &str, hooks: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {name}}}\nspec:\n  claims: [data]\n  quiesce:\n    hooks:\n{hooks}"
    )
}

fn apply(env: &TestEnv, yaml: &str) -> Result<String, String> {
    let path = std::env::temp_dir().join(format!("hooks-{}-{}.yaml", env.namespace, yaml.len()));
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let result = env.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&path);
    result
}

#[tokio::test]
async fn the_api_server_accepts_well_formed_hooks_and_refuses_incomplete_ones() {
    let env = TestEnv::new("hooks-api").await;
    let good = group_yaml(
        "good",
        "    - {name: lock, mode: Hold, container: db, command: [mysql], stdin: \"FLUSH TABLES WITH READ LOCK;\\n\", readyWhen: {stdoutLine: READY}, release: {stdin: \"UNLOCK TABLES;\\n\"}}\n    - {name: flush, command: [sync], timeoutSeconds: 5, onError: Continue}\n    - {name: after, phase: Post, pods: Selector, selector: {matchLabels: {app: db}}, command: [\"true\"]}\n",
    );
    apply(&env, &good).expect("a well-formed quiesce spec is accepted");
    let defaults = env
        .kubectl(&[
            "get",
            "cg",
            "good",
            "-o",
            "jsonpath={.spec.quiesce.hooks[1]}",
        ])
        .expect("read back");
    for expected in [
        "\"mode\":\"Exec\"",
        "\"phase\":\"Pre\"",
        "\"wrap\":\"Timeout\"",
        "\"pods\":\"Consumers\"",
    ] {
        assert!(defaults.contains(expected), "{expected} in {defaults}");
    }
    let refused = [
        (
            "a hold without readyWhen",
            "    - {name: lock, mode: Hold, command: [mysql]}\n",
            "needs readyWhen",
        ),
        (
            "readyWhen on an Exec hook",
            "    - {name: x, command: [sync], readyWhen: {stdoutLine: R}}\n",
            "belong to Hold hooks",
        ),
        (
            "pods: Selector without a selector",
            "    - {name: x, pods: Selector, command: [sync]}\n",
            "needs a selector",
        ),
        (
            "two hooks of one name",
            "    - {name: x, command: [sync]}\n    - {name: x, command: [sync]}\n",
            "Duplicate value",
        ),
        (
            "an empty command",
            "    - {name: x, command: []}\n",
            "spec.quiesce.hooks[0].command",
        ),
    ];
    for (i, (what, hooks, says)) in refused.iter().enumerate() {
        let error = apply(&env, &group_yaml(&format!("bad-{i}"), hooks))
            .expect_err(&format!("{what} is refused"));
        assert!(error.contains(says), "{what}: {error}");
    }
}

const WAIT: Duration = Duration::from_secs(90);

/// The chart on the shared real node (the controller without exec rights, as by default).
fn install_chart() {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        shared_cluster();
        with_cluster(|c| {
            let n = &c.nodes[0];
            c.helm(&[
                "install",
                "tandem",
                &repo_root().join("charts/tandem").display().to_string(),
                "--namespace",
                "tandem-system",
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
            .unwrap_or_else(|e| panic!("helm install: {e}"));
        });
    });
}

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

fn volume(scratch: &mut agent_support::Scratch, pool: &Path, mount: &Path) -> PathBuf {
    let image = pool.join(format!(
        "{}.img",
        mount
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default()
    ));
    scratch.image(&image, 320 << 20);
    let device = scratch.attach(&image, false);
    scratch.mkfs(&device, "xfs");
    scratch.mount(&device, mount, &[]);
    scratch.assert_owned(mount);
    mount.to_path_buf()
}

fn kubectl_apply(c: &node::Cluster, name: &str, object: &serde_json::Value) {
    let file = c.root.join(format!("{name}.json"));
    std::fs::write(&file, object.to_string()).expect("manifest");
    c.kubectl(&["apply", "-f", &file.display().to_string()])
        .unwrap_or_else(|e| panic!("apply {name}: {e}"));
}

/// The lines of `file` in the app pod (the hooks append to files under /tmp).
fn lines_in_pod(ns: &str, file: &str) -> Vec<String> {
    with_cluster(|c| {
        c.kubectl_timeout(
            &[
                "-n",
                ns,
                "exec",
                "app",
                "--",
                "sh",
                "-c",
                &format!("cat {file} 2>/dev/null; true"),
            ],
            Duration::from_secs(15),
        )
    })
    .unwrap_or_default()
    .lines()
    .map(String::from)
    .collect()
}

async fn finished(api: &Api<GroupSnapshot>, name: &str) -> GroupSnapshotStatus {
    eventually(
        WAIT,
        &format!("GroupSnapshot {name} Ready or Failed"),
        || {
            let api = api.clone();
            async move {
                let status = api.get(name).await.ok()?.status?;
                matches!(
                    status.phase,
                    GroupSnapshotPhase::Ready | GroupSnapshotPhase::Failed
                )
                .then_some(status)
            }
        },
    )
    .await
}

fn reason(status: &GroupSnapshotStatus) -> String {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

/// The hooks of one group on the real node, case after case on one node setup: without exec
/// rights the snapshot fails fast with HooksNotPermitted; with them a hold is held across the cut
/// (ApplicationQuiesced); a failing Pre hook under Fail cuts nothing (HookFailed); a hold that is
/// never ready times out (HookFailed, its command killed in the container by its own deadline);
/// a failing hook under Continue is cut and named. Each case ends with the hold released, the
/// Post hook run once, no NodeSnapshot frozen or left over, and the right phase.
#[tokio::test(flavor = "multi_thread")]
async fn hooks_on_a_real_node_run_around_the_barrier_and_every_failure_ends_clean() {
    if !node::can_run_nodes() {
        eprintln!("SKIPPED: the real node needs root");
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
    let disks_dir = with_cluster(|c| c.nodes[0].disks_dir.clone());

    let ns = format!("hooks-{}", std::process::id());
    let mut scratch = agent_support::Scratch::new();
    let disks = disks_dir.join(&ns);
    let pool_image = with_cluster(|c| c.nodes[0].images_dir()).join(format!("{ns}-pool.img"));
    scratch.image(&pool_image, 1 << 30);
    let pool_dev = scratch.attach(&pool_image, false);
    scratch.mkfs(&pool_dev, "xfs");
    let pool = disks.join("pool");
    scratch.mount(&pool_dev, &pool, &[]);
    let data = volume(&mut scratch, &pool, &disks.join("data"));
    let _thaw = ThawOnDrop(vec![data.clone()]);

    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = format!("{ns}-data");
    pvs.create(
        &PostParams::default(),
        &local_volume(&pv, &data.to_string_lossy(), &node_name, &ns, "data", &[]),
    )
    .await
    .expect("PV");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    claims
        .create(
            &PostParams::default(),
            &claim("data", Some(&pv), &[("app", "shop")]),
        )
        .await
        .expect("PVC");
    let image = images()["tandem_ref"].clone();
    with_cluster(|c| {
        kubectl_apply(
            c,
            &format!("{ns}-app"),
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "app", "namespace": ns},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "securityContext": {"runAsUser": 0},
                    "containers": [{"name": "app", "image": image, "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "while true; do date >> /data/log; sleep 0.1; done"],
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]
                }
            }),
        );
        c.kubectl_timeout(
            &[
                "-n",
                &ns,
                "wait",
                "--for=condition=Ready",
                "pod/app",
                "--timeout=60s",
            ],
            Duration::from_secs(70),
        )
        .unwrap_or_else(|e| panic!("app Ready: {e}"));
    });

    // The hold prints READY, then waits on stdin; released, it records that it was.
    let hold = json!({"name": "lock", "mode": "Hold", "container": "app",
        "command": ["sh", "-c", "echo READY; read line; echo \"released $line\" >> /tmp/hold.log"],
        "stdin": "", "readyWhen": {"stdoutLine": "READY"}, "release": {"stdin": "now\n"},
        "timeoutSeconds": 10});
    let post = json!({"name": "after", "phase": "Post",
        "command": ["sh", "-c", "echo post >> /tmp/post.log"]});
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), &ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "shop"},
                "spec": {"selector": {"matchLabels": {"app": "shop"}}, "freezeTimeoutSeconds": 20,
                    "quiesce": {"hooks": [hold, post]}}}))
            .expect("group"),
        )
        .await
        .expect("group");
    eventually(WAIT, "group resolved", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("shop").await.ok()?.status?;
            (status.members.len() == 1 && status.members.iter().all(|m| m.supported)).then_some(())
        }
    })
    .await;
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), &ns);
    let nodes: Api<NodeSnapshot> = Api::namespaced(client.clone(), &ns);
    let snap = |name: &str| -> GroupSnapshot {
        serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"groupName": "shop"}}))
            .expect("snapshot")
    };
    let node_snapshots_of = |name: String| {
        let nodes = nodes.clone();
        async move {
            nodes
                .list(&ListParams::default().labels(&format!("tandem.dev/group-snapshot={name}")))
                .await
                .expect("nsnaps")
                .items
        }
    };

    // 1. No exec rights (the chart's default): fails fast, nothing quiesced, nothing cut.
    snapshots
        .create(&PostParams::default(), &snap("no-rights"))
        .await
        .expect("create");
    let status = finished(&snapshots, "no-rights").await;
    assert_eq!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
    assert_eq!(reason(&status), "HooksNotPermitted", "{status:?}");
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("tandem-hook-runner")),
        "{status:?}"
    );
    assert!(status.hooks.is_empty(), "{status:?}");
    assert!(node_snapshots_of("no-rights".into()).await.is_empty());
    assert!(lines_in_pod(&ns, "/tmp/post.log").is_empty());

    // An admin binds the hook runner role in this namespace.
    with_cluster(|c| {
        c.kubectl(&[
            "-n",
            &ns,
            "create",
            "rolebinding",
            "tandem-hooks",
            "--clusterrole=tandem-hook-runner",
            "--serviceaccount=tandem-system:tandem-controller",
        ])
    })
    .expect("rolebinding");

    // 2. Everything succeeds: the hold was held across the cut and released once.
    snapshots
        .create(&PostParams::default(), &snap("quiesced"))
        .await
        .expect("create");
    let status = finished(&snapshots, "quiesced").await;
    assert_eq!(status.phase, GroupSnapshotPhase::Ready, "{status:?}");
    assert_eq!(
        status.consistency,
        Some(Consistency::ApplicationQuiesced),
        "{status:?}"
    );
    assert!(
        status
            .hooks
            .iter()
            .all(|r| r.state == HookRunState::Succeeded),
        "{status:?}"
    );
    let held = status
        .hooks
        .iter()
        .find(|r| r.name == "lock")
        .expect("hold run");
    assert_eq!(held.pod.as_deref(), Some("app"));
    assert!(
        held.ready_at.is_some() && held.released_at.is_some(),
        "{held:?}"
    );
    assert_eq!(lines_in_pod(&ns, "/tmp/hold.log"), ["released now"]);
    assert_eq!(lines_in_pod(&ns, "/tmp/post.log"), ["post"]);
    eprintln!(
        "[hooks] quiesce window {:?} ms, freeze window {:?} ms",
        status.quiesce_window_millis, status.freeze_window_millis
    );
    assert!(status.quiesce_window_millis.is_some());

    // 3. A Pre hook fails under Fail: no NodeSnapshot, the Post hook still runs once.
    let set_hooks = |hooks: serde_json::Value| {
        let groups = groups.clone();
        async move {
            groups
                .patch(
                    "shop",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": {"quiesce": {"hooks": hooks}}})),
                )
                .await
                .expect("patch group");
        }
    };
    let failing = json!({"name": "flush", "command": ["sh", "-c", "echo broken >&2; exit 3"]});
    set_hooks(json!([failing, post])).await;
    snapshots
        .create(&PostParams::default(), &snap("pre-fails"))
        .await
        .expect("create");
    let status = finished(&snapshots, "pre-fails").await;
    assert_eq!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
    assert_eq!(reason(&status), "HookFailed", "{status:?}");
    let flush = status
        .hooks
        .iter()
        .find(|r| r.name == "flush")
        .expect("run");
    assert_eq!(flush.exit_code, Some(3), "{flush:?}");
    assert!(
        flush
            .message
            .as_deref()
            .is_some_and(|m| m.contains("broken")),
        "{flush:?}"
    );
    assert!(
        node_snapshots_of("pre-fails".into()).await.is_empty(),
        "nothing was cut"
    );
    assert_eq!(lines_in_pod(&ns, "/tmp/post.log"), ["post", "post"]);

    // 4. A hold that never becomes ready times out: HookFailed, nothing cut, and its command is
    // killed in the container by its own deadline (timeout -s KILL), not left running.
    let stuck = json!({"name": "stuck", "mode": "Hold", "container": "app",
        "command": ["sh", "-c", "echo $$ > /tmp/stuck.pid; exec sleep 600"],
        "readyWhen": {"stdoutLine": "READY"}, "timeoutSeconds": 1});
    groups
        .patch(
            "shop",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"freezeTimeoutSeconds": 1, "quiesce": {"releaseGraceSeconds": 1}}}),
            ),
        )
        .await
        .expect("patch group");
    set_hooks(json!([stuck, post])).await;
    snapshots
        .create(&PostParams::default(), &snap("hold-timeout"))
        .await
        .expect("create");
    let status = finished(&snapshots, "hold-timeout").await;
    assert_eq!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
    assert_eq!(reason(&status), "HookFailed", "{status:?}");
    let run = status
        .hooks
        .iter()
        .find(|r| r.name == "stuck")
        .expect("run");
    assert!(
        run.message
            .as_deref()
            .is_some_and(|m| m.contains("not ready")),
        "{run:?}"
    );
    assert!(
        node_snapshots_of("hold-timeout".into()).await.is_empty(),
        "nothing was cut"
    );
    assert_eq!(lines_in_pod(&ns, "/tmp/post.log"), ["post", "post", "post"]);
    // Its deadline is 1 + 1 + 1 s: the sleep is gone soon after.
    eventually(
        Duration::from_secs(30),
        "the stuck hold's command killed in the container",
        || {
            let ns = ns.clone();
            async move {
                let pid = lines_in_pod(&ns, "/tmp/stuck.pid").first()?.clone();
                lines_in_pod(&ns, &format!("/proc/{pid}/cmdline"))
                    .is_empty()
                    .then_some(())
            }
        },
    )
    .await;

    // 5. Under Continue a failing hook does not stop the cut, and the snapshot names it.
    let lax = json!({"name": "flush", "command": ["sh", "-c", "exit 4"], "onError": "Continue"});
    set_hooks(json!([lax, post])).await;
    snapshots
        .create(&PostParams::default(), &snap("continued"))
        .await
        .expect("create");
    let status = finished(&snapshots, "continued").await;
    assert_eq!(status.phase, GroupSnapshotPhase::Ready, "{status:?}");
    assert_eq!(
        status.consistency,
        Some(Consistency::FilesystemFrozen),
        "{status:?}"
    );
    assert_eq!(status.failed_hooks, ["flush/app"], "{status:?}");
    assert_eq!(lines_in_pod(&ns, "/tmp/post.log").len(), 4);

    // Nothing frozen: the app's volume takes writes, and every NodeSnapshot was released.
    for n in nodes
        .list(&ListParams::default())
        .await
        .expect("nsnaps")
        .items
    {
        let phase = n.status.map(|s| s.phase);
        assert!(
            matches!(phase, Some(tandem::api::NodePhase::Released)),
            "{:?} {phase:?}",
            n.metadata.name
        );
    }
    with_cluster(|c| {
        c.kubectl_timeout(
            &[
                "-n",
                &ns,
                "exec",
                "app",
                "--",
                "sh",
                "-c",
                "echo ok > /data/probe",
            ],
            Duration::from_secs(15),
        )
    })
    .expect("the volume is not frozen");
    let _ = namespaces.delete(&ns, &Default::default()).await;
}
