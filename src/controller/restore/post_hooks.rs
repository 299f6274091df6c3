//! Post-restore hooks: once a GroupRestore is Completed (every restored claim Bound), the group's
//! `spec.quiesce.postRestore` hooks run in the pods that use the restored claims, as soon as
//! such a pod is Running and Ready, each hook once, in list order, each to completion.
//!
//! The hooks come from the source snapshot's ConsistencyGroup. Results are recorded in
//! `status.postRestoreHooks` (one run per hook and pod) and the condition `PostRestoreHooks`:
//! False `WaitingForPods` while no pod uses the claims yet, True `Succeeded`, False `HookFailed`
//! (a hook under `onError: Fail` failed: the later hooks do not run), `NoPods` (no pod used the
//! claims within the restore's `deadlineSeconds` after it completed) or `HooksNotPermitted`.
//!
//! A run is recorded as Running before its exec starts, so a controller that restarts during a
//! hook does not run it again: the run is marked Failed ("interrupted") instead. At most once.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::core::{Selector, SelectorExt};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::RestoreContext;
use super::clones;
use crate::api::{
    ConsistencyGroup, GroupRestore, GroupRestoreStatus, GroupSnapshot, HookErrorPolicy, HookMode,
    HookPods, HookRun, HookRunState, RestoreHook, RestorePhase,
};
use crate::conditions::condition;
use crate::controller::Error;
use crate::controller::hooks::{exec, exec_denied, list_pods, targets::mounts_any};

/// The condition on a GroupRestore that says where its post-restore hooks stand.
pub const CONDITION_POST_RESTORE_HOOKS: &str = "PostRestoreHooks";
/// How often a restore looks for pods using its claims while it waits for one.
const POLL: Duration = Duration::from_secs(2);
/// Time the exec gets beyond a hook's own timeout (its in-container deadline ends it first).
const EXEC_GRACE: Duration = Duration::from_secs(5);

/// What the post-restore hooks do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Every hook ran, or a failing `Fail` hook stopped the rest, or there is none.
    Done,
    /// No Running and Ready pod uses the restored claims yet.
    WaitForPods,
    /// No pod used them within the deadline.
    NoPods,
    /// Run hook `hook` (its index) in these (pod, container) pairs, by pod name.
    Run {
        hook: usize,
        targets: Vec<(String, String)>,
    },
}

fn ready(pod: &Pod) -> bool {
    let status = pod.status.as_ref();
    pod.metadata.deletion_timestamp.is_none()
        && status.and_then(|s| s.phase.as_deref()) == Some("Running")
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The pods and containers a post-restore hook runs in: the Running and Ready pods that mount a
/// restored claim (or that its selector picks), by name; a pod without the named container is
/// skipped.
pub fn targets(hook: &RestoreHook, pods: &[Pod], claims: &BTreeSet<&str>) -> Vec<(String, String)> {
    let selector = match (&hook.pods, &hook.selector) {
        (HookPods::Selector, Some(s)) => match Selector::try_from(s.clone()) {
            Ok(s) => Some(s),
            Err(_) => return Vec::new(),
        },
        (HookPods::Selector, None) => return Vec::new(),
        (HookPods::Consumers, _) => None,
    };
    let mut found: Vec<(String, String)> = pods
        .iter()
        .filter(|p| ready(p))
        .filter(|p| match &selector {
            Some(s) => s.matches(p.labels()),
            None => mounts_any(p, claims),
        })
        .filter_map(|p| {
            let containers = &p.spec.as_ref()?.containers;
            let container = match &hook.container {
                Some(name) => containers.iter().find(|c| &c.name == name)?,
                None => containers.first()?,
            };
            Some((p.name_any(), container.name.clone()))
        })
        .collect();
    found.sort();
    found
}

/// The next step, from the hooks, the runs recorded so far, the namespace's pods, the restored
/// claims and whether the deadline for a pod to appear has passed.
pub fn next(
    hooks: &[RestoreHook],
    runs: &[HookRun],
    pods: &[Pod],
    claims: &BTreeSet<&str>,
    past_deadline: bool,
) -> Next {
    for (index, hook) in hooks.iter().enumerate() {
        let mine: Vec<&HookRun> = runs.iter().filter(|r| r.name == hook.name).collect();
        if mine.is_empty() {
            let targets = targets(hook, pods, claims);
            if !targets.is_empty() {
                return Next::Run {
                    hook: index,
                    targets,
                };
            }
            return if past_deadline {
                Next::NoPods
            } else {
                Next::WaitForPods
            };
        }
        let failed = mine.iter().any(|r| r.state == HookRunState::Failed);
        if failed && hook.on_error == HookErrorPolicy::Fail {
            return Next::Done;
        }
    }
    Next::Done
}

/// Runs left Running by an earlier controller: they are not run again.
pub fn interrupted(runs: &mut [HookRun]) -> bool {
    let mut any = false;
    for run in runs.iter_mut() {
        if matches!(run.state, HookRunState::Running | HookRunState::Pending) {
            run.state = HookRunState::Failed;
            run.message = Some(
                "interrupted: the controller restarted while the hook ran; it is not run again"
                    .into(),
            );
            any = true;
        }
    }
    any
}

/// The condition for where the runs stand once nothing is left to run.
pub fn verdict(hooks: &[RestoreHook], runs: &[HookRun]) -> (bool, &'static str, String) {
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.state == HookRunState::Failed)
        .map(|r| match &r.pod {
            Some(pod) => format!("{}/{pod}", r.name),
            None => r.name.clone(),
        })
        .collect();
    if failed.is_empty() {
        (
            true,
            "Succeeded",
            format!("{} post-restore hook run(s) succeeded", runs.len()),
        )
    } else {
        let stopped = hooks.iter().any(|h| runs.iter().all(|r| r.name != h.name));
        (
            false,
            "HookFailed",
            format!(
                "post-restore hook(s) failed: {}{}",
                failed.join(", "),
                if stopped {
                    "; the later hooks did not run"
                } else {
                    ""
                }
            ),
        )
    }
}

/// Whether the hooks of this restore are settled (the condition says so): nothing more to do.
pub fn settled(status: &GroupRestoreStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == CONDITION_POST_RESTORE_HOOKS && c.reason != "WaitingForPods")
}

fn set_condition(
    status: &mut GroupRestoreStatus,
    generation: Option<i64>,
    c: (bool, &str, String),
) {
    let previous = status.conditions.clone();
    status
        .conditions
        .retain(|c| c.type_ != CONDITION_POST_RESTORE_HOOKS);
    status.conditions.push(condition(
        &previous,
        CONDITION_POST_RESTORE_HOOKS,
        c.0,
        c.1,
        c.2,
        generation,
    ));
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

/// The group's post-restore hooks (none when the snapshot or the group is gone).
async fn hooks_of(
    rctx: &RestoreContext,
    restore: &GroupRestore,
    namespace: &str,
) -> Result<Vec<RestoreHook>, Error> {
    let source_ns = restore
        .spec
        .source
        .namespace
        .clone()
        .unwrap_or_else(|| namespace.to_string());
    let snapshots: Api<GroupSnapshot> = Api::namespaced(rctx.ctx.client.clone(), &source_ns);
    let Some(snapshot) = snapshots
        .get_opt(&restore.spec.source.group_snapshot_name)
        .await?
    else {
        return Ok(Vec::new());
    };
    let groups: Api<ConsistencyGroup> = Api::namespaced(rctx.ctx.client.clone(), &source_ns);
    let Some(group) = groups.get_opt(&snapshot.spec.group_name).await? else {
        return Ok(Vec::new());
    };
    Ok(group
        .spec
        .quiesce
        .map(|q| q.post_restore)
        .unwrap_or_default())
}

/// Drives the post-restore hooks of a Completed restore. `None`: nothing to do.
pub async fn reconcile(
    restore: &GroupRestore,
    rctx: &RestoreContext,
) -> Result<Option<Action>, Error> {
    let Some(mut status) = restore.status.clone() else {
        return Ok(None);
    };
    if status.phase != RestorePhase::Completed || settled(&status) {
        return Ok(None);
    }
    let namespace = restore.namespace().ok_or(Error::MissingNamespace)?;
    let name = restore.name_any();
    let hooks = hooks_of(rctx, restore, &namespace).await?;
    if hooks.is_empty() {
        return Ok(None);
    }
    let api: Api<GroupRestore> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    let generation = restore.metadata.generation;
    if interrupted(&mut status.post_restore_hooks) {
        clones::write_status(&api, &name, &status).await?;
    }
    let claims: Vec<String> = status.members.iter().map(|m| m.claim.clone()).collect();
    let claims: BTreeSet<&str> = claims.iter().map(String::as_str).collect();
    let pods_api: Api<Pod> = Api::namespaced(rctx.ctx.client.clone(), &namespace);
    let mut permitted = false;
    loop {
        let pods = list_pods(&rctx.ctx.client, &namespace).await?;
        let past_deadline = clones::remaining(
            status.completion_time.as_ref(),
            restore.spec.deadline_seconds,
            Timestamp::now(),
        )
        .is_none();
        match next(
            &hooks,
            &status.post_restore_hooks,
            &pods,
            &claims,
            past_deadline,
        ) {
            Next::Done => {
                let verdict = verdict(&hooks, &status.post_restore_hooks);
                info!(restore = %name, namespace = %namespace, "{}", verdict.2);
                set_condition(&mut status, generation, verdict);
                clones::write_status(&api, &name, &status).await?;
                return Ok(Some(Action::await_change()));
            }
            Next::NoPods => {
                let message = format!(
                    "no Running and Ready pod used the restored claims within {} s of the restore's completion; the post-restore hooks did not run",
                    restore.spec.deadline_seconds
                );
                warn!(restore = %name, namespace = %namespace, "{message}");
                set_condition(&mut status, generation, (false, "NoPods", message));
                clones::write_status(&api, &name, &status).await?;
                return Ok(Some(Action::await_change()));
            }
            Next::WaitForPods => {
                set_condition(
                    &mut status,
                    generation,
                    (
                        false,
                        "WaitingForPods",
                        "waiting for a Running and Ready pod that uses the restored claims".into(),
                    ),
                );
                if restore.status.as_ref() != Some(&status) {
                    clones::write_status(&api, &name, &status).await?;
                }
                return Ok(Some(Action::requeue(POLL)));
            }
            Next::Run { hook, targets } => {
                // Exec rights, asked only when there is something to run.
                if !permitted
                    && let Some(message) = exec_denied(&rctx.ctx.client, &namespace).await?
                {
                    set_condition(
                        &mut status,
                        generation,
                        (false, "HooksNotPermitted", message),
                    );
                    clones::write_status(&api, &name, &status).await?;
                    return Ok(Some(Action::await_change()));
                }
                permitted = true;
                let hook = &hooks[hook];
                let first = status.post_restore_hooks.len();
                for (pod, container) in &targets {
                    status.post_restore_hooks.push(HookRun {
                        name: hook.name.clone(),
                        mode: HookMode::Exec,
                        pod: Some(pod.clone()),
                        container: Some(container.clone()),
                        state: HookRunState::Running,
                        started_at: Some(micro_now()),
                        ..Default::default()
                    });
                }
                clones::write_status(&api, &name, &status).await?;
                let timeout = Duration::from_secs(hook.timeout_seconds.max(1) as u64);
                let command = exec::wrapped(&hook.command, hook.wrap, timeout);
                let outcomes = futures::future::join_all(targets.iter().map(|(pod, container)| {
                    exec::run(&pods_api, pod, container, &command, timeout + EXEC_GRACE)
                }))
                .await;
                for (run, outcome) in status.post_restore_hooks[first..].iter_mut().zip(outcomes) {
                    run.finished_at = Some(micro_now());
                    run.exit_code = outcome.exit_code;
                    run.message = outcome.message;
                    run.state = if outcome.success {
                        HookRunState::Succeeded
                    } else {
                        HookRunState::Failed
                    };
                    info!(restore = %name, hook = %run.name, pod = ?run.pod, state = ?run.state, "post-restore hook ran");
                }
                clones::write_status(&api, &name, &status).await?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hook(name: &str, on_error: HookErrorPolicy) -> RestoreHook {
        RestoreHook {
            name: name.into(),
            command: vec!["true".into()],
            on_error,
            timeout_seconds: 30,
            ..Default::default()
        }
    }

    fn pod(name: &str, claim: &str, phase: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"containers": [{"name": "main"}, {"name": "side"}],
                     "volumes": [{"name": "v", "persistentVolumeClaim": {"claimName": claim}}]},
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .expect("pod")
    }

    fn run(name: &str, pod: &str, state: HookRunState) -> HookRun {
        HookRun {
            name: name.into(),
            pod: Some(pod.into()),
            state,
            ..Default::default()
        }
    }

    /// What, hooks, runs so far, pods, past the deadline, the next step.
    type Case = (
        &'static str,
        Vec<RestoreHook>,
        Vec<HookRun>,
        Vec<Pod>,
        bool,
        Next,
    );

    #[test]
    fn the_next_step_of_post_restore_hooks() {
        let claims: BTreeSet<&str> = ["data-r", "log-r"].into();
        let fail = hook("a", HookErrorPolicy::Fail);
        let cont = hook("a", HookErrorPolicy::Continue);
        let b = hook("b", HookErrorPolicy::Fail);
        let user = pod("db", "data-r", "Running", true);
        let other = pod("web", "unrelated", "Running", true);
        let starting = pod("db", "data-r", "Running", false);
        let pending = pod("db", "data-r", "Pending", false);
        let run_a = Next::Run {
            hook: 0,
            targets: vec![("db".into(), "main".into())],
        };
        let run_b = Next::Run {
            hook: 1,
            targets: vec![("db".into(), "main".into())],
        };
        let ok = run("a", "db", HookRunState::Succeeded);
        let bad = run("a", "db", HookRunState::Failed);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("no hooks", vec![], vec![], vec![user.clone()], false, Next::Done),
            ("a Ready user runs the first hook", vec![fail.clone(), b.clone()], vec![], vec![user.clone(), other.clone()], false, run_a.clone()),
            ("a pod of other claims is no target", vec![fail.clone()], vec![], vec![other.clone()], false, Next::WaitForPods),
            ("a user not yet Ready: wait", vec![fail.clone()], vec![], vec![starting.clone()], false, Next::WaitForPods),
            ("a Pending user: wait", vec![fail.clone()], vec![], vec![pending.clone()], false, Next::WaitForPods),
            ("nobody came in time", vec![fail.clone()], vec![], vec![], true, Next::NoPods),
            ("after the first, the second", vec![fail.clone(), b.clone()], vec![ok.clone()], vec![user.clone()], false, run_b.clone()),
            ("a failed Fail hook stops the rest", vec![fail.clone(), b.clone()], vec![bad.clone()], vec![user.clone()], false, Next::Done),
            ("a failed Continue hook does not", vec![cont.clone(), b.clone()], vec![bad.clone()], vec![user.clone()], false, run_b.clone()),
            ("all ran", vec![fail.clone(), b.clone()], vec![ok.clone(), run("b", "db", HookRunState::Succeeded)], vec![user.clone()], false, Next::Done),
            ("a hook that ran is never run again, pods or not", vec![fail.clone()], vec![ok.clone()], vec![], true, Next::Done),
        ];
        for (what, hooks, runs, pods, past, want) in cases {
            assert_eq!(next(&hooks, &runs, &pods, &claims, past), want, "{what}");
        }
    }

    #[test]
    fn targets_pick_the_named_container_the_selector_and_skip_pods_without_it() {
        let claims: BTreeSet<&str> = ["data-r"].into();
        let pods = vec![
            pod("b", "data-r", "Running", true),
            pod("a", "data-r", "Running", true),
            pod("web", "other", "Running", true),
        ];
        let mut h = hook("a", HookErrorPolicy::Fail);
        assert_eq!(
            targets(&h, &pods, &claims),
            vec![("a".into(), "main".into()), ("b".into(), "main".into())]
        );
        h.container = Some("side".into());
        assert_eq!(targets(&h, &pods, &claims)[0], ("a".into(), "side".into()));
        h.container = Some("nope".into());
        assert!(targets(&h, &pods, &claims).is_empty());
        h.container = None;
        h.pods = HookPods::Selector;
        h.selector =
            Some(serde_json::from_value(json!({"matchLabels": {"app": "web"}})).expect("selector"));
        assert_eq!(
            targets(&h, &pods, &claims),
            vec![("web".into(), "main".into())]
        );
    }

    #[test]
    fn interrupted_runs_are_failed_not_rerun_and_the_verdict_names_failures() {
        let hooks = vec![
            hook("a", HookErrorPolicy::Fail),
            hook("b", HookErrorPolicy::Fail),
        ];
        let mut runs = vec![run("a", "db", HookRunState::Running)];
        assert!(interrupted(&mut runs));
        assert_eq!(runs[0].state, HookRunState::Failed);
        assert!(!interrupted(&mut runs));
        let (ok, reason, message) = verdict(&hooks, &runs);
        assert!(!ok);
        assert_eq!(reason, "HookFailed");
        assert!(
            message.contains("a/db") && message.contains("later hooks did not run"),
            "{message}"
        );
        let runs = vec![
            run("a", "db", HookRunState::Succeeded),
            run("b", "db", HookRunState::Succeeded),
        ];
        assert_eq!(verdict(&hooks, &runs).1, "Succeeded");
    }
}
