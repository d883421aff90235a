//! The relay's UNIX socket: bound 0600, reachable however long `state_dir`'s path is, and
//! talking only to processes of the user hyperjob runs as.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The room a socket address has for its path (`sun_path`, with its terminating NUL).
const SUN_PATH_ROOM: usize = 107;

/// Calls `f` with a path to `path` that fits a socket address: `path` itself, or, when that is
/// too long, `/proc/self/fd/<dir>/<name>` through an open handle on its directory.
fn with_short_path<T>(path: &Path, f: impl FnOnce(&Path) -> io::Result<T>) -> io::Result<T> {
    if path.as_os_str().len() <= SUN_PATH_ROOM {
        return f(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a file path",
        ));
    };
    let handle = File::options()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(dir)?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd())).join(name);
    f(&short)
}

/// Sets the process's umask to `mask` until dropped.
struct Umask(libc::mode_t);

impl Umask {
    #[allow(unsafe_code)]
    fn set(mask: libc::mode_t) -> Self {
        // SAFETY: umask(2) cannot fail and only changes this process's file creation mask.
        Self(unsafe { libc::umask(mask) })
    }
}

impl Drop for Umask {
    #[allow(unsafe_code)]
    fn drop(&mut self) {
        // SAFETY: as in `set`: restores the mask that was there before.
        unsafe {
            libc::umask(self.0);
        }
    }
}

/// Binds a listening socket at `path`, mode 0600 from the start, replacing a socket (or a
/// link) an earlier relay left there; refuses to replace anything else.
pub(crate) fn bind_private(path: &Path) -> io::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() || meta.file_type().is_symlink() => {
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "something that is not a socket is in the way",
            ))
        }
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let listener = {
        let _umask = Umask::set(0o177);
        with_short_path(path, |path| UnixListener::bind(path))?
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// An integer socket option of descriptor `fd`.
#[allow(unsafe_code)]
fn socket_option(fd: RawFd, option: libc::c_int) -> io::Result<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a descriptor number (it fails cleanly when that is not open or
    // not a socket), with a valid, exclusively borrowed int and its size.
    let result = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            option,
            std::ptr::from_mut(&mut value).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The listening socket prepare passed to the relay as descriptor
/// [`crate::detach::PASSED_FD`]; an error when that descriptor is not a listening UNIX socket.
#[allow(unsafe_code)]
pub(crate) fn passed_listener() -> io::Result<UnixListener> {
    let fd = crate::detach::PASSED_FD;
    if socket_option(fd, libc::SO_DOMAIN)? != libc::AF_UNIX
        || socket_option(fd, libc::SO_ACCEPTCONN)? == 0
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a listening UNIX socket",
        ));
    }
    // SAFETY: the descriptor is open and a listening socket (checked above); nothing else in
    // this process owns it: the process was started with it and takes it once.
    Ok(unsafe { <UnixListener as std::os::fd::FromRawFd>::from_raw_fd(fd) })
}

/// Connects to the socket at `path`.
pub(crate) fn connect(path: &Path) -> io::Result<UnixStream> {
    with_short_path(path, |path| UnixStream::connect(path))
}

/// The user id of the process at the other end of `stream`.
#[allow(unsafe_code)]
pub(crate) fn peer_uid(stream: &UnixStream) -> io::Result<u32> {
    let mut credentials = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut length = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: the socket is open for the duration of the call; `credentials` and `length` are
    // valid, exclusively borrowed locals and `length` is the size of `credentials`.
    let result = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            std::ptr::from_mut(&mut credentials).cast(),
            &mut length,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(credentials.uid)
}

/// The user id this process runs as.
#[allow(unsafe_code)]
pub(crate) fn own_uid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Waits until `fd` is readable (or closed) or `timeout` passes; `Ok(false)` on timeout or
/// when a signal interrupted the wait.
#[allow(unsafe_code)]
pub(crate) fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: `pollfd` is a valid, exclusively borrowed array of one element for the duration
    // of the call; the caller keeps `fd` open.
    let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
    match ready {
        0 => Ok(false),
        n if n > 0 => Ok(true),
        _ => {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::fs::MetadataExt;

    use super::*;

    #[test]
    fn the_socket_is_0600_and_replaces_one_left_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job-1.relay.sock");
        drop(bind_private(&path).expect("first bind"));

        let listener = bind_private(&path).expect("bind over the stale socket");
        let mut client = connect(&path).expect("connect");
        let (mut server, _) = listener.accept().expect("accept");
        client.write_all(b"hi").expect("write");
        let mut got = [0u8; 2];
        server.read_exact(&mut got).expect("read");

        let mode = std::fs::symlink_metadata(&path).expect("meta").mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(&got, b"hi");
        assert_eq!(peer_uid(&server).expect("peer"), own_uid());
    }

    #[test]
    fn a_socket_below_a_very_long_directory_path_still_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        let deep = dir.path().join("d".repeat(60)).join("e".repeat(60));
        std::fs::create_dir_all(&deep).expect("mkdir");
        let path = deep.join("job-123456789.relay.sock");
        assert!(path.as_os_str().len() > SUN_PATH_ROOM);

        let listener = bind_private(&path).expect("bind");
        let _client = connect(&path).expect("connect");

        assert!(listener.accept().is_ok());
        assert!(std::fs::symlink_metadata(&path)
            .expect("meta")
            .file_type()
            .is_socket());
    }

    #[test]
    fn a_regular_file_in_the_way_is_not_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job-1.relay.sock");
        std::fs::write(&path, "data").expect("write");

        assert!(bind_private(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).expect("read"), "data");
    }

    #[test]
    fn waiting_for_a_quiet_socket_times_out_and_a_closed_one_is_readable() {
        let (ours, theirs) = UnixStream::pair().expect("pair");

        let quiet = wait_readable(ours.as_raw_fd(), Duration::from_millis(10)).expect("poll");
        drop(theirs);
        let closed = wait_readable(ours.as_raw_fd(), Duration::from_millis(10)).expect("poll");

        assert!(!quiet);
        assert!(closed);
    }
}
