//! The frozen `#[repr(C)]` header every shared-library plugin exports, and the gate that
//! compares it with the host's.
//!
//! The header is plain data that hyperjob reads from the library *file* (hyperjob-core's
//! `abi::elf`) before it loads the library or runs any code in it. It says which
//! plugins the library provides (so a stage loads only the one it selected) and everything
//! that must be identical on both sides of the boundary: the rustc (its commit, not only its
//! version text), the target, hyperjob-plugin's version and the API number, a fingerprint of the
//! boundary types ([`super::boundary`]), the panic strategy and the global allocator.
//!
//! Layout versions: the first 16 bytes (magic, header version, core API version) are the same
//! in every layout. A layout, once released, never changes; a new one gets a new
//! [`HEADER_VERSION`]. Version 1 (until hyperjob-core 0.1.0 with API 4) had no plugin names,
//! rustc commit, boundary fingerprint, panic strategy or allocator; such a library is refused
//! naming both versions.

use crate::context::Kind;

/// First bytes of every header.
pub const HEADER_MAGIC: [u8; 8] = *b"HYPERJOB";
/// Layout version of [`PluginHeader`]. Frozen: a new layout gets a new number.
pub const HEADER_VERSION: u32 = 2;
/// Version of the plugin API (the traits, `PluginContext`, the registrar): bumped whenever a
/// plugin built against the old API would misbehave even though the boundary types are the
/// same (a changed meaning). 2: `VmRequest::owner`, `OwnedVm::owner`. 3: `Backend::inspect`,
/// `Backend::names_with_files`. 4: `Backend::relabel`, `Backend::fingerprint`. 5:
/// `Backend::doctor`, `Transport::doctor`, `Check`. 6: `Backend::halt`. 7:
/// `Transport::can_connect`, `Transport::connect`, `Connection`, `PluginError::NotStarted`. 8:
/// the contract moved from hyperjob-core to hyperjob-plugin (`PluginRegistrar::into_parts`). 9:
/// `Transport::access_command`. 10: `Transport::upload`, `Upload`. 11: `Backend::create` gets a
/// deadline and a cancel flag; `PluginContext::pool`. 12: endpoints beyond TCP
/// (`Endpoint::address`, `Address`, `EndpointKind`; `Backend::endpoint_kinds`,
/// `Transport::endpoint_kinds`).
pub const CORE_API_VERSION: u32 = 12;
/// The rustc that built this hyperjob-plugin (`rustc --version`).
pub const RUSTC_VERSION: &str = env!("HYPERJOB_RUSTC_VERSION");
/// The commit of that rustc (`rustc -vV`, `commit-hash`), or `unknown`.
pub const RUSTC_COMMIT: &str = env!("HYPERJOB_RUSTC_COMMIT");
/// The target this hyperjob-plugin was built for.
pub const TARGET: &str = env!("HYPERJOB_TARGET");
/// Fingerprint of the types that cross the library boundary, computed by the build script
/// from their source text ([`super::boundary::BOUNDARY`]).
pub const BOUNDARY_FINGERPRINT: &str = env!("HYPERJOB_ABI_BOUNDARY");
/// The global allocator on both sides: `export_plugin!` installs `std::alloc::System` in the
/// plugin (a second `#[global_allocator]` anywhere in the plugin's crates fails its build), and
/// the hyperjob binary installs it too.
pub const ALLOCATOR: &str = "system";
/// `panic_strategy`: the plugin's build could not tell.
pub const PANIC_UNKNOWN: u32 = 0;
/// `panic_strategy`: `panic = "unwind"` (the only one the gate accepts).
pub const PANIC_UNWIND: u32 = 1;
/// `panic_strategy`: `panic = "abort"`.
pub const PANIC_ABORT: u32 = 2;
/// The panic strategy this hyperjob-plugin was built with (the whole build shares one).
pub const PANIC_STRATEGY: u32 = panic_strategy(cfg!(panic = "unwind"), cfg!(panic = "abort"));
/// What a header says when a value could not be found out; it never matches anything.
pub const UNKNOWN: &str = "unknown";

/// Longest plugin name in a header.
pub const MAX_NAME: usize = 64;
const SHORT: usize = 32;
const MEDIUM: usize = 64;
const TEXT: usize = 96;
const NAMES: usize = 256;

/// The header a plugin library exports under `HYPERJOB_PLUGIN_HEADER` (layout version 2).
/// Texts are UTF-8, NUL-padded; name lists are names separated by `\n`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct PluginHeader {
    /// [`HEADER_MAGIC`].
    pub magic: [u8; 8],
    /// [`HEADER_VERSION`] of the plugin's build.
    pub header_version: u32,
    /// [`CORE_API_VERSION`] of the plugin's build.
    pub core_api_version: u32,
    /// [`PANIC_UNWIND`], [`PANIC_ABORT`] or [`PANIC_UNKNOWN`], of the plugin's build.
    pub panic_strategy: u32,
    /// Zero.
    pub reserved: u32,
    /// [`RUSTC_VERSION`] of the plugin's build.
    pub rustc_version: [u8; TEXT],
    /// [`RUSTC_COMMIT`] of the plugin's build.
    pub rustc_commit: [u8; MEDIUM],
    /// The version of hyperjob-plugin the plugin was built against.
    pub core_version: [u8; TEXT],
    /// [`TARGET`] of the plugin's build.
    pub target: [u8; TEXT],
    /// [`BOUNDARY_FINGERPRINT`] of the plugin's build.
    pub boundary: [u8; TEXT],
    /// [`ALLOCATOR`] of the plugin's build.
    pub allocator: [u8; SHORT],
    /// The plugin crate's own version (shown by `hyperjob plugins`; not compared).
    pub plugin_version: [u8; SHORT],
    /// The backends the library registers.
    pub backends: [u8; NAMES],
    /// The transports the library registers.
    pub transports: [u8; NAMES],
}

/// Size of the part every layout shares: magic, header version, core API version.
pub const COMMON_PREFIX: usize = 16;

/// The panic strategy value for a build where `cfg!(panic = "unwind")` is `unwind` and
/// `cfg!(panic = "abort")` is `abort` (`export_plugin!` asks in the plugin's own crate).
pub const fn panic_strategy(unwind: bool, abort: bool) -> u32 {
    match (unwind, abort) {
        (true, false) => PANIC_UNWIND,
        (false, true) => PANIC_ABORT,
        _ => PANIC_UNKNOWN,
    }
}

fn panic_strategy_name(value: u32) -> &'static str {
    match value {
        PANIC_UNWIND => "unwind",
        PANIC_ABORT => "abort",
        _ => UNKNOWN,
    }
}

const fn text<const N: usize>(value: &str) -> [u8; N] {
    let bytes = value.as_bytes();
    let mut out = [0u8; N];
    let mut i = 0;
    while i < bytes.len() && i < N - 1 {
        out[i] = bytes[i];
        i += 1;
    }
    out
}

/// Names joined by `\n`. Checked at compile time: a name `export_plugin!` cannot put into the
/// header fails the plugin's build.
const fn names(list: &[&str]) -> [u8; NAMES] {
    let mut out = [0u8; NAMES];
    let mut at = 0;
    let mut n = 0;
    while n < list.len() {
        let name = list[n].as_bytes();
        assert!(
            !name.is_empty() && name.len() <= MAX_NAME,
            "a plugin name must be 1 to 64 bytes"
        );
        if n > 0 {
            assert!(at < NAMES - 1, "too many plugin names for the header");
            out[at] = b'\n';
            at += 1;
        }
        let mut i = 0;
        while i < name.len() {
            assert!(
                name[i] >= 0x20 && name[i] != 0x7f,
                "a plugin name must not contain control characters"
            );
            assert!(at < NAMES - 1, "too many plugin names for the header");
            out[at] = name[i];
            at += 1;
            i += 1;
        }
        n += 1;
    }
    out
}

fn read_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

fn known(value: &str) -> bool {
    !value.is_empty() && !value.eq_ignore_ascii_case(UNKNOWN) && !value.starts_with("unknown ")
}

impl PluginHeader {
    /// The host's header: what a plugin must match. Lists no plugins.
    pub const fn host() -> Self {
        Self::with(&[], &[], "", PANIC_STRATEGY)
    }

    /// The header of a plugin library providing `backends` and `transports`, built right now
    /// against this hyperjob-plugin with `panic_strategy` ([`panic_strategy`]).
    pub const fn with(
        backends: &[&str],
        transports: &[&str],
        plugin_version: &str,
        panic_strategy: u32,
    ) -> Self {
        Self {
            magic: HEADER_MAGIC,
            header_version: HEADER_VERSION,
            core_api_version: CORE_API_VERSION,
            panic_strategy,
            reserved: 0,
            rustc_version: text(RUSTC_VERSION),
            rustc_commit: text(RUSTC_COMMIT),
            core_version: text(crate::VERSION),
            target: text(TARGET),
            boundary: text(BOUNDARY_FINGERPRINT),
            allocator: text(ALLOCATOR),
            plugin_version: text(plugin_version),
            backends: names(backends),
            transports: names(transports),
        }
    }

    /// The header's bytes as a library file holds them.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(std::mem::size_of::<Self>());
        out.extend_from_slice(&self.magic);
        for value in [
            self.header_version,
            self.core_api_version,
            self.panic_strategy,
            self.reserved,
        ] {
            out.extend_from_slice(&value.to_ne_bytes());
        }
        for field in self.texts() {
            out.extend_from_slice(field);
        }
        out
    }

    fn texts(&self) -> [&[u8]; 9] {
        [
            &self.rustc_version,
            &self.rustc_commit,
            &self.core_version,
            &self.target,
            &self.boundary,
            &self.allocator,
            &self.plugin_version,
            &self.backends,
            &self.transports,
        ]
    }

    /// Reads a header from the bytes of the `HYPERJOB_PLUGIN_HEADER` symbol, checking magic,
    /// layout version and size. An error says why in words (for "… is not loadable: …").
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let u32_at = |at: usize| {
            bytes
                .get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_ne_bytes)
        };
        if bytes.len() < COMMON_PREFIX || bytes[..8] != HEADER_MAGIC {
            return Err("header magic differs: not a hyperjob plugin header".to_string());
        }
        let version = u32_at(8).unwrap_or_default();
        if version != HEADER_VERSION {
            let api = u32_at(12).unwrap_or_default();
            return Err(format!(
                "header version: plugin {version}, hyperjob {HEADER_VERSION} (built against an \
                 older or newer hyperjob-core, core API {api}; rebuild it against this one)"
            ));
        }
        if bytes.len() != std::mem::size_of::<Self>() {
            return Err(format!(
                "header size: plugin {} bytes, hyperjob {} (a corrupt header)",
                bytes.len(),
                std::mem::size_of::<Self>()
            ));
        }
        let mut header = Self::host();
        header.core_api_version = u32_at(12).unwrap_or_default();
        header.panic_strategy = u32_at(16).unwrap_or_default();
        header.reserved = u32_at(20).unwrap_or_default();
        let mut at = 24;
        for field in [
            &mut header.rustc_version[..],
            &mut header.rustc_commit[..],
            &mut header.core_version[..],
            &mut header.target[..],
            &mut header.boundary[..],
            &mut header.allocator[..],
            &mut header.plugin_version[..],
            &mut header.backends[..],
            &mut header.transports[..],
        ] {
            let len = field.len();
            field.copy_from_slice(&bytes[at..at + len]);
            at += len;
        }
        Ok(header)
    }

    /// The names of the `kind` plugins the library says it provides.
    pub fn names(&self, kind: Kind) -> Vec<String> {
        let list = match kind {
            Kind::Backend => &self.backends,
            Kind::Transport => &self.transports,
        };
        read_text(list)
            .split('\n')
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// Whether the library says it provides the `kind` plugin `name`.
    pub fn provides(&self, kind: Kind, name: &str) -> bool {
        self.names(kind).iter().any(|n| n == name)
    }

    /// The plugin crate's version.
    pub fn plugin_version(&self) -> String {
        read_text(&self.plugin_version)
    }

    /// "backend qemu, transport x": what the library provides, for messages.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for kind in [Kind::Backend, Kind::Transport] {
            for name in self.names(kind) {
                parts.push(format!("{kind} {name:?}"));
            }
        }
        if parts.is_empty() {
            "no plugins".to_string()
        } else {
            parts.join(", ")
        }
    }

    /// Every way `self` (the plugin's) differs from `host`, as "what: plugin X, hyperjob Y".
    /// A value either side could not find out ([`UNKNOWN`]) is a difference: two unknown
    /// compilers are not the same compiler.
    pub fn mismatches(&self, host: &PluginHeader) -> Vec<String> {
        if self.magic != host.magic {
            return vec!["header magic differs: not a hyperjob plugin header".to_string()];
        }
        if self.header_version != host.header_version {
            return vec![format!(
                "header version: plugin {}, hyperjob {}",
                self.header_version, host.header_version
            )];
        }
        let mut out = Vec::new();
        if self.core_api_version != host.core_api_version {
            out.push(format!(
                "core API version: plugin {}, hyperjob {}",
                self.core_api_version, host.core_api_version
            ));
        }
        let texts: [(&str, &[u8], &[u8]); 6] = [
            ("rustc", &self.rustc_version, &host.rustc_version),
            ("rustc commit", &self.rustc_commit, &host.rustc_commit),
            ("hyperjob-plugin", &self.core_version, &host.core_version),
            ("target", &self.target, &host.target),
            ("boundary types", &self.boundary, &host.boundary),
            ("allocator", &self.allocator, &host.allocator),
        ];
        for (what, plugin, ours) in texts {
            let (plugin_text, our_text) = (read_text(plugin), read_text(ours));
            if plugin != ours || !known(&plugin_text) || !known(&our_text) {
                out.push(format!(
                    "{what}: plugin {plugin_text:?}, hyperjob {our_text:?}{}",
                    unknown_note(&plugin_text, &our_text)
                ));
            }
        }
        if self.panic_strategy != host.panic_strategy || self.panic_strategy == PANIC_UNKNOWN {
            let (plugin, ours) = (
                panic_strategy_name(self.panic_strategy),
                panic_strategy_name(host.panic_strategy),
            );
            let why = if self.panic_strategy == PANIC_ABORT {
                " (a panic in the plugin would abort hyperjob mid-stage: build it with panic = \"unwind\")"
            } else {
                unknown_note(plugin, ours)
            };
            out.push(format!(
                "panic strategy: plugin {plugin}, hyperjob {ours}{why}"
            ));
        }
        if self.reserved != 0 {
            out.push(format!(
                "reserved field: plugin {}, hyperjob 0",
                self.reserved
            ));
        }
        out
    }
}

fn unknown_note(plugin: &str, ours: &str) -> &'static str {
    if known(plugin) && known(ours) {
        ""
    } else {
        " (an unknown value never matches)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_matches_itself() {
        assert_eq!(
            PluginHeader::host().mismatches(&PluginHeader::host()),
            Vec::<String>::new()
        );
    }

    /// The layout is frozen: built here byte by byte from its documented layout, it must equal
    /// what this hyperjob-plugin writes. A reordered, resized or retyped field fails this.
    #[test]
    fn the_header_layout_is_frozen() {
        let header = PluginHeader::with(&["qemu", "other"], &["sshcli"], "1.2.3", PANIC_UNWIND);
        let mut expected = Vec::new();
        expected.extend_from_slice(b"HYPERJOB");
        for value in [2u32, CORE_API_VERSION, 1, 0] {
            expected.extend_from_slice(&value.to_ne_bytes());
        }
        for (value, size) in [
            (RUSTC_VERSION, 96),
            (RUSTC_COMMIT, 64),
            (env!("CARGO_PKG_VERSION"), 96),
            (TARGET, 96),
            (BOUNDARY_FINGERPRINT, 96),
            ("system", 32),
            ("1.2.3", 32),
            ("qemu\nother", 256),
            ("sshcli", 256),
        ] {
            let mut field = vec![0u8; size];
            field[..value.len()].copy_from_slice(value.as_bytes());
            expected.extend_from_slice(&field);
        }

        assert_eq!(
            std::mem::size_of::<PluginHeader>(),
            24 + 96 * 4 + 64 + 32 * 2 + 256 * 2
        );
        assert_eq!(std::mem::align_of::<PluginHeader>(), 4);
        assert_eq!(header.to_bytes(), expected);
        assert_eq!(raw_bytes(&header), expected);
    }

    /// The header's memory, as the loader reads it from a file.
    fn raw_bytes(header: &PluginHeader) -> Vec<u8> {
        let size = std::mem::size_of::<PluginHeader>();
        // SAFETY: PluginHeader is #[repr(C)] plain data without padding (asserted by
        // `the_header_layout_is_frozen`), so all of its `size` bytes are initialised.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(std::ptr::from_ref(header).cast::<u8>(), size).to_vec()
        }
    }

    #[test]
    fn a_header_survives_the_trip_through_its_bytes() {
        let header = PluginHeader::with(&["a"], &["b", "c"], "0.9.0", PANIC_UNWIND);

        let read = PluginHeader::from_bytes(&header.to_bytes()).expect("read");

        assert_eq!(read.to_bytes(), header.to_bytes());
        assert_eq!(read.names(Kind::Backend), ["a"]);
        assert_eq!(read.names(Kind::Transport), ["b", "c"]);
        assert!(read.provides(Kind::Transport, "c"));
        assert!(!read.provides(Kind::Backend, "c"));
        assert_eq!(read.plugin_version(), "0.9.0");
        assert_eq!(
            read.describe(),
            "backend \"a\", transport \"b\", transport \"c\""
        );
    }

    /// The layout of version 1, as libraries built before layout 2 export it.
    fn version_1_header() -> Vec<u8> {
        let mut bytes = b"HYPERJOB".to_vec();
        bytes.extend_from_slice(&1u32.to_ne_bytes());
        bytes.extend_from_slice(&4u32.to_ne_bytes());
        bytes.extend_from_slice(&[b'x'; 3 * 96]);
        bytes
    }

    #[test]
    fn a_version_1_header_is_refused_naming_both_layouts() {
        let err = PluginHeader::from_bytes(&version_1_header()).expect_err("old layout");

        assert!(
            err.starts_with("header version: plugin 1, hyperjob 2 (built against an older"),
            "{err}"
        );
        assert!(err.contains("core API 4"), "{err}");
    }

    #[test]
    fn foreign_or_truncated_bytes_are_refused() {
        assert!(PluginHeader::from_bytes(b"NOTOURS!\x02\0\0\0\x04\0\0\0")
            .expect_err("magic")
            .contains("magic"));
        assert!(PluginHeader::from_bytes(b"HYPER").is_err());
        let mut short = PluginHeader::host().to_bytes();
        short.truncate(600);
        assert!(PluginHeader::from_bytes(&short)
            .expect_err("short")
            .starts_with("header size: plugin 600 bytes"));
    }

    /// What the header carries comes from the real build: a build script that could not ask
    /// rustc would write "unknown", which never matches.
    #[test]
    fn the_header_records_the_real_compiler_target_and_boundary() {
        assert!(RUSTC_VERSION.starts_with("rustc 1."), "{RUSTC_VERSION}");
        assert_eq!(RUSTC_COMMIT.len(), 40, "{RUSTC_COMMIT}");
        assert!(RUSTC_COMMIT.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(
            RUSTC_VERSION.contains(&RUSTC_COMMIT[..9]),
            "{RUSTC_VERSION}"
        );
        assert!(TARGET.starts_with(std::env::consts::ARCH), "{TARGET}");
        assert!(TARGET.contains(std::env::consts::OS), "{TARGET}");
        assert!(BOUNDARY_FINGERPRINT.starts_with("sha256:"));
        assert_eq!(BOUNDARY_FINGERPRINT.len(), "sha256:".len() + 64);
        assert_eq!(PANIC_STRATEGY, PANIC_UNWIND);
        assert_eq!(crate::VERSION, env!("CARGO_PKG_VERSION"));
    }

    /// Each field, changed alone, is refused, and the refusal names that field.
    #[test]
    fn a_header_differing_in_any_one_field_is_refused_naming_it() {
        type Change = fn(&mut PluginHeader);
        let changes: [(&str, Change); 13] = [
            ("header magic", |h| h.magic[7] ^= 1),
            ("header version", |h| h.header_version += 1),
            ("core API version", |h| h.core_api_version -= 1),
            ("rustc", |h| h.rustc_version[6] ^= 1),
            ("rustc commit", |h| h.rustc_commit[0] ^= 1),
            ("hyperjob-plugin", |h| h.core_version[0] ^= 1),
            ("target", |h| h.target[0] ^= 1),
            // Past the text's terminating NUL: invisible when printed, still a difference.
            ("target", |h| h.target[TEXT - 1] = b'x'),
            ("boundary types", |h| h.boundary[10] ^= 1),
            ("allocator", |h| h.allocator = text("jemalloc")),
            ("panic strategy", |h| h.panic_strategy = PANIC_ABORT),
            ("panic strategy", |h| h.panic_strategy = PANIC_UNKNOWN),
            ("reserved", |h| h.reserved = 1),
        ];

        for (field, change) in changes {
            let mut plugin = PluginHeader::host();
            change(&mut plugin);

            let found = plugin.mismatches(&PluginHeader::host());

            assert_eq!(found.len(), 1, "{field}: {found:?}");
            assert!(found[0].starts_with(field), "{field}: {found:?}");
        }
    }

    #[test]
    fn names_and_plugin_version_are_not_compared() {
        let plugin = PluginHeader::with(&["x"], &["y"], "9.9.9", PANIC_STRATEGY);

        assert!(plugin.mismatches(&PluginHeader::host()).is_empty());
    }

    #[test]
    fn unknown_never_equals_unknown() {
        let mut plugin = PluginHeader::host();
        let mut host = PluginHeader::host();
        for header in [&mut plugin, &mut host] {
            header.rustc_commit = text(UNKNOWN);
            header.boundary = text("");
        }

        let found = plugin.mismatches(&host);

        assert_eq!(
            found,
            [
                "rustc commit: plugin \"unknown\", hyperjob \"unknown\" (an unknown value never matches)",
                "boundary types: plugin \"\", hyperjob \"\" (an unknown value never matches)",
            ]
        );
        let mut plugin = PluginHeader::host();
        let mut host = PluginHeader::host();
        plugin.panic_strategy = PANIC_UNKNOWN;
        host.panic_strategy = PANIC_UNKNOWN;
        assert_eq!(
            plugin.mismatches(&host),
            ["panic strategy: plugin unknown, hyperjob unknown (an unknown value never matches)"]
        );
    }

    #[test]
    fn an_abort_plugin_is_refused_saying_why() {
        let plugin = PluginHeader::with(&["x"], &[], "1", PANIC_ABORT);

        let found = plugin.mismatches(&PluginHeader::host()).join("; ");

        assert!(
            found.starts_with("panic strategy: plugin abort, hyperjob unwind (a panic in the plugin would abort hyperjob"),
            "{found}"
        );
    }

    #[test]
    fn rustc_mismatch_shows_both_compilers() {
        let mut plugin = PluginHeader::host();
        plugin.rustc_version = text("rustc 1.0.0 (a28077b28 2015-05-13)");

        let found = plugin.mismatches(&PluginHeader::host()).join("; ");

        assert!(
            found.contains(
                "rustc: plugin \"rustc 1.0.0 (a28077b28 2015-05-13)\", hyperjob \"rustc "
            ),
            "{found}"
        );
    }

    #[test]
    fn foreign_magic_is_refused_before_anything_else_is_read() {
        let mut plugin = PluginHeader::host();
        plugin.magic = *b"NOTOURS!";
        plugin.core_api_version = 99;

        let found = plugin.mismatches(&PluginHeader::host());

        assert_eq!(found.len(), 1);
        assert!(found[0].contains("magic"), "{found:?}");
    }

    #[test]
    fn long_texts_are_truncated_and_nul_terminated() {
        let long = "x".repeat(500);

        let stored: [u8; TEXT] = text(&long);

        assert_eq!(read_text(&stored).len(), TEXT - 1);
    }

    #[test]
    fn the_panic_strategy_comes_from_the_cfg_pair() {
        assert_eq!(panic_strategy(true, false), PANIC_UNWIND);
        assert_eq!(panic_strategy(false, true), PANIC_ABORT);
        assert_eq!(panic_strategy(false, false), PANIC_UNKNOWN);
    }
}
