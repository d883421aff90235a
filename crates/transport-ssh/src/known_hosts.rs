//! Pinned host keys. A guest's address changes from job to job, but every VM booted from one
//! image presents that image's host keys, so the file is read as a set of acceptable keys:
//! OpenSSH `known_hosts` lines (`<patterns> <type> <base64> [comment]`, host patterns ignored)
//! or `.pub` lines (`<type> <base64> [comment]`).

use base64::Engine as _;

/// One acceptable host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostKey {
    pub key_type: String,
    pub blob: Vec<u8>,
}

/// Parses the keys in a known_hosts or .pub file; comments, blank, `@revoked` and
/// undecodable lines are skipped.
pub fn parse(text: &str) -> Vec<HostKey> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<HostKey> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let mut words: Vec<&str> = line.split_whitespace().collect();
    match words.first() {
        Some(&"@revoked") => return None,
        Some(&"@cert-authority") => return None,
        _ => {}
    }
    if !looks_like_key_type(words.first()?) {
        // known_hosts form: drop the host patterns.
        words.remove(0);
    }
    let key_type = *words.first()?;
    if !looks_like_key_type(key_type) {
        return None;
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(words.get(1)?)
        .ok()?;
    Some(HostKey {
        key_type: key_type.to_string(),
        blob,
    })
}

fn looks_like_key_type(word: &str) -> bool {
    word.starts_with("ssh-") || word.starts_with("ecdsa-") || word.starts_with("sk-")
}

/// Host-key algorithms libssh2 can verify, in the order we prefer them, each with the key type
/// (as written in `known_hosts`) it proves. RSA keys sign with SHA-2 where the server can.
const HOST_KEY_ALGORITHMS: &[(&str, &str)] = &[
    ("ssh-ed25519", "ssh-ed25519"),
    ("ecdsa-sha2-nistp256", "ecdsa-sha2-nistp256"),
    ("ecdsa-sha2-nistp384", "ecdsa-sha2-nistp384"),
    ("ecdsa-sha2-nistp521", "ecdsa-sha2-nistp521"),
    ("rsa-sha2-512", "ssh-rsa"),
    ("rsa-sha2-256", "ssh-rsa"),
    ("ssh-rsa", "ssh-rsa"),
];

/// The host-key algorithms to offer in the key exchange, as OpenSSH's client does for a host
/// it knows: only those that can prove one of the pinned keys, so a server with several host
/// keys presents one we can check. `None` when no pinned key has such an algorithm (then the
/// library's defaults apply and the key is refused after the handshake, naming it).
pub fn host_key_algorithms(keys: &[HostKey]) -> Option<String> {
    let offered: Vec<&str> = HOST_KEY_ALGORITHMS
        .iter()
        .filter(|(_, key_type)| keys.iter().any(|key| key.key_type == *key_type))
        .map(|(algorithm, _)| *algorithm)
        .collect();
    (!offered.is_empty()).then(|| offered.join(","))
}

/// The SHA-256 fingerprint in OpenSSH's notation, for error messages.
pub fn fingerprint(blob: &[u8]) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "AAAAC3NzaC1lZDI1NTE5AAAAIGh5cGVyam9iLXRlc3Qta2V5LTAxMjM0NTY3ODlhYmNk";

    #[test]
    fn known_hosts_line_with_patterns_is_read() {
        let keys = parse(&format!("* ssh-ed25519 {ED25519}\n"));

        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].key_type, "ssh-ed25519");
        assert_eq!(keys[0].blob.len(), 51);
    }

    #[test]
    fn pub_file_line_is_read() {
        let keys = parse(&format!("ssh-ed25519 {ED25519} root@image\n"));

        assert_eq!(keys.len(), 1);
    }

    #[test]
    fn comments_revoked_and_garbage_are_skipped() {
        let text = format!(
            "# pinned keys\n\n@revoked * ssh-ed25519 {ED25519}\nhost not-a-key\n* ssh-rsa !!!\n"
        );

        assert!(parse(&text).is_empty());
    }

    fn key(key_type: &str) -> HostKey {
        HostKey {
            key_type: key_type.to_string(),
            blob: Vec::new(),
        }
    }

    #[test]
    fn only_algorithms_that_prove_a_pinned_key_are_offered() {
        assert_eq!(
            host_key_algorithms(&[key("ssh-rsa")]).as_deref(),
            Some("rsa-sha2-512,rsa-sha2-256,ssh-rsa")
        );
        assert_eq!(
            host_key_algorithms(&[key("ecdsa-sha2-nistp256")]).as_deref(),
            Some("ecdsa-sha2-nistp256")
        );
        assert_eq!(
            host_key_algorithms(&[key("ssh-ed25519")]).as_deref(),
            Some("ssh-ed25519")
        );
    }

    #[test]
    fn several_pinned_types_are_offered_in_preference_order() {
        let keys = [
            key("ssh-rsa"),
            key("ssh-ed25519"),
            key("ecdsa-sha2-nistp384"),
        ];

        assert_eq!(
            host_key_algorithms(&keys).as_deref(),
            Some("ssh-ed25519,ecdsa-sha2-nistp384,rsa-sha2-512,rsa-sha2-256,ssh-rsa")
        );
    }

    #[test]
    fn without_a_usable_pinned_type_the_defaults_apply() {
        assert_eq!(host_key_algorithms(&[]), None);
        assert_eq!(
            host_key_algorithms(&[key("sk-ssh-ed25519@openssh.com")]),
            None
        );
    }

    #[test]
    fn fingerprint_matches_openssh_notation() {
        // `ssh-keygen -lf` prints SHA256:<base64 without padding> of the key blob.
        let fp = fingerprint(b"");

        assert_eq!(fp, "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    }
}
