//! Test fixture: a shared-library plugin built "against another hyperjob-core API version".
//! Its header is the current one with the API version bumped, so hyperjob must refuse it
//! before calling anything in it (it deliberately has no registration function either).

use hyperjob_core::abi::PluginHeader;

/// The header hyperjob checks first.
#[allow(unsafe_code)]
#[no_mangle]
pub static HYPERJOB_PLUGIN_HEADER: PluginHeader = {
    let mut header = PluginHeader::current();
    header.core_api_version += 1;
    header
};
