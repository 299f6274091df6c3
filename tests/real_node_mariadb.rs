//! MariaDB on two real nodes, the application proof of quiesce hooks (issue 11): its datadir on
//! a claim of node 0, its binlog on a claim of node 1, a write load, group snapshots cut without
//! and with a Hold hook (FLUSH TABLES WITH READ LOCK held in a `mariadb` session across the
//! cut), each restored with a GroupRestore to new claims and started there.
//!
//! The signal is InnoDB's own: a server started on a copy whose redo log has nothing past its
//! checkpoint logs `InnoDB: End of log at LSN=...` and no `Starting crash recovery from
//! checkpoint LSN=...`; one that must apply redo logs that line (and `To recover: N pages`).
//! FLUSH TABLES WITH READ LOCK alone stops writes but not InnoDB's checkpoint lag, so the hold
//! also flushes every dirty page (innodb_max_dirty_pages_pct=0) and waits until the checkpoint
//! has caught up before it says it is ready. The binlog is open at any cut (no clean close), so
//! MariaDB's binlog scan ("Recovering after a crash using ...") runs in both cases and finds no
//! prepared transaction to resolve.
//!
//! Each restore also runs the group's post-restore hooks in the server started on the restored
//! claims, once it is Ready: one writes a row (exactly once), the next fails under `onError:
//! Continue`, and the GroupRestore's status records both (condition PostRestoreHooks HookFailed).
//!
//! The harness runs both nodes' kubelets on one host, so (as in tests/real_node.rs) MariaDB runs
//! on node 0 with the datadir claim mounted by that node's kubelet and the binlog volume of node
//! 1 reached through a host folder. Needs root; skips with a message otherwise.

mod agent_support;
mod support;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, PersistentVolume, PersistentVolumeClaim};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use support::node::{self, mariadb_images};
use support::objects::{claim, local_volume};
use support::{client_for, eventually, repo_root};
use tandem::api::{
    Consistency, GroupRestore, GroupSnapshot, GroupSnapshotPhase, GroupSnapshotStatus,
    HookRunState, RestorePhase,
};
use tandem::controller::restore::post_hooks::CONDITION_POST_RESTORE_HOOKS;

const WAIT: Duration = Duration::from_secs(120);
const EXEC_TIMEOUT: Duration = Duration::from_secs(20);
const RELEASE: &str = "tandem";
const RELEASE_NAMESPACE: &str = "tandem-system";
/// What InnoDB logs when it must apply redo past its checkpoint.
const CRASH_RECOVERY: &str = "InnoDB: Starting crash recovery from checkpoint LSN=";

fn require_root() -> bool {
    if !node::can_run_nodes() {
        eprintln!("SKIPPED: the real node needs root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// Where a pod's volume comes from: a claim, or a host folder.
#[derive(Clone, Copy)]
enum Vol<'a> {
    Claim(&'a str),
    Host(&'a str),
}

impl Vol<'_> {
    fn source(self, name: &str) -> serde_json::Value {
        match self {
            Vol::Claim(c) => json!({"name": name, "persistentVolumeClaim": {"claimName": c}}),
            Vol::Host(p) => json!({"name": name, "hostPath": {"path": p, "type": "Directory"}}),
        }
    }
}

/// The server's flags: datadir on /data, binlog on /binlog, the socket in an emptyDir the load
/// container shares (root over the socket: unix_socket authentication, no password).
const MARIADBD: &str = "mariadbd --no-defaults --user=mysql --datadir=/data/db --log-bin=/binlog/bin --server-id=1 --socket=/run/mysqld/mysqld.sock --skip-networking --innodb-log-file-size=32M --innodb-buffer-pool-size=64M";

/// The write load: an account transfer and an order per transaction (sum of balances fixed,
/// account 2's balance = number of orders), about 400 a second at most.
const LOAD: &str = r#"until mariadb -e 'SELECT 1' >/dev/null 2>&1; do sleep 0.2; done
mariadb -e "CREATE DATABASE IF NOT EXISTS shop; CREATE TABLE IF NOT EXISTS shop.orders (id INT PRIMARY KEY, pad VARCHAR(255)) ENGINE=InnoDB; CREATE TABLE IF NOT EXISTS shop.acct (id INT PRIMARY KEY, bal INT) ENGINE=InnoDB; INSERT IGNORE INTO shop.acct VALUES (1,1000000),(2,0)"
i=0
while :; do i=$((i+1)); echo "BEGIN; INSERT INTO shop.orders VALUES ($i, REPEAT('x',200)); UPDATE shop.acct SET bal=bal-1 WHERE id=1; UPDATE shop.acct SET bal=bal+1 WHERE id=2; COMMIT;"; [ $((i % 20)) -ne 0 ] || sleep 0.05; done | mariadb"#;

/// The load's invariant, 1 when it holds.
const BALANCED: &str = "SELECT (SELECT SUM(bal) FROM shop.acct) = 1000000 AND (SELECT bal FROM shop.acct WHERE id = 2) = (SELECT COUNT(*) FROM shop.orders)";

fn mariadb_pod(name: &str, data: Vol<'_>, binlog: Vol<'_>, init: bool) -> serde_json::Value {
    let prepare = if init {
        "mariadb-install-db --force --user=mysql --datadir=/data/db --skip-test-db --skip-name-resolve >/dev/null"
    } else {
        "true"
    };
    let mut containers = vec![
        json!({"name": "mariadb", "image": "localhost/tandem/mariadb:10.11",
        "imagePullPolicy": "Never",
        "command": ["/bin/sh", "-c", format!(
            "set -e; chown mysql:mysql /data /binlog /run/mysqld; {prepare}; exec {MARIADBD}")],
        "readinessProbe": {"exec": {"command": ["mariadb-admin", "ping"]}, "periodSeconds": 1},
        "volumeMounts": [{"name": "data", "mountPath": "/data"},
                         {"name": "binlog", "mountPath": "/binlog"},
                         {"name": "run", "mountPath": "/run/mysqld"}]}),
    ];
    if init {
        containers.push(
            json!({"name": "load", "image": "localhost/tandem/mariadb:10.11",
            "imagePullPolicy": "Never", "command": ["/bin/sh", "-c", LOAD],
            "volumeMounts": [{"name": "run", "mountPath": "/run/mysqld"}]}),
        );
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsUser": 0},
            "containers": containers,
            "volumes": [data.source("data"), binlog.source("binlog"),
                        {"name": "run", "emptyDir": {}}]
        }
    })
}

/// The chart on each node (as tests/real_node.rs does): the first release with the controller.
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
        c.helm(&args)
            .unwrap_or_else(|e| panic!("helm install for {}: {e}", n.name));
    }
}

/// A loop-backed filesystem of `size` in the node's reflink pool (an XFS under its shared
/// folder), mounted at `mount`.
fn volume(
    scratch: &mut agent_support::Scratch,
    n: &node::Node,
    ns: &str,
    name: &str,
    fs: &str,
) -> PathBuf {
    let image = n.images_dir().join(format!("{ns}-pool.img"));
    scratch.image(&image, 1 << 30);
    let dev = scratch.attach(&image, false);
    scratch.mkfs(&dev, "xfs");
    let pool = n.disks_dir.join(ns).join("pool");
    scratch.mount(&dev, &pool, &[]);
    let image = pool.join(format!("{name}.img"));
    scratch.image(&image, 320 << 20);
    let dev = scratch.attach(&image, false);
    scratch.mkfs(&dev, fs);
    let mount = n.disks_dir.join(ns).join(name);
    scratch.mount(&dev, &mount, &[]);
    mount
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

/// Publishes a mounted volume as a local PV of the node, with a claim labelled app=db.
async fn publish(client: &kube::Client, ns: &str, node: &str, name: &str, mount: &Path) {
    let pv = format!("{ns}-{name}");
    Api::<PersistentVolume>::all(client.clone())
        .create(
            &PostParams::default(),
            &local_volume(&pv, &mount.to_string_lossy(), node, ns, name, &[]),
        )
        .await
        .expect("PV");
    Api::<PersistentVolumeClaim>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &claim(name, Some(&pv), &[("app", "db")]),
        )
        .await
        .expect("PVC");
}

fn apply(c: &node::Cluster, ns: &str, object: &serde_json::Value) {
    let file = c.root.join(format!(
        "{ns}-{}.json",
        object["metadata"]["name"].as_str().unwrap_or("object")
    ));
    fs::write(&file, object.to_string()).expect("manifest");
    c.kubectl(&["-n", ns, "apply", "-f", &file.display().to_string()])
        .unwrap_or_else(|e| panic!("apply: {e}"));
}

fn pinned(mut pod: serde_json::Value, node: &str) -> serde_json::Value {
    pod["spec"]["nodeSelector"] = json!({"kubernetes.io/hostname": node});
    pod
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
            c.kubectl(&["-n", ns, "logs", pod, "-c", "mariadb"])
                .unwrap_or_default()
        )
    });
}

/// SQL in the pod's server (as root over its socket), behind a host-side timeout.
fn sql(c: &node::Cluster, ns: &str, pod: &str, query: &str) -> Result<String, String> {
    c.kubectl_timeout(
        &[
            "-n", ns, "exec", pod, "-c", "mariadb", "--", "mariadb", "-N", "-e", query,
        ],
        EXEC_TIMEOUT,
    )
    .map(|s| s.trim().to_string())
}

/// Cuts GroupSnapshot `name` of group `db` (hooks Run or Skip) and waits until it is Ready.
async fn cut(client: &kube::Client, ns: &str, name: &str, hooks: &str) -> GroupSnapshotStatus {
    let snapshots: Api<GroupSnapshot> = Api::namespaced(client.clone(), ns);
    snapshots
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name},
                "spec": {"groupName": "db", "deletionPolicy": "Delete", "hooks": hooks}}))
            .expect("snapshot"),
        )
        .await
        .expect("snapshot");
    eventually(WAIT, "GroupSnapshot Ready", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get(name).await.ok()?.status?;
            assert_ne!(status.phase, GroupSnapshotPhase::Failed, "{status:?}");
            (status.phase == GroupSnapshotPhase::Ready).then_some(status)
        }
    })
    .await
}

/// Restores `snapshot` to new claims `<claim>-<restore>`, starts MariaDB on them (the binlog
/// claim mounted by node 1's kubelet for a holder pod there, and reached by the server on node 0
/// through that mount), and returns the server's log once it is Ready and the load's invariant
/// holds in the restored data.
async fn restore_and_start(
    c: &node::Cluster,
    client: &kube::Client,
    ns: &str,
    snapshot: &str,
    restore: &str,
) -> String {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let restores: Api<GroupRestore> = Api::namespaced(client.clone(), ns);
    restores
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": restore}, "spec": {
                "source": {"groupSnapshotName": snapshot},
                "mode": "NewClaims",
                "newClaims": {"labels": {"app": format!("db-{restore}")}}
            }}))
            .expect("restore"),
        )
        .await
        .expect("GroupRestore");
    let status = eventually(WAIT, "GroupRestore Completed", || {
        let restores = restores.clone();
        async move {
            let status = restores.get(restore).await.ok()?.status?;
            assert_ne!(status.phase, RestorePhase::Failed, "{status:?}");
            (status.phase == RestorePhase::Completed).then_some(status)
        }
    })
    .await;
    let binlog_claim = format!("binlog-{restore}");
    let holder = format!("binlog-{restore}-holder");
    apply(
        c,
        ns,
        &pinned(
            json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": holder},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "containers": [{"name": "hold", "image": "localhost/tandem/mariadb:10.11",
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "test -e /binlog/bin.index && exec sleep 3600"],
                        "volumeMounts": [{"name": "binlog", "mountPath": "/binlog"}]}],
                    "volumes": [{"name": "binlog", "persistentVolumeClaim": {"claimName": binlog_claim}}]
                }
            }),
            &n1.name,
        ),
    );
    wait_ready(c, ns, &holder);
    let uid = c
        .kubectl(&[
            "-n",
            ns,
            "get",
            "pod",
            &holder,
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .expect("holder uid");
    let pv = &status
        .members
        .iter()
        .find(|m| m.source_claim == "binlog")
        .expect("binlog member")
        .persistent_volume;
    let binlog = n1
        .kubelet_dir
        .join("pods")
        .join(uid.trim())
        .join("volumes/kubernetes.io~local-volume")
        .join(pv)
        .display()
        .to_string();
    let server = format!("db-{restore}");
    apply(
        c,
        ns,
        &pinned(
            mariadb_pod(
                &server,
                Vol::Claim(&format!("data-{restore}")),
                Vol::Host(&binlog),
                false,
            ),
            &n0.name,
        ),
    );
    wait_ready(c, ns, &server);
    let balanced = sql(c, ns, &server, BALANCED).expect("the invariant");
    assert_eq!(balanced, "1", "the load's invariant in the restored data");
    let orders = sql(c, ns, &server, "SELECT COUNT(*) FROM shop.orders").expect("orders");
    eprintln!("[mariadb] {restore}: {orders} orders in the restored data, balanced");
    // The group's post-restore hooks ran once each, in the server (the holder has no container
    // mariadb), once it was Ready: the first wrote its row, the second failed (exit 3) and says so.
    let status = eventually(WAIT, "the post-restore hooks done", || {
        let restores = restores.clone();
        async move {
            let status = restores.get(restore).await.ok()?.status?;
            let done = status.conditions.iter().find(|c| {
                c.type_ == CONDITION_POST_RESTORE_HOOKS && c.reason != "WaitingForPods"
            })?;
            Some((status.clone(), done.clone()))
        }
    })
    .await;
    let (status, done) = status;
    assert_eq!(
        (done.status.as_str(), done.reason.as_str()),
        ("False", "HookFailed"),
        "{done:?}"
    );
    assert!(
        done.message.contains(&format!("failing/{server}")),
        "{done:?}"
    );
    let runs: Vec<_> = status
        .post_restore_hooks
        .iter()
        .map(|r| (r.name.as_str(), r.pod.as_deref(), r.state, r.exit_code))
        .collect();
    assert_eq!(
        runs,
        [
            (
                "mark-restored",
                Some(server.as_str()),
                HookRunState::Succeeded,
                Some(0)
            ),
            (
                "failing",
                Some(server.as_str()),
                HookRunState::Failed,
                Some(3)
            ),
        ],
        "{status:?}"
    );
    let failed = &status.post_restore_hooks[1];
    assert!(
        failed
            .message
            .as_deref()
            .is_some_and(|m| m.contains("no replica to reset")),
        "the end of stderr: {failed:?}"
    );
    let marks = sql(c, ns, &server, "SELECT COUNT(*) FROM shop.restored").expect("marks");
    assert_eq!(marks, "1", "the post-restore hook ran exactly once");
    c.kubectl(&["-n", ns, "logs", &server, "-c", "mariadb"])
        .expect("server log")
}

/// The lines of a server log about recovery and the end of the redo log.
fn recovery_lines(log: &str) -> String {
    log.lines()
        .filter(|l| l.contains("recover") || l.contains("Recover") || l.contains("LSN="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The group's hold hook: FLUSH TABLES WITH READ LOCK in a `mariadb` session, every dirty page
/// flushed and the checkpoint caught up, then the ready marker; released with UNLOCK TABLES and
/// the end of stdin.
fn hold_hook() -> serde_json::Value {
    let ready = "FLUSH TABLES WITH READ LOCK;\n\
        SET GLOBAL innodb_max_dirty_pages_pct_lwm = 0, GLOBAL innodb_max_dirty_pages_pct = 0;\n\
        DELIMITER //\n\
        BEGIN NOT ATOMIC WHILE (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'INNODB_BUFFER_POOL_PAGES_DIRTY') > 0 OR (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS WHERE VARIABLE_NAME = 'INNODB_CHECKPOINT_AGE') > 100 DO DO SLEEP(0.05); END WHILE; END//\n\
        DELIMITER ;\n\
        SELECT 'TANDEM_READY';\n";
    json!({
        "name": "read-lock",
        "mode": "Hold",
        "container": "mariadb",
        "command": ["mariadb", "--unbuffered", "-N"],
        "stdin": ready,
        "readyWhen": {"stdoutLine": "TANDEM_READY"},
        "release": {"stdin": "SET GLOBAL innodb_max_dirty_pages_pct = 90; UNLOCK TABLES;\n", "closeStdin": true},
        "timeoutSeconds": 60
    })
}

#[test]
fn mariadb_on_two_nodes_restores_without_crash_recovery_only_after_a_read_lock_hold() {
    if !require_root() {
        return;
    }
    let cluster = node::Cluster::start(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(mariadb_two_nodes(&cluster));
}

async fn mariadb_two_nodes(c: &node::Cluster) {
    let (n0, n1) = (&c.nodes[0], &c.nodes[1]);
    let started = std::time::Instant::now();
    n0.import(&mariadb_images()["mariadb"]);
    n1.import(&mariadb_images()["mariadb"]);
    install_chart_per_node(c);
    eprintln!(
        "[mariadb] image imported, the chart installed on both nodes in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let client = client_for(&c.plane.kubeconfig).await;
    let ns = format!("rn-maria-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("ns"),
        )
        .await
        .expect("namespace");

    // The datadir (XFS) on node 0, the binlog (ext4) on node 1.
    let mut scratch = agent_support::Scratch::new();
    let data = volume(&mut scratch, n0, &ns, "data", "xfs");
    let binlog = volume(&mut scratch, n1, &ns, "binlog", "ext4");
    let _thaw = ThawOnDrop(vec![data.clone(), binlog.clone()]);
    publish(&client, &ns, &n0.name, "data", &data).await;
    publish(&client, &ns, &n1.name, "binlog", &binlog).await;

    let binlog_path = binlog.display().to_string();
    apply(
        c,
        &ns,
        &pinned(
            mariadb_pod("db", Vol::Claim("data"), Vol::Host(&binlog_path), true),
            &n0.name,
        ),
    );
    wait_ready(c, &ns, "db");
    let orders = || {
        sql(c, &ns, "db", "SELECT COUNT(*) FROM shop.orders")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
    };
    eventually(WAIT, "the write load running", || {
        let n = orders();
        async move { n.filter(|n| *n > 200) }
    })
    .await;

    // Exec rights for the controller in this namespace: the admin binds the chart's ClusterRole.
    apply(
        c,
        &ns,
        &json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": "hook-runner"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "tandem-hook-runner"},
            "subjects": [{"kind": "ServiceAccount", "name": "tandem-controller", "namespace": RELEASE_NAMESPACE}]}),
    );

    // The group, with the hold hook (a snapshot with hooks Skip does not run it).
    let groups: Api<tandem::api::ConsistencyGroup> = Api::namespaced(client.clone(), &ns);
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "db"},
                "spec": {"selector": {"matchLabels": {"app": "db"}}, "freezeTimeoutSeconds": 30,
                         "quiesce": {"onHookError": "Fail", "hooks": [hold_hook()],
                                     "postRestore": [{"name": "mark-restored", "container": "mariadb",
                                         "command": ["mariadb", "-e", "CREATE TABLE shop.restored (at TIMESTAMP) ENGINE=InnoDB; INSERT INTO shop.restored VALUES (NOW())"]},
                                         {"name": "failing", "container": "mariadb", "onError": "Continue",
                                         "command": ["sh", "-c", "echo no replica to reset >&2; exit 3"]}]}}}))
            .expect("group"),
        )
        .await
        .expect("group");
    eventually(WAIT, "group Ready", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("db").await.ok()?.status?;
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

    // Without the hook: frozen filesystems, one point in time, and InnoDB must recover.
    let crash = cut(&client, &ns, "db-crash", "Skip").await;
    assert_eq!(
        crash.consistency,
        Some(Consistency::FilesystemFrozen),
        "{crash:?}"
    );
    assert_eq!(crash.nodes.len(), 2, "a cut on each node: {crash:?}");
    let at_crash = orders().expect("orders");
    eventually(WAIT, "the load goes on after the cut", || {
        let n = orders();
        async move { n.filter(|n| *n > at_crash + 100) }
    })
    .await;
    let log = restore_and_start(c, &client, &ns, "db-crash", "crash").await;
    eprintln!(
        "[mariadb] restored from the crash-consistent cut:\n{}",
        recovery_lines(&log)
    );
    assert!(
        log.contains(CRASH_RECOVERY),
        "the crash-consistent copy needs InnoDB crash recovery:\n{log}"
    );

    // With the hook: the read lock held across the cut, and no InnoDB crash recovery.
    let held = cut(&client, &ns, "db-held", "Run").await;
    assert_eq!(
        held.consistency,
        Some(Consistency::ApplicationQuiesced),
        "{held:?}"
    );
    let hold = held
        .hooks
        .iter()
        .find(|h| h.name == "read-lock")
        .unwrap_or_else(|| panic!("no run of the hold: {held:?}"));
    assert_eq!(hold.pod.as_deref(), Some("db"), "{hold:?}");
    assert_eq!(hold.state, HookRunState::Succeeded, "{hold:?}");
    eprintln!(
        "[mariadb] held cut: quiesce window {:?} ms, freeze window {:?} ms",
        held.quiesce_window_millis, held.freeze_window_millis
    );
    let at_held = orders().expect("orders");
    eventually(WAIT, "the load goes on after the release", || {
        let n = orders();
        async move { n.filter(|n| *n > at_held + 100) }
    })
    .await;
    let log = restore_and_start(c, &client, &ns, "db-held", "held").await;
    eprintln!(
        "[mariadb] restored from the held cut:\n{}",
        recovery_lines(&log)
    );
    assert!(
        !log.contains(CRASH_RECOVERY),
        "the copy cut under the hold needs no InnoDB crash recovery:\n{log}"
    );
    assert!(log.contains("InnoDB: End of log at LSN="), "{log}");

    cleanup(c, &client, &ns, &namespaces).await;
}

async fn cleanup(c: &node::Cluster, client: &kube::Client, ns: &str, namespaces: &Api<Namespace>) {
    let _ = c.kubectl_timeout(
        &[
            "-n",
            ns,
            "delete",
            "pod",
            "--all",
            "--grace-period=0",
            "--force",
            "--wait=true",
        ],
        Duration::from_secs(60),
    );
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    for name in ["data", "binlog"] {
        let _ = Api::<PersistentVolume>::all(client.clone())
            .delete(&format!("{ns}-{name}"), &DeleteParams::default())
            .await;
    }
}
