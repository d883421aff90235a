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

    #[test]
    fn fingerprint_matches_openssh_notation() {
        // `ssh-keygen -lf` prints SHA256:<base64 without padding> of the key blob.
        let fp = fingerprint(b"");

        assert_eq!(fp, "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU");
    }
}
