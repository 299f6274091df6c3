//! Which pods a hook runs in: pure, from a list of the namespace's pods.

use std::collections::BTreeSet;

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::{HookPods, HookRunIn, QuiesceHook};

/// A pod and container a hook runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub pod: String,
    pub container: String,
}

/// Why a hook has no target, or a wrong one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("no Running pod {0}")]
    NoPods(String),
    #[error("pod {pod} has no container {container}")]
    NoSuchContainer { pod: String, container: String },
    #[error("invalid selector: {0}")]
    InvalidSelector(String),
}

fn running(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

/// Whether a pod mounts one of `claims` (by `spec.volumes[].persistentVolumeClaim.claimName`).
pub fn mounts_any(pod: &Pod, claims: &BTreeSet<&str>) -> bool {
    pod.spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .is_some_and(|volumes| {
            volumes.iter().any(|v| {
                v.persistent_volume_claim
                    .as_ref()
                    .is_some_and(|c| claims.contains(c.claim_name.as_str()))
            })
        })
}

/// The pods and containers `hook` runs in, by pod name: the Running consumers of `claims`, or
/// the Running pods its selector picks; one of them for `runIn: OnePod`.
pub fn targets(
    hook: &QuiesceHook,
    pods: &[Pod],
    claims: &BTreeSet<&str>,
) -> Result<Vec<Target>, TargetError> {
    let selector = match (&hook.pods, &hook.selector) {
        (HookPods::Selector, Some(s)) => {
            Some(Selector::try_from(s.clone()).map_err(|e| TargetError::InvalidSelector(e.0))?)
        }
        (HookPods::Selector, None) => {
            return Err(TargetError::InvalidSelector("no selector".into()));
        }
        (HookPods::Consumers, _) => None,
    };
    let mut picked: Vec<&Pod> = pods
        .iter()
        .filter(|p| running(p))
        .filter(|p| match &selector {
            Some(s) => s.matches(p.labels()),
            None => mounts_any(p, claims),
        })
        .collect();
    picked.sort_by_key(|p| p.name_any());
    if hook.run_in == HookRunIn::OnePod {
        picked.truncate(1);
    }
    if picked.is_empty() {
        return Err(TargetError::NoPods(match hook.pods {
            HookPods::Consumers => "mounts a member claim".into(),
            HookPods::Selector => "matches the hook's selector".into(),
        }));
    }
    picked
        .into_iter()
        .map(|pod| {
            let containers: Vec<&str> = pod
                .spec
                .as_ref()
                .map(|s| s.containers.iter().map(|c| c.name.as_str()).collect())
                .unwrap_or_default();
            let container = match &hook.container {
                Some(c) if containers.contains(&c.as_str()) => c.clone(),
                Some(c) => {
                    return Err(TargetError::NoSuchContainer {
                        pod: pod.name_any(),
                        container: c.clone(),
                    });
                }
                None => containers.first().map(|c| c.to_string()).ok_or_else(|| {
                    TargetError::NoSuchContainer {
                        pod: pod.name_any(),
                        container: "(any)".into(),
                    }
                })?,
            };
            Ok(Target {
                pod: pod.name_any(),
                container,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, phase: &str, claims: &[&str], labels: serde_json::Value) -> Pod {
        let volumes: Vec<_> = claims
            .iter()
            .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "app"}, {"name": "db"}], "volumes": volumes},
            "status": {"phase": phase},
        }))
        .expect("pod")
    }

    fn hook(extra: serde_json::Value) -> QuiesceHook {
        let mut base = json!({"name": "h", "command": ["true"]});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        serde_json::from_value(base).expect("hook")
    }

    #[test]
    fn consumers_are_the_running_pods_that_mount_a_member() {
        let pods = [
            pod("b", "Running", &["data"], json!({})),
            pod("a", "Running", &["wal", "other"], json!({})),
            pod("c", "Pending", &["data"], json!({})),
            pod("d", "Running", &["other"], json!({})),
        ];
        let claims = BTreeSet::from(["data", "wal"]);
        type Case = (
            serde_json::Value,
            Result<Vec<(&'static str, &'static str)>, TargetError>,
        );
        let cases: Vec<Case> = vec![
            (json!({}), Ok(vec![("a", "app"), ("b", "app")])),
            (
                json!({"container": "db"}),
                Ok(vec![("a", "db"), ("b", "db")]),
            ),
            (json!({"runIn": "OnePod"}), Ok(vec![("a", "app")])),
            (
                json!({"container": "nope"}),
                Err(TargetError::NoSuchContainer {
                    pod: "a".into(),
                    container: "nope".into(),
                }),
            ),
        ];
        for (extra, expected) in cases {
            let got = targets(&hook(extra.clone()), &pods, &claims).map(|t| {
                t.into_iter()
                    .map(|t| (t.pod, t.container))
                    .collect::<Vec<_>>()
            });
            let expected = expected.map(|v| {
                v.into_iter()
                    .map(|(p, c)| (p.to_string(), c.to_string()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, expected, "{extra}");
        }
        assert_eq!(
            targets(&hook(json!({})), &pods, &BTreeSet::from(["gone"])),
            Err(TargetError::NoPods("mounts a member claim".into()))
        );
    }

    #[test]
    fn a_selector_picks_running_pods_by_label_whatever_they_mount() {
        let pods = [
            pod("x", "Running", &[], json!({"app": "db"})),
            pod("y", "Succeeded", &[], json!({"app": "db"})),
            pod("z", "Running", &["data"], json!({"app": "web"})),
        ];
        let got = targets(
            &hook(json!({"pods": "Selector", "selector": {"matchLabels": {"app": "db"}}})),
            &pods,
            &BTreeSet::from(["data"]),
        );
        assert_eq!(
            got,
            Ok(vec![Target {
                pod: "x".into(),
                container: "app".into()
            }])
        );
    }
}
