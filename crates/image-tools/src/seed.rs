//! Per-job keys for stock cloud images: a cloud-init NoCloud seed (an ISO 9660 image labelled
//! `cidata` holding `meta-data` and `user-data`) that installs the job's host key and authorises
//! the job's client key for the login user before anything can connect.
//!
//! The seed holds a private key: it is written 0600 next to the overlay and deleted with the VM;
//! its source files live only for the seconds it takes to build it.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use hyperjob_plugin::keys::GuestKeys;
use hyperjob_plugin::PluginError;

/// A YAML scalar that can hold any text: a JSON string is a valid YAML double-quoted scalar.
fn yaml_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// `meta-data`: the instance id (new per job, so cloud-init runs its per-instance modules).
pub fn meta_data(vm_name: &str) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_string(vm_name),
        yaml_string(vm_name)
    )
}

/// `user-data`: exactly the job's host key, and the job's client key for the login user.
///
/// With `ssh_keys` present cloud-init deletes the image's host keys and generates none
/// (`ssh_genkeytypes: [ed25519]` only satisfies its schema, which rejects an empty list). The
/// user gets no usable password (`*`) but is not *locked* (`!`): sshd without PAM refuses key
/// logins to locked accounts.
pub fn user_data(keys: &GuestKeys) -> String {
    let mut text = String::from("#cloud-config\nssh_deletekeys: true\nssh_genkeytypes: [ed25519]\nssh_keys:\n  ed25519_private: |\n");
    for line in keys.host.private_openssh.expose().lines() {
        text.push_str("    ");
        text.push_str(line);
        text.push('\n');
    }
    text.push_str(&format!(
        "  ed25519_public: {}\nusers:\n  - name: {}\n    shell: /bin/bash\n    lock_passwd: false\n    hashed_passwd: \"*\"\n    ssh_authorized_keys:\n      - {}\ndisable_root: true\n",
        yaml_string(&keys.host.public_openssh),
        yaml_string(&keys.user),
        yaml_string(&keys.authorized_key),
    ));
    text
}

/// The work directory beside the seed is `.<vm name>` followed by this.
pub const WORK_DIR_SUFFIX: &str = ".seed.d";

/// Where the seed's sources (the guest's private host key among them) are written while the
/// ISO is built: a hidden directory beside it.
pub fn work_dir(iso: &Path, vm_name: &str) -> PathBuf {
    let parent = iso.parent().unwrap_or(Path::new("/"));
    parent.join(format!(".{vm_name}{WORK_DIR_SUFFIX}"))
}

/// Removes the work directory a killed build left; absent is fine.
pub fn remove_work_dir(iso: &Path, vm_name: &str) -> Result<(), PluginError> {
    let work = work_dir(iso, vm_name);
    match fs::remove_dir_all(&work) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(PluginError::system(
            format!("cannot remove {}", work.display()),
            err,
        )),
    }
}

/// Builds the seed ISO at `iso`. Needs `genisoimage` (or `xorriso`) on the host.
pub fn create(iso: &Path, vm_name: &str, keys: &GuestKeys) -> Result<(), PluginError> {
    let work = work_dir(iso, vm_name);
    let _ = fs::remove_dir_all(&work);
    DirBuilder::new()
        .mode(0o700)
        .create(&work)
        .map_err(|err| PluginError::system(format!("cannot create {}", work.display()), err))?;
    let result = write_sources(&work, vm_name, keys).and_then(|()| build_iso(&work, iso));
    // The sources hold the host's private key: they go whatever happened.
    let _ = fs::remove_dir_all(&work);
    if result.is_err() {
        let _ = fs::remove_file(iso);
    }
    result
}

fn write_sources(work: &Path, vm_name: &str, keys: &GuestKeys) -> Result<(), PluginError> {
    for (name, text) in [
        ("meta-data", meta_data(vm_name)),
        ("user-data", user_data(keys)),
    ] {
        let path = work.join(name);
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(text.as_bytes()))
            .map_err(|err| PluginError::system(format!("cannot write {}", path.display()), err))?;
    }
    Ok(())
}

/// The argument list shared by genisoimage and `xorriso -as mkisofs`.
pub fn mkisofs_args(work: &Path, iso: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "-quiet".into(),
        "-output".into(),
        iso.as_os_str().to_os_string(),
        "-volid".into(),
        "cidata".into(),
        "-joliet".into(),
        "-rock".into(),
        work.join("user-data").into_os_string(),
        work.join("meta-data").into_os_string(),
    ]
}

fn build_iso(work: &Path, iso: &Path) -> Result<(), PluginError> {
    let args = mkisofs_args(work, iso);
    let attempts: [(&str, &[&str]); 2] = [("genisoimage", &[]), ("xorriso", &["-as", "mkisofs"])];
    let mut last_error = String::new();
    for (program, prefix) in attempts {
        let output = match crate::overlay::private_files(&mut Command::new(program))
            .args(prefix)
            .args(&args)
            .stdin(Stdio::null())
            .output()
        {
            Ok(output) => output,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                last_error = "neither genisoimage nor xorriso is installed".to_string();
                continue;
            }
            Err(err) => return Err(PluginError::system(format!("cannot run {program}"), err)),
        };
        if output.status.success() {
            // 0600 from its first byte (private_files): it holds the guest's host key.
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(PluginError::msg(format!(
            "{program} could not build the cloud-init seed {}: {}",
            iso.display(),
            stderr.split_whitespace().collect::<Vec<_>>().join(" ")
        )));
    }
    Err(PluginError::msg(format!(
        "cannot build the cloud-init seed {}: {last_error}",
        iso.display()
    )))
}

#[cfg(test)]
mod tests {
    use hyperjob_plugin::keys::KeyPair;

    use super::*;

    fn keys() -> GuestKeys {
        GuestKeys {
            user: "gitlab-runner".to_string(),
            authorized_key: "ssh-ed25519 AAAAclient hyperjob client".to_string(),
            host: KeyPair::generate("hyperjob host").expect("generate"),
        }
    }

    #[test]
    fn user_data_installs_exactly_the_host_key_and_authorises_the_client() {
        let keys = keys();

        let text = user_data(&keys);

        assert!(text.starts_with("#cloud-config\n"), "{text}");
        assert!(
            text.contains("ssh_deletekeys: true\nssh_genkeytypes: [ed25519]\n"),
            "{text}"
        );
        assert!(
            text.contains("    lock_passwd: false\n    hashed_passwd: \"*\"\n"),
            "{text}"
        );
        assert!(
            text.contains("  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!(
                "  ed25519_public: \"{}\"\n",
                keys.host.public_openssh
            )),
            "{text}"
        );
        assert!(text.contains("  - name: \"gitlab-runner\"\n"), "{text}");
        assert!(
            text.contains("      - \"ssh-ed25519 AAAAclient hyperjob client\"\n"),
            "{text}"
        );
    }

    #[test]
    fn hostile_text_stays_inside_its_yaml_scalar() {
        let mut keys = keys();
        keys.user = "x\"\nruncmd: [reboot]".to_string();

        let text = user_data(&keys);

        assert!(!text.contains("\nruncmd:"), "{text}");
    }

    #[test]
    fn meta_data_names_the_instance() {
        assert_eq!(
            meta_data("hyperjob-job-5"),
            "instance-id: \"hyperjob-job-5\"\nlocal-hostname: \"hyperjob-job-5\"\n"
        );
    }

    #[test]
    fn seed_iso_is_private_labelled_cidata_and_sources_are_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let iso = dir.path().join("hyperjob-job-5.seed.iso");

        create(&iso, "hyperjob-job-5", &keys()).expect("seed");

        let mode = std::os::unix::fs::PermissionsExt::mode(
            &fs::metadata(&iso).expect("iso").permissions(),
        );
        let bytes = fs::read(&iso).expect("read iso");
        // ISO 9660 primary volume descriptor at 32 KiB: volume id at offset 40.
        assert_eq!(&bytes[32768 + 40..32768 + 46], b"cidata");
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).expect("dir").count(), 1);
    }
}
