//! Quiesce hooks: commands tandem runs in the pods that use a group's members, ordered around the
//! group's one freeze barrier (every Pre hook, every Hold ready, the cut on every node, every hold
//! released with the thaw, every Post hook).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, MicroTime};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// The most hooks a group may declare.
pub const MAX_HOOKS: usize = 16;
/// The most hook runs (hook x pod) a GroupSnapshot records.
pub const MAX_HOOK_RUNS: usize = 256;

/// `spec.quiesce` of a ConsistencyGroup: how the application is quiesced around the cut.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct QuiesceSpec {
    /// What a failing hook means unless the hook says otherwise: `Fail` (default: nothing is cut,
    /// the snapshot ends Failed with reason HookFailed) or `Continue` (the snapshot is cut, its
    /// consistency stays below ApplicationQuiesced and its status names the hook).
    #[serde(default)]
    pub on_hook_error: HookErrorPolicy,

    /// The hooks, run in list order within their step (at most 16, names unique).
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub hooks: Vec<QuiesceHook>,

    /// Seconds a hold may outlive its freeze before tandem's own in-container deadline kills it
    /// (default 5): a hold ends at the latest `timeoutSeconds + freezeTimeoutSeconds +
    /// releaseGraceSeconds` after it started.
    #[serde(default = "default_release_grace_seconds")]
    #[schemars(range(min = 1, max = 60))]
    pub release_grace_seconds: i32,

    /// Commands a GroupRestore runs once the restored claims are bound and used by Running pods
    /// (at most 16, run in list order, each to completion).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub post_restore: Vec<RestoreHook>,
}

fn default_release_grace_seconds() -> i32 {
    5
}

fn default_timeout_seconds() -> i32 {
    30
}

/// One quiesce hook.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'Hold' || has(self.readyWhen)").message("a Hold hook needs readyWhen: the line its command prints once the application is quiesced"))]
#[x_kube(validation = Rule::new("self.mode == 'Hold' || (!has(self.readyWhen) && !has(self.release) && !has(self.stdin))").message("readyWhen, release and stdin belong to Hold hooks"))]
#[x_kube(validation = Rule::new("self.pods != 'Selector' || has(self.selector)").message("pods: Selector needs a selector"))]
#[x_kube(validation = Rule::new("self.pods == 'Selector' || !has(self.selector)").message("a selector needs pods: Selector"))]
pub struct QuiesceHook {
    /// The hook's name, unique in the group (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,

    /// `Exec` (default): run to completion, before (`phase: Pre`) or after (`phase: Post`) the cut.
    /// `Hold`: a session kept open across the cut (a lock that lives as long as the session),
    /// ready when its command prints `readyWhen.stdoutLine`, released right after every node has cut.
    #[serde(default)]
    pub mode: HookMode,

    /// For `Exec` hooks: `Pre` (default, before the holds and the freeze) or `Post` (after every
    /// hold is released and every filesystem thawed; Post hooks always run, whatever failed).
    #[serde(default)]
    pub phase: HookPhase,

    /// Where the hook runs: `Consumers` (default: the Running pods that mount a member claim) or
    /// `Selector` (the Running pods of this namespace that `selector` picks).
    #[serde(default)]
    pub pods: HookPods,

    /// The pods of `pods: Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,

    /// `EachPod` (default, in parallel) or `OnePod` (the first Running target by name).
    #[serde(default)]
    pub run_in: HookRunIn,

    /// The container to run in (default: the pod's first container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,

    /// The command and its arguments (not run in a shell; use `["sh", "-c", "..."]` for one).
    #[schemars(length(min = 1, max = 64))]
    #[schemars(inner(length(max = 4096)))]
    pub command: Vec<String>,

    /// Hold hooks: text written to the command's stdin once it started (e.g. the SQL that takes
    /// the lock and prints the ready line).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub stdin: Option<String>,

    /// Hold hooks: when the application is quiesced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_when: Option<ReadyWhen>,

    /// Hold hooks: how the hold is released (default: close stdin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<HoldRelease>,

    /// `Timeout` (default): tandem runs the command under `timeout -s KILL <seconds>` (the
    /// container needs the `timeout` utility), so it ends inside the container even if tandem's
    /// session does not (an exec client going away does not stop the command). `None`: the
    /// command itself must end on stdin EOF or on its own.
    #[serde(default)]
    pub wrap: HookWrap,

    /// Exec hooks: the longest the command may run. Hold hooks: the longest it may take to
    /// become ready. 1 to 3600, default 30.
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,

    /// Overrides `quiesce.onHookError` for this hook.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_error: Option<HookErrorPolicy>,
}

/// A hook run after a restore.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.pods != 'Selector' || has(self.selector)").message("pods: Selector needs a selector"))]
pub struct RestoreHook {
    /// The hook's name, unique in the list (a DNS label).
    #[schemars(
        length(min = 1, max = 63),
        regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    )]
    pub name: String,
    /// `Consumers` (default: the Running pods that mount a restored claim) or `Selector`.
    #[serde(default)]
    pub pods: HookPods,
    /// The pods of `pods: Selector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
    /// The container to run in (default: the pod's first container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container: Option<String>,
    /// The command and its arguments (not run in a shell).
    #[schemars(length(min = 1, max = 64))]
    #[schemars(inner(length(max = 4096)))]
    pub command: Vec<String>,
    /// `Timeout` (default) or `None`, as for quiesce hooks.
    #[serde(default)]
    pub wrap: HookWrap,
    /// The longest the command may run, 1 to 3600 (default 30).
    #[serde(default = "default_timeout_seconds")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i32,
    /// `Fail` (default: the restore reports the failure) or `Continue`.
    #[serde(default)]
    pub on_error: HookErrorPolicy,
}

/// When a hold is quiesced.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReadyWhen {
    /// The hold is ready once its command prints a line equal to this (surrounding whitespace
    /// ignored).
    #[schemars(length(min = 1, max = 256))]
    pub stdout_line: String,
}

/// How a hold is released.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldRelease {
    /// Text written to stdin to release (e.g. `UNLOCK TABLES;`), before stdin is closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4096))]
    pub stdin: Option<String>,
    /// Close stdin after writing (default true); the command is expected to exit then.
    #[serde(default = "default_true")]
    pub close_stdin: bool,
}

impl Default for HoldRelease {
    fn default() -> Self {
        HoldRelease {
            stdin: None,
            close_stdin: true,
        }
    }
}

fn default_true() -> bool {
    true
}

/// What a failing hook means.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookErrorPolicy {
    /// Nothing is cut; the snapshot ends Failed with reason HookFailed.
    #[default]
    Fail,
    /// The snapshot is cut; its consistency stays below ApplicationQuiesced and it names the hook.
    Continue,
}

/// How a hook runs.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookMode {
    /// Run to completion.
    #[default]
    Exec,
    /// Keep the session open across the cut; release after every node has cut.
    Hold,
}

/// When an Exec hook runs.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookPhase {
    /// Before the holds and the freeze.
    #[default]
    Pre,
    /// After the release and the thaw.
    Post,
}

/// Which pods a hook runs in.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookPods {
    /// The Running pods that mount a member claim.
    #[default]
    Consumers,
    /// The Running pods of the namespace that the hook's selector picks.
    Selector,
}

/// In how many of its target pods a hook runs.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookRunIn {
    /// Every target pod, in parallel.
    #[default]
    EachPod,
    /// The first target pod by name.
    OnePod,
}

/// Whether tandem gives the command a deadline inside the container.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookWrap {
    /// Run under `timeout -s KILL <seconds>`.
    #[default]
    Timeout,
    /// Run as given.
    None,
}

/// Whether a GroupSnapshot runs its group's hooks.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HooksPolicy {
    /// Run the group's quiesce hooks (default).
    #[default]
    Run,
    /// Do not run them: the snapshot is at most FilesystemFrozen.
    Skip,
}

/// Where one hook run stands.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum HookRunState {
    /// Not started yet.
    #[default]
    Pending,
    /// Running (an Exec hook) or waiting to become ready (a Hold).
    Running,
    /// A Hold that is ready and held across the cut.
    Held,
    /// Ran to completion with exit 0 (a Hold: was held through the cut and released cleanly).
    Succeeded,
    /// Failed, timed out, or (a Hold) ended before its release.
    Failed,
}

/// One hook in one pod, as a GroupSnapshot ran it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HookRun {
    /// The hook's name.
    pub name: String,
    /// `Exec` or `Hold`.
    pub mode: HookMode,
    /// `Pre` or `Post` for Exec hooks; unset for a Hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<HookPhase>,
    /// The pod it ran in; unset when the hook found no Running pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// The container it ran in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Where it stands.
    #[serde(default)]
    pub state: HookRunState,
    /// When the exec started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<MicroTime>,
    /// A Hold: when it printed its ready line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_at: Option<MicroTime>,
    /// A Hold: when tandem released it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<MicroTime>,
    /// When the command ended (as tandem saw it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<MicroTime>,
    /// The command's exit code, when it ended with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// What happened, in words (the end of stderr on a failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub message: Option<String>,
}
