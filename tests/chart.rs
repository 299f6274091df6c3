//! The Helm chart (charts/tandem) and the plain manifests (deploy/), checked by the real helm
//! (built by hack/test-tools.sh) and the real API server of the test control plane: lint, render
//! with default and other values, install, upgrade, uninstall, least-privilege RBAC (kubectl auth
//! can-i as each service account), the agent's node restriction (a ValidatingAdmissionPolicy,
//! exercised with service-account tokens bound to Pods on two nodes) and idempotent applies.

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use support::helm::{
    chart_dir, find, helm, helm_cluster, kubectl_as, parse_objects, run_script, token_kubeconfig,
};
use support::{TestEnv, repo_root, with_plane};

/// Tests that change or delete the cluster-wide CRDs (adopting them into a release, installing them
/// afresh, applying deploy/) hold this for writing; tests that need the CRDs hold it for reading.
static CRD_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

const CRD_NAMES: [&str; 6] = [
    "consistencygroups.tandem.dev",
    "groupsnapshots.tandem.dev",
    "nodesnapshots.tandem.dev",
    "grouprestores.tandem.dev",
    "noderestores.tandem.dev",
    "groupsnapshotschedules.tandem.dev",
];

/// `helm template RELEASE charts/tandem --namespace NAMESPACE ARGS...`, parsed.
fn template(release: &str, namespace: &str, args: &[&str]) -> Vec<Value> {
    let chart = chart_dir().display().to_string();
    let mut all = vec![
        "template",
        release,
        chart.as_str(),
        "--namespace",
        namespace,
    ];
    all.extend_from_slice(args);
    let out = helm(&all).unwrap_or_else(|e| panic!("helm template {args:?} failed: {e}"));
    parse_objects(&out)
}

fn template_err(args: &[&str]) -> String {
    let chart = chart_dir().display().to_string();
    let mut all = vec!["template", "t", chart.as_str(), "--namespace", "t"];
    all.extend_from_slice(args);
    match helm(&all) {
        Ok(out) => panic!("helm template {args:?} should fail, rendered:\n{out}"),
        Err(e) => e,
    }
}

fn kinds_and_names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or("?"),
                o["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

fn container<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {workload}"))
}

fn env<'a>(container: &'a Value, name: &str) -> &'a Value {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == name)
        .unwrap_or_else(|| panic!("no env {name} in {}", container["env"]))
}

fn args(container: &Value) -> Vec<String> {
    container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("string arg").to_string())
        .collect()
}

fn mount<'a>(container: &'a Value, path: &str) -> &'a Value {
    container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("no mount at {path} in {}", container["volumeMounts"]))
}

fn volume<'a>(workload: &'a Value, name: &str) -> &'a Value {
    workload["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// The host path a container path comes from (through its volume).
fn host_path_of(workload: &Value, container_name: &str, path: &str) -> (String, Value) {
    let m = mount(container(workload, container_name), path);
    let v = volume(workload, m["name"].as_str().expect("mount name"));
    (
        v["hostPath"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{path} is not a hostPath: {v}"))
            .to_string(),
        m["mountPropagation"].clone(),
    )
}

fn temp_file(name: &str, content: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join(name);
    std::fs::write(&path, content).expect("write temp file");
    (dir, path)
}

// ---------------------------------------------------------------------------------------------
// Without a cluster: lint, render, generated files.

#[test]
fn helm_lint_passes_strict_with_default_and_other_values() {
    let chart = chart_dir().display().to_string();
    let out = helm(&["lint", "--strict", &chart]).unwrap_or_else(|e| panic!("helm lint: {e}"));
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
    let out = helm(&[
        "lint",
        "--strict",
        &chart,
        "--set",
        "controller.replicas=3,crds.install=false,metrics.serviceMonitor.enabled=true",
        "--set",
        "agent.extraHostPaths={/data/pv,/srv/local},agent.nodeRestriction.enabled=false",
    ])
    .unwrap_or_else(|e| panic!("helm lint with other values: {e}"));
    assert!(
        out.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{out}"
    );
    // helm itself is the real thing, not a stub.
    let version = helm(&["version", "--short"]).expect("helm version");
    assert!(version.starts_with("v3."), "helm version says {version:?}");
    assert!(
        !version.starts_with("v3.22+"),
        "unversioned build: {version}"
    );
}

#[test]
fn template_with_default_values_renders_every_part_wired_to_the_binary() {
    let objects = template("tandem", "tandem-system", &[]);
    let expected: BTreeSet<String> = [
        "ServiceAccount/tandem-controller",
        "ServiceAccount/tandem-agent",
        "ClusterRole/tandem-controller",
        "ClusterRoleBinding/tandem-controller",
        "Role/tandem-controller-leader",
        "RoleBinding/tandem-controller-leader",
        "ClusterRole/tandem-agent",
        "ClusterRoleBinding/tandem-agent",
        "ClusterRole/tandem-edit",
        "ClusterRole/tandem-view",
        "ClusterRole/tandem-hook-runner",
        "ValidatingAdmissionPolicy/tandem-agent-node-restriction",
        "ValidatingAdmissionPolicyBinding/tandem-agent-node-restriction",
        "ValidatingAdmissionPolicy/tandem-group-snapshot-finalizer",
        "ValidatingAdmissionPolicyBinding/tandem-group-snapshot-finalizer",
        "ValidatingAdmissionPolicy/tandem-group-restore-finalizer",
        "ValidatingAdmissionPolicyBinding/tandem-group-restore-finalizer",
        "Deployment/tandem-controller",
        "DaemonSet/tandem-agent",
        "Service/tandem-controller-metrics",
        "CustomResourceDefinition/consistencygroups.tandem.dev",
        "CustomResourceDefinition/groupsnapshots.tandem.dev",
        "CustomResourceDefinition/groupsnapshotschedules.tandem.dev",
        "CustomResourceDefinition/nodesnapshots.tandem.dev",
        "CustomResourceDefinition/grouprestores.tandem.dev",
        "CustomResourceDefinition/noderestores.tandem.dev",
        "StorageClass/tandem-restore",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(kinds_and_names(&objects), expected);
    for o in &objects {
        if o["kind"] != "CustomResourceDefinition"
            && o["kind"] != "StorageClass"
            && !o["kind"].as_str().unwrap().contains("Cluster")
            && !o["kind"]
                .as_str()
                .unwrap()
                .starts_with("ValidatingAdmission")
        {
            assert_eq!(o["metadata"]["namespace"], "tandem-system", "{o}");
        }
        assert_eq!(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"],
            "tandem"
        );
    }

    // The controller: `tandem controller --http-addr 0.0.0.0:8080`, probes, metrics, downward API.
    let deploy = find(&objects, "Deployment", "tandem-controller");
    assert_eq!(deploy["spec"]["replicas"], 1);
    let c = container(deploy, "controller");
    assert_eq!(c["image"], "ghcr.io/tandem-dev/tandem:0.1.0");
    assert_eq!(c["command"], json!(["/usr/local/bin/tandem"]));
    assert_eq!(args(c), ["controller", "--http-addr", "0.0.0.0:8080"]);
    assert_eq!(
        env(c, "POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.name"
    );
    assert_eq!(
        env(c, "POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(env(c, "RUST_LOG")["value"], "info");
    assert_eq!(
        env(c, "TANDEM_RESTORE_STORAGE_CLASS")["value"],
        "tandem-restore"
    );
    assert_eq!(
        c["ports"],
        json!([{"name": "http", "containerPort": 8080, "protocol": "TCP"}])
    );
    assert_eq!(
        c["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "http"})
    );
    assert_eq!(
        c["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "http"})
    );
    assert!(c["resources"]["requests"]["cpu"].is_string(), "{c}");
    assert!(c["resources"]["limits"]["memory"].is_string(), "{c}");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tandem-controller");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    // The metrics Service reaches the controller pods' http port.
    let svc = find(&objects, "Service", "tandem-controller-metrics");
    for (k, v) in svc["spec"]["selector"].as_object().expect("selector") {
        assert_eq!(&deploy["spec"]["template"]["metadata"]["labels"][k], v);
    }
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "http");
    assert!(
        !objects.iter().any(|o| o["kind"] == "ServiceMonitor"),
        "ServiceMonitor is off by default"
    );

    // The agent: privileged, /dev, the kubelet folder (Bidirectional), the state folder, NODE_NAME.
    let ds = find(&objects, "DaemonSet", "tandem-agent");
    let a = container(ds, "agent");
    assert_eq!(a["image"], "ghcr.io/tandem-dev/tandem:0.1.0");
    assert_eq!(args(a), ["agent"]);
    assert_eq!(a["securityContext"]["privileged"], true);
    assert_eq!(
        env(a, "NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(env(a, "TANDEM_STATE_DIR")["value"], "/var/lib/tandem");
    assert_eq!(env(a, "TANDEM_KUBELET_DIR")["value"], "/var/lib/kubelet");
    assert_eq!(env(a, "TANDEM_THICK_COW_SIZE")["value"], "1G");
    // Restored volumes: block clones linked under /dev (mounted from the host), btrfs clones
    // bind-mounted under the kubelet folder (Bidirectional, so the kubelet sees them).
    assert_eq!(env(a, "TANDEM_RESTORE_LINK_DIR")["value"], "/dev/tandem");
    assert_eq!(
        env(a, "TANDEM_RESTORE_MOUNT_DIR")["value"],
        "/var/lib/kubelet/plugins/tandem.dev/restores"
    );
    assert_eq!(
        host_path_of(ds, "agent", "/dev"),
        ("/dev".into(), Value::Null)
    );
    assert_eq!(
        host_path_of(ds, "agent", "/var/lib/tandem"),
        ("/var/lib/tandem".into(), Value::Null)
    );
    assert_eq!(
        host_path_of(ds, "agent", "/var/lib/kubelet"),
        ("/var/lib/kubelet".into(), json!("Bidirectional"))
    );
    assert_eq!(
        host_path_of(ds, "agent", "/mnt/disks"),
        ("/mnt/disks".into(), json!("Bidirectional"))
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "tandem-agent");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(pod["nodeSelector"], json!({"kubernetes.io/os": "linux"}));
    assert!(
        pod["hostPID"].is_null() && pod["hostNetwork"].is_null(),
        "{pod}"
    );

    // CRDs: installed and kept on uninstall.
    for name in CRD_NAMES {
        let crd = find(&objects, "CustomResourceDefinition", name);
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
    }

    // The restore StorageClass: tandem provisions it (never a spare PV of it: it has none), binds
    // at once (the node is where the snapshot is) and deletes the clone with the claim.
    let sc = find(&objects, "StorageClass", "tandem-restore");
    assert_eq!(sc["provisioner"], "tandem.dev/restore");
    assert_eq!(sc["volumeBindingMode"], "Immediate");
    assert_eq!(sc["reclaimPolicy"], "Delete");
    assert!(
        sc["metadata"]["annotations"].is_null(),
        "never the default class: {sc}"
    );
    assert!(sc["metadata"]["namespace"].is_null(), "{sc}");
    // No VolumePopulator where the API server does not serve the kind (helm template: none).
    assert!(!objects.iter().any(|o| o["kind"] == "VolumePopulator"));

    // The node restriction policy names the agent's service account of this release, and covers
    // NodeRestores as NodeSnapshots.
    let vap = find(
        &objects,
        "ValidatingAdmissionPolicy",
        "tandem-agent-node-restriction",
    );
    let condition = vap["spec"]["matchConditions"][0]["expression"]
        .as_str()
        .expect("matchCondition");
    assert!(
        condition.contains("system:serviceaccount:tandem-system:tandem-agent"),
        "{condition}"
    );
    assert_eq!(
        vap["spec"]["matchConstraints"]["resourceRules"][0]["resources"],
        json!([
            "nodesnapshots",
            "nodesnapshots/status",
            "noderestores",
            "noderestores/status"
        ])
    );
}

#[test]
fn template_with_other_values_follows_them() {
    let values = r#"
fullnameOverride: snap
logLevel: tandem=debug
image: {repository: registry.example/tandem, tag: "9.9.9", digest: "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}
imagePullSecrets: [regcred]
crds: {install: false}
rbac: {aggregateToDefaultRoles: false}
controller:
  replicas: 3
  watchNamespace: shop
  httpPort: 9090
  extraArgs: ["--some-flag=1"]
  finalizerGuard: {enabled: false}
metrics:
  service: {port: 9191}
  serviceMonitor: {enabled: true, interval: 15s, labels: {release: prom}}
agent:
  stateDir: /opt/tandem/state
  kubeletDir: /var/lib/k0s/kubelet
  thickCowSize: 20%ORIGIN
  extraHostPaths: [/data/pv, /srv/local]
  nodeSelector: {storage: local}
  tolerations: [{key: storage, operator: Equal, value: local, effect: NoSchedule}]
  nodeRestriction: {enabled: false}
  restoreLinkDir: /dev/restored/
  restoreMountDir: /srv/local/tandem-restores
restore:
  storageClass: {name: shop-restore, annotations: {team: storage}}
"#;
    let (_dir, file) = temp_file("values.yaml", values);
    let objects = template("r", "ops", &["-f", file.to_str().unwrap()]);
    let names = kinds_and_names(&objects);
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("CustomResourceDefinition/")
                || n.starts_with("ValidatingAdmissionPolicy")
                || n.ends_with("-edit")
                || n.ends_with("-view")),
        "{names:?}"
    );
    assert!(names.contains("Deployment/snap-controller"), "{names:?}");

    let deploy = find(&objects, "Deployment", "snap-controller");
    assert_eq!(deploy["spec"]["replicas"], 3);
    let c = container(deploy, "controller");
    assert_eq!(
        c["image"],
        "registry.example/tandem:9.9.9@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
    );
    assert_eq!(
        args(c),
        [
            "controller",
            "--http-addr",
            "0.0.0.0:9090",
            "--leader-elect",
            "--some-flag=1"
        ]
    );
    assert_eq!(env(c, "TANDEM_WATCH_NAMESPACE")["value"], "shop");
    assert_eq!(
        env(c, "TANDEM_RESTORE_STORAGE_CLASS")["value"],
        "shop-restore"
    );
    let sc = find(&objects, "StorageClass", "shop-restore");
    assert_eq!(sc["provisioner"], "tandem.dev/restore");
    assert_eq!(sc["metadata"]["annotations"], json!({"team": "storage"}));
    assert_eq!(env(c, "RUST_LOG")["value"], "tandem=debug");
    assert_eq!(c["ports"][0]["containerPort"], 9090);
    assert_eq!(
        deploy["spec"]["template"]["spec"]["imagePullSecrets"],
        json!([{"name": "regcred"}])
    );

    let svc = find(&objects, "Service", "snap-controller-metrics");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9191);
    let sm = find(&objects, "ServiceMonitor", "snap-controller");
    assert_eq!(sm["metadata"]["labels"]["release"], "prom");
    assert_eq!(
        sm["spec"]["endpoints"][0]["port"],
        svc["spec"]["ports"][0]["name"]
    );
    assert_eq!(sm["spec"]["endpoints"][0]["interval"], "15s");
    assert_eq!(
        sm["spec"]["namespaceSelector"],
        json!({"matchNames": ["ops"]})
    );
    for (k, v) in sm["spec"]["selector"]["matchLabels"].as_object().unwrap() {
        assert_eq!(
            &svc["metadata"]["labels"][k], v,
            "ServiceMonitor must select the Service"
        );
    }

    let ds = find(&objects, "DaemonSet", "snap-agent");
    let a = container(ds, "agent");
    assert_eq!(env(a, "TANDEM_STATE_DIR")["value"], "/opt/tandem/state");
    assert_eq!(
        env(a, "TANDEM_KUBELET_DIR")["value"],
        "/var/lib/k0s/kubelet"
    );
    assert_eq!(env(a, "TANDEM_THICK_COW_SIZE")["value"], "20%ORIGIN");
    assert_eq!(env(a, "TANDEM_RESTORE_LINK_DIR")["value"], "/dev/restored");
    assert_eq!(
        env(a, "TANDEM_RESTORE_MOUNT_DIR")["value"],
        "/srv/local/tandem-restores"
    );
    assert_eq!(
        host_path_of(ds, "agent", "/var/lib/k0s/kubelet"),
        ("/var/lib/k0s/kubelet".into(), json!("Bidirectional"))
    );
    assert_eq!(
        host_path_of(ds, "agent", "/opt/tandem/state").0,
        "/opt/tandem/state"
    );
    for path in ["/data/pv", "/srv/local"] {
        assert_eq!(
            host_path_of(ds, "agent", path),
            (path.to_string(), json!("Bidirectional"))
        );
    }
    assert!(
        !ds.to_string().contains("/mnt/disks"),
        "the default extra path is replaced, not added to"
    );
    let pod = &ds["spec"]["template"]["spec"];
    // Helm merges maps with the defaults (null drops a default key); lists replace them.
    assert_eq!(
        pod["nodeSelector"],
        json!({"kubernetes.io/os": "linux", "storage": "local"})
    );
    assert_eq!(
        pod["tolerations"],
        json!([{"key": "storage", "operator": "Equal", "value": "local", "effect": "NoSchedule"}])
    );

    // CRD annotations for GitOps tools, beside the keep policy.
    let objects = template(
        "r",
        "ops",
        &[
            "--set-string",
            "crds.annotations.argocd\\.argoproj\\.io/sync-options=Delete=false",
        ],
    );
    let crd = find(&objects, "CustomResourceDefinition", CRD_NAMES[2]);
    assert_eq!(
        crd["metadata"]["annotations"],
        json!({"helm.sh/resource-policy": "keep", "argocd.argoproj.io/sync-options": "Delete=false"})
    );

    // One replica with leaderElect, and CRDs without the keep policy.
    let objects = template(
        "r",
        "ops",
        &["--set", "controller.leaderElect=true,crds.keep=false"],
    );
    let c = container(
        find(&objects, "Deployment", "r-tandem-controller"),
        "controller",
    );
    assert!(args(c).contains(&"--leader-elect".to_string()), "{c}");
    let crd = find(&objects, "CustomResourceDefinition", CRD_NAMES[0]);
    assert!(
        crd["metadata"]["annotations"].is_null(),
        "{}",
        crd["metadata"]
    );
    // The restore mount folder follows the kubelet folder by default.
    let a = container(find(&objects, "DaemonSet", "r-tandem-agent"), "agent");
    assert_eq!(
        env(a, "TANDEM_RESTORE_MOUNT_DIR")["value"],
        "/var/lib/kubelet/plugins/tandem.dev/restores"
    );

    // The StorageClass managed elsewhere: none rendered, the controller still told its name; a
    // cluster that serves VolumePopulator gets GroupRestore registered as a populator.
    let objects = template(
        "r",
        "ops",
        &[
            "--set",
            "restore.storageClass.create=false,restore.storageClass.name=fast-restore",
            "--api-versions",
            "populator.storage.k8s.io/v1beta1/VolumePopulator",
        ],
    );
    assert!(!objects.iter().any(|o| o["kind"] == "StorageClass"));
    let c = container(
        find(&objects, "Deployment", "r-tandem-controller"),
        "controller",
    );
    assert_eq!(
        env(c, "TANDEM_RESTORE_STORAGE_CLASS")["value"],
        "fast-restore"
    );
    let populator = find(&objects, "VolumePopulator", "r-tandem-grouprestore");
    assert_eq!(
        populator["sourceKind"],
        json!({"group": "tandem.dev", "kind": "GroupRestore"})
    );
    let objects = template(
        "r",
        "ops",
        &[
            "--set",
            "restore.volumePopulator=false",
            "--api-versions",
            "populator.storage.k8s.io/v1beta1/VolumePopulator",
        ],
    );
    assert!(!objects.iter().any(|o| o["kind"] == "VolumePopulator"));
}

#[test]
fn ceph_values_pass_the_flags_and_let_the_controller_read_secrets_only_where_named() {
    let plain = template("t", "tandem", &[]);
    assert!(
        !plain
            .iter()
            .any(|o| o["kind"] == "Role" && o["metadata"]["name"] == "t-tandem-controller-ceph"),
        "no Secret is readable without ceph values"
    );
    let objects = template(
        "t",
        "tandem",
        &[
            "--set",
            "ceph.csiConfig=ceph-csi/ceph-csi-config",
            "--set",
            "ceph.secret=tandem/csi-rbd-secret",
            "--set",
            "ceph.secretNamespaces={ceph-csi,apps}",
        ],
    );
    let controller = find(&objects, "Deployment", "t-tandem-controller");
    let flags = args(container(controller, "controller"));
    for pair in [
        ["--ceph-csi-config", "ceph-csi/ceph-csi-config"],
        ["--ceph-secret", "tandem/csi-rbd-secret"],
    ] {
        assert!(flags.windows(2).any(|w| w == pair), "{pair:?} in {flags:?}");
    }
    let mut namespaces: Vec<String> = objects
        .iter()
        .filter(|o| o["kind"] == "Role" && o["metadata"]["name"] == "t-tandem-controller-ceph")
        .map(|o| {
            assert_eq!(
                o["rules"],
                serde_json::json!([{"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get"]}])
            );
            o["metadata"]["namespace"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    namespaces.sort();
    assert_eq!(namespaces, ["apps", "ceph-csi", "tandem"]);
    assert_eq!(
        objects
            .iter()
            .filter(|o| o["kind"] == "RoleBinding"
                && o["metadata"]["name"] == "t-tandem-controller-ceph")
            .count(),
        3
    );
}

#[test]
fn template_refuses_values_that_cannot_work() {
    let e = template_err(&[
        "--set",
        "metrics.serviceMonitor.enabled=true,metrics.service.enabled=false",
    ]);
    assert!(
        e.contains("metrics.serviceMonitor.enabled needs metrics.service.enabled"),
        "{e}"
    );
    let e = template_err(&["--set", "agent.extraHostPaths={mnt/disks}"]);
    assert!(e.contains("\"mnt/disks\" is not an absolute path"), "{e}");
    let e = template_err(&["--set", "agent.extraHostPaths={/var/lib/kubelet}"]);
    assert!(e.contains("is mounted already"), "{e}");
    let e = template_err(&["--set", "agent.stateDir=tandem"]);
    assert!(e.contains("agent.stateDir must be an absolute path"), "{e}");
    // Restored volumes must be where the agent publishes them and the kubelet sees them.
    let e = template_err(&["--set", "agent.restoreLinkDir=/var/tandem"]);
    assert!(
        e.contains("agent.restoreLinkDir must be a folder under /dev"),
        "{e}"
    );
    let e = template_err(&["--set", "agent.restoreLinkDir=/dev"]);
    assert!(e.contains("agent.restoreLinkDir"), "{e}");
    let e = template_err(&["--set", "agent.restoreMountDir=/srv/restores"]);
    assert!(
        e.contains("\"/srv/restores\" is under neither agent.kubeletDir"),
        "{e}"
    );
    // A sibling whose name only starts like the kubelet folder is not under it.
    let e = template_err(&["--set", "agent.restoreMountDir=/var/lib/kubelet2/r"]);
    assert!(e.contains("is under neither"), "{e}");
}

/// What `tandem SUBCOMMAND --help` says (the binary cargo built for these tests).
fn tandem_help(subcommand: &str) -> String {
    support::helm::run(
        std::process::Command::new(env!("CARGO_BIN_EXE_tandem")).args([subcommand, "--help"]),
    )
    .unwrap_or_else(|e| panic!("tandem {subcommand} --help: {e}"))
}

#[test]
fn the_binary_knows_every_flag_and_variable_the_chart_passes() {
    let objects = template(
        "tandem",
        "tandem-system",
        &[
            "--set",
            "controller.replicas=2,controller.watchNamespace=shop",
        ],
    );
    let mut unknown = Vec::new();
    for (kind, name, sub, container_name) in [
        (
            "Deployment",
            "tandem-controller",
            "controller",
            "controller",
        ),
        ("DaemonSet", "tandem-agent", "agent", "agent"),
    ] {
        let help = tandem_help(sub);
        let c = container(find(&objects, kind, name), container_name);
        let args = args(c);
        assert_eq!(args[0], sub);
        for flag in args.iter().filter(|a| a.starts_with("--")) {
            let flag = flag.split('=').next().unwrap();
            if !help.contains(&format!("{flag} ")) && !help.contains(&format!("{flag}\n")) {
                unknown.push(format!("tandem {sub} {flag}"));
            }
        }
        for var in c["env"].as_array().expect("env") {
            let var = var["name"].as_str().unwrap();
            // Read by the process itself, not through flags: the downward API names and RUST_LOG.
            if ["POD_NAME", "POD_NAMESPACE", "RUST_LOG"].contains(&var) {
                continue;
            }
            if !help.contains(&format!("[env: {var}")) {
                unknown.push(format!("tandem {sub}: env {var}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "the chart passes what the binary does not know: {unknown:?}"
    );
}

/// Keys whose values are Kubernetes objects passed through as they are (documented as a whole).
const PASS_THROUGH: [&str; 9] = [
    "resources",
    "livenessProbe",
    "readinessProbe",
    "podSecurityContext",
    "securityContext",
    "nodeSelector",
    "tolerations",
    "affinity",
    "updateStrategy",
];

#[test]
fn values_yaml_documents_every_key_and_templates_use_only_known_keys() {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).expect("values.yaml");
    let mut undocumented = Vec::new();
    let mut stack: Vec<(usize, String)> = Vec::new();
    let mut previous = "";
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let is_key = !trimmed.starts_with('#')
            && !trimmed.starts_with('-')
            && trimmed.split_once(':').is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
        if is_key {
            let key = trimmed.split_once(':').unwrap().0.to_string();
            while stack.last().is_some_and(|(i, _)| *i >= indent) {
                stack.pop();
            }
            let inside_pass_through = stack
                .iter()
                .any(|(_, k)| PASS_THROUGH.contains(&k.as_str()));
            if !inside_pass_through && !previous.trim_start().starts_with('#') {
                let path: Vec<&str> = stack
                    .iter()
                    .map(|(_, k)| k.as_str())
                    .chain([key.as_str()])
                    .collect();
                undocumented.push(path.join("."));
            }
            stack.push((indent, key));
        }
        if !line.trim().is_empty() {
            previous = line;
        }
    }
    assert!(
        undocumented.is_empty(),
        "values.yaml keys without a comment above: {undocumented:?}"
    );

    // Every .Values.x.y a template reads exists in values.yaml (a typo renders as empty silently).
    let values: Value = serde_saphyr::from_str(&text).expect("values.yaml parses");
    let mut unknown = Vec::new();
    let mut files = vec![];
    for entry in std::fs::read_dir(chart_dir().join("templates")).expect("templates") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            files.push(path);
        }
    }
    assert!(files.len() > 5, "{files:?}");
    for file in files {
        let source = std::fs::read_to_string(&file).expect("template");
        for (at, _) in source.match_indices(".Values.") {
            let rest = &source[at + ".Values.".len()..];
            let path: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '_')
                .collect();
            let path = path.trim_end_matches('.');
            let mut node = &values;
            for part in path.split('.') {
                node = &node[part];
            }
            if node.is_null() && !values_path_is_null(&values, path) {
                unknown.push(format!("{}: .Values.{path}", file.display()));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "templates read values that values.yaml lacks: {unknown:?}"
    );
}

/// Whether `path` exists in `values` with an explicit null (no key in values.yaml is null today).
fn values_path_is_null(values: &Value, path: &str) -> bool {
    let (parent, last) = path.rsplit_once('.').unwrap_or(("", path));
    let mut node = values;
    if !parent.is_empty() {
        for part in parent.split('.') {
            node = &node[part];
        }
    }
    node.as_object().is_some_and(|o| o.contains_key(last))
}

fn read_dir_files(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).expect("read"),
            )
        })
        .collect();
    files.sort();
    files
}

#[test]
fn chart_crds_are_generated_from_crds_dir() {
    // The committed templates are what hack/sync-chart-crds.sh makes of crds/ now.
    let out = tempfile::tempdir().expect("temp dir");
    run_script("hack/sync-chart-crds.sh", &[out.path()])
        .unwrap_or_else(|e| panic!("sync-chart-crds.sh: {e}"));
    let committed = read_dir_files(&chart_dir().join("templates/crds"));
    let generated = read_dir_files(out.path());
    let names = |f: &[(String, String)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&committed),
        names(&generated),
        "charts/tandem/templates/crds drifted from crds/: run `make chart-crds`"
    );
    for ((name, c), (_, g)) in committed.iter().zip(&generated) {
        assert!(
            c == g,
            "charts/tandem/templates/crds/{name} drifted from crds/{name}: run `make chart-crds`"
        );
    }

    // And what helm renders from them is crds/ itself, plus labels and the keep annotation.
    let rendered = template("tandem", "tandem-system", &[]);
    let crds_dir = repo_root().join("crds");
    let sources = read_dir_files(&crds_dir);
    assert_eq!(sources.len(), CRD_NAMES.len());
    for (file, source) in sources {
        let mut want: Value = serde_saphyr::from_str(&source).expect("crds/ yaml");
        let name = want["metadata"]["name"].as_str().expect("name").to_string();
        let mut got = find(&rendered, "CustomResourceDefinition", &name).clone();
        assert_eq!(
            got["metadata"]["annotations"]["helm.sh/resource-policy"],
            "keep"
        );
        assert_eq!(
            got["metadata"]["labels"]["app.kubernetes.io/name"],
            "tandem"
        );
        let meta = got["metadata"].as_object_mut().unwrap();
        meta.remove("labels");
        meta.remove("annotations");
        want["metadata"].as_object_mut().unwrap().remove("labels");
        assert!(
            got == want,
            "the chart renders {name} differently from crds/{file}"
        );
    }
}

#[test]
fn deploy_manifests_are_the_chart_rendered_with_default_values() {
    let out = tempfile::tempdir().expect("temp dir");
    run_script("hack/render-deploy.sh", &[out.path()])
        .unwrap_or_else(|e| panic!("render-deploy.sh: {e}"));
    let committed = read_dir_files(&repo_root().join("deploy"));
    let rendered = read_dir_files(out.path());
    let names = |f: &[(String, String)]| f.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(&committed),
        names(&rendered),
        "deploy/ drifted from the chart: run `make deploy`"
    );
    for ((name, c), (_, r)) in committed.iter().zip(&rendered) {
        assert!(
            c == r,
            "deploy/{name} drifted from the chart: run `make deploy`"
        );
    }
    // Together they are every object of the default chart, plus the namespace.
    let mut all = Vec::new();
    for (_, text) in &committed {
        all.extend(parse_objects(text));
    }
    let mut expected = kinds_and_names(&template("tandem", "tandem-system", &[]));
    expected.insert("Namespace/tandem-system".into());
    assert_eq!(kinds_and_names(&all), expected);
}

// ---------------------------------------------------------------------------------------------
// Against the real API server.

/// Object fields nobody's apply writes: status, server bookkeeping, and the revision annotation
/// the Deployment controller adds.
fn comparable(mut object: Value) -> Value {
    if let Some(o) = object.as_object_mut() {
        o.remove("status");
    }
    if let Some(meta) = object["metadata"].as_object_mut() {
        meta.remove("resourceVersion");
        meta.remove("managedFields");
        if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
            a.remove("deployment.kubernetes.io/revision");
        }
    }
    object
}

fn kubectl_admin(args: &[&str]) -> String {
    with_plane(|p| p.kubectl(args)).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
}

/// Every object a manifest set names, as the API server has it.
fn live_objects(files: &[&str]) -> Vec<Value> {
    let mut args = vec!["get", "-o", "json"];
    for f in files {
        args.extend(["-f", f]);
    }
    let list: Value = serde_json::from_str(&kubectl_admin(&args)).expect("json");
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .cloned()
        .map(comparable)
        .collect()
}

#[tokio::test]
async fn kubectl_apply_of_deploy_twice_changes_nothing() {
    let _crds = CRD_LOCK.write().await;
    let env = TestEnv::new("deploy-apply").await;
    let deploy = repo_root().join("deploy").display().to_string();
    let first = kubectl_admin(&["apply", "-f", &deploy]);
    assert!(first.contains("daemonset.apps/tandem-agent"), "{first}");
    let before = live_objects(&[&deploy]);
    assert_eq!(before.len(), 28, "every object of deploy/ exists");
    // The API server accepted them as they are: the pod template really reaches a Pod.
    let deploy_ok = kubectl_admin(&[
        "-n",
        "tandem-system",
        "wait",
        "--for=jsonpath={.status.replicas}=1",
        "--timeout=60s",
        "deployment/tandem-controller",
    ]);
    assert!(deploy_ok.contains("condition met"), "{deploy_ok}");

    let second = kubectl_admin(&["apply", "-f", &deploy]);
    let changed: Vec<&str> = second
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.ends_with(" unchanged"))
        .collect();
    assert!(
        changed.is_empty(),
        "a second apply changed: {changed:?}\n{second}"
    );
    let after = live_objects(&[&deploy]);
    assert_eq!(
        before, after,
        "objects changed between two applies of deploy/"
    );
    // kubectl diff (a server-side dry run) agrees: exit 0 means no difference.
    kubectl_admin(&["diff", "-f", &deploy]);

    // The GitOps way: helm template piped into server-side apply, twice, changes nothing either.
    let chart = chart_dir().display().to_string();
    let rendered = helm(&[
        "template",
        "tandem-ssa",
        &chart,
        "--namespace",
        &env.namespace,
        "--set",
        "crds.install=false",
        // deploy/'s StorageClass is there, owned by another applier; this release's own.
        "--set",
        "restore.storageClass.name=tandem-ssa-restore",
    ])
    .expect("helm template");
    let (_dir, file) = temp_file("rendered.yaml", &rendered);
    let file = file.display().to_string();
    let ssa = [
        "apply",
        "--server-side",
        "--field-manager=gitops",
        "-f",
        &file,
    ];
    kubectl_admin(&ssa);
    let before = live_objects(&[&file]);
    kubectl_admin(&ssa);
    let after = live_objects(&[&file]);
    assert_eq!(before.len(), 21);
    assert_eq!(before, after, "a second server-side apply changed objects");

    // Leave the cluster-wide objects of deploy/ behind for no one (CRDs stay: other tests use them).
    let tandem = repo_root().join("deploy/tandem.yaml").display().to_string();
    kubectl_admin(&["delete", "-f", &tandem, "--wait=false"]);
    kubectl_admin(&["delete", "-f", &file, "--wait=false"]);
}

fn helm_ok(args: &[&str]) -> String {
    helm_cluster(args).unwrap_or_else(|e| panic!("helm {args:?}: {e}"))
}

#[tokio::test]
async fn helm_install_upgrade_and_uninstall_in_the_control_plane() {
    let _crds = CRD_LOCK.read().await;
    let env = TestEnv::new("helm-install").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    // The CRDs exist (the test harness installed them, as a GitOps tool would from deploy/crds.yaml).
    let out = helm_ok(&[
        "install",
        "tandem-it",
        &chart,
        "-n",
        ns,
        "--set",
        "crds.install=false",
        // Cluster-wide: a name of its own, so releases of other tests do not clash with it.
        "--set",
        "restore.storageClass.name=tandem-it-restore",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    assert!(out.contains("crds.install is false"), "NOTES: {out}");
    let manifest = helm_ok(&["get", "manifest", "tandem-it", "-n", ns]);
    let objects = parse_objects(&manifest);
    assert_eq!(objects.len(), 21, "{:?}", kinds_and_names(&objects));
    let (_dir, file) = temp_file("manifest.yaml", &manifest);
    let live = live_objects(&[file.to_str().unwrap()]);
    assert_eq!(live.len(), 21, "every object is in the API server");
    // The API server took the restore StorageClass as rendered.
    let sc: Value = serde_json::from_str(&kubectl_admin(&[
        "get",
        "storageclass",
        "tandem-it-restore",
        "-o",
        "json",
    ]))
    .expect("json");
    assert_eq!(sc["provisioner"], "tandem.dev/restore");
    assert_eq!(sc["volumeBindingMode"], "Immediate");
    assert_eq!(sc["reclaimPolicy"], "Delete");
    // The Deployment's pod template is a valid Pod: kube-controller-manager made one.
    let pods = env
        .kubectl(&[
            "wait",
            "--for=jsonpath={.status.replicas}=1",
            "--timeout=60s",
            "deployment/tandem-it-controller",
        ])
        .expect("deployment creates a pod");
    assert!(pods.contains("condition met"), "{pods}");

    // Upgrade: three replicas (leader election), other host paths.
    let out = helm_ok(&[
        "upgrade",
        "tandem-it",
        &chart,
        "-n",
        ns,
        "--reuse-values",
        "--set",
        "controller.replicas=3",
        "--set",
        "agent.extraHostPaths={/mnt/disks,/srv/pv}",
    ]);
    assert!(out.contains("REVISION: 2"), "{out}");
    let deploy: Value = serde_json::from_str(
        &env.kubectl(&["get", "deployment", "tandem-it-controller", "-o", "json"])
            .expect("get deployment"),
    )
    .expect("json");
    assert_eq!(deploy["spec"]["replicas"], 3);
    assert!(
        args(container(&deploy, "controller")).contains(&"--leader-elect".to_string()),
        "{deploy}"
    );
    let ds: Value = serde_json::from_str(
        &env.kubectl(&["get", "daemonset", "tandem-it-agent", "-o", "json"])
            .expect("get daemonset"),
    )
    .expect("json");
    assert_eq!(
        host_path_of(&ds, "agent", "/srv/pv"),
        ("/srv/pv".to_string(), json!("Bidirectional"))
    );
    let history = helm_ok(&["history", "tandem-it", "-n", ns]);
    assert!(history.contains("Upgrade complete"), "{history}");

    // Uninstall removes everything it made, cluster-wide ones included; the CRDs stay.
    helm_ok(&["uninstall", "tandem-it", "-n", ns, "--wait"]);
    let gone = with_plane(|p| p.kubectl(&["get", "clusterrole", "tandem-it-controller"]));
    assert!(
        gone.is_err_and(|e| e.contains("NotFound")),
        "cluster role left behind"
    );
    let gone = with_plane(|p| {
        p.kubectl(&[
            "get",
            "validatingadmissionpolicy",
            "tandem-it-agent-node-restriction",
        ])
    });
    assert!(
        gone.is_err_and(|e| e.contains("NotFound")),
        "policy left behind"
    );
    let gone = with_plane(|p| p.kubectl(&["get", "storageclass", "tandem-it-restore"]));
    assert!(
        gone.is_err_and(|e| e.contains("NotFound")),
        "storage class left behind"
    );
    let mut get = vec!["get", "crd"];
    get.extend(CRD_NAMES);
    kubectl_admin(&get);
}

#[tokio::test]
async fn helm_install_with_crds_takes_them_over_and_uninstall_keeps_them() {
    let _crds = CRD_LOCK.write().await;
    let env = TestEnv::new("helm-crds").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    // CRDs applied by someone else (kubectl, a GitOps tool) block a plain install...
    let refused = helm_cluster(&["install", "tandem-crds", &chart, "-n", ns]);
    let refused = refused.expect_err("helm must not silently take over CRDs it did not create");
    assert!(
        refused.contains("cannot be imported into the current release"),
        "{refused}"
    );
    // ...and --take-ownership adopts them (what README says to do).
    let out = helm_ok(&[
        "install",
        "tandem-crds",
        &chart,
        "-n",
        ns,
        "--take-ownership",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    for name in CRD_NAMES {
        let crd: Value = serde_json::from_str(&kubectl_admin(&["get", "crd", name, "-o", "json"]))
            .expect("json");
        let annotations = &crd["metadata"]["annotations"];
        assert_eq!(
            annotations["meta.helm.sh/release-name"], "tandem-crds",
            "{name}"
        );
        assert_eq!(annotations["helm.sh/resource-policy"], "keep", "{name}");
    }
    let out = helm_ok(&["upgrade", "tandem-crds", &chart, "-n", ns]);
    assert!(out.contains("REVISION: 2"), "{out}");

    let out = helm_ok(&["uninstall", "tandem-crds", "-n", ns, "--wait"]);
    assert!(out.contains("kept due to the resource policy"), "{out}");
    for name in CRD_NAMES {
        let established = kubectl_admin(&[
            "wait",
            "--for=condition=Established",
            "--timeout=10s",
            "crd",
            name,
        ]);
        assert!(established.contains("condition met"), "{name} was removed");
    }
    let gone = with_plane(|p| p.kubectl(&["get", "clusterrole", "tandem-crds-agent"]));
    assert!(gone.is_err_and(|e| e.contains("NotFound")));
}

#[tokio::test]
async fn helm_install_with_default_values_on_a_cluster_without_the_crds() {
    let _crds = CRD_LOCK.write().await;
    let env = TestEnv::new("helm-fresh").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    let mut delete = vec!["delete", "crd", "--wait=true", "--timeout=60s"];
    delete.extend(CRD_NAMES);
    kubectl_admin(&delete);

    // The first-time experience: `helm install` with nothing but defaults.
    let out = helm_ok(&["install", "tandem-fresh", &chart, "-n", ns]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let mut wait = vec![
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
    ];
    wait.extend(CRD_NAMES);
    kubectl_admin(&wait);
    // The CRDs it made serve their kinds.
    let snapshot = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
        "metadata": {"name": "probe", "namespace": ns},
        "spec": {"nodeName": "n", "groupSnapshot": "gs", "freezeTimeoutSeconds": 10}
    });
    let (_d, file) = temp_file("snapshot.json", &snapshot.to_string());
    kubectl_admin(&["create", "-f", file.to_str().unwrap()]);

    // Uninstall keeps the CRDs and what they hold; installing again takes them back.
    let out = helm_ok(&["uninstall", "tandem-fresh", "-n", ns, "--wait"]);
    assert!(out.contains("kept due to the resource policy"), "{out}");
    env.kubectl(&["get", "nodesnapshot", "probe"])
        .expect("the NodeSnapshot survives uninstall");
    let out = helm_ok(&["install", "tandem-fresh", &chart, "-n", ns]);
    assert!(out.contains("STATUS: deployed"), "reinstall: {out}");
    helm_ok(&["uninstall", "tandem-fresh", "-n", ns, "--wait"]);
    kubectl_admin(&wait);
}

/// `kubectl auth can-i` as a service account (impersonated by the admin, so its groups apply).
/// Anything but a plain yes or no (a warning about an unknown resource type) fails the test.
fn can_i(sa: &str, ns: &str, check: &str) -> bool {
    let words: Vec<&str> = check.split_whitespace().collect();
    let mut args = vec!["auth", "can-i", "--as", sa];
    // Cluster-scoped resources are asked about with -A (kubectl warns about a namespace).
    let cluster_scoped = [
        "persistentvolumes",
        "storageclasses.storage.k8s.io",
        "nodes",
        "clusterroles.rbac.authorization.k8s.io",
    ];
    if cluster_scoped.contains(&words[1]) {
        args.push("-A");
    } else if !words.contains(&"-A") && !words.contains(&"-n") {
        args.extend(["-n", ns]);
    }
    args.extend(words);
    match kubectl_as(&support::shared_plane().kubeconfig, &args) {
        Ok(out) if out.trim() == "yes" => true,
        Err(out) if out.trim() == "no" => false,
        other => panic!("kubectl auth can-i {check}: {other:?}"),
    }
}

/// `kubectl auth can-i --list` as a service account, one normalized line per rule.
fn rules_of(sa: &str, ns: &str) -> BTreeSet<String> {
    let out = kubectl_admin(&["auth", "can-i", "--list", "--as", sa, "-n", ns]);
    out.lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

#[tokio::test]
async fn service_accounts_can_do_what_they_need_and_nothing_more() {
    let _crds = CRD_LOCK.read().await;
    let env = TestEnv::new("helm-rbac").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    helm_ok(&[
        "install",
        "tandem-rbac",
        &chart,
        "-n",
        ns,
        "--set",
        "crds.install=false",
        // The guard is cluster-wide and lets only its own release's controller through: it
        // stays behind with this test's cluster-wide objects, so only its own test installs it.
        // The restore StorageClass too is cluster-wide and would stay behind.
        "--set",
        "controller.finalizerGuard.enabled=false,restore.storageClass.create=false",
    ]);
    env.kubectl(&["create", "serviceaccount", "nobody"])
        .expect("baseline account");
    let agent = format!("system:serviceaccount:{ns}:tandem-rbac-agent");
    let controller = format!("system:serviceaccount:{ns}:tandem-rbac-controller");
    let nobody = format!("system:serviceaccount:{ns}:nobody");

    let mut wrong = Vec::new();
    let expect = |wrong: &mut Vec<String>, sa: &str, who: &str, check: &str, want: bool| {
        if can_i(sa, ns, check) != want {
            wrong.push(format!(
                "{who} {} {check}",
                if want { "cannot" } else { "can" }
            ));
        }
    };
    for check in [
        "get persistentvolumes",
        "list persistentvolumes",
        "watch persistentvolumes",
        "get persistentvolumeclaims -A",
        "list persistentvolumeclaims -A",
        "watch persistentvolumeclaims -A",
        "get nodes",
        "get nodesnapshots.tandem.dev -A",
        "list nodesnapshots.tandem.dev -A",
        "watch nodesnapshots.tandem.dev -A",
        "update nodesnapshots.tandem.dev",
        "patch nodesnapshots.tandem.dev",
        "patch nodesnapshots.tandem.dev --subresource=status",
        "update nodesnapshots.tandem.dev --subresource=status",
        "get noderestores.tandem.dev -A",
        "list noderestores.tandem.dev -A",
        "watch noderestores.tandem.dev -A",
        "patch noderestores.tandem.dev",
        "patch noderestores.tandem.dev --subresource=status",
        "create events.events.k8s.io",
        "patch events.events.k8s.io",
    ] {
        expect(&mut wrong, &agent, "agent", check, true);
    }
    for check in [
        "create nodesnapshots.tandem.dev",
        "delete nodesnapshots.tandem.dev",
        "deletecollection nodesnapshots.tandem.dev",
        "get consistencygroups.tandem.dev",
        "get groupsnapshots.tandem.dev",
        "patch groupsnapshots.tandem.dev --subresource=status",
        "update persistentvolumes",
        "patch persistentvolumeclaims",
        "get secrets",
        "list secrets -A",
        "get configmaps",
        "create pods",
        "create pods --subresource=exec",
        "patch nodes",
        "create events",
        "create leases.coordination.k8s.io",
        // Restores: the controller makes and removes NodeRestores, PVs and claims.
        "create noderestores.tandem.dev",
        "delete noderestores.tandem.dev",
        "update noderestores.tandem.dev",
        "get grouprestores.tandem.dev",
        "create persistentvolumes",
        "delete persistentvolumes",
        "create persistentvolumeclaims",
    ] {
        expect(&mut wrong, &agent, "agent", check, false);
    }
    for check in [
        "get consistencygroups.tandem.dev -A",
        "list consistencygroups.tandem.dev -A",
        "watch consistencygroups.tandem.dev -A",
        "patch consistencygroups.tandem.dev --subresource=status",
        "get groupsnapshots.tandem.dev -A",
        "patch groupsnapshots.tandem.dev",
        "patch groupsnapshots.tandem.dev --subresource=status",
        "update groupsnapshots.tandem.dev --subresource=finalizers",
        "create nodesnapshots.tandem.dev",
        "patch nodesnapshots.tandem.dev",
        "delete nodesnapshots.tandem.dev",
        "list persistentvolumes",
        "watch persistentvolumeclaims -A",
        "list nodes",
        "watch nodes",
        "create events.events.k8s.io",
        "create leases.coordination.k8s.io",
        "get leases.coordination.k8s.io/tandem-controller",
        "update leases.coordination.k8s.io/tandem-controller",
        "patch leases.coordination.k8s.io/tandem-controller",
        // Restores.
        "get grouprestores.tandem.dev -A",
        "list grouprestores.tandem.dev -A",
        "watch grouprestores.tandem.dev -A",
        "patch grouprestores.tandem.dev",
        "patch grouprestores.tandem.dev --subresource=status",
        "get noderestores.tandem.dev -A",
        "list noderestores.tandem.dev -A",
        "watch noderestores.tandem.dev -A",
        "create noderestores.tandem.dev",
        "patch noderestores.tandem.dev",
        "delete noderestores.tandem.dev",
        "create persistentvolumes",
        "patch persistentvolumes",
        "delete persistentvolumes",
        "create persistentvolumeclaims",
        "patch persistentvolumeclaims",
        "delete persistentvolumeclaims",
        "get storageclasses.storage.k8s.io",
        "list resourcequotas -A",
        "list pods -A",
        "watch pods -A",
        "get replicasets.apps",
        "get deployments.apps --subresource=scale",
        "patch deployments.apps --subresource=scale",
        "get statefulsets.apps --subresource=scale",
        "patch statefulsets.apps --subresource=scale",
        // Schedules: each run creates a GroupSnapshot; retention deletes them.
        "get groupsnapshotschedules.tandem.dev -A",
        "list groupsnapshotschedules.tandem.dev -A",
        "watch groupsnapshotschedules.tandem.dev -A",
        "patch groupsnapshotschedules.tandem.dev",
        "patch groupsnapshotschedules.tandem.dev --subresource=status",
        "create groupsnapshots.tandem.dev",
        "delete groupsnapshots.tandem.dev",
    ] {
        expect(&mut wrong, &controller, "controller", check, true);
    }
    for check in [
        "get secrets",
        "list secrets -A",
        "watch secrets -A",
        "create pods --subresource=exec",
        "get pods",
        "create pods",
        "update persistentvolumeclaims",
        "update leases.coordination.k8s.io/other-lease",
        "delete leases.coordination.k8s.io/tandem-controller",
        "create leases.coordination.k8s.io -n kube-system",
        "update leases.coordination.k8s.io/tandem-controller -n kube-system",
        "create clusterroles.rbac.authorization.k8s.io",
        "impersonate users",
        "update nodes",
        "create events",
        // Least privilege: nothing it never does.
        "create consistencygroups.tandem.dev",
        "delete consistencygroups.tandem.dev",
        "update consistencygroups.tandem.dev",
        "update groupsnapshots.tandem.dev",
        "update nodesnapshots.tandem.dev",
        "patch nodesnapshots.tandem.dev --subresource=status",
        "create groupsnapshotschedules.tandem.dev",
        "delete groupsnapshotschedules.tandem.dev",
        "update groupsnapshotschedules.tandem.dev --subresource=status",
        "update consistencygroups.tandem.dev --subresource=finalizers",
        // Restores: workloads only through their scale, pods only listed, no class or quota
        // written, the restore and NodeRestore statuses each written by its own party.
        "create grouprestores.tandem.dev",
        "update grouprestores.tandem.dev",
        "delete grouprestores.tandem.dev",
        "update noderestores.tandem.dev",
        "patch noderestores.tandem.dev --subresource=status",
        "patch deployments.apps",
        "update statefulsets.apps",
        "delete deployments.apps",
        "get deployments.apps",
        "list statefulsets.apps -A",
        "update deployments.apps --subresource=scale",
        "patch replicasets.apps --subresource=scale",
        "update persistentvolumes",
        "update grouprestores.tandem.dev --subresource=finalizers",
        "list storageclasses.storage.k8s.io",
        "get resourcequotas",
        "delete pods",
        "create storageclasses.storage.k8s.io",
        "patch resourcequotas",
    ] {
        expect(&mut wrong, &controller, "controller", check, false);
    }
    assert!(wrong.is_empty(), "RBAC is not least privilege: {wrong:#?}");

    // Users: namespace editors manage groups and group snapshots (the chart's roles aggregate into
    // the built-in ones, through kube-controller-manager), viewers read them; nobody writes
    // NodeSnapshots.
    for (user, role) in [("editor", "edit"), ("viewer", "view")] {
        env.kubectl(&[
            "create",
            "rolebinding",
            user,
            "--clusterrole",
            role,
            "--user",
            user,
        ])
        .expect("rolebinding");
    }
    support::eventually(
        Duration::from_secs(30),
        "the edit and view roles to aggregate tandem's rules",
        || async {
            (can_i("editor", ns, "create consistencygroups.tandem.dev")
                && can_i("viewer", ns, "list groupsnapshots.tandem.dev"))
            .then_some(())
        },
    )
    .await;
    for check in [
        "create consistencygroups.tandem.dev",
        "patch consistencygroups.tandem.dev",
        "create groupsnapshots.tandem.dev",
        "delete groupsnapshots.tandem.dev",
        "list nodesnapshots.tandem.dev",
        "create grouprestores.tandem.dev",
        "delete grouprestores.tandem.dev",
        "list noderestores.tandem.dev",
        "create groupsnapshotschedules.tandem.dev",
        "patch groupsnapshotschedules.tandem.dev",
        "delete groupsnapshotschedules.tandem.dev",
    ] {
        expect(&mut wrong, "editor", "editor", check, true);
    }
    for check in [
        "create noderestores.tandem.dev",
        "patch noderestores.tandem.dev",
        "patch grouprestores.tandem.dev --subresource=status",
        "create nodesnapshots.tandem.dev",
        "patch nodesnapshots.tandem.dev --subresource=status",
        "patch consistencygroups.tandem.dev --subresource=status",
        "patch groupsnapshotschedules.tandem.dev --subresource=status",
    ] {
        expect(&mut wrong, "editor", "editor", check, false);
    }
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "list groupsnapshotschedules.tandem.dev",
        true,
    );
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "create groupsnapshotschedules.tandem.dev",
        false,
    );
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "get consistencygroups.tandem.dev",
        true,
    );
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "create groupsnapshots.tandem.dev",
        false,
    );
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "list grouprestores.tandem.dev",
        true,
    );
    expect(
        &mut wrong,
        "viewer",
        "viewer",
        "create grouprestores.tandem.dev",
        false,
    );
    assert!(wrong.is_empty(), "user roles: {wrong:#?}");

    // Nothing more: beyond what every service account may do, exactly these rules.
    let baseline = rules_of(&nobody, ns);
    let extra = |sa: &str| -> BTreeSet<String> {
        rules_of(sa, ns).difference(&baseline).cloned().collect()
    };
    let set = |lines: &[&str]| lines.iter().map(|l| l.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(
        extra(&agent),
        set(&[
            "events.events.k8s.io [] [] [create patch]",
            "nodesnapshots.tandem.dev/status [] [] [get update patch]",
            "nodes [] [] [get]",
            "nodesnapshots.tandem.dev [] [] [get list watch update patch]",
            "noderestores.tandem.dev/status [] [] [get patch]",
            "noderestores.tandem.dev [] [] [get list watch patch]",
            "persistentvolumeclaims [] [] [get list watch]",
            "persistentvolumes [] [] [get list watch]",
        ])
    );
    let controller_rules = extra(&controller);
    assert_eq!(
        controller_rules,
        set(&[
            "consistencygroups.tandem.dev/status [] [] [patch]",
            "consistencygroups.tandem.dev [] [] [get list watch]",
            "events.events.k8s.io [] [] [create patch]",
            "groupsnapshots.tandem.dev/finalizers [] [] [update]",
            "groupsnapshots.tandem.dev/status [] [] [patch]",
            "groupsnapshots.tandem.dev [] [] [get list watch patch create delete]",
            "groupsnapshotschedules.tandem.dev [] [] [get list watch patch]",
            "groupsnapshotschedules.tandem.dev/status [] [] [patch]",
            "leases.coordination.k8s.io [] [tandem-controller] [get update patch]",
            "leases.coordination.k8s.io [] [] [create]",
            "nodesnapshots.tandem.dev [] [] [get list watch create patch delete]",
            "nodes [] [] [list watch]",
            "grouprestores.tandem.dev/status [] [] [patch]",
            "grouprestores.tandem.dev [] [] [get list watch patch]",
            "noderestores.tandem.dev [] [] [get list watch create patch delete]",
            "persistentvolumeclaims [] [] [get list watch create patch delete]",
            "persistentvolumes [] [] [get list watch create patch delete]",
            "storageclasses.storage.k8s.io [] [] [get]",
            "volumeattachments.storage.k8s.io [] [] [list]",
            "resourcequotas [] [] [list]",
            "pods [] [] [list watch]",
            "replicasets.apps [] [] [get]",
            "deployments.apps/scale [] [] [get patch]",
            "statefulsets.apps/scale [] [] [get patch]",
        ])
    );
}

/// A service-account token from the TokenRequest API, bound to a Pod when one is named.
fn token(ns: &str, sa: &str, pod: Option<&str>) -> String {
    let mut args = vec!["-n", ns, "create", "token", sa, "--duration=10m"];
    if let Some(pod) = pod {
        args.extend(["--bound-object-kind=Pod", "--bound-object-name", pod]);
    }
    kubectl_admin(&args).trim().to_string()
}

/// A kubeconfig file for a token; kept as long as the returned folder lives.
fn token_file(token: &str) -> (tempfile::TempDir, PathBuf) {
    temp_file("kubeconfig", &token_kubeconfig(token))
}

fn patch_status(kubeconfig: &Path, ns: &str, name: &str, phase: &str) -> Result<String, String> {
    patch_status_of("nodesnapshot", kubeconfig, ns, name, phase)
}

fn patch_status_of(
    kind: &str,
    kubeconfig: &Path,
    ns: &str,
    name: &str,
    phase: &str,
) -> Result<String, String> {
    kubectl_as(
        kubeconfig,
        &[
            "-n",
            ns,
            "patch",
            kind,
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &json!({"status": {"phase": phase}}).to_string(),
        ],
    )
}

fn add_finalizer(kubeconfig: &Path, ns: &str, name: &str) -> Result<String, String> {
    add_finalizer_of("nodesnapshot", kubeconfig, ns, name)
}

fn add_finalizer_of(kind: &str, kubeconfig: &Path, ns: &str, name: &str) -> Result<String, String> {
    kubectl_as(
        kubeconfig,
        &[
            "-n",
            ns,
            "patch",
            kind,
            name,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":["tandem.dev/agent"]}}"#,
        ],
    )
}

#[tokio::test]
async fn agent_tokens_write_only_the_nodesnapshots_and_noderestores_of_their_own_node() {
    let _crds = CRD_LOCK.read().await;
    let env = TestEnv::new("helm-vap").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    helm_ok(&[
        "install",
        "tandem-vap",
        &chart,
        "-n",
        ns,
        "--set",
        "crds.install=false",
        // The guard is cluster-wide and lets only its own release's controller through: it
        // stays behind with this test's cluster-wide objects, so only its own test installs it.
        // The restore StorageClass too is cluster-wide and would stay behind.
        "--set",
        "controller.finalizerGuard.enabled=false,restore.storageClass.create=false",
    ]);
    let sa = "tandem-vap-agent";
    let suffix = std::process::id();
    let node_a = format!("vap-node-a-{suffix}");
    let node_b = format!("vap-node-b-{suffix}");

    // Two nodes, an agent Pod on each (no kubelet: the objects are enough for bound tokens).
    for (node, pod) in [(&node_a, "agent-a"), (&node_b, "agent-b")] {
        let node_json = json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}});
        let pod_json = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": ns},
            "spec": {
                "nodeName": node, "serviceAccountName": sa,
                "containers": [{"name": "agent", "image": "registry.invalid/tandem:test"}]
            }
        });
        let (_d, file) = temp_file("objects.json", &format!("{node_json}\n{pod_json}"));
        kubectl_admin(&["create", "-f", file.to_str().unwrap()]);
    }
    // One NodeSnapshot per node, made by the admin (the controller's job).
    for (name, node) in [("snap-a", &node_a), ("snap-b", &node_b)] {
        let snapshot = json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "groupSnapshot": "gs", "freezeTimeoutSeconds": 10}
        });
        let (_d, file) = temp_file("snapshot.json", &snapshot.to_string());
        kubectl_admin(&["create", "-f", file.to_str().unwrap()]);
    }

    let (_a, agent_a) = token_file(&token(ns, sa, Some("agent-a")));
    let (_b, agent_b) = token_file(&token(ns, sa, Some("agent-b")));
    let (_u, unbound) = token_file(&token(ns, sa, None));

    // The token really carries its node (Kubernetes >= 1.32 puts it there).
    let whoami: Value = serde_json::from_str(
        &kubectl_as(&agent_a, &["auth", "whoami", "-o", "json"]).expect("whoami"),
    )
    .expect("json");
    assert_eq!(
        whoami["status"]["userInfo"]["extra"]["authentication.kubernetes.io/node-name"],
        json!([node_a]),
        "{whoami}"
    );

    // The policy takes effect once the API server has loaded it: wait for the first denial.
    support::eventually(
        Duration::from_secs(30),
        "the node restriction policy",
        || async { patch_status(&unbound, ns, "snap-a", "Pending").err() },
    )
    .await;
    let denied = patch_status(&unbound, ns, "snap-a", "Cut").expect_err("unbound token denied");
    assert!(denied.contains("this token names no node"), "{denied}");

    // The agent of node A writes node A's NodeSnapshot, its status and its finalizer...
    patch_status(&agent_a, ns, "snap-a", "Cut").expect("agent A reports on node A");
    add_finalizer(&agent_a, ns, "snap-a").expect("agent A adds its finalizer on node A");
    let live: Value = serde_json::from_str(
        &env.kubectl(&["get", "nodesnapshot", "snap-a", "-o", "json"])
            .expect("get"),
    )
    .expect("json");
    assert_eq!(live["status"]["phase"], "Cut");
    assert_eq!(live["metadata"]["finalizers"], json!(["tandem.dev/agent"]));

    // ...and nothing of node B's.
    let denied = patch_status(&agent_a, ns, "snap-b", "Cut").expect_err("A may not report on B");
    assert!(
        denied.contains("ValidatingAdmissionPolicy")
            && denied.contains(&format!("tandem agent of node {node_a} may not write NodeSnapshot {ns}/snap-b of node {node_b}")),
        "{denied}"
    );
    let denied = add_finalizer(&agent_a, ns, "snap-b").expect_err("A may not touch B");
    assert!(denied.contains(&format!("of node {node_b}")), "{denied}");
    let live: Value = serde_json::from_str(
        &env.kubectl(&["get", "nodesnapshot", "snap-b", "-o", "json"])
            .expect("get"),
    )
    .expect("json");
    assert!(
        live["status"]["phase"] != "Cut" && live["metadata"]["finalizers"].is_null(),
        "{live}"
    );

    // The agent of node B: the mirror image.
    patch_status(&agent_b, ns, "snap-b", "Released").expect("agent B reports on node B");
    let denied =
        patch_status(&agent_b, ns, "snap-a", "Aborted").expect_err("B may not report on A");
    assert!(
        denied.contains(&format!(
            "tandem agent of node {node_b} may not write NodeSnapshot {ns}/snap-a of node {node_a}"
        )),
        "{denied}"
    );

    // NodeRestores (the restore's per-node channel) are guarded the same way.
    for (name, node) in [("restore-a", &node_a), ("restore-b", &node_b)] {
        let restore = json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeRestore",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"nodeName": node, "groupRestore": "gr"}
        });
        let (_d, file) = temp_file("restore.json", &restore.to_string());
        kubectl_admin(&["create", "-f", file.to_str().unwrap()]);
    }
    patch_status_of("noderestore", &agent_a, ns, "restore-a", "Cloned")
        .expect("agent A reports its clones on node A");
    add_finalizer_of("noderestore", &agent_a, ns, "restore-a")
        .expect("agent A adds its finalizer on node A's NodeRestore");
    let denied = patch_status_of("noderestore", &agent_a, ns, "restore-b", "Cloned")
        .expect_err("A may not report B's clones");
    assert!(
        denied.contains(&format!(
            "tandem agent of node {node_a} may not write NodeRestore {ns}/restore-b of node {node_b}"
        )),
        "{denied}"
    );
    let denied = add_finalizer_of("noderestore", &agent_a, ns, "restore-b")
        .expect_err("A may not hold B's NodeRestore");
    assert!(denied.contains(&format!("of node {node_b}")), "{denied}");
    let denied = patch_status_of("noderestore", &unbound, ns, "restore-a", "Cloned")
        .expect_err("unbound token denied on NodeRestores");
    assert!(
        denied.contains("may write NodeSnapshots and NodeRestores only with a"),
        "{denied}"
    );
    patch_status_of("noderestore", &agent_b, ns, "restore-b", "Failed")
        .expect("agent B reports on node B");
    let live: Value = serde_json::from_str(
        &env.kubectl(&["get", "noderestore", "-o", "json"])
            .expect("get"),
    )
    .expect("json");
    let phases: Vec<(&str, &str, &Value)> = live["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|r| {
            (
                r["metadata"]["name"].as_str().unwrap_or(""),
                r["status"]["phase"].as_str().unwrap_or(""),
                &r["metadata"]["finalizers"],
            )
        })
        .collect();
    assert_eq!(
        phases,
        [
            ("restore-a", "Cloned", &json!(["tandem.dev/agent"])),
            ("restore-b", "Failed", &Value::Null)
        ]
    );
    // Agents neither create nor delete NodeRestores (the controller's job).
    let create = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeRestore",
        "metadata": {"name": "restore-a2", "namespace": ns},
        "spec": {"nodeName": node_a, "groupRestore": "gr"}
    });
    let (_d, file) = temp_file("create-restore.json", &create.to_string());
    let denied = kubectl_as(&agent_a, &["create", "-f", file.to_str().unwrap()])
        .expect_err("agents cannot create NodeRestores");
    assert!(
        denied.contains("cannot create resource \"noderestores\""),
        "{denied}"
    );
    env.kubectl(&[
        "patch",
        "noderestore",
        "restore-a",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .expect("remove the NodeRestore finalizer");

    // RBAC: no agent creates or deletes NodeSnapshots, whatever its node.
    let create = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
        "metadata": {"name": "snap-a2", "namespace": ns},
        "spec": {"nodeName": node_a, "groupSnapshot": "gs", "freezeTimeoutSeconds": 10}
    });
    let (_d, file) = temp_file("create.json", &create.to_string());
    let denied = kubectl_as(&agent_a, &["create", "-f", file.to_str().unwrap()])
        .expect_err("agents cannot create NodeSnapshots");
    assert!(
        denied.contains("cannot create resource \"nodesnapshots\""),
        "{denied}"
    );
    let denied = kubectl_as(
        &agent_a,
        &["-n", ns, "delete", "nodesnapshot", "snap-a", "--wait=false"],
    )
    .expect_err("agents cannot delete NodeSnapshots");
    assert!(
        denied.contains("cannot delete resource \"nodesnapshots\""),
        "{denied}"
    );

    // Other identities are not the policy's business: an admin writes both nodes' objects.
    let (_m, admin) = temp_file(
        "admin.kubeconfig",
        &with_plane(|p| p.kubeconfig_for("vap-admin", &["system:masters"])),
    );
    patch_status(&admin, ns, "snap-a", "Cut").expect("admin, node A");
    patch_status(&admin, ns, "snap-b", "Cut").expect("admin, node B");

    // Let the namespace go.
    env.kubectl(&[
        "patch",
        "nodesnapshot",
        "snap-a",
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .expect("remove finalizer");
    for node in [&node_a, &node_b] {
        let _ = with_plane(|p| p.kubectl(&["delete", "node", node, "--wait=false"]));
    }
}

/// A GroupSnapshot as the admin makes it: with tandem's finalizer and, when `started`, a status
/// that lists a member (the controller has made NodeSnapshots for it).
fn finalized_group_snapshot(env: &TestEnv, name: &str, started: bool) {
    let snapshot = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
        "metadata": {"name": name, "finalizers": ["tandem.dev/group-snapshot"]},
        "spec": {"groupName": "g"}
    });
    let (_d, file) = temp_file("gsnap.json", &snapshot.to_string());
    env.kubectl(&["create", "-f", file.to_str().unwrap()])
        .expect("create gsnap");
    if started {
        let status = json!({"status": {"phase": "Ready", "members": [
            {"claim": "data", "persistentVolume": "pv-data", "node": "node-a"}
        ]}});
        env.kubectl(&[
            "patch",
            "groupsnapshot",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .expect("status");
    }
}

fn remove_finalizers(kubeconfig: &Path, ns: &str, name: &str) -> Result<String, String> {
    kubectl_as(
        kubeconfig,
        &[
            "-n",
            ns,
            "patch",
            "groupsnapshot",
            name,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    )
}

#[tokio::test]
async fn only_the_controller_removes_the_finalizer_of_a_started_group_snapshot_or_running_restore()
{
    // Alone: a release's guard is cluster-wide and lets only its own controller through.
    let _crds = CRD_LOCK.write().await;
    let env = TestEnv::new("helm-fin").await;
    let ns = env.namespace.as_str();
    let chart = chart_dir().display().to_string();
    helm_ok(&[
        "install",
        "tandem-fin",
        &chart,
        "-n",
        ns,
        "--set",
        // The restore StorageClass is cluster-wide and would stay behind.
        "crds.install=false,restore.storageClass.create=false",
    ]);
    env.kubectl(&[
        "create",
        "rolebinding",
        "editor",
        "--clusterrole",
        "edit",
        "--user",
        "editor",
    ])
    .expect("rolebinding");
    support::eventually(
        Duration::from_secs(30),
        "the edit role to aggregate tandem's rules",
        || async { can_i("editor", ns, "patch groupsnapshots.tandem.dev").then_some(()) },
    )
    .await;
    let (_e, editor) = temp_file(
        "editor.kubeconfig",
        &with_plane(|p| p.kubeconfig_for("editor", &[])),
    );
    let (_a, admin) = temp_file(
        "admin.kubeconfig",
        &with_plane(|p| p.kubeconfig_for("someadmin", &["system:masters"])),
    );
    let (_c, controller) = token_file(&token(ns, "tandem-fin-controller", None));

    for name in ["started", "started-2", "unstarted"] {
        finalized_group_snapshot(&env, name, name != "unstarted");
    }
    // The policy takes effect once the API server has loaded it: wait for the first denial. A
    // removal that got through before that is undone, or no later attempt could be denied.
    let denied = support::eventually(
        Duration::from_secs(30),
        "the finalizer guard policy",
        || async {
            match remove_finalizers(&editor, ns, "started") {
                Err(denied) => Some(denied),
                Ok(_) => {
                    env.kubectl(&[
                        "patch",
                        "groupsnapshot",
                        "started",
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":["tandem.dev/group-snapshot"]}}"#,
                    ])
                    .expect("put the finalizer back");
                    None
                }
            }
        },
    )
    .await;
    assert!(
        denied.contains("only the tandem controller may remove the finalizer")
            && denied.contains(&format!("{ns}/started")),
        "{denied}"
    );
    // Not even a cluster admin: the controller must delete or keep the member snapshots first.
    let denied = remove_finalizers(&admin, ns, "started").expect_err("admins are guarded too");
    assert!(denied.contains("only the tandem controller"), "{denied}");
    // A GroupSnapshot that never started has no NodeSnapshots: nothing to guard.
    remove_finalizers(&editor, ns, "unstarted").expect("no member snapshots, no guard");
    // Other edits by the editor go through.
    env.kubectl(&["get", "groupsnapshot", "started"])
        .expect("still there");
    kubectl_as(
        &editor,
        &["-n", ns, "label", "groupsnapshot", "started", "team=a"],
    )
    .expect("a label is fine");
    // The controller's own identity removes it.
    remove_finalizers(&controller, ns, "started").expect("the controller may");
    remove_finalizers(&controller, ns, "started-2").expect("the controller may");

    // GroupRestores: guarded while they run (members recorded, not Completed or Failed).
    for (name, phase) in [
        ("cloning", Some("Cloning")),
        ("cloning-2", Some("Cloning")),
        ("completed", Some("Completed")),
        ("failed", Some("Failed")),
        ("unstarted", None),
    ] {
        finalized_group_restore(&env, name, phase);
    }
    let denied = support::eventually(
        Duration::from_secs(30),
        "the restore finalizer guard policy",
        || async {
            match remove_restore_finalizers(&editor, ns, "cloning") {
                Err(denied) => Some(denied),
                Ok(_) => {
                    env.kubectl(&[
                        "patch",
                        "grouprestore",
                        "cloning",
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":["tandem.dev/group-restore"]}}"#,
                    ])
                    .expect("put the finalizer back");
                    None
                }
            }
        },
    )
    .await;
    assert!(
        denied.contains(
            "only the tandem controller may remove the finalizer tandem.dev/group-restore"
        ) && denied.contains(&format!("{ns}/cloning")),
        "{denied}"
    );
    let denied =
        remove_restore_finalizers(&admin, ns, "cloning").expect_err("admins are guarded too");
    assert!(denied.contains("only the tandem controller"), "{denied}");
    for finished in ["completed", "failed", "unstarted"] {
        remove_restore_finalizers(&editor, ns, finished)
            .unwrap_or_else(|e| panic!("{finished}: nothing left to roll back, no guard: {e}"));
    }
    remove_restore_finalizers(&controller, ns, "cloning").expect("the controller may");
    remove_restore_finalizers(&controller, ns, "cloning-2").expect("the controller may");
}

/// A GroupRestore as the controller leaves it: its finalizer, and with a phase, a status that
/// records a member (it has started cloning).
fn finalized_group_restore(env: &TestEnv, name: &str, phase: Option<&str>) {
    let restore = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "GroupRestore",
        "metadata": {"name": name, "finalizers": ["tandem.dev/group-restore"]},
        "spec": {"source": {"groupSnapshotName": "gs"}, "mode": "NewClaims"}
    });
    let (_d, file) = temp_file("grestore.json", &restore.to_string());
    env.kubectl(&["create", "-f", file.to_str().unwrap()])
        .expect("create grestore");
    if let Some(phase) = phase {
        let status = json!({"status": {"phase": phase, "members": [
            {"sourceClaim": "data", "claim": "data-r", "persistentVolume": "tandem-0123456789", "node": "node-a"}
        ]}});
        env.kubectl(&[
            "patch",
            "grouprestore",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status.to_string(),
        ])
        .expect("status");
    }
}

fn remove_restore_finalizers(kubeconfig: &Path, ns: &str, name: &str) -> Result<String, String> {
    kubectl_as(
        kubeconfig,
        &[
            "-n",
            ns,
            "patch",
            "grouprestore",
            name,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ],
    )
}
