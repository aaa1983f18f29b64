//! Compiles the UCX backend only when the `ucx` feature is on and `ucx-sys`
//! found the UCX headers (it says so through `links = "ucx"` metadata).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(ucx_bindings)");
    println!("cargo:rerun-if-env-changed=DEP_UCX_HEADERS");
    if std::env::var("CARGO_FEATURE_UCX").is_ok() && std::env::var("DEP_UCX_HEADERS").as_deref() == Ok("1") {
        println!("cargo:rustc-cfg=ucx_bindings");
    }
}
