//! Test fixture: a stale plugin library, as one built against hyperjob-core before header
//! layout 2 looks to hyperjob. It exports the version-1 header (magic, layout 1, core API 4,
//! then rustc, core version and target as 96-byte texts) and a registration function that
//! must never be called. Left in a plugin directory after an upgrade, it must not affect any
//! stage of a job that does not select it, and `hyperjob plugins` must list it as refused.

/// The header layout hyperjob-core wrote before layout 2.
#[repr(C)]
#[derive(Debug)]
pub struct HeaderV1 {
    pub magic: [u8; 8],
    pub header_version: u32,
    pub core_api_version: u32,
    pub rustc_version: [u8; 96],
    pub core_version: [u8; 96],
    pub target: [u8; 96],
}

const fn text(value: &str) -> [u8; 96] {
    let bytes = value.as_bytes();
    let mut out = [0u8; 96];
    let mut i = 0;
    while i < bytes.len() {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

#[allow(unsafe_code)]
#[no_mangle]
pub static HYPERJOB_PLUGIN_HEADER: HeaderV1 = HeaderV1 {
    magic: *b"HYPERJOB",
    header_version: 1,
    core_api_version: 4,
    rustc_version: text("rustc 1.89.0 (29483883e 2025-08-04)"),
    core_version: text("0.1.0"),
    target: text("x86_64-unknown-linux-gnu"),
};

/// Never called: hyperjob refuses the header first.
#[allow(unsafe_code)]
#[no_mangle]
pub extern "C" fn hyperjob_plugin_register() {
    std::process::abort();
}

/// Loading this library at all would be visible: its initialiser aborts the process.
#[allow(unsafe_code)]
#[used]
#[link_section = ".init_array"]
static ABORT_IF_LOADED: extern "C" fn() = abort_if_loaded;

extern "C" fn abort_if_loaded() {
    std::process::abort();
}
