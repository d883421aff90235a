//! `Config::parse` on arbitrary UTF-8, then the selected plugin tables through the libvirt and
//! SSH config parsers, exactly as the registry would hand them over.
//!
//! Invariants: nothing panics; every error a user can see is one line; an accepted config
//! keeps the documented guarantees (absolute state dir, absolute guest dirs without control
//! characters, named plugins).

#![no_main]

use std::path::Path;

use hyperjob_backend_libvirt::config::LibvirtConfig;
use hyperjob_core::config::Config;
use hyperjob_transport_ssh::config::SshConfig;
use libfuzzer_sys::fuzz_target;

const PATH: &str = "/etc/hyperjob/fuzz.toml";

fn assert_one_line(what: &str, message: &str, input: &str) {
    assert!(
        !message.contains(['\n', '\r']),
        "{what}: error is not one line: {message:?}\ninput: {input:?}"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::parse(Path::new(PATH), text) {
        Ok(config) => config,
        Err(err) => {
            assert_one_line("Config::parse", &err.to_string(), text);
            return;
        }
    };

    assert!(!config.backend.trim().is_empty(), "{text:?}");
    assert!(!config.transport.trim().is_empty(), "{text:?}");
    assert!(config.state_dir.is_absolute(), "{text:?}");
    for dir in [&config.builds_dir, &config.cache_dir] {
        assert!(dir.starts_with('/'), "{dir:?} from {text:?}");
        assert!(!dir.chars().any(char::is_control), "{dir:?} from {text:?}");
    }

    // The stage logic shows a plugin's config error wrapped by `Config::plugin_error`, under
    // the plugin's registered name.
    if let Err(err) = LibvirtConfig::from_table(&config.backend_table) {
        let shown = config.plugin_error("backends", "libvirt", err).to_string();
        assert_one_line("LibvirtConfig::from_table", &shown, text);
    }
    if let Err(err) = SshConfig::from_table(&config.transport_table, config.guest_keys) {
        let shown = config.plugin_error("transports", "ssh", err).to_string();
        assert_one_line("SshConfig::from_table", &shown, text);
    }
});
