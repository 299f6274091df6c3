//! The NodeRestore watch loop: NodeRestores of this node only (field selector on `spec.nodeName`,
//! all namespaces), each driven by [`lifecycle::decide`] through the [`Restores`] executor. Status
//! is written with server-side apply (field manager `tandem-agent`), always rendered from the
//! executor's state; whatever a clone job does on its own (a clone made, progress, a rollback)
//! triggers a reconcile through its change notifier. Failures are Warning events.

use crate::agent::lock;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::events::Recorder;
use futures::StreamExt;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};

use crate::agent::watch::{FIELD_MANAGER, FINALIZER};
use crate::api::{NodeRestore, NodeRestorePhase, NodeRestoreStatus, NodeSnapshot};
use crate::finalizer;

use super::executor::{RestoreError, Restores};
use super::journal::{CloneRecord, CloneState};
use super::lifecycle::{
    self, ABORTED, ABORTED_BEFORE_START, CONDITION_ATTACH_FAILED, CONDITION_DELETE_FAILED,
    CONDITION_JOURNAL_FAILED, DELETED, LOST, Next, Observed,
};

/// Why a reconcile failed (retried).
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("a blocking task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Restore(#[from] RestoreError),
}

struct Ctx {
    client: Client,
    restores: Restores,
    node: String,
    recorder: Recorder,
    refs: Arc<Mutex<HashMap<String, ObjectRef<NodeRestore>>>>,
    retries: Mutex<HashMap<String, u32>>,
    /// NodeRestores already warned about (an unreadable journal entry).
    warned: Mutex<HashSet<String>>,
}

/// Watches this node's NodeRestores until a shutdown signal.
pub async fn run(client: Client, restores: Restores, node: String) {
    let api: Api<NodeRestore> = Api::all(client.clone());
    let selector = format!("spec.nodeName={node}");
    tracing::info!(%node, "agent watching NodeRestores");
    let refs: Arc<Mutex<HashMap<String, ObjectRef<NodeRestore>>>> = Arc::default();
    let (changes, changed) = tokio::sync::mpsc::unbounded_channel::<ObjectRef<NodeRestore>>();
    {
        let refs = refs.clone();
        restores.set_change_notifier(Box::new(move |key| {
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
                instance: Some(node.clone()),
            },
        ),
        client,
        restores,
        node,
        refs,
        retries: Mutex::default(),
        warned: Mutex::default(),
    });
    Controller::new(api, watcher::Config::default().fields(&selector))
        .reconcile_on(changed)
        .shutdown_on_signal()
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "NodeRestore reconcile error");
            }
        })
        .await;
}

fn error_policy(_obj: Arc<NodeRestore>, err: &WatchError, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "NodeRestore reconcile failed; retrying");
    Action::requeue(Duration::from_secs(2))
}

/// 1 s, 2 s, 4 s, ... up to a minute, per object.
fn backoff(ctx: &Ctx, uid: &str) -> Duration {
    let mut retries = lock(&ctx.retries);
    let n = retries.entry(uid.to_string()).or_insert(0);
    *n = n.saturating_add(1);
    Duration::from_secs(1u64 << (*n - 1).min(6)).min(Duration::from_secs(60))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, WatchError> {
    Ok(tokio::task::spawn_blocking(f).await?)
}

async fn reconcile(obj: Arc<NodeRestore>, ctx: Arc<Ctx>) -> Result<Action, WatchError> {
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
    let api: Api<NodeRestore> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(error) = ctx.restores.unreadable(&uid) {
        // Nothing is known of its clones: neither "lost" nor finalized, until a person repairs the
        // file (the agent reads it again at its next start).
        if lock(&ctx.warned).insert(uid.clone()) {
            let event = Event {
                type_: EventType::Warning,
                reason: "JournalUnreadable".into(),
                note: Some(format!(
                    "the agent's clone journal entry of this NodeRestore cannot be read ({error}); its clones are left as they are until the file is repaired and the agent restarted"
                )),
                action: "Restore".into(),
                secondary: None,
            };
            if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
                tracing::warn!(error = %e, "cannot publish event");
            }
        }
        return Ok(Action::await_change());
    }
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;
    let deleting = obj.metadata.deletion_timestamp.is_some();
    let view = ctx.restores.view(&uid);
    let next = lifecycle::decide(&Observed {
        deleting,
        action: obj.spec.action,
        volumes: &obj.spec.volumes,
        published: current.phase,
        entry: view.as_ref().map(|v| &v.entry),
        running: view.as_ref().is_some_and(|v| v.running),
    });
    let end_message = if deleting { DELETED } else { ABORTED };
    tracing::debug!(%namespace, %name, ?next, "NodeRestore");
    let mut retry = false;
    let without_clones = |phase, message: &str| {
        Some(lifecycle::status_without_clones(
            phase,
            message,
            &current.conditions,
            generation,
        ))
    };
    let desired: Option<NodeRestoreStatus> = match next {
        Next::Begin => {
            ensure_finalizer(&api, &obj).await?;
            match prepare(&obj, &ctx, &uid).await? {
                Err(message) => without_clones(NodeRestorePhase::Failed, &message),
                Ok(records) => {
                    let restores = ctx.restores.clone();
                    let (key, ns, n) = (uid.clone(), namespace.clone(), name.clone());
                    match blocking(move || restores.begin(&key, &ns, &n, records)).await? {
                        Err(e) => without_clones(
                            NodeRestorePhase::Failed,
                            &format!("cannot journal the clone intent, so nothing was cloned: {e}"),
                        ),
                        Ok(()) => {
                            tracing::info!(%namespace, %name, "cloning");
                            from_view(&ctx, &uid, &current, generation)
                        }
                    }
                }
            }
        }
        Next::Cancel => {
            ctx.restores.cancel(&uid, end_message);
            from_view(&ctx, &uid, &current, generation)
        }
        Next::Wait | Next::Report => from_view(&ctx, &uid, &current, generation),
        Next::Release(pvs) => {
            let restores = ctx.restores.clone();
            let key = uid.clone();
            retry = !blocking(move || restores.release(&key, &pvs)).await?;
            from_view(&ctx, &uid, &current, generation)
        }
        Next::RollBack { outcome, message } => {
            let restores = ctx.restores.clone();
            let key = uid.clone();
            retry = !blocking(move || restores.roll_back(&key, outcome, &message)).await?;
            from_view(&ctx, &uid, &current, generation)
        }
        Next::Finalize => {
            let restores = ctx.restores.clone();
            let key = uid.clone();
            blocking(move || restores.forget(&key)).await??;
            if let Some(patch) = finalizer::removing(obj.as_ref(), FINALIZER) {
                api.patch(&name, &PatchParams::default(), &patch).await?;
            }
            lock(&ctx.refs).remove(&uid);
            lock(&ctx.retries).remove(&uid);
            tracing::info!(%namespace, %name, "NodeRestore finalized: no clone left");
            return Ok(Action::await_change());
        }
        Next::Lost => without_clones(NodeRestorePhase::Failed, LOST),
        Next::AbortedBeforeStart => without_clones(NodeRestorePhase::Aborted, ABORTED_BEFORE_START),
    };

    if let Some(status) = desired {
        publish_new_problems(&ctx, &obj, &current, &status).await;
        write_status(&api, &obj, status).await?;
    }

    // A journal write or an attach that failed is retried with backoff.
    let restores = ctx.restores.clone();
    let key = uid.clone();
    let (behind, attach) = blocking(move || {
        let behind = restores.retry_journal(&key);
        let attach = restores.needs_attach(&key);
        if attach {
            restores.attach_all(&key);
        }
        (behind, attach)
    })
    .await?;
    if retry || behind || attach {
        return Ok(Action::requeue(backoff(&ctx, &uid)));
    }
    lock(&ctx.retries).remove(&uid);
    Ok(Action::await_change())
}

fn from_view(
    ctx: &Ctx,
    uid: &str,
    current: &NodeRestoreStatus,
    generation: Option<i64>,
) -> Option<NodeRestoreStatus> {
    let v = ctx.restores.view(uid)?;
    Some(lifecycle::status(
        &v.entry,
        &v.progress,
        v.journaled,
        &current.conditions,
        generation,
    ))
}

async fn write_status(
    api: &Api<NodeRestore>,
    obj: &NodeRestore,
    status: NodeRestoreStatus,
) -> Result<(), WatchError> {
    if obj.status.as_ref() != Some(&status) {
        let patch = serde_json::json!({
            "apiVersion": NodeRestore::api_version(&()),
            "kind": NodeRestore::kind(&()),
            "status": status,
        });
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}

/// A Warning event for a restore that became Failed, and for every problem condition new.
async fn publish_new_problems(
    ctx: &Ctx,
    obj: &NodeRestore,
    current: &NodeRestoreStatus,
    status: &NodeRestoreStatus,
) {
    let mut events = Vec::new();
    if status.phase == NodeRestorePhase::Failed && current.phase != NodeRestorePhase::Failed {
        events.push((
            "RestoreFailed".to_string(),
            status.message.clone().unwrap_or_default(),
        ));
    }
    for c in &status.conditions {
        let problem = [
            CONDITION_DELETE_FAILED,
            CONDITION_ATTACH_FAILED,
            CONDITION_JOURNAL_FAILED,
        ]
        .contains(&c.type_.as_str());
        if problem
            && !current
                .conditions
                .iter()
                .any(|s| s.type_ == c.type_ && s.status == c.status)
        {
            events.push((c.reason.clone(), c.message.clone()));
        }
    }
    for (reason, note) in events {
        let event = Event {
            type_: EventType::Warning,
            reason,
            note: Some(note),
            action: "Restore".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(error = %e, "cannot publish event");
        }
    }
}

async fn ensure_finalizer(api: &Api<NodeRestore>, obj: &NodeRestore) -> Result<(), WatchError> {
    if let Some(patch) = finalizer::adding(obj, FINALIZER) {
        api.patch(&obj.name_any(), &PatchParams::default(), &patch)
            .await?;
    }
    Ok(())
}

/// Finds every volume's member snapshot (its NodeSnapshot must be the one named, its cut this
/// node's and kept) and plans its clone. `Ok(Err(message))` is a refusal to report (nothing made);
/// `Err` an API failure to retry.
async fn prepare(
    obj: &NodeRestore,
    ctx: &Ctx,
    uid: &str,
) -> Result<Result<Vec<CloneRecord>, String>, WatchError> {
    let namespace = obj.namespace().unwrap_or_default();
    let snapshots: Api<NodeSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);
    let names: HashSet<&str> = obj
        .spec
        .volumes
        .iter()
        .map(|v| v.node_snapshot.as_str())
        .collect();
    let fetched = futures::future::join_all(names.iter().map(|n| snapshots.get_opt(n))).await;
    let mut found: HashMap<&str, Option<String>> = HashMap::new();
    for (n, got) in names.iter().zip(fetched) {
        found.insert(n, got?.and_then(|s| s.uid()));
    }
    let restores = ctx.restores.clone();
    let volumes = obj.spec.volumes.clone();
    let found: HashMap<String, Option<String>> =
        found.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
    let owner = uid.to_string();
    blocking(
        move || -> Result<Result<Vec<CloneRecord>, String>, WatchError> {
            let mut problems = Vec::new();
            let mut records = Vec::new();
            let mut seen = HashSet::new();
            for v in &volumes {
                let who = format!("volume {} (claim {})", v.persistent_volume, v.claim);
                if !seen.insert(v.persistent_volume.as_str()) {
                    problems.push(format!("{who}: named twice"));
                    continue;
                }
                let uid = found.get(&v.node_snapshot).cloned().flatten();
                if let Err(why) = lifecycle::check_node_snapshot(v, uid.as_deref()) {
                    problems.push(format!("{who}: {why}"));
                    continue;
                }
                let cut = restores.cut_entry(&v.node_snapshot_uid)?;
                let (snapshot, filesystem) = match lifecycle::member_snapshot(cut.as_ref(), v) {
                    Ok(found) => found,
                    Err(why) => {
                        problems.push(format!("{who}: {why}"));
                        continue;
                    }
                };
                match restores.plan(&snapshot, &namespace, &v.persistent_volume, &owner) {
                    Ok(plan) => records.push(CloneRecord {
                        persistent_volume: v.persistent_volume.clone(),
                        claim: v.claim.clone(),
                        plan,
                        filesystem,
                        state: CloneState::Intent,
                        made: None,
                        message: None,
                        problem: None,
                    }),
                    Err(e) => problems.push(format!("{who}: cannot plan its clone: {e}")),
                }
            }
            if volumes.is_empty() {
                problems.push("no volumes were asked for".into());
            }
            Ok(if problems.is_empty() {
                Ok(records)
            } else {
                Err(format!("nothing was cloned: {}", problems.join("; ")))
            })
        },
    )
    .await?
}
