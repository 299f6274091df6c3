//! Finalizer patches, shared by the controller and the agent. Each is a merge patch that carries
//! the object's resourceVersion: a concurrent change to the list becomes a conflict (retried),
//! never a lost entry.

use kube::ResourceExt;
use kube::api::Patch;
use serde_json::{Value, json};

/// Whether `object` carries the finalizer `name`.
pub fn has(object: &impl ResourceExt, name: &str) -> bool {
    object.finalizers().iter().any(|f| f == name)
}

/// The patch that adds `name`, or None when it is there already.
pub fn adding(object: &impl ResourceExt, name: &str) -> Option<Patch<Value>> {
    if has(object, name) {
        return None;
    }
    let mut finalizers = object.finalizers().to_vec();
    finalizers.push(name.to_string());
    Some(patch(object, finalizers))
}

/// The patch that removes `name`, or None when it is not there.
pub fn removing(object: &impl ResourceExt, name: &str) -> Option<Patch<Value>> {
    if !has(object, name) {
        return None;
    }
    let rest: Vec<String> = object
        .finalizers()
        .iter()
        .filter(|f| *f != name)
        .cloned()
        .collect();
    Some(patch(object, rest))
}

/// Removes `name` from `object` through `api`. An object that is gone or changed meanwhile is
/// left to the next event (the patch carries its resourceVersion).
pub async fn remove<K, O>(api: &kube::Api<K>, object: &O, name: &str) -> Result<(), kube::Error>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    O: ResourceExt,
{
    let Some(patch) = removing(object, name) else {
        return Ok(());
    };
    match api
        .patch(
            &object.name_any(),
            &kube::api::PatchParams::default(),
            &patch,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => Ok(()),
        Err(e) => Err(e),
    }
}

fn patch(object: &impl ResourceExt, finalizers: Vec<String>) -> Patch<Value> {
    Patch::Merge(json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": object.resource_version(),
    }}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn object(finalizers: &[&str]) -> ConfigMap {
        let mut o = ConfigMap::default();
        o.metadata.resource_version = Some("7".into());
        o.metadata.finalizers = Some(finalizers.iter().map(|f| f.to_string()).collect());
        o
    }

    fn body(patch: Option<Patch<Value>>) -> Value {
        match patch {
            Some(Patch::Merge(v)) => v,
            other => panic!("expected a merge patch, got {other:?}"),
        }
    }

    #[test]
    fn adds_and_removes_keeping_the_others_and_the_resource_version() {
        let o = object(&["other"]);
        assert_eq!(
            body(adding(&o, "mine")),
            json!({"metadata": {"finalizers": ["other", "mine"], "resourceVersion": "7"}})
        );
        assert!(removing(&o, "mine").is_none());
        let o = object(&["other", "mine"]);
        assert!(adding(&o, "mine").is_none());
        assert_eq!(
            body(removing(&o, "mine")),
            json!({"metadata": {"finalizers": ["other"], "resourceVersion": "7"}})
        );
    }
}
