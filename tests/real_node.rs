//! tandem the way users run it: a real node (kubelet + containerd), tandem's image built with no
//! registry, the chart installed with helm, and the pods (not host processes) cutting a
//! GroupSnapshot of local volumes. Needs root (CI is root); skips with a message otherwise.

mod support;

use std::fs;
use std::time::Duration;

use support::node::{self, images, shared_cluster, with_cluster};
use support::repo_root;

fn require_root() -> bool {
    if !node::can_run_nodes() {
        eprintln!("SKIPPED: the real node needs root (namespaces, mounts, cgroups)");
        return false;
    }
    true
}

/// The programs the agent runs (every `run_tool("<program>"` in src/agent), read from the
/// source so a new one is checked without editing this test.
fn programs_the_agent_runs() -> Vec<String> {
    let mut programs = Vec::new();
    let mut dirs = vec![repo_root().join("src/agent")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).expect("src/agent").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            let text = fs::read_to_string(&path).unwrap_or_default();
            for call in text.split("run_tool(").skip(1) {
                let call = call.trim_start();
                if let Some(rest) = call.strip_prefix('"')
                    && let Some(end) = rest.find('"')
                {
                    programs.push(rest[..end].to_string());
                }
            }
        }
    }
    programs.sort();
    programs.dedup();
    programs
}

/// The Dockerfile's runtime stage: its apt-get packages, ENTRYPOINT, CMD and USER.
fn dockerfile_runtime() -> (Vec<String>, String, String, String) {
    let text = fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    let runtime = text.rsplit("\nFROM ").next().expect("a runtime stage");
    let joined = runtime.replace("\\\n", " ");
    let install = joined
        .lines()
        .find_map(|l| l.split("apt-get install").nth(1))
        .expect("apt-get install in the runtime stage");
    let mut packages: Vec<String> = install
        .split("&&")
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .filter(|w| !w.starts_with('-'))
        .map(String::from)
        .collect();
    packages.sort();
    let directive = |name: &str| {
        runtime
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile's runtime stage"))
            .trim()
            .to_string()
    };
    (
        packages,
        directive("ENTRYPOINT"),
        directive("CMD"),
        directive("USER"),
    )
}

/// The Dockerfile (for users with a registry) and hack/image (no registry) make the same image.
#[test]
fn the_dockerfile_and_the_local_image_agree() {
    let mut listed: Vec<String> = fs::read_to_string(repo_root().join("hack/image/packages"))
        .expect("hack/image/packages")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.trim().to_string())
        .collect();
    listed.sort();
    let (packages, entrypoint, cmd, user) = dockerfile_runtime();
    assert_eq!(packages, listed, "Dockerfile vs hack/image/packages");
    let dockerfile = fs::read_to_string(repo_root().join("Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("hack/image/configure-rootfs.sh"),
        "the Dockerfile must configure its rootfs with hack/image/configure-rootfs.sh"
    );
    if !require_root() {
        return;
    }
    let config: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&images()["tandem_config"]).expect("image config"),
    )
    .expect("image config JSON");
    let as_json = |s: &str| serde_json::from_str::<serde_json::Value>(s).expect("exec form");
    assert_eq!(config["Entrypoint"], as_json(&entrypoint));
    assert_eq!(config["Cmd"], as_json(&cmd));
    assert_eq!(config["User"], user.as_str());
}

/// Every program the agent runs is in the image, checked inside a pod of the real node.
#[test]
fn every_program_the_agent_runs_is_in_the_image() {
    if !require_root() {
        return;
    }
    let programs = programs_the_agent_runs();
    assert!(
        programs.iter().any(|p| p == "lvcreate"),
        "reading src/agent found {programs:?}"
    );
    shared_cluster();
    let image = images()["tandem_ref"].clone();
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "image-check", "namespace": "default"},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "check", "image": image, "imagePullPolicy": "Never",
                            "command": ["/bin/sh", "-c", "sleep 3600"]}]
        }
    });
    with_cluster(|c| {
        let manifest = c.root.join("image-check.json");
        fs::write(&manifest, pod.to_string()).expect("manifest");
        c.kubectl(&["apply", "-f", &manifest.display().to_string()])
            .expect("apply");
        c.kubectl_timeout(
            &[
                "wait",
                "--for=condition=Ready",
                "pod/image-check",
                "--timeout=60s",
            ],
            Duration::from_secs(70),
        )
        .expect("pod Ready");
        let mut args = vec!["exec", "image-check", "--", "/bin/sh", "-c"];
        let script = programs
            .iter()
            .map(|p| format!("command -v {p} || echo MISSING {p}"))
            .collect::<Vec<_>>()
            .join("; ");
        args.push(&script);
        let out = c
            .kubectl_timeout(&args, Duration::from_secs(20))
            .expect("exec");
        let _ = c.kubectl(&["delete", "pod", "image-check", "--wait=false"]);
        assert!(
            !out.contains("MISSING"),
            "programs the agent runs are not in the image:\n{out}"
        );
        assert_eq!(out.lines().count(), programs.len(), "{out}");
    });
}
