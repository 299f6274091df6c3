//! Ceph RBD end to end: the real `tandem controller` and two real `tandem agent`s in the RBD QEMU
//! guest (krbd, a single-node Ceph on the guest's own loopback; hack/rbd-qemu/run.sh), reaching
//! this test's API server through hack/rbd-qemu/serial-bridge.rs over a virtio-serial port (the
//! guest has no network). The test publishes what ceph-csi and the attach/detach controller would:
//! RBD PersistentVolumes, bound claims, VolumeAttachments, ceph-csi's config map and a Secret, and
//! the ConsistencyGroup; the guest freezes ext4 and XFS on three krbd images on two nodes, takes the
//! snapshot with `kubectl tandem`, checks every member snapshot's data, restores it to new claims
//! (each copy mapped and checked) and in place (this test plays the attach/detach controller),
//! deletes it, and fails one
//! cut with an exclusive mapping (guest-test.sh, section 8). The guest's own one-shot scenarios
//! (sections 1-7) run first.
//!
//! Needs root and the packages run.sh names; `RBD_QEMU=0` skips it (as hack/run-suites.sh does).

mod support;

use std::process::Command;

use k8s_openapi::api::core::v1::{
    ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Secret,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;
use support::{ControlPlane, TestEnv, repo_root};
use tandem::api::{
    ConsistencyGroup, GroupRestore, GroupSnapshot, GroupSnapshotPhase, NodePhase, NodeSnapshot,
    RestorePhase,
};

async fn create<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).expect("object");
    api.create(&PostParams::default(), &object)
        .await
        .expect("create");
}

/// Plays the attach/detach controller for the guest's in-place restore r2: once r2 waits for its
/// images to be detached (the guest unmapped them), the VolumeAttachments go; once r2 is
/// Completed, they come back (the workloads' pods are scheduled again). Whether both happened.
async fn play_attach_detach(
    restores: Api<GroupRestore>,
    client: kube::Client,
    pvs: Vec<(String, &'static str)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> bool {
    use k8s_openapi::api::storage::v1::VolumeAttachment;
    let attachments: Api<VolumeAttachment> = Api::all(client.clone());
    let mut detached = false;
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let Ok(Some(r2)) = restores.get_opt("r2").await else {
            continue;
        };
        let status = r2.status.unwrap_or_default();
        if !detached
            && status
                .message
                .as_deref()
                .is_some_and(|m| m.contains("to be detached"))
        {
            for (pv, _) in &pvs {
                let _ = attachments
                    .delete(&format!("csi-{pv}"), &Default::default())
                    .await;
            }
            println!("attach/detach: detached {pvs:?} for r2");
            detached = true;
        }
        if detached && status.phase == RestorePhase::Completed {
            for (pv, node) in &pvs {
                support::objects::attach(&client, pv, node).await;
            }
            println!("attach/detach: attached again after r2");
            return true;
        }
    }
    false
}

#[tokio::test]
async fn rbd_members_end_to_end_in_the_qemu_guest() {
    if std::env::var("RBD_QEMU").as_deref() == Ok("0") {
        eprintln!("SKIPPED: RBD_QEMU=0");
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the RBD guest needs root (QEMU, cpio of the Ceph state)");
        return;
    }
    let plane = tokio::task::spawn_blocking(|| ControlPlane::start(&repo_root().join("crds")))
        .await
        .expect("control plane");
    let env = TestEnv::on_private(&plane, "rbd-e2e").await;
    let ns = env.namespace.clone();
    let client = env.client.clone();

    // client.admin's key, made here so the Secret can hold it before the guest's cluster exists.
    let out = Command::new("ceph-authtool")
        .arg("--gen-print-key")
        .output()
        .expect("ceph-authtool (ceph-common)");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success() && !key.is_empty(),
        "ceph-authtool --gen-print-key"
    );

    for node in ["n1", "n2"] {
        create(
            &Api::<Node>::all(client.clone()),
            json!({"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}}),
        )
        .await;
    }
    create(
        &env.api::<ConfigMap>(),
        json!({"metadata": {"name": "ceph-csi-config"}, "data": {"config.json":
            json!([{"clusterID": "guest", "monitors": ["127.0.0.1:6789"]}]).to_string()}}),
    )
    .await;
    create(
        &env.api::<Secret>(),
        json!({"metadata": {"name": "csi-rbd-secret"},
               "stringData": {"userID": "admin", "userKey": key}}),
    )
    .await;
    for (image, node) in [("e1", "n1"), ("e2", "n1"), ("e3", "n2")] {
        let pv = format!("{ns}-{image}");
        let claim = format!("db-{image}");
        let volume = support::objects::RbdVolume {
            cluster_id: "guest",
            pool: "rbd",
            image,
            fs_type: if image == "e2" { "xfs" } else { "ext4" },
            secret: "csi-rbd-secret",
        };
        Api::<PersistentVolume>::all(client.clone())
            .create(
                &PostParams::default(),
                &support::objects::rbd_volume(&pv, &ns, &claim, &volume),
            )
            .await
            .expect("PV");
        env.api::<PersistentVolumeClaim>()
            .create(
                &PostParams::default(),
                &support::objects::claim(&claim, Some(&pv), &[("app", "db")]),
            )
            .await
            .expect("claim");
        support::objects::attach(&client, &pv, node).await;
    }
    // TCG: a freeze, a status round trip through the serial bridge and the group snapshot call
    // take up to seconds each, not milliseconds; 20 s also bounds the hold of a killed controller.
    create(
        &env.api::<ConsistencyGroup>(),
        json!({"metadata": {"name": "g"},
               "spec": {"selector": {"matchLabels": {"app": "db"}}, "freezeTimeoutSeconds": 20}}),
    )
    .await;

    create(
        &Api::<k8s_openapi::api::storage::v1::StorageClass>::all(client.clone()),
        json!({"metadata": {"name": tandem::api::DEFAULT_RESTORE_STORAGE_CLASS},
               "provisioner": tandem::api::RESTORE_PROVISIONER, "volumeBindingMode": "Immediate"}),
    )
    .await;
    let pvs: Vec<(String, &str)> = [("e1", "n1"), ("e2", "n1"), ("e3", "n2")]
        .iter()
        .map(|(image, node)| (format!("{ns}-{image}"), *node))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let detacher = tokio::spawn(play_attach_detach(
        env.api::<GroupRestore>(),
        client.clone(),
        pvs,
        stop.clone(),
    ));

    let server = plane.server.trim_start_matches("https://").to_string();
    let script = repo_root().join("hack/rbd-qemu/run.sh");
    let kubeconfig = plane.kubeconfig.clone();
    let namespace = ns.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new("bash")
            .arg(script)
            .env("TANDEM_BIN", env!("CARGO_BIN_EXE_tandem"))
            .env("E2E_KUBECONFIG", kubeconfig)
            .env("E2E_API", server)
            .env("E2E_NAMESPACE", namespace)
            .env("CEPH_ADMIN_KEY", key)
            .output()
            .expect("run hack/rbd-qemu/run.sh")
    })
    .await
    .expect("guest");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let detached = detacher.await.expect("the attach/detach player");
    let console = String::from_utf8_lossy(&output.stdout).to_string();
    println!("{console}");
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the RBD guest failed (console above)"
    );
    for check in [
        "e2e-port",
        "e2e-images",
        "e2e-ready",
        "e2e-central",
        "e2e-consistency",
        "e2e-map-snapshots",
        "e2e-deleted",
        "e2e-exclusive-failed",
        "e2e-nothing-frozen",
        "e2e-nothing-cut",
        "e2e-held",
        "e2e-thawed-on-own-clock",
        "e2e-killed-failed",
        "e2e-killed-nothing-cut",
        "e2e-restore-new-claims",
        "e2e-restored-members",
        "e2e-restore-in-place",
        "e2e-remount",
    ] {
        assert!(
            console.contains(&format!("CHECK {check} PASS")),
            "the guest did not pass {check}"
        );
    }
    for image in ["e1", "e2", "e3"] {
        for what in ["snapshot", "restored", "in-place"] {
            for check in ["data", "no-post-thaw"] {
                assert!(
                    console.contains(&format!("CHECK {check}-e2e-{what}-{image} PASS")),
                    "{check} of {image} in the {what}"
                );
            }
        }
    }
    assert!(
        detached,
        "the in-place restore waited for the detach, and the volumes were attached again"
    );

    // What the API server kept: s1 deleted with its finalizer, s2 Failed with every node aborted.
    let snapshots: Api<GroupSnapshot> = env.api();
    assert!(snapshots.get_opt("s1").await.expect("get").is_none());
    let s2 = snapshots.get("s2").await.expect("s2");
    let status = s2.status.expect("status");
    assert_eq!(status.phase, GroupSnapshotPhase::Failed);
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("exclusive lock")),
        "{:?}",
        status.message
    );
    // s3: its controller killed while both nodes held: Failed, its RBD snapshot never taken.
    let s3 = snapshots
        .get("s3")
        .await
        .expect("s3")
        .status
        .expect("status");
    assert_eq!(s3.phase, GroupSnapshotPhase::Failed);
    assert_ne!(
        s3.central.map(|c| c.phase),
        Some(tandem::api::CentralPhase::Taken)
    );
    let nodes: Api<NodeSnapshot> = env.api();
    for node in nodes.list(&Default::default()).await.expect("list").items {
        if node.spec.group_snapshot == "s2" {
            assert_eq!(
                node.status.map(|s| s.phase),
                Some(NodePhase::Aborted),
                "{}",
                node.spec.node_name
            );
        }
    }
}
