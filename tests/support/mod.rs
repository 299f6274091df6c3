//! Test support: one real control plane per test binary, and a namespace of its own per test.
#![allow(dead_code)]

pub mod control_plane;
pub mod helm;
pub mod node;
pub mod objects;
pub mod process;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock, mpsc};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::PostParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

pub use control_plane::ControlPlane;

/// The repository's root (for crds/, examples/, the tandem binary).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What the shared control plane tells tests about itself.
#[derive(Clone)]
pub struct PlaneInfo {
    pub kubeconfig: PathBuf,
    pub server: String,
}

static SHARED: OnceLock<PlaneInfo> = OnceLock::new();
static SHARED_PLANE: Mutex<Option<ControlPlane>> = Mutex::new(None);

extern "C" fn stop_shared_plane() {
    if let Ok(mut plane) = SHARED_PLANE.lock()
        && let Some(mut plane) = plane.take()
    {
        plane.stop();
    }
}

/// The control plane shared by every test of this binary, started on first use.
///
/// Its processes are spawned from a thread that lives as long as the test binary, so
/// PR_SET_PDEATHSIG fires only when the binary ends (also after a panic or a kill).
pub fn shared_plane() -> &'static PlaneInfo {
    SHARED.get_or_init(|| {
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("control-plane".into())
            .spawn(move || {
                let plane = ControlPlane::start(&repo_root().join("crds"));
                let info = PlaneInfo {
                    kubeconfig: plane.kubeconfig.clone(),
                    server: plane.server.clone(),
                };
                if let Ok(mut shared) = SHARED_PLANE.lock() {
                    *shared = Some(plane);
                }
                // SAFETY: registering a plain extern "C" fn with no captured state.
                unsafe {
                    libc::atexit(stop_shared_plane);
                }
                let _ = tx.send(info);
                loop {
                    std::thread::park();
                }
            })
            .expect("control-plane thread");
        rx.recv()
            .expect("the control plane failed to start (see the panic above)")
    })
}

/// Runs something with the shared control plane (kubectl, kubeconfigs for other identities).
pub fn with_plane<T>(f: impl FnOnce(&ControlPlane) -> T) -> T {
    let guard = SHARED_PLANE.lock().expect("control plane lock");
    f(guard.as_ref().expect("control plane started"))
}

/// A kube client for a kubeconfig file.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let config = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
        .await
        .expect("client config");
    Client::try_from(config).expect("client")
}

/// One test's world: a client and a fresh namespace, deleted when the test ends.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub plane: &'static PlaneInfo,
    /// Whether `plane` is the shared control plane (a private one is torn down whole).
    shared: bool,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl TestEnv {
    pub async fn new(name: &str) -> TestEnv {
        let plane = tokio::task::spawn_blocking(shared_plane)
            .await
            .expect("control plane start");
        Self::create(plane, name, true).await
    }

    /// A test world on a private control plane (for tests that stop the API server).
    pub async fn on_private(plane: &ControlPlane, name: &str) -> TestEnv {
        let info: &'static PlaneInfo = Box::leak(Box::new(PlaneInfo {
            kubeconfig: plane.kubeconfig.clone(),
            server: plane.server.clone(),
        }));
        Self::create(info, name, false).await
    }

    async fn create(plane: &'static PlaneInfo, name: &str, shared: bool) -> TestEnv {
        let client = client_for(&plane.kubeconfig).await;
        let namespace = format!(
            "{}-{}-{}",
            name.chars().take(40).collect::<String>().replace('_', "-"),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": namespace}
        }))
        .expect("namespace");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        TestEnv {
            client,
            namespace,
            plane,
            shared,
        }
    }

    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// kubectl as cluster admin, in this test's namespace.
    pub fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.namespace.as_str()];
        all.extend_from_slice(args);
        with_plane(|p| p.kubectl(&all))
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Synchronous, so it happens even as the test's runtime shuts down; the namespace
        // controller (kube-controller-manager) removes what the namespace holds.
        if self.shared {
            let _ = with_plane(|p| {
                p.kubectl(&["delete", "namespace", &self.namespace, "--wait=false"])
            });
        }
    }
}

/// Polls `check` until it returns Some, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
