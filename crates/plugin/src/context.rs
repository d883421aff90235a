//! What a plugin factory gets from hyperjob besides its own config table, and the two plugin
//! kinds.

use std::fmt;
use std::path::PathBuf;

/// Everything a plugin factory gets besides its own config table.
#[derive(Debug, Clone)]
pub struct PluginContext {
    /// hyperjob's state directory (`state_dir` of the config file, absolute); a plugin may keep
    /// per-job files below it, in a directory of its own (`<state_dir>/<plugin name>/`).
    pub state_dir: PathBuf,
    /// Where guest SSH keys come from: with per-job keys a transport needs no configured
    /// client key or pinned host keys.
    pub guest_keys: GuestKeyMode,
    /// Whether the config keeps a warm pool (`[pool]` with a size): the backend must then
    /// list, relabel and fingerprint its VMs.
    pub pool: bool,
}

/// Where the guest's SSH keys come from (`guest_keys` of the config file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuestKeyMode {
    /// The transport's configured client key and pinned host keys (baked into the image).
    #[default]
    Pinned,
    /// A fresh host key and client key pair per job, injected by the backend before boot
    /// ([`crate::VmRequest::keys`]).
    PerJob,
}

impl GuestKeyMode {
    /// As written in the config file.
    pub fn name(self) -> &'static str {
        match self {
            GuestKeyMode::Pinned => "pinned",
            GuestKeyMode::PerJob => "per-job",
        }
    }
}

/// The two kinds of plugin: a backend (`[backends.<name>]`) or a transport
/// (`[transports.<name>]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A [`crate::Backend`].
    Backend,
    /// A [`crate::Transport`].
    Transport,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Backend => f.write_str("backend"),
            Kind::Transport => f.write_str("transport"),
        }
    }
}
