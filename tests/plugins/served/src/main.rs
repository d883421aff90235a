//! Test fixture: the QEMU backend library's own factory, served as the executable backend
//! `qemuexec` by [`hyperjob_plugin::serve`] (what a plugin author calls). The e2e tests run jobs through it, so
//! serve() is driven by hyperjob for real (create with progress, cancellation and keys,
//! wait_address, destroy, list_owned, console_tail).

use hyperjob_plugin::serve::{serve, Served};

fn main() -> std::process::ExitCode {
    serve(Served::backend(
        "qemuexec",
        env!("CARGO_PKG_VERSION"),
        &["per_job_keys", "list_owned", "console_tail"],
        hyperjob_backend_qemu::build,
    ))
}
