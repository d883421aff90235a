//! Per-job copy-on-write disks: a qcow2 overlay whose backing file is the base image.
//!
//! The overlay is created with `qemu-img` (the tool libvirt's own storage code uses), never a
//! full copy: creating it is O(1) whatever the size of the base image.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use hyperjob_plugin::PluginError;

/// Disk image formats a base image can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Qcow2,
    Raw,
}

impl ImageFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Raw => "raw",
        }
    }

    /// Detects the format from the first bytes of an image: qcow2 has a magic number,
    /// anything else is taken as raw.
    pub fn detect(header: &[u8]) -> Self {
        if header.starts_with(b"QFI\xfb") {
            ImageFormat::Qcow2
        } else {
            ImageFormat::Raw
        }
    }
}

/// Reads the base image's format, with clear errors for a missing or unreadable file.
pub fn base_image_format(base: &Path) -> Result<ImageFormat, PluginError> {
    let mut file = File::open(base).map_err(|err| match err.kind() {
        ErrorKind::NotFound => {
            PluginError::NotFound(format!("base image {} does not exist", base.display()))
        }
        _ => PluginError::system(format!("cannot read base image {}", base.display()), err),
    })?;
    if !file
        .metadata()
        .map_err(|err| {
            PluginError::system(format!("cannot stat base image {}", base.display()), err)
        })?
        .is_file()
    {
        return Err(PluginError::NotFound(format!(
            "base image {} is not a regular file",
            base.display()
        )));
    }
    let mut header = [0u8; 4];
    let read = file.read(&mut header).map_err(|err| {
        PluginError::system(format!("cannot read base image {}", base.display()), err)
    })?;
    Ok(ImageFormat::detect(&header[..read]))
}

/// The `qemu-img` arguments that create `overlay` on top of `base`.
pub fn create_args(base: &Path, format: ImageFormat, overlay: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-F".into(),
        format.as_str().into(),
        "-b".into(),
        base.as_os_str().to_os_string(),
        overlay.as_os_str().to_os_string(),
    ]
}

/// Makes every file `command` creates private to its owner from the first byte (the child
/// runs with umask 077): an overlay holds the job's checked-out code and what its scripts
/// write, a seed the guest's private host key. libvirt hands them to QEMU by ownership.
pub(crate) fn private_files(command: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs in the forked child before exec and only calls umask(2), which
    // is async-signal-safe, cannot fail and touches nothing but the child's own file mask.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            libc::umask(0o077);
            Ok(())
        })
    }
}

/// Creates the overlay (0600). On failure nothing is left behind.
pub fn create(base: &Path, overlay: &Path) -> Result<(), PluginError> {
    let format = base_image_format(base)?;
    let output = private_files(&mut Command::new("qemu-img"))
        .args(create_args(base, format, overlay))
        .stdin(Stdio::null())
        .output()
        .map_err(|err| {
            PluginError::system("cannot run qemu-img (is qemu-utils installed?)", err)
        })?;
    if !output.status.success() {
        let _ = remove_file(overlay);
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(PluginError::msg(format!(
            "qemu-img could not create overlay {}: {}",
            overlay.display(),
            stderr.split_whitespace().collect::<Vec<_>>().join(" ")
        )));
    }
    Ok(())
}

/// Removes a file; an absent file is fine.
pub fn remove_file(path: &Path) -> Result<(), PluginError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(()),
        Err(err) => Err(PluginError::system(
            format!("cannot remove {}", path.display()),
            err,
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn qcow2_magic_is_detected() {
        assert_eq!(
            ImageFormat::detect(b"QFI\xfb\0\0\0\x03"),
            ImageFormat::Qcow2
        );
    }

    #[test]
    fn anything_else_is_raw() {
        assert_eq!(ImageFormat::detect(b"\x7fELF"), ImageFormat::Raw);
        assert_eq!(ImageFormat::detect(b""), ImageFormat::Raw);
    }

    #[test]
    fn create_args_name_the_backing_format_explicitly() {
        let args = create_args(
            Path::new("/img/base.qcow2"),
            ImageFormat::Qcow2,
            Path::new("/img/job.qcow2"),
        );

        let args: Vec<_> = args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "/img/base.qcow2",
                "/img/job.qcow2"
            ]
        );
    }

    #[test]
    fn missing_base_image_is_not_found() {
        let err =
            base_image_format(&PathBuf::from("/nonexistent/base.qcow2")).expect_err("missing");

        assert!(matches!(err, PluginError::NotFound(_)));
        assert_eq!(
            err.to_string(),
            "base image /nonexistent/base.qcow2 does not exist"
        );
    }

    #[test]
    fn directory_as_base_image_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");

        let err = base_image_format(dir.path()).expect_err("a directory");

        assert!(err.to_string().ends_with("is not a regular file"), "{err}");
    }

    #[test]
    fn unreadable_base_image_path_names_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").expect("write");
        let below_a_file = file.join("base.qcow2");

        let err = base_image_format(&below_a_file).expect_err("ENOTDIR");

        assert!(
            err.to_string().starts_with("cannot read base image"),
            "{err}"
        );
        assert!(err.to_string().contains("plain-file/base.qcow2"), "{err}");
    }

    #[test]
    fn overlay_on_a_real_base_is_small_and_backed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).expect("base");
        let overlay = dir.path().join("job.qcow2");

        create(&base, &overlay).expect("overlay");

        let info = Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&overlay)
            .output()
            .expect("qemu-img info");
        let info = String::from_utf8_lossy(&info.stdout);
        assert!(
            info.contains("\"backing-filename-format\": \"raw\""),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"backing-filename\": \"{}\"", base.display())),
            "{info}"
        );
        assert!(std::fs::metadata(&overlay).expect("meta").len() < (1 << 20));
        // Private as qemu-img created it: nobody changed the mode afterwards.
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&overlay).expect("meta").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .expect("list")
            .map(|entry| entry.expect("entry").path())
            .collect();
        files.sort();
        files
    }

    /// The failure happens *during* create: a real qcow2 base (4 PiB virtual, 512 KiB
    /// clusters) is too large for an overlay with qemu-img's default 64 KiB clusters, which
    /// qemu-img finds out after it has created and written the overlay file.
    #[test]
    fn failed_create_leaves_no_overlay() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        let made = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=512k"])
            .arg(&base)
            .arg("4P")
            .status()
            .expect("qemu-img");
        assert!(made.success());
        assert_eq!(
            base_image_format(&base).expect("readable"),
            ImageFormat::Qcow2
        );
        let overlay = dir.path().join("job.qcow2");

        let err = create(&base, &overlay).expect_err("too large");

        let message = err.to_string();
        assert!(
            message.starts_with(&format!(
                "qemu-img could not create overlay {}:",
                overlay.display()
            )),
            "{message}"
        );
        assert!(message.contains("too large"), "{message}");
        assert!(!message.contains('\n'), "{message}");
        assert_eq!(files_in(dir.path()), vec![base]);
    }

    /// qemu-img leaves the overlay path alone when it cannot open the backing file; what an
    /// earlier, killed attempt left there goes too.
    #[test]
    fn failed_create_removes_a_partial_overlay_of_a_killed_attempt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("base.qcow2");
        std::fs::write(&base, b"QFI\xfbnot a qcow2 header at all").expect("base");
        let overlay = dir.path().join("job.qcow2");
        std::fs::write(&overlay, b"QFI\xfb half-written").expect("partial overlay");

        let err = create(&base, &overlay).expect_err("corrupt base");

        assert!(
            err.to_string()
                .contains("qemu-img could not create overlay"),
            "{err}"
        );
        assert_eq!(files_in(dir.path()), vec![base]);
    }
}
