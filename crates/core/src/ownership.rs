//! Whose VM a VM is. Several installations (configs with different `state_dir`s) may share one
//! hypervisor; each VM records its owner, the `state_dir` of the installation that made it
//! ([`owner_of`]). Nothing hyperjob does (prepare's removal of leftovers, cleanup, gc) destroys
//! a VM another installation owns, or one whose record it cannot read.

use std::path::{Component, Path, PathBuf};

use crate::plugin::{Backend, PluginError, VmPresence};

/// The owner an installation records on its VMs: the absolute path of its `state_dir`, written
/// the same way every time (lexically normalised: no `.`, no doubled or trailing `/`), as UTF-8
/// with every control character replaced by U+FFFD, so any backend's record (XML, JSON) keeps it
/// exactly.
pub fn owner_of(state_dir: &Path) -> String {
    let normal: PathBuf = state_dir
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect();
    normal
        .to_string_lossy()
        .chars()
        .map(|c| if c.is_control() { '\u{FFFD}' } else { c })
        .collect()
}

/// Whose VM a listed VM is, as far as this installation's gc is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ownership {
    /// Made by this installation: judged.
    Ours,
    /// Recorded without an owner, by an older hyperjob: judged as before owners existed.
    Unrecorded,
    /// Made by another installation: left alone.
    Other,
}

/// The owner rule, as a pure function: `recorded` is the VM's recorded owner, `ours` this
/// installation's ([`owner_of`] its `state_dir`).
pub fn ownership(recorded: Option<&str>, ours: &str) -> Ownership {
    match recorded {
        None => Ownership::Unrecorded,
        Some(owner) if owner == ours => Ownership::Ours,
        Some(_) => Ownership::Other,
    }
}

/// Why `vm_name` must not be destroyed by this installation (owner `me`), or `None` when it
/// may be: it is absent (only its files may be left) or this installation's. A VM another
/// installation owns, or one whose hyperjob record cannot be read, is refused.
pub fn refusal(
    backend: &dyn Backend,
    vm_name: &str,
    me: &str,
) -> Result<Option<String>, PluginError> {
    match backend.inspect(vm_name) {
        Ok(presence) => Ok(refusal_of(&presence, vm_name, me)),
        // A backend that cannot look VMs up records no owners either: destroy by name.
        Err(PluginError::Unsupported(_)) => Ok(None),
        Err(err) => Err(err),
    }
}

/// Destroys `vm_name` unless [`refusal`] refuses it; a refusal is an error "left alone: why".
pub fn destroy_unless_refused(
    backend: &dyn Backend,
    vm_name: &str,
    me: &str,
) -> anyhow::Result<()> {
    match refusal(backend, vm_name, me)? {
        Some(why) => Err(anyhow::anyhow!("left alone: {why}")),
        None => Ok(backend.destroy(vm_name)?),
    }
}

/// [`refusal`], given what the backend found under `vm_name`.
pub fn refusal_of(presence: &VmPresence, vm_name: &str, me: &str) -> Option<String> {
    match presence {
        VmPresence::Absent => None,
        VmPresence::Owned(vm) => match (ownership(vm.owner.as_deref(), me), &vm.owner) {
            (Ownership::Other, Some(owner)) => Some(format!(
                "VM {vm_name} belongs to another hyperjob installation (state_dir {owner}); \
                 give each installation its own `name_prefix`"
            )),
            _ => None,
        },
        VmPresence::Unrecognised(reason) => Some(format!(
            "a VM named {vm_name} exists but hyperjob cannot tell it is its own ({reason})"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_of_this_installation_is_judged() {
        let ours = owner_of(Path::new("/var/lib/hyperjob"));

        assert_eq!(ownership(Some("/var/lib/hyperjob"), &ours), Ownership::Ours);
    }

    #[test]
    fn a_vm_without_a_recorded_owner_is_judged_as_before() {
        assert_eq!(ownership(None, "/var/lib/hyperjob"), Ownership::Unrecorded);
    }

    #[test]
    fn a_vm_of_another_installation_is_left_alone() {
        let ours = "/var/lib/hyperjob";

        for other in [
            "/var/lib/hyperjob-b",
            "/var/lib",
            "/var/lib/hyperjob/sub",
            "var/lib/hyperjob",
            "",
        ] {
            assert_eq!(ownership(Some(other), ours), Ownership::Other, "{other:?}");
        }
    }

    #[test]
    fn the_owner_is_written_the_same_way_for_the_same_directory() {
        for spelling in [
            "/var/lib/hyperjob",
            "/var/lib/hyperjob/",
            "/var//lib/./hyperjob",
        ] {
            assert_eq!(owner_of(Path::new(spelling)), "/var/lib/hyperjob");
        }
        assert_ne!(
            owner_of(Path::new("/var/lib/hyperjob/../x")),
            "/var/lib/x",
            "`..` is kept: it may cross a symlink"
        );
    }

    #[test]
    fn the_owner_carries_no_control_characters() {
        use std::os::unix::ffi::OsStrExt;
        let odd = Path::new(std::ffi::OsStr::from_bytes(b"/srv/a\nb\x01\xff<&>'\""));

        let owner = owner_of(odd);

        assert_eq!(owner, "/srv/a\u{FFFD}b\u{FFFD}\u{FFFD}<&>'\"");
    }
}
