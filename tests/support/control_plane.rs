//! A real Kubernetes control plane on loopback: etcd, kube-apiserver and kube-controller-manager,
//! started from binaries that `hack/test-tools.sh` builds (the envtest approach, no kubelet).
//!
//! Every process is started from one long-lived thread with PR_SET_PDEATHSIG, so the kernel kills
//! it when the test binary ends, whatever way it ends; an atexit hook also stops the shared
//! control plane and removes its folder on a normal exit.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Where the control-plane binaries are: `$TANDEM_TOOLS_BIN` or hack/test-tools.sh's default.
pub fn tools_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("TANDEM_TOOLS_BIN") {
        return PathBuf::from(dir);
    }
    let tools = std::env::var("TANDEM_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/tandem/tools")
        });
    tools.join("bin")
}

fn tool(name: &str) -> PathBuf {
    let path = tools_bin().join(name);
    assert!(
        path.exists(),
        "{} is missing: run hack/test-tools.sh first (it builds the test control plane)",
        path.display()
    );
    path
}

/// A free loopback port (the kernel picks it; the tiny race until the server binds is accepted).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

/// How a control plane starts. The default is the fast tier: loopback only, no scheduler, so tests
/// without a node start in seconds.
#[derive(Clone, Debug, Default)]
pub struct PlaneOptions {
    /// For real nodes (tests/support/node.rs): the API server binds and advertises this host
    /// address (where kubelets and pods reach it), authorizes kubelets with the Node authorizer,
    /// reaches kubelets with a client certificate, and kube-scheduler places pods.
    pub node_address: Option<String>,
    /// Leaves tandem's CRDs out (a test installs them the way users do, with the chart).
    pub skip_crds: bool,
}

/// A running control plane. Dropping it stops every process and removes its folder.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub server: String,
    pub ca_pem: String,
    pki: Pki,
    processes: Vec<(String, Child)>,
    /// How each process was started, to start it again after a simulated outage.
    commands: Vec<(String, std::ffi::OsString, Vec<std::ffi::OsString>)>,
    keep_dir: Option<tempfile::TempDir>,
}

struct Pki {
    ca_pem: String,
    ca_key_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "tandem-test-ca");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("ca key");
        let ca_key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::self_signed(params, key).expect("ca cert");
        Pki {
            ca_pem: issuer.pem(),
            ca_key_pem,
            issuer,
        }
    }

    /// A v3 leaf certificate (rustls refuses v1) and its key, as PEM.
    fn leaf(&self, cn: &str, orgs: &[&str], sans: &[&str], server: bool) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, cn);
        for org in orgs {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *org);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("leaf cert");
        (cert.pem(), key.serialize_pem())
    }
}

fn write(path: &Path, content: &str) {
    fs::write(path, content).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Marks a child so the kernel SIGKILLs it when the thread that spawned it ends.
fn die_with_parent(cmd: &mut Command) -> &mut Command {
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits until the API is ready and
    /// tandem's CRDs are established. Call it from a thread that outlives the control plane.
    pub fn start(crds_dir: &Path) -> ControlPlane {
        Self::start_with(crds_dir, &PlaneOptions::default())
    }

    /// Starts a control plane with `options` (see [`PlaneOptions`]).
    pub fn start_with(crds_dir: &Path, options: &PlaneOptions) -> ControlPlane {
        let address = options.node_address.as_deref().unwrap_or("127.0.0.1");
        let started = Instant::now();
        let temp = tempfile::Builder::new()
            .prefix("tandem-cp-")
            .tempdir()
            .expect("temp dir");
        let dir = temp.path().to_path_buf();
        let pki = Pki::new();
        let file = |name: &str, content: &str| {
            let path = dir.join(name);
            write(&path, content);
            path
        };
        let ca = file("ca.crt", &pki.ca_pem);
        let ca_key = file("ca.key", &pki.ca_key_pem);
        let (cert, key) = pki.leaf(
            "kube-apiserver",
            &[],
            // 10.0.0.1: the `kubernetes` Service, how pods on a real node reach the API.
            &[
                "127.0.0.1",
                address,
                "10.0.0.1",
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
            ],
            true,
        );
        let serving_cert = file("apiserver.crt", &cert);
        let serving_key = file("apiserver.key", &key);
        // Service-account tokens: signed with the private key, verified with the public one.
        let sa = KeyPair::generate().expect("sa key");
        let sa_key = file("sa.key", &sa.serialize_pem());
        let sa_pub = file("sa.pub", &sa.public_key_pem());

        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let api_port = free_port();
        let server = format!("https://{address}:{api_port}");

        let (cert, key) = pki.leaf("tandem-test-admin", &["system:masters"], &[], false);
        let kubeconfig = dir.join("admin.kubeconfig");
        write(
            &kubeconfig,
            &kubeconfig_yaml(&server, &pki.ca_pem, &cert, &key),
        );
        // Every controller of kube-controller-manager runs under this one identity here (no
        // per-controller service accounts), so it gets full rights in the test cluster.
        let (cert, key) = pki.leaf(
            "system:kube-controller-manager",
            &["system:masters"],
            &[],
            false,
        );
        let kcm_kubeconfig = dir.join("kcm.kubeconfig");
        write(
            &kcm_kubeconfig,
            &kubeconfig_yaml(&server, &pki.ca_pem, &cert, &key),
        );

        let mut plane = ControlPlane {
            dir: dir.clone(),
            kubeconfig: kubeconfig.clone(),
            server: server.clone(),
            ca_pem: pki.ca_pem.clone(),
            pki,
            processes: Vec::new(),
            commands: Vec::new(),
            keep_dir: Some(temp),
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        plane.spawn(
            "etcd",
            Command::new(tool("etcd")).args([
                "--name=default",
                &format!("--data-dir={}", dir.join("etcd").display()),
                &format!("--listen-client-urls={etcd_url}"),
                &format!("--advertise-client-urls={etcd_url}"),
                &format!("--listen-peer-urls={peer_url}"),
                &format!("--initial-advertise-peer-urls={peer_url}"),
                &format!("--initial-cluster=default={peer_url}"),
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]),
        );
        let mut apiserver = Command::new(tool("kube-apiserver"));
        if options.node_address.is_some() {
            // The API server execs into pods and reads their logs through the kubelets.
            let (cert, key) = plane.pki.leaf(
                "kube-apiserver-kubelet-client",
                &["system:masters"],
                &[],
                false,
            );
            apiserver.args([
                format!(
                    "--kubelet-client-certificate={}",
                    file("kubelet-client.crt", &cert).display()
                ),
                format!(
                    "--kubelet-client-key={}",
                    file("kubelet-client.key", &key).display()
                ),
                "--kubelet-preferred-address-types=InternalIP".into(),
                "--authorization-mode=Node,RBAC".into(),
            ]);
        } else {
            apiserver.arg("--authorization-mode=RBAC");
        }
        plane.spawn(
            "kube-apiserver",
            apiserver.args([
                &format!("--etcd-servers={etcd_url}"),
                &format!("--bind-address={address}"),
                &format!("--advertise-address={address}"),
                &format!("--secure-port={api_port}"),
                &format!("--cert-dir={}", dir.join("certs").display()),
                &format!("--tls-cert-file={}", serving_cert.display()),
                &format!("--tls-private-key-file={}", serving_key.display()),
                &format!("--client-ca-file={}", ca.display()),
                "--service-account-issuer=https://kubernetes.default.svc",
                &format!("--service-account-key-file={}", sa_pub.display()),
                &format!("--service-account-signing-key-file={}", sa_key.display()),
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=0",
            ]),
        );
        plane.wait_ready(Duration::from_secs(90));
        plane.spawn(
            "kube-controller-manager",
            Command::new(tool("kube-controller-manager")).args([
                &format!("--kubeconfig={}", kcm_kubeconfig.display()),
                "--leader-elect=false",
                "--secure-port=0",
                "--controllers=*",
                "--use-service-account-credentials=false",
                &format!("--service-account-private-key-file={}", sa_key.display()),
                &format!("--root-ca-file={}", ca.display()),
                &format!("--cluster-signing-cert-file={}", ca.display()),
                &format!("--cluster-signing-key-file={}", ca_key.display()),
                // Quota and garbage collection must notice tandem's CRDs quickly.
                "--resource-quota-sync-period=5s",
                // Claims pre-bound to their volumes bind within a second, not at the 15 s resync.
                "--pvclaimbinder-sync-period=1s",
                "--concurrent-gc-syncs=5",
                "--v=0",
            ]),
        );
        if options.node_address.is_some() {
            plane.spawn(
                "kube-scheduler",
                Command::new(tool("kube-scheduler")).args([
                    &format!("--kubeconfig={}", kcm_kubeconfig.display()),
                    "--leader-elect=false",
                    "--secure-port=0",
                    "--v=0",
                ]),
            );
        }
        if !options.skip_crds {
            plane.kubectl_ok(&[
                "apply",
                "--server-side",
                "-f",
                &crds_dir.display().to_string(),
            ]);
            plane.kubectl_ok(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                "crd",
                "consistencygroups.tandem.dev",
                "groupsnapshots.tandem.dev",
                "nodesnapshots.tandem.dev",
            ]);
        }
        eprintln!(
            "[control-plane] ready at {server} in {:.1} s (folder {})",
            started.elapsed().as_secs_f64(),
            dir.display()
        );
        plane
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) {
        if !self.commands.iter().any(|(n, _, _)| n == name) {
            self.commands.push((
                name.into(),
                cmd.get_program().to_owned(),
                cmd.get_args().map(|a| a.to_owned()).collect(),
            ));
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("log file");
        let child = die_with_parent(cmd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        self.processes.push((name.to_string(), child));
    }

    /// The last lines a process logged, for failure messages.
    pub fn log_tail(&self, name: &str) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.dir.join(format!("{name}.log"))) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn wait_ready(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self
                .processes
                .iter_mut()
                .find_map(|(name, child)| Some((name.clone(), child.try_wait().ok()??)));
            if let Some((name, status)) = exited {
                panic!("{name} exited with {status}:\n{}", self.log_tail(&name));
            }
            if let Ok(out) = self.kubectl(&["get", "--raw", "/readyz"])
                && out.trim() == "ok"
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "kube-apiserver not ready after {timeout:?}:\n{}",
                    self.log_tail("kube-apiserver")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the built kubectl against this control plane as cluster admin.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(tool("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        self.kubectl(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?} failed: {e}"))
    }

    /// A kubeconfig for a client certificate with this user name and groups (for RBAC tests and
    /// for agents that act as one node).
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> String {
        let (cert, key) = self.pki.leaf(user, groups, &[], false);
        kubeconfig_yaml(&self.server, &self.ca_pem, &cert, &key)
    }

    /// Stops one process (by name) with SIGKILL, to simulate a crash.
    pub fn kill(&mut self, name: &str) {
        for (n, child) in &mut self.processes {
            if n == name {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }

    /// Starts a killed process again with the same command line; for kube-apiserver, waits until
    /// the API is ready again.
    pub fn restart(&mut self, name: &str) {
        self.processes.retain(|(n, _)| n != name);
        let (_, program, args) = self
            .commands
            .iter()
            .find(|(n, _, _)| n == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name} was never started"));
        self.spawn(name, Command::new(program).args(args));
        if name == "kube-apiserver" {
            self.wait_ready(Duration::from_secs(90));
        }
    }

    /// Stops every process and removes the folder.
    pub fn stop(&mut self) {
        for (_, child) in self.processes.iter_mut().rev() {
            // SAFETY: plain kill(2) on a pid we own.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in self.processes.iter_mut().rev() {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.processes.clear();
        if let Some(dir) = self.keep_dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A kubeconfig with inline certificates.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str) -> String {
    let b64 = |text: &str| BASE64.encode(text);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: test\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
        b64(ca_pem),
        b64(cert_pem),
        b64(key_pem)
    )
}
