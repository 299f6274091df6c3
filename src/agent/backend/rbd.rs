//! RBD members: frozen here, cut centrally. A krbd image's snapshot is one RBD group snapshot in
//! the Ceph cluster over every member of the group, taken by the controller (which alone holds
//! the cluster's credentials) while every node holds its freeze. The agent plans no snapshot of
//! its own for them: its "snapshot" is the image's identity, reported so the controller can check
//! that the node froze the very image the PersistentVolume names, and nothing is made or deleted
//! on the node.

use super::{BackendError, BackendKind, SnapshotHandle, SnapshotPlan, SnapshotSource};
use crate::agent::discovery::{DeviceKind, ResolvedVolume};

/// Plans a centrally cut member: the device must be a krbd mapping of an image (not of one of its
/// snapshots). Anything else is refused, never frozen without a snapshot.
pub fn plan(volume: &ResolvedVolume, owner: &str) -> Result<SnapshotPlan, BackendError> {
    let DeviceKind::Rbd(image) = &volume.kind else {
        return Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: "the volume is to be cut centrally (an RBD group snapshot), but its device is not a krbd-mapped RBD image".into(),
        });
    };
    if let Some(snapshot) = &image.snapshot {
        return Err(BackendError::Unsupported {
            device: volume.device.clone(),
            why: format!(
                "{image} is mapped at its snapshot {snapshot} (read-only), not at the image itself"
            ),
        });
    }
    let handle = SnapshotHandle::RbdGroup {
        cluster_fsid: image.cluster_fsid.clone(),
        pool: image.pool.clone(),
        namespace: image.pool_ns.clone(),
        image: image.name.clone(),
        image_id: image.image_id.clone(),
        owner: owner.into(),
    };
    Ok(SnapshotPlan {
        backend: BackendKind::RbdGroup,
        source: SnapshotSource::RbdImage {
            device: volume.device.clone(),
        },
        handle,
        owner: owner.into(),
    })
}
