//! The connection under an SSH session: TCP, or a UNIX socket, whose server is waited for
//! before the client says anything.

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// An open connection to the guest, before SSH.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Waits until the server's version line (`SSH-…`) can be read from `stream`, without reading
/// it, in slices so a set `cancel` is seen. Lines before it are read and dropped, as RFC 4253
/// (4.2) allows a server to send them (a guest's bridge on a virtio-serial port says so when a
/// session ended while a client was still connected).
pub(crate) fn greeted(
    stream: &UnixStream,
    timeout: Duration,
    cancel: &AtomicBool,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let mut skipped = 0usize;
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(ErrorKind::Interrupted, "interrupted"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                format!("no greeting within {} s", timeout.as_secs()),
            ));
        }
        let mut fd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(left.min(Duration::from_millis(100)).as_millis()).unwrap_or(100);
        // SAFETY: one valid pollfd that lives across the call, for a socket that stays open
        // meanwhile; poll(2) only writes its revents.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::poll(&mut fd, 1, millis) };
        if rc < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            continue;
        }
        let mut peeked = [0u8; 256];
        // SAFETY: `peeked` is a writable buffer of its length; MSG_PEEK leaves the data queued.
        #[allow(unsafe_code)]
        let n = unsafe {
            libc::recv(
                stream.as_raw_fd(),
                peeked.as_mut_ptr().cast(),
                peeked.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        let Ok(n) = usize::try_from(n) else {
            let err = std::io::Error::last_os_error();
            if matches!(err.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) {
                continue;
            }
            return Err(err);
        };
        let data = &peeked[..n];
        // The end, the version line (or the start of one), or more than a line: the
        // handshake reads and judges it.
        let line_end = data.iter().position(|b| *b == b'\n');
        if n == 0 || data.starts_with(b"SSH-") || skipped >= 16 {
            return Ok(());
        }
        if b"SSH-".starts_with(data) {
            // Only part of "SSH-" so far: wait for the rest.
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        let Some(end) = line_end else {
            if n == peeked.len() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let mut line = vec![0u8; end + 1];
        std::io::Read::read_exact(&mut &*stream, &mut line)?;
        tracing::debug!(
            "dropped a line before the server's version: {:?}",
            String::from_utf8_lossy(&line).trim_end()
        );
        skipped += 1;
    }
}
