//! The controller: talks to nothing but the Kubernetes API.
//!
//! One process runs a kube-runtime Controller per kind. Membership follows PVC and PV changes
//! through watches (reflector stores shared with the reconcilers), never through polling.

pub mod barrier;
pub mod cache;
pub mod central;
pub mod ceph;
mod group;
pub mod hooks;
mod http;
pub mod membership;
mod metrics;
mod orphans;
pub mod rbd;
pub mod rbd_members;
pub mod rbd_oneshot;
pub mod restore;
pub mod schedule;
mod snapshot;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};

use cache::CachedVolume;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::api::GroupSnapshot;

pub use group::run_group_controller;
pub use metrics::Metrics;
pub use snapshot::{
    CONDITION_DELETE_FAILED, FINALIZER, GROUP_SNAPSHOT_LABEL, GROUP_SNAPSHOT_UID_LABEL,
    RETAINED_FROM_UID_ANNOTATION, RETAINED_LABEL, node_snapshot_name, run_snapshot_controller,
};

/// The field manager (server-side apply) and event reporter of the controller.
pub const CONTROLLER_NAME: &str = "tandem-controller";

/// Command-line flags of `tandem controller`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ControllerArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "TANDEM_WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address for /metrics, /healthz and /readyz (none: not served).
    #[arg(long, env = "TANDEM_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,

    /// Run only while holding the Lease `tandem-controller` in POD_NAMESPACE (for more than one replica).
    #[arg(long, env = "TANDEM_LEADER_ELECT")]
    pub leader_elect: bool,

    /// The StorageClass of restored claims (default `tandem-restore`; its provisioner must be
    /// `tandem.dev/restore`).
    #[arg(long, env = "TANDEM_RESTORE_STORAGE_CLASS")]
    pub restore_storage_class: Option<String>,

    /// ceph-csi's config map (`namespace/name`, key `config.json`): the monitors of each cluster
    /// id its RBD volumes name. Without it, groups with RBD members are refused.
    #[arg(long, env = "TANDEM_CEPH_CSI_CONFIG", value_parser = parse_reference)]
    pub ceph_csi_config: Option<(String, String)>,

    /// The Secret (`namespace/name`, `userID`/`userKey`) for RBD volumes whose PersistentVolume
    /// names no `controllerExpandSecretRef`.
    #[arg(long, env = "TANDEM_CEPH_SECRET", value_parser = parse_reference)]
    pub ceph_secret: Option<(String, String)>,

    /// Test only, ignored by release builds: after each PVC watch event, wait this long before the
    /// next reaches the cache, so tests can show a trailing cache never reports claims missing.
    #[arg(long, hide = true)]
    pub test_only_claim_cache_lag_ms: Option<u64>,

    /// Test only, ignored by release builds: release a group snapshot's nodes (and cut its RBD
    /// group snapshot) no sooner than this long after its barrier started, so fault tests can act
    /// while every node holds its freeze.
    #[arg(long, hide = true)]
    pub test_only_release_delay_ms: Option<u64>,
    /// Test only, ignored by release builds: leave every release to the controller (no
    /// `groupNodes`), so the release delay above holds every node's freeze.
    #[arg(long, hide = true)]
    pub test_only_no_sibling_release: bool,
    /// Test only, ignored by release builds: each RBD copy of a restore waits this long at each
    /// progress report, so tests can act while a copy runs.
    #[arg(long, hide = true)]
    pub test_only_copy_delay_ms: Option<u64>,
}

fn parse_reference(value: &str) -> Result<(String, String), String> {
    ceph::parse_reference(value).map_err(|e| e.to_string())
}

/// The Lease that elects the one active controller replica.
pub const LEADER_LEASE: &str = "tandem-controller";

/// What can go wrong while reconciling.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot serialize status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("object has no namespace")]
    MissingNamespace,
    #[error("object has no uid")]
    MissingUid,
    #[error("the watch caches did not become ready: {0}")]
    CacheNotReady(String),
    #[error("cannot serve HTTP: {0}")]
    Http(#[from] std::io::Error),
    #[error("leader election: {0}")]
    LeaderElection(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease; exiting so that only one replica acts")]
    LostLease,
    #[error("Ceph: {0}")]
    Ceph(String),
}

/// Per snapshot (namespace, name): the snapshots waiting for it to finish.
type Waiters = HashMap<(String, String), HashSet<ObjectRef<GroupSnapshot>>>;

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub claims: Store<PersistentVolumeClaim>,
    /// Projections of the PersistentVolumes (`cache::CachedVolume`): 10,000 of them as full
    /// objects were half of an idle controller's memory.
    pub volumes: Store<CachedVolume>,
    /// Node metadata: a volume's hostname label is mapped to its Node's name.
    pub nodes: Store<PartialObjectMeta<Node>>,
    pub node_snapshots: Store<crate::api::NodeSnapshot>,
    pub metrics: Arc<Metrics>,
    /// Per namespace: serializes the start of group snapshots, so two never claim the same volume
    /// at once (a volume is claimed from one namespace only).
    start_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Snapshots waiting for another one (namespace, name) to finish with a shared volume.
    waiters: Mutex<Waiters>,
    /// Wakes waiting snapshots (into the GroupSnapshot controller).
    wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<GroupSnapshot>>,
    /// Notified on every NodeSnapshot event (the orphan sweep listens).
    pub node_snapshots_changed: Arc<tokio::sync::Notify>,
    /// Whether the caches are synced (served on /readyz).
    pub ready: Arc<AtomicBool>,
    /// When this process started reconciling.
    pub started: std::time::Instant,
    /// The quiesce hooks' open holds, by GroupSnapshot uid.
    pub hooks: hooks::Sessions,
    /// Connections to the Ceph clusters of RBD members (the controller alone holds their keys).
    pub ceph: ceph::CephClusters,
    /// Tests only (`--test-only-release-delay-ms`, debug builds).
    pub test_only_release_delay: Option<std::time::Duration>,
    /// Tests only (`--test-only-no-sibling-release`, debug builds).
    pub test_only_no_sibling_release: bool,
    /// Tests only (`--test-only-copy-delay-ms`, debug builds).
    pub test_only_copy_delay: Option<std::time::Duration>,
}

impl Context {
    /// The start lock of a namespace.
    pub fn start_lock(&self, namespace: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.start_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(namespace.to_string()).or_default().clone()
    }

    /// Records that `waiter` waits for the snapshot `namespace/blocker` to finish.
    pub fn wait_for(&self, namespace: &str, blocker: &str, waiter: ObjectRef<GroupSnapshot>) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        waiters
            .entry((namespace.to_string(), blocker.to_string()))
            .or_default()
            .insert(waiter);
    }

    /// Wakes every snapshot that waited for `namespace/name`.
    pub fn wake_waiters(&self, namespace: &str, name: &str) {
        let woken = {
            let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
            waiters.remove(&(namespace.to_string(), name.to_string()))
        };
        for waiter in woken.into_iter().flatten() {
            // The receiver lives as long as the controller; a send after it stopped is moot.
            let _ = self.wake.send(waiter);
        }
    }
}

/// Runs every controller until a shutdown signal; with `--leader-elect` only while leading. The
/// HTTP endpoints serve from the start: a waiting replica is alive (/healthz) but not ready.
pub async fn run(client: Client, args: ControllerArgs) -> Result<(), Error> {
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let http = {
        let (metrics, ready) = (metrics.clone(), ready.clone());
        async move {
            match args.http_addr {
                Some(addr) => http::serve(addr, metrics, ready).await,
                None => std::future::pending().await,
            }
        }
    };
    tokio::select! {
        result = lead_and_run(client, args, metrics, ready) => result,
        result = http => result.map_err(Error::Http),
    }
}

async fn lead_and_run(
    client: Client,
    args: ControllerArgs,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<(), Error> {
    if !args.leader_elect {
        return run_controllers(client, args, metrics, ready).await;
    }
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
    let identity =
        std::env::var("POD_NAME").unwrap_or_else(|_| format!("tandem-{}", std::process::id()));
    let manager = leader_lease(client.clone(), &namespace, &identity).await?;
    let (mut leading, lease_task) = manager.watch().await;
    tracing::info!(%namespace, %identity, "waiting for the leader lease {LEADER_LEASE}");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            lease_task.abort();
            return Err(Error::LostLease);
        }
    }
    tracing::info!(%identity, "leading");
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    let result = tokio::select! {
        result = run_controllers(client, args, metrics, ready) => result,
        _ = lost => Err(Error::LostLease),
    };
    lease_task.abort();
    result
}

/// The manager of this replica's claim on the leader Lease.
pub async fn leader_lease(
    client: Client,
    namespace: &str,
    identity: &str,
) -> Result<kube_lease_manager::LeaseManager, kube_lease_manager::LeaseManagerError> {
    kube_lease_manager::LeaseManagerBuilder::new(client, LEADER_LEASE)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_field_manager(lease_field_manager(identity))
        .build()
        .await
}

/// The field manager of one replica's writes to the Lease. It must differ per replica: taking a
/// free Lease is a server-side apply of `holderIdentity`, and only an owner *other* than the
/// writer makes the API server refuse it. With one name for all, two replicas starting together
/// both took the Lease, and both led until their first renewal.
fn lease_field_manager(identity: &str) -> String {
    // Field managers are at most 128 characters; a replica's name is unique at its end.
    const MAX: usize = 128;
    let prefix = format!("{CONTROLLER_NAME}-lease-");
    let room = MAX - prefix.len();
    let start = identity
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| identity.len() - i <= room)
        .unwrap_or(identity.len());
    format!("{prefix}{}", &identity[start..])
}

async fn run_controllers(
    client: Client,
    args: ControllerArgs,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
) -> Result<(), Error> {
    let claims_api: Api<PersistentVolumeClaim> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let volumes_api: Api<CachedVolume> = Api::all(client.clone());

    let (nodes, nodes_writer) = reflector::store();
    let node_events = reflector(
        nodes_writer,
        watcher(
            Api::<PartialObjectMeta<Node>>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .touched_objects();
    let (claims, claims_writer) = reflector::store();
    let (volumes, volumes_writer) = reflector::store();
    let claim_events = reflector(
        claims_writer,
        watcher(claims_api, watcher::Config::default()).modify(cache::slim_claim),
    )
    .default_backoff()
    .touched_objects();
    let volume_events = reflector(
        volumes_writer,
        watcher(volumes_api, watcher::Config::default()).modify(cache::slim),
    )
    .default_backoff()
    .touched_objects();
    // The caches are driven by tasks of their own: a reconcile that waits for them must never
    // depend on the controller pulling the very stream that fills them.
    let node_snapshots_api: Api<crate::api::NodeSnapshot> = match &args.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (node_snapshots, node_snapshots_writer) = reflector::store();
    let node_snapshot_events = reflector(
        node_snapshots_writer,
        watcher(node_snapshots_api, watcher::Config::default()).modify(cache::slim),
    )
    .default_backoff()
    .touched_objects();
    let node_snapshots_changed = Arc::new(tokio::sync::Notify::new());
    // Node changes need no reconcile of their own (a relabelled node is rare); the cache is enough.
    tokio::spawn(node_events.for_each(|_| async {}));
    let (claim_events, restore_claims) = restore::tee(claim_events);
    let (claim_events, member_claims) = restore::tee(claim_events);
    let (volume_events, restore_volumes) = restore::tee(volume_events);
    let claim_cache_lag = args
        .test_only_claim_cache_lag_ms
        .filter(|_| cfg!(debug_assertions))
        .map(std::time::Duration::from_millis);
    let claim_events = drive_in_background("claims", claim_events, None, claim_cache_lag);
    let volume_events = drive_in_background("volumes", volume_events, None, None);
    let node_snapshot_events = drive_in_background(
        "nodesnapshots",
        node_snapshot_events,
        Some(node_snapshots_changed.clone()),
        None,
    );
    let (wake, woken) = tokio::sync::mpsc::unbounded_channel();
    let woken = futures::stream::unfold(
        woken,
        |mut rx| async move { rx.recv().await.map(|e| (e, rx)) },
    );

    let ctx = Arc::new(Context {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: CONTROLLER_NAME.into(),
                instance: std::env::var("POD_NAME").ok(),
            },
        ),
        client,
        claims,
        volumes,
        nodes,
        node_snapshots,
        metrics,
        start_locks: Mutex::default(),
        waiters: Mutex::default(),
        wake,
        node_snapshots_changed,
        ready,
        started: std::time::Instant::now(),
        hooks: Default::default(),
        test_only_release_delay: args
            .test_only_release_delay_ms
            .filter(|_| cfg!(debug_assertions))
            .map(std::time::Duration::from_millis),
        test_only_no_sibling_release: args.test_only_no_sibling_release && cfg!(debug_assertions),
        test_only_copy_delay: args
            .test_only_copy_delay_ms
            .filter(|_| cfg!(debug_assertions))
            .map(std::time::Duration::from_millis),
        ceph: ceph::CephClusters::new(ceph::CephSettings {
            csi_config: args.ceph_csi_config.clone(),
            secret: args.ceph_secret.clone(),
        }),
    });
    let readiness = async {
        // However long the first lists take: each attempt waits a bounded time.
        while caches_ready(&ctx).await.is_err() {
            tracing::info!("waiting for the watch caches to fill before reporting ready");
        }
        ctx.ready.store(true, Ordering::Relaxed);
        std::future::pending::<()>().await
    };
    let controllers = async {
        tokio::join!(
            run_group_controller(
                ctx.clone(),
                args.namespace.as_deref(),
                claim_events.boxed(),
                volume_events.boxed()
            ),
            run_snapshot_controller(
                ctx.clone(),
                args.namespace.as_deref(),
                node_snapshot_events.boxed(),
                woken.boxed(),
            ),
            restore::run_restore_controllers(
                ctx.clone(),
                args.namespace.as_deref(),
                args.restore_storage_class.clone(),
                restore_claims,
                restore_volumes,
            ),
            schedule::run_schedule_controller(ctx.clone(), args.namespace.as_deref()),
            rbd_members::run(ctx.clone(), args.namespace.as_deref(), member_claims),
        )
    };
    // The controllers end on SIGTERM/SIGINT (graceful drain).
    tokio::select! {
        _ = controllers => Ok(()),
        _ = readiness => Ok(()),
        _ = orphans::sweep(ctx.clone()) => Ok(()),
    }
}

/// Drops what no reconcile reads from a cached object (the field managers and kubectl's copy of
/// the last applied object): most of a PVC's or PV's size, kept once per claim and volume of the
/// cluster.
/// Polls `events` on a task of its own and hands them on through an unbounded channel,
/// notifying `changed` (if any) of each; `lag` (tests only) waits after each event, so the cache
/// the stream fills trails the API server.
fn drive_in_background<T: Send + 'static>(
    name: &'static str,
    events: impl futures::Stream<Item = T> + Send + 'static,
    changed: Option<Arc<tokio::sync::Notify>>,
    lag: Option<std::time::Duration>,
) -> impl futures::Stream<Item = T> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        futures::pin_mut!(events);
        tracing::debug!(cache = name, "watching");
        while let Some(event) = events.next().await {
            tracing::debug!(cache = name, "event");
            if let Some(changed) = &changed {
                changed.notify_one();
            }
            if tx.send(event).is_err() {
                break;
            }
            if let Some(lag) = lag {
                tokio::time::sleep(lag).await;
            }
        }
    });
    futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

/// Waits (a bounded time) until the PVC and PV caches hold a full list, so membership is never
/// computed from half a world; the reconcile is retried when they are not ready yet.
async fn caches_ready(ctx: &Context) -> Result<(), Error> {
    cache_ready(&ctx.claims, "PersistentVolumeClaims").await?;
    cache_ready(&ctx.nodes, "Nodes").await?;
    cache_ready(&ctx.volumes, "PersistentVolumes").await
}

/// Waits up to 5 s until `store` holds a full list of `what`.
async fn cache_ready<K>(store: &Store<K>, what: &str) -> Result<(), Error>
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    match tokio::time::timeout(std::time::Duration::from_secs(5), store.wait_until_ready()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Error::CacheNotReady(e.to_string())),
        Err(_) => Err(Error::CacheNotReady(format!("no full list of {what} yet"))),
    }
}

/// Publishes an event about `reference`; a failure to publish is logged, never fatal.
async fn publish_event(
    ctx: &Context,
    reference: &k8s_openapi::api::core::v1::ObjectReference,
    type_: kube::runtime::events::EventType,
    reason: String,
    note: Option<String>,
    action: &str,
) {
    let event = kube::runtime::events::Event {
        type_,
        reason,
        note,
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, reference).await {
        tracing::warn!(error = %e, "cannot publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::lease_field_manager;

    #[test]
    fn each_replica_writes_the_lease_as_its_own_field_manager() {
        let long_a = format!("{}-a", "x".repeat(300));
        let long_b = format!("{}-b", "x".repeat(300));
        let table = [
            (
                "tandem-controller-7d9f-abcde",
                "tandem-controller-7d9f-fghij",
            ),
            ("ctl-1", "ctl-2"),
            (long_a.as_str(), long_b.as_str()),
        ];
        for (a, b) in table {
            let (fa, fb) = (lease_field_manager(a), lease_field_manager(b));
            assert_ne!(fa, fb, "{a} and {b} share a field manager");
            assert!(fa.len() <= 128 && fb.len() <= 128, "{fa} / {fb}");
            assert!(fa.starts_with("tandem-controller-lease-"), "{fa}");
        }
        assert_eq!(
            lease_field_manager("ctl-1"),
            "tandem-controller-lease-ctl-1"
        );
        // A name of multi-byte characters is cut at a character boundary.
        assert!(lease_field_manager(&"é".repeat(200)).len() <= 128);
    }
}
