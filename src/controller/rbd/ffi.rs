//! The raw C API of librados and librbd that tandem uses, loaded at run time (dlopen).
//!
//! Hand-written from Ceph 16.2's `rados/librados.h` and `rbd/librbd.h` (the types match them
//! exactly); the build needs neither header nor library, and only a process that talks to Ceph
//! needs `librados.so.2` and `librbd.so.1`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub type RadosT = *mut c_void;
pub type RadosIoctxT = *mut c_void;
pub type RbdImageT = *mut c_void;
/// `librbd_progress_fn_t`: (done, total, the caller's pointer); non-zero asks librbd to stop.
pub type RbdProgressFn = unsafe extern "C" fn(u64, u64, *mut c_void) -> c_int;

/// `rbd_group_image_state_t`.
pub const RBD_GROUP_IMAGE_STATE_ATTACHED: c_int = 0;
/// `rbd_group_snap_state_t`.
pub const RBD_GROUP_SNAP_STATE_COMPLETE: c_int = 1;
/// `rbd_snap_namespace_type_t`.
pub const RBD_SNAP_NAMESPACE_TYPE_GROUP: c_int = 1;
/// `rbd_lock_mode_t`.
pub const RBD_LOCK_MODE_EXCLUSIVE: c_int = 0;
/// `rbd_group_snap_create2` flags.
pub const RBD_SNAP_CREATE_SKIP_QUIESCE: u32 = 1 << 0;

/// `rbd_group_info_t`.
#[repr(C)]
pub struct RbdGroupInfo {
    pub name: *mut c_char,
    pub pool: i64,
}

/// `rbd_group_image_info_t`.
#[repr(C)]
pub struct RbdGroupImageInfo {
    pub name: *mut c_char,
    pub pool: i64,
    pub state: c_int,
}

/// `rbd_group_snap_info_t`.
#[repr(C)]
pub struct RbdGroupSnapInfo {
    pub name: *mut c_char,
    pub state: c_int,
}

/// `rbd_snap_info_t`.
#[repr(C)]
pub struct RbdSnapInfo {
    pub id: u64,
    pub size: u64,
    pub name: *const c_char,
}

/// `rbd_snap_group_namespace_t`.
#[repr(C)]
pub struct RbdSnapGroupNamespace {
    pub group_pool: i64,
    pub group_name: *mut c_char,
    pub group_snap_name: *mut c_char,
}

/// Declares the function table and its loader: each entry is `library, name: type`.
macro_rules! api {
    ($($lib:ident $name:ident: fn($($arg:ty),*) -> $ret:ty;)*) => {
        /// The functions tandem calls, resolved once per process.
        pub struct Api {
            $(pub $name: unsafe extern "C" fn($($arg),*) -> $ret,)*
        }

        impl Api {
            fn resolve(rados: &Library, rbd: &Library) -> Result<Api, (&'static str, String)> {
                Ok(Api {
                    $($name: {
                        let file = stringify!($lib);
                        let library = if file == "rados" { rados } else { rbd };
                        // SAFETY: the type is the one the header declares for this symbol.
                        let symbol = unsafe {
                            library.get::<unsafe extern "C" fn($($arg),*) -> $ret>(stringify!($name))
                        };
                        match symbol {
                            Ok(symbol) => *symbol,
                            Err(e) => return Err((
                                if file == "rados" { RADOS_LIB } else { RBD_LIB },
                                format!("it has no {}: {} (Ceph 16.2 or later is needed)", stringify!($name), describe(&e)),
                            )),
                        }
                    },)*
                })
            }
        }
    };
}

api! {
    rados rados_create2: fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int;
    rados rados_conf_set: fn(RadosT, *const c_char, *const c_char) -> c_int;
    rados rados_connect: fn(RadosT) -> c_int;
    rados rados_shutdown: fn(RadosT) -> ();
    rados rados_cluster_fsid: fn(RadosT, *mut c_char, usize) -> c_int;
    rados rados_pool_reverse_lookup: fn(RadosT, i64, *mut c_char, usize) -> c_int;
    rados rados_ioctx_create: fn(RadosT, *const c_char, *mut RadosIoctxT) -> c_int;
    rados rados_ioctx_destroy: fn(RadosIoctxT) -> ();
    rados rados_ioctx_set_namespace: fn(RadosIoctxT, *const c_char) -> ();
    rados rados_ioctx_get_id: fn(RadosIoctxT) -> i64;

    rbd rbd_create: fn(RadosIoctxT, *const c_char, u64, *mut c_int) -> c_int;
    rbd rbd_remove: fn(RadosIoctxT, *const c_char) -> c_int;
    rbd rbd_open: fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int;
    rbd rbd_open_read_only: fn(RadosIoctxT, *const c_char, *mut RbdImageT, *const c_char) -> c_int;
    rbd rbd_close: fn(RbdImageT) -> c_int;
    rbd rbd_read: fn(RbdImageT, u64, usize, *mut c_char) -> isize;
    rbd rbd_write: fn(RbdImageT, u64, usize, *const c_char) -> isize;
    rbd rbd_copy_with_progress: fn(RbdImageT, RadosIoctxT, *const c_char, RbdProgressFn, *mut c_void) -> c_int;
    rbd rbd_lock_acquire: fn(RbdImageT, c_int) -> c_int;
    rbd rbd_lock_release: fn(RbdImageT) -> c_int;
    rbd rbd_get_group: fn(RbdImageT, *mut RbdGroupInfo, usize) -> c_int;
    rbd rbd_group_info_cleanup: fn(*mut RbdGroupInfo, usize) -> c_int;
    rbd rbd_snap_list: fn(RbdImageT, *mut RbdSnapInfo, *mut c_int) -> c_int;
    rbd rbd_snap_list_end: fn(*mut RbdSnapInfo) -> ();
    rbd rbd_snap_get_namespace_type: fn(RbdImageT, u64, *mut c_int) -> c_int;
    rbd rbd_snap_get_group_namespace: fn(RbdImageT, u64, *mut RbdSnapGroupNamespace, usize) -> c_int;
    rbd rbd_snap_group_namespace_cleanup: fn(*mut RbdSnapGroupNamespace, usize) -> c_int;
    rbd rbd_snap_set_by_id: fn(RbdImageT, u64) -> c_int;
    rbd rbd_group_create: fn(RadosIoctxT, *const c_char) -> c_int;
    rbd rbd_group_remove: fn(RadosIoctxT, *const c_char) -> c_int;
    rbd rbd_group_list: fn(RadosIoctxT, *mut c_char, *mut usize) -> c_int;
    rbd rbd_group_image_add: fn(RadosIoctxT, *const c_char, RadosIoctxT, *const c_char) -> c_int;
    rbd rbd_group_image_remove: fn(RadosIoctxT, *const c_char, RadosIoctxT, *const c_char) -> c_int;
    rbd rbd_group_image_list: fn(RadosIoctxT, *const c_char, *mut RbdGroupImageInfo, usize, *mut usize) -> c_int;
    rbd rbd_group_image_list_cleanup: fn(*mut RbdGroupImageInfo, usize, usize) -> c_int;
    rbd rbd_group_snap_create2: fn(RadosIoctxT, *const c_char, *const c_char, u32) -> c_int;
    rbd rbd_group_snap_remove: fn(RadosIoctxT, *const c_char, *const c_char) -> c_int;
    rbd rbd_group_snap_list: fn(RadosIoctxT, *const c_char, *mut RbdGroupSnapInfo, usize, *mut usize) -> c_int;
    rbd rbd_group_snap_list_cleanup: fn(*mut RbdGroupSnapInfo, usize, usize) -> c_int;
    rbd rbd_group_snap_rollback: fn(RadosIoctxT, *const c_char, *const c_char) -> c_int;
}

/// libloading's error with its cause (dlerror's text: which file, and why).
fn describe(e: &libloading::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

pub const RADOS_LIB: &str = "librados.so.2";
pub const RBD_LIB: &str = "librbd.so.1";

/// The libraries and their functions. They are never unloaded: librados starts threads that
/// run its code until the process ends.
struct Loaded {
    _rados: Library,
    _rbd: Library,
    api: Api,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// The function table, loading the libraries on first use. A failure is not remembered, so a
/// library installed later is found on the next call.
pub fn api() -> Result<&'static Api, (&'static str, String)> {
    if let Some(loaded) = LOADED.get() {
        return Ok(&loaded.api);
    }
    // SAFETY: loading runs the libraries' initialisers, which only set up Ceph's globals.
    let rados = unsafe { Library::new(RADOS_LIB) }.map_err(|e| (RADOS_LIB, describe(&e)))?;
    // SAFETY: as above.
    let rbd = unsafe { Library::new(RBD_LIB) }.map_err(|e| (RBD_LIB, describe(&e)))?;
    let api = Api::resolve(&rados, &rbd)?;
    // Two threads loading at once: one wins, the other's copy is dropped (dlclose only
    // decrements the count of a library still loaded).
    let loaded = LOADED.get_or_init(|| Loaded {
        _rados: rados,
        _rbd: rbd,
        api,
    });
    Ok(&loaded.api)
}
