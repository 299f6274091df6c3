//! Helm (built by hack/test-tools.sh) and YAML helpers for the chart tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::control_plane::tools_bin;
use super::{repo_root, shared_plane, with_plane};

/// The helm binary that hack/test-tools.sh builds.
pub fn helm_bin() -> PathBuf {
    let path = tools_bin().join("helm");
    assert!(
        path.exists(),
        "{} is missing: run hack/test-tools.sh first (it builds helm with the control plane)",
        path.display()
    );
    path
}

/// charts/tandem.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts/tandem")
}

/// Runs helm without a cluster (lint, template, show). Its caches live in a folder of this
/// process, never in the user's home.
pub fn helm(args: &[&str]) -> Result<String, String> {
    run(helm_command().args(args))
}

/// Runs helm against the shared control plane as cluster admin.
pub fn helm_cluster(args: &[&str]) -> Result<String, String> {
    let kubeconfig = shared_plane().kubeconfig.display().to_string();
    run(helm_command()
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args))
}

fn helm_command() -> Command {
    let home = std::env::temp_dir().join(format!("tandem-helm-{}", std::process::id()));
    let mut cmd = Command::new(helm_bin());
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env_remove("KUBECONFIG");
    cmd
}

/// Runs a command; Ok(stdout) on success, Err(stderr + stdout) otherwise.
pub fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {cmd:?}: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stderr),
            stdout
        ))
    }
}

/// Runs a repository script (hack/...) with the tools folder in its environment.
pub fn run_script(script: &str, args: &[&Path]) -> Result<String, String> {
    run(Command::new(repo_root().join(script))
        .args(args)
        .env("TANDEM_TOOLS_BIN", tools_bin()))
}

/// Every object of a multi-document YAML stream (empty documents left out).
pub fn parse_objects(yaml: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple::<serde_json::Value>(yaml)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// The one object of this kind and name; panics listing what there is otherwise.
pub fn find<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| {
            panic!(
                "no {kind} {name} among: {:?}",
                objects
                    .iter()
                    .map(|o| format!("{}/{}", o["kind"], o["metadata"]["name"]))
                    .collect::<Vec<_>>()
            )
        })
}

/// A kubeconfig that talks to the shared control plane with a bearer token (a service account's).
pub fn token_kubeconfig(token: &str) -> String {
    use base64::Engine;
    let (server, ca) = with_plane(|p| (p.server.clone(), p.ca_pem.clone()));
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: token\n  user:\n    token: {token}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    user: token\ncurrent-context: test\n",
        base64::engine::general_purpose::STANDARD.encode(ca)
    )
}

/// kubectl with some kubeconfig file (another identity than the admin).
pub fn kubectl_as(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    run(Command::new(tools_bin().join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args))
}
