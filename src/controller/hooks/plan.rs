//! The pure part of quiesce hooks: what runs when, what a failure means, the deadlines, and what
//! the snapshot reached. Table-tested; the I/O is in [`super`].

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

use crate::api::{
    Consistency, HookErrorPolicy, HookMode, HookPhase, HookRun, HookRunState, QuiesceHook,
    QuiesceSpec,
};

/// The steps of a quiesced snapshot, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Exec hooks with `phase: Pre`, hook by hook in list order (each in parallel across its pods).
    Pre,
    /// Every Hold hook opened in parallel and ready.
    Hold,
    /// Exec hooks with `phase: Post`, after the release and the thaw.
    Post,
}

/// The step a hook belongs to.
pub fn step_of(hook: &QuiesceHook) -> Step {
    match (hook.mode, hook.phase) {
        (HookMode::Hold, _) => Step::Hold,
        (HookMode::Exec, HookPhase::Pre) => Step::Pre,
        (HookMode::Exec, HookPhase::Post) => Step::Post,
    }
}

/// The step of a recorded run.
pub fn step_of_run(run: &HookRun) -> Step {
    match (run.mode, run.phase) {
        (HookMode::Hold, _) => Step::Hold,
        (HookMode::Exec, Some(HookPhase::Post)) => Step::Post,
        (HookMode::Exec, _) => Step::Pre,
    }
}

/// What a failure of `hook` means.
pub fn policy(spec: &QuiesceSpec, hook_name: &str) -> HookErrorPolicy {
    spec.hooks
        .iter()
        .find(|h| h.name == hook_name)
        .and_then(|h| h.on_error)
        .unwrap_or(spec.on_hook_error)
}

fn secs(s: i32) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(1).max(1))
}

/// An Exec hook's deadline (in the container with `wrap: Timeout`, and for tandem's wait).
pub fn exec_deadline(hook: &QuiesceHook) -> Duration {
    secs(hook.timeout_seconds)
}

/// The longest a hold may live: ready within `timeoutSeconds`, held at most as long as any
/// filesystem may stay frozen, plus the release grace. The container kills it then.
pub fn hold_deadline(
    hook: &QuiesceHook,
    freeze_timeout_seconds: i32,
    grace_seconds: i32,
) -> Duration {
    secs(hook.timeout_seconds) + secs(freeze_timeout_seconds) + secs(grace_seconds)
}

/// The label of a run in messages and `failedHooks`: `name/pod`, or `name` without a pod.
pub fn label(run: &HookRun) -> String {
    match &run.pod {
        Some(pod) => format!("{}/{pod}", run.name),
        None => run.name.clone(),
    }
}

/// The runs that failed, as labels.
pub fn failed(runs: &[HookRun]) -> Vec<String> {
    runs.iter()
        .filter(|r| r.state == HookRunState::Failed)
        .map(label)
        .collect()
}

/// Whether the cut may go ahead: no run of a `Fail` hook failed (Post hooks do not count: they
/// run after the cut).
pub fn may_cut(spec: &QuiesceSpec, runs: &[HookRun]) -> Result<(), Vec<String>> {
    let blocking: Vec<String> = runs
        .iter()
        .filter(|r| step_of_run(r) != Step::Post)
        .filter(|r| r.state == HookRunState::Failed)
        .filter(|r| policy(spec, &r.name) == HookErrorPolicy::Fail)
        .map(label)
        .collect();
    if blocking.is_empty() {
        Ok(())
    } else {
        Err(blocking)
    }
}

/// Whether the next Pre hook (or the holds) may start after `runs` so far: a failed `Fail` hook
/// stops everything up to the cut; Post hooks still run.
pub fn keep_going(spec: &QuiesceSpec, runs: &[HookRun]) -> bool {
    may_cut(spec, runs).is_ok()
}

/// Runs whose session this process does not have (the controller restarted while they ran):
/// they are failed, since their command may or may not have ended and a lost hold no longer
/// holds. Returns how many were marked.
pub fn mark_lost(runs: &mut [HookRun], live: impl Fn(&HookRun) -> bool, now: MicroTime) -> usize {
    let mut marked = 0;
    for run in runs.iter_mut() {
        let active = matches!(run.state, HookRunState::Running | HookRunState::Held);
        if active && !live(run) {
            run.state = HookRunState::Failed;
            run.finished_at.get_or_insert(now.clone());
            run.message = Some(lost_message(run).into());
            marked += 1;
        }
    }
    marked
}

/// Why a run lost to a restart failed: a Post hook may have been interrupted and is not run again
/// (a hook runs at most once); a Pre hook or a hold no longer holds.
pub fn lost_message(run: &HookRun) -> &'static str {
    match step_of_run(run) {
        Step::Post => {
            "the controller restarted while this Post hook ran: it may have been interrupted, and is not run again (with wrap: Timeout it ends at its in-container deadline)"
        }
        Step::Pre | Step::Hold => {
            "the controller restarted while this ran; the session was lost (with wrap: Timeout the command ends at its in-container deadline)"
        }
    }
}

/// The longest a quiesce may take from the snapshot's start: every Pre hook in turn (each with
/// tandem's 2 s of slack), then the longest hold's whole life. A quiesce still not recorded by
/// then is given up: every hold has ended in its container anyway.
pub fn quiesce_deadline(spec: &QuiesceSpec, freeze_timeout_seconds: i32) -> Duration {
    let pre: Duration = spec
        .hooks
        .iter()
        .filter(|h| step_of(h) == Step::Pre)
        .map(|h| exec_deadline(h) + Duration::from_secs(2))
        .sum();
    let hold = spec
        .hooks
        .iter()
        .filter(|h| step_of(h) == Step::Hold)
        .map(|h| hold_deadline(h, freeze_timeout_seconds, spec.release_grace_seconds))
        .max()
        .unwrap_or_default();
    pre + hold + Duration::from_secs(2)
}

/// The consistency reached: ApplicationQuiesced only when hooks ran, every run succeeded and
/// every member was frozen.
pub fn consistency(all_frozen: bool, hooks_ran: bool, runs: &[HookRun]) -> Consistency {
    if !all_frozen {
        return Consistency::Independent;
    }
    let all_ok = !runs.is_empty() && runs.iter().all(|r| r.state == HookRunState::Succeeded);
    if hooks_ran && all_ok {
        Consistency::ApplicationQuiesced
    } else {
        Consistency::FilesystemFrozen
    }
}

fn millis_between(from: &MicroTime, to: &MicroTime) -> i64 {
    i64::try_from(to.0.duration_since(from.0).as_millis()).unwrap_or(i64::MAX)
}

/// The quiesce window: from the first hold ready to the last hold released; None without holds
/// that were ready and released.
pub fn quiesce_window_millis(runs: &[HookRun]) -> Option<i64> {
    let holds: Vec<&HookRun> = runs.iter().filter(|r| r.mode == HookMode::Hold).collect();
    let first_ready = holds
        .iter()
        .filter_map(|r| r.ready_at.as_ref())
        .min_by_key(|t| t.0)?;
    let last_release = holds
        .iter()
        .filter_map(|r| r.released_at.as_ref())
        .max_by_key(|t| t.0)?;
    Some(millis_between(first_ready, last_release).max(0))
}

/// When the barrier started: when the last Pre hook or hold ended its quiesce step (so slow
/// hooks do not eat into the nodes' freeze deadline). None without hook runs.
pub fn barrier_start(runs: &[HookRun]) -> Option<MicroTime> {
    runs.iter()
        .filter(|r| step_of_run(r) != Step::Post)
        .filter_map(|r| match r.mode {
            HookMode::Hold => r.ready_at.as_ref().or(r.finished_at.as_ref()),
            HookMode::Exec => r.finished_at.as_ref(),
        })
        .max_by_key(|t| t.0)
        .cloned()
}

/// The runs a step has not yet finished (what is left to run or release on every path).
pub fn unfinished(runs: &[HookRun], step: Step) -> Vec<usize> {
    runs.iter()
        .enumerate()
        .filter(|(_, r)| step_of_run(r) == step)
        .filter(|(_, r)| !matches!(r.state, HookRunState::Succeeded | HookRunState::Failed))
        .map(|(i, _)| i)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;

    fn spec(hooks: serde_json::Value, default: &str) -> QuiesceSpec {
        serde_json::from_value(json!({"onHookError": default, "hooks": hooks})).expect("spec")
    }

    fn run(name: &str, mode: HookMode, phase: Option<HookPhase>, state: HookRunState) -> HookRun {
        HookRun {
            name: name.into(),
            mode,
            phase,
            pod: Some("p".into()),
            state,
            ..Default::default()
        }
    }

    fn at(ms: i64) -> MicroTime {
        MicroTime(Timestamp::from_millisecond(1_800_000_000_000 + ms).expect("time"))
    }

    #[test]
    fn steps_follow_mode_and_phase() {
        let s = spec(
            json!([{"name": "a", "command": ["x"]}, {"name": "b", "phase": "Post", "command": ["x"]},
                   {"name": "c", "mode": "Hold", "readyWhen": {"stdoutLine": "R"}, "command": ["x"]}]),
            "Fail",
        );
        let steps: Vec<Step> = s.hooks.iter().map(step_of).collect();
        assert_eq!(steps, [Step::Pre, Step::Post, Step::Hold]);
    }

    #[test]
    fn a_failed_fail_hook_blocks_the_cut_and_a_continue_hook_does_not() {
        use HookRunState::*;
        let hooks = json!([{"name": "strict", "command": ["x"], "onError": "Fail"},
            {"name": "lax", "command": ["x"], "onError": "Continue"},
            {"name": "hold", "mode": "Hold", "readyWhen": {"stdoutLine": "R"}, "command": ["x"]},
            {"name": "post", "phase": "Post", "command": ["x"]}]);
        let pre = |n: &str, s| run(n, HookMode::Exec, Some(HookPhase::Pre), s);
        let hold = |s| run("hold", HookMode::Hold, None, s);
        let post = |s| run("post", HookMode::Exec, Some(HookPhase::Post), s);
        type Case = (&'static str, Vec<HookRun>, Result<(), Vec<String>>);
        let cases: Vec<Case> = vec![
            ("Fail", vec![pre("strict", Succeeded), hold(Held)], Ok(())),
            (
                "Fail",
                vec![pre("strict", Failed)],
                Err(vec!["strict/p".into()]),
            ),
            ("Fail", vec![pre("lax", Failed), hold(Held)], Ok(())),
            ("Fail", vec![hold(Failed)], Err(vec!["hold/p".into()])),
            ("Continue", vec![hold(Failed)], Ok(())),
            (
                "Continue",
                vec![pre("strict", Failed)],
                Err(vec!["strict/p".into()]),
            ),
            // Post hooks run after the cut: they never block it.
            ("Fail", vec![post(Failed)], Ok(())),
        ];
        for (default, runs, expected) in cases {
            let s = spec(hooks.clone(), default);
            assert_eq!(may_cut(&s, &runs), expected, "{default} {runs:?}");
            assert_eq!(keep_going(&s, &runs), expected.is_ok());
        }
    }

    #[test]
    fn the_hold_deadline_covers_readiness_the_freeze_and_the_grace() {
        let s = spec(
            json!([{"name": "h", "mode": "Hold", "readyWhen": {"stdoutLine": "R"}, "command": ["x"], "timeoutSeconds": 15}]),
            "Fail",
        );
        assert_eq!(hold_deadline(&s.hooks[0], 10, 5), Duration::from_secs(30));
        assert_eq!(exec_deadline(&s.hooks[0]), Duration::from_secs(15));
        // Nonsense from outside never makes a zero or negative deadline.
        assert_eq!(hold_deadline(&s.hooks[0], -4, 0), Duration::from_secs(17));
    }

    #[test]
    fn application_quiesced_only_when_every_run_succeeded_on_frozen_members() {
        use HookRunState::*;
        let ok = run("h", HookMode::Hold, None, Succeeded);
        let bad = run("e", HookMode::Exec, Some(HookPhase::Post), Failed);
        let cases = [
            (
                true,
                true,
                vec![ok.clone()],
                Consistency::ApplicationQuiesced,
            ),
            (
                true,
                true,
                vec![ok.clone(), bad.clone()],
                Consistency::FilesystemFrozen,
            ),
            (true, false, vec![], Consistency::FilesystemFrozen),
            (true, true, vec![], Consistency::FilesystemFrozen),
            (false, true, vec![ok.clone()], Consistency::Independent),
        ];
        for (frozen, ran, runs, expected) in cases {
            assert_eq!(
                consistency(frozen, ran, &runs),
                expected,
                "{frozen} {ran} {runs:?}"
            );
        }
    }

    #[test]
    fn the_quiesce_window_spans_first_ready_to_last_release() {
        let mut a = run("a", HookMode::Hold, None, HookRunState::Succeeded);
        a.ready_at = Some(at(100));
        a.released_at = Some(at(400));
        let mut b = run("b", HookMode::Hold, None, HookRunState::Succeeded);
        b.ready_at = Some(at(150));
        b.released_at = Some(at(420));
        let mut pre = run(
            "p",
            HookMode::Exec,
            Some(HookPhase::Pre),
            HookRunState::Succeeded,
        );
        pre.finished_at = Some(at(50));
        assert_eq!(
            quiesce_window_millis(&[a.clone(), b.clone(), pre.clone()]),
            Some(320)
        );
        assert_eq!(quiesce_window_millis(std::slice::from_ref(&pre)), None);
        assert_eq!(barrier_start(&[a, b, pre.clone()]), Some(at(150)));
        assert_eq!(barrier_start(&[pre]), Some(at(50)));
        assert_eq!(barrier_start(&[]), None);
    }

    #[test]
    fn a_quiesce_is_bounded_by_its_pre_hooks_and_its_longest_hold() {
        let s = spec(
            json!([{"name": "a", "command": ["x"], "timeoutSeconds": 3},
                   {"name": "b", "command": ["x"], "timeoutSeconds": 4},
                   {"name": "p", "phase": "Post", "command": ["x"], "timeoutSeconds": 100},
                   {"name": "h", "mode": "Hold", "readyWhen": {"stdoutLine": "R"}, "command": ["x"], "timeoutSeconds": 10},
                   {"name": "i", "mode": "Hold", "readyWhen": {"stdoutLine": "R"}, "command": ["x"], "timeoutSeconds": 20}]),
            "Fail",
        );
        // (3 + 2) + (4 + 2) + (20 + 10 + 5) + 2
        assert_eq!(quiesce_deadline(&s, 10), Duration::from_secs(48));
        let none = spec(json!([]), "Fail");
        assert_eq!(quiesce_deadline(&none, 10), Duration::from_secs(2));
    }

    #[test]
    fn sessions_lost_to_a_restart_fail_and_only_those() {
        use HookRunState::*;
        let mut runs = vec![
            run("held", HookMode::Hold, None, Held),
            run("done", HookMode::Exec, Some(HookPhase::Pre), Succeeded),
            run("live", HookMode::Hold, None, Held),
            run("later", HookMode::Exec, Some(HookPhase::Post), Pending),
        ];
        let marked = mark_lost(&mut runs, |r| r.name == "live", at(0));
        assert_eq!(marked, 1);
        let states: Vec<HookRunState> = runs.iter().map(|r| r.state).collect();
        assert_eq!(states, [Failed, Succeeded, Held, Pending]);
        assert_eq!(unfinished(&runs, Step::Post), [3]);
        assert_eq!(unfinished(&runs, Step::Hold), [2]);
        // A Post hook found running after a restart is not run again, and says so.
        let mut posts = vec![run("after", HookMode::Exec, Some(HookPhase::Post), Running)];
        assert_eq!(mark_lost(&mut posts, |_| false, at(0)), 1);
        assert!(unfinished(&posts, Step::Post).is_empty());
        assert!(
            posts[0]
                .message
                .as_deref()
                .is_some_and(|m| m.contains("may have been interrupted")),
            "{posts:?}"
        );
    }
}
