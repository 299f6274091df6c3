//! ConsistencyGroup against a real API server: schema validation, membership by each of the three
//! ways, label changes, namespace isolation, events and the per-namespace quota.

mod support;

use std::time::Duration;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, ResourceQuota};
use k8s_openapi::api::events::v1::Event;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use serde_json::json;
use support::objects::{claim, local_volume};
use support::{TestEnv, eventually};
use tandem::api::{ConsistencyGroup, GroupMember, GroupSnapshot, NodeSnapshot};
use tandem::controller::ControllerArgs;

const WAIT: Duration = Duration::from_secs(30);

/// Creates an object from JSON and returns the API server's refusal message, if any.
async fn create_raw<K: Resource<DynamicType = ()>>(
    env: &TestEnv,
    body: serde_json::Value,
) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(
        env.client.clone(),
        &env.namespace,
        &ApiResource::erase::<K>(&()),
    );
    let obj: DynamicObject = serde_json::from_value(body).expect("object");
    api.create(&PostParams::default(), &obj)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn group(name: &str, spec: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "ConsistencyGroup",
           "metadata": {"name": name}, "spec": spec})
}

fn assert_refused(result: Result<(), String>, field: &str) {
    let message = result.expect_err("the API server accepted an invalid object");
    assert!(
        message.contains(field),
        "the refusal does not name {field}: {message}"
    );
}

#[tokio::test]
async fn schema_requires_a_way_to_select_members() {
    let env = TestEnv::new("cg-select").await;
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group("g", json!({}))).await,
        "spec.selector",
    );
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group("g", json!({"claims": []}))).await,
        "spec.claims",
    );
    create_raw::<ConsistencyGroup>(&env, group("g", json!({"claims": ["a"]})))
        .await
        .expect("a group with claims is valid");
}

#[tokio::test]
async fn schema_bounds_the_freeze_timeout_and_policy() {
    let env = TestEnv::new("cg-timeout").await;
    for bad in [0, 301, -5] {
        assert_refused(
            create_raw::<ConsistencyGroup>(
                &env,
                group("g", json!({"claims": ["a"], "freezeTimeoutSeconds": bad})),
            )
            .await,
            "spec.freezeTimeoutSeconds",
        );
    }
    assert_refused(
        create_raw::<ConsistencyGroup>(
            &env,
            group("g", json!({"claims": ["a"], "freeze": "Sometimes"})),
        )
        .await,
        "spec.freeze",
    );
    for (i, ok) in [1, 300].into_iter().enumerate() {
        create_raw::<ConsistencyGroup>(
            &env,
            group(
                &format!("g{i}"),
                json!({"claims": ["a"], "freezeTimeoutSeconds": ok, "freeze": "BestEffort"}),
            ),
        )
        .await
        .expect("bounds are inclusive");
    }
    let api: Api<ConsistencyGroup> = env.api();
    let stored = api.get("g0").await.expect("group");
    assert_eq!(stored.spec.freeze, tandem::api::FreezePolicy::BestEffort);
}

#[tokio::test]
async fn schema_requires_dns_label_names() {
    let env = TestEnv::new("cg-names").await;
    // A DNS subdomain the API server would accept for most kinds, but not a DNS label.
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group("orders.db", json!({"claims": ["a"]}))).await,
        "metadata.name",
    );
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group(&"g".repeat(64), json!({"claims": ["a"]})))
            .await,
        "metadata.name",
    );
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group("g", json!({"claims": ["Not_A_Claim"]}))).await,
        "spec.claims",
    );
    assert_refused(
        create_raw::<ConsistencyGroup>(&env, group("g", json!({"claims": ["a", "a"]}))).await,
        "spec.claims",
    );
    let snapshot = |name: &str, group: &str| {
        json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
               "metadata": {"name": name}, "spec": {"groupName": group}})
    };
    assert_refused(
        create_raw::<GroupSnapshot>(&env, snapshot("s", "Orders_DB")).await,
        "spec.groupName",
    );
    assert_refused(
        create_raw::<GroupSnapshot>(&env, snapshot("s.1", "orders")).await,
        "metadata.name",
    );
    assert_refused(
        create_raw::<GroupSnapshot>(
            &env,
            json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
                   "metadata": {"name": "s"}, "spec": {"groupName": "orders", "deletionPolicy": "Shred"}}),
        )
        .await,
        "spec.deletionPolicy",
    );
}

#[tokio::test]
async fn schema_refuses_an_empty_selector_and_bounds_selectors() {
    let env = TestEnv::new("cg-selector").await;
    for field in ["selector", "volumeSelector"] {
        for empty in [
            json!({}),
            json!({"matchLabels": {}}),
            json!({"matchExpressions": []}),
        ] {
            assert_refused(
                create_raw::<ConsistencyGroup>(&env, group("g", json!({field: empty}))).await,
                &format!("spec.{field}"),
            );
        }
        let labels: serde_json::Map<String, serde_json::Value> =
            (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
        assert_refused(
            create_raw::<ConsistencyGroup>(
                &env,
                group("g", json!({field: {"matchLabels": labels}})),
            )
            .await,
            &format!("spec.{field}.matchLabels"),
        );
        let requirements: Vec<_> = (0..33)
            .map(|i| json!({"key": format!("k{i}"), "operator": "Exists"}))
            .collect();
        assert_refused(
            create_raw::<ConsistencyGroup>(
                &env,
                group("g", json!({field: {"matchExpressions": requirements}})),
            )
            .await,
            &format!("spec.{field}.matchExpressions"),
        );
        let values: Vec<String> = (0..65).map(|i| format!("v{i}")).collect();
        assert_refused(
            create_raw::<ConsistencyGroup>(
                &env,
                group(
                    "g",
                    json!({field: {"matchExpressions": [{"key": "k", "operator": "In", "values": values}]}}),
                ),
            )
            .await,
            "values",
        );
    }
    create_raw::<ConsistencyGroup>(
        &env,
        group("g", json!({"selector": {"matchLabels": {"app": "db"}}})),
    )
    .await
    .expect("a selector with one requirement is valid");
}

#[tokio::test]
async fn deletion_policy_is_immutable() {
    let env = TestEnv::new("cg-policy").await;
    create_raw::<GroupSnapshot>(
        &env,
        json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
               "metadata": {"name": "s"}, "spec": {"groupName": "orders"}}),
    )
    .await
    .expect("valid snapshot");
    let snapshots: Api<GroupSnapshot> = env.api();
    // The habit VolumeSnapshotContent teaches: decide to keep it later, then delete.
    let change = snapshots
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "Retain"}})),
        )
        .await;
    assert_refused(
        change.map(|_| ()).map_err(|e| e.to_string()),
        "spec.deletionPolicy is immutable",
    );
    // Re-applying the same value (GitOps) is fine.
    snapshots
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"deletionPolicy": "Delete"}, "metadata": {"labels": {"a": "b"}}}),
            ),
        )
        .await
        .expect("same policy");
}

#[tokio::test]
async fn node_snapshot_fields_and_reported_numbers_are_bounded() {
    let env = TestEnv::new("cg-nsnap").await;
    let node_snapshot = |spec: serde_json::Value| {
        json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
               "metadata": {"name": "n"}, "spec": spec})
    };
    let base = json!({"nodeName": "node-a", "groupSnapshot": "s", "freezeTimeoutSeconds": 10});
    let with = |key: &str, value: serde_json::Value| {
        let mut spec = base.clone();
        spec[key] = value;
        node_snapshot(spec)
    };
    // Whoever can create NodeSnapshots cannot make the agent build paths from them.
    assert_refused(
        create_raw::<NodeSnapshot>(&env, with("groupSnapshot", json!("../x"))).await,
        "spec.groupSnapshot",
    );
    assert_refused(
        create_raw::<NodeSnapshot>(&env, with("groupSnapshot", json!("Ünïcode"))).await,
        "spec.groupSnapshot",
    );
    assert_refused(
        create_raw::<NodeSnapshot>(&env, with("nodeName", json!("node/a"))).await,
        "spec.nodeName",
    );
    for key in ["claim", "persistentVolume"] {
        let mut volume = json!({"claim": "c", "persistentVolume": "pv"});
        volume[key] = json!("../../etc");
        assert_refused(
            create_raw::<NodeSnapshot>(&env, with("volumes", json!([volume]))).await,
            &format!("spec.volumes[0].{key}"),
        );
    }
    let many: Vec<_> = (0..513)
        .map(|i| json!({"claim": format!("c{i}"), "persistentVolume": format!("pv{i}")}))
        .collect();
    assert_refused(
        create_raw::<NodeSnapshot>(&env, with("volumes", json!(many))).await,
        "spec.volumes",
    );
    create_raw::<NodeSnapshot>(&env, node_snapshot(base.clone()))
        .await
        .expect("valid node snapshot");

    // Every number and time an agent reports has a bound.
    let nodes: Api<NodeSnapshot> = env.api();
    for (status, field) in [
        (
            json!({"freezeWindowMillis": i64::MAX}),
            "status.freezeWindowMillis",
        ),
        (
            json!({"freezeWindowMillis": -1}),
            "status.freezeWindowMillis",
        ),
        (
            json!({"freezeStart": "9999-12-30T00:00:00.000000Z"}),
            "status.freezeStart",
        ),
        (
            json!({"observedGeneration": i64::MAX}),
            "status.observedGeneration",
        ),
        (
            json!({"volumes": [{"claim": "c", "sizeBytes": i64::MAX}]}),
            "status.volumes[0].sizeBytes",
        ),
        (
            json!({"volumes": [{"claim": "c", "cutTime": "9999-12-30T00:00:00Z"}]}),
            "cutTime",
        ),
    ] {
        let result = nodes
            .patch_status(
                "n",
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await;
        assert_refused(result.map(|_| ()).map_err(|e| e.to_string()), field);
    }
    nodes
        .patch_status(
            "n",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"freezeWindowMillis": 120, "freezeStart": "2026-12-01T00:00:00.000000Z",
                "volumes": [{"claim": "c", "sizeBytes": 1_i64 << 40, "cutTime": "2026-12-01T00:00:00Z"}]}})),
        )
        .await
        .expect("ordinary numbers");
}

#[tokio::test]
async fn a_group_selecting_too_many_claims_says_so_and_its_snapshots_fail() {
    let env = TestEnv::new("cg-many").await;
    // 513 unbound claims with one label, created in one request.
    let items: Vec<_> = (0..=512)
        .map(|i| {
            serde_json::to_value(claim(&format!("c{i}"), None, &[("app", "big")])).expect("claim")
        })
        .map(|mut c| {
            c["apiVersion"] = json!("v1");
            c["kind"] = json!("PersistentVolumeClaim");
            c
        })
        .collect();
    let list = json!({"apiVersion": "v1", "kind": "List", "items": items});
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("claims.json");
    std::fs::write(&file, list.to_string()).expect("write");
    env.kubectl(&["create", "-f", file.to_str().unwrap()])
        .expect("create claims");
    let controller = start_controller(&env);
    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group(
                "big",
                json!({"selector": {"matchLabels": {"app": "big"}}}),
            ))
            .expect("group"),
        )
        .await
        .expect("create group");
    let ready = eventually(WAIT, "TooManyMembers", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("big").await.ok()?.status?;
            status
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.reason == "TooManyMembers")
        }
    })
    .await;
    assert!(
        ready.message.contains("513") && ready.message.contains("512"),
        "{}",
        ready.message
    );
    let snapshots: Api<GroupSnapshot> = env.api();
    snapshots
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "big-1"}, "spec": {"groupName": "big"}}),
            )
            .expect("snapshot"),
        )
        .await
        .expect("create snapshot");
    let started = std::time::Instant::now();
    let status = eventually(Duration::from_secs(15), "the snapshot to fail", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("big-1").await.ok()?.status?;
            (status.phase == tandem::api::GroupSnapshotPhase::Failed).then_some(status)
        }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(15));
    let message = status.message.unwrap_or_default();
    assert!(message.contains("more than the 512"), "{message}");
    assert_eq!(status.conditions[0].reason, "TooManyMembers");
    controller.abort();
}

#[tokio::test]
async fn group_name_and_node_name_are_immutable() {
    let env = TestEnv::new("cg-immutable").await;
    create_raw::<GroupSnapshot>(
        &env,
        json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "GroupSnapshot",
               "metadata": {"name": "s"}, "spec": {"groupName": "orders"}}),
    )
    .await
    .expect("valid snapshot");
    let snapshots: Api<GroupSnapshot> = env.api();
    let change = snapshots
        .patch(
            "s",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"groupName": "other"}})),
        )
        .await;
    assert_refused(
        change.map(|_| ()).map_err(|e| e.to_string()),
        "spec.groupName",
    );

    create_raw::<NodeSnapshot>(
        &env,
        json!({"apiVersion": "tandem.dev/v1alpha1", "kind": "NodeSnapshot",
               "metadata": {"name": "n"},
               "spec": {"nodeName": "node-a", "groupSnapshot": "s", "freezeTimeoutSeconds": 10}}),
    )
    .await
    .expect("valid node snapshot");
    let nodes: Api<NodeSnapshot> = env.api();
    let change = nodes
        .patch(
            "n",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"nodeName": "node-b"}})),
        )
        .await;
    assert_refused(
        change.map(|_| ()).map_err(|e| e.to_string()),
        "spec.nodeName",
    );
    // NodeSnapshots are selectable by node, which is how each agent watches only its own.
    let listed = nodes
        .list(&ListParams::default().fields("spec.nodeName=node-a"))
        .await
        .expect("field selector on spec.nodeName");
    assert_eq!(listed.items.len(), 1);
    let listed = nodes
        .list(&ListParams::default().fields("spec.nodeName=node-b"))
        .await
        .expect("field selector on spec.nodeName");
    assert!(listed.items.is_empty());
}

/// Publishes a local PV on `node` and a claim bound to it in the test's namespace.
async fn publish_volume(
    env: &TestEnv,
    claim_name: &str,
    node: &str,
    claim_labels: &[(&str, &str)],
    volume_labels: &[(&str, &str)],
) -> String {
    publish_volume_in(
        env,
        &env.namespace,
        claim_name,
        node,
        claim_labels,
        volume_labels,
    )
    .await
}

async fn publish_volume_in(
    env: &TestEnv,
    namespace: &str,
    claim_name: &str,
    node: &str,
    claim_labels: &[(&str, &str)],
    volume_labels: &[(&str, &str)],
) -> String {
    let pv_name = format!("{namespace}-{claim_name}");
    let volumes: Api<PersistentVolume> = Api::all(env.client.clone());
    volumes
        .create(
            &PostParams::default(),
            &local_volume(
                &pv_name,
                &format!("/mnt/{pv_name}"),
                node,
                namespace,
                claim_name,
                volume_labels,
            ),
        )
        .await
        .expect("create PV");
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), namespace);
    claims
        .create(
            &PostParams::default(),
            &claim(claim_name, Some(&pv_name), claim_labels),
        )
        .await
        .expect("create PVC");
    pv_name
}

fn start_controller(env: &TestEnv) -> tokio::task::JoinHandle<()> {
    start_controller_with(
        env,
        ControllerArgs {
            namespace: Some(env.namespace.clone()),
            ..Default::default()
        },
    )
}

fn start_controller_with(env: &TestEnv, args: ControllerArgs) -> tokio::task::JoinHandle<()> {
    let client = env.client.clone();
    tokio::spawn(async move {
        if let Err(e) = tandem::controller::run(client, args).await {
            panic!("controller stopped: {e}");
        }
    })
}

/// Waits until the group's status lists exactly `expected` (claim -> supported).
async fn wait_members(env: &TestEnv, group: &str, expected: &[(&str, bool)]) -> Vec<GroupMember> {
    let api: Api<ConsistencyGroup> = env.api();
    eventually(
        WAIT,
        &format!("members {expected:?} of group {group}"),
        || {
            let api = api.clone();
            async move {
                let status = api.get(group).await.ok()?.status?;
                let got: Vec<(&str, bool)> = status
                    .members
                    .iter()
                    .map(|m| (m.claim.as_str(), m.supported))
                    .collect();
                (got == expected).then(|| status.members.clone())
            }
        },
    )
    .await
}

#[tokio::test]
async fn selector_membership_follows_label_changes() {
    let env = TestEnv::new("cg-labels").await;
    let controller = start_controller(&env);
    let data_pv = publish_volume(&env, "data", "node-a", &[("app", "db")], &[]).await;
    publish_volume(&env, "wal", "node-b", &[("app", "db")], &[]).await;
    publish_volume(&env, "cache", "node-a", &[("app", "cache")], &[]).await;

    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group(
                "db",
                json!({"selector": {"matchLabels": {"app": "db"}}}),
            ))
            .expect("group"),
        )
        .await
        .expect("create group");
    let members = wait_members(&env, "db", &[("data", true), ("wal", true)]).await;
    assert_eq!(
        members[0].persistent_volume.as_deref(),
        Some(data_pv.as_str())
    );
    assert_eq!(members[0].node.as_deref(), Some("node-a"));
    assert_eq!(members[0].driver.as_deref(), Some("local"));
    assert_eq!(members[0].volume_mode.as_deref(), Some("Filesystem"));
    assert_eq!(
        members[0].capacity.as_ref().map(|q| q.0.as_str()),
        Some("1Gi")
    );
    let status = groups
        .get("db")
        .await
        .expect("group")
        .status
        .expect("status");
    assert_eq!(status.nodes, ["node-a", "node-b"]);
    assert_eq!(status.node_count, 2);
    assert_eq!(status.ready_members, 2);
    assert_eq!(status.observed_generation, Some(1));
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "True");

    // Relabelling moves volumes in and out of the group at once (watches, not polling).
    let claims: Api<PersistentVolumeClaim> = env.api();
    claims
        .patch(
            "wal",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "other"}}})),
        )
        .await
        .expect("relabel wal");
    claims
        .patch(
            "cache",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "db"}}})),
        )
        .await
        .expect("relabel cache");
    wait_members(&env, "db", &[("cache", true), ("data", true)]).await;

    // matchExpressions, and a spec change is observed.
    groups
        .patch(
            "db",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"selector": {"matchLabels": null, "matchExpressions": [
                {"key": "app", "operator": "In", "values": ["other", "cache"]}]}}}),
            ),
        )
        .await
        .expect("change selector");
    wait_members(&env, "db", &[("wal", true)]).await;
    let status = groups
        .get("db")
        .await
        .expect("group")
        .status
        .expect("status");
    assert_eq!(status.observed_generation, Some(2));
    controller.abort();
}

#[tokio::test]
async fn volume_selector_never_reaches_another_namespace() {
    let env = TestEnv::new("cg-tenant").await;
    let other = TestEnv::new("cg-tenant-other").await;
    let controller = start_controller(&env);
    publish_volume(&env, "mine", "node-a", &[], &[("backup", "nightly")]).await;
    publish_volume_in(
        &env,
        &other.namespace,
        "theirs",
        "node-a",
        &[],
        &[("backup", "nightly")],
    )
    .await;
    // A claim in our namespace that names their volume: the binding is not ours.
    let theirs_pv = format!("{}-theirs", other.namespace);
    let claims: Api<PersistentVolumeClaim> = env.api();
    claims
        .create(
            &PostParams::default(),
            &claim("sneaky", Some(&theirs_pv), &[("backup", "nightly")]),
        )
        .await
        .expect("create sneaky claim");

    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group(
                "nightly",
                json!({"volumeSelector": {"matchLabels": {"backup": "nightly"}}}),
            ))
            .expect("group"),
        )
        .await
        .expect("create group");
    wait_members(&env, "nightly", &[("mine", true)]).await;

    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group(
                "labels",
                json!({"selector": {"matchLabels": {"backup": "nightly"}}}),
            ))
            .expect("group"),
        )
        .await
        .expect("create group");
    // Only the claim carries the label here; its volume belongs to the other namespace.
    let members = wait_members(&env, "labels", &[("sneaky", false)]).await;
    assert!(
        members
            .iter()
            .all(|m| !m.supported || m.persistent_volume.as_deref() != Some(theirs_pv.as_str())),
        "a volume claimed from another namespace became a member: {members:?}"
    );
    let sneaky = &members[0];
    assert!(
        matches!(
            sneaky.reason.as_deref(),
            Some("ClaimNotBound" | "ClaimedFromOtherNamespace")
        ),
        "unexpected reason {:?}",
        sneaky.reason
    );
    controller.abort();
}

#[tokio::test]
async fn explicit_claims_report_each_problem_and_emit_events() {
    let env = TestEnv::new("cg-claims").await;
    let controller = start_controller(&env);
    publish_volume(&env, "data", "node-a", &[], &[]).await;
    let claims: Api<PersistentVolumeClaim> = env.api();
    claims
        .create(&PostParams::default(), &claim("pending", None, &[]))
        .await
        .expect("create unbound claim");

    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group(
                "g",
                json!({"claims": ["data", "missing", "pending"]}),
            ))
            .expect("group"),
        )
        .await
        .expect("create group");
    let members = wait_members(
        &env,
        "g",
        &[("data", true), ("missing", false), ("pending", false)],
    )
    .await;
    assert_eq!(members[1].reason.as_deref(), Some("ClaimNotFound"));
    assert_eq!(members[2].reason.as_deref(), Some("ClaimNotBound"));
    let status = groups
        .get("g")
        .await
        .expect("group")
        .status
        .expect("status");
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .expect("Ready");
    assert_eq!(ready.status, "False");
    assert_eq!(ready.reason, "UnsupportedMembers");
    assert!(ready.message.contains("missing") && ready.message.contains("pending"));

    // One aggregated event for the reconcile, naming every problem (not one per claim).
    let events: Api<Event> = env.api();
    let member_events = || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            let of_g: Vec<Event> = list
                .items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("g"))
                .collect();
            (!of_g.is_empty()).then_some(of_g)
        }
    };
    eventually(WAIT, "member events", member_events).await;
    // Every event the first reconciles would emit has had time to arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let of_g = member_events().await.expect("events");
    assert_eq!(
        of_g.len(),
        1,
        "one event per reconcile, not one per member: {:?}",
        of_g.iter()
            .map(|e| (&e.reason, &e.note))
            .collect::<Vec<_>>()
    );
    assert_eq!(of_g[0].reason.as_deref(), Some("MembersUnsupported"));
    let note = of_g[0].note.clone().unwrap_or_default();
    assert!(
        note.contains("missing (ClaimNotFound") && note.contains("pending (ClaimNotBound"),
        "{note}"
    );

    // Creating the missing claim makes it a member without touching the group.
    publish_volume(&env, "missing", "node-b", &[], &[]).await;
    wait_members(
        &env,
        "g",
        &[("data", true), ("missing", true), ("pending", false)],
    )
    .await;
    controller.abort();
}

#[tokio::test]
async fn a_trailing_claim_cache_never_reports_an_existing_claim_missing() {
    let env = TestEnv::new("cg-lag").await;
    // Each PVC event reaches the controller's cache 5 s after the one before.
    let controller = start_controller_with(
        &env,
        ControllerArgs {
            namespace: Some(env.namespace.clone()),
            test_only_claim_cache_lag_ms: Some(5000),
            ..Default::default()
        },
    );
    // Once the cache holds the first claim, the lag has begun: the claim created next trails.
    let groups: Api<ConsistencyGroup> = env.api();
    publish_volume(&env, "warmup", "node-a", &[], &[]).await;
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("probe", json!({"claims": ["warmup"]}))).expect("group"),
        )
        .await
        .expect("create probe group");
    wait_members(&env, "probe", &[("warmup", true)]).await;
    publish_volume(&env, "data", "node-a", &[], &[]).await;
    let claims: Api<PersistentVolumeClaim> = env.api();
    eventually(WAIT, "claim data bound", || {
        let claims = claims.clone();
        async move {
            let phase = claims.get("data").await.ok()?.status?.phase?;
            (phase == "Bound").then_some(())
        }
    })
    .await;
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g", json!({"claims": ["data"]}))).expect("group"),
        )
        .await
        .expect("create group");
    let first = eventually(WAIT, "the group's first status", || {
        let groups = groups.clone();
        async move {
            let status = groups.get("g").await.ok()?.status?;
            (!status.members.is_empty()).then_some(status.members)
        }
    })
    .await;
    assert!(
        first[0].supported && first[0].claim == "data",
        "an existing claim was reported as {:?}: {:?}",
        first[0].reason,
        first[0].message
    );
    controller.abort();
}

#[tokio::test]
async fn a_later_warning_says_what_the_later_reconcile_found() {
    let env = TestEnv::new("cg-notes").await;
    let controller = start_controller(&env);
    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g", json!({"claims": ["first"]}))).expect("group"),
        )
        .await
        .expect("create group");
    let events: Api<Event> = env.api();
    let notes = || {
        let events = events.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            Some(
                list.items
                    .into_iter()
                    .filter(|e| e.reason.as_deref() == Some("MembersUnsupported"))
                    .filter_map(|e| e.note)
                    .collect::<Vec<String>>(),
            )
        }
    };
    eventually(WAIT, "a warning naming claim first", || async {
        notes()
            .await
            .filter(|n| n.iter().any(|n| n.contains("first (ClaimNotFound")))
    })
    .await;
    groups
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"claims": ["second"]}})),
        )
        .await
        .expect("patch group");
    // Same reason, other claims: a new event, not a repeat of the first one's note.
    eventually(WAIT, "a warning naming claim second", || async {
        notes()
            .await
            .filter(|n| n.iter().any(|n| n.contains("second (ClaimNotFound")))
    })
    .await;
    controller.abort();
}

#[tokio::test]
async fn resource_quota_caps_groups_per_namespace() {
    let env = TestEnv::new("cg-quota").await;
    let quotas: Api<ResourceQuota> = env.api();
    quotas
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "groups"},
                "spec": {"hard": {"count/consistencygroups.tandem.dev": "2"}}
            }))
            .expect("quota"),
        )
        .await
        .expect("create quota");
    // kube-controller-manager computes the quota's status; admission relies on it.
    // Its quota monitor for a custom resource starts at its next discovery sync (every 30 s).
    eventually(Duration::from_secs(120), "quota status", || {
        let quotas = quotas.clone();
        async move {
            let q = quotas.get("groups").await.ok()?;
            // Admission refuses while the usage is unknown, so wait for `used` too.
            q.status?
                .used?
                .contains_key("count/consistencygroups.tandem.dev")
                .then_some(())
        }
    })
    .await;
    for name in ["one", "two"] {
        create_raw::<ConsistencyGroup>(&env, group(name, json!({"claims": ["a"]})))
            .await
            .expect("within quota");
    }
    let refused =
        create_raw::<ConsistencyGroup>(&env, group("three", json!({"claims": ["a"]}))).await;
    let message = refused.expect_err("the third group exceeded the quota but was accepted");
    assert!(message.contains("exceeded quota"), "{message}");
    assert!(
        message.contains("count/consistencygroups.tandem.dev"),
        "{message}"
    );
}

/// One HTTP GET on loopback: the status code and the body.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let code = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())?;
    Some((code, body))
}

/// The controller's count of ConsistencyGroup reconciles, once it has stopped moving.
async fn settled_reconciles(port: u16) -> u64 {
    let read = move || {
        let (_, metrics) = http_get(port, "/metrics")?;
        metrics
            .lines()
            .find(|l| l.starts_with("tandem_reconciles_total{controller=\"consistency_group\"}"))?
            .split_whitespace()
            .last()?
            .parse::<u64>()
            .ok()
    };
    let mut last = None;
    loop {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = tokio::task::spawn_blocking(read).await.ok().flatten();
        if now.is_some() && now == last {
            return now.unwrap_or_default();
        }
        last = now;
    }
}

/// One claim's label change reconciles the groups it can affect (the one it left, the one it
/// joined), not every group of the namespace over every claim.
#[tokio::test]
async fn a_label_change_reconciles_only_the_groups_it_can_affect() {
    let env = TestEnv::new("cg-fanout").await;
    let port = support::control_plane::free_port();
    let _controller = start_controller_with(
        &env,
        ControllerArgs {
            namespace: Some(env.namespace.clone()),
            http_addr: Some(format!("127.0.0.1:{port}").parse().expect("address")),
            ..Default::default()
        },
    );
    const GROUPS: usize = 30;
    let groups: Api<ConsistencyGroup> = env.api();
    for i in 0..GROUPS {
        let app = format!("app-{i}");
        publish_volume(&env, &format!("c{i}"), "node-a", &[("app", &app)], &[]).await;
        groups
            .create(
                &PostParams::default(),
                &serde_json::from_value(group(
                    &format!("g{i}"),
                    json!({"selector": {"matchLabels": {"app": app}}}),
                ))
                .expect("group"),
            )
            .await
            .expect("create group");
    }
    for i in 0..GROUPS {
        wait_members(&env, &format!("g{i}"), &[(&format!("c{i}"), true)]).await;
    }
    let before = settled_reconciles(port).await;

    let claims: Api<PersistentVolumeClaim> = env.api();
    claims
        .patch(
            "c0",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "app-1"}}})),
        )
        .await
        .expect("relabel");
    wait_members(&env, "g1", &[("c0", true), ("c1", true)]).await;
    wait_members(&env, "g0", &[]).await;
    let cost = settled_reconciles(port).await - before;
    // g0 and g1, each once for the claim and once for its own status write (a late binding
    // update of another claim may add its own group's two); before, all 30 groups.
    assert!(
        (2..=8).contains(&cost),
        "one label change cost {cost} reconciles of {GROUPS} groups"
    );
}

/// Two replicas that start together race for a free Lease. Exactly one may win: before each
/// replica wrote the Lease as its own field manager, the loser's apply was not refused and both
/// led (until their first renewal, 25 s later), which is what made the test below flaky.
#[tokio::test]
async fn two_replicas_starting_together_never_both_lead() {
    use k8s_openapi::api::coordination::v1::Lease;
    use tandem::controller::{LEADER_LEASE, leader_lease};

    let env = TestEnv::new("cg-lease-race").await;
    let leases: Api<Lease> = env.api();
    let decided = Duration::from_secs(3);
    for round in 0..10 {
        let (a, b) = tokio::join!(
            leader_lease(env.client.clone(), &env.namespace, "replica-a"),
            leader_lease(env.client.clone(), &env.namespace, "replica-b"),
        );
        let (a, b) = (a.expect("manager a"), b.expect("manager b"));
        // `changed` returns once this replica's leadership changes: true when it takes the Lease.
        // The loser waits out the winner's lease, far longer than `decided`.
        let (won_a, won_b) = tokio::join!(
            tokio::time::timeout(decided, a.changed()),
            tokio::time::timeout(decided, b.changed()),
        );
        let leaders: Vec<&str> = [("replica-a", won_a), ("replica-b", won_b)]
            .into_iter()
            .filter(|(_, won)| matches!(won, Ok(Ok(true))))
            .map(|(name, _)| name)
            .collect();
        let holder = leases
            .get(LEADER_LEASE)
            .await
            .expect("lease")
            .spec
            .and_then(|s| s.holder_identity);
        assert_eq!(
            leaders.len(),
            1,
            "round {round}: leaders {leaders:?}, the Lease names {holder:?}"
        );
        assert_eq!(holder.as_deref(), Some(leaders[0]), "round {round}");
        leases
            .delete(LEADER_LEASE, &Default::default())
            .await
            .expect("delete lease");
    }
}

#[tokio::test]
async fn leader_election_runs_one_controller_and_hands_over() {
    use k8s_openapi::api::coordination::v1::Lease;
    use support::process::Daemon;

    let env = TestEnv::new("cg-leader").await;
    let logs = tempfile::tempdir().expect("log dir");
    let mut controllers = Vec::new();
    for name in ["ctl-1", "ctl-2"] {
        let port = support::control_plane::free_port();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
        cmd.args([
            "controller",
            "--leader-elect",
            "--namespace",
            &env.namespace,
        ])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &env.plane.kubeconfig)
        .env("POD_NAMESPACE", &env.namespace)
        .env("POD_NAME", name);
        controllers.push((name, port, Daemon::spawn(name, &mut cmd, logs.path())));
    }
    let leases: Api<Lease> = env.api();
    let holder = |leases: Api<Lease>| async move {
        leases
            .get_opt("tandem-controller")
            .await
            .ok()??
            .spec?
            .holder_identity
    };
    let leader = eventually(WAIT, "a leader", || holder(leases.clone())).await;
    let (leader_index, follower_index) = if leader == "ctl-1" { (0, 1) } else { (1, 0) };
    let (_, leader_port, _) = controllers[leader_index];
    let (follower_name, follower_port, _) = controllers[follower_index];

    // Both are alive; only the leader is ready and serves metrics of real work.
    eventually(WAIT, "leader ready", || async move {
        (http_get(leader_port, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    // The follower may still be starting (a busy machine): alive once it answers at all.
    eventually(WAIT, "follower alive", || async move {
        (http_get(follower_port, "/healthz")?.0 == 200).then_some(())
    })
    .await;
    assert_eq!(http_get(follower_port, "/readyz").map(|r| r.0), Some(503));
    let (code, metrics) = http_get(leader_port, "/metrics").expect("metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("tandem_freeze_window_seconds"),
        "{metrics}"
    );
    assert!(metrics.contains("tandem_cut_duration_seconds"), "{metrics}");

    publish_volume(&env, "data", "node-a", &[], &[]).await;
    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("g", json!({"claims": ["data"]}))).expect("group"),
        )
        .await
        .expect("create group");
    wait_members(&env, "g", &[("data", true)]).await;

    // The leader crashes: the other replica takes the lease over and becomes ready.
    controllers[leader_index].2.kill9();
    let next = eventually(Duration::from_secs(90), "a new leader", || {
        let leases = leases.clone();
        async move {
            let h = holder(leases).await?;
            (h == follower_name).then_some(h)
        }
    })
    .await;
    assert_eq!(next, follower_name);
    eventually(WAIT, "new leader ready", || async move {
        (http_get(follower_port, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    // And it reconciles: a relabel-free change (a new claim in the list) is picked up.
    publish_volume(&env, "wal", "node-a", &[], &[]).await;
    groups
        .patch(
            "g",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"claims": ["data", "wal"]}})),
        )
        .await
        .expect("patch group");
    wait_members(&env, "g", &[("data", true), ("wal", true)]).await;
}

#[tokio::test]
async fn a_snapshot_of_a_group_whose_members_never_resolve_fails_with_a_message() {
    let env = TestEnv::new("cg-unresolved").await;
    let ns = env.namespace.clone();
    // Something (here a policy of the test's) keeps the controller from writing the group's
    // status, so its members are never resolved for its current generation.
    let policy = format!("deny-status-{ns}");
    let objects = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"failurePolicy": "Fail",
                  "matchConstraints": {"resourceRules": [{"apiGroups": ["tandem.dev"], "apiVersions": ["*"],
                      "operations": ["UPDATE", "CREATE"], "resources": ["consistencygroups/status"]}]},
                  "validations": [{"expression": "false", "message": "status writes are blocked by the test"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"],
                  "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}}}}
    ]});
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("policy.json");
    std::fs::write(&file, objects.to_string()).expect("write");
    let file = file.to_str().unwrap().to_string();
    env.kubectl(&["create", "-f", &file]).expect("policy");
    publish_volume(&env, "data", "node-a", &[], &[]).await;
    let groups: Api<ConsistencyGroup> = env.api();
    groups
        .create(
            &PostParams::default(),
            &serde_json::from_value(group("stuck", json!({"claims": ["data"]}))).expect("group"),
        )
        .await
        .expect("create group");
    // Wait until the policy is in force (a status write is refused).
    eventually(WAIT, "the status policy", || {
        let groups = groups.clone();
        async move {
            groups
                .patch_status(
                    "stuck",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"readyMembers": 0}})),
                )
                .await
                .err()
        }
    })
    .await;
    let controller = start_controller(&env);
    let snapshots: Api<GroupSnapshot> = env.api();
    snapshots
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": "stuck-1"}, "spec": {"groupName": "stuck"}}),
            )
            .expect("snapshot"),
        )
        .await
        .expect("create snapshot");
    let status = eventually(Duration::from_secs(25), "the snapshot to fail", || {
        let snapshots = snapshots.clone();
        async move {
            let status = snapshots.get("stuck-1").await.ok()?.status?;
            (status.phase == tandem::api::GroupSnapshotPhase::Failed).then_some(status)
        }
    })
    .await;
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains("has not resolved its members"),
        "{message}"
    );
    assert_eq!(status.conditions[0].reason, "GroupNotResolved");
    controller.abort();
    let _ = with_plane_delete(&file);
}

fn with_plane_delete(file: &str) -> Result<String, String> {
    support::with_plane(|p| p.kubectl(&["delete", "-f", file, "--wait=false"]))
}

/// A TCP proxy to `upstream` that holds every connection made before `until` until then: a slow
/// API server, as the first lists of a large cluster are. Returns its port.
fn holding_proxy(upstream: String, until: std::time::Instant) -> u16 {
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for inbound in listener.incoming().flatten() {
            let upstream = upstream.clone();
            std::thread::spawn(move || {
                std::thread::sleep(until.saturating_duration_since(std::time::Instant::now()));
                let Ok(outbound) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (Ok(mut in_r), Ok(mut out_w)) = (inbound.try_clone(), outbound.try_clone())
                else {
                    return;
                };
                let (mut out_r, mut in_w) = (outbound, inbound);
                std::thread::spawn(move || std::io::copy(&mut in_r, &mut out_w));
                let _ = std::io::copy(&mut out_r, &mut in_w);
            });
        }
    });
    port
}

#[tokio::test]
async fn readiness_waits_as_long_as_the_first_lists_take() {
    use support::process::Daemon;
    let env = TestEnv::new("cg-ready").await;
    let upstream = env
        .plane
        .server
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .to_string();
    // Every request of the first 8 s waits until then: longer than one 5 s cache wait.
    let port = holding_proxy(
        upstream.clone(),
        std::time::Instant::now() + Duration::from_secs(8),
    );
    let kubeconfig = std::fs::read_to_string(&env.plane.kubeconfig)
        .expect("kubeconfig")
        .replace(&upstream, &format!("127.0.0.1:{port}"));
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("slow.kubeconfig");
    std::fs::write(&file, kubeconfig).expect("write");
    let http = support::control_plane::free_port();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tandem"));
    cmd.args(["controller", "--namespace", &env.namespace])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .env("KUBECONFIG", &file);
    let mut controller = Daemon::spawn("slow-controller", &mut cmd, dir.path());
    eventually(WAIT, "the controller ready", || async move {
        (http_get(http, "/readyz")?.0 == 200).then_some(())
    })
    .await;
    assert!(controller.is_running());
}
