//! `kubectl tandem` through the real kubectl 1.34 (hack/test-tools.sh): kubectl finds the plugin
//! as `kubectl-tandem` on PATH (a symlink to the tandem binary cargo built for the tests) and every
//! command runs against the real API server. The snapshot and restore `--wait` tests run real
//! agents over loop-backed volumes, as tests/group_snapshot.rs does (root; they skip otherwise).

mod agent_support;
mod support;
mod world;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use support::control_plane::tools_bin;
use support::{TestEnv, eventually, with_plane};
use tandem::api::{ConsistencyGroup, GroupSnapshot, GroupSnapshotPhase};
use world::{World, require_root};

/// A folder holding `kubectl-tandem` -> the tandem binary: what a plain install or Krew makes.
fn plugin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tandem-cli-plugin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("plugin dir");
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tandem"), dir.join("kubectl-tandem"))
            .expect("symlink kubectl-tandem");
        dir
    })
}

/// What a command did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn ok(self) -> Run {
        assert_eq!(self.code, 0, "expected success: {self:?}");
        self
    }
}

/// The real kubectl with the plugin on PATH. `args` go to kubectl as they are.
fn kubectl(args: &[&str], stdin: Option<&str>) -> Run {
    let path = format!(
        "{}:{}",
        plugin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new(tools_bin().join("kubectl"))
        .args(args)
        .env("PATH", path)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .expect("stdin");
    }
    let out = child.wait_with_output().expect("kubectl output");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `kubectl tandem ARGS --kubeconfig K -n NS`.
fn tandem(kubeconfig: &Path, namespace: &str, args: &[&str]) -> Run {
    let kubeconfig = format!("--kubeconfig={}", kubeconfig.display());
    let mut all = vec!["tandem"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[&kubeconfig, "-n", namespace]);
    kubectl(&all, None)
}

/// Plain kubectl as cluster admin in a namespace, with stdin.
fn admin(env: &TestEnv, args: &[&str], stdin: Option<&str>) -> Run {
    let kubeconfig = format!("--kubeconfig={}", env.plane.kubeconfig.display());
    let mut all = vec![kubeconfig.as_str(), "-n", env.namespace.as_str()];
    all.extend_from_slice(args);
    kubectl(&all, stdin)
}

#[test]
fn kubectl_plugin_list_finds_kubectl_tandem_and_passes_arguments() {
    let list = kubectl(&["plugin", "list"], None);
    assert!(
        list.stdout
            .contains(&plugin_dir().join("kubectl-tandem").display().to_string()),
        "{list:?}"
    );
    let version = kubectl(&["tandem", "--version"], None).ok();
    assert!(version.stdout.starts_with("kubectl-tandem "), "{version:?}");
    let help = kubectl(&["tandem", "snapshot", "create", "--help"], None).ok();
    assert!(
        help.stdout.contains("--dry-run") && help.stdout.contains("--timeout"),
        "{help:?}"
    );
    // Shell completion scripts for the plugin's own name.
    for shell in ["bash", "zsh", "fish"] {
        let script = kubectl(&["tandem", "completion", shell], None).ok();
        assert!(
            script.stdout.contains("kubectl-tandem") && script.stdout.contains("snapshot"),
            "{shell}: {}",
            &script.stdout[..script.stdout.len().min(300)]
        );
    }
    // Usage errors exit 2 through kubectl, before any API server is asked.
    let usage = kubectl(&["tandem", "group", "create", "g"], None);
    assert_eq!(usage.code, 2, "{usage:?}");
    assert!(usage.stderr.contains("--selector"), "{usage:?}");
    let usage = kubectl(&["tandem", "snapshot", "frobnicate"], None);
    assert_eq!(usage.code, 2, "{usage:?}");
}

/// Every create's `--dry-run=client -o yaml` output applies, and a second apply changes nothing.
#[tokio::test]
async fn dry_run_manifests_apply_twice_unchanged() {
    let env = TestEnv::new("cli-dry-run").await;
    let kc = env.plane.kubeconfig.clone();
    let ns = env.namespace.clone();
    for (args, kind) in [
        (
            vec![
                "group",
                "create",
                "shop",
                "--selector",
                "app=shop",
                "--claims",
                "extra",
                "--freeze",
                "BestEffort",
                "--freeze-timeout",
                "20s",
            ],
            "consistencygroup.tandem.dev/shop",
        ),
        (
            vec![
                "snapshot",
                "create",
                "shop",
                "shop-1",
                "--deletion-policy",
                "Retain",
            ],
            "groupsnapshot.tandem.dev/shop-1",
        ),
        (
            vec![
                "restore",
                "create",
                "back",
                "--from-snapshot",
                "shop-1",
                "--name-template",
                "{claim}-back",
                "--claim",
                "data=data-copy",
                "--claim-labels",
                "restored=yes",
            ],
            "grouprestore.tandem.dev/back",
        ),
        (
            vec![
                "restore",
                "create",
                "undo",
                "--from-snapshot",
                "shop-1",
                "--in-place",
                "--scale-down",
                "--deadline",
                "30m",
            ],
            "grouprestore.tandem.dev/undo",
        ),
        (
            vec![
                "schedule",
                "create",
                "nightly",
                "--group",
                "shop",
                "--cron",
                "30 2 * * *",
                "--tz",
                "Europe/Berlin",
                "--deletion-policy",
                "Retain",
                "--keep-last",
                "3",
                "--daily",
                "7",
                "--max-age",
                "30d",
                "--min-ready",
                "2",
            ],
            "groupsnapshotschedule.tandem.dev/nightly",
        ),
    ] {
        let mut full = args.clone();
        full.extend(["--dry-run=client", "-o", "yaml"]);
        let manifest = tandem(&kc, &ns, &full).ok().stdout;
        assert!(
            manifest.contains("apiVersion: tandem.dev/v1alpha1"),
            "{manifest}"
        );
        let first = admin(&env, &["apply", "-f", "-"], Some(&manifest)).ok();
        assert_eq!(first.stdout.trim(), format!("{kind} created"), "{first:?}");
        let second = admin(&env, &["apply", "-f", "-"], Some(&manifest)).ok();
        assert_eq!(
            second.stdout.trim(),
            format!("{kind} unchanged"),
            "{second:?}"
        );
        // The CLI's own create of the same object is refused: it exists.
        let again = tandem(&kc, &ns, &args);
        assert_eq!(again.code, 1, "{again:?}");
        assert!(again.stderr.contains("AlreadyExists"), "{again:?}");
    }
    // Server-side dry run: validated, nothing kept.
    let server = tandem(
        &kc,
        &ns,
        &[
            "group",
            "create",
            "ghost",
            "--claims",
            "a",
            "--dry-run=server",
        ],
    )
    .ok();
    assert!(server.stdout.contains("server dry run"), "{server:?}");
    let gone = tandem(&kc, &ns, &["group", "show", "ghost"]);
    assert_eq!(gone.code, 1, "{gone:?}");
    assert!(gone.stderr.contains("NotFound"), "{gone:?}");
    // The API server's validation speaks through the CLI.
    let bad = tandem(&kc, &ns, &["group", "create", "Bad_Name", "--claims", "a"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("Invalid"), "{bad:?}");
}

/// Groups without agents: create, list in every format, show, add and remove claims, delete.
#[tokio::test]
async fn group_commands_against_the_api_server() {
    let env = TestEnv::new("cli-group").await;
    let kc = env.plane.kubeconfig.clone();
    let ns = env.namespace.clone();
    let created = tandem(&kc, &ns, &["group", "create", "db", "--claims", "data,wal"]).ok();
    assert_eq!(
        created.stdout.trim(),
        "consistencygroup.tandem.dev/db created"
    );
    let groups: kube::Api<ConsistencyGroup> = env.api();
    assert_eq!(
        groups.get("db").await.expect("group").spec.claims,
        Some(vec!["data".to_string(), "wal".to_string()])
    );

    let table = tandem(&kc, &ns, &["group", "list"]).ok().stdout;
    let mut lines = table.lines();
    assert!(
        lines
            .next()
            .is_some_and(|h| h.starts_with("NAME") && h.contains("MEMBERS")),
        "{table}"
    );
    assert!(
        lines.next().is_some_and(|l| l.starts_with("db ")),
        "{table}"
    );
    let wide = tandem(&kc, &ns, &["group", "list", "-o", "wide"])
        .ok()
        .stdout;
    assert!(wide.contains("data,wal"), "{wide}");
    let names = tandem(&kc, &ns, &["group", "list", "-o", "name"])
        .ok()
        .stdout;
    assert_eq!(names.trim(), "consistencygroup.tandem.dev/db");
    let json: serde_json::Value = serde_json::from_str(
        &tandem(&kc, &ns, &["group", "list", "-o", "json"])
            .ok()
            .stdout,
    )
    .expect("json");
    assert_eq!(json["kind"], "List");
    assert_eq!(json["items"][0]["metadata"]["name"], "db");
    let all = tandem(&kc, &ns, &["group", "list", "-A"]).ok().stdout;
    assert!(all.starts_with("NAMESPACE") && all.contains(&ns), "{all}");

    let added = tandem(&kc, &ns, &["group", "add", "db", "index", "data"]).ok();
    assert!(added.stdout.contains("claims added"), "{added:?}");
    assert_eq!(
        groups.get("db").await.expect("group").spec.claims,
        Some(vec!["data".into(), "index".into(), "wal".into()])
    );
    tandem(&kc, &ns, &["group", "remove", "db", "wal"]).ok();
    assert_eq!(
        groups.get("db").await.expect("group").spec.claims,
        Some(vec!["data".into(), "index".into()])
    );
    let not_member = tandem(&kc, &ns, &["group", "remove", "db", "nope"]);
    assert_eq!(not_member.code, 2, "{not_member:?}");
    let last = tandem(&kc, &ns, &["group", "remove", "db", "data", "index"]);
    assert_eq!(last.code, 2, "{last:?}");
    assert!(last.stderr.contains("no members"), "{last:?}");

    let show = tandem(&kc, &ns, &["group", "show", "db"]).ok().stdout;
    assert!(
        show.contains("Claims:") && show.contains("data, index") && show.contains("Members:"),
        "{show}"
    );
    let yaml = tandem(&kc, &ns, &["group", "show", "db", "-o", "yaml"])
        .ok()
        .stdout;
    assert!(
        yaml.contains("kind: ConsistencyGroup") && !yaml.contains("managedFields"),
        "{yaml}"
    );

    let deleted = tandem(&kc, &ns, &["group", "delete", "db"]).ok();
    assert_eq!(
        deleted.stdout.trim(),
        "consistencygroup.tandem.dev/db deleted"
    );
    eventually(Duration::from_secs(30), "group gone", || async {
        groups
            .get_opt("db")
            .await
            .expect("get")
            .is_none()
            .then_some(())
    })
    .await;
}

/// Schedules without a controller: create, list, show, suspend and resume, a bad cron or zone
/// refused before anything is sent, restore --from-schedule of its newest Ready snapshot, delete.
#[tokio::test]
async fn schedule_commands_against_the_api_server() {
    use tandem::api::GroupSnapshotSchedule;
    let env = TestEnv::new("cli-schedule").await;
    let kc = env.plane.kubeconfig.clone();
    let ns = env.namespace.clone();
    let created = tandem(
        &kc,
        &ns,
        &[
            "schedule",
            "create",
            "hourly",
            "--group",
            "shop",
            "--cron",
            "@hourly",
            "--keep-last",
            "5",
        ],
    )
    .ok();
    assert_eq!(
        created.stdout.trim(),
        "groupsnapshotschedule.tandem.dev/hourly created"
    );
    let schedules: kube::Api<GroupSnapshotSchedule> = env.api();
    let schedule = schedules.get("hourly").await.expect("schedule");
    assert_eq!(schedule.spec.time_zone, "UTC");
    assert_eq!(schedule.spec.retention.and_then(|r| r.keep_last), Some(5));
    for (args, why) in [
        (vec!["--cron", "61 * * * *"], "--cron"),
        (
            vec!["--cron", "@hourly", "--tz", "Mars/Olympus"],
            "--time-zone",
        ),
    ] {
        let mut full = vec!["schedule", "create", "bad", "--group", "shop"];
        full.extend(args);
        let refused = tandem(&kc, &ns, &full);
        assert_eq!(refused.code, 2, "{refused:?}");
        assert!(refused.stderr.contains(why), "{refused:?}");
    }
    let table = tandem(&kc, &ns, &["schedule", "list"]).ok().stdout;
    assert!(
        table.starts_with("NAME")
            && table
                .lines()
                .any(|l| l.starts_with("hourly ") && l.contains("@hourly")),
        "{table}"
    );
    tandem(&kc, &ns, &["schedule", "suspend", "hourly"]).ok();
    assert!(
        schedules
            .get("hourly")
            .await
            .expect("schedule")
            .spec
            .suspend
    );
    let show = tandem(&kc, &ns, &["schedule", "show", "hourly"])
        .ok()
        .stdout;
    assert!(
        show.contains("@hourly in UTC")
            && show
                .lines()
                .any(|l| l.starts_with("Suspend:") && l.ends_with(" true"))
            && show.contains("keepLast 5"),
        "{show}"
    );
    tandem(&kc, &ns, &["schedule", "resume", "hourly"]).ok();
    assert!(
        !schedules
            .get("hourly")
            .await
            .expect("schedule")
            .spec
            .suspend
    );

    // No Ready snapshot yet: nothing to restore.
    let none = tandem(
        &kc,
        &ns,
        &["restore", "create", "r", "--from-schedule", "hourly"],
    );
    assert_eq!(none.code, 1, "{none:?}");
    assert!(none.stderr.contains("no Ready snapshot"), "{none:?}");
    admin(
        &env,
        &[
            "patch",
            "groupsnapshotschedule",
            "hourly",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"lastReadySnapshot":"hourly-202611210300"}}"#,
        ],
        None,
    )
    .ok();
    let manifest = tandem(
        &kc,
        &ns,
        &[
            "restore",
            "create",
            "r",
            "--from-schedule",
            "hourly",
            "--dry-run=client",
            "-o",
            "yaml",
        ],
    )
    .ok();
    assert!(
        manifest
            .stdout
            .contains("groupSnapshotName: hourly-202611210300"),
        "{manifest:?}"
    );
    assert!(
        admin(&env, &["get", "grouprestores", "-o", "name"], None)
            .ok()
            .stdout
            .is_empty(),
        "a client dry run creates nothing"
    );
    tandem(&kc, &ns, &["schedule", "delete", "hourly"]).ok();
    assert!(schedules.get_opt("hourly").await.expect("get").is_none());
}

/// A user bound to the built-in `view` role (the chart's rules aggregate into it) lists and shows
/// groups and snapshots, and cannot create: the error names the verb.
#[tokio::test]
async fn view_user_lists_and_shows_but_cannot_create() {
    let env = TestEnv::new("cli-view").await;
    let kc = env.plane.kubeconfig.clone();
    let ns = env.namespace.clone();
    let rbac = support::helm::helm(&[
        "template",
        "cli-view",
        &support::helm::chart_dir().display().to_string(),
        "--show-only",
        "templates/user-rbac.yaml",
    ])
    .expect("helm template user-rbac");
    admin(&env, &["apply", "-f", "-"], Some(&rbac)).ok();
    admin(
        &env,
        &[
            "create",
            "rolebinding",
            "viewer",
            "--clusterrole=view",
            "--user=viewer",
        ],
        None,
    )
    .ok();
    tandem(&kc, &ns, &["group", "create", "shop", "--claims", "data"]).ok();
    tandem(&kc, &ns, &["snapshot", "create", "shop", "shop-1"]).ok();

    let viewer = std::env::temp_dir().join(format!("tandem-cli-viewer-{ns}.kubeconfig"));
    std::fs::write(&viewer, with_plane(|p| p.kubeconfig_for("viewer", &[]))).expect("kubeconfig");
    // kube-controller-manager aggregates the chart's rules into `view`.
    eventually(
        Duration::from_secs(30),
        "view to aggregate tandem's rules",
        || {
            let viewer = viewer.clone();
            let ns = ns.clone();
            async move { (tandem(&viewer, &ns, &["group", "list"]).code == 0).then_some(()) }
        },
    )
    .await;
    let groups = tandem(&viewer, &ns, &["group", "list"]).ok().stdout;
    assert!(groups.contains("shop"), "{groups}");
    tandem(&viewer, &ns, &["group", "show", "shop"]).ok();
    let snapshots = tandem(&viewer, &ns, &["snapshot", "list"]).ok().stdout;
    assert!(snapshots.contains("shop-1"), "{snapshots}");
    let show = tandem(&viewer, &ns, &["snapshot", "show", "shop-1"])
        .ok()
        .stdout;
    assert!(show.contains("Group:") && show.contains("shop"), "{show}");
    tandem(&viewer, &ns, &["restore", "list"]).ok();
    tandem(&viewer, &ns, &["schedule", "list"]).ok();
    // Nodes are not readable for a namespace viewer: the command says so and shows the rest.
    let nodes = tandem(&viewer, &ns, &["nodes"]).ok();
    assert!(nodes.stderr.contains("cannot list Nodes"), "{nodes:?}");

    for args in [
        vec!["group", "create", "other", "--claims", "a"],
        vec!["snapshot", "create", "shop", "shop-2"],
        vec!["restore", "create", "r", "--from-snapshot", "shop-1"],
        vec!["snapshot", "delete", "shop-1"],
        vec!["group", "add", "shop", "wal"],
        vec![
            "schedule", "create", "s", "--group", "shop", "--cron", "@daily",
        ],
    ] {
        let refused = tandem(&viewer, &ns, &args);
        assert_eq!(refused.code, 1, "{args:?}: {refused:?}");
        assert!(
            refused.stderr.contains("Forbidden") && refused.stderr.contains("\"viewer\" cannot"),
            "{args:?}: {refused:?}"
        );
    }
    let refused = tandem(&viewer, &ns, &["group", "create", "other", "--claims", "a"]);
    assert!(
        refused
            .stderr
            .contains("cannot create resource \"consistencygroups\""),
        "{refused:?}"
    );
    let _ = std::fs::remove_file(&viewer);
}

/// Real agents: `snapshot create --wait` to Ready, `show` with members, freeze per node and
/// consistency, `nodes`, a restore to new claims with `--wait`, a wait that times out (exit 3)
/// naming the node still preparing, a wait on a failing snapshot (exit 1), and delete --wait.
#[tokio::test]
async fn snapshot_and_restore_wait_through_real_agents() {
    if !require_root() {
        return;
    }
    let mut w = World::new("cli-wait").await;
    w.add_volume("data", "a", "xfs", &[("app", "shop")]).await;
    w.add_volume("wal", "b", "ext4", &[("app", "shop")]).await;
    w.start_agent("a");
    w.start_agent("b");
    w.start_controller();
    w.ensure_restore_class().await;
    let kc = w.env.plane.kubeconfig.clone();
    let ns = w.env.namespace.clone();
    let (node_a, node_b) = (w.node("a"), w.node("b"));

    tandem(
        &kc,
        &ns,
        &[
            "group",
            "create",
            "shop",
            "--selector",
            "app=shop",
            "--freeze-timeout",
            "20s",
        ],
    )
    .ok();
    w.wait_group_ready("shop").await;
    let show = tandem(&kc, &ns, &["group", "show", "shop"]).ok().stdout;
    assert!(show.contains(&node_a) && show.contains(&node_b), "{show}");

    let cut = tandem(
        &kc,
        &ns,
        &[
            "snapshot",
            "create",
            "shop",
            "shop-1",
            "--wait",
            "--timeout",
            "60s",
        ],
    )
    .ok();
    assert!(
        cut.stdout
            .contains("groupsnapshot.tandem.dev/shop-1 created")
            && cut
                .stdout
                .contains("shop-1 Ready: 2 members, consistency FilesystemFrozen"),
        "{cut:?}"
    );
    let snapshots: kube::Api<GroupSnapshot> = w.env.api();
    let snapshot = snapshots.get("shop-1").await.expect("snapshot");
    let status = snapshot.status.clone().expect("status");
    assert_eq!(status.phase, GroupSnapshotPhase::Ready);

    let page = tandem(&kc, &ns, &["snapshot", "show", "shop-1"])
        .ok()
        .stdout;
    eprintln!(
        "snapshot create --wait, stderr:\n{}\nsnapshot show:\n{page}",
        cut.stderr
    );
    assert!(
        page.lines().any(|l| l.starts_with("Consistency:")
            && l.contains("FilesystemFrozen: all 2 members were frozen")),
        "{page}"
    );
    for window in &status.nodes {
        let ms = window
            .freeze_window_millis
            .expect("node window")
            .to_string();
        assert!(
            page.lines().any(|l| l.contains(&window.node)
                && l.contains(&ms)
                && l.contains("Release/Released")),
            "node {} with {ms} ms: {page}",
            window.node
        );
    }
    for member in &status.members {
        let handle_backend = member.backend.clone().expect("backend");
        assert!(
            page.lines()
                .any(|l| l.trim_start().starts_with(&member.claim)
                    && l.contains(&member.node)
                    && l.contains(&handle_backend)
                    && l.contains("yes")),
            "member {}: {page}",
            member.claim
        );
    }
    let listed: serde_json::Value = serde_json::from_str(
        &tandem(
            &kc,
            &ns,
            &["snapshot", "list", "--group", "shop", "-o", "json"],
        )
        .ok()
        .stdout,
    )
    .expect("json");
    assert_eq!(listed["items"][0]["status"]["phase"], "Ready");

    let nodes = tandem(&kc, &ns, &["nodes", "-o", "wide"]).ok().stdout;
    eprintln!("nodes -o wide:\n{nodes}");
    for node in [&node_a, &node_b] {
        let line = nodes
            .lines()
            .find(|l| l.starts_with(node.as_str()))
            .unwrap_or_else(|| panic!("{node} in {nodes}"));
        assert!(line.contains("reflink") && line.contains(" ago"), "{line}");
    }

    let restored = tandem(
        &kc,
        &ns,
        &[
            "restore",
            "create",
            "back",
            "--from-snapshot",
            "shop-1",
            "--wait",
            "--timeout",
            "120s",
        ],
    )
    .ok();
    assert!(
        restored
            .stdout
            .contains("back Completed: 2 claims restored"),
        "{restored:?}"
    );
    let page = tandem(&kc, &ns, &["restore", "show", "back"]).ok().stdout;
    assert!(
        page.contains("data-back") && page.contains("wal-back"),
        "{page}"
    );
    let restores = tandem(&kc, &ns, &["restore", "list"]).ok().stdout;
    assert!(
        restores
            .lines()
            .any(|l| l.starts_with("back ") && l.contains("Completed")),
        "{restores}"
    );
    for claim in ["data-back", "wal-back"] {
        admin(&w.env, &["delete", "pvc", claim, "--wait=false"], None).ok();
    }

    // Node b's agent is gone: the wait runs out, exit 3, naming the node the trigger waits for.
    w.agent("b").stop();
    let stuck = tandem(
        &kc,
        &ns,
        &[
            "snapshot",
            "create",
            "shop",
            "shop-2",
            "--wait",
            "--timeout",
            "3s",
        ],
    );
    eprintln!("a wait that times out, stderr:\n{}", stuck.stderr);
    assert_eq!(stuck.code, 3, "{stuck:?}");
    assert!(
        stuck.stderr.contains("timed out after 3s")
            && stuck
                .stderr
                .contains(&format!("still preparing: {node_b} (Pending)")),
        "{stuck:?}"
    );
    // A snapshot that fails: exit 1 with the controller's reason.
    let failed = tandem(
        &kc,
        &ns,
        &[
            "snapshot",
            "create",
            "nogroup",
            "lost",
            "--wait",
            "--timeout",
            "60s",
        ],
    );
    assert_eq!(failed.code, 1, "{failed:?}");
    assert!(
        failed.stderr.contains("lost Failed") && failed.stderr.contains("nogroup"),
        "{failed:?}"
    );

    w.start_agent("b");
    let deleted = tandem(
        &kc,
        &ns,
        &[
            "snapshot",
            "delete",
            "shop-1",
            "shop-2",
            "lost",
            "--wait",
            "--timeout",
            "60s",
        ],
    )
    .ok();
    assert!(
        deleted.stdout.contains("shop-1, shop-2, lost gone"),
        "{deleted:?}"
    );
    assert!(
        snapshots
            .list(&Default::default())
            .await
            .expect("list")
            .items
            .is_empty()
    );
}
