//! The watch loop: NodeSnapshots of this node only (field selector on `spec.nodeName`), each
//! validated against its PersistentVolumes and driven through the [`Engine`]. Status is written with
//! server-side apply (field manager `tandem-agent`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, PersistentVolume};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::api::{DeletionPolicy, NodeAction, NodePhase, NodeSnapshot, NodeSnapshotStatus};
use crate::finalizer;

use super::discovery;
use super::engine::{CutRequest, Engine, VolumeRequest};
use super::{AgentArgs, AgentError};

/// The finalizer the agent puts on a NodeSnapshot whose snapshots it may have to delete.
pub const FINALIZER: &str = "tandem.dev/agent";
/// The field manager of the agent's status writes.
pub const FIELD_MANAGER: &str = "tandem-agent";

struct Ctx {
    client: Client,
    engine: Engine,
    node: String,
    kubelet_dir: PathBuf,
}

/// Watches this node's NodeSnapshots until a shutdown signal; on shutdown thaws whatever it holds.
pub async fn run(client: Client, engine: Engine, args: AgentArgs) -> Result<(), AgentError> {
    let api: Api<NodeSnapshot> = Api::all(client.clone());
    let selector = format!("spec.nodeName={}", args.node_name);
    tracing::info!(node = %args.node_name, "agent watching NodeSnapshots");
    let ctx = Arc::new(Ctx {
        client,
        engine: engine.clone(),
        node: args.node_name.clone(),
        kubelet_dir: args.kubelet_dir.clone(),
    });
    Controller::new(api, watcher::Config::default().fields(&selector))
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
    let api: Api<NodeSnapshot> = Api::namespaced(ctx.client.clone(), &namespace);

    if obj.metadata.deletion_timestamp.is_some() {
        // Act only once every other finalizer is gone: the controller holds its own until the
        // GroupSnapshot itself is deleted, so a member snapshot is never deleted on its own.
        let only_ours = obj.finalizers().iter().all(|f| f == FINALIZER);
        if let Some(patch) = finalizer::removing(obj.as_ref(), FINALIZER).filter(|_| only_ours) {
            let retain = obj.spec.deletion_policy == DeletionPolicy::Retain;
            let engine = ctx.engine.clone();
            let key = uid.clone();
            tokio::task::spawn_blocking(move || engine.finalize(&key, retain)).await??;
            api.patch(&name, &PatchParams::default(), &patch).await?;
            tracing::info!(%namespace, %name, retain, "snapshots finalized");
        }
        return Ok(Action::await_change());
    }

    let engine = ctx.engine.clone();
    let key = uid.clone();
    let known = tokio::task::spawn_blocking(move || engine.status(&key)).await??;
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.metadata.generation;

    let desired: Option<NodeSnapshotStatus> = match obj.spec.action {
        NodeAction::Cut => match known {
            Some(status) => Some(status),
            None if current.phase == NodePhase::Cut => Some(failed(
                generation,
                "the agent has no record of this cut (its state directory was lost); nothing of it is frozen",
            )),
            None if current.phase != NodePhase::Pending => None,
            // The finalizer goes on alongside the checks (both before any freeze): a refused
            // request merely carries it until the NodeSnapshot is deleted.
            None => match futures::future::join(validate(&obj, &ctx), ensure_finalizer(&api, &obj))
                .await
            {
                (Err(e), _) | (_, Err(e)) => return Err(e),
                (Ok(Err(message)), Ok(())) => Some(failed(generation, &message)),
                (Ok(Ok(volumes)), Ok(())) => {
                    let req = CutRequest {
                        key: uid.clone(),
                        namespace: namespace.clone(),
                        name: name.clone(),
                        group_snapshot: obj.spec.group_snapshot.clone(),
                        freeze: obj.spec.freeze,
                        freeze_timeout: Duration::from_secs(
                            u64::try_from(obj.spec.freeze_timeout_seconds.max(1)).unwrap_or(1),
                        ),
                        release_after_cut: obj.spec.release_after_cut,
                        volumes,
                    };
                    let engine = ctx.engine.clone();
                    let status =
                        tokio::task::spawn_blocking(move || engine.cut(&req, generation)).await??;
                    tracing::info!(%namespace, %name, phase = ?status.phase, window_ms = ?status.freeze_window_millis, "cut");
                    Some(status)
                }
            },
        },
        NodeAction::Release => match known {
            Some(status) if status.phase == NodePhase::Cut => {
                let engine = ctx.engine.clone();
                let key = uid.clone();
                tokio::task::spawn_blocking(move || engine.release(&key)).await??
            }
            Some(status) => Some(status),
            None if current.phase == NodePhase::Pending || current.phase == NodePhase::Cut => Some(
                failed(generation, "asked to release a cut this agent never made"),
            ),
            None => None,
        },
        NodeAction::Abort => {
            let engine = ctx.engine.clone();
            let key = uid.clone();
            let aborted = tokio::task::spawn_blocking(move || {
                engine.abort(
                    &key,
                    "aborted by the controller: volumes thawed, snapshots deleted",
                )
            })
            .await??;
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

    if let Some(mut status) = desired {
        status.observed_generation = generation;
        if obj.status.as_ref() != Some(&status) {
            let patch = serde_json::json!({
                "apiVersion": "tandem.dev/v1alpha1",
                "kind": "NodeSnapshot",
                "status": status,
            });
            api.patch_status(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        }
    }

    // While a freeze is held, look again right after the watchdog's deadline to report its abort.
    Ok(match ctx.engine.deadline(&uid) {
        Some(deadline) => Action::requeue(
            deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100),
        ),
        None => Action::await_change(),
    })
}

fn failed(generation: Option<i64>, message: &str) -> NodeSnapshotStatus {
    NodeSnapshotStatus {
        observed_generation: generation,
        phase: NodePhase::Failed,
        message: Some(message.to_string()),
        ..Default::default()
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
