//! Records what a shared-library plugin must share with hyperjob: the compiler (version text
//! and commit), the target, and the fingerprint of the types that cross the library boundary
//! (see src/abi/boundary.rs). Every plugin header carries these values. A value that cannot be
//! found out is written as `unknown`, which the gate never accepts.

use std::process::Command;

use sha2::Digest as _;

#[allow(dead_code)]
#[path = "src/abi/boundary.rs"]
mod boundary;

const UNKNOWN: &str = "unknown";

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let verbose = Command::new(&rustc)
        .arg("-vV")
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default();
    let version = verbose
        .lines()
        .next()
        .filter(|line| line.starts_with("rustc "))
        .unwrap_or(UNKNOWN)
        .trim();
    let commit = verbose
        .lines()
        .find_map(|line| line.strip_prefix("commit-hash:"))
        .map(str::trim)
        .filter(|hash| hash.len() == 40 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or(UNKNOWN);
    let target = std::env::var("TARGET").unwrap_or_else(|_| UNKNOWN.to_string());
    println!("cargo:rustc-env=HYPERJOB_RUSTC_VERSION={version}");
    println!("cargo:rustc-env=HYPERJOB_RUSTC_COMMIT={commit}");
    println!("cargo:rustc-env=HYPERJOB_TARGET={target}");
    println!(
        "cargo:rustc-env=HYPERJOB_ABI_BOUNDARY={}",
        boundary_fingerprint()
    );
    println!("cargo:rerun-if-env-changed=RUSTC");
    println!("cargo:rerun-if-changed=src/abi/boundary.rs");
    for (file, _) in boundary::BOUNDARY {
        println!("cargo:rerun-if-changed=src/{file}");
    }
}

/// `sha256:<hex>` of the boundary items' text. A boundary item that cannot be found fails
/// the build: the list in boundary.rs must name what exists.
fn boundary_fingerprint() -> String {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("src");
    let read = |file: &str| {
        std::fs::read_to_string(dir.join(file))
            .map_err(|err| format!("cannot read src/{file}: {err}"))
    };
    match boundary::boundary_text(&read) {
        Ok(text) => {
            let hex: String = sha2::Sha256::digest(text.as_bytes())
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            format!("sha256:{hex}")
        }
        Err(err) => panic!("hyperjob-plugin's boundary: {err}"),
    }
}
