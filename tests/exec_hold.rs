//! What a held exec does when its client goes away, on a real node (kubelet 1.34, containerd,
//! runc): the facts tandem's Hold hooks rest on (research §2.3, items 1.2-1.4). The client is
//! kubectl 1.34, which speaks the same WebSocket protocol as tandem's exec (`v5.channel.k8s.io`,
//! stdin closed with a v5 close frame).
//!
//! - A clean close of stdin reaches the command as EOF: a command that reads stdin ends.
//! - Killing the client (SIGKILL, no close frame) also ends the stream at the kubelet, and the
//!   command sees EOF on stdin: a `mariadb` client holding FLUSH TABLES WITH READ LOCK exits,
//!   and the lock is gone.
//! - A process that does not read stdin outlives its exec (nothing signals it); a
//!   `timeout -s KILL` prefix (tandem's `wrap: Timeout`) is what ends it.
//!
//! One real node shared by the tests, one pod (the MariaDB image: sh, coreutils' timeout,
//! MariaDB on an emptyDir). Needs root; skips with a message otherwise.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use serde_json::json;
use support::control_plane::tools_bin;
use support::node::{self, mariadb_images, shared_cluster, with_cluster};
use tandem::controller::hooks::exec::Hold as TandemHold;

const NS: &str = "exec-hold";
const POD: &str = "db";
const WAIT: Duration = Duration::from_secs(60);

fn require_root() -> bool {
    if !node::can_run_nodes() {
        eprintln!("SKIPPED: the real node needs root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// The shared node with the MariaDB pod Running and Ready (MariaDB up, table `hold.t`).
fn pod() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        shared_cluster();
        let images = mariadb_images();
        with_cluster(|c| {
            c.nodes[0].import(&images["mariadb"]);
            let pod = json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": POD, "namespace": NS},
                "spec": {
                    "terminationGracePeriodSeconds": 0,
                    "securityContext": {"runAsUser": 0},
                    "containers": [{"name": "mariadb", "image": images["mariadb_ref"],
                        "imagePullPolicy": "Never",
                        "command": ["/bin/sh", "-c", "set -e; mkdir -p /run/mysqld; chown mysql:mysql /data /run/mysqld; mariadb-install-db --user=mysql --datadir=/data/db --skip-test-db >/dev/null; exec mariadbd --user=mysql --datadir=/data/db --socket=/run/mysqld/mysqld.sock --skip-networking"],
                        "readinessProbe": {"exec": {"command": ["mariadb", "-e", "CREATE DATABASE IF NOT EXISTS hold; CREATE TABLE IF NOT EXISTS hold.t (i INT) ENGINE=InnoDB"]},
                                           "periodSeconds": 1},
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}]
                }
            });
            let file = c.root.join("exec-hold-pod.json");
            std::fs::write(&file, pod.to_string()).expect("manifest");
            c.kubectl(&["create", "namespace", NS]).expect("namespace");
            c.kubectl(&["apply", "-f", &file.display().to_string()])
                .expect("pod");
            c.kubectl_timeout(
                &[
                    "-n",
                    NS,
                    "wait",
                    "--for=condition=Ready",
                    &format!("pod/{POD}"),
                    "--timeout=90s",
                ],
                Duration::from_secs(100),
            )
            .unwrap_or_else(|e| {
                panic!(
                    "pod not Ready: {e}\n{}",
                    c.kubectl(&["-n", NS, "logs", POD]).unwrap_or_default()
                )
            });
        });
    });
}

/// A short exec (`sh -c script`) in the pod; its stdout, or why it failed.
fn sh(script: &str) -> Result<String, String> {
    with_cluster(|c| {
        c.kubectl_timeout(
            &["-n", NS, "exec", POD, "--", "sh", "-c", script],
            Duration::from_secs(15),
        )
    })
}

/// Whether the process whose pid is in `file` (in the container) is alive. A zombie is not:
/// `timeout -s KILL` signals its whole process group, itself included, so its killed child is
/// left to the container's PID 1, which (mariadbd here, like most servers) never reaps it.
fn alive(file: &str) -> bool {
    sh(&format!(
        "s=$(ps -o stat= -p \"$(cat {file})\") && [ \"${{s#Z}}\" = \"$s\" ]"
    ))
    .is_ok()
}

fn poll(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A held exec: kubectl exec -i with stdin open, its stdout lines on a channel.
struct Hold {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
}

impl Hold {
    fn start(command: &[&str]) -> Hold {
        let kubeconfig = with_cluster(|c| c.plane.kubeconfig.clone());
        let mut child = Command::new(tools_bin().join("kubectl"))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args(["-n", NS, "exec", "-i", POD, "-c", "mariadb", "--"])
            .args(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("kubectl exec");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Hold {
            child,
            stdin,
            lines,
        }
    }

    /// Waits for a line of stdout (the hold's ready marker).
    fn expect_line(&self, want: &str) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.trim() == want => return,
                Ok(_) => {}
                Err(e) => panic!("no line {want:?} from the hold: {e}"),
            }
        }
    }

    fn write(&mut self, text: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(text.as_bytes()).expect("write stdin");
        stdin.flush().expect("flush stdin");
    }

    /// Closes stdin (kubectl sends the v5 close of the stdin stream) and waits for the exit.
    fn close(mut self) -> std::process::ExitStatus {
        drop(self.stdin.take());
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "kubectl exec did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the client abruptly: no close frame, the connection just drops.
    fn kill(mut self) {
        self.child.kill().expect("kill kubectl");
        let _ = self.child.wait();
    }
}

/// Item 1.2: closing stdin cleanly ends a command that reads it, with the exit status.
#[test]
fn a_clean_stdin_close_ends_a_command_that_reads_stdin() {
    if !require_root() {
        return;
    }
    pod();
    let mut hold = Hold::start(&[
        "sh",
        "-c",
        "echo $$ > /tmp/clean.pid; echo READY; while read -r line; do echo \"got $line\"; done; echo RELEASED",
    ]);
    hold.expect_line("READY");
    hold.write("one\n");
    hold.expect_line("got one");
    assert!(alive("/tmp/clean.pid"), "the hold runs while stdin is open");
    let lines = std::mem::replace(&mut hold.lines, channel().1);
    let status = hold.close();
    assert!(status.success(), "kubectl exec ended with {status}");
    assert!(
        lines.iter().any(|l| l == "RELEASED"),
        "the command saw EOF and went on"
    );
    assert!(!alive("/tmp/clean.pid"), "the command ended with its exec");
}

/// Item 1.3 (the shape of it, without MariaDB): killing the client makes the command see EOF on
/// stdin.
#[test]
fn killing_the_exec_client_closes_the_commands_stdin() {
    if !require_root() {
        return;
    }
    pod();
    let hold = Hold::start(&[
        "sh",
        "-c",
        "echo $$ > /tmp/killed.pid; echo READY; cat > /dev/null; touch /tmp/killed.eof",
    ]);
    hold.expect_line("READY");
    assert!(alive("/tmp/killed.pid"));
    hold.kill();
    poll("the command to see EOF after the client died", || {
        sh("test -e /tmp/killed.eof").is_ok()
    });
    poll("the command to end", || !alive("/tmp/killed.pid"));
}

/// Item 1.3: a `mariadb` client holding FLUSH TABLES WITH READ LOCK blocks writers; released
/// cleanly (UNLOCK TABLES, stdin closed) or by killing the exec client, the lock is gone.
#[test]
fn a_mariadb_read_lock_hold_ends_with_a_clean_release_and_with_a_killed_client() {
    if !require_root() {
        return;
    }
    pod();
    let write =
        || sh("mariadb -e 'SET SESSION lock_wait_timeout=1; INSERT INTO hold.t VALUES (1)'");
    write().expect("a write before the hold");
    let hold_command = ["mariadb", "--unbuffered", "-N"];
    let ready = "FLUSH TABLES WITH READ LOCK; SELECT 'TANDEM_READY';\n";

    let mut hold = Hold::start(&hold_command);
    hold.write(ready);
    hold.expect_line("TANDEM_READY");
    let blocked = write().expect_err("a write under the read lock");
    assert!(blocked.contains("Lock wait timeout"), "{blocked}");
    hold.write("UNLOCK TABLES;\n");
    let status = hold.close();
    assert!(status.success(), "the client ended with {status}");
    write().expect("a write after the release");

    let mut hold = Hold::start(&hold_command);
    hold.write(ready);
    hold.expect_line("TANDEM_READY");
    let blocked = write().expect_err("a write under the read lock");
    assert!(blocked.contains("Lock wait timeout"), "{blocked}");
    hold.kill();
    poll("the read lock to go with the killed client", || {
        write().is_ok()
    });
}

/// Item 1.4: a process that does not read stdin outlives its exec (the stream's end reaches
/// only stdin); `timeout -s KILL` in front of it (tandem's `wrap: Timeout`) ends it.
#[test]
fn a_command_that_ignores_stdin_outlives_its_exec_unless_wrapped_in_timeout() {
    if !require_root() {
        return;
    }
    pod();
    // sh reads stdin (cat) so that the test sees the stream's end; `sleep` (stdin /dev/null, as
    // every background job of sh) is the process that ignores it.
    let hold = Hold::start(&[
        "sh",
        "-c",
        "sleep 3600 & echo $! > /tmp/ignore.pid; echo READY; cat > /dev/null; touch /tmp/ignore.eof; wait",
    ]);
    hold.expect_line("READY");
    hold.kill();
    poll("the stream's end to reach the container", || {
        sh("test -e /tmp/ignore.eof").is_ok()
    });
    assert!(
        alive("/tmp/ignore.pid"),
        "a process that ignores stdin survives its exec"
    );
    let ps = sh("ps -eo pid,ppid,args").unwrap_or_default();
    assert!(ps.contains("sleep 3600"), "{ps}");
    sh("kill \"$(cat /tmp/ignore.pid)\"").expect("end the survivor");

    // The same hold behind tandem's wrap: the deadline inside the container ends it.
    let hold = Hold::start(&[
        "timeout",
        "-s",
        "KILL",
        "5",
        "sh",
        "-c",
        "echo $$ > /tmp/wrapped.pid; echo READY; exec sleep 3600",
    ]);
    hold.expect_line("READY");
    hold.kill();
    poll("timeout -s KILL to end the wrapped hold", || {
        !alive("/tmp/wrapped.pid")
    });
}

/// Items 1.2 and 1.3 through tandem's own exec (kube's WebSocket client, the hooks' `Hold`): a
/// release closes stdin with a v5 close and the `mariadb` hold exits 0; a session dropped without
/// a release (what a dying controller leaves) also ends the command, and the lock goes with it.
#[tokio::test(flavor = "multi_thread")]
async fn tandems_exec_releases_a_hold_by_closing_stdin_and_a_dropped_session_ends_it() {
    if !require_root() {
        return;
    }
    pod();
    let kubeconfig = with_cluster(|c| c.plane.kubeconfig.clone());
    let client = support::client_for(&kubeconfig).await;
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(client, NS);
    let command: Vec<String> = ["mariadb", "--unbuffered", "-N"].map(String::from).to_vec();
    let ready = "FLUSH TABLES WITH READ LOCK; SELECT 'TANDEM_READY';\n";
    let write =
        || sh("mariadb -e 'SET SESSION lock_wait_timeout=1; INSERT INTO hold.t VALUES (2)'");
    let open = || {
        TandemHold::open(
            &pods,
            POD,
            "mariadb",
            &command,
            Some(ready),
            "TANDEM_READY",
            Duration::from_secs(30),
        )
    };

    let hold = open().await.expect("the hold is ready");
    let blocked = tokio::task::block_in_place(write).expect_err("a write under the lock");
    assert!(blocked.contains("Lock wait timeout"), "{blocked}");
    let outcome = hold
        .release(Some("UNLOCK TABLES;\n"), true, Duration::from_secs(10))
        .await;
    assert!(outcome.success, "released cleanly: {outcome:?}");
    tokio::task::block_in_place(write).expect("a write after the release");

    let hold = open().await.expect("the hold is ready again");
    tokio::task::block_in_place(write).expect_err("a write under the lock");
    drop(hold);
    tokio::task::block_in_place(|| {
        poll("the lock to go with the dropped session", || {
            write().is_ok()
        })
    });
}
