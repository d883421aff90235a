//! Test fixture: a shared-library plugin that provides the backend `mismatch` but was built
//! "against another hyperjob-core API version". Its header is the current one with the API
//! version bumped, so hyperjob must refuse it before loading it (it deliberately has no
//! registration function either), and must not mind it when another backend is selected.

use hyperjob_core::abi::{panic_strategy, PluginHeader};

/// The header hyperjob checks first.
#[allow(unsafe_code)]
#[no_mangle]
pub static HYPERJOB_PLUGIN_HEADER: PluginHeader = {
    let mut header = PluginHeader::with(
        &["mismatch"],
        &[],
        env!("CARGO_PKG_VERSION"),
        panic_strategy(cfg!(panic = "unwind"), cfg!(panic = "abort")),
    );
    header.core_api_version += 1;
    header
};
