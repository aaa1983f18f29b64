//! Generates bindings from the system's UCX headers (Debian: libucx-dev),
//! found with pkg-config. The library itself is not linked: `lib.rs` loads
//! libucp at run time, so a binary built here still starts (and speaks TCP)
//! on a machine without UCX. Without the headers the crate builds empty and
//! says so; `rdask-transport` then reports "built without UCX".

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");
    println!("cargo::rustc-check-cfg=cfg(ucx_headers)");
    let lib = match pkg_config::Config::new().atleast_version("1.10").cargo_metadata(false).probe("ucx") {
        Ok(lib) => lib,
        Err(e) => {
            println!("cargo:warning=UCX headers not found ({e}); building without the UCX transport (apt-get install libucx-dev)");
            println!("cargo:headers=0");
            return;
        }
    };
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("bindings.rs");
    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("ucp_.*|ucs_status_string")
        .allowlist_type("ucp_.*|ucs_status_t|ucs_thread_mode_t|ucs_sock_addr_t|ucs_memory_type")
        .allowlist_var("UCP_.*|UCS_.*")
        .default_enum_style(bindgen::EnumVariation::Consts)
        .prepend_enum_name(false)
        // Functions become fields of a struct filled by dlopen/dlsym.
        .dynamic_library_name("UcpLib")
        .dynamic_link_require_all(false)
        .layout_tests(false)
        .derive_default(true);
    for dir in &lib.include_paths {
        builder = builder.clang_arg(format!("-I{}", dir.display()));
    }
    // bindgen needs libclang (libclang-dev); a missing one is a build
    // without UCX, not a failed build.
    let generated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || builder.generate()));
    match generated {
        Ok(Ok(bindings)) => {
            bindings.write_to_file(&out).expect("cannot write the UCX bindings");
            println!("cargo:rustc-cfg=ucx_headers");
            println!("cargo:headers=1");
            println!("cargo:version={}", lib.version);
        }
        Ok(Err(e)) => {
            println!("cargo:warning=cannot generate UCX bindings ({e}); building without the UCX transport");
            println!("cargo:headers=0");
        }
        Err(_) => {
            println!("cargo:warning=bindgen failed (is libclang-dev installed?); building without the UCX transport");
            println!("cargo:headers=0");
        }
    }
}
