//! Real software through the shim, on trees that exist only in the store.

mod common;
#[path = "common/shim_env.rs"]
mod shim_env;

#[test]
fn placeholder() {
    shim_env::shim_built();
}
