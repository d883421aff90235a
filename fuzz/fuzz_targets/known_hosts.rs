//! `known_hosts::parse` on arbitrary text: the pinned host keys file an admin supplies (and,
//! with per-job keys, the host key line a job hands over).
//!
//! Invariants: no panic; every key returned has one of the accepted key-type prefixes, a
//! key type that is one word, and a fingerprint that can be computed.

#![no_main]

use hyperjob_transport_ssh::known_hosts;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let keys = known_hosts::parse(text);
    assert!(keys.len() <= text.lines().count(), "{text:?}");
    for key in &keys {
        assert!(
            ["ssh-", "ecdsa-", "sk-"]
                .iter()
                .any(|prefix| key.key_type.starts_with(prefix)),
            "{key:?} from {text:?}"
        );
        assert!(
            !key.key_type.contains(char::is_whitespace),
            "{key:?} from {text:?}"
        );
        let fingerprint = known_hosts::fingerprint(&key.blob);
        assert!(fingerprint.starts_with("SHA256:"), "{fingerprint}");
    }
});
