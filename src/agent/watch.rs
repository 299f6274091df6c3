//! The watch loop: NodeSnapshots of this node only (field selector on `spec.nodeName`), each
//! validated against its PersistentVolumes and driven through the [`Engine`]. Status is written whole
//! (a JSON patch of `/status`, field manager `tandem-agent`).
//!
//! The status always comes from the engine's state, never from the return of a call: a cut runs on
//! its own thread, and whatever the engine does on its own (the watchdog, a late freeze, a retry)
//! triggers a reconcile through its change notifier. A failed thaw, journal write or delete is
//! shown as a condition and a Warning event and retried with backoff; a failed delete keeps the
//! agent's finalizer.

use super::lock;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::events::Recorder;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, PersistentVolume};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::api::{
    DeletionPolicy, NodeAction, NodePhase, NodeSnapshot, NodeSnapshotStatus, NodeVolume,
};
use crate::finalizer;

use super::discovery;
use super::engine::{
    Begun, CONDITION_DELETE_FAILED, CONDITION_FREEZE_IN_FLIGHT, CONDITION_JOURNAL_FAILED,
    CONDITION_THAW_FAILED, CutRequest, Engine, VolumeRequest,
};
use super::siblings::Siblings;
use super::{AgentArgs, AgentError};
use crate::controller::barrier::every_node_has_cut;

/// The finalizer the agent puts on a NodeSnapshot whose snapshots it may have to delete.
pub const FINALIZER: &str = "tandem.dev/agent";
/// The field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "tandem-agent";

/// How long a reconcile waits for an engine call before it reports the engine's state as it
/// stands (the call goes on; its end triggers another reconcile through the change notifier).
const ENGINE_WAIT: Duration = Duration::from_secs(2);

struct Ctx {
    client: Client,
    engine: Engine,
    node: String,
    kubelet_dir: PathBuf,
    recorder: Recorder,
    /// NodeSnapshots by uid (the engine's key), so an engine change can trigger their reconcile.
    refs: Arc<Mutex<HashMap<String, ObjectRef<NodeSnapshot>>>>,
    /// Consecutive retries per uid, for the backoff.
    retries: Mutex<HashMap<String, u32>>,
    /// Per uid: the volumes a Prepare checked (and the spec they were checked for), so the cut
    /// that follows spends no API call between another node's freeze and this one's.
    prepared: Mutex<HashMap<String, PreparedVolumes>>,
    /// The sibling watches of multi-node cuts (`spec.groupNodes`).
    siblings: Siblings,
    /// Wakes a reconcile of a NodeSnapshot (a sibling changed).
    wake: tokio::sync::mpsc::UnboundedSender<ObjectRef<NodeSnapshot>>,
}

/// The spec's volumes and what checking them found.
type PreparedVolumes = (Vec<NodeVolume>, Vec<VolumeRequest>);

/// Watches this node's NodeSnapshots until a shutdown signal; on shutdown thaws whatever it holds.
pub async fn run(client: Client, engine: Engine, args: AgentArgs) -> Result<(), AgentError> {
    let api: Api<NodeSnapshot> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", args.node_name);
    tracing::info!(node = %args.node_name, "agent watching NodeSnapshots");
    let refs: Arc<Mutex<HashMap<String, ObjectRef<NodeSnapshot>>>> = Arc::default();
    // Whatever the engine does on its own (the watchdog, a late freeze, a retry) is reported
    // through a reconcile of that NodeSnapshot, not by the call that started the cut.
    let (changes, changed) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<NodeSnapshot>>();
    let wake = changes.clone();
    {
        let refs = refs.clone();
        engine.set_change_notifier(Box::new(move |key| {
            if let Some(r) = lock(&refs).get(key) {
                let _ = changes.send(r.clone());
            }
        }));
    }
    let changed =
        futures::stream::unfold(
            changed,
            |mut rx| async move { rx.recv().await.map(|r| (r, rx)) },
        );
    let ctx = Arc::new(Ctx {
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: FIELD_MANAGER.into(),
                instance: Some(args.node_name.clone()),
            },
        ),
        client,
        engine: engine.clone(),
        node: args.node_name.clone(),
        kubelet_dir: args.kubelet_dir.clone(),
        refs,
        retries: Mutex::default(),
        prepared: Mutex::default(),
        siblings: Siblings::default(),
        wake,
    });
    Controller::new(api, watcher::Config::default().fields(&selector))
        .reconcile_on(changed)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
    tokio::task::spawn_blocking(move || {
        engine.abort_all_held("the agent shut down while holding the freeze")
    })
    .await?;
    Ok(())
}

fn error_policy(_obj: Arc<NodeSnapshot>, err: &AgentError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "NodeSnapshot reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// Runs a blocking engine call without making the reconcile depend on its end: waits up to
/// [`ENGINE_WAIT`], then lets it go on (its end notifies a change).
async fn drive<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>, AgentError> {
    let call = tokio::task::spawn_blocking(f);
    match tokio::time::timeout(ENGINE_WAIT, call).await {
        Ok(done) => Ok(Some(done?)),
        Err(_) => Ok(None),
    }
}

/// The next retry of a problem, backing off per object: 1 s, 2 s, 4 s, ... up to a minute.
fn backoff(ctx: &Ctx, uid: &str) -> Duration {
    let mut retries = lock(&ctx.retries);
    let n = retries.entry(uid.to_string()).or_insert(0);
    *n = n.saturating_add(1);
    Duration::from_secs(1u64 << (*n - 1).min(6)).min(Duration::from_secs(60))
}

/// A Warning event for every problem condition the object did not show yet.
async fn publish_new_problems(ctx: &Ctx, obj: &NodeSnapshot, status: &NodeSnapshotStatus) {
    let shown = obj
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    for c in &status.conditions {
        let problem = [
            CONDITION_DELETE_FAILED,
            CONDITION_THAW_FAILED,
            CONDITION_JOURNAL_FAILED,
            CONDITION_FREEZE_IN_FLIGHT,
        ]
        .contains(&c.type_.as_str());
        if !problem
            || shown
                .iter()
                .any(|s| s.type_ == c.type_ && s.status == c.status)
        {
            continue;
        }
        let event = Event {
            type_: EventType::Warning,
            reason: c.reason.clone(),
            note: Some(c.message.clone()),
            action: "Snapshot".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}

async fn write_status(
    api: &Api<NodeSnapshot>,
    obj: &NodeSnapshot,
    mut status: NodeSnapshotStatus,
) -> Result<(), AgentError> {
    status.observed_generation = obj.metadata.generation;
    if obj.status.as_ref() != Some(&status) {
        // The whole status at once, as a JSON patch: only the agent writes it, and the API
        // server spends less on it than on a server-side apply (this write sits inside every
        // cross-node freeze window).
        let patch = json_patch::Patch(vec![json_patch::PatchOperation::Add(
            json_patch::AddOperation {
                path: json_patch::jsonptr::PointerBuf::from_tokens(["status"]),
                value: serde_json::to_value(&status)?,
            },
        )]);
        api.patch_status(
            &obj.name_any(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            },
            &Patch::<()>::Json(patch),
        )
        .await?;
        tracing::debug!(name = %obj.name_any(), phase = ?status.phase, "status written");
    }
    Ok(())
}

async fn reconcile(obj: Arc<NodeSnapshot>, ctx: Arc<Ctx>) -> Result<Action, AgentError> {
    if obj.spec.node_name != ctx.node {
        // The field selector should make this impossible; never act on another node's object.
        return Ok(Action::await_change());
    }
    let namespace = obj.namespace().unwrap_or_default();
    let name = obj.name_any();
    let Some(uid) = obj.uid() else {
        return Ok(Action::await_change());
    };
    lock(&ctx.refs).insert(uid.clone(), ObjectRef::from_obj(obj.as_ref()));
    tracing::debug!(%namespace, %name, %uid, action = ?obj.spec.action, phase = ?obj.status.as_ref().map(|s| s.phase), "NodeSnapshot seen");
    let api: Api<NodeSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);

    if obj.metadata.deletion_timestamp.is_some() {
        ctx.siblings.forget(&uid);
        // Act only once every other finalizer is gone: the controller holds its own until the
        // GroupSnapshot itself is deleted, so a member snapshot is never deleted on its own.
        let only_ours = obj.finalizers().iter().all(|f| f == FINALIZER);
        if let Some(patch) = finalizer::removing(obj.as_ref(), FINALIZER).filter(|_| only_ours) {
            // A pending abort wins over Retain: the group did not complete, so nothing of it is
            // kept (found by the model check).
            let retain = obj.spec.deletion_policy == DeletionPolicy::Retain
                && obj.spec.action != NodeAction::Abort;
            let engine = ctx.engine.clone();
            let key = uid.clone();
            let finalized =
                tokio::task::spawn_blocking(move || engine.finalize(&key, retain)).await?;
            if let Err(e) = finalized {
                // Keep the finalizer: the snapshots (or their record) are still there. Show why,
                // and retry with backoff.
                tracing::warn!(%namespace, %name, error = %e, "cannot finalize the snapshots; retrying");
                let engine = ctx.engine.clone();
                let key = uid.clone();
                if let Some(status) =
                    tokio::task::spawn_blocking(move || engine.status(&key)).await??
                {
                    publish_new_problems(&ctx, &obj, &status).await;
                    write_status(&api, &obj, status).await?;
                }
                return Ok(Action::requeue(backoff(&ctx, &uid)));
            }
            api.patch(&name, &PatchParams::default(), &patch).await?;
            lock(&ctx.refs).remove(&uid);
            lock(&ctx.retries).remove(&uid);
            lock(&ctx.prepared).remove(&uid);
            tracing::info!(%namespace, %name, retain, "snapshots finalized");
        }
        return Ok(Action::await_change());
    }

    // A multi-node cut watches its siblings from Prepare on, so that the watch is in sync by
    // the time every node holds its freeze, and stops once its cut ended (a self-released
    // NodeSnapshot keeps its action `Cut` for good).
    let sibling_release = obj.spec.group_nodes.len() > 1;
    let cut_ongoing = matches!(
        obj.status.as_ref().map(|s| s.phase).unwrap_or_default(),
        NodePhase::Pending | NodePhase::Prepared | NodePhase::Cut
    );
    if sibling_release
        && cut_ongoing
        && matches!(obj.spec.action, NodeAction::Prepare | NodeAction::Cut)
    {
        ctx.siblings.watch(&ctx.client, &obj, &ctx.wake);
    } else {
        ctx.siblings.forget(&uid);
    }

    let engine = ctx.engine.clone();
    let key = uid.clone();
    let known = tokio::task::spawn_blocking(move || engine.status(&key)).await??;
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;

    let desired: Option<NodeSnapshotStatus> = match obj.spec.action {
        NodeAction::Prepare => match known {
            Some(status) => Some(status),
            // Prepared already (or refused): nothing more until the controller decides.
            None if current.phase != NodePhase::Pending => None,
            None => match checked(&obj, &ctx, &api).await? {
                Err(message) => Some(failed(generation, &message)),
                Ok(volumes) => {
                    let req = cut_request(&obj, &uid, volumes.clone());
                    let engine = ctx.engine.clone();
                    let prepared =
                        tokio::task::spawn_blocking(move || engine.prepare(&req)).await?;
                    Some(match prepared {
                        Ok(()) => {
                            lock(&ctx.prepared)
                                .insert(uid.clone(), (obj.spec.volumes.clone(), volumes));
                            tracing::debug!(%namespace, %name, "prepared");
                            NodeSnapshotStatus {
                                observed_generation: generation,
                                phase: NodePhase::Prepared,
                                message: Some(
                                    "every volume checked and flushed; nothing is frozen yet"
                                        .into(),
                                ),
                                ..Default::default()
                            }
                        }
                        Err(refused) => NodeSnapshotStatus {
                            volumes: refused.volumes,
                            ..failed(generation, &refused.message)
                        },
                    })
                }
            },
        },
        NodeAction::Cut => match known {
            Some(status) => Some(status),
            None if current.phase == NodePhase::Cut => Some(failed(
                generation,
                "the agent has no record of this cut (its state directory was lost); nothing of it is frozen",
            )),
            None if !matches!(current.phase, NodePhase::Pending | NodePhase::Prepared) => None,
            None => match prepared_or_checked(&obj, &ctx, &api, &uid).await? {
                Err(message) => Some(failed(generation, &message)),
                Ok(volumes) => {
                    let req = cut_request(&obj, &uid, volumes);
                    // Register the cut, then run it on its own thread: the status comes from
                    // the engine, so a freeze that hangs can never wedge this object.
                    let engine = ctx.engine.clone();
                    let begun = tokio::task::spawn_blocking(move || {
                        engine.begin(&req, generation).map(|b| (b, req))
                    })
                    .await??;
                    match begun {
                        (Begun::Known(status), _) => Some(status),
                        (Begun::New(cut), req) => {
                            let engine = ctx.engine.clone();
                            drive(move || engine.run(&req, &cut)).await?;
                            let engine = ctx.engine.clone();
                            let key = uid.clone();
                            let status =
                                tokio::task::spawn_blocking(move || engine.status(&key)).await??;
                            if let Some(s) = &status {
                                tracing::info!(%namespace, %name, phase = ?s.phase, window_ms = ?s.freeze_window_millis, "cut");
                            }
                            status
                        }
                    }
                }
            },
        },
        NodeAction::Release => match known {
            Some(status) if status.phase == NodePhase::Cut => {
                let released = release(&ctx, &uid).await?;
                tracing::debug!(%namespace, %name, %uid, "release done");
                released
            }
            Some(status) => Some(status),
            None if matches!(
                current.phase,
                NodePhase::Pending | NodePhase::Prepared | NodePhase::Cut
            ) =>
            {
                Some(failed(
                    generation,
                    "asked to release a cut this agent never made",
                ))
            }
            None => None,
        },
        NodeAction::Abort => {
            lock(&ctx.prepared).remove(&uid);
            let engine = ctx.engine.clone();
            let key = uid.clone();
            drive(move || {
                engine.abort(
                    &key,
                    "aborted by the controller: volumes thawed, snapshots deleted",
                )
            })
            .await?;
            let engine = ctx.engine.clone();
            let key = uid.clone();
            let aborted = tokio::task::spawn_blocking(move || engine.status(&key)).await??;
            match aborted {
                Some(status) => Some(status),
                None if current.phase == NodePhase::Aborted => None,
                None => {
                    let mut status = NodeSnapshotStatus {
                        observed_generation: generation,
                        ..Default::default()
                    };
                    status.phase = NodePhase::Aborted;
                    status.message = Some("aborted before this node cut anything".into());
                    Some(status)
                }
            }
        }
    };

    let holding = desired.as_ref().is_some_and(|s| s.phase == NodePhase::Cut);
    let desired = desired.map(|s| {
        if holding && sibling_release {
            while_held(s)
        } else {
            s
        }
    });
    if let Some(status) = desired {
        publish_new_problems(&ctx, &obj, &status).await;
        write_status(&api, &obj, status).await?;
    }

    // Every node of the group holds its cut: release this one now, not a controller hop later.
    if holding
        && sibling_release
        && obj.spec.action == NodeAction::Cut
        && ctx
            .siblings
            .views(&obj)
            .is_some_and(|views| every_node_has_cut(&views))
    {
        let released = release(&ctx, &uid).await?;
        tracing::debug!(%namespace, %name, %uid, "every node cut: released without the controller");
        if let Some(status) = released {
            if status.phase != NodePhase::Cut {
                ctx.siblings.forget(&uid);
            }
            publish_new_problems(&ctx, &obj, &status).await;
            write_status(&api, &obj, status).await?;
        }
    }

    // A thaw, journal write or delete that failed is retried with backoff.
    if ctx.engine.needs_retry(&uid) {
        let engine = ctx.engine.clone();
        let key = uid.clone();
        drive(move || engine.retry(&key)).await?;
        return Ok(Action::requeue(backoff(&ctx, &uid)));
    }
    lock(&ctx.retries).remove(&uid);

    // While a freeze is held, look again right after the watchdog's deadline to report its abort.
    Ok(match ctx.engine.deadline(&uid) {
        Some(deadline) => Action::requeue(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100),
        ),
        None => Action::await_change(),
    })
}

/// Thaws the held cut `uid` keeping its snapshots, and returns the engine's status after it.
async fn release(ctx: &Ctx, uid: &str) -> Result<Option<NodeSnapshotStatus>, AgentError> {
    let engine = ctx.engine.clone();
    let key = uid.to_string();
    drive(move || engine.release(&key)).await?;
    let engine = ctx.engine.clone();
    let key = uid.to_string();
    Ok(tokio::task::spawn_blocking(move || engine.status(&key)).await??)
}

/// The status of a held cut whose nodes release each other, lean: this write sits inside the
/// freeze window and only its phase is read (by the sibling agents and the controller), so the
/// per-volume details wait for the release's status a few milliseconds later (or the abort's).
fn while_held(status: NodeSnapshotStatus) -> NodeSnapshotStatus {
    let volumes = status.volumes.len();
    NodeSnapshotStatus {
        volumes: Vec::new(),
        message: Some(status.message.unwrap_or_else(|| {
            format!(
                "{volumes} volume(s) frozen and cut; holding the freeze until every node has cut"
            )
        })),
        ..status
    }
}

fn failed(generation: Option<i64>, message: &str) -> NodeSnapshotStatus {
    NodeSnapshotStatus {
        observed_generation: generation,
        phase: NodePhase::Failed,
        message: Some(message.to_string()),
        ..Default::default()
    }
}

/// The cut request of a NodeSnapshot, over its checked volumes.
fn cut_request(obj: &NodeSnapshot, uid: &str, volumes: Vec<VolumeRequest>) -> CutRequest {
    CutRequest {
        key: uid.to_string(),
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        group_snapshot: obj.spec.group_snapshot.clone(),
        freeze: obj.spec.freeze,
        freeze_timeout: Duration::from_secs(
            u64::try_from(obj.spec.freeze_timeout_seconds.max(1)).unwrap_or(1),
        ),
        release_after_cut: obj.spec.release_after_cut,
        volumes,
    }
}

/// Checks the volumes and puts the finalizer on, both before any freeze (a refused request
/// merely carries the finalizer until the NodeSnapshot is deleted). `Ok(Err)` is a refusal.
async fn checked(
    obj: &NodeSnapshot,
    ctx: &Ctx,
    api: &Api<NodeSnapshot>,
) -> Result<Result<Vec<VolumeRequest>, String>, AgentError> {
    let (checked, finalizer) =
        futures::future::join(validate(obj, ctx), ensure_finalizer(api, obj)).await;
    finalizer?;
    checked
}

/// The volumes this agent's Prepare checked for this very spec, or a fresh check (after a
/// restart, or for a cut that was never prepared).
async fn prepared_or_checked(
    obj: &NodeSnapshot,
    ctx: &Ctx,
    api: &Api<NodeSnapshot>,
    uid: &str,
) -> Result<Result<Vec<VolumeRequest>, String>, AgentError> {
    let kept = lock(&ctx.prepared).remove(uid);
    match kept {
        Some((spec, volumes)) if spec == obj.spec.volumes && finalizer::has(obj, FINALIZER) => {
            Ok(Ok(volumes))
        }
        _ => checked(obj, ctx, api).await,
    }
}

async fn ensure_finalizer(api: &Api<NodeSnapshot>, obj: &NodeSnapshot) -> Result<(), AgentError> {
    if let Some(patch) = finalizer::adding(obj, FINALIZER) {
        api.patch(&obj.name_any(), &PatchParams::default(), &patch)
            .await?;
    }
    Ok(())
}

/// Checks every requested volume against its PersistentVolume and finds it on this node.
/// `Ok(Err(message))` is a refusal to report; `Err` an API failure to retry.
async fn validate(
    obj: &NodeSnapshot,
    ctx: &Ctx,
) -> Result<Result<Vec<VolumeRequest>, String>, AgentError> {
    let namespace = obj.namespace().unwrap_or_default();
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    // Every lookup at once: this runs before the freeze, and a node that starts late widens the
    // group's freeze window.
    let (node, fetched) = futures::future::join(
        nodes.get_opt(&ctx.node),
        futures::future::join_all(
            obj.spec
                .volumes
                .iter()
                .map(|v| pvs.get_opt(&v.persistent_volume)),
        ),
    )
    .await;
    // Node labels for nodeAffinity; without a Node object (no kubelet) only the hostname label.
    let mut labels: BTreeMap<String, String> = match node {
        Ok(Some(node)) => node.labels().clone(),
        _ => BTreeMap::new(),
    };
    labels
        .entry("kubernetes.io/hostname".into())
        .or_insert_with(|| ctx.node.clone());

    let mut out = Vec::new();
    let mut problems = Vec::new();
    for (v, pv) in obj.spec.volumes.iter().zip(fetched) {
        let who = format!("volume {} (claim {})", v.persistent_volume, v.claim);
        let Some(pv) = pv? else {
            problems.push(format!("{who}: the PersistentVolume does not exist"));
            continue;
        };
        match check_pv(&pv, &namespace, &v.claim, &ctx.node, &labels, ctx) {
            Ok(path) => out.push(VolumeRequest {
                claim: v.claim.clone(),
                persistent_volume: v.persistent_volume.clone(),
                path,
                allow_shared_filesystem: discovery::allows_shared_filesystem(pv.annotations()),
                central: v.central,
            }),
            Err(why) => problems.push(format!("{who}: {why}")),
        }
    }
    if obj.spec.volumes.is_empty() {
        problems.push("no volumes were asked for".into());
    }
    Ok(if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems.join("; "))
    })
}

/// Tenancy, node pinning and the volume's path on this node.
pub fn check_pv(
    pv: &PersistentVolume,
    namespace: &str,
    claim: &str,
    node: &str,
    node_labels: &BTreeMap<String, String>,
    ctx_dirs: &impl KubeletDir,
) -> Result<PathBuf, String> {
    let spec = pv.spec.as_ref().ok_or("the PersistentVolume has no spec")?;
    let claim_ref = spec
        .claim_ref
        .as_ref()
        .ok_or("the PersistentVolume is not bound to a claim")?;
    if claim_ref.namespace.as_deref() != Some(namespace) || claim_ref.name.as_deref() != Some(claim)
    {
        return Err(format!(
            "the PersistentVolume is bound to {}/{}, not to {namespace}/{claim}",
            claim_ref.namespace.as_deref().unwrap_or("?"),
            claim_ref.name.as_deref().unwrap_or("?")
        ));
    }
    let terms = spec
        .node_affinity
        .as_ref()
        .and_then(|a| a.required.as_ref())
        .map(|r| r.node_selector_terms.clone());
    let pinned_here = match &terms {
        Some(terms) => terms.iter().any(|t| {
            let exprs_ok = t
                .match_expressions
                .iter()
                .flatten()
                .all(|e| requirement_matches(e, node_labels));
            let fields_ok = t.match_fields.iter().flatten().all(|e| {
                let mut fields = BTreeMap::new();
                fields.insert("metadata.name".to_string(), node.to_string());
                requirement_matches(e, &fields)
            });
            exprs_ok && fields_ok
        }),
        None => false,
    };
    let block_mode = spec.volume_mode.as_deref() == Some("Block");
    if let Some(local) = &spec.local {
        if !pinned_here {
            return Err(format!(
                "the local PersistentVolume is not pinned to node {node}"
            ));
        }
        return Ok(PathBuf::from(&local.path));
    }
    if let Some(host) = &spec.host_path {
        if terms.is_some() && !pinned_here {
            return Err(format!(
                "the PersistentVolume is pinned to another node than {node}"
            ));
        }
        return Ok(PathBuf::from(&host.path));
    }
    if let Some(csi) = &spec.csi {
        if terms.is_some() && !pinned_here {
            return Err(format!(
                "the PersistentVolume is pinned to another node than {node}"
            ));
        }
        if block_mode {
            return Err("block-mode CSI volumes are not supported yet".into());
        }
        let kubelet = ctx_dirs.kubelet_dir();
        let global = discovery::csi_global_mount(kubelet, &csi.driver, &csi.volume_handle);
        // ceph-csi stages into `<globalmount>/<volume handle>`, not the global mount itself: the
        // global mount's directory is then on the node's own filesystem, never to be frozen.
        let staged = global.join(&csi.volume_handle);
        if staged.is_dir() {
            return Ok(staged);
        }
        if global.is_dir() {
            return Ok(global);
        }
        let pods = discovery::csi_pod_mounts(kubelet, &pv.name_any());
        return pods.into_iter().next().ok_or_else(|| {
            format!(
                "the CSI volume is not mounted on this node (looked for {} and pods/*/volumes/kubernetes.io~csi/{}/mount)",
                global.display(),
                pv.name_any()
            )
        });
    }
    Err("only local, hostPath and CSI PersistentVolumes can be found on a node".into())
}

/// Where the kubelet keeps its mounts.
pub trait KubeletDir {
    fn kubelet_dir(&self) -> &std::path::Path;
}

impl KubeletDir for Ctx {
    fn kubelet_dir(&self) -> &std::path::Path {
        &self.kubelet_dir
    }
}

impl KubeletDir for PathBuf {
    fn kubelet_dir(&self) -> &std::path::Path {
        self
    }
}

fn requirement_matches(req: &NodeSelectorRequirement, labels: &BTreeMap<String, String>) -> bool {
    let value = labels.get(&req.key);
    let values = req.values.clone().unwrap_or_default();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (
                value.and_then(|v| v.parse::<i64>().ok()),
                values.first().and_then(|b| b.parse::<i64>().ok()),
            ) else {
                return false;
            };
            if req.operator == "Gt" {
                v > bound
            } else {
                v < bound
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        LocalVolumeSource, NodeSelector, NodeSelectorTerm, ObjectReference, PersistentVolumeSpec,
        VolumeNodeAffinity,
    };

    fn local_pv(node: &str, ns: &str, claim: &str) -> PersistentVolume {
        PersistentVolume {
            metadata: kube::api::ObjectMeta {
                name: Some("pv-a".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeSpec {
                claim_ref: Some(ObjectReference {
                    namespace: Some(ns.into()),
                    name: Some(claim.into()),
                    ..Default::default()
                }),
                local: Some(LocalVolumeSource {
                    path: "/mnt/a".into(),
                    ..Default::default()
                }),
                node_affinity: Some(VolumeNodeAffinity {
                    required: Some(NodeSelector {
                        node_selector_terms: vec![NodeSelectorTerm {
                            match_expressions: Some(vec![NodeSelectorRequirement {
                                key: "kubernetes.io/hostname".into(),
                                operator: "In".into(),
                                values: Some(vec![node.into()]),
                            }]),
                            match_fields: None,
                        }],
                    }),
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn labels(node: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("kubernetes.io/hostname".to_string(), node.to_string())])
    }

    #[test]
    fn a_csi_volume_is_found_where_its_driver_staged_it() {
        let dir = tempfile::tempdir().expect("dir");
        let kubelet = dir.path().to_path_buf();
        let pv = |driver: &str, handle: &str| -> PersistentVolume {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "pv-a"},
                "spec": {"claimRef": {"namespace": "shop", "name": "data"},
                         "csi": {"driver": driver, "volumeHandle": handle}}
            }))
            .expect("pv")
        };
        let global =
            |driver: &str, handle: &str| discovery::csi_global_mount(&kubelet, driver, handle);
        let check =
            |p: &PersistentVolume| check_pv(p, "shop", "data", "n1", &labels("n1"), &kubelet);
        // Not mounted anywhere: refused, naming where it looked.
        let rbd = pv("rbd.csi.ceph.com", "0001-0009-c1-0000000000000002-img");
        assert!(check(&rbd).is_err());
        // A driver that stages at the global mount itself.
        let ebs = pv("ebs.csi.aws.com", "vol-1");
        std::fs::create_dir_all(global("ebs.csi.aws.com", "vol-1")).expect("mkdir");
        assert_eq!(check(&ebs), Ok(global("ebs.csi.aws.com", "vol-1")));
        // ceph-csi: `<globalmount>/<volume handle>`, never the directory above it.
        let handle = "0001-0009-c1-0000000000000002-img";
        std::fs::create_dir_all(global("rbd.csi.ceph.com", handle)).expect("mkdir");
        assert_eq!(check(&rbd), Ok(global("rbd.csi.ceph.com", handle)));
        std::fs::create_dir_all(global("rbd.csi.ceph.com", handle).join(handle)).expect("mkdir");
        assert_eq!(
            check(&rbd),
            Ok(global("rbd.csi.ceph.com", handle).join(handle))
        );
    }

    #[test]
    fn accepts_a_local_pv_of_this_node_and_namespace() {
        let pv = local_pv("n1", "shop", "data");
        let dir = PathBuf::from("/var/lib/kubelet");
        assert_eq!(
            check_pv(&pv, "shop", "data", "n1", &labels("n1"), &dir),
            Ok(PathBuf::from("/mnt/a"))
        );
    }

    #[test]
    fn refuses_other_namespaces_claims_and_nodes() {
        let pv = local_pv("n1", "shop", "data");
        let dir = PathBuf::from("/var/lib/kubelet");
        assert!(check_pv(&pv, "other", "data", "n1", &labels("n1"), &dir).is_err());
        assert!(check_pv(&pv, "shop", "wal", "n1", &labels("n1"), &dir).is_err());
        assert!(check_pv(&pv, "shop", "data", "n2", &labels("n2"), &dir).is_err());
    }

    #[test]
    fn evaluates_selector_operators() {
        let l = BTreeMap::from([
            ("zone".to_string(), "a".to_string()),
            ("n".into(), "5".into()),
        ]);
        let r = |op: &str, key: &str, vals: &[&str]| NodeSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: Some(vals.iter().map(|s| s.to_string()).collect()),
        };
        assert!(requirement_matches(&r("In", "zone", &["a", "b"]), &l));
        assert!(!requirement_matches(&r("NotIn", "zone", &["a"]), &l));
        assert!(requirement_matches(&r("Exists", "zone", &[]), &l));
        assert!(requirement_matches(&r("DoesNotExist", "x", &[]), &l));
        assert!(requirement_matches(&r("Gt", "n", &["4"]), &l));
        assert!(!requirement_matches(&r("Lt", "n", &["4"]), &l));
    }
}
