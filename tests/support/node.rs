//! Real nodes for the tests: kubelet + containerd (Debian's, with runc and the CNI plugins),
//! registered with a control plane started in node mode (kube-scheduler, Node authorizer).
//!
//! Each node has a folder of its own (containerd root and state, kubelet root, CNI config, pod
//! logs) and a network namespace of its own: kubelet, containerd and every pod of that node run in
//! it, joined to the host by one veth pair. The API server listens on the host end of node 0's
//! pair; pods reach it as the `kubernetes` Service (10.0.0.1:443) through one DNAT rule in the
//! node's namespace (there is no kube-proxy). Nothing in a node can reach any other network.
//!
//! Cleanup follows the control plane's rules and goes further, since containers outlive
//! containerd: one shell script (`cleanup.sh` in the cluster folder) thaws, kills (by command line
//! and by the node's cgroups), unmounts, detaches loop devices, deletes the network namespaces and
//! cgroups, and removes the folder. It runs at exit (atexit), from a reaper process that waits for
//! the test binary to die (also after SIGKILL), and for leftovers of dead runs when a cluster starts.
//!
//! Images come from hack/image/build.sh (no registry) and are imported with `ctr images import`.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};

use serde_json::json;

use super::control_plane::{ControlPlane, PlaneOptions, tools_bin};
use super::repo_root;

/// Where every cluster's folder lives (leftovers of dead runs are found here).
const CLUSTERS_DIR: &str = "/var/tmp/tandem-nodes";
/// Node i's pods get 10.<octet>.<POD_CIDR_BASE + i>.0/24.
const POD_CIDR_BASE: usize = 100;

/// A command's stdout, or its stderr and stdout on failure.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn must(program: &str, args: &[&str]) -> String {
    run(Command::new(program).args(args)).unwrap_or_else(|e| panic!("{e}"))
}

/// Runs a command with a host-side deadline (SIGKILL when it passes): a process that touches a
/// frozen filesystem blocks in the kernel, and a timeout inside the pod cannot end it.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<String, String> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{cmd:?} did not finish within {timeout:?}"));
            }
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{cmd:?} failed ({}): {}{stdout}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A program of the host the real node needs; panics with what to install when it is missing.
fn host_program(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} is missing: run hack/install-test-deps.sh (containerd, runc, CNI plugins)");
}

fn kube_tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(
        path.exists(),
        "{} is missing: run hack/test-tools.sh (it builds kubelet and kube-scheduler too)",
        path.display()
    );
    path
}

/// Whether this process can run a real node (root: namespaces, mounts, cgroups).
pub fn can_run_nodes() -> bool {
    rustix::process::geteuid().is_root()
}

/// The images hack/image/build.sh made (KEY=PATH lines), built once per test binary.
pub fn images() -> &'static BTreeMap<String, String> {
    static IMAGES: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    IMAGES.get_or_init(|| build_images(&["--postgres"]))
}

/// [`images`] plus the MariaDB image (`mariadb`, `mariadb_ref`), which only the quiesce hook
/// tests need, built on first use.
pub fn mariadb_images() -> &'static BTreeMap<String, String> {
    static IMAGES: OnceLock<BTreeMap<String, String>> = OnceLock::new();
    IMAGES.get_or_init(|| build_images(&["--postgres", "--mariadb"]))
}

fn build_images(flags: &[&str]) -> BTreeMap<String, String> {
    // Tests get the binary cargo built for them; the demo (an example) the debug build.
    let binary = option_env!("CARGO_BIN_EXE_tandem")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| repo_root().join("target"))
                .join("debug/tandem")
        });
    let started = Instant::now();
    let out = run(Command::new(repo_root().join("hack/image/build.sh"))
        .args(flags)
        .arg(&binary)
        .stderr(Stdio::inherit()))
    .unwrap_or_else(|e| panic!("building tandem's image: {e}"));
    eprintln!(
        "[node] images ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    out.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// One real node: its folder, network namespace, containerd and kubelet.
pub struct Node {
    pub name: String,
    pub index: usize,
    pub dir: PathBuf,
    pub netns: String,
    /// The node's address (its end of the veth pair); the kubelet serves there.
    pub address: String,
    /// The kubelet's root folder: a filesystem of its own (loop-backed XFS, its image in the
    /// reflink pool `disks_dir/.node-pool`), a shared mount (Bidirectional mounts need one).
    pub kubelet_dir: PathBuf,
    /// A shared mount for tests' local volumes and their pools (the chart's `extraHostPaths`).
    pub disks_dir: PathBuf,
    /// The agent's journal folder (the chart's `agent.stateDir`).
    pub state_dir: PathBuf,
    pub containerd_socket: PathBuf,
    processes: Vec<(String, Child)>,
}

impl Node {
    /// `ctr` against this node's containerd, in the k8s.io namespace (the kubelet's).
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new(host_program("ctr"))
            .arg("--address")
            .arg(&self.containerd_socket)
            .args(["-n", "k8s.io"])
            .args(args))
    }

    /// Imports an OCI archive into this node's containerd.
    pub fn import(&self, archive: &str) {
        self.ctr(&["images", "import", archive])
            .unwrap_or_else(|e| panic!("import {archive}: {e}"));
    }

    /// A folder of this node for a test's image files (a pool's image goes here, not in a
    /// scratch folder: the cluster's cleanup then detaches its loop device even after a kill).
    pub fn images_dir(&self) -> PathBuf {
        let dir = self.dir.join("images");
        fs::create_dir_all(&dir).expect("images dir");
        dir
    }

    /// The last lines a process of this node logged.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            fs::read_to_string(self.dir.join(format!("logs/{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&mut self, name: &str, program: &Path, args: &[String]) {
        let log = fs::File::create(self.dir.join(format!("logs/{name}.log"))).expect("log file");
        let mut cmd = Command::new(host_program("nsenter"));
        // Only the network namespace: the kubelet's mounts must be the host's, so the test (and
        // the agent's Bidirectional mounts) see them.
        cmd.arg(format!("--net=/run/netns/{}", self.netns))
            .arg("--")
            .arg(program)
            .args(args);
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.processes.push((name.into(), child));
    }

    fn exited(&mut self) -> Option<String> {
        self.processes.iter_mut().find_map(|(name, child)| {
            let status = child.try_wait().ok()??;
            Some(format!("{name} exited with {status}"))
        })
    }
}

/// Control plane (node mode) and real nodes. Dropping it removes everything.
pub struct Cluster {
    pub root: PathBuf,
    pub nodes: Vec<Node>,
    pub plane: ControlPlane,
    /// Host end of node 0's veth pair: the API server's address.
    pub api_address: String,
    helm_home: PathBuf,
    /// Waits for this process to die and then cleans up (not killed with us on purpose).
    reaper: Child,
    cleaned: bool,
}

/// Addresses of one cluster: 10.<octet>.<node>.1 (host end) and .2 (node end), pods in
/// 10.<octet>.<100 + node>.0/24.
fn free_octet() -> u8 {
    let used = must("ip", &["-o", "-4", "addr", "show"]);
    let start = 200 + (std::process::id() % 50) as u8;
    (0..50u8)
        .map(|i| 200 + (start - 200 + i) % 50)
        .find(|o| !used.contains(&format!(" 10.{o}.")))
        .expect("no free 10.x.0.0/16 range for the node network")
}

fn write(path: &Path, content: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("dir");
    }
    fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Makes `dir` a shared mount (a bind of itself), so mounts below it propagate both ways.
fn make_shared(dir: &Path) {
    fs::create_dir_all(dir).expect("dir");
    let d = dir.to_string_lossy();
    must("mount", &["--bind", &d, &d]);
    must("mount", &["--make-rshared", &d]);
}

/// Attaches an image to a free loop device (losetup allocates atomically; retried when another
/// process raced for the same number).
fn attach_loop(image: &Path) -> String {
    let mut last = String::new();
    for _ in 0..10 {
        match run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image))
        {
            Ok(out) => return out.trim().to_string(),
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("losetup {}: {last}", image.display());
}

fn cgroup_root(id: &str, index: usize) -> String {
    format!("tandem-{id}-n{index}")
}

/// Creates the node's cgroup in every hierarchy (the kubelet refuses a cgroupRoot that does
/// not exist; cpuset needs its cpus and mems before anything can join).
fn make_cgroups(name: &str) {
    let Ok(entries) = fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for entry in entries.flatten() {
        let hierarchy = entry.path();
        if !hierarchy.join("cgroup.procs").exists() {
            continue;
        }
        let dir = hierarchy.join(name);
        let _ = fs::create_dir_all(&dir);
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = fs::read_to_string(hierarchy.join(file)) {
                let _ = fs::write(dir.join(file), value.trim());
            }
        }
    }
}

/// The script that removes one cluster, whatever state it is in. Idempotent.
fn cleanup_script(root: &Path, id: &str, netns: &[String]) -> String {
    let r = root.display();
    format!(
        r#"#!/bin/sh
# Removes real-node cluster {r} (tests/support/node.rs): at exit, from the reaper after a kill,
# or when a later run finds it. Idempotent.
#   cleanup.sh [--after PID]    (wait until PID is gone first)
R={r}
if [ "${{1:-}}" = --after ]; then while [ -e /proc/$2 ]; do sleep 0.5; done; fi
[ -d "$R" ] || exit 0
exec >>"$R.cleanup.log" 2>&1
echo "cleanup of $R at $(date)"
mounts() {{ findmnt -rn -o TARGET | grep "^$R/" | sort -r; }}
# Never leave a filesystem frozen: thaw every mount of ours first.
for m in $(mounts); do fsfreeze -u "$m" 2>/dev/null; done
# containerd 1.6 puts its shims' sockets in /run/containerd/s whatever its state dir: ours are the
# ones bound in our network namespaces (read them before the shims die).
sockets=$(for ns in {netns}; do nsenter --net=/run/netns/$ns cat /proc/net/unix 2>/dev/null; done | grep -o '/run/containerd/s/[0-9a-f]*' | sort -u)
# Processes: kubelet, containerd and shims name the folder; containers live in the cgroups.
for i in 1 2 3 4 5 6 7 8 9 10; do
  pids=$(grep -l -a -F "$R/" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3 | grep -vx "$$")
  for d in /sys/fs/cgroup/pids/tandem-{id}-n*; do
    [ -d "$d" ] && pids="$pids $(find "$d" -name cgroup.procs -exec cat {{}} + 2>/dev/null)"
  done
  [ -z "$(echo $pids)" ] && break
  kill -9 $pids 2>/dev/null
  sleep 0.3
done
for m in $(mounts); do fsfreeze -u "$m" 2>/dev/null; done
# Our loop devices: an image under $R, or an image on a filesystem of one of ours (a volume in a
# pool), however deep.
our_loops() {{
  losetup -l -n -O NAME,MAJ:MIN,BACK-MAJ:MIN,BACK-FILE | awk -v r="$R/" '
    {{ name[NR] = $1; dev[NR] = $2; back[NR] = $3; file[NR] = $4 }}
    END {{
      for (i = 1; i <= NR; i++) if (index(file[i], r) == 1) ours[dev[i]] = 1
      do {{ added = 0
        for (i = 1; i <= NR; i++) if (!(dev[i] in ours) && (back[i] in ours)) {{ ours[dev[i]] = 1; added = 1 }}
      }} while (added)
      for (i = 1; i <= NR; i++) if (dev[i] in ours) print name[i]
    }}'
}}
# Mounts (deepest first) and loop devices, until nothing is left. A pool stays busy until the loop
# devices of its images are gone, so lazy unmounts only at the very end (they would hide the pool
# and the images' paths).
for i in 1 2 3 4 5 6; do
  for m in $(mounts); do umount "$m" 2>/dev/null; done
  for l in $(our_loops); do losetup -d "$l" 2>/dev/null; done
  [ -z "$(mounts)" ] && [ -z "$(our_loops)" ] && break
  sleep 0.5
done
for m in $(mounts); do umount -l "$m" 2>/dev/null; done
for ns in {netns}; do ip netns delete "$ns" 2>/dev/null; done
for d in /sys/fs/cgroup/*/tandem-{id}-n*; do [ -d "$d" ] && find "$d" -depth -type d -exec rmdir {{}} \; 2>/dev/null; done
# What the kubelet, CNI and containerd write outside their folders.
find /var/log/containers -maxdepth 1 -lname "$R/*" -delete 2>/dev/null
rm -f /var/lib/cni/results/tandem-{id}-n* $sockets 2>/dev/null
for id in $(ls "$R"/n*/containerd/root/io.containerd.grpc.v1.cri/sandboxes 2>/dev/null); do rm -f /var/lib/cni/results/*-"$id"-*; done
rmdir /var/lib/cni/results /var/lib/cni /var/log/containers /run/containerd/s /run/containerd 2>/dev/null
# Only when nothing of ours is mounted any more (rm must never walk into a host mount).
if [ -z "$(mounts)" ]; then rm -rf --one-file-system "$R" && rm -f "$R.cleanup.log"; else echo "still mounted:"; mounts; fi
"#,
        netns = netns.join(" "),
    )
}

/// Runs the cleanup of every cluster folder whose test binary is gone (a kill the reaper did not
/// survive, a reboot).
fn clean_dead_clusters() {
    let Ok(entries) = fs::read_dir(CLUSTERS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let Ok(owner) = fs::read_to_string(dir.join("owner")) else {
            continue;
        };
        let alive = owner
            .trim()
            .parse::<u32>()
            .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive && dir.join("cleanup.sh").exists() {
            eprintln!("[node] removing the leftovers of {}", dir.display());
            let _ = run(Command::new("sh").arg(dir.join("cleanup.sh")));
        }
    }
}

impl Cluster {
    /// Starts a control plane in node mode and `count` real nodes, and waits until every node is
    /// Ready. Call it from a thread that outlives the cluster (PR_SET_PDEATHSIG).
    pub fn start(count: usize) -> Cluster {
        assert!((1..=50).contains(&count), "1 to 50 nodes");
        let started = Instant::now();
        for program in ["containerd", "runc", "ctr", "nsenter", "iptables"] {
            host_program(program);
        }
        assert!(
            Path::new("/usr/lib/cni/bridge").exists(),
            "the CNI plugins are missing: run hack/install-test-deps.sh"
        );
        let kubelet = kube_tool("kubelet");
        kube_tool("kube-scheduler");
        clean_dead_clusters();
        let images = images();

        // One id per cluster (a process may run several): names of folders, namespaces, cgroups.
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let pid = std::process::id();
        let id = format!("{pid}c{}", SEQUENCE.fetch_add(1, Ordering::Relaxed));
        fs::create_dir_all(CLUSTERS_DIR).expect("clusters dir");
        let root = PathBuf::from(CLUSTERS_DIR).join(&id);
        assert!(!root.exists(), "{} exists already", root.display());
        fs::create_dir_all(&root).expect("cluster dir");
        // Two clusters of this process must not pick the same range at once.
        static NETWORK: Mutex<()> = Mutex::new(());
        let network = NETWORK.lock().unwrap_or_else(|e| e.into_inner());
        let octet = free_octet();
        let netns: Vec<String> = (0..count).map(|i| format!("tandem-{id}-n{i}")).collect();
        let script = root.join("cleanup.sh");
        write(&script, &cleanup_script(&root, &id, &netns));
        write(&root.join("owner"), &pid.to_string());
        // The reaper: its own session, not a child that dies with us; it cleans up after a kill.
        let reaper = Command::new("setsid")
            .arg("sh")
            .arg(&script)
            .args(["--after", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the cleanup reaper");

        // Networks first: the API server binds the host end of node 0's pair.
        for (i, ns) in netns.iter().enumerate() {
            let host_if = format!("t{id}h{i}");
            assert!(host_if.len() <= 15, "interface name {host_if} too long");
            must("ip", &["netns", "add", ns]);
            must(
                "ip",
                &[
                    "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", ns,
                ],
            );
            must(
                "ip",
                &[
                    "addr",
                    "add",
                    &format!("10.{octet}.{i}.1/24"),
                    "dev",
                    &host_if,
                ],
            );
            must("ip", &["link", "set", &host_if, "up"]);
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["link", "set", "eth0", "up"],
            ] {
                let mut all = vec!["-n", ns.as_str()];
                all.extend(args);
                must("ip", &all);
            }
            must(
                "ip",
                &[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.{octet}.{i}.2/24"),
                    "dev",
                    "eth0",
                ],
            );
            if i > 0 {
                must(
                    "ip",
                    &[
                        "-n",
                        ns,
                        "route",
                        "add",
                        &format!("10.{octet}.0.1/32"),
                        "via",
                        &format!("10.{octet}.{i}.1"),
                    ],
                );
            }
        }
        drop(network);
        let api_address = format!("10.{octet}.0.1");
        let plane = ControlPlane::start_with(
            &repo_root().join("crds"),
            &PlaneOptions {
                node_address: Some(api_address.clone()),
                // The chart brings them (tests/real_node.rs installs it).
                skip_crds: true,
            },
        );
        let api_port = plane
            .server
            .rsplit(':')
            .next()
            .expect("server port")
            .to_string();
        let ca = root.join("ca.crt");
        write(&ca, &plane.ca_pem);

        let mut cluster = Cluster {
            root: root.clone(),
            nodes: Vec::new(),
            plane,
            api_address: api_address.clone(),
            helm_home: root.join("helm"),
            reaper,
            cleaned: false,
        };
        let mut kubelets_started = None;
        for (i, ns) in netns.iter().enumerate() {
            let dir = root.join(format!("n{i}"));
            let mut node = Node {
                name: format!("node-{i}"),
                index: i,
                dir: dir.clone(),
                netns: ns.clone(),
                address: format!("10.{octet}.{i}.2"),
                kubelet_dir: dir.join("kubelet"),
                disks_dir: dir.join("disks"),
                state_dir: dir.join("tandem-state"),
                containerd_socket: dir.join("containerd/containerd.sock"),
                processes: Vec::new(),
            };
            fs::create_dir_all(node.dir.join("logs")).expect("logs");
            // The kubelet's root is a filesystem of its own: a test-made XFS on a loop device over
            // an image in a reflink pool under the shared folder, so the agent could snapshot it
            // like any local volume. A test offers it to the agent, which must refuse it (M3);
            // if it does not, only this test-made filesystem is frozen, never the host's.
            // Shared mounts are made before the kubelet starts (binding over live pod mounts
            // would hide them).
            make_shared(&node.disks_dir);
            let pool = node.disks_dir.join(".node-pool");
            let pool_image = node.dir.join("node-pool.img");
            fs::File::create(&pool_image)
                .and_then(|f| f.set_len(8 << 30))
                .expect("node pool image");
            let device = attach_loop(&pool_image);
            must("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", &device]);
            fs::create_dir_all(&pool).expect("node pool dir");
            must("mount", &[&device, &pool.to_string_lossy()]);
            let image = pool.join("kubelet.img");
            fs::File::create(&image)
                .and_then(|f| f.set_len(4 << 30))
                .expect("kubelet image");
            let device = attach_loop(&image);
            must("mkfs.xfs", &["-q", "-f", &device]);
            fs::create_dir_all(&node.kubelet_dir).expect("kubelet dir");
            must("mount", &[&device, &node.kubelet_dir.to_string_lossy()]);
            must(
                "mount",
                &["--make-rshared", &node.kubelet_dir.to_string_lossy()],
            );
            let in_ns = |args: &[&str]| {
                let net = format!("--net=/run/netns/{ns}");
                let mut all = vec![net.as_str(), "--"];
                all.extend_from_slice(args);
                must("nsenter", &all);
            };
            let pods = format!("10.{octet}.{}.0/24", POD_CIDR_BASE + i);
            in_ns(&["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]);
            // No kube-proxy: the `kubernetes` Service is one DNAT rule; pods leave masqueraded.
            in_ns(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "PREROUTING",
                "-d",
                "10.0.0.1/32",
                "-p",
                "tcp",
                "--dport",
                "443",
                "-j",
                "DNAT",
                "--to-destination",
                &format!("{api_address}:{api_port}"),
            ]);
            in_ns(&[
                "iptables",
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-s",
                &pods,
                "-o",
                "eth0",
                "-j",
                "MASQUERADE",
            ]);
            let phase = Instant::now();
            start_containerd(&mut node, &pods);
            node.import(&images["pause"]);
            eprintln!(
                "[node] {}: containerd and the pause image in {:.1} s",
                node.name,
                phase.elapsed().as_secs_f64()
            );
            let kubeconfig = node.dir.join("kubelet.kubeconfig");
            write(
                &kubeconfig,
                &cluster
                    .plane
                    .kubeconfig_for(&format!("system:node:{}", node.name), &["system:nodes"]),
            );
            let cgroup = cgroup_root(&id, i);
            make_cgroups(&cgroup);
            let config = node.dir.join("kubelet.yaml");
            write(&config, &kubelet_config(&node, &ca, &cgroup));
            let args = vec![
                format!("--config={}", config.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", node.kubelet_dir.display()),
                format!("--cert-dir={}", node.dir.join("kubelet-pki").display()),
                format!("--hostname-override={}", node.name),
                format!("--node-ip={}", node.address),
                "--v=1".into(),
            ];
            node.spawn("kubelet", &kubelet, &args);
            kubelets_started.get_or_insert_with(Instant::now);
            // tandem's image goes in while the kubelet registers (others on demand: import).
            let phase = Instant::now();
            node.import(&images["tandem"]);
            eprintln!(
                "[node] {}: tandem's image imported in {:.1} s",
                node.name,
                phase.elapsed().as_secs_f64()
            );
            cluster.nodes.push(node);
        }
        cluster.wait_nodes_ready(Duration::from_secs(60));
        eprintln!(
            "[node] {count} node(s) Ready {:.1} s after the first kubelet started, {:.1} s in all (folder {})",
            kubelets_started.map_or(0.0, |t| t.elapsed().as_secs_f64()),
            started.elapsed().as_secs_f64(),
            root.display()
        );
        cluster
    }

    fn wait_nodes_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            for node in &mut self.nodes {
                if let Some(exit) = node.exited() {
                    panic!("{exit}:\n{}", node.log_tail("kubelet", 30));
                }
            }
            let ready = self
                .kubectl(&[
                    "get",
                    "nodes",
                    "-o",
                    "jsonpath={range .items[*]}{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
                ])
                .unwrap_or_default();
            if ready.lines().filter(|l| *l == "True").count() == self.nodes.len() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "nodes not Ready after {timeout:?}:\n{}",
                    self.nodes[0].log_tail("kubelet", 40)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// kubectl as cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.plane.kubectl(args)
    }

    /// kubectl with a host-side deadline (for execs that may meet a frozen filesystem).
    pub fn kubectl_timeout(&self, args: &[&str], timeout: Duration) -> Result<String, String> {
        run_with_timeout(
            Command::new(tools_bin().join("kubectl"))
                .arg(format!("--kubeconfig={}", self.plane.kubeconfig.display()))
                .args(args),
            timeout,
        )
    }

    /// kubectl with a bearer token (a pod's service-account token) instead of the admin's.
    pub fn kubectl_with_token(&self, token: &str, args: &[&str]) -> Result<String, String> {
        run(Command::new(tools_bin().join("kubectl"))
            .env_remove("KUBECONFIG")
            .arg(format!("--server={}", self.plane.server))
            .arg(format!(
                "--certificate-authority={}",
                self.root.join("ca.crt").display()
            ))
            .arg(format!("--token={}", token.trim()))
            .args(args))
    }

    /// helm as cluster admin, its caches in the cluster folder.
    pub fn helm(&self, args: &[&str]) -> Result<String, String> {
        run(Command::new(kube_tool("helm"))
            .env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"))
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.plane.kubeconfig)
            .args(args))
    }

    /// Stops everything and removes every trace (also what pods and the kubelet made).
    pub fn stop(&mut self) {
        if self.cleaned {
            return;
        }
        self.cleaned = true;
        let started = Instant::now();
        for node in &mut self.nodes {
            for (_, child) in node.processes.iter_mut().rev() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Err(e) = run(Command::new("sh").arg(self.root.join("cleanup.sh"))) {
            eprintln!("[node] cleanup: {e}");
        }
        // The cleanup ended the reaper (its command line names the folder); collect it.
        let _ = self.reaper.kill();
        let _ = self.reaper.wait();
        eprintln!(
            "[node] cluster {} removed in {:.1} s",
            self.root.display(),
            started.elapsed().as_secs_f64()
        );
        self.plane.stop();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn start_containerd(node: &mut Node, pods: &str) {
    let c = node.dir.join("containerd");
    let cni = node.dir.join("cni");
    fs::create_dir_all(cni.join("net.d")).expect("cni dir");
    let config = c.join("config.toml");
    write(
        &config,
        &format!(
            r#"version = 2
root = "{c}/root"
state = "{c}/state"
oom_score = 0
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[debug]
  address = "{c}/debug.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/tandem/pause:1"
  enable_selinux = false
  # The test VM withholds CAP_SYS_RESOURCE even from root: runc cannot lower oom_score_adj for
  # the sandbox; clamp the scores at containerd's own.
  restrict_oom_score_adj = true
  disable_apparmor = true
  # The pods' network namespaces live in the state folder (cleaned up with it).
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{c}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}/net.d"
    max_conf_num = 1
"#,
            c = c.display(),
            sock = node.containerd_socket.display(),
            cni = cni.display(),
        ),
    );
    // The bridge lives in the node's namespace; pods get routes to the node and the Service
    // range only.
    write(
        &cni.join("net.d/10-tandem.conflist"),
        &format!(
            r#"{{"cniVersion": "0.4.0", "name": "{name}", "plugins": [
  {{"type": "bridge", "bridge": "tandem0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {{"type": "host-local", "ranges": [[{{"subnet": "{pods}"}}]],
            "routes": [{{"dst": "{node}/32"}}, {{"dst": "10.0.0.0/24"}}], "dataDir": "{cni}/ipam"}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}
]}}"#,
            name = node.netns,
            node = node.address,
            cni = cni.display(),
        ),
    );
    let containerd = host_program("containerd");
    node.spawn(
        "containerd",
        &containerd,
        &["--config".into(), config.display().to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.ctr(&["version"]).is_err() {
        if let Some(exit) = node.exited() {
            panic!("{exit}:\n{}", node.log_tail("containerd", 30));
        }
        assert!(
            Instant::now() < deadline,
            "containerd did not answer:\n{}",
            node.log_tail("containerd", 30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn kubelet_config(node: &Node, ca: &Path, cgroup: &str) -> String {
    let resolv = node.dir.join("resolv.conf");
    write(&resolv, "nameserver 127.0.0.1\n");
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: /{cgroup}
failCgroupV1: false
failSwapOn: false
containerRuntimeEndpoint: unix://{sock}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: false}}
  x509: {{clientCAFile: {ca}}}
authorization: {{mode: AlwaysAllow}}
address: {address}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
resolvConf: {resolv}
podLogsDir: {logs}
evictionHard: {{memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
podPidsLimit: -1
syncFrequency: 10s
fileCheckFrequency: 5s
nodeStatusUpdateFrequency: 5s
shutdownGracePeriod: 0s
"#,
        sock = node.containerd_socket.display(),
        ca = ca.display(),
        address = node.address,
        resolv = resolv.display(),
        logs = node.dir.join("pod-logs").display(),
    )
}

/// What tests see of the shared cluster.
#[derive(Clone)]
pub struct ClusterInfo {
    pub kubeconfig: PathBuf,
    pub server: String,
    pub nodes: Vec<String>,
}

static SHARED: OnceLock<ClusterInfo> = OnceLock::new();
static SHARED_CLUSTER: Mutex<Option<Cluster>> = Mutex::new(None);

extern "C" fn stop_shared_cluster() {
    if let Ok(mut cluster) = SHARED_CLUSTER.lock()
        && let Some(mut cluster) = cluster.take()
    {
        cluster.stop();
    }
}

/// The one-node cluster shared by every test of this binary, started on first use (from a
/// thread that lives as long as the binary, like the shared control plane).
pub fn shared_cluster() -> &'static ClusterInfo {
    SHARED.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("real-node".into())
            .spawn(move || {
                let cluster = Cluster::start(1);
                let info = ClusterInfo {
                    kubeconfig: cluster.plane.kubeconfig.clone(),
                    server: cluster.plane.server.clone(),
                    nodes: cluster.nodes.iter().map(|n| n.name.clone()).collect(),
                };
                if let Ok(mut shared) = SHARED_CLUSTER.lock() {
                    *shared = Some(cluster);
                }
                // SAFETY: registering a plain extern "C" fn with no captured state.
                unsafe {
                    libc::atexit(stop_shared_cluster);
                }
                let _ = tx.send(info);
                loop {
                    std::thread::park();
                }
            })
            .expect("real-node thread");
        rx.recv()
            .expect("the real node failed to start (see the panic above)")
    })
}

/// Runs something with the shared cluster.
pub fn with_cluster<T>(f: impl FnOnce(&Cluster) -> T) -> T {
    let guard = SHARED_CLUSTER.lock().expect("cluster lock");
    f(guard.as_ref().expect("cluster started"))
}

/// A PostgreSQL pod with its data directory on claim `data` and its WAL on claim `wal`
/// (initdb --waldir, a symlink across the two volumes). `init` makes a new cluster; otherwise it
/// starts on what the volumes hold (a restore: crash recovery from the WAL).
pub fn postgres_pod(ns: &str, name: &str, data: &str, wal: &str, init: bool) -> serde_json::Value {
    postgres_pod_with(
        ns,
        name,
        PodVolume::Claim(data),
        PodVolume::Claim(wal),
        init,
    )
}

/// Where a pod's volume comes from: a claim, or a host folder (a volume of another node of the
/// same host, which the kubelet of the pod's node cannot mount: see the two-node restore test).
#[derive(Clone, Copy, Debug)]
pub enum PodVolume<'a> {
    Claim(&'a str),
    HostPath(&'a str),
}

impl PodVolume<'_> {
    fn source(self, name: &str) -> serde_json::Value {
        match self {
            PodVolume::Claim(claim) => {
                json!({"name": name, "persistentVolumeClaim": {"claimName": claim}})
            }
            PodVolume::HostPath(path) => {
                json!({"name": name, "hostPath": {"path": path, "type": "Directory"}})
            }
        }
    }
}

/// [`postgres_pod`] with each volume a claim or a host folder.
pub fn postgres_pod_with(
    ns: &str,
    name: &str,
    data: PodVolume<'_>,
    wal: PodVolume<'_>,
    init: bool,
) -> serde_json::Value {
    let bin = "/usr/lib/postgresql/15/bin";
    let start = if init {
        format!(
            "chown postgres:postgres /data /wal && runuser -u postgres -- {bin}/initdb -D /data/pg -X /wal/pg --auth=trust -U postgres >/dev/null && echo 'host all all 0.0.0.0/0 trust' >> /data/pg/pg_hba.conf"
        )
    } else {
        "rm -f /data/pg/postmaster.pid".to_string()
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "securityContext": {"runAsUser": 0},
            "containers": [{"name": "postgres", "image": "localhost/tandem/postgres:15",
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", format!(
                    "set -e; {start}; exec runuser -u postgres -- {bin}/postgres -D /data/pg -c listen_addresses='*' -c unix_socket_directories=/tmp"
                )],
                "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "/tmp", "-U", "postgres"]},
                                   "periodSeconds": 1},
                "volumeMounts": [{"name": "data", "mountPath": "/data"},
                                 {"name": "wal", "mountPath": "/wal"}]}],
            "volumes": [data.source("data"), wal.source("wal")]
        }
    })
}

/// pgbench in a pod of its own: initializes (scale 2), then runs 4 clients for an hour against
/// PostgreSQL at `address`.
pub fn pgbench_pod(ns: &str, address: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "pgbench", "namespace": ns},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "pgbench", "image": "localhost/tandem/postgres:15",
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", format!(
                    "pgbench -i -s 2 -h {address} -U postgres postgres && exec pgbench -n -c 4 -j 2 -T 3600 -h {address} -U postgres postgres"
                )]}]
        }
    })
}

/// pgbench's invariant: every transaction moves the same delta through an account, a teller and a
/// branch, and records it in the history, all at once.
pub const PGBENCH_BALANCED: &str = "select (select sum(abalance) from pgbench_accounts) = (select sum(bbalance) from pgbench_branches) and (select sum(bbalance) from pgbench_branches) = (select sum(tbalance) from pgbench_tellers) and (select sum(tbalance) from pgbench_tellers) = (select coalesce(sum(delta), 0) from pgbench_history)";
