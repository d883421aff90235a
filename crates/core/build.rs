//! Records the compiler and target hyperjob-core is built with: shared-library plugins must be
//! built by the same rustc for the same target, and their header carries these values.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown rustc".to_string());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown-target".to_string());
    println!("cargo:rustc-env=HYPERJOB_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=HYPERJOB_TARGET={target}");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
