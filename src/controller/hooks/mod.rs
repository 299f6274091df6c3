//! Quiesce hooks around the freeze barrier: every Pre hook, every Hold ready, the cut on every
//! node, every hold released with the thaw, every Post hook. Releases and Post hooks run on every
//! path. [`plan`] decides, [`targets`] picks the pods, [`exec`] talks to them; this module is the
//! thin shell that records each run in the GroupSnapshot's status.

pub mod exec;
pub mod plan;
pub mod targets;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client};
use tracing::{info, warn};

use crate::api::{HookMode, HookPhase, HookRun, HookRunState, HookWrap, QuiesceHook, QuiesceSpec};
use plan::Step;

/// The reason of a snapshot that ends Failed because of a hook.
pub const REASON_HOOK_FAILED: &str = "HookFailed";
/// The reason of a snapshot whose group has hooks the controller may not run.
pub const REASON_NOT_PERMITTED: &str = "HooksNotPermitted";

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

type Key = (String, String);

/// What this process keeps of one snapshot's quiesce: its open holds, and the runs of a quiesce
/// that ended here but whose status write failed (written again by the next reconcile).
#[derive(Default)]
struct Entry {
    holds: BTreeMap<Key, exec::Hold>,
    unrecorded: Option<Vec<HookRun>>,
}

/// The holds this process has open, by GroupSnapshot uid. A snapshot with an entry here has its
/// quiesce running in this process; after a restart there is none, and the runs it recorded as
/// running are lost ([`plan::mark_lost`]).
#[derive(Default)]
pub struct Sessions {
    inner: Mutex<HashMap<String, Entry>>,
}

impl Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this process runs the quiesce of `uid`.
    pub fn active(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    /// Whether the hold of `run` is open in this process.
    pub fn live(&self, uid: &str, run: &HookRun) -> bool {
        self.lock()
            .get(uid)
            .is_some_and(|e| e.holds.contains_key(&key(run)))
    }

    fn begin(&self, uid: &str) {
        self.lock().entry(uid.to_string()).or_default();
    }

    fn put(&self, uid: &str, key: Key, hold: exec::Hold) {
        self.lock()
            .entry(uid.to_string())
            .or_default()
            .holds
            .insert(key, hold);
    }

    fn take(&self, uid: &str) -> BTreeMap<Key, exec::Hold> {
        self.lock().remove(uid).map(|e| e.holds).unwrap_or_default()
    }

    /// Keeps the runs of a quiesce that ended in this process but could not be recorded.
    pub fn remember(&self, uid: &str, runs: &[HookRun]) {
        self.lock().entry(uid.to_string()).or_default().unrecorded = Some(runs.to_vec());
    }

    /// The runs of a quiesce that ended here and is not recorded yet, taken.
    pub fn unrecorded(&self, uid: &str) -> Option<Vec<HookRun>> {
        self.lock().get_mut(uid).and_then(|e| e.unrecorded.take())
    }

    /// Drops every hold of `uid` (its GroupSnapshot is being deleted): the sessions close, and the
    /// commands end on stdin EOF or at their in-container deadline.
    pub fn abandon(&self, uid: &str) {
        drop(self.take(uid));
    }

    /// Whether a hold of `uid` ended before its release (its lock no longer holds).
    pub fn ended_early(&self, uid: &str) -> Vec<(Key, exec::Outcome)> {
        self.lock()
            .get(uid)
            .map(|e| {
                e.holds
                    .iter()
                    .filter_map(|(k, h)| h.ended().map(|o| (k.clone(), o)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

fn key(run: &HookRun) -> Key {
    (run.name.clone(), run.pod.clone().unwrap_or_default())
}

/// Whether the controller may exec into pods of `namespace` (`pods/exec` get and create), asked
/// of the API server. `Some(message)` when it may not.
pub async fn exec_denied(client: &Client, namespace: &str) -> Result<Option<String>, kube::Error> {
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let mut denied = Vec::new();
    for verb in ["create", "get"] {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    namespace: Some(namespace.to_string()),
                    verb: Some(verb.into()),
                    resource: Some("pods".into()),
                    subresource: Some("exec".into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let answer = reviews.create(&PostParams::default(), &review).await?;
        if !answer.status.is_some_and(|s| s.allowed) {
            denied.push(verb);
        }
    }
    Ok((!denied.is_empty()).then(|| {
        format!(
            "the tandem controller may not exec into pods of namespace {namespace} (pods/exec {}): bind the ClusterRole tandem-hook-runner to its ServiceAccount with a RoleBinding in this namespace (or install the chart with hooks.clusterWide=true), or create the GroupSnapshot with spec.hooks: Skip",
            denied.join(", ")
        )
    }))
}

/// One run per hook and target pod, in hook order; a hook without targets is one failed run.
pub fn plan_runs(spec: &QuiesceSpec, pods: &[Pod], claims: &BTreeSet<&str>) -> Vec<HookRun> {
    let mut runs = Vec::new();
    for hook in &spec.hooks {
        let base = HookRun {
            name: hook.name.clone(),
            mode: hook.mode,
            phase: (hook.mode == HookMode::Exec).then_some(hook.phase),
            ..Default::default()
        };
        match targets::targets(hook, pods, claims) {
            Ok(found) => runs.extend(found.into_iter().map(|t| HookRun {
                pod: Some(t.pod),
                container: Some(t.container),
                ..base.clone()
            })),
            Err(e) => runs.push(HookRun {
                state: HookRunState::Failed,
                message: Some(e.to_string()),
                ..base
            }),
        }
    }
    runs.truncate(crate::api::MAX_HOOK_RUNS);
    runs
}

/// The pods of `namespace` (for [`plan_runs`]).
pub async fn list_pods(client: &Client, namespace: &str) -> Result<Vec<Pod>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods.list(&ListParams::default()).await?.items)
}

fn hook_of<'a>(spec: &'a QuiesceSpec, run: &HookRun) -> Option<&'a QuiesceHook> {
    spec.hooks.iter().find(|h| h.name == run.name)
}

fn record(run: &mut HookRun, outcome: exec::Outcome) {
    run.finished_at = Some(now());
    run.exit_code = outcome.exit_code;
    run.state = if outcome.success {
        HookRunState::Succeeded
    } else {
        HookRunState::Failed
    };
    run.message = outcome.message.map(|m| m.chars().take(1000).collect());
}

/// Runs one Exec hook in the pods of `indexes`, in parallel, and records how each run ended.
async fn run_exec_hook(
    pods: &Api<Pod>,
    hook: &QuiesceHook,
    runs: &mut [HookRun],
    indexes: &[usize],
) {
    let deadline = plan::exec_deadline(hook);
    let command = exec::wrapped(&hook.command, hook.wrap, deadline);
    let outcomes = futures::future::join_all(indexes.iter().map(|&i| {
        let pod = runs[i].pod.clone().unwrap_or_default();
        let container = runs[i].container.clone().unwrap_or_default();
        let command = command.clone();
        async move {
            // The container ends it at `deadline`; tandem waits a little longer to see it.
            exec::run(
                pods,
                &pod,
                &container,
                &command,
                deadline + Duration::from_secs(2),
            )
            .await
        }
    }))
    .await;
    for (&i, outcome) in indexes.iter().zip(outcomes) {
        info!(hook = %runs[i].name, pod = ?runs[i].pod, success = outcome.success, "hook ran");
        record(&mut runs[i], outcome);
    }
}

fn mark_running(runs: &mut [HookRun], indexes: &[usize]) {
    for &i in indexes {
        runs[i].state = HookRunState::Running;
        runs[i].started_at = Some(now());
    }
}

/// The unfinished runs of `step` of the hook `name`.
fn runs_of(runs: &[HookRun], step: Step, name: &str) -> Vec<usize> {
    plan::unfinished(runs, step)
        .into_iter()
        .filter(|&i| runs[i].name == name)
        .collect()
}

/// Runs the Pre hooks still unfinished, hook by hook in list order, each in parallel across its
/// pods; a failed `Fail` hook ends the step (the rest stay Pending). They were recorded as started
/// before the quiesce began.
async fn run_pre(pods: &Api<Pod>, spec: &QuiesceSpec, runs: &mut [HookRun]) {
    for hook in &spec.hooks {
        if !plan::keep_going(spec, runs) {
            return;
        }
        let indexes = runs_of(runs, Step::Pre, &hook.name);
        if indexes.is_empty() {
            continue;
        }
        mark_running(runs, &indexes);
        run_exec_hook(pods, hook, runs, &indexes).await;
    }
}

/// The quiesce step: every Pre hook, then every hold opened and ready, stopping at a failed
/// `Fail` hook. Open holds stay in `sessions` until [`release`].
pub async fn quiesce(
    client: &Client,
    namespace: &str,
    uid: &str,
    sessions: &Sessions,
    spec: &QuiesceSpec,
    freeze_timeout_seconds: i32,
    runs: &mut [HookRun],
) {
    sessions.begin(uid);
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    run_pre(&pods, spec, runs).await;
    if !plan::keep_going(spec, runs) {
        return;
    }
    let indexes = plan::unfinished(runs, Step::Hold);
    for &i in &indexes {
        runs[i].state = HookRunState::Running;
        runs[i].started_at = Some(now());
    }
    let opened = futures::future::join_all(indexes.iter().map(|&i| {
        let run = runs[i].clone();
        let hook = hook_of(spec, &run).cloned();
        let pods = pods.clone();
        async move {
            let Some(hook) = hook else {
                return Err(exec::Outcome {
                    exit_code: None,
                    success: false,
                    message: Some("the hook was removed from the group".into()),
                });
            };
            let pod = run.pod.as_deref().unwrap_or_default();
            let container = run.container.as_deref().unwrap_or_default();
            if hook.wrap == HookWrap::Timeout {
                // Without `timeout` in the container the hold would have no deadline there.
                exec::probe_timeout(&pods, pod, container).await?;
            }
            let deadline =
                plan::hold_deadline(&hook, freeze_timeout_seconds, spec.release_grace_seconds);
            let command = exec::wrapped(&hook.command, hook.wrap, deadline);
            let ready = hook
                .ready_when
                .as_ref()
                .map(|r| r.stdout_line.clone())
                .unwrap_or_default();
            exec::Hold::open(
                &pods,
                pod,
                container,
                &command,
                hook.stdin.as_deref(),
                &ready,
                plan::exec_deadline(&hook),
            )
            .await
        }
    }))
    .await;
    for (&i, result) in indexes.iter().zip(opened) {
        match result {
            Ok(hold) => {
                runs[i].state = HookRunState::Held;
                runs[i].ready_at = Some(now());
                sessions.put(uid, key(&runs[i]), hold);
            }
            Err(outcome) => {
                warn!(hook = %runs[i].name, pod = ?runs[i].pod, message = ?outcome.message, "hold failed");
                record(&mut runs[i], outcome);
            }
        }
    }
}

/// Marks holds that ended before their release as failed (their lock no longer holds).
pub fn check_holds(uid: &str, sessions: &Sessions, runs: &mut [HookRun]) {
    for ((name, pod), outcome) in sessions.ended_early(uid) {
        if let Some(run) = runs
            .iter_mut()
            .find(|r| r.name == name && r.pod.clone().unwrap_or_default() == pod)
            && run.state == HookRunState::Held
        {
            record(
                run,
                exec::Outcome {
                    success: false,
                    message: Some(format!(
                        "the hold ended before its release: {}",
                        outcome.message.as_deref().unwrap_or("exit 0")
                    )),
                    ..outcome
                },
            );
        }
    }
}

/// Releases every hold of `uid` at once (release text, stdin closed) and records how each ended.
/// Runs still recorded Held without a session here are lost.
pub async fn release(uid: &str, sessions: &Sessions, spec: &QuiesceSpec, runs: &mut [HookRun]) {
    let holds = sessions.take(uid);
    let grace = Duration::from_secs(
        u64::try_from(spec.release_grace_seconds)
            .unwrap_or(5)
            .max(1),
    );
    let released_at = now();
    let outcomes = futures::future::join_all(holds.into_iter().map(|(k, hold)| {
        let release = spec
            .hooks
            .iter()
            .find(|h| h.name == k.0)
            .and_then(|h| h.release.clone())
            .unwrap_or_default();
        async move {
            let outcome = hold
                .release(release.stdin.as_deref(), release.close_stdin, grace)
                .await;
            (k, outcome)
        }
    }))
    .await;
    for (k, outcome) in outcomes {
        if let Some(run) = runs.iter_mut().find(|r| key(r) == k)
            && matches!(run.state, HookRunState::Held | HookRunState::Running)
        {
            run.released_at = Some(released_at.clone());
            record(run, outcome);
        }
    }
    plan::mark_lost(runs, |_| false, now());
}

/// Runs every Post hook not yet finished (always, whatever failed before), hook by hook in list
/// order. Each is recorded as started (`persist`) before it runs, so a restarted controller never
/// runs it again (it finds it Running, and marks it as maybe interrupted); and as finished after.
/// An error means a hook could not be recorded as started, and did not run.
pub async fn post<P, F>(
    client: &Client,
    namespace: &str,
    spec: &QuiesceSpec,
    runs: &mut [HookRun],
    mut persist: P,
) -> Result<(), crate::controller::Error>
where
    P: FnMut(Vec<HookRun>) -> F,
    F: std::future::Future<Output = Result<(), crate::controller::Error>>,
{
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    for hook in &spec.hooks {
        let indexes = runs_of(runs, Step::Post, &hook.name);
        if indexes.is_empty() {
            continue;
        }
        mark_running(runs, &indexes);
        if let Err(e) = persist(runs.to_vec()).await {
            for &i in &indexes {
                runs[i].state = HookRunState::Pending;
                runs[i].started_at = None;
            }
            return Err(e);
        }
        run_exec_hook(&pods, hook, runs, &indexes).await;
        // The final status write records it too; this one only narrows the window.
        if let Err(e) = persist(runs.to_vec()).await {
            warn!(hook = %hook.name, error = %e, "could not record a finished Post hook yet");
        }
    }
    Ok(())
}

/// Whether `runs` has Post hooks left.
pub fn post_left(runs: &[HookRun]) -> bool {
    !plan::unfinished(runs, Step::Post).is_empty()
}

/// Whether a run is a Pre hook or hold (the quiesce step).
pub fn is_quiesce(run: &HookRun) -> bool {
    run.mode == HookMode::Hold || run.phase != Some(HookPhase::Post)
}
