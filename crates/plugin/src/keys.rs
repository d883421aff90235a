//! Per-job SSH credentials (`guest_keys = "per-job"`): a fresh ed25519 host key and a fresh
//! ed25519 client key pair for every job, so the first connection to a new VM is verified and
//! no long-lived key opens every VM.
//!
//! The client's private key is stored 0600 under `<state_dir>/job-<id>.keys/` for the later
//! stages and removed with the job's state. The host's private key never touches hyperjob's
//! state: it goes to the backend in memory, which injects it into the guest before boot.

use std::fmt;

#[cfg(feature = "keygen")]
use ssh_key::{Algorithm, LineEnding, PrivateKey};

/// Why a key pair could not be made (feature `keygen`).
#[cfg(feature = "keygen")]
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The random source or the key generation failed.
    #[error("cannot generate an ed25519 key")]
    Generate(#[source] ssh_key::Error),
    /// The key could not be written in OpenSSH's encoding.
    #[error("cannot encode an ed25519 key")]
    Encode(#[source] ssh_key::Error),
}

/// Text that must never be printed: `Debug` shows only that it is there.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps `text`.
    pub fn new(text: String) -> Self {
        Self(text)
    }

    /// The text itself: write it where it belongs (a file 0600, the guest), never to a log.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An ed25519 key pair in OpenSSH encodings.
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// `-----BEGIN OPENSSH PRIVATE KEY-----` …
    pub private_openssh: Secret,
    /// `ssh-ed25519 AAAA… comment`
    pub public_openssh: String,
}

#[cfg(feature = "keygen")]
impl KeyPair {
    /// A fresh ed25519 key pair from the operating system's random source.
    pub fn generate(comment: &str) -> Result<Self, KeyError> {
        let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)
            .map_err(KeyError::Generate)?;
        key.set_comment(comment);
        let private = key.to_openssh(LineEnding::LF).map_err(KeyError::Encode)?;
        let public = key.public_key().to_openssh().map_err(KeyError::Encode)?;
        Ok(Self {
            private_openssh: Secret::new(private.to_string()),
            public_openssh: public,
        })
    }
}

/// What a backend must put into the guest before it boots.
#[derive(Debug, Clone)]
pub struct GuestKeys {
    /// The user the transport logs in as.
    pub user: String,
    /// The client's public key, for that user's `authorized_keys`.
    pub authorized_key: String,
    /// The guest's host key pair.
    pub host: KeyPair,
}

#[cfg(all(test, feature = "keygen"))]
mod tests {
    use super::*;

    #[test]
    fn generated_pair_is_openssh_ed25519_and_matches() {
        let pair = KeyPair::generate("hyperjob-job-1").expect("generate");

        let private = PrivateKey::from_openssh(pair.private_openssh.expose()).expect("parse");
        assert!(pair.public_openssh.starts_with("ssh-ed25519 AAAA"));
        assert!(pair.public_openssh.ends_with(" hyperjob-job-1"));
        assert_eq!(
            private.public_key().to_openssh().expect("encode"),
            pair.public_openssh
        );
    }

    #[test]
    fn two_pairs_differ() {
        let a = KeyPair::generate("a").expect("generate");
        let b = KeyPair::generate("a").expect("generate");

        assert_ne!(a.public_openssh, b.public_openssh);
    }

    #[test]
    fn debug_never_shows_the_private_key() {
        let pair = KeyPair::generate("x").expect("generate");

        let shown = format!("{pair:?}");

        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert!(shown.contains("Secret(..)"), "{shown}");
    }
}
