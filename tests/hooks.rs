//! Quiesce hooks: the API's validation against the real API server, and fault tests on the real
//! node (an exec needs a kubelet and a container runtime).

mod support;

use support::TestEnv;

fn group_yaml(name: &str, hooks: &str) -> String {
    format!(
        "apiVersion: tandem.dev/v1alpha1\nkind: ConsistencyGroup\nmetadata: {{name: {name}}}\nspec:\n  claims: [data]\n  quiesce:\n    hooks:\n{hooks}"
    )
}

fn apply(env: &TestEnv, yaml: &str) -> Result<String, String> {
    let path = std::env::temp_dir().join(format!("hooks-{}-{}.yaml", env.namespace, yaml.len()));
    std::fs::write(&path, yaml).map_err(|e| e.to_string())?;
    let result = env.kubectl(&["apply", "-f", path.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&path);
    result
}

#[tokio::test]
async fn the_api_server_accepts_well_formed_hooks_and_refuses_incomplete_ones() {
    let env = TestEnv::new("hooks-api").await;
    let good = group_yaml(
        "good",
        "    - {name: lock, mode: Hold, container: db, command: [mysql], stdin: \"FLUSH TABLES WITH READ LOCK;\\n\", readyWhen: {stdoutLine: READY}, release: {stdin: \"UNLOCK TABLES;\\n\"}}\n    - {name: flush, command: [sync], timeoutSeconds: 5, onError: Continue}\n    - {name: after, phase: Post, pods: Selector, selector: {matchLabels: {app: db}}, command: [\"true\"]}\n",
    );
    apply(&env, &good).expect("a well-formed quiesce spec is accepted");
    let defaults = env
        .kubectl(&[
            "get",
            "cg",
            "good",
            "-o",
            "jsonpath={.spec.quiesce.hooks[1]}",
        ])
        .expect("read back");
    for expected in [
        "\"mode\":\"Exec\"",
        "\"phase\":\"Pre\"",
        "\"wrap\":\"Timeout\"",
        "\"pods\":\"Consumers\"",
    ] {
        assert!(defaults.contains(expected), "{expected} in {defaults}");
    }
    let refused = [
        (
            "a hold without readyWhen",
            "    - {name: lock, mode: Hold, command: [mysql]}\n",
            "needs readyWhen",
        ),
        (
            "readyWhen on an Exec hook",
            "    - {name: x, command: [sync], readyWhen: {stdoutLine: R}}\n",
            "belong to Hold hooks",
        ),
        (
            "pods: Selector without a selector",
            "    - {name: x, pods: Selector, command: [sync]}\n",
            "needs a selector",
        ),
        (
            "two hooks of one name",
            "    - {name: x, command: [sync]}\n    - {name: x, command: [sync]}\n",
            "Duplicate value",
        ),
        (
            "an empty command",
            "    - {name: x, command: []}\n",
            "spec.quiesce.hooks[0].command",
        ),
    ];
    for (i, (what, hooks, says)) in refused.iter().enumerate() {
        let error = apply(&env, &group_yaml(&format!("bad-{i}"), hooks))
            .expect_err(&format!("{what} is refused"));
        assert!(error.contains(says), "{what}: {error}");
    }
}
