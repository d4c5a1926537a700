//! The C API of librados and librbd (Ceph 16.2, `rados/librados.h`, `rbd/librbd.h`):
//! the functions the binding calls, resolved at run time from `librados.so.2` and
//! `librbd.so.1`.

use std::ffi::{c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::Library;

pub(crate) type RadosT = *mut c_void;
pub(crate) type IoctxT = *mut c_void;
pub(crate) type ImageT = *mut c_void;
pub(crate) type CompT = *mut c_void;
pub(crate) type Callback = Option<unsafe extern "C" fn(CompT, *mut c_void)>;

/// `rbd_image_info_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct ImageInfo {
    pub(crate) size: u64,
    pub(crate) obj_size: u64,
    pub(crate) num_objs: u64,
    pub(crate) order: c_int,
    /// RBD_MAX_BLOCK_NAME_SIZE (deprecated field).
    pub(crate) block_name_prefix: [c_char; 24],
    pub(crate) parent_pool: i64,
    /// RBD_MAX_IMAGE_NAME_SIZE (deprecated field).
    pub(crate) parent_name: [c_char; 96],
}

const _: () = {
    assert!(std::mem::size_of::<ImageInfo>() == 160);
    assert!(std::mem::offset_of!(ImageInfo, order) == 24);
    assert!(std::mem::offset_of!(ImageInfo, block_name_prefix) == 28);
    assert!(std::mem::offset_of!(ImageInfo, parent_pool) == 56);
    assert!(std::mem::offset_of!(ImageInfo, parent_name) == 64);
};

/// `EVENT_TYPE_EVENTFD` of `rbd_set_image_notification`.
pub(crate) const EVENT_TYPE_EVENTFD: c_int = 2;

/// The resolved functions. The libraries stay loaded for the life of the process (the
/// table lives in a static), so the pointers stay valid.
#[allow(missing_debug_implementations)]
pub(crate) struct Api {
    _rados: Library,
    _rbd: Library,
    pub(crate) rados_create2: unsafe extern "C" fn(*mut RadosT, *const c_char, *const c_char, u64) -> c_int,
    pub(crate) rados_conf_read_file: unsafe extern "C" fn(RadosT, *const c_char) -> c_int,
    pub(crate) rados_conf_set: unsafe extern "C" fn(RadosT, *const c_char, *const c_char) -> c_int,
    pub(crate) rados_connect: unsafe extern "C" fn(RadosT) -> c_int,
    pub(crate) rados_shutdown: unsafe extern "C" fn(RadosT),
    pub(crate) rados_ioctx_create: unsafe extern "C" fn(RadosT, *const c_char, *mut IoctxT) -> c_int,
    pub(crate) rados_ioctx_destroy: unsafe extern "C" fn(IoctxT),
    #[allow(clippy::type_complexity)]
    pub(crate) rados_mon_command: unsafe extern "C" fn(
        RadosT,
        *mut *const c_char,
        usize,
        *const c_char,
        usize,
        *mut *mut c_char,
        *mut usize,
        *mut *mut c_char,
        *mut usize,
    ) -> c_int,
    pub(crate) rados_buffer_free: unsafe extern "C" fn(*mut c_char),
    pub(crate) rbd_version: unsafe extern "C" fn(*mut c_int, *mut c_int, *mut c_int),
    pub(crate) rbd_open: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub(crate) rbd_open_read_only: unsafe extern "C" fn(IoctxT, *const c_char, *mut ImageT, *const c_char) -> c_int,
    pub(crate) rbd_close: unsafe extern "C" fn(ImageT) -> c_int,
    pub(crate) rbd_stat: unsafe extern "C" fn(ImageT, *mut ImageInfo, usize) -> c_int,
    pub(crate) rbd_get_features: unsafe extern "C" fn(ImageT, *mut u64) -> c_int,
    pub(crate) rbd_set_image_notification: unsafe extern "C" fn(ImageT, c_int, c_int) -> c_int,
    pub(crate) rbd_aio_create_completion: unsafe extern "C" fn(*mut c_void, Callback, *mut CompT) -> c_int,
    pub(crate) rbd_aio_read: unsafe extern "C" fn(ImageT, u64, usize, *mut c_char, CompT) -> c_int,
    pub(crate) rbd_aio_write: unsafe extern "C" fn(ImageT, u64, usize, *const c_char, CompT) -> c_int,
    pub(crate) rbd_aio_discard: unsafe extern "C" fn(ImageT, u64, u64, CompT) -> c_int,
    pub(crate) rbd_aio_write_zeroes: unsafe extern "C" fn(ImageT, u64, usize, CompT, c_int, c_int) -> c_int,
    pub(crate) rbd_aio_flush: unsafe extern "C" fn(ImageT, CompT) -> c_int,
    pub(crate) rbd_aio_wait_for_complete: unsafe extern "C" fn(CompT) -> c_int,
    pub(crate) rbd_aio_get_return_value: unsafe extern "C" fn(CompT) -> isize,
    pub(crate) rbd_aio_get_arg: unsafe extern "C" fn(CompT) -> *mut c_void,
    pub(crate) rbd_aio_release: unsafe extern "C" fn(CompT),
    pub(crate) rbd_poll_io_events: unsafe extern "C" fn(ImageT, *mut CompT, c_int) -> c_int,
}

const RADOS: &str = "librados.so.2";
const RBD: &str = "librbd.so.1";
const INSTALL: &str = "install Ceph's client libraries (Debian: apt-get install librbd1)";

/// The loaded API, or why it cannot be had (one line).
pub(crate) fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn open(name: &str) -> Result<Library, String> {
    // SAFETY: loading runs the library's initialisers (C++ static constructors of
    // librados/librbd and their dependencies), which take no arguments and make no
    // demands of the caller; nothing else in this process defines their symbols.
    unsafe { Library::new(name) }.map_err(|e| format!("cannot load {name} ({e}): {INSTALL}"))
}

fn load() -> Result<Api, String> {
    let rados = open(RADOS)?;
    let rbd = open(RBD)?;
    macro_rules! sym {
        ($lib:ident, $libname:expr, $name:ident) => {{
            // SAFETY: the field's type is this function's C prototype in Ceph 16.2's headers;
            // the pointer copied out stays valid: the Library lives in the same static table
            // for the life of the process.
            let s = unsafe { $lib.get(concat!(stringify!($name), "\0").as_bytes()) };
            *s.map_err(|e| format!("{} has no {} ({e}): Ceph 16.2 or newer is needed", $libname, stringify!($name)))?
        }};
    }
    Ok(Api {
        rados_create2: sym!(rados, RADOS, rados_create2),
        rados_conf_read_file: sym!(rados, RADOS, rados_conf_read_file),
        rados_conf_set: sym!(rados, RADOS, rados_conf_set),
        rados_connect: sym!(rados, RADOS, rados_connect),
        rados_shutdown: sym!(rados, RADOS, rados_shutdown),
        rados_ioctx_create: sym!(rados, RADOS, rados_ioctx_create),
        rados_ioctx_destroy: sym!(rados, RADOS, rados_ioctx_destroy),
        rados_mon_command: sym!(rados, RADOS, rados_mon_command),
        rados_buffer_free: sym!(rados, RADOS, rados_buffer_free),
        rbd_version: sym!(rbd, RBD, rbd_version),
        rbd_open: sym!(rbd, RBD, rbd_open),
        rbd_open_read_only: sym!(rbd, RBD, rbd_open_read_only),
        rbd_close: sym!(rbd, RBD, rbd_close),
        rbd_stat: sym!(rbd, RBD, rbd_stat),
        rbd_get_features: sym!(rbd, RBD, rbd_get_features),
        rbd_set_image_notification: sym!(rbd, RBD, rbd_set_image_notification),
        rbd_aio_create_completion: sym!(rbd, RBD, rbd_aio_create_completion),
        rbd_aio_read: sym!(rbd, RBD, rbd_aio_read),
        rbd_aio_write: sym!(rbd, RBD, rbd_aio_write),
        rbd_aio_discard: sym!(rbd, RBD, rbd_aio_discard),
        rbd_aio_write_zeroes: sym!(rbd, RBD, rbd_aio_write_zeroes),
        rbd_aio_flush: sym!(rbd, RBD, rbd_aio_flush),
        rbd_aio_wait_for_complete: sym!(rbd, RBD, rbd_aio_wait_for_complete),
        rbd_aio_get_return_value: sym!(rbd, RBD, rbd_aio_get_return_value),
        rbd_aio_get_arg: sym!(rbd, RBD, rbd_aio_get_arg),
        rbd_aio_release: sym!(rbd, RBD, rbd_aio_release),
        rbd_poll_io_events: sym!(rbd, RBD, rbd_poll_io_events),
        _rados: rados,
        _rbd: rbd,
    })
}
