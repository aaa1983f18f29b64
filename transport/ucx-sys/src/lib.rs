//! Raw bindings to UCX's UCP API (the system's libucx, 1.10 or newer), for
//! rdask's UCX transport. Everything here is `unsafe` FFI; the one user,
//! `rdask_transport::ucx`, wraps it behind the transport's safe `Backend`.
//!
//! The bindings are generated from the installed headers at build time, and
//! the library is opened at run time ([`library`]), never linked: a binary
//! built with UCX support still starts on a machine without libucx, and
//! only a `ucx://` address fails, saying what is missing.
//!
//! UCX's C macros that the transport needs (`UCS_PTR_IS_ERR`,
//! `ucp_dt_make_contig`, ...) are written out below as functions.

#![allow(non_camel_case_types, non_upper_case_globals, non_snake_case, dead_code, clippy::all)]

/// Whether the UCX headers were found when this crate was built.
pub const HEADERS: bool = cfg!(ucx_headers);

#[cfg(ucx_headers)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
#[cfg(ucx_headers)]
pub use bindings::*;

#[cfg(ucx_headers)]
mod loaded {
    use super::bindings::*;
    use std::sync::OnceLock;

    /// Library names tried in order: the versioned run-time name (Debian's
    /// libucx0), then the development symlink.
    const NAMES: [&str; 2] = ["libucp.so.0", "libucp.so"];

    static LIB: OnceLock<Result<UcpLib, String>> = OnceLock::new();

    /// libucp, opened once per process.
    pub fn library() -> Result<&'static UcpLib, String> {
        LIB.get_or_init(|| {
            let mut errors = Vec::new();
            for name in NAMES {
                // SAFETY: loading libucp runs its (and libucs's) constructors,
                // which only set up UCX's global state.
                match unsafe { UcpLib::new(name) } {
                    Ok(lib) => {
                        // The calls the transport makes must all be there
                        // (UCX 1.10 added the *_nbx active messages).
                        for (sym, present) in [
                            ("ucp_am_send_nbx", lib.ucp_am_send_nbx.is_ok()),
                            ("ucp_am_recv_data_nbx", lib.ucp_am_recv_data_nbx.is_ok()),
                            ("ucp_worker_set_am_recv_handler", lib.ucp_worker_set_am_recv_handler.is_ok()),
                            ("ucp_ep_close_nbx", lib.ucp_ep_close_nbx.is_ok()),
                            ("ucp_listener_create", lib.ucp_listener_create.is_ok()),
                        ] {
                            if !present {
                                return Err(format!("{name} has no {sym}: UCX 1.10 or newer is needed"));
                            }
                        }
                        return Ok(lib);
                    }
                    Err(e) => errors.push(format!("{name}: {e}")),
                }
            }
            Err(format!("cannot load UCX ({}); install libucx0 (Debian) or put libucp on LD_LIBRARY_PATH", errors.join("; ")))
        })
        .as_ref()
        .map_err(Clone::clone)
    }
}
#[cfg(ucx_headers)]
pub use loaded::library;

#[cfg(ucx_headers)]
mod macros {
    use super::bindings::*;

    /// `UCS_PTR_IS_ERR`: a returned request pointer that encodes a status.
    pub fn ptr_is_err(p: *mut std::ffi::c_void) -> bool {
        (p as usize) >= (UCS_ERR_LAST as isize as usize)
    }

    /// `UCS_PTR_STATUS`: the status a returned request pointer encodes
    /// (UCS_OK for NULL, UCS_INPROGRESS for a real request).
    pub fn ptr_status(p: *mut std::ffi::c_void) -> ucs_status_t {
        if p.is_null() {
            UCS_OK as ucs_status_t
        } else if ptr_is_err(p) {
            p as isize as ucs_status_t
        } else {
            UCS_INPROGRESS as ucs_status_t
        }
    }

    /// `ucp_dt_make_contig(1)`: plain bytes.
    pub const fn dt_bytes() -> ucp_datatype_t {
        ((1u64 << UCP_DATATYPE_SHIFT) | UCP_DATATYPE_CONTIG as u64) as ucp_datatype_t
    }

    /// `ucp_dt_make_iov()`: a list of `ucp_dt_iov_t`.
    pub const fn dt_iov() -> ucp_datatype_t {
        UCP_DATATYPE_IOV as ucp_datatype_t
    }
}
#[cfg(ucx_headers)]
pub use macros::*;
