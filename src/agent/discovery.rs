//! Finding what is under a volume, from the node itself: /proc/self/mountinfo for the mount and its
//! filesystem, /sys/dev/block for what the block device is (loop over an image file, an LVM logical
//! volume, anything else). Nothing is guessed from names.

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// What went wrong while looking at the node.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("malformed mountinfo line {line:?}")]
    Mountinfo { line: String },
    #[error("{path} does not exist on this node")]
    Missing { path: PathBuf },
    #[error("{path} is not the mount of a volume (it is inside the mount at {mount_point})")]
    NotAMount { path: PathBuf, mount_point: PathBuf },
    #[error("no mount in /proc/self/mountinfo has id {mount_id} (for {path})")]
    UnknownMount { path: PathBuf, mount_id: u64 },
    #[error("{path} is neither a directory nor a block device")]
    NotAVolume { path: PathBuf },
}

/// A device number split into major and minor, as mountinfo and sysfs print it.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct DevId {
    pub major: u32,
    pub minor: u32,
}

impl DevId {
    /// From a `st_dev`/`st_rdev` value.
    pub fn from_raw(dev: u64) -> Self {
        DevId {
            major: rustix::fs::major(dev),
            minor: rustix::fs::minor(dev),
        }
    }
}

impl std::fmt::Display for DevId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub mount_id: u64,
    pub parent_id: u64,
    /// The superblock's device number (anonymous, major 0, on btrfs).
    pub dev: DevId,
    /// The directory of the filesystem this mount shows (a bind mount's subdirectory, a btrfs subvolume).
    pub root: String,
    pub mount_point: PathBuf,
    pub options: String,
    pub fs_type: String,
    /// The mount source: the block device for disk filesystems.
    pub source: String,
    pub super_options: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011`, `\012`, `\134`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') as u32 * 64
                + (bytes[i + 2] - b'0') as u32 * 8
                + (bytes[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses the text of a mountinfo file (see proc(5)).
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>, DiscoveryError> {
    let mut mounts = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let bad = || DiscoveryError::Mountinfo {
            line: line.to_string(),
        };
        let fields: Vec<&str> = line.split(' ').collect();
        // Optional fields (shared:N, master:N, ...) sit between the options and the "-" separator.
        let sep = fields.iter().position(|f| *f == "-").ok_or_else(bad)?;
        if sep < 6 || fields.len() < sep + 3 {
            return Err(bad());
        }
        let (major, minor) = fields[2].split_once(':').ok_or_else(bad)?;
        mounts.push(MountInfo {
            mount_id: fields[0].parse().map_err(|_| bad())?,
            parent_id: fields[1].parse().map_err(|_| bad())?,
            dev: DevId {
                major: major.parse().map_err(|_| bad())?,
                minor: minor.parse().map_err(|_| bad())?,
            },
            root: unescape(fields[3]),
            mount_point: PathBuf::from(unescape(fields[4])),
            options: fields[5].to_string(),
            fs_type: fields[sep + 1].to_string(),
            source: unescape(fields[sep + 2]),
            super_options: fields.get(sep + 3).copied().unwrap_or("").to_string(),
        });
    }
    Ok(mounts)
}

/// Reads the mount table of this process's mount namespace.
pub fn read_mountinfo() -> Result<Vec<MountInfo>, DiscoveryError> {
    let path = Path::new("/proc/self/mountinfo");
    let text = fs::read_to_string(path).map_err(|source| DiscoveryError::Read {
        path: path.into(),
        source,
    })?;
    parse_mountinfo(&text)
}

/// The mount a path lives on, by the kernel's mount id (statx STATX_MNT_ID), so bind mounts and
/// nested mounts are told apart without comparing strings.
pub fn mount_of<'m>(path: &Path, mounts: &'m [MountInfo]) -> Result<&'m MountInfo, DiscoveryError> {
    let stx = rustix::fs::statx(
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::MNT_ID,
    )
    .map_err(|e| DiscoveryError::Read {
        path: path.into(),
        source: e.into(),
    })?;
    // The last mount with that id wins: ids are unique, but be exact anyway.
    mounts
        .iter()
        .rev()
        .find(|m| m.mount_id == stx.stx_mnt_id)
        .ok_or(DiscoveryError::UnknownMount {
            path: path.into(),
            mount_id: stx.stx_mnt_id,
        })
}

/// What a block device is, read from /sys/dev/block/MAJ:MIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceKind {
    /// A loop device over a file (the file may be on a reflink-capable pool filesystem).
    Loop { backing_file: PathBuf },
    /// A device-mapper device that LVM made (its dm uuid starts with `LVM-`).
    LvmVolume {
        vg: String,
        lv: String,
        dm_name: String,
    },
    /// A device-mapper device that is not LVM's.
    OtherDeviceMapper { dm_name: String },
    /// A Ceph RBD image mapped by the kernel (krbd, `/dev/rbdN`).
    Rbd(RbdImage),
    /// Anything else (a disk, a partition, a loop device without a file).
    Other,
}

/// Which RBD image a krbd device maps, from its sysfs directory (`/sys/bus/rbd/devices/<id>`). Only
/// these attributes are read: `config_info`, which carries the mapping's monitors and key, never.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RbdImage {
    pub cluster_fsid: String,
    pub pool: String,
    /// The RADOS namespace (empty: the pool's default).
    pub pool_ns: String,
    pub name: String,
    /// The image's id: stable where the name can be renamed.
    pub image_id: String,
    /// The mapped snapshot, when a snapshot (read-only) rather than the image is mapped.
    pub snapshot: Option<String>,
}

impl std::fmt::Display for RbdImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ns = if self.pool_ns.is_empty() {
            String::new()
        } else {
            format!("{}/", self.pool_ns)
        };
        write!(
            f,
            "RBD image {}/{ns}{} (id {}, cluster {})",
            self.pool, self.name, self.image_id, self.cluster_fsid
        )
    }
}

/// The RBD image behind a krbd device's `device` directory, if it is one.
fn rbd_image(device: &Path) -> Option<RbdImage> {
    let read = |name: &str| read_trimmed(&device.join(name));
    let snapshot = read("current_snap").filter(|s| !s.is_empty() && s != "-");
    Some(RbdImage {
        pool: read("pool")?,
        name: read("name")?,
        image_id: read("image_id")?,
        cluster_fsid: read("cluster_fsid").unwrap_or_default(),
        pool_ns: read("pool_ns").unwrap_or_default(),
        snapshot,
    })
}

/// Splits a device-mapper name that LVM made (`vg-lv`, with `-` inside names doubled) into VG and LV.
pub fn split_lvm_dm_name(dm_name: &str) -> Option<(String, String)> {
    let chars: Vec<char> = dm_name.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '-' {
            if chars.get(i + 1) == Some(&'-') {
                i += 2;
                continue;
            }
            let vg: String = chars[..i].iter().collect();
            let lv: String = chars[i + 1..].iter().collect();
            if vg.is_empty() || lv.is_empty() {
                return None;
            }
            return Some((vg.replace("--", "-"), lv.replace("--", "-")));
        }
        i += 1;
    }
    None
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path)
        .ok()
        .map(|s| s.trim_end_matches('\n').to_string())
}

/// Classifies a block device by its sysfs entry under `sysfs_block` (normally /sys/dev/block).
pub fn classify_device(dev: DevId, sysfs_block: &Path) -> DeviceKind {
    let dir = sysfs_block.join(dev.to_string());
    if let Some(file) = read_trimmed(&dir.join("loop/backing_file"))
        && !file.is_empty()
    {
        // The kernel appends " (deleted)" when the image was unlinked; keep it visible.
        return DeviceKind::Loop {
            backing_file: PathBuf::from(file),
        };
    }
    if let Some(dm_name) = read_trimmed(&dir.join("dm/name")) {
        let uuid = read_trimmed(&dir.join("dm/uuid")).unwrap_or_default();
        // LVM's dm uuids are "LVM-<vg uuid><lv uuid>" (snapshot internals add a suffix like "-cow").
        if uuid.starts_with("LVM-")
            && !uuid[4..].contains('-')
            && let Some((vg, lv)) = split_lvm_dm_name(&dm_name)
        {
            return DeviceKind::LvmVolume { vg, lv, dm_name };
        }
        return DeviceKind::OtherDeviceMapper { dm_name };
    }
    // krbd: /sys/dev/block/<major:minor>/device is /sys/devices/rbd/<id>.
    if let Some(image) = rbd_image(&dir.join("device")) {
        return DeviceKind::Rbd(image);
    }
    DeviceKind::Other
}

/// A volume as found on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVolume {
    /// The path the volume was asked for (a mount point, or a block device node).
    pub path: PathBuf,
    /// The mount, if the volume is a filesystem (None for a block-mode volume).
    pub mount: Option<MountInfo>,
    /// The block device node (mount source, or the path itself in block mode).
    pub device: PathBuf,
    /// The block device's number.
    pub block_dev: DevId,
    /// What the block device is.
    pub kind: DeviceKind,
}

impl ResolvedVolume {
    /// The filesystem type, if this is a mounted filesystem.
    pub fn fs_type(&self) -> Option<&str> {
        self.mount.as_ref().map(|m| m.fs_type.as_str())
    }
}

/// Resolves a volume's path: the mount point of its filesystem (it must be the root of a mount,
/// not a directory inside one) or, in block mode, a block device node.
pub fn resolve_volume(
    path: &Path,
    mounts: &[MountInfo],
    sysfs_block: &Path,
) -> Result<ResolvedVolume, DiscoveryError> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DiscoveryError::Missing { path: path.into() },
        _ => DiscoveryError::Read {
            path: path.into(),
            source: e,
        },
    })?;
    if meta.file_type().is_block_device() {
        let block_dev = DevId::from_raw(meta.rdev());
        return Ok(ResolvedVolume {
            path: path.into(),
            mount: None,
            device: path.into(),
            block_dev,
            kind: classify_device(block_dev, sysfs_block),
        });
    }
    if !meta.is_dir() {
        return Err(DiscoveryError::NotAVolume { path: path.into() });
    }
    let canonical = fs::canonicalize(path).map_err(|source| DiscoveryError::Read {
        path: path.into(),
        source,
    })?;
    let mount = mount_of(&canonical, mounts)?.clone();
    if mount.mount_point != canonical {
        return Err(DiscoveryError::NotAMount {
            path: path.into(),
            mount_point: mount.mount_point.clone(),
        });
    }
    // On btrfs st_dev and the mountinfo number are anonymous: the device is the mount source.
    let device = PathBuf::from(&mount.source);
    let block_dev = match fs::metadata(&device) {
        Ok(m) if m.file_type().is_block_device() => DevId::from_raw(m.rdev()),
        _ => mount.dev,
    };
    let kind = if block_dev.major == 0 {
        DeviceKind::Other
    } else {
        classify_device(block_dev, sysfs_block)
    };
    Ok(ResolvedVolume {
        path: path.into(),
        mount: Some(mount),
        device,
        block_dev,
        kind,
    })
}

/// Where the kubelet mounts a CSI volume for the node (NodeStageVolume): the global mount.
pub fn csi_global_mount(kubelet_dir: &Path, driver: &str, volume_handle: &str) -> PathBuf {
    let digest = Sha256::digest(volume_handle.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    kubelet_dir
        .join("plugins/kubernetes.io/csi")
        .join(driver)
        .join(hex)
        .join("globalmount")
}

/// The per-pod mounts of a CSI persistent volume (NodePublishVolume): `pods/*/volumes/kubernetes.io~csi/<pv>/mount`.
pub fn csi_pod_mounts(kubelet_dir: &Path, pv_name: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(pods) = fs::read_dir(kubelet_dir.join("pods")) else {
        return found;
    };
    for pod in pods.flatten() {
        let candidate = pod
            .path()
            .join("volumes/kubernetes.io~csi")
            .join(pv_name)
            .join("mount");
        if candidate.is_dir() {
            found.push(candidate);
        }
    }
    found.sort();
    found
}

/// The superblock device of the filesystem holding `path` (to compare with a freeze target).
pub fn superblock_of(path: &Path, mounts: &[MountInfo]) -> Result<DevId, DiscoveryError> {
    Ok(mount_of(path, mounts)?.dev)
}

/// The PersistentVolume annotation by which an administrator lets tandem freeze and snapshot a
/// filesystem that other mounts (other volumes) share, with the value [`SHARED_FILESYSTEM_ALLOW`].
/// PersistentVolumes are cluster-scoped, so a tenant cannot set it.
pub const SHARED_FILESYSTEM_ANNOTATION: &str = "tandem.dev/shared-filesystem";
/// The value of [`SHARED_FILESYSTEM_ANNOTATION`] that opts in.
pub const SHARED_FILESYSTEM_ALLOW: &str = "allow";

/// Whether a PersistentVolume's annotations opt in to a shared filesystem.
pub fn allows_shared_filesystem(annotations: &std::collections::BTreeMap<String, String>) -> bool {
    annotations
        .get(SHARED_FILESYSTEM_ANNOTATION)
        .is_some_and(|v| v == SHARED_FILESYSTEM_ALLOW)
}

/// Where the node's own directories are, as the agent sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeLayout {
    /// Where the host's `/` is visible to the agent: `/` when the agent runs on the host, the
    /// chart's read-only hostPath (`/host`) in the DaemonSet.
    pub host_root: PathBuf,
    /// The kubelet's root directory, as a host path.
    pub kubelet_dir: PathBuf,
}

impl NodeLayout {
    /// A mount point as a host path: the agent sees the host's mounts both at their own paths
    /// (its hostPath mounts) and under `host_root`.
    fn host_path<'p>(&self, mount_point: &'p Path) -> std::borrow::Cow<'p, Path> {
        if self.host_root != Path::new("/")
            && let Ok(rest) = mount_point.strip_prefix(&self.host_root)
        {
            return Path::new("/").join(rest).into();
        }
        mount_point.into()
    }

    /// What the kubelet made at a host path, if it is one of its volume mounts.
    fn kubelet_mount<'p>(&self, host_path: &'p Path) -> Option<KubeletMount<'p>> {
        let rest = host_path.strip_prefix(&self.kubelet_dir).ok()?;
        let parts: Vec<&str> = rest.iter().filter_map(|c| c.to_str()).collect();
        Some(match parts.as_slice() {
            ["pods", _, "volume-subpaths", ..] => KubeletMount::SubPath,
            ["pods", _, "volumes", plugin, name, ..] => KubeletMount::PodVolume { plugin, name },
            _ => KubeletMount::Other,
        })
    }
}

/// A mount the kubelet makes for pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KubeletMount<'p> {
    /// `pods/<uid>/volume-subpaths/<volume>/<container>/<n>`: a `subPath` of a pod's volume.
    SubPath,
    /// `pods/<uid>/volumes/<plugin>/<name>`: a pod's volume; for persistent volumes `name` is the
    /// PersistentVolume's name.
    PodVolume { plugin: &'p str, name: &'p str },
    /// Anything else under the kubelet's directory (CSI staging mounts, plugin folders).
    Other,
}

/// The volume plugins whose pod mount directories are named after the PersistentVolume.
const PV_NAMED_PLUGINS: [&str; 2] = ["kubernetes.io~local-volume", "kubernetes.io~csi"];

/// Why a filesystem volume is not a filesystem of its own: freezing it would freeze, and
/// snapshotting it would copy, data that other mounts (other tenants' volumes) show.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Sharing {
    #[error("the mount shows the directory {root} of its filesystem, not the whole filesystem")]
    SubdirectoryBind { root: String },
    #[error(
        "the mount shows the directory {root} inside the btrfs subvolume {subvolume}, not the whole subvolume"
    )]
    InsideSubvolume { root: String, subvolume: String },
    #[error("{} also shows the directory {root} of the same filesystem", mount_point.display())]
    OtherView { mount_point: PathBuf, root: String },
    #[error(
        "the kubelet mounted the same filesystem at {} for the PersistentVolume {persistent_volume}",
        mount_point.display()
    )]
    OtherVolume {
        persistent_volume: String,
        mount_point: PathBuf,
    },
}

/// What a mount of a filesystem is a view of: the superblock, and on btrfs the subvolume (a
/// btrfs snapshot copies one subvolume, not the superblock).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Unit<'m> {
    dev: DevId,
    subvolume: Option<(&'m str, &'m str)>,
}

impl<'m> Unit<'m> {
    fn of(mount: &'m MountInfo) -> Self {
        let subvolume = (mount.fs_type == "btrfs")
            .then(|| {
                let option = |key: &str| {
                    mount
                        .super_options
                        .split(',')
                        .find_map(|o| o.strip_prefix(key))
                };
                option("subvolid=").zip(option("subvol="))
            })
            .flatten();
        Unit {
            dev: mount.dev,
            subvolume,
        }
    }

    /// The directory of the filesystem a mount must show to be the whole unit.
    fn root(&self) -> &'m str {
        self.subvolume.map_or("/", |(_, path)| path)
    }
}

/// Whether `path` is `dir` or below it, comparing whole components.
fn is_within(path: &str, dir: &str) -> bool {
    Path::new(path).starts_with(dir)
}

/// Decides whether the filesystem mounted at `volume` is dedicated to the PersistentVolume
/// `persistent_volume`, from the mount table alone.
///
/// A volume must show the whole filesystem (mountinfo root `/`; on btrfs the root of the mounted
/// subvolume). No other mount may show another part of it, except the kubelet's `subPath` mounts
/// of this volume. Mounts with the same root show exactly this volume's data (the kubelet's own
/// binds of it into pods, the agent's view through the host root) and are fine, unless the
/// kubelet made one for another PersistentVolume.
pub fn sharing(
    volume: &MountInfo,
    mounts: &[MountInfo],
    layout: &NodeLayout,
    persistent_volume: &str,
) -> Option<Sharing> {
    let unit = Unit::of(volume);
    if volume.root != unit.root() {
        return Some(match unit.subvolume {
            Some((_, subvolume)) => Sharing::InsideSubvolume {
                root: volume.root.clone(),
                subvolume: subvolume.to_string(),
            },
            None => Sharing::SubdirectoryBind {
                root: volume.root.clone(),
            },
        });
    }
    for other in mounts {
        if other.mount_id == volume.mount_id || Unit::of(other) != unit {
            continue;
        }
        let host_path = layout.host_path(&other.mount_point);
        let made_by_kubelet = layout.kubelet_mount(&host_path);
        if other.root == volume.root {
            if let Some(KubeletMount::PodVolume { plugin, name }) = made_by_kubelet
                && PV_NAMED_PLUGINS.contains(&plugin)
                && name != persistent_volume
            {
                return Some(Sharing::OtherVolume {
                    persistent_volume: name.to_string(),
                    mount_point: other.mount_point.clone(),
                });
            }
            continue;
        }
        let sub_path_of_this_volume =
            made_by_kubelet == Some(KubeletMount::SubPath) && is_within(&other.root, &volume.root);
        if !sub_path_of_this_volume {
            return Some(Sharing::OtherView {
                mount_point: other.mount_point.clone(),
                root: other.root.clone(),
            });
        }
    }
    None
}

/// The mount whose mount point is the deepest ancestor of `path` (the last one listed if mounts
/// are stacked): the mount `path` lives on, found from the table alone.
pub fn mount_containing<'m>(path: &Path, mounts: &'m [MountInfo]) -> Option<&'m MountInfo> {
    mounts
        .iter()
        .enumerate()
        .filter(|(_, m)| path.starts_with(&m.mount_point))
        .max_by_key(|(i, m)| (m.mount_point.components().count(), *i))
        .map(|(_, m)| m)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded on the CI machine (storage research, 04b-detect) and on a kubelet node.
    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
43 27 7:1 / /tmp/s4b-vol1 rw,relatime shared:30 - ext4 /dev/loop1 rw
44 27 7:1 /data /tmp/s4b\\040bind rw,relatime shared:30 - ext4 /dev/loop1[/data] rw
45 27 0:39 /pv1 /tmp/s4b-pv1 rw,relatime - btrfs /dev/loop2 rw,space_cache=v2,subvolid=256,subvol=/pv1
46 27 253:4 / /var/lib/kubelet/pods/5e1/volumes/kubernetes.io~csi/pvc-1/mount rw,relatime master:12 - xfs /dev/mapper/vg0-data--1 rw,attr2
";

    #[test]
    fn parses_recorded_mountinfo() {
        let m = parse_mountinfo(SAMPLE).unwrap();
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].mount_point, PathBuf::from("/"));
        assert_eq!(m[0].fs_type, "ext4");
        assert_eq!(m[1].dev, DevId { major: 7, minor: 1 });
        assert_eq!(m[1].source, "/dev/loop1");
        assert_eq!(m[2].root, "/data");
        assert_eq!(m[2].mount_point, PathBuf::from("/tmp/s4b bind"));
        assert_eq!(m[3].fs_type, "btrfs");
        assert_eq!(m[3].root, "/pv1");
        assert!(m[3].super_options.contains("subvolid=256"));
        assert_eq!(m[4].fs_type, "xfs");
        assert_eq!(m[4].source, "/dev/mapper/vg0-data--1");
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_mountinfo("1 2 3").is_err());
        assert!(parse_mountinfo("a 1 7:1 / /x rw - ext4 /dev/loop1 rw").is_err());
    }

    #[test]
    fn splits_lvm_names() {
        assert_eq!(
            split_lvm_dm_name("vg0-vol1"),
            Some(("vg0".into(), "vol1".into()))
        );
        assert_eq!(
            split_lvm_dm_name("my--vg-data--1"),
            Some(("my-vg".into(), "data-1".into()))
        );
        assert_eq!(split_lvm_dm_name("novg"), None);
    }

    #[test]
    fn classifies_recorded_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let loop_dir = dir.path().join("7:3/loop");
        fs::create_dir_all(&loop_dir).unwrap();
        fs::write(loop_dir.join("backing_file"), "/pool/vol 1.img\n").unwrap();
        let dm = dir.path().join("253:4/dm");
        fs::create_dir_all(&dm).unwrap();
        fs::write(dm.join("name"), "vg0-data--1\n").unwrap();
        fs::write(
            dm.join("uuid"),
            "LVM-AbCdEfGhIjKlMnOpQrStUvWxYz012345AbCdEfGhIjKlMnOpQrStUvWxYz012345\n",
        )
        .unwrap();
        let cow = dir.path().join("253:5/dm");
        fs::create_dir_all(&cow).unwrap();
        fs::write(cow.join("name"), "vg0-snap-cow\n").unwrap();
        fs::write(cow.join("uuid"), "LVM-abc-cow\n").unwrap();
        let crypt = dir.path().join("253:6/dm");
        fs::create_dir_all(&crypt).unwrap();
        fs::write(crypt.join("name"), "luks-1\n").unwrap();
        fs::write(crypt.join("uuid"), "CRYPT-LUKS2-xyz\n").unwrap();

        assert_eq!(
            classify_device(DevId { major: 7, minor: 3 }, dir.path()),
            DeviceKind::Loop {
                backing_file: "/pool/vol 1.img".into()
            }
        );
        assert_eq!(
            classify_device(
                DevId {
                    major: 253,
                    minor: 4
                },
                dir.path()
            ),
            DeviceKind::LvmVolume {
                vg: "vg0".into(),
                lv: "data-1".into(),
                dm_name: "vg0-data--1".into()
            }
        );
        assert!(matches!(
            classify_device(
                DevId {
                    major: 253,
                    minor: 5
                },
                dir.path()
            ),
            DeviceKind::OtherDeviceMapper { .. }
        ));
        assert!(matches!(
            classify_device(
                DevId {
                    major: 253,
                    minor: 6
                },
                dir.path()
            ),
            DeviceKind::OtherDeviceMapper { .. }
        ));
        assert_eq!(
            classify_device(DevId { major: 8, minor: 0 }, dir.path()),
            DeviceKind::Other
        );
    }

    #[test]
    fn classifies_krbd_images_without_reading_their_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let rbd = |dev: &str, attrs: &[(&str, &str)]| {
            let d = dir.path().join(dev).join("device");
            fs::create_dir_all(&d).unwrap();
            for (k, v) in attrs {
                fs::write(d.join(k), format!("{v}\n")).unwrap();
            }
            // What krbd keeps beside them: the monitors and the key of the mapping.
            fs::write(
                d.join("config_info"),
                "127.0.0.1:6789 name=admin,secret=AQBsecretsecret== rbd img -\n",
            )
            .unwrap();
        };
        let head = [
            ("cluster_fsid", "8f9bb291-6da3-4b95-829e-ff4e7916f8e9"),
            ("pool", "rbd"),
            ("pool_ns", ""),
            ("name", "csi-vol-1"),
            ("image_id", "1013b0f9e1df"),
            ("current_snap", "-"),
        ];
        rbd("252:0", &head);
        let mut in_ns = head;
        in_ns[2] = ("pool_ns", "tenant-a");
        rbd("252:16", &in_ns);
        let mut snap = head;
        snap[5] = ("current_snap", ".group.1_10a3_1b");
        rbd("252:32", &snap);
        // A device directory without an image's attributes (a SCSI disk's, say).
        fs::create_dir_all(dir.path().join("8:16/device")).unwrap();
        fs::write(dir.path().join("8:16/device/model"), "QEMU HARDDISK\n").unwrap();

        let at = |minor| classify_device(DevId { major: 252, minor }, dir.path());
        let DeviceKind::Rbd(image) = at(0) else {
            panic!("not RBD: {:?}", at(0));
        };
        assert_eq!(
            image,
            RbdImage {
                cluster_fsid: "8f9bb291-6da3-4b95-829e-ff4e7916f8e9".into(),
                pool: "rbd".into(),
                pool_ns: String::new(),
                name: "csi-vol-1".into(),
                image_id: "1013b0f9e1df".into(),
                snapshot: None,
            }
        );
        assert_eq!(
            image.to_string(),
            "RBD image rbd/csi-vol-1 (id 1013b0f9e1df, cluster 8f9bb291-6da3-4b95-829e-ff4e7916f8e9)"
        );
        assert!(
            matches!(at(16), DeviceKind::Rbd(i) if i.to_string().contains("rbd/tenant-a/csi-vol-1"))
        );
        assert!(
            matches!(at(32), DeviceKind::Rbd(i) if i.snapshot.as_deref() == Some(".group.1_10a3_1b"))
        );
        for minor in [0, 16, 32] {
            assert!(!format!("{:?}", at(minor)).contains("secret"));
        }
        assert_eq!(
            classify_device(
                DevId {
                    major: 8,
                    minor: 16
                },
                dir.path()
            ),
            DeviceKind::Other
        );
    }

    #[test]
    fn csi_paths_follow_the_kubelet_layout() {
        let p = csi_global_mount(Path::new("/var/lib/kubelet"), "ebs.csi.aws.com", "vol-1");
        let s = p.to_string_lossy();
        assert!(s.starts_with("/var/lib/kubelet/plugins/kubernetes.io/csi/ebs.csi.aws.com/"));
        assert!(s.ends_with("/globalmount"));
        // sha256("vol-1"), as the kubelet names the staging directory
        assert!(s.contains("/d2e8363faaac7ae76def3b14091d8eb5755f6b92e9531627aeec833a8731cc49/"));
        let dir = tempfile::tempdir().unwrap();
        let m = dir
            .path()
            .join("pods/uid-1/volumes/kubernetes.io~csi/pv-a/mount");
        fs::create_dir_all(&m).unwrap();
        assert_eq!(csi_pod_mounts(dir.path(), "pv-a"), vec![m]);
        assert!(csi_pod_mounts(dir.path(), "pv-b").is_empty());
    }

    fn layout(host_root: &str) -> NodeLayout {
        NodeLayout {
            host_root: host_root.into(),
            kubelet_dir: "/var/lib/kubelet".into(),
        }
    }

    fn sharing_of(table: &str, host_root: &str, volume_at: &str, pv: &str) -> Option<Sharing> {
        let mounts = parse_mountinfo(table).unwrap();
        let volume = mounts
            .iter()
            .find(|m| m.mount_point == Path::new(volume_at))
            .unwrap_or_else(|| panic!("no mount at {volume_at}"));
        sharing(volume, &mounts, &layout(host_root), pv)
    }

    #[test]
    fn sharing_is_decided_from_the_mount_table() {
        let root = "1 0 254:0 / / rw - ext4 /dev/vda rw\n";
        let kubelet_pods = "/var/lib/kubelet/pods/5e1";
        let view = |mount_point: &str, root: &str| Sharing::OtherView {
            mount_point: mount_point.into(),
            root: root.into(),
        };
        let other_volume = |pv: &str, mount_point: String| Sharing::OtherVolume {
            persistent_volume: pv.into(),
            mount_point: mount_point.into(),
        };
        // (what, mountinfo, host root, the volume's mount point, its PV, the decision)
        type Case<'a> = (&'a str, String, &'a str, &'a str, &'a str, Option<Sharing>);
        #[rustfmt::skip]
        let cases: Vec<Case> = vec![
            ("a whole filesystem, mounted once",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1", None),
            ("a bind of a subdirectory (the shared-disk recipe)",
             format!("{root}40 1 7:1 / /mnt/disk-src rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 /vol1 /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1",
             Some(Sharing::SubdirectoryBind { root: "/vol1".into() })),
            ("the whole disk, while a subdirectory of it is bound elsewhere",
             format!("{root}40 1 7:1 / /mnt/disk-src rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 /vol1 /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disk-src", "pv-src", Some(view("/mnt/disks/vol1", "/vol1"))),
            ("the kubelet's bind of this local volume into a pod",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 / {kubelet_pods}/volumes/kubernetes.io~local-volume/pv-1 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1", None),
            ("the kubelet's bind of the same filesystem for another local volume",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 / {kubelet_pods}/volumes/kubernetes.io~local-volume/pv-2 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1",
             Some(other_volume("pv-2", format!("{kubelet_pods}/volumes/kubernetes.io~local-volume/pv-2")))),
            ("a CSI staging mount and its pod mount",
             format!("{root}40 1 253:4 / /var/lib/kubelet/plugins/kubernetes.io/csi/d/ab12/globalmount rw - xfs /dev/dm-4 rw\n\
                      41 1 253:4 / {kubelet_pods}/volumes/kubernetes.io~csi/pv-1/mount rw - xfs /dev/dm-4 rw\n"),
             "/", "/var/lib/kubelet/plugins/kubernetes.io/csi/d/ab12/globalmount", "pv-1", None),
            ("a CSI filesystem the kubelet also mounted for another volume",
             format!("{root}40 1 253:4 / /var/lib/kubelet/plugins/kubernetes.io/csi/d/ab12/globalmount rw - xfs /dev/dm-4 rw\n\
                      41 1 253:4 / {kubelet_pods}/volumes/kubernetes.io~csi/pv-2/mount rw - xfs /dev/dm-4 rw\n"),
             "/", "/var/lib/kubelet/plugins/kubernetes.io/csi/d/ab12/globalmount", "pv-1",
             Some(other_volume("pv-2", format!("{kubelet_pods}/volumes/kubernetes.io~csi/pv-2/mount")))),
            ("a CSI driver that binds subdirectories of one filesystem into pods",
             format!("{root}40 1 253:4 /pvc-a {kubelet_pods}/volumes/kubernetes.io~csi/pv-a/mount rw - xfs /dev/dm-4 rw\n"),
             "/", "/var/lib/kubelet/pods/5e1/volumes/kubernetes.io~csi/pv-a/mount", "pv-a",
             Some(Sharing::SubdirectoryBind { root: "/pvc-a".into() })),
            ("a kubelet subPath mount of this volume",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 /data {kubelet_pods}/volume-subpaths/pv-1/app/0 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1", None),
            ("a subPath-like folder outside the kubelet's directory",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      41 1 7:1 /data /srv/pods/5e1/volume-subpaths/pv-1/app/0 rw - ext4 /dev/loop1 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1", Some(view("/srv/pods/5e1/volume-subpaths/pv-1/app/0", "/data"))),
            ("another filesystem's subdirectory bind does not matter",
             format!("{root}40 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      41 1 7:2 /x /mnt/disks/vol2 rw - ext4 /dev/loop2 rw\n"),
             "/", "/mnt/disks/vol1", "pv-1", None),
            ("btrfs: a subvolume mounted at its root, beside the top level and another subvolume",
             format!("{root}45 1 0:39 /pv1 /mnt/pv1 rw - btrfs /dev/loop2 rw,space_cache=v2,subvolid=256,subvol=/pv1\n\
                      46 1 0:39 / /var/lib/tandem/btrfs/x rw - btrfs /dev/loop2 rw,space_cache=v2,subvolid=5,subvol=/\n\
                      47 1 0:39 /pv2 /mnt/pv2 rw - btrfs /dev/loop2 rw,space_cache=v2,subvolid=257,subvol=/pv2\n"),
             "/", "/mnt/pv1", "pv-1", None),
            ("btrfs: a directory inside a subvolume",
             format!("{root}45 1 0:39 /pv1/data /mnt/pv1 rw - btrfs /dev/loop2 rw,subvolid=256,subvol=/pv1\n"),
             "/", "/mnt/pv1", "pv-1",
             Some(Sharing::InsideSubvolume { root: "/pv1/data".into(), subvolume: "/pv1".into() })),
            ("btrfs: the subvolume is not dedicated (a directory of it is bound elsewhere)",
             format!("{root}45 1 0:39 /pv1 /mnt/pv1 rw - btrfs /dev/loop2 rw,subvolid=256,subvol=/pv1\n\
                      46 1 0:39 /pv1/b /mnt/other rw - btrfs /dev/loop2 rw,subvolid=256,subvol=/pv1\n"),
             "/", "/mnt/pv1", "pv-1", Some(view("/mnt/other", "/pv1/b"))),
            ("btrfs: a nested subvolume mounted elsewhere is not part of this one's snapshot",
             format!("{root}45 1 0:39 /pv1 /mnt/pv1 rw - btrfs /dev/loop2 rw,subvolid=256,subvol=/pv1\n\
                      46 1 0:39 /pv1/nested /mnt/nested rw - btrfs /dev/loop2 rw,subvolid=300,subvol=/pv1/nested\n"),
             "/", "/mnt/pv1", "pv-1", None),
            ("btrfs: the top level, while a subdirectory of it is bound elsewhere",
             format!("{root}45 1 0:39 / /mnt/top rw - btrfs /dev/loop2 rw,subvolid=5,subvol=/\n\
                      46 1 0:39 /dir /mnt/other rw - btrfs /dev/loop2 rw,subvolid=5,subvol=/\n"),
             "/", "/mnt/top", "pv-top", Some(view("/mnt/other", "/dir"))),
            ("in the DaemonSet: the same volume through the agent's hostPath and through /host",
             format!("1 0 0:50 / / rw - overlay overlay rw\n\
                      2 1 254:0 / /host ro - ext4 /dev/vda rw\n\
                      3 1 254:0 /var/lib/kubelet /var/lib/kubelet rw - ext4 /dev/vda rw\n\
                      4 1 254:0 /mnt/disks /mnt/disks rw - ext4 /dev/vda rw\n\
                      5 4 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      6 2 7:1 / /host/mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      7 2 7:1 /data /host{kubelet_pods}/volume-subpaths/pv-1/app/0 rw - ext4 /dev/loop1 rw\n\
                      8 3 7:1 /data {kubelet_pods}/volume-subpaths/pv-1/app/0 rw - ext4 /dev/loop1 rw\n\
                      9 2 7:1 / /host{kubelet_pods}/volumes/kubernetes.io~local-volume/pv-1 rw - ext4 /dev/loop1 rw\n"),
             "/host", "/mnt/disks/vol1", "pv-1", None),
            ("in the DaemonSet: another volume's pod mount, seen only through /host",
             format!("1 0 0:50 / / rw - overlay overlay rw\n\
                      2 1 254:0 / /host ro - ext4 /dev/vda rw\n\
                      5 1 7:1 / /mnt/disks/vol1 rw - ext4 /dev/loop1 rw\n\
                      9 2 7:1 / /host{kubelet_pods}/volumes/kubernetes.io~local-volume/pv-2 rw - ext4 /dev/loop1 rw\n"),
             "/host", "/mnt/disks/vol1", "pv-1",
             Some(other_volume("pv-2", format!("/host{kubelet_pods}/volumes/kubernetes.io~local-volume/pv-2")))),
            ("in the DaemonSet: the shared-disk source is seen only through /host",
             "1 0 0:50 / / rw - overlay overlay rw\n\
                      2 1 254:0 / /host ro - ext4 /dev/vda rw\n\
                      5 1 7:1 / /mnt/disk-src rw - ext4 /dev/loop1 rw\n\
                      6 2 7:1 /vol2 /host/mnt/disks/vol2 rw - ext4 /dev/loop1 rw\n".to_string(),
             "/host", "/mnt/disk-src", "pv-src", Some(view("/host/mnt/disks/vol2", "/vol2"))),
        ];
        for (name, table, host_root, volume_at, pv, expected) in cases {
            assert_eq!(
                sharing_of(&table, host_root, volume_at, pv),
                expected,
                "{name}"
            );
        }
    }

    #[test]
    fn finds_the_mount_a_path_lives_on_from_the_table() {
        let mounts = parse_mountinfo(
            "1 0 0:50 / / rw - overlay overlay rw\n\
             2 1 254:0 /var/lib/kubelet /var/lib/kubelet rw - ext4 /dev/vda rw\n\
             3 1 254:0 /var/lib/kubelet-old /var/lib/kubelet rw - ext4 /dev/vda rw\n\
             4 1 254:1 / /var/lib rw - ext4 /dev/vdb rw\n",
        )
        .unwrap();
        let at = |p: &str| mount_containing(Path::new(p), &mounts).map(|m| m.mount_id);
        assert_eq!(at("/var/lib/kubelet/pods"), Some(3), "the top of a stack");
        assert_eq!(at("/var/lib/kubeletx"), Some(4), "whole components only");
        assert_eq!(at("/etc"), Some(1));
    }

    #[test]
    fn only_the_allow_value_of_the_annotation_opts_in() {
        let with = |v: &str| {
            std::collections::BTreeMap::from([(SHARED_FILESYSTEM_ANNOTATION.to_string(), v.into())])
        };
        assert!(allows_shared_filesystem(&with("allow")));
        assert!(!allows_shared_filesystem(&with("true")));
        assert!(!allows_shared_filesystem(&Default::default()));
    }

    #[test]
    fn resolves_the_root_mount_and_refuses_subdirectories() {
        let mounts = read_mountinfo().unwrap();
        let root = resolve_volume(Path::new("/"), &mounts, Path::new("/sys/dev/block")).unwrap();
        assert_eq!(root.mount.as_ref().unwrap().mount_point, PathBuf::from("/"));
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        match resolve_volume(dir.path(), &mounts, Path::new("/sys/dev/block")) {
            Err(DiscoveryError::NotAMount { .. }) => {}
            other => panic!("expected NotAMount, got {other:?}"),
        }
        assert!(matches!(
            resolve_volume(
                Path::new("/nonexistent/x"),
                &mounts,
                Path::new("/sys/dev/block")
            ),
            Err(DiscoveryError::Missing { .. })
        ));
    }
}
