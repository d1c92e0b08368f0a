//! Links Intel ISA-L (Debian package libisal-dev), used by `engine::pipeline` for
//! Reed-Solomon coding and crc32c.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rustc-link-lib=dylib=isal");
}
