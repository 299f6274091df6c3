//! `kubectl tandem`: the command line for groups, snapshots, restores and nodes.
//!
//! The `tandem` binary is this plugin when it is invoked as `kubectl-tandem` (a symlink or copy
//! on PATH; Krew installs one), and `tandem cli ...` is the same. It writes only tandem's custom
//! resources: everything it does can also be done with `kubectl apply`.
//!
//! - [`manifest`]: flags to objects (what `--dry-run=client -o yaml` prints), pure.
//! - [`render`]: tables and `show` pages, pure.
//! - [`wait`]: `--wait` progress and its outcome, pure.
//!
//! Exit codes: 0 done, 1 failed (an API error, a Failed snapshot or restore), 2 usage, 3 timed
//! out waiting.

pub mod manifest;
pub mod render;
pub mod wait;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::{ConsistencyGroup, GroupRestore, GroupSnapshot, NodeRestore, NodeSnapshot};
use manifest::{GroupFlags, RestoreTarget};
use wait::Progress;

/// Exit code of a failure (an API error, a Failed snapshot or restore).
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a usage error (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code of a `--wait` that ran out of time.
pub const EXIT_TIMEOUT: u8 = 3;

/// What went wrong, and so the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Failed(String),
    #[error("{0}")]
    Timeout(String),
    #[error("Error from server ({}): {}", .0.reason, .0.message)]
    Api(Box<kube::core::Status>),
    #[error("{0}")]
    Kube(kube::Error),
    #[error("cannot load the kubeconfig: {0}")]
    Config(String),
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_saphyr::SerializeError),
    #[error("{0}")]
    Json(#[from] serde_json::Error),
}

impl From<kube::Error> for CliError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(status) => CliError::Api(status),
            other => CliError::Kube(other),
        }
    }
}

impl From<manifest::ManifestError> for CliError {
    fn from(e: manifest::ManifestError) -> Self {
        CliError::Usage(e.to_string())
    }
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Timeout(_) => EXIT_TIMEOUT,
            _ => EXIT_FAILED,
        }
    }
}

/// `kubectl tandem`, parsed on its own (as the plugin).
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-tandem",
    bin_name = "kubectl tandem",
    version,
    about = "Consistency groups for Kubernetes volumes: groups, group snapshots, restores, nodes",
    after_help = "Exit codes: 0 done, 1 failed, 2 usage, 3 timed out (--wait)."
)]
pub struct PluginCli {
    #[command(flatten)]
    pub args: CliArgs,
}

/// The CLI's flags and command (also `tandem cli ...`).
#[derive(Args, Debug)]
pub struct CliArgs {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: CliCommand,
}

/// kubectl's connection flags and output format.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Path to the kubeconfig file (default: $KUBECONFIG, then ~/.kube/config, then in-cluster).
    #[arg(long, global = true, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// The namespace (default: the context's namespace, else `default`).
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// List across all namespaces.
    #[arg(short = 'A', long, global = true)]
    pub all_namespaces: bool,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum)]
    pub output: Option<Output>,
}

/// `-o`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Table,
    Wide,
    Yaml,
    Json,
    Name,
}

/// `--dry-run`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DryRun {
    /// Send nothing; print the object.
    Client,
    /// Let the API server validate and default it, keep nothing.
    Server,
    /// Really create it.
    None,
}

#[derive(Args, Debug, Clone)]
pub struct DryRunFlag {
    /// `client`: print the object instead of creating it (with -o yaml: a manifest for GitOps);
    /// `server`: validate on the API server, keep nothing.
    #[arg(long, value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "client", default_value = "none")]
    pub dry_run: DryRun,
}

#[derive(Args, Debug, Clone)]
pub struct WaitFlags {
    /// Wait until it is done, printing progress; exit 1 if it fails, 3 on timeout.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits (90s, 5m, 1h30m).
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    pub timeout: Duration,
}

fn parse_duration_arg(text: &str) -> Result<Duration, String> {
    manifest::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum CliCommand {
    /// Consistency groups (Cinder `group-*`, `rbd group`).
    #[command(subcommand, visible_alias = "cg")]
    Group(GroupCommand),
    /// Group snapshots (Cinder `group-snapshot-*`, `rbd group snap`).
    #[command(subcommand, visible_alias = "snap")]
    Snapshot(SnapshotCommand),
    /// Group restores: a snapshot to new claims or in place (Cinder `group-create-from-src`).
    #[command(subcommand)]
    Restore(RestoreCommand),
    /// Group snapshot schedules: cron in a time zone, retention (storkctl/velero `schedule`).
    #[command(subcommand, visible_alias = "sched")]
    Schedule(ScheduleCommand),
    /// The nodes tandem's members live on: readiness, kernel, when the agent last reported, the
    /// backends and filesystems it has snapshotted.
    Nodes,
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group from a label selector and/or a list of claims.
    Create {
        name: String,
        /// Claims of the namespace with these labels (k=v,k2=v2).
        #[arg(short = 'l', long)]
        selector: Option<String>,
        /// PersistentVolumes with these labels (only those claimed from this namespace).
        #[arg(long)]
        volume_selector: Option<String>,
        /// Claims that are members whatever their labels (a,b or repeated).
        #[arg(long, value_delimiter = ',')]
        claims: Vec<String>,
        /// Required (default), BestEffort or Disabled.
        #[arg(long, value_parser = ["Required", "BestEffort", "Disabled"])]
        freeze: Option<String>,
        /// The longest any member stays frozen (1s to 300s; default 10s).
        #[arg(long, value_parser = parse_duration_arg)]
        freeze_timeout: Option<Duration>,
        #[command(flatten)]
        dry_run: DryRunFlag,
    },
    /// List groups.
    #[command(visible_alias = "ls")]
    List,
    /// A group: its members (claim, volume, node, driver, why unsupported) and its snapshots.
    #[command(visible_alias = "info")]
    Show { name: String },
    /// Delete groups (their snapshots stay).
    #[command(visible_alias = "rm")]
    Delete { names: Vec<String> },
    /// Add claims to the group's spec.claims (Cinder `group-update --add-volumes`, `rbd group image add`).
    Add { name: String, claims: Vec<String> },
    /// Remove claims from the group's spec.claims.
    Remove { name: String, claims: Vec<String> },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Snapshot a group: freeze every member, cut, thaw.
    Create {
        group: String,
        /// The snapshot's name (default: <group>-<yyyymmddhhmmss>, UTC).
        name: Option<String>,
        /// Delete (default) or Retain the member snapshots when this object is deleted.
        #[arg(long, value_parser = ["Delete", "Retain"])]
        deletion_policy: Option<String>,
        #[command(flatten)]
        dry_run: DryRunFlag,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// List group snapshots.
    #[command(visible_alias = "ls")]
    List {
        /// Only snapshots of this group.
        #[arg(long)]
        group: Option<String>,
    },
    /// A snapshot: members, the freeze window per node, the consistency reached and why.
    #[command(visible_alias = "info")]
    Show { name: String },
    /// Delete snapshots (Delete policy: their member snapshots go from the nodes).
    #[command(visible_alias = "rm")]
    Delete {
        names: Vec<String>,
        /// Wait until they are gone (their member snapshots removed from the nodes).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
        timeout: Duration,
    },
}

#[derive(Subcommand, Debug)]
pub enum RestoreCommand {
    /// Restore a snapshot: to new claims (default) or in place of the group's own claims.
    Create {
        name: String,
        /// The GroupSnapshot to restore (it must be Ready).
        #[arg(
            long,
            required_unless_present = "from_schedule",
            conflicts_with = "from_schedule"
        )]
        from_snapshot: Option<String>,
        /// Restore the newest Ready snapshot of this GroupSnapshotSchedule (velero's --from-schedule).
        #[arg(long)]
        from_schedule: Option<String>,
        /// One new claim per member (the default).
        #[arg(long, conflicts_with = "in_place")]
        new_claims: bool,
        /// Put the group's own claims back to the snapshot (their volumes are kept as an undo point).
        #[arg(long)]
        in_place: bool,
        /// New claims' names: {claim}, {restore}, {snapshot} (default {claim}-{restore}).
        #[arg(long, conflicts_with = "in_place")]
        name_template: Option<String>,
        /// An explicit new name: member=new-claim (repeatable; then only these are restored).
        #[arg(long = "claim", conflicts_with = "in_place")]
        claims: Vec<String>,
        /// Labels for the new claims (k=v,k2=v2).
        #[arg(long, conflicts_with = "in_place")]
        claim_labels: Option<String>,
        /// In place: scale the Deployments/StatefulSets using the claims to zero and back.
        #[arg(long, requires = "in_place")]
        scale_down: bool,
        /// Roll back if not done within this time (10s to 24h; default 15m).
        #[arg(long, value_parser = parse_duration_arg)]
        deadline: Option<Duration>,
        #[command(flatten)]
        dry_run: DryRunFlag,
        #[command(flatten)]
        wait: WaitFlags,
    },
    /// List group restores.
    #[command(visible_alias = "ls")]
    List,
    /// A restore: members, clones, workloads, the undo point.
    #[command(visible_alias = "info")]
    Show { name: String },
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Snapshot a group on a cron schedule in a time zone, with retention.
    Create {
        name: String,
        /// The ConsistencyGroup to snapshot.
        #[arg(long)]
        group: String,
        /// Five cron fields or @hourly/@daily/@weekly/@monthly/@yearly.
        #[arg(long)]
        cron: String,
        /// IANA time zone the cron is read in (default UTC; never the controller's local zone).
        #[arg(long, visible_alias = "tz")]
        time_zone: Option<String>,
        /// Create it suspended.
        #[arg(long)]
        suspend: bool,
        /// A run later than this after its due time is missed, not taken.
        #[arg(long, value_parser = parse_duration_arg)]
        starting_deadline: Option<Duration>,
        /// The snapshots' deletion policy: Delete (default) or Retain.
        #[arg(long, value_parser = ["Delete", "Retain"])]
        deletion_policy: Option<String>,
        /// Keep the newest N snapshots.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Keep the newest Ready snapshot of each of the last N hours (in the schedule's zone).
        #[arg(long)]
        hourly: Option<u32>,
        /// ... of each of the last N days.
        #[arg(long)]
        daily: Option<u32>,
        /// ... of each of the last N ISO weeks.
        #[arg(long)]
        weekly: Option<u32>,
        /// ... of each of the last N months.
        #[arg(long)]
        monthly: Option<u32>,
        /// ... of each of the last N years.
        #[arg(long)]
        yearly: Option<u32>,
        /// Delete snapshots older than this (30d, 12h), within the other rules.
        #[arg(long)]
        max_age: Option<String>,
        /// Never delete below this many Ready snapshots (default 1).
        #[arg(long)]
        min_ready: Option<u32>,
        /// Delete the schedule's snapshots when the schedule is deleted (default: keep them).
        #[arg(long)]
        delete_snapshots_with_schedule: bool,
        #[command(flatten)]
        dry_run: DryRunFlag,
    },
    /// List schedules.
    #[command(visible_alias = "ls")]
    List,
    /// A schedule: next and last run, last Ready snapshot, runs missed and skipped, kept counts.
    #[command(visible_alias = "info")]
    Show { name: String },
    /// Delete schedules (their snapshots stay unless retention.deleteSnapshotsWithSchedule).
    #[command(visible_alias = "rm")]
    Delete { names: Vec<String> },
    /// Stop taking snapshots (retention goes on).
    Suspend { name: String },
    /// Take snapshots again from the next due time.
    Resume { name: String },
}

/// The label tandem puts on each GroupSnapshot a schedule takes.
const SCHEDULE_LABEL: &str = "tandem.dev/schedule";

/// Runs the plugin as `kubectl-tandem`: parses argv and returns the exit code.
pub async fn main_as_plugin() -> u8 {
    let cli = PluginCli::parse();
    run(cli.args).await
}

/// Runs a parsed command and returns the exit code (errors are printed to stderr).
pub async fn run(args: CliArgs) -> u8 {
    match execute(args).await {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// The connection and what the flags ask of the output.
struct Ctx {
    client: Client,
    namespace: String,
    global: Global,
}

impl Ctx {
    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// For lists: every namespace with -A.
    fn list_api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = kube::core::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        if self.global.all_namespaces {
            Api::all(self.client.clone())
        } else {
            self.api()
        }
    }

    fn output(&self) -> Output {
        self.global.output.unwrap_or(Output::Table)
    }
}

async fn connect(global: &Global) -> Result<Ctx, CliError> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(path).map_err(|e| CliError::Config(e.to_string()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| CliError::Config(e.to_string()))?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| CliError::Config(e.to_string()))?,
    };
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(CliError::Kube)?;
    Ok(Ctx {
        client,
        namespace,
        global: global.clone(),
    })
}

async fn execute(args: CliArgs) -> Result<(), CliError> {
    let global = args.global;
    // What needs no API server: completion, and the manifests of --dry-run=client.
    match &args.command {
        CliCommand::Completion { shell } => {
            let mut command = PluginCli::command();
            clap_complete::generate(
                *shell,
                &mut command,
                "kubectl-tandem",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        command => {
            if let Some(dry_run) = create_dry_run(command) {
                // Bad flags are a usage error before any connection is tried, and a client dry
                // run needs no API server (unless the snapshot comes from a schedule's status).
                let manifest = create_manifest(command, global.namespace.as_deref())?;
                if dry_run == DryRun::Client {
                    return print_dry_run(&manifest, global.output);
                }
            }
        }
    }
    let ctx = connect(&global).await?;
    match args.command {
        CliCommand::Completion { .. } => Ok(()),
        CliCommand::Group(command) => group(&ctx, command).await,
        CliCommand::Snapshot(command) => snapshot(&ctx, command).await,
        CliCommand::Restore(command) => restore(&ctx, command).await,
        CliCommand::Schedule(command) => schedule(&ctx, command).await,
        CliCommand::Nodes => nodes(&ctx).await,
    }
}

/// A create command's --dry-run, if it can be built from its flags alone.
fn create_dry_run(command: &CliCommand) -> Option<DryRun> {
    match command {
        CliCommand::Group(GroupCommand::Create { dry_run, .. })
        | CliCommand::Snapshot(SnapshotCommand::Create { dry_run, .. })
        | CliCommand::Schedule(ScheduleCommand::Create { dry_run, .. })
        | CliCommand::Restore(RestoreCommand::Create {
            dry_run,
            from_schedule: None,
            ..
        }) => Some(dry_run.dry_run),
        _ => None,
    }
}

/// The object a `create` command makes.
fn create_manifest(command: &CliCommand, namespace: Option<&str>) -> Result<Value, CliError> {
    let no_labels = Default::default();
    match command {
        CliCommand::Group(GroupCommand::Create {
            name,
            selector,
            volume_selector,
            claims,
            freeze,
            freeze_timeout,
            ..
        }) => Ok(manifest::consistency_group(&GroupFlags {
            name: name.clone(),
            namespace: namespace.map(str::to_string),
            selector: selector.clone(),
            volume_selector: volume_selector.clone(),
            claims: claims.clone(),
            freeze: freeze.clone(),
            freeze_timeout: *freeze_timeout,
            labels: Default::default(),
        })?),
        CliCommand::Snapshot(SnapshotCommand::Create {
            group,
            name,
            deletion_policy,
            ..
        }) => {
            let name = name
                .clone()
                .unwrap_or_else(|| manifest::default_snapshot_name(group, jiff::Timestamp::now()));
            Ok(manifest::group_snapshot(
                &name,
                namespace,
                group,
                deletion_policy.as_deref(),
                &no_labels,
            ))
        }
        CliCommand::Restore(RestoreCommand::Create {
            name,
            from_snapshot,
            in_place,
            name_template,
            claims,
            claim_labels,
            scale_down,
            deadline,
            ..
        }) => {
            let Some(from_snapshot) = from_snapshot else {
                return Err(CliError::Usage(
                    "say which snapshot: --from-snapshot or --from-schedule".into(),
                ));
            };
            let target = if *in_place {
                RestoreTarget::InPlace {
                    scale_down: *scale_down,
                }
            } else {
                RestoreTarget::NewClaims {
                    name_template: name_template.clone(),
                    claims: claims.clone(),
                    claim_labels: match claim_labels {
                        Some(text) => manifest::parse_labels(text)?,
                        None => Default::default(),
                    },
                }
            };
            Ok(manifest::group_restore(
                name,
                namespace,
                from_snapshot,
                &target,
                *deadline,
                &no_labels,
            )?)
        }
        CliCommand::Schedule(ScheduleCommand::Create {
            name,
            group,
            cron,
            time_zone,
            suspend,
            starting_deadline,
            deletion_policy,
            keep_last,
            hourly,
            daily,
            weekly,
            monthly,
            yearly,
            max_age,
            min_ready,
            delete_snapshots_with_schedule,
            ..
        }) => Ok(manifest::group_snapshot_schedule(
            &manifest::ScheduleFlags {
                name: name.clone(),
                namespace: namespace.map(str::to_string),
                group: group.clone(),
                cron: cron.clone(),
                time_zone: time_zone.clone(),
                suspend: *suspend,
                starting_deadline: *starting_deadline,
                deletion_policy: deletion_policy.clone(),
                keep_last: *keep_last,
                hourly: *hourly,
                daily: *daily,
                weekly: *weekly,
                monthly: *monthly,
                yearly: *yearly,
                max_age: max_age.clone(),
                min_ready: *min_ready,
                delete_snapshots_with_schedule: *delete_snapshots_with_schedule,
            },
        )?),
        _ => Err(CliError::Usage("not a create command".into())),
    }
}

fn kind_ref(kind: &str) -> String {
    format!("{}.{}", kind.to_lowercase(), crate::api::GROUP)
}

fn print_dry_run(manifest: &Value, output: Option<Output>) -> Result<(), CliError> {
    let kind = manifest["kind"].as_str().unwrap_or_default();
    let name = manifest["metadata"]["name"].as_str().unwrap_or_default();
    match output {
        Some(Output::Yaml) => print!("{}", serde_saphyr::to_string(manifest)?),
        Some(Output::Json) => println!("{}", serde_json::to_string_pretty(manifest)?),
        Some(Output::Name) => println!("{}/{name}", kind_ref(kind)),
        _ => println!("{}/{name} created (dry run)", kind_ref(kind)),
    }
    Ok(())
}

/// An object as `-o yaml|json` prints it: without managedFields (as kubectl, by default).
fn printable<K: Serialize>(object: &K) -> Result<Value, CliError> {
    let mut value = serde_json::to_value(object)?;
    if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("managedFields");
    }
    Ok(value)
}

fn print_value(value: &Value, output: Output) -> Result<(), CliError> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        _ => print!("{}", serde_saphyr::to_string(value)?),
    }
    Ok(())
}

/// Prints a list in a machine format (`None` for table formats, which the caller renders).
fn print_list<K: Serialize + Resource<DynamicType = ()>>(
    items: &[K],
    output: Output,
) -> Result<bool, CliError> {
    match output {
        Output::Yaml | Output::Json => {
            let items: Result<Vec<Value>, CliError> = items.iter().map(printable).collect();
            let list = json!({"apiVersion": "v1", "kind": "List", "items": items?,
                              "metadata": {"resourceVersion": ""}});
            print_value(&list, output)?;
            Ok(true)
        }
        Output::Name => {
            for item in items {
                println!("{}/{}", kind_ref(&K::kind(&())), item.name_any());
            }
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// Prints one object in a machine format; false for table formats.
fn print_one<K: Serialize + Resource<DynamicType = ()>>(
    object: &K,
    output: Output,
) -> Result<bool, CliError> {
    match output {
        Output::Yaml | Output::Json => {
            print_value(&printable(object)?, output)?;
            Ok(true)
        }
        Output::Name => {
            println!("{}/{}", kind_ref(&K::kind(&())), object.name_any());
            Ok(true)
        }
        _ => Ok(false),
    }
}

fn sorted<K: ResourceExt>(mut items: Vec<K>) -> Vec<K> {
    items.sort_by_key(|i| (i.namespace(), i.name_any()));
    items
}

/// Creates the object of a create command (or has the server dry-run it), and prints it.
async fn create<K>(ctx: &Ctx, command: &CliCommand, dry_run: DryRun) -> Result<K, CliError>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    if dry_run == DryRun::Client {
        let manifest = create_manifest(command, ctx.global.namespace.as_deref())?;
        print_dry_run(&manifest, ctx.global.output)?;
        return Ok(serde_json::from_value(manifest)?);
    }
    let manifest = create_manifest(command, Some(&ctx.namespace))?;
    let object: K = serde_json::from_value(manifest)?;
    let params = PostParams {
        dry_run: dry_run == DryRun::Server,
        ..Default::default()
    };
    let created = ctx.api::<K>().create(&params, &object).await?;
    if !print_one(&created, ctx.output())? {
        let suffix = if params.dry_run {
            " (server dry run)"
        } else {
            ""
        };
        println!(
            "{}/{} created{suffix}",
            kind_ref(&K::kind(&())),
            created.name_any()
        );
    }
    Ok(created)
}

async fn delete<K>(ctx: &Ctx, names: &[String]) -> Result<(), CliError>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    if names.is_empty() {
        return Err(CliError::Usage("name at least one object to delete".into()));
    }
    for name in names {
        ctx.api::<K>()
            .delete(name, &DeleteParams::default())
            .await?;
        println!("{}/{name} deleted", kind_ref(&K::kind(&())));
    }
    Ok(())
}

async fn group(ctx: &Ctx, command: GroupCommand) -> Result<(), CliError> {
    let now = jiff::Timestamp::now();
    let output = ctx.output();
    match command {
        GroupCommand::Create { ref dry_run, .. } => {
            let dry = dry_run.dry_run;
            create::<ConsistencyGroup>(ctx, &CliCommand::Group(command), dry).await?;
            Ok(())
        }
        GroupCommand::List => {
            let groups = sorted(
                ctx.list_api::<ConsistencyGroup>()
                    .list(&ListParams::default())
                    .await?
                    .items,
            );
            if !print_list(&groups, output)? {
                print!(
                    "{}",
                    render::groups_table(
                        &groups,
                        output == Output::Wide,
                        ctx.global.all_namespaces,
                        now
                    )
                );
            }
            Ok(())
        }
        GroupCommand::Show { name } => {
            let group = ctx.api::<ConsistencyGroup>().get(&name).await?;
            if print_one(&group, output)? {
                return Ok(());
            }
            let snapshots: Vec<GroupSnapshot> = sorted(
                ctx.api::<GroupSnapshot>()
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|s| s.spec.group_name == name)
                    .collect(),
            );
            print!("{}", render::group_page(&group, &snapshots, now));
            Ok(())
        }
        GroupCommand::Delete { names } => delete::<ConsistencyGroup>(ctx, &names).await,
        GroupCommand::Add { name, claims } => edit_group_claims(ctx, &name, &claims, true).await,
        GroupCommand::Remove { name, claims } => {
            edit_group_claims(ctx, &name, &claims, false).await
        }
    }
}

async fn edit_group_claims(
    ctx: &Ctx,
    name: &str,
    claims: &[String],
    add: bool,
) -> Result<(), CliError> {
    if claims.is_empty() {
        return Err(CliError::Usage("name at least one claim".into()));
    }
    let api = ctx.api::<ConsistencyGroup>();
    // Optimistic concurrency: the patch carries the resourceVersion it was computed from; a
    // conflict (someone else changed the group) is retried from a fresh read.
    for _ in 0..5 {
        let group = api.get(name).await?;
        let current = group.spec.claims.clone().unwrap_or_default();
        let claims = manifest::edit_claims(&current, claims, add)?;
        if claims.is_empty()
            && group.spec.selector.is_none()
            && group.spec.volume_selector.is_none()
        {
            return Err(CliError::Usage(format!(
                "removing these would leave group {name} with no members: delete the group instead"
            )));
        }
        let patch = json!({
            "metadata": {"resourceVersion": group.resource_version()},
            "spec": {"claims": if claims.is_empty() { Value::Null } else { json!(claims) }},
        });
        match api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(updated) => {
                if !print_one(&updated, ctx.output())? {
                    println!(
                        "{}/{name} {}",
                        kind_ref("ConsistencyGroup"),
                        if add {
                            "claims added"
                        } else {
                            "claims removed"
                        }
                    );
                }
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CliError::Failed(format!(
        "group {name} kept changing: try again"
    )))
}

async fn snapshot(ctx: &Ctx, command: SnapshotCommand) -> Result<(), CliError> {
    let now = jiff::Timestamp::now();
    let output = ctx.output();
    match command {
        SnapshotCommand::Create {
            ref dry_run,
            ref wait,
            ..
        } => {
            let dry = dry_run.dry_run;
            let wait = wait.clone();
            let created = create::<GroupSnapshot>(ctx, &CliCommand::Snapshot(command), dry).await?;
            if wait.wait && dry == DryRun::None {
                wait_snapshot(ctx, &created.name_any(), wait.timeout).await?;
            }
            Ok(())
        }
        SnapshotCommand::List { group } => {
            let snapshots: Vec<GroupSnapshot> = sorted(
                ctx.list_api::<GroupSnapshot>()
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .filter(|s| group.as_ref().is_none_or(|g| &s.spec.group_name == g))
                    .collect(),
            );
            if !print_list(&snapshots, output)? {
                print!(
                    "{}",
                    render::snapshots_table(
                        &snapshots,
                        output == Output::Wide,
                        ctx.global.all_namespaces,
                        now
                    )
                );
            }
            Ok(())
        }
        SnapshotCommand::Show { name } => {
            let snapshot = ctx.api::<GroupSnapshot>().get(&name).await?;
            if print_one(&snapshot, output)? {
                return Ok(());
            }
            let node_snapshots = node_snapshots_of(ctx, &name).await;
            let freeze = ctx
                .api::<ConsistencyGroup>()
                .get_opt(&snapshot.spec.group_name)
                .await
                .ok()
                .flatten()
                .map(|g| g.spec.freeze);
            print!(
                "{}",
                render::snapshot_page(&snapshot, &node_snapshots, freeze)
            );
            Ok(())
        }
        SnapshotCommand::Delete {
            names,
            wait,
            timeout,
        } => {
            delete::<GroupSnapshot>(ctx, &names).await?;
            if wait {
                wait_gone::<GroupSnapshot>(ctx, &names, timeout).await?;
            }
            Ok(())
        }
    }
}

/// The NodeSnapshots of one GroupSnapshot (empty if they cannot be read: they only add detail).
async fn node_snapshots_of(ctx: &Ctx, snapshot: &str) -> Vec<NodeSnapshot> {
    match ctx.api::<NodeSnapshot>().list(&ListParams::default()).await {
        Ok(list) => list
            .items
            .into_iter()
            .filter(|n| n.spec.group_snapshot == snapshot)
            .collect(),
        Err(_) => Vec::new(),
    }
}

const POLL: Duration = Duration::from_millis(500);

/// Polls until `progress` says done or failed, printing each new progress line to stderr.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut progress: F) -> Result<(), CliError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Progress, CliError>>,
{
    let start = tokio::time::Instant::now();
    let deadline = start + timeout;
    let mut last = String::new();
    loop {
        match progress().await? {
            Progress::Done(line) => {
                println!("{line}");
                return Ok(());
            }
            Progress::Failed(line) => return Err(CliError::Failed(line)),
            Progress::Going(line) => {
                if line != last {
                    eprintln!("[{:>5.1}s] {what}: {line}", start.elapsed().as_secs_f64());
                    last = line;
                }
            }
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(CliError::Timeout(format!(
                "timed out after {} waiting for {what}; last seen: {last}",
                humantime(timeout)
            )));
        }
        tokio::time::sleep(POLL.min(deadline - now)).await;
    }
}

fn humantime(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

async fn wait_snapshot(ctx: &Ctx, name: &str, timeout: Duration) -> Result<(), CliError> {
    let api = ctx.api::<GroupSnapshot>();
    wait_for(&format!("groupsnapshot {name}"), timeout, || {
        let api = api.clone();
        async move {
            let Some(snapshot) = api.get_opt(name).await? else {
                return Ok(Progress::Failed(format!("groupsnapshot {name} is gone")));
            };
            let nodes = node_snapshots_of(ctx, name).await;
            Ok(wait::snapshot_progress(&snapshot, &nodes))
        }
    })
    .await
}

async fn wait_gone<K>(ctx: &Ctx, names: &[String], timeout: Duration) -> Result<(), CliError>
where
    K: Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = ctx.api::<K>();
    wait_for("deletion", timeout, || {
        let api = api.clone();
        async move {
            let mut left = Vec::new();
            for name in names {
                if api.get_opt(name).await?.is_some() {
                    left.push(name.clone());
                }
            }
            Ok(if left.is_empty() {
                Progress::Done(format!("{} gone", names.join(", ")))
            } else {
                Progress::Going(format!("still there: {}", left.join(", ")))
            })
        }
    })
    .await
}

async fn restore(ctx: &Ctx, command: RestoreCommand) -> Result<(), CliError> {
    let now = jiff::Timestamp::now();
    let output = ctx.output();
    match command {
        RestoreCommand::Create {
            from_schedule: Some(_),
            ..
        } => {
            let mut command = command;
            if let RestoreCommand::Create {
                from_snapshot,
                from_schedule,
                ..
            } = &mut command
            {
                let schedule = from_schedule.take().unwrap_or_default();
                let found = ctx
                    .api::<crate::api::GroupSnapshotSchedule>()
                    .get(&schedule)
                    .await?;
                let Some(newest) = found.status.and_then(|s| s.last_ready_snapshot) else {
                    return Err(CliError::Failed(format!(
                        "schedule {schedule} has no Ready snapshot yet"
                    )));
                };
                eprintln!("restoring {newest}, the newest Ready snapshot of schedule {schedule}");
                *from_snapshot = Some(newest);
            }
            Box::pin(restore(ctx, command)).await
        }
        RestoreCommand::Create {
            ref dry_run,
            ref wait,
            ..
        } => {
            let dry = dry_run.dry_run;
            let wait = wait.clone();
            let created = create::<GroupRestore>(ctx, &CliCommand::Restore(command), dry).await?;
            if wait.wait && dry == DryRun::None {
                let name = created.name_any();
                let api = ctx.api::<GroupRestore>();
                let nodes = ctx.api::<NodeRestore>();
                wait_for(&format!("grouprestore {name}"), wait.timeout, || {
                    let (api, nodes, name) = (api.clone(), nodes.clone(), name.clone());
                    async move {
                        let Some(restore) = api.get_opt(&name).await? else {
                            return Ok(Progress::Failed(format!("grouprestore {name} is gone")));
                        };
                        let node_restores = nodes
                            .list(&ListParams::default())
                            .await
                            .map(|l| l.items)
                            .unwrap_or_default();
                        Ok(wait::restore_progress(&restore, &node_restores))
                    }
                })
                .await?;
            }
            Ok(())
        }
        RestoreCommand::List => {
            let restores = sorted(
                ctx.list_api::<GroupRestore>()
                    .list(&ListParams::default())
                    .await?
                    .items,
            );
            if !print_list(&restores, output)? {
                print!(
                    "{}",
                    render::restores_table(
                        &restores,
                        output == Output::Wide,
                        ctx.global.all_namespaces,
                        now
                    )
                );
            }
            Ok(())
        }
        RestoreCommand::Show { name } => {
            let restore = ctx.api::<GroupRestore>().get(&name).await?;
            if !print_one(&restore, output)? {
                print!("{}", render::restore_page(&restore));
            }
            Ok(())
        }
    }
}

async fn schedule(ctx: &Ctx, command: ScheduleCommand) -> Result<(), CliError> {
    use crate::api::GroupSnapshotSchedule;
    let now = jiff::Timestamp::now();
    let output = ctx.output();
    match command {
        ScheduleCommand::Create { ref dry_run, .. } => {
            let dry = dry_run.dry_run;
            create::<GroupSnapshotSchedule>(ctx, &CliCommand::Schedule(command), dry).await?;
            Ok(())
        }
        ScheduleCommand::List => {
            let schedules = sorted(
                ctx.list_api::<GroupSnapshotSchedule>()
                    .list(&ListParams::default())
                    .await?
                    .items,
            );
            if !print_list(&schedules, output)? {
                print!(
                    "{}",
                    render::schedules_table(
                        &schedules,
                        output == Output::Wide,
                        ctx.global.all_namespaces,
                        now
                    )
                );
            }
            Ok(())
        }
        ScheduleCommand::Show { name } => {
            let schedule = ctx.api::<GroupSnapshotSchedule>().get(&name).await?;
            if print_one(&schedule, output)? {
                return Ok(());
            }
            let mut snapshots = ctx
                .api::<GroupSnapshot>()
                .list(&ListParams::default().labels(&format!("{SCHEDULE_LABEL}={name}")))
                .await?
                .items;
            snapshots.sort_by_key(|s| std::cmp::Reverse(s.name_any()));
            print!("{}", render::schedule_page(&schedule, &snapshots, now));
            Ok(())
        }
        ScheduleCommand::Delete { names } => delete::<GroupSnapshotSchedule>(ctx, &names).await,
        ScheduleCommand::Suspend { name } => set_suspend(ctx, &name, true).await,
        ScheduleCommand::Resume { name } => set_suspend(ctx, &name, false).await,
    }
}

async fn set_suspend(ctx: &Ctx, name: &str, suspend: bool) -> Result<(), CliError> {
    let patch = json!({"spec": {"suspend": suspend}});
    let updated = ctx
        .api::<crate::api::GroupSnapshotSchedule>()
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    if !print_one(&updated, ctx.output())? {
        println!(
            "{}/{name} {}",
            kind_ref("GroupSnapshotSchedule"),
            if suspend { "suspended" } else { "resumed" }
        );
    }
    Ok(())
}

async fn nodes(ctx: &Ctx) -> Result<(), CliError> {
    let output = ctx.output();
    let groups = ctx
        .list_api::<ConsistencyGroup>()
        .list(&ListParams::default())
        .await?
        .items;
    let node_snapshots = ctx
        .list_api::<NodeSnapshot>()
        .list(&ListParams::default())
        .await?
        .items;
    // Nodes are cluster-scoped: a namespace's user may not read them; the rest still says a lot.
    let known: std::collections::BTreeSet<String> = groups
        .iter()
        .flat_map(|g| g.status.iter().flat_map(|s| s.nodes.iter().cloned()))
        .chain(node_snapshots.iter().map(|n| n.spec.node_name.clone()))
        .collect();
    let all_nodes = match Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
    {
        Ok(list) => list.items,
        Err(e) => {
            eprintln!(
                "note: cannot list Nodes ({}): readiness and kernel unknown",
                short_error(&e)
            );
            Vec::new()
        }
    };
    // Only nodes tandem has to do with: members live there or an agent cut there.
    let relevant: Vec<Node> = all_nodes
        .into_iter()
        .filter(|n| known.contains(&n.name_any()))
        .collect();
    let facts = render::node_facts(&relevant, &groups, &node_snapshots);
    match output {
        Output::Yaml | Output::Json => {
            let items: Vec<Value> = facts
                .iter()
                .map(|f| {
                    json!({"name": f.name, "ready": f.ready, "kernel": f.kernel,
                           "agentLastSeen": f.agent_seen.map(|t| t.to_string()),
                           "members": f.members, "unsupportedMembers": f.unsupported,
                           "backends": f.backends, "filesystems": f.filesystems,
                           "nodeSnapshots": f.cuts, "failedNodeSnapshots": f.failed})
                })
                .collect();
            print_value(&json!({"nodes": items}), output)
        }
        Output::Name => {
            for f in &facts {
                println!("node/{}", f.name);
            }
            Ok(())
        }
        _ => {
            print!(
                "{}",
                render::nodes_table(&facts, output == Output::Wide, jiff::Timestamp::now())
            );
            Ok(())
        }
    }
}

fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.reason.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<PluginCli, clap::Error> {
        PluginCli::try_parse_from(std::iter::once("kubectl-tandem").chain(args.iter().copied()))
    }

    #[test]
    fn flags_parse_like_kubectl() {
        let cli = parse(&[
            "snapshot",
            "create",
            "g",
            "-n",
            "shop",
            "--wait",
            "--timeout",
            "90s",
            "-o",
            "yaml",
        ])
        .expect("parses");
        assert_eq!(cli.args.global.namespace.as_deref(), Some("shop"));
        assert_eq!(cli.args.global.output, Some(Output::Yaml));
        let CliCommand::Snapshot(SnapshotCommand::Create { wait, dry_run, .. }) = cli.args.command
        else {
            panic!("snapshot create");
        };
        assert!(wait.wait);
        assert_eq!(wait.timeout, Duration::from_secs(90));
        assert_eq!(dry_run.dry_run, DryRun::None);
        let cli = parse(&["group", "create", "g", "--claims", "a,b", "--dry-run"]).expect("parses");
        let CliCommand::Group(GroupCommand::Create {
            dry_run, claims, ..
        }) = cli.args.command
        else {
            panic!("group create");
        };
        assert_eq!(dry_run.dry_run, DryRun::Client);
        assert_eq!(claims, ["a", "b"]);
        assert!(parse(&["group", "create", "g", "--dry-run=server"]).is_ok());
        assert!(
            parse(&[
                "restore",
                "create",
                "r",
                "--from-snapshot",
                "s",
                "--in-place",
                "--new-claims"
            ])
            .is_err()
        );
        assert!(
            parse(&[
                "restore",
                "create",
                "r",
                "--from-snapshot",
                "s",
                "--scale-down"
            ])
            .is_err()
        );
        assert!(parse(&["snapshot", "create", "g", "--timeout", "soon"]).is_err());
        assert!(parse(&["-o", "xml", "group", "list"]).is_err());
    }

    #[test]
    fn exit_codes() {
        assert_eq!(CliError::Usage("x".into()).exit_code(), 2);
        assert_eq!(CliError::Failed("x".into()).exit_code(), 1);
        assert_eq!(CliError::Timeout("x".into()).exit_code(), 3);
        let usage = parse(&["group", "frobnicate"]).expect_err("usage");
        assert_eq!(usage.exit_code(), 2);
    }

    #[test]
    fn command_tree_is_consistent() {
        PluginCli::command().debug_assert();
    }
}
