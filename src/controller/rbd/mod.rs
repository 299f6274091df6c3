//! The controller's in-process client for Ceph RBD consistency groups.
//!
//! librbd and librados are loaded at run time (`ffi`), so tandem builds and runs without Ceph and
//! only a controller that manages RBD volumes needs `librbd1` and `librados2` in its image. The
//! controller holds one long-lived [`Cluster`] per Ceph cluster, connected outside any freeze
//! window: a group snapshot is then a single mon/OSD round trip while the members are frozen.
//!
//! Every call blocks (run it through `tokio::task::spawn_blocking`) and opens, then closes, its
//! own pool context and image handles.

mod ffi;

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::fmt;
use std::ptr::{null, null_mut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ffi::{Api, RadosIoctxT, RadosT, RbdImageT};

/// A librbd call on one named object of a pool (`rbd_remove`, `rbd_group_create`, ...).
type NameCall = unsafe extern "C" fn(RadosIoctxT, *const c_char) -> c_int;

/// How to reach a Ceph cluster: what ceph-csi's secret and config map hold.
#[derive(Clone)]
pub struct ClusterConfig {
    /// The monitors, as Ceph's `mon_host` takes them (`10.0.0.1:6789,10.0.0.2:6789` or
    /// `[v2:10.0.0.1:3300,v1:10.0.0.1:6789]`).
    pub mon_host: String,
    /// The cephx user, without `client.`.
    pub user: String,
    /// The user's cephx secret (base64).
    pub key: String,
}

impl fmt::Debug for ClusterConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterConfig")
            .field("mon_host", &self.mon_host)
            .field("user", &self.user)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// A pool and a rados namespace in it (`""`: none). Groups, their snapshots and the images the
/// calls below take all live in it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolRef {
    pub pool: String,
    pub namespace: String,
}

impl PoolRef {
    pub fn new(pool: impl Into<String>, namespace: impl Into<String>) -> PoolRef {
        PoolRef {
            pool: pool.into(),
            namespace: namespace.into(),
        }
    }
}

impl fmt::Display for PoolRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.pool)
        } else {
            write!(f, "{}/{}", self.pool, self.namespace)
        }
    }
}

/// A member of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupImage {
    pub name: String,
    /// The image's pool.
    pub pool: String,
    pub pool_id: i64,
    pub state: GroupImageState,
}

/// Whether an image's membership is complete (an interrupted add or remove leaves `Incomplete`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupImageState {
    Attached,
    Incomplete,
}

/// A group snapshot's state: `Incomplete` is what an interrupted create (or remove) leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapState {
    Complete,
    Incomplete,
}

/// A group snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSnap {
    pub name: String,
    pub state: SnapState,
}

/// What [`Cluster::create_group_snap`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapCreated {
    Created,
    /// A complete snapshot of that name was there already: nothing was cut.
    AlreadyExisted,
}

/// What can go wrong. Each error names what it was about and carries librbd's errno text.
#[derive(Debug, thiserror::Error)]
pub enum RbdError {
    #[error(
        "cannot load {library} ({reason}); the controller image must carry librbd1 and librados2 \
         to manage Ceph RBD volumes"
    )]
    LibraryMissing {
        library: &'static str,
        reason: String,
    },
    #[error("the {what} {name:?} contains a NUL byte")]
    InvalidName { what: &'static str, name: String },
    #[error("cannot connect to the Ceph monitors {mon_host} as client.{user}: {message}")]
    Connect {
        mon_host: String,
        user: String,
        errno: i32,
        message: String,
    },
    #[error("the pool {pool} does not exist")]
    PoolNotFound { pool: String },
    #[error("the image {pool}/{image} does not exist")]
    ImageNotFound { pool: String, image: String },
    #[error("the image {pool}/{image} exists already")]
    ImageExists { pool: String, image: String },
    #[error("the group {pool}/{group} does not exist")]
    GroupNotFound { pool: String, group: String },
    #[error("the group snapshot {pool}/{group}@{snap} does not exist")]
    SnapshotNotFound {
        pool: String,
        group: String,
        snap: String,
    },
    #[error(
        "the image {image} is in the group {group} already; an image can be in one group only, \
         and tandem never moves one out of another group"
    )]
    ImageInOtherGroup { image: String, group: String },
    #[error(
        "the group snapshot {pool}/{group}@{snap} was refused ({message}): a member image is held \
         by an exclusive lock (mapped with `-o exclusive`, or a client holding an explicit \
         exclusive lock); the cut was not retried"
    )]
    ExclusiveLock {
        pool: String,
        group: String,
        snap: String,
        message: String,
    },
    #[error(
        "the group snapshot {pool}/{group}@{snap} was left incomplete by an earlier attempt and \
         has been removed; nothing was cut"
    )]
    IncompleteSnapshotRemoved {
        pool: String,
        group: String,
        snap: String,
    },
    #[error("{call} on {target} failed: {message}")]
    Call {
        call: &'static str,
        target: String,
        errno: i32,
        message: String,
    },
}

impl RbdError {
    /// The errno librados or librbd returned, if the error came from a call.
    pub fn errno(&self) -> Option<i32> {
        match self {
            RbdError::Connect { errno, .. } | RbdError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// `rc` (a negative errno) as a person reads it.
fn os_message(rc: i64) -> String {
    std::io::Error::from_raw_os_error(i32::try_from(-rc).unwrap_or(i32::MAX)).to_string()
}

fn call_error(call: &'static str, target: &str, rc: i64) -> RbdError {
    RbdError::Call {
        call,
        target: target.to_string(),
        errno: i32::try_from(-rc).unwrap_or(i32::MAX),
        message: os_message(rc),
    }
}

/// Runs one C call, logging its duration.
fn timed<T>(call: &'static str, target: &str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let result = f();
    tracing::debug!(
        call,
        target,
        ms = start.elapsed().as_secs_f64() * 1000.0,
        "librbd call"
    );
    result
}

fn c_string(what: &'static str, name: &str) -> Result<CString, RbdError> {
    CString::new(name).map_err(|_| RbdError::InvalidName {
        what,
        name: name.to_string(),
    })
}

/// A C string librbd allocated, copied (empty for NULL).
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn owned(ptr: *const c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's promise.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// The rados handle; shut down when the last user (cluster, pool context, image) is gone.
struct Handle {
    api: &'static Api,
    rados: RadosT,
}

// SAFETY: a connected `rados_t` may be used from any number of threads at once (librados is
// thread-safe for everything called here); pool contexts and images, which are not shared, are
// made per call.
unsafe impl Send for Handle {}
// SAFETY: as above.
unsafe impl Sync for Handle {}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by rados_create2; every ioctx and image holds an Arc to this, so none
        // is left.
        unsafe { (self.api.rados_shutdown)(self.rados) }
    }
}

/// A pool context (in a namespace).
struct IoCtx {
    handle: Arc<Handle>,
    io: RadosIoctxT,
    pool: PoolRef,
}

impl IoCtx {
    fn api(&self) -> &'static Api {
        self.handle.api
    }

    fn id(&self) -> i64 {
        // SAFETY: a live ioctx.
        unsafe { (self.api().rados_ioctx_get_id)(self.io) }
    }
}

impl Drop for IoCtx {
    fn drop(&mut self) {
        // SAFETY: created by rados_ioctx_create; the images opened on it are closed (they own
        // it and close first).
        unsafe { (self.api().rados_ioctx_destroy)(self.io) }
    }
}

/// An open image (closed on drop).
pub struct Image {
    image: RbdImageT,
    name: String,
    // Dropped after `image` is closed in `drop`.
    io: IoCtx,
}

// SAFETY: an image handle may be used from any thread (one at a time: `Image` is not Sync).
unsafe impl Send for Image {}

impl Drop for Image {
    fn drop(&mut self) {
        // SAFETY: opened by rbd_open; closed once. A failed close (it flushes) leaves nothing
        // to do but log.
        let rc = unsafe { (self.io.api().rbd_close)(self.image) };
        if rc < 0 {
            tracing::warn!(image = %self.target(), error = %os_message(rc.into()), "rbd_close failed");
        }
    }
}

impl Image {
    fn api(&self) -> &'static Api {
        self.io.api()
    }

    fn target(&self) -> String {
        format!("{}/{}", self.io.pool, self.name)
    }

    fn check(&self, call: &'static str, rc: c_int) -> Result<c_int, RbdError> {
        if rc < 0 {
            Err(call_error(call, &self.target(), rc.into()))
        } else {
            Ok(rc)
        }
    }

    /// Takes librbd's exclusive lock explicitly (`rbd_lock_acquire(EXCLUSIVE)`): until
    /// [`Image::unlock`] or drop no other client may write, nor snapshot the image.
    pub fn lock_exclusive(&self) -> Result<(), RbdError> {
        let rc = timed("rbd_lock_acquire", &self.target(), || {
            // SAFETY: a live image.
            unsafe { (self.api().rbd_lock_acquire)(self.image, ffi::RBD_LOCK_MODE_EXCLUSIVE) }
        });
        self.check("rbd_lock_acquire", rc).map(drop)
    }

    /// Gives up a lock taken with [`Image::lock_exclusive`].
    pub fn unlock(&self) -> Result<(), RbdError> {
        let rc = timed("rbd_lock_release", &self.target(), || {
            // SAFETY: a live image.
            unsafe { (self.api().rbd_lock_release)(self.image) }
        });
        self.check("rbd_lock_release", rc).map(drop)
    }

    /// The image's group: its pool id and name.
    fn group(&self) -> Result<Option<(i64, String)>, RbdError> {
        let mut info = ffi::RbdGroupInfo {
            name: null_mut(),
            pool: -1,
        };
        let size = size_of::<ffi::RbdGroupInfo>();
        let rc = timed("rbd_get_group", &self.target(), || {
            // SAFETY: a live image; `info` is the struct the size names.
            unsafe { (self.api().rbd_get_group)(self.image, &mut info, size) }
        });
        self.check("rbd_get_group", rc)?;
        // SAFETY: filled by librbd (NULL-or-string).
        let name = unsafe { owned(info.name) };
        let pool = info.pool;
        // SAFETY: what rbd_get_group filled, freed once.
        unsafe { (self.api().rbd_group_info_cleanup)(&mut info, size) };
        // Not in a group: pool -1 and an empty name.
        Ok((pool >= 0 && !name.is_empty()).then_some((pool, name)))
    }

    /// The id of the image's snapshot that belongs to the group snapshot `group@snap` of the
    /// pool `group_pool`. These snapshots live in the group namespace, and only their ids
    /// address them (their names, `.group.…`, are refused by name lookups).
    fn group_snap_id(
        &self,
        group_pool: i64,
        group: &str,
        snap: &str,
    ) -> Result<Option<u64>, RbdError> {
        for id in self.snap_ids()? {
            let mut kind: c_int = -1;
            // SAFETY: a live image.
            let rc = unsafe { (self.api().rbd_snap_get_namespace_type)(self.image, id, &mut kind) };
            self.check("rbd_snap_get_namespace_type", rc)?;
            if kind != ffi::RBD_SNAP_NAMESPACE_TYPE_GROUP {
                continue;
            }
            let mut ns = ffi::RbdSnapGroupNamespace {
                group_pool: -1,
                group_name: null_mut(),
                group_snap_name: null_mut(),
            };
            let size = size_of::<ffi::RbdSnapGroupNamespace>();
            // SAFETY: a live image; `ns` is the struct the size names.
            let rc =
                unsafe { (self.api().rbd_snap_get_group_namespace)(self.image, id, &mut ns, size) };
            self.check("rbd_snap_get_group_namespace", rc)?;
            // SAFETY: filled by librbd.
            let (name, snap_name) = unsafe { (owned(ns.group_name), owned(ns.group_snap_name)) };
            let pool = ns.group_pool;
            // SAFETY: what rbd_snap_get_group_namespace filled, freed once.
            unsafe { (self.api().rbd_snap_group_namespace_cleanup)(&mut ns, size) };
            if pool == group_pool && name == group && snap_name == snap {
                return Ok(Some(id));
            }
        }
        Ok(None)
    }

    /// The ids of every snapshot of the image, of every namespace (16.x's `rbd_snap_list` lists
    /// user, group and trash snapshots alike).
    fn snap_ids(&self) -> Result<Vec<u64>, RbdError> {
        let mut capacity: c_int = 16;
        loop {
            let mut snaps: Vec<ffi::RbdSnapInfo> = (0..capacity)
                .map(|_| ffi::RbdSnapInfo {
                    id: 0,
                    size: 0,
                    name: null(),
                })
                .collect();
            let mut max = capacity;
            // SAFETY: `snaps` holds `max` entries.
            let rc =
                unsafe { (self.api().rbd_snap_list)(self.image, snaps.as_mut_ptr(), &mut max) };
            if rc == -ERANGE && max > capacity {
                capacity = max;
                continue;
            }
            self.check("rbd_snap_list", rc)?;
            let count = usize::try_from(rc).unwrap_or(0).min(snaps.len());
            let ids = snaps[..count].iter().map(|s| s.id).collect();
            // SAFETY: filled by rbd_snap_list (zeroed, then NULL-name terminated), freed once.
            unsafe { (self.api().rbd_snap_list_end)(snaps.as_mut_ptr()) };
            return Ok(ids);
        }
    }
}

// The errnos handled here (Linux values; librados returns them negated).
const ENOENT: i64 = 2;
const EEXIST: i64 = 17;
const EROFS: i64 = 30;
const ERANGE: c_int = 34;
const ECANCELED: c_int = 125;

/// One connection to a Ceph cluster, shared by every thread of the controller.
pub struct Cluster {
    handle: Arc<Handle>,
    mon_host: String,
    user: String,
}

impl fmt::Debug for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cluster")
            .field("mon_host", &self.mon_host)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects (cephx) to the monitors of `config`. `timeout` bounds the connection and, from
    /// then on, every monitor and OSD operation, so no call hangs on an unreachable cluster.
    /// No ceph.conf, keyring or environment of the host is read: only `config` counts.
    pub fn connect(config: &ClusterConfig, timeout: Duration) -> Result<Cluster, RbdError> {
        let api =
            ffi::api().map_err(|(library, reason)| RbdError::LibraryMissing { library, reason })?;
        let connect_error = |rc: i64, message: String| RbdError::Connect {
            mon_host: config.mon_host.clone(),
            user: config.user.clone(),
            errno: i32::try_from(-rc).unwrap_or(i32::MAX),
            message,
        };
        let name = c_string("user", &format!("client.{}", config.user))?;
        let mut rados: RadosT = null_mut();
        // SAFETY: valid out pointer and C strings.
        let rc = unsafe { (api.rados_create2)(&mut rados, c"ceph".as_ptr(), name.as_ptr(), 0) };
        if rc < 0 {
            return Err(connect_error(
                rc.into(),
                format!("rados_create2: {}", os_message(rc.into())),
            ));
        }
        // From here the handle is shut down on every path.
        let handle = Arc::new(Handle { api, rados });
        // Ceph takes whole seconds here.
        let secs = timeout.as_secs_f64().ceil().max(1.0).to_string();
        let options = [
            ("mon_host", config.mon_host.as_str()),
            ("key", config.key.as_str()),
            // The key above is all: no keyring file of the host is looked for.
            ("keyring", ""),
            ("client_mount_timeout", &secs),
            ("rados_mon_op_timeout", &secs),
            ("rados_osd_op_timeout", &secs),
        ];
        for (option, value) in options {
            let value = CString::new(value).map_err(|_| {
                // Never echo the value: it may be the key.
                connect_error(-22, format!("the {option} contains a NUL byte"))
            })?;
            let option_c = c_string("option", option)?;
            // SAFETY: a created handle and C strings.
            let rc = unsafe { (api.rados_conf_set)(rados, option_c.as_ptr(), value.as_ptr()) };
            if rc < 0 {
                return Err(connect_error(
                    rc.into(),
                    format!("cannot set {option}: {}", os_message(rc.into())),
                ));
            }
        }
        let start = Instant::now();
        // SAFETY: a configured handle.
        let rc = unsafe { (api.rados_connect)(rados) };
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        tracing::debug!(mon_host = %config.mon_host, user = %config.user, ms, rc, "rados_connect");
        if rc < 0 {
            let rc = i64::from(rc);
            let hint = match -rc {
                1 | 13 => "; check the user and its key",
                4 | 110 => "; no monitor answered in time: check the addresses and the network",
                22 => "; check that the key is a cephx secret in base64",
                _ => "",
            };
            return Err(connect_error(
                rc,
                format!("{}{hint} (after {ms:.0} ms)", os_message(rc)),
            ));
        }
        Ok(Cluster {
            handle,
            mon_host: config.mon_host.clone(),
            user: config.user.clone(),
        })
    }

    fn api(&self) -> &'static Api {
        self.handle.api
    }

    /// The cluster's fsid (ceph-csi's `clusterID` is usually it).
    pub fn fsid(&self) -> Result<String, RbdError> {
        let mut buf = [0u8; 64];
        // SAFETY: a connected handle and a buffer of that length.
        let rc = unsafe {
            (self.api().rados_cluster_fsid)(self.handle.rados, buf.as_mut_ptr().cast(), buf.len())
        };
        if rc < 0 {
            return Err(call_error("rados_cluster_fsid", &self.mon_host, rc.into()));
        }
        let len = usize::try_from(rc).unwrap_or(0).min(buf.len());
        let fsid = buf[..len].split(|&b| b == 0).next().unwrap_or_default();
        Ok(String::from_utf8_lossy(fsid).into_owned())
    }

    fn ioctx(&self, pool: &PoolRef) -> Result<IoCtx, RbdError> {
        let name = c_string("pool", &pool.pool)?;
        let namespace = c_string("namespace", &pool.namespace)?;
        let mut io: RadosIoctxT = null_mut();
        // SAFETY: a connected handle, a C string and an out pointer.
        let rc =
            unsafe { (self.api().rados_ioctx_create)(self.handle.rados, name.as_ptr(), &mut io) };
        if i64::from(rc) == -ENOENT {
            return Err(RbdError::PoolNotFound {
                pool: pool.pool.clone(),
            });
        }
        if rc < 0 {
            return Err(call_error("rados_ioctx_create", &pool.pool, rc.into()));
        }
        let io = IoCtx {
            handle: self.handle.clone(),
            io,
            pool: pool.clone(),
        };
        if !pool.namespace.is_empty() {
            // SAFETY: a live ioctx and a C string.
            unsafe { (self.api().rados_ioctx_set_namespace)(io.io, namespace.as_ptr()) };
        }
        Ok(io)
    }

    /// The name of the pool with this id.
    fn pool_name(&self, id: i64) -> Result<String, RbdError> {
        let mut buf = vec![0u8; 256];
        loop {
            // SAFETY: a connected handle and a buffer of that length.
            let rc = unsafe {
                (self.api().rados_pool_reverse_lookup)(
                    self.handle.rados,
                    id,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            };
            if rc == -ERANGE && buf.len() < 1 << 16 {
                buf.resize(buf.len() * 4, 0);
                continue;
            }
            if rc < 0 {
                return Err(call_error(
                    "rados_pool_reverse_lookup",
                    &format!("pool id {id}"),
                    rc.into(),
                ));
            }
            let name = buf.split(|&b| b == 0).next().unwrap_or_default();
            return Ok(String::from_utf8_lossy(name).into_owned());
        }
    }

    fn open(&self, pool: &PoolRef, image: &str, read_only: bool) -> Result<Image, RbdError> {
        let io = self.ioctx(pool)?;
        let name = c_string("image", image)?;
        let mut handle: RbdImageT = null_mut();
        let call = if read_only {
            "rbd_open_read_only"
        } else {
            "rbd_open"
        };
        let target = format!("{pool}/{image}");
        let rc = timed(call, &target, || {
            let open = if read_only {
                self.api().rbd_open_read_only
            } else {
                self.api().rbd_open
            };
            // SAFETY: a live ioctx, a C string, an out pointer and no snapshot (NULL).
            unsafe { open(io.io, name.as_ptr(), &mut handle, null()) }
        });
        if i64::from(rc) == -ENOENT {
            return Err(RbdError::ImageNotFound {
                pool: pool.to_string(),
                image: image.to_string(),
            });
        }
        if rc < 0 {
            return Err(call_error(call, &target, rc.into()));
        }
        Ok(Image {
            image: handle,
            name: image.to_string(),
            io,
        })
    }

    /// Opens an image for writing.
    pub fn open_image(&self, pool: &PoolRef, image: &str) -> Result<Image, RbdError> {
        self.open(pool, image, false)
    }

    /// Creates the group; a group that exists already is fine.
    pub fn ensure_group(&self, pool: &PoolRef, group: &str) -> Result<(), RbdError> {
        let create = self.api().rbd_group_create;
        self.call_on_name(pool, "group", group, ("rbd_group_create", create), EEXIST)
    }

    /// `call(ioctx, name)` on a named object of the pool; `tolerated` (an errno) counts as done.
    fn call_on_name(
        &self,
        pool: &PoolRef,
        what: &'static str,
        name: &str,
        (call, f): (&'static str, NameCall),
        tolerated: i64,
    ) -> Result<(), RbdError> {
        let io = self.ioctx(pool)?;
        let name_c = c_string(what, name)?;
        let target = format!("{pool}/{name}");
        // SAFETY: a live ioctx and a C string; `f` takes exactly these.
        let rc = timed(call, &target, || unsafe { f(io.io, name_c.as_ptr()) });
        match i64::from(rc) {
            rc if rc >= 0 || rc == -tolerated => Ok(()),
            rc => Err(call_error(call, &target, rc)),
        }
    }

    /// Removes the group; a missing group is fine. Its images leave it (they stay).
    ///
    /// This deletes **every snapshot of the group** with it: a group must outlive the group
    /// snapshots tandem keeps.
    pub fn remove_group(&self, pool: &PoolRef, group: &str) -> Result<(), RbdError> {
        let remove = self.api().rbd_group_remove;
        self.call_on_name(pool, "group", group, ("rbd_group_remove", remove), ENOENT)
    }

    /// The names of the groups in the pool.
    pub fn list_groups(&self, pool: &PoolRef) -> Result<Vec<String>, RbdError> {
        let io = self.ioctx(pool)?;
        let target = pool.to_string();
        // Never a NULL buffer: 16.x refuses it (EINVAL) even when there is no group.
        let mut buf = vec![0u8; 1024];
        loop {
            let mut size = buf.len();
            let rc = timed("rbd_group_list", &target, || {
                // SAFETY: a live ioctx and a buffer of `size` bytes.
                unsafe { (self.api().rbd_group_list)(io.io, buf.as_mut_ptr().cast(), &mut size) }
            });
            if rc == -ERANGE && size > buf.len() {
                buf.resize(size, 0);
                continue;
            }
            if rc < 0 {
                return Err(call_error("rbd_group_list", &target, rc.into()));
            }
            // NUL-separated names, `rc` bytes in all.
            let used = usize::try_from(rc).unwrap_or(0).min(buf.len());
            return Ok(buf[..used]
                .split(|&b| b == 0)
                .filter(|name| !name.is_empty())
                .map(|name| String::from_utf8_lossy(name).into_owned())
                .collect());
        }
    }

    /// The group's images (none for a missing group).
    pub fn group_images(&self, pool: &PoolRef, group: &str) -> Result<Vec<GroupImage>, RbdError> {
        let io = self.ioctx(pool)?;
        let name = c_string("group", group)?;
        let target = format!("{pool}/{group}");
        let size = size_of::<ffi::RbdGroupImageInfo>();
        let mut capacity = 16;
        let listed = loop {
            let mut entries: Vec<ffi::RbdGroupImageInfo> = (0..capacity)
                .map(|_| ffi::RbdGroupImageInfo {
                    name: null_mut(),
                    pool: -1,
                    state: 0,
                })
                .collect();
            let mut count = capacity;
            let rc = timed("rbd_group_image_list", &target, || {
                // SAFETY: a live ioctx, a C string and `count` entries of `size` bytes.
                unsafe {
                    (self.api().rbd_group_image_list)(
                        io.io,
                        name.as_ptr(),
                        entries.as_mut_ptr(),
                        size,
                        &mut count,
                    )
                }
            });
            if rc == -ERANGE && count > capacity {
                capacity = count;
                continue;
            }
            if rc < 0 {
                return Err(call_error("rbd_group_image_list", &target, rc.into()));
            }
            let count = count.min(entries.len());
            let listed: Vec<(String, i64, c_int)> = entries[..count]
                .iter()
                // SAFETY: filled by librbd.
                .map(|e| (unsafe { owned(e.name) }, e.pool, e.state))
                .collect();
            // SAFETY: the entries librbd filled, freed once.
            unsafe { (self.api().rbd_group_image_list_cleanup)(entries.as_mut_ptr(), size, count) };
            break listed;
        };
        let mut images = Vec::with_capacity(listed.len());
        for (name, pool_id, state) in listed {
            images.push(GroupImage {
                name,
                pool: self.pool_name(pool_id)?,
                pool_id,
                state: if state == ffi::RBD_GROUP_IMAGE_STATE_ATTACHED {
                    GroupImageState::Attached
                } else {
                    GroupImageState::Incomplete
                },
            });
        }
        Ok(images)
    }

    /// Adds the image to the group. An image in this group already is fine; one in another group
    /// is [`RbdError::ImageInOtherGroup`] and stays where it is (an image can be in one group
    /// only, e.g. a ceph-csi VolumeGroupReplication's); a missing image is
    /// [`RbdError::ImageNotFound`].
    pub fn add_image(&self, pool: &PoolRef, group: &str, image: &str) -> Result<(), RbdError> {
        let group_c = c_string("group", group)?;
        let image_c = c_string("image", image)?;
        let io = self.ioctx(pool)?;
        let target = format!("{pool}/{group} + {pool}/{image}");
        // Checked first: librbd's answer for "in a group" is a bare EEXIST, for either group.
        if self.in_group(pool, &io, group, image)? {
            return Ok(());
        }
        let rc = timed("rbd_group_image_add", &target, || {
            // SAFETY: live ioctxs (group and image in the same pool) and C strings.
            unsafe {
                (self.api().rbd_group_image_add)(io.io, group_c.as_ptr(), io.io, image_c.as_ptr())
            }
        });
        match i64::from(rc) {
            rc if rc >= 0 => Ok(()),
            // Added meanwhile (by whom?): look again.
            rc if rc == -EEXIST => {
                if self.in_group(pool, &io, group, image)? {
                    Ok(())
                } else {
                    Err(call_error("rbd_group_image_add", &target, rc))
                }
            }
            rc if rc == -ENOENT => Err(RbdError::GroupNotFound {
                pool: pool.to_string(),
                group: group.to_string(),
            }),
            rc => Err(call_error("rbd_group_image_add", &target, rc)),
        }
    }

    /// Whether the image is in `group` (false: in none); an image in another group is
    /// [`RbdError::ImageInOtherGroup`].
    fn in_group(
        &self,
        pool: &PoolRef,
        io: &IoCtx,
        group: &str,
        image: &str,
    ) -> Result<bool, RbdError> {
        let opened = self.open(pool, image, true)?;
        match opened.group()? {
            None => Ok(false),
            Some((pool_id, name)) if pool_id == io.id() && name == group => Ok(true),
            Some((pool_id, name)) => Err(RbdError::ImageInOtherGroup {
                image: format!("{pool}/{image}"),
                group: format!("{}/{name}", self.pool_name(pool_id)?),
            }),
        }
    }

    /// The name of the group the image is in (None: in none); a missing image is
    /// [`RbdError::ImageNotFound`].
    pub fn image_group(&self, pool: &PoolRef, image: &str) -> Result<Option<String>, RbdError> {
        let opened = self.open(pool, image, true)?;
        Ok(opened.group()?.map(|(_, name)| name))
    }

    /// Takes the image out of the group; an image not in it (or missing) is fine. An image in
    /// another group is left alone.
    pub fn remove_image(&self, pool: &PoolRef, group: &str, image: &str) -> Result<(), RbdError> {
        let group_c = c_string("group", group)?;
        let image_c = c_string("image", image)?;
        let io = self.ioctx(pool)?;
        match self.in_group(pool, &io, group, image) {
            Ok(true) => {}
            Ok(false)
            | Err(RbdError::ImageNotFound { .. })
            | Err(RbdError::ImageInOtherGroup { .. }) => return Ok(()),
            Err(e) => return Err(e),
        }
        let target = format!("{pool}/{group} - {pool}/{image}");
        let rc = timed("rbd_group_image_remove", &target, || {
            // SAFETY: live ioctxs and C strings.
            unsafe {
                (self.api().rbd_group_image_remove)(
                    io.io,
                    group_c.as_ptr(),
                    io.io,
                    image_c.as_ptr(),
                )
            }
        });
        match i64::from(rc) {
            rc if rc >= 0 || rc == -ENOENT => Ok(()),
            rc => Err(call_error("rbd_group_image_remove", &target, rc)),
        }
    }

    /// The group's snapshots.
    pub fn group_snaps(&self, pool: &PoolRef, group: &str) -> Result<Vec<GroupSnap>, RbdError> {
        let io = self.ioctx(pool)?;
        let name = c_string("group", group)?;
        let target = format!("{pool}/{group}");
        let size = size_of::<ffi::RbdGroupSnapInfo>();
        let mut capacity = 16;
        loop {
            let mut entries: Vec<ffi::RbdGroupSnapInfo> = (0..capacity)
                .map(|_| ffi::RbdGroupSnapInfo {
                    name: null_mut(),
                    state: 0,
                })
                .collect();
            let mut count = capacity;
            let rc = timed("rbd_group_snap_list", &target, || {
                // SAFETY: a live ioctx, a C string and `count` entries of `size` bytes.
                unsafe {
                    (self.api().rbd_group_snap_list)(
                        io.io,
                        name.as_ptr(),
                        entries.as_mut_ptr(),
                        size,
                        &mut count,
                    )
                }
            });
            if rc == -ERANGE && count > capacity {
                capacity = count;
                continue;
            }
            if i64::from(rc) == -ENOENT {
                return Err(RbdError::GroupNotFound {
                    pool: pool.to_string(),
                    group: group.to_string(),
                });
            }
            if rc < 0 {
                return Err(call_error("rbd_group_snap_list", &target, rc.into()));
            }
            let count = count.min(entries.len());
            let snaps = entries[..count]
                .iter()
                .map(|e| GroupSnap {
                    // SAFETY: filled by librbd.
                    name: unsafe { owned(e.name) },
                    state: if e.state == ffi::RBD_GROUP_SNAP_STATE_COMPLETE {
                        SnapState::Complete
                    } else {
                        SnapState::Incomplete
                    },
                })
                .collect();
            // SAFETY: the entries librbd filled, freed once.
            unsafe { (self.api().rbd_group_snap_list_cleanup)(entries.as_mut_ptr(), size, count) };
            return Ok(snaps);
        }
    }

    /// The state of the group snapshot `group@snap`; `None` when it (or the group) is missing.
    pub fn group_snap_state(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
    ) -> Result<Option<SnapState>, RbdError> {
        match self.group_snaps(pool, group) {
            Ok(snaps) => Ok(snaps.into_iter().find(|s| s.name == snap).map(|s| s.state)),
            Err(RbdError::GroupNotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Cuts the group snapshot `group@snap` of every member at one point in time.
    ///
    /// Idempotent by name: a complete snapshot of that name is [`SnapCreated::AlreadyExisted`]
    /// and nothing is cut (a restarted controller must never cut twice, after the thaw). An
    /// incomplete one (an interrupted cut) is removed and reported as
    /// [`RbdError::IncompleteSnapshotRemoved`]: its members may not be from one instant.
    ///
    /// librbd's quiesce is skipped (`RBD_SNAP_CREATE_SKIP_QUIESCE`): tandem has frozen the
    /// filesystems already, and a librbd quiesce hook (rbd-nbd's) would try to freeze them again.
    /// A member held by an exclusive lock makes librbd refuse with EROFS:
    /// [`RbdError::ExclusiveLock`], not retried.
    pub fn create_group_snap(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
    ) -> Result<SnapCreated, RbdError> {
        let group_c = c_string("group", group)?;
        let snap_c = c_string("group snapshot", snap)?;
        match self.group_snap_state(pool, group, snap)? {
            Some(SnapState::Complete) => return Ok(SnapCreated::AlreadyExisted),
            Some(SnapState::Incomplete) => {
                self.remove_group_snap(pool, group, snap)?;
                return Err(RbdError::IncompleteSnapshotRemoved {
                    pool: pool.to_string(),
                    group: group.to_string(),
                    snap: snap.to_string(),
                });
            }
            None => {}
        }
        let io = self.ioctx(pool)?;
        let target = format!("{pool}/{group}@{snap}");
        let rc = timed("rbd_group_snap_create2", &target, || {
            // SAFETY: a live ioctx and C strings.
            unsafe {
                (self.api().rbd_group_snap_create2)(
                    io.io,
                    group_c.as_ptr(),
                    snap_c.as_ptr(),
                    ffi::RBD_SNAP_CREATE_SKIP_QUIESCE,
                )
            }
        });
        let rc = i64::from(rc);
        if rc >= 0 {
            return Ok(SnapCreated::Created);
        }
        if rc == -EEXIST && self.group_snap_state(pool, group, snap)? == Some(SnapState::Complete) {
            return Ok(SnapCreated::AlreadyExisted);
        }
        if rc == -ENOENT && !self.list_groups(pool)?.iter().any(|g| g == group) {
            return Err(RbdError::GroupNotFound {
                pool: pool.to_string(),
                group: group.to_string(),
            });
        }
        // A failed cut must leave no snapshot behind to be mistaken for one later.
        if let Ok(Some(SnapState::Incomplete)) = self.group_snap_state(pool, group, snap)
            && let Err(e) = self.remove_group_snap(pool, group, snap)
        {
            tracing::warn!(snapshot = %target, error = %e, "cannot remove the failed group snapshot");
        }
        if rc == -EROFS {
            return Err(RbdError::ExclusiveLock {
                pool: pool.to_string(),
                group: group.to_string(),
                snap: snap.to_string(),
                message: os_message(rc),
            });
        }
        Err(call_error("rbd_group_snap_create2", &target, rc))
    }

    /// Removes the group snapshot (with each member's snapshot of it); a missing one is fine.
    pub fn remove_group_snap(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
    ) -> Result<(), RbdError> {
        let group_c = c_string("group", group)?;
        let snap_c = c_string("group snapshot", snap)?;
        let io = self.ioctx(pool)?;
        let target = format!("{pool}/{group}@{snap}");
        let rc = timed("rbd_group_snap_remove", &target, || {
            // SAFETY: a live ioctx and C strings.
            unsafe { (self.api().rbd_group_snap_remove)(io.io, group_c.as_ptr(), snap_c.as_ptr()) }
        });
        match i64::from(rc) {
            rc if rc >= 0 || rc == -ENOENT => Ok(()),
            rc => Err(call_error("rbd_group_snap_remove", &target, rc)),
        }
    }

    /// Rolls every member of the group back to the group snapshot.
    ///
    /// The caller must make sure no client uses the images: librbd asks a writer holding the
    /// (cooperative) exclusive lock to give it up and rolls back under it. On 16.x it also rolls
    /// back images that have left the group since the snapshot and ignores ones added since, so
    /// the caller must check the membership first.
    pub fn rollback_group_snap(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
    ) -> Result<(), RbdError> {
        let group_c = c_string("group", group)?;
        let snap_c = c_string("group snapshot", snap)?;
        let not_found = || RbdError::SnapshotNotFound {
            pool: pool.to_string(),
            group: group.to_string(),
            snap: snap.to_string(),
        };
        if self.group_snap_state(pool, group, snap)?.is_none() {
            return Err(not_found());
        }
        let io = self.ioctx(pool)?;
        let target = format!("{pool}/{group}@{snap}");
        let rc = timed("rbd_group_snap_rollback", &target, || {
            // SAFETY: a live ioctx and C strings.
            unsafe {
                (self.api().rbd_group_snap_rollback)(io.io, group_c.as_ptr(), snap_c.as_ptr())
            }
        });
        match i64::from(rc) {
            rc if rc >= 0 => Ok(()),
            rc if rc == -ENOENT => Err(not_found()),
            rc => Err(call_error("rbd_group_snap_rollback", &target, rc)),
        }
    }

    /// Copies `image` as it was in the group snapshot `group@snap` to a new image `new_image` (a
    /// full copy: 16.x cannot clone from a group snapshot). `new_image` must not exist.
    ///
    /// The member's snapshot is found by its group namespace (pool, group, group snapshot): it
    /// cannot be addressed by name. `rbd_copy`, never `rbd_deep_copy`: on 16.x a deep copy from a
    /// group-namespace snapshot fails an assertion and aborts the whole process.
    pub fn copy_from_group_snap(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
        image: &str,
        new_image: &str,
    ) -> Result<(), RbdError> {
        self.copy_from_group_snap_with_progress(pool, group, snap, image, new_image, &|_, _| true)
    }

    /// [`Cluster::copy_from_group_snap`], telling `progress` (bytes done, bytes in all) as it
    /// goes; `progress` returning false asks librbd to stop (the copy then fails, and what it
    /// made is the caller's to delete).
    pub fn copy_from_group_snap_with_progress(
        &self,
        pool: &PoolRef,
        group: &str,
        snap: &str,
        image: &str,
        new_image: &str,
        progress: &(dyn Fn(u64, u64) -> bool + Sync),
    ) -> Result<(), RbdError> {
        let new_c = c_string("image", new_image)?;
        let io = self.ioctx(pool)?;
        // Read-only: takes no lock, so a running writer of the source is not disturbed.
        let source = self.open(pool, image, true)?;
        let Some(id) = source.group_snap_id(io.id(), group, snap)? else {
            return Err(RbdError::SnapshotNotFound {
                pool: pool.to_string(),
                group: group.to_string(),
                snap: snap.to_string(),
            });
        };
        // SAFETY: a live image.
        let rc = unsafe { (self.api().rbd_snap_set_by_id)(source.image, id) };
        source.check("rbd_snap_set_by_id", rc)?;
        let target = format!("{pool}/{image}@{group}@{snap} -> {pool}/{new_image}");
        unsafe extern "C" fn report(done: u64, total: u64, data: *mut c_void) -> c_int {
            // SAFETY: `data` is the `&&dyn Fn` below, alive for the whole call.
            let progress = unsafe { &*(data as *const &(dyn Fn(u64, u64) -> bool + Sync)) };
            if progress(done, total) { 0 } else { -ECANCELED }
        }
        let data: *const &(dyn Fn(u64, u64) -> bool + Sync) = &progress;
        let rc = timed("rbd_copy", &target, || {
            // SAFETY: a live image and ioctx, a C string, and a callback whose data outlives
            // the call (librbd calls it only while rbd_copy_with_progress runs).
            unsafe {
                (self.api().rbd_copy_with_progress)(
                    source.image,
                    io.io,
                    new_c.as_ptr(),
                    report,
                    data as *mut c_void,
                )
            }
        });
        match i64::from(rc) {
            rc if rc >= 0 => Ok(()),
            rc if rc == -EEXIST => Err(RbdError::ImageExists {
                pool: pool.to_string(),
                image: new_image.to_string(),
            }),
            rc => Err(call_error("rbd_copy", &target, rc)),
        }
    }

    /// Creates an image of `bytes` bytes with the cluster's default features; one that exists
    /// is [`RbdError::ImageExists`].
    pub fn create_image(&self, pool: &PoolRef, image: &str, bytes: u64) -> Result<(), RbdError> {
        let io = self.ioctx(pool)?;
        let name = c_string("image", image)?;
        let target = format!("{pool}/{image}");
        // 0: the default object size.
        let mut order: c_int = 0;
        let rc = timed("rbd_create", &target, || {
            // SAFETY: a live ioctx, a C string and an in/out pointer.
            unsafe { (self.api().rbd_create)(io.io, name.as_ptr(), bytes, &mut order) }
        });
        match i64::from(rc) {
            rc if rc >= 0 => Ok(()),
            rc if rc == -EEXIST => Err(RbdError::ImageExists {
                pool: pool.to_string(),
                image: image.to_string(),
            }),
            rc => Err(call_error("rbd_create", &target, rc)),
        }
    }

    /// Deletes an image and its data; a missing one is fine. librbd refuses an image that is in
    /// a group or has snapshots.
    pub fn delete_image(&self, pool: &PoolRef, image: &str) -> Result<(), RbdError> {
        let remove = self.api().rbd_remove;
        self.call_on_name(pool, "image", image, ("rbd_remove", remove), ENOENT)
    }

    /// Writes `data` at `offset` of the image.
    pub fn write_image(
        &self,
        pool: &PoolRef,
        image: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(), RbdError> {
        let opened = self.open(pool, image, false)?;
        let rc = timed("rbd_write", &opened.target(), || {
            // SAFETY: a live image and a buffer of that length.
            unsafe {
                (self.api().rbd_write)(opened.image, offset, data.len(), data.as_ptr().cast())
            }
        });
        match usize::try_from(rc) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(n) => Err(RbdError::Call {
                call: "rbd_write",
                target: opened.target(),
                errno: 5,
                message: format!("wrote {n} of {} bytes", data.len()),
            }),
            Err(_) => Err(call_error("rbd_write", &opened.target(), rc as i64)),
        }
    }

    /// Reads up to `len` bytes at `offset` of the image (fewer at its end).
    pub fn read_image(
        &self,
        pool: &PoolRef,
        image: &str,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, RbdError> {
        let opened = self.open(pool, image, true)?;
        let mut buf = vec![0u8; len];
        let rc = timed("rbd_read", &opened.target(), || {
            // SAFETY: a live image and a buffer of that length.
            unsafe {
                (self.api().rbd_read)(opened.image, offset, buf.len(), buf.as_mut_ptr().cast())
            }
        });
        let n =
            usize::try_from(rc).map_err(|_| call_error("rbd_read", &opened.target(), rc as i64))?;
        buf.truncate(n);
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_never_shows_its_key() {
        let config = ClusterConfig {
            mon_host: "127.0.0.1:3300".into(),
            user: "tandem".into(),
            key: "AQDsecretsecret==".into(),
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("AQDsecret"), "{shown}");
        assert!(
            shown.contains("tandem") && shown.contains("127.0.0.1:3300"),
            "{shown}"
        );
    }

    #[test]
    fn a_name_with_a_nul_is_an_error() {
        let e = c_string("group", "a\0b").unwrap_err();
        assert!(
            matches!(e, RbdError::InvalidName { what: "group", .. }),
            "{e}"
        );
    }

    #[test]
    fn errors_read_as_errno_text() {
        let e = call_error("rbd_group_create", "rbd/g", -13);
        assert_eq!(e.errno(), Some(13));
        assert!(e.to_string().contains("Permission denied"), "{e}");
    }

    /// Without the libraries this is `LibraryMissing`; with them, no monitor is a `Connect`
    /// error within the timeout.
    #[test]
    fn connecting_to_no_monitor_fails_in_bounded_time() {
        let config = ClusterConfig {
            mon_host: "[v2:127.0.0.1:1]".into(),
            user: "tandem".into(),
            key: "AQDQ/Q9pAAAAABAAtw2I8pVTeaQy9zPkT1mk3w==".into(),
        };
        let start = Instant::now();
        let e = Cluster::connect(&config, Duration::from_secs(1)).unwrap_err();
        let text = e.to_string();
        println!("{text}");
        match e {
            RbdError::LibraryMissing { .. } => {
                assert!(text.contains("librbd1 and librados2"), "{text}")
            }
            RbdError::Connect { .. } => {
                assert!(start.elapsed() < Duration::from_secs(10), "{text}");
                assert!(!text.contains(&config.key), "{text}");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn the_cluster_is_shared_across_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Cluster>();
    }
}
