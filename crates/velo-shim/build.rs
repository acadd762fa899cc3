//! Compiles the variadic exec family (c/variadic.c) into the library.
fn main() {
    println!("cargo:rerun-if-changed=c/variadic.c");
    cc::Build::new()
        .file("c/variadic.c")
        .flag_if_supported("-fvisibility=default")
        .warnings(true)
        .compile("velo_shim_variadic");
}
